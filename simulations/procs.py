"""Processes as Linux shows them in /proc: who is whose child, whose environment names a folder,
and stopping a whole process tree by PID.

The one place that walks /proc for the launcher (``simulations.launch``), the deployment helper
(``simulations.deployment``) and the benchmarks' memory sampling (``simulations.benchlib``).
A process is identified by (pid, start time) wherever it is signalled, so a PID the kernel has
reused for another process is never signalled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (the state first); None if it is gone."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # the command name may contain spaces and parentheses


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time in clock ticks) of a process, from /proc; None if it is gone."""
    fields = _stat_fields(pid)
    return None if fields is None else (fields[0], int(fields[1]), int(fields[19]))


def cpu_times(pid: int) -> tuple[float, float] | None:
    """CPU seconds (user + system) a process has used, and its exited children that it waited
    for; None if it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


def live_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process; None if it is gone or a zombie."""
    st = proc_stat(pid)
    if st is None or st[0] == "Z":
        return None
    return st[1], st[2]


def _children(include_zombies: bool) -> dict[int, list[tuple[int, int]]]:
    """parent pid -> its children as (pid, start time), from one pass over /proc."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in PROC.iterdir() if PROC.is_dir() else []:
        if not entry.name.isdigit():
            continue
        st = proc_stat(int(entry.name))
        if st is None or (st[0] == "Z" and not include_zombies):
            continue
        children.setdefault(st[1], []).append((int(entry.name), st[2]))
    return children


def descendants(pid: int, *, include_zombies: bool = False) -> list[tuple[int, int]]:
    """Every descendant of ``pid`` as (pid, start time); live ones only unless ``include_zombies``."""
    children = _children(include_zombies)
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child[0])
    return out


def trees(roots: list[int]) -> list[int]:
    """``roots`` and every live process below any of them, sorted (one pass over /proc)."""
    children = _children(include_zombies=False)
    out, todo = set(roots), list(roots)
    while todo:
        for pid, _ in children.get(todo.pop(), []):
            if pid not in out:
                out.add(pid)
                todo.append(pid)
    return sorted(out)


def tree_pids(root: int) -> list[int]:
    """``root`` and every process below it (zombies included: the memory sampler skips what it cannot read)."""
    return [root, *(pid for pid, _ in descendants(root, include_zombies=True))]


def processes_with_env(name: str, value: str, *, below: bool = False) -> list[int]:
    """Live PIDs (never this process) whose environment has ``name=value``.

    With ``below``, ``name=<a path under value>`` counts too (``value`` is then a folder). This
    is how everything a launch or a deployment started is found, however detached: every such
    process inherited the private ``FLWR_HOME``.
    """
    needle = f"{name}={value}".encode()
    found = []
    for env_file in PROC.glob("[0-9]*/environ"):
        pid = int(env_file.parent.name)
        try:
            entries = env_file.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(e == needle or (below and e.startswith(needle + b"/")) for e in entries) and live_stat(pid):
            found.append(pid)
    return [pid for pid in found if pid != os.getpid()]


def signal_if_same(pid: int, started: int, sig: int) -> None:
    """Send ``sig`` to ``pid`` only if it is still the process that started at ``started``."""
    st = live_stat(pid)
    if st is not None and st[1] == started:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_process(proc: subprocess.Popen, grace: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Stop ``proc`` (started in its own session) and every process below it, by PID.

    The tree is read before signalling: once a parent is gone its children are re-parented
    and could not be found any more. A SuperNode's ``flower-superexec`` survives SIGTERM to
    the SuperNode alone, and the SuperLink's SuperExec runs in a session of its own, so the
    process group is not enough. SIGTERM (or ``sig``) first, SIGKILL after ``grace`` seconds.
    """
    tree = descendants(proc.pid)
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            proc.send_signal(sig)
    for pid, started in tree:
        signal_if_same(pid, started, sig)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc.poll() is not None and all(live_stat(p) is None or live_stat(p)[1] != s for p, s in tree):
            break
        time.sleep(0.1)
    for pid, started in tree + descendants(proc.pid):
        signal_if_same(pid, started, signal.SIGKILL)
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def kill_all(pids: list[int]) -> None:
    """SIGKILL each of ``pids`` that still exists."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
