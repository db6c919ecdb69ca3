"""client.wake: the SuperNode's datagram wakes the worker at once; nothing else changes what it does."""

from __future__ import annotations

import time

import pytest

from client import wake
from common import flwr_runtime as FR

pytestmark = pytest.mark.skipif(not wake.supported(), reason="abstract Unix sockets are Linux's")


@pytest.fixture
def listener():
    port = 40000 + int(time.monotonic_ns() % 20000)
    lst = wake.WakeListener(port)
    yield lst
    lst.close()


def test_a_wake_ends_the_wait_at_once_and_no_wake_waits_the_timeout(listener):
    t = time.monotonic()
    assert listener.wait(0.15) is False
    assert time.monotonic() - t >= 0.14 and listener.woken == 0
    wake.send_wake(listener.port)
    t = time.monotonic()
    assert listener.wait(5.0) is True
    assert time.monotonic() - t < 1.0 and listener.woken == 1


def test_wakes_for_another_supernode_do_not_wake_this_worker(listener):
    wake.send_wake(listener.port + 1)
    assert listener.wait(0.1) is False and listener.woken == 0


def test_wakes_that_came_before_the_ask_are_drained_and_a_flood_is_paced(listener):
    for _ in range(50):
        wake.send_wake(listener.port)  # the kernel queues a few (net.unix.max_dgram_qlen), drops the rest
    listener.drain()
    assert 1 <= listener.woken <= 50
    assert listener.wait(0.1) is False  # all answered by the ask that followed the drain
    for _ in range(50):
        wake.send_wake(listener.port)
    t = time.monotonic()
    woken = [listener.wait(0.2) for _ in range(3)]
    # the first wake returns at once and drains the rest: the next waits see none
    assert woken == [True, False, False] and time.monotonic() - t >= 0.39


def test_a_second_listener_on_the_same_name_falls_back_to_polling(listener, caplog):
    other = wake.WakeListener(listener.port)
    try:
        assert other.sock is None and "taken" in caplog.text
        t = time.monotonic()
        assert other.wait(0.1) is False and time.monotonic() - t >= 0.09
        wake.send_wake(listener.port)  # the first one still gets it
        assert listener.wait(1.0) is True
    finally:
        other.close()


def test_sending_with_nobody_listening_is_silent():
    wake.send_wake(1)  # never raises


def test_the_supernode_wakes_the_worker_after_a_messages_arrays_are_in_and_not_when_the_pull_fails(monkeypatch):
    calls = []

    def pull(ids, pull_object_fn, **kw):
        calls.append("pull")
        if ids == ["bad"]:
            raise RuntimeError("no object")
        return {i: b"x" for i in ids}

    monkeypatch.setattr(FR.start_client_internal, "time", time)
    monkeypatch.setattr(FR.start_client_internal, "pull_objects", pull)
    FR.fast_polls(on_message=lambda: calls.append("wake"))
    assert FR.start_client_internal.pull_objects(["a"], pull_object_fn=print) == {"a": b"x"}
    assert calls == ["pull", "wake"]
    with pytest.raises(RuntimeError):
        FR.start_client_internal.pull_objects(["bad"], pull_object_fn=print)
    assert calls == ["pull", "wake", "pull"]


def test_a_zero_timeout_does_not_block_or_raise(listener):
    assert listener.wait(0) is False
    wake.send_wake(listener.port)
    assert listener.wait(0) is True


def test_an_empty_datagram_does_not_stop_the_drain(listener):
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"", wake.wake_name(listener.port))
        sock.sendto(b"!", wake.wake_name(listener.port))
    time.sleep(0.05)
    assert listener.drain() == 2
