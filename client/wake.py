"""A SuperNode tells its warm worker that a task is waiting, so the worker need not poll for it.

The worker (``client.worker``) asks its SuperNode's Runtime API for a task over HTTP; polled
every 0.1 s, that is 10 requests a second per site while idle (each a few ms of CPU in the
worker and in the SuperNode, on the cores the sites train on) and a mean wait of 0.05 s per
round. Instead the SuperNode (``python -m client.worker supernode``) sends one datagram as
soon as it has pulled a message's arrays from the SuperLink
(``common.flwr_runtime.fast_polls(on_message=)``; it stores them right after, and a worker
that asks before they are stored retries them after 20 ms), and the worker asks for the task
at once. While its tasks come with wakes (one before the ask, or while the task's input is
pulled when a poll took the task first), the worker still asks every ``--woken-poll-interval`` seconds (1 s), so a
lost datagram costs at most that; otherwise it polls every ``--poll-interval`` (0.1 s), as it
must beside a stock SuperNode that never wakes.

The channel: a Unix datagram socket in Linux's abstract namespace, named after the Runtime
API's port (:func:`wake_name`). Abstract names belong to the network namespace, which the two
share (on one machine, and in compose, where the worker runs with ``network_mode:
service:site-i``), so neither side is configured and nothing is written to disk.

What it carries and what another process can do with it: nothing but "ask now" (the
datagram's bytes are ignored). Any process in the namespace (on a plain host: any local user)
may send one; the most it can do is make the worker ask its SuperNode for a task sooner, at
most once per :data:`MIN_GAP` seconds (a real wake comes once per message, and messages to a
site are normally more than that apart). A stray wake does not switch the worker to slow
polling: only a task whose wake came before its input was in does, and a task without one
switches it back (a process that floods the socket while a stock SuperNode's tasks start
could keep a worker at 1 s asks). A process that takes the name before the worker binds it
leaves the worker polling every 0.1 s as before (logged), and learns when tasks reach the site
(the rounds' timing, which the traffic to the SuperLink shows anyway); nothing else. The task
itself, its token and its data still come only from the Runtime API, with the SuperExec's
secret. Two SuperNodes in one namespace on the same port but different loopback addresses
would share a name: give them different ports.
"""

from __future__ import annotations

import logging
import socket
import sys
import time

log = logging.getLogger("fedgen.wake")

#: The worker asks for a task at most this often, however many datagrams arrive.
MIN_GAP = 0.05
#: Datagrams taken off the socket at once (the kernel queues about 10: net.unix.max_dgram_qlen).
MAX_DRAIN = 64


def wake_name(port: int) -> bytes:
    """The abstract socket's name for the SuperNode whose Runtime API listens on ``port``."""
    return f"\0fedgen-wake-{int(port)}".encode()


def supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(socket, "AF_UNIX")


def send_wake(port: int) -> None:
    """Tell the worker of the SuperNode on ``port`` that a task waits. Never raises: no worker
    listening (none started yet, or a stock ``flower-superexec``) is normal."""
    if not supported():
        return
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto(b"!", wake_name(port))
    except OSError:
        pass


class WakeListener:
    """The worker's end. :meth:`wait` returns when a wake arrives or after ``timeout`` seconds."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.woken = 0  # wakes received so far (the worker itself goes by what drain and wait return)
        self._last = 0.0
        if not supported():
            log.info("no wake channel on %s: polling for tasks", sys.platform)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(wake_name(port))
        except OSError as err:
            sock.close()
            log.warning("wake channel for port %d taken (%s): polling for tasks", port, err)
            return
        sock.setblocking(False)
        self.sock = sock

    def drain(self) -> int:
        """Take the wakes that arrived so far off the socket (at most :data:`MAX_DRAIN`: a sender
        that never stops cannot keep the worker here); how many."""
        drained = 0
        if self.sock is None:
            return drained
        try:
            while drained < MAX_DRAIN:
                self.sock.recv(64)
                drained += 1
        except (BlockingIOError, InterruptedError):
            pass
        self.woken += drained
        return drained

    def wait(self, timeout: float) -> bool:
        """Sleep until a wake (True) or ``timeout`` seconds (False)."""
        if self.sock is None or timeout <= 0:
            time.sleep(max(timeout, 0.0))
            return self.drain() > 0
        gap = MIN_GAP - (time.monotonic() - self._last)
        if gap > 0:
            time.sleep(gap)
        self.sock.settimeout(timeout)
        try:
            self.sock.recv(64)
        except (TimeoutError, InterruptedError):
            return False
        finally:
            self.sock.setblocking(False)
        self.woken += 1
        self._last = time.monotonic()
        self.drain()
        return True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
