"""client.worker's serve loop against stubs of the SuperNode: when it asks for tasks, and when it stops."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time

import pytest

import common.flwr_runtime as FR
from client import wake
from client import worker as W

pytestmark = pytest.mark.skipif(not wake.supported(), reason="abstract Unix sockets are Linux's")


class Script:
    """A stand-in SuperNode: ``tasks`` maps an ask's number to a token; ``before`` runs before an ask,
    ``during`` while the input of the task an ask found is pulled, ``training`` while it runs."""

    def __init__(self, port: int, stop_after: int, tasks: dict[int, str] | None = None, before=None,
                 during=None, training=None, apps=None) -> None:
        self.port, self.stop_after, self.tasks, self.before = port, stop_after, tasks or {}, before or {}
        self.during = during or {}  # ask number -> what happens while its task's input is pulled
        self.training = training or {}  # ask number -> what happens while its task's ClientApp runs
        # ask number -> what its task does to the runner's app: "load" (the first), "replace",
        # "replace, then fail" (the new app loads, then talking to the SuperNode fails), "fail to replace"
        self.apps = apps or {}
        self.asks: list[float] = []
        self.settled: list[tuple[bool, bool]] = []  # (keep, unkeep) of each cleanup, the worker's start first

    def acquire(self, _client):
        n = len(self.asks) + 1
        self.asks.append(time.monotonic())
        if n in self.before:
            self.before[n]()
        if n >= self.stop_after:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.tasks.get(n)


@pytest.fixture
def serve(monkeypatch):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    port = 41000 + int(time.monotonic_ns() % 20000)

    def run(script: Script, poll: float = 0.05, woken_poll: float = 0.6) -> None:
        monkeypatch.setattr(FR, "check_flwr_version", lambda: None)
        monkeypatch.setattr(FR, "runtime_client", lambda *a, **k: type("C", (), {"close": lambda self: None})())
        outcome = FR.TaskOutcome("completed", "", 1, "h", False, {})

        def task(runner, token, on_input=None):
            script.during.get(len(script.asks), lambda: None)()  # while the input is pulled
            if on_input is not None:
                on_input()
            app = script.apps.get(len(script.asks), "")
            runner.forgets += app.startswith(("replace", "fail to replace"))
            runner.loads += app in ("load", "replace", "replace, then fail")
            if app.endswith("fail"):
                raise RuntimeError("the SuperNode's Runtime API failed")
            script.training.get(len(script.asks), lambda: None)()  # while the ClientApp runs
            return outcome

        monkeypatch.setattr(FR, "TaskRunner", lambda *a, **k: type("R", (), {"run": task, "loads": 0, "forgets": 0})())
        monkeypatch.setattr(FR, "acquire_task", script.acquire)
        # A full collection in this large process would take tenths of a second between asks
        # (tests/unit/test_worker_memory.py tests the cleanup itself); here: when it is asked for what.
        monkeypatch.setattr(W, "_settle_memory", lambda *, keep, unkeep: script.settled.append((keep, unkeep)) or 0.0)
        args = argparse.Namespace(root_certificates=None, superexec_auth_secret_file=None, insecure=True,
                                  runtime_api_address=f"127.0.0.1:{script.port}", poll_interval=poll,
                                  woken_poll_interval=woken_poll, max_tasks=0)
        assert W._serve(args) == 0

    yield run, port
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def _gaps(asks: list[float]) -> list[float]:
    return [b - a for a, b in zip(asks, asks[1:])]


def test_a_stray_wake_does_not_slow_the_polling_of_a_worker_whose_supernode_sends_none(serve):
    run, port = serve
    script = Script(port, stop_after=8, before={2: lambda: wake.send_wake(port)})
    run(script)
    assert max(_gaps(script.asks)[2:]) < 0.4  # still every 0.05 s, never the 0.6 s of a woken worker


def test_a_wake_followed_by_a_task_lets_the_worker_ask_rarely_and_wakes_bring_it_at_once(serve, caplog):
    run, port = serve
    caplog.set_level(logging.INFO, "fedgen.worker")
    # ask 2 finds nothing, a wake comes (the SuperNode's), ask 3 finds the task; then idle asks
    # come every 0.6 s, and a wake during that wait brings ask 6 at once
    script = Script(port, stop_after=6, tasks={3: "token"},
                    before={2: lambda: wake.send_wake(port), 5: lambda: wake.send_wake(port)})
    run(script)
    gaps = _gaps(script.asks)
    assert "the SuperNode wakes this worker for each task" in caplog.text
    assert gaps[3] > 0.5  # ask 4 -> 5: the woken worker's rare check
    assert gaps[4] < 0.3  # ask 5 -> 6: woken by the wake sent just before ask 5's answer


def test_a_sigterm_while_idle_stops_the_worker_at_once(serve):
    import threading

    run, port = serve
    script = Script(port, stop_after=100, tasks={2: "token"}, before={1: lambda: wake.send_wake(port)})
    t = time.monotonic()
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    run(script, woken_poll=30.0)  # after the task, the worker waits 30 s between asks
    assert time.monotonic() - t < 2.0  # the signal (at 1 s) ends the wait, not the 30 s


def test_a_sigterm_that_lands_while_the_worker_drains_its_wakes_stops_it_before_the_next_wait(serve, monkeypatch):
    run, port = serve
    state = {}

    class Listener(wake.WakeListener):
        def drain(self):
            if len(script.asks) == 2 and "signal" not in state:  # after the task; the signal's wake is drained here
                state["signal"] = time.monotonic()
                os.kill(os.getpid(), signal.SIGTERM)
            return super().drain()

    monkeypatch.setattr(W, "WakeListener", Listener)
    script = Script(port, stop_after=100, tasks={2: "token"}, before={1: lambda: wake.send_wake(port)})
    run(script, woken_poll=30.0)
    assert time.monotonic() - state["signal"] < 1.0


def test_a_wake_that_comes_while_a_polled_tasks_input_is_pulled_counts_and_a_task_without_one_undoes_it(
        serve, caplog):
    run, port = serve
    caplog.set_level(logging.INFO, "fedgen.worker")
    # ask 2's task was found by the 0.05 s poll, its wake comes while its input is pulled (the
    # SuperNode wakes once it has the arrays); ask 4's task comes with no wake (a stock SuperNode)
    script = Script(port, stop_after=7, tasks={2: "a", 4: "b"}, during={2: lambda: wake.send_wake(port)})
    run(script)
    gaps = _gaps(script.asks)
    assert "the SuperNode wakes this worker for each task" in caplog.text
    assert "task 2 came without a wake: asking every 0.05s again" in caplog.text
    assert gaps[2] > 0.5  # ask 3 -> 4: the woken worker's rare check
    assert max(gaps[4:]) < 0.3  # after task 2 (ask 4), polling again


def test_a_stray_wake_while_a_stock_supernodes_task_trains_does_not_slow_the_next_task(serve):
    run, port = serve
    script = Script(port, stop_after=7, tasks={2: "a", 5: "b"}, training={2: lambda: wake.send_wake(port)})
    run(script)
    assert max(_gaps(script.asks)) < 0.4  # never the 0.6 s of a woken worker


def test_a_worker_whose_supernode_is_down_retries_every_second_and_stops_on_sigterm(tmp_path):
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[2]
    log = tmp_path / "worker.log"
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "client.worker", "run", "--runtime-api-address",
                                 f"127.0.0.1:{port}", "--insecure", "--preload", ""], cwd=root, stdout=fh,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "asking again every second" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        time.sleep(1.5)  # a retry or two
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0, log.read_text()
    finally:
        proc.kill()
    text = log.read_text()
    assert text.count("asking again every second") == 1  # said once, not at every retry


def test_the_worker_keeps_what_its_start_and_each_loaded_app_leave_and_lets_a_replaced_app_go(serve):
    run, port = serve
    tasks = {n: f"t{n}" for n in range(1, 7)}
    apps = {1: "load", 3: "replace, then fail", 4: "fail to replace", 5: "load"}
    script = Script(port, stop_after=7, tasks=tasks, apps=apps)
    run(script)
    assert script.settled == [
        (True, False),   # the worker's start: what the preload imported
        (True, False),   # task 1 imported the app
        (False, False),  # task 2: the same app
        (True, True),    # task 3: a new package replaced the app, then the task failed: the old app still goes
        (False, True),   # task 4: the next package did not import: the app it let go goes too
        (True, False),   # task 5: that package imported at last
        (False, False),  # task 6
    ]
