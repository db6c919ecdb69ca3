"""`fedgen watch` in a real terminal (tmux): the screen updates as rounds land, then it exits."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid

import pytest

from tests.unit.test_cli import create_run, make_round

pytestmark = pytest.mark.slow


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


def screen(session: str) -> str:
    return tmux("capture-pane", "-p", "-t", session)


def wait_for(session: str, text: str, timeout: float = 30) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        shown = screen(session)
        if text in shown:
            return shown
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared on the screen:\n{screen(session)}")


def test_watch_redraws_as_rounds_land_and_exits_when_the_run_ends(tmp_path):
    assert shutil.which("tmux"), "tmux is needed for this test: apt-get install tmux (scripts/setup.sh does)"
    runs = tmp_path / "runs"
    store = create_run(runs, n_rounds=1)
    session = f"fedgen-watch-{uuid.uuid4().hex[:8]}"
    done = tmp_path / "exit-code"
    cmd = (f"{sys.executable} -c 'from cli.app import main; main()' watch latest --runs-dir {runs} "
           f"--interval 0.3; echo $? > {done}; sleep 30")
    tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "50", cmd)
    try:
        first = wait_for(session, "Last round 1:")
        assert "Last round 2:" not in first
        store.record_round(make_round(2))
        second = wait_for(session, "Last round 2:")
        assert "124.9" in second  # round 2's neg-elbo is on the screen now
        store.set_status("completed")
        end = time.monotonic() + 30
        while not done.exists() and time.monotonic() < end:
            time.sleep(0.2)
        assert done.exists() and done.read_text().strip() == "0"
        assert "completed" in screen(session)
    finally:
        store.close()
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
