"""A site's warm worker: runs its ClientApp tasks in one long-lived process (issue 21).

    python -m client.worker run --runtime-api-address 127.0.0.1:9094 --insecure     # beside the SuperNode
    python -m client.worker supernode --superlink HOST:9092 --isolation process ...  # the SuperNode itself

Stock Flower starts a fresh ``flwr-clientapp`` process for every message a site receives
(about 5 s of imports on this machine before any work), in either isolation mode. With the
SuperNode in ``--isolation process``, this worker takes the place of ``flower-superexec``: it
asks the SuperNode's Runtime API for a task when the SuperNode wakes it (``client.wake``), or
every ``--poll-interval`` seconds beside a SuperNode that does not, and runs each
one here (``common.flwr_runtime.TaskRunner``), keeping the ClientApp imported per app
package (FAB hash): torch, opacus and what the app caches stay warm across rounds and runs.

- A ClientApp exception becomes an error reply (as ``flwr-clientapp`` sends); the worker goes on.
- Runs do not share state: the app is rebuilt from each message's run config, its caches are
  keyed by what they depend on, and a new app package replaces the old one's code.
- Privacy state is the site's ledger on disk, written before the reply is pushed, as always;
  nothing about a site's spend lives in the worker's memory. A worker killed mid-task loses
  that reply only: the round goes on without the site, the supervisor (compose ``restart:``,
  a systemd unit: docker/README.md) starts it again for the next one.
- Security is Flower's: the worker speaks to its own SuperNode's Runtime API on loopback
  (with the SuperExec's shared secret when the SuperNode sets one); TLS and node
  authentication stay on the SuperNode's link to the SuperLink.

``supernode`` starts Flower's own ``flower-supernode`` with shorter fixed waits
(``common.flwr_runtime.fast_polls``: 0.2 s after an empty pull instead of 3 s), and has it wake
the worker as soon as a message is in (``client.wake``): the worker then asks for the task at
once instead of polling every 0.1 s (it still asks once a second, in case a wake is lost).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import gc
import importlib
import logging
import signal
import sys
import time
from pathlib import Path

import httpx

from client.wake import WakeListener, send_wake

log = logging.getLogger("fedgen.worker")

#: What fedgen's ClientApp imports, loaded before the first task rather than during it; none of
#: it reads data or depends on a run. torch._dynamo: torch imports it when the first optimizer
#: is built (1.7 s of a first round here, profiled); sklearn.datasets: the digits loader's
#: (0.35-0.41 s with pandas, profiled).
PRELOAD = ("torch", "opacus", "torch._dynamo", "sklearn.datasets")
#: flower-supernode's Runtime API port when it is not given (its --port).
SUPERNODE_RUNTIME_PORT = 9094


def _serve(args: argparse.Namespace) -> int:
    from common.flwr_runtime import TaskRunner, acquire_task, check_flwr_version, runtime_client

    check_flwr_version()
    certificates = args.root_certificates.read_bytes() if args.root_certificates else None
    secret = args.superexec_auth_secret_file.read_bytes().strip() if args.superexec_auth_secret_file else None
    # retry=False: Flower's retry would wait out a SuperNode that is down for as long as it is
    # down (backing off to 20 s), deaf to SIGTERM; this loop retries every second instead.
    client = runtime_client(args.runtime_api_address, insecure=args.insecure, root_certificates=certificates,
                            secret=secret, retry=False)
    runner = TaskRunner(args.runtime_api_address, insecure=args.insecure, root_certificates=certificates)
    waker = WakeListener(_port(args.runtime_api_address))
    stopping, busy = [], []

    def stop(signum: int, _frame: object) -> None:  # SIGTERM: finish the task in hand, then exit
        log.info("signal %d: stopping after the current task", signum)
        stopping.append(signum)
        send_wake(waker.port)  # out of an idle wait at once

    def interrupt(signum: int, frame: object) -> None:
        # Flower's own code raises SIGINT in the process that runs a task when the task is no
        # longer valid (its heartbeat is refused, a request gets 401: the run was stopped or the
        # SuperNode restarted): in flwr-clientapp that ends the one-task process. Here it ends
        # nothing: the task's remaining requests fail and the worker serves the next one. Idle,
        # SIGINT is an operator's Ctrl-C: stop.
        if busy:
            log.warning("task %d: Flower cancelled it (SIGINT while running it); serving on", busy[-1])
        else:
            stop(signum, frame)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, interrupt)
    log.info("warm worker on %s (poll every %gs, or every %gs while the SuperNode wakes it for each task)",
             args.runtime_api_address, args.poll_interval, args.woken_poll_interval)
    served, woken, wakes_work, down = 0, False, False, False
    _settle_memory(keep=True, unkeep=False)  # what the preload imported: frozen before the first task
    while not stopping:
        woken = waker.drain() > 0 or woken  # the ask below answers every wake so far
        try:
            token = acquire_task(client)
        except httpx.HTTPError as err:  # the SuperNode is (re)starting, or refuses us: try again
            if not down:
                log.warning("runtime API at %s: %s (asking again every second)", args.runtime_api_address, err)
            down = True
            waker.wait(max(args.poll_interval, 1.0))  # a SIGTERM's own wake ends it
            continue
        if down:
            log.info("runtime API at %s answers again", args.runtime_api_address)
            down = False
        if token is None:
            if stopping:
                break
            # A SuperNode that wakes us (client.wake) needs only a rare check; a stock one polling.
            woken = waker.wait(args.woken_poll_interval if wakes_work else args.poll_interval)
            continue
        start = time.perf_counter()
        log.info("task %d: acquired", served + 1)
        served += 1
        busy.append(served)
        # Our SuperNode wakes us for every task before the task's input can be pulled (it sends
        # the wake once it has the arrays, and stores them right after): before we asked, or
        # while we pulled when a poll took the task first. What comes later (a stray datagram
        # during training, the next message's wake) is not this task's.
        seen = [woken]

        def input_in() -> None:
            seen[0] = waker.drain() > 0 or seen[0]

        loads, forgets = runner.loads, runner.forgets
        try:
            outcome = runner.run(token, on_input=input_in)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:  # noqa: BLE001 - e.g. flwr's RunNotRunningException (a BaseException):
            # talking to the SuperNode failed; the SuperNode answers the task when its token expires.
            log.exception("task %d: the SuperNode's Runtime API failed", served)
            continue
        finally:
            busy.clear()
            if seen[0] and not wakes_work:
                log.info("the SuperNode wakes this worker for each task: asking every %gs otherwise",
                         args.woken_poll_interval)
            elif wakes_work and not seen[0]:  # a stock SuperNode never wakes; a failed pull neither
                log.info("task %d came without a wake: asking every %gs again", served, args.poll_interval)
            wakes_work, woken = seen[0], False
            # Also when the task failed after its app was imported or the old one let go.
            settled = _settle_memory(keep=runner.loads > loads, unkeep=runner.forgets > forgets)
        outcome.phases["memory"] = settled
        log.info("task %d of run %s: %s in %.2fs%s (%s)%s", served, outcome.run_id, outcome.status,
                 time.perf_counter() - start, " (app loaded)" if outcome.loaded else "",
                 " ".join(f"{k} {v:.3f}" for k, v in outcome.phases.items()),
                 f": {outcome.details}" if outcome.details else "")
        if args.max_tasks and served >= args.max_tasks:
            break
    client.close()
    waker.close()
    return 0


def _port(address: str) -> int:
    """The port of ``HOST:PORT`` (``[::1]:PORT`` too)."""
    return int(address.rsplit(":", 1)[1])


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library: nothing to do)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _settle_memory(*, keep: bool, unkeep: bool) -> float:
    """Free what a task left behind before the next one; the seconds it took. ``keep``: freeze
    what is alive now (the worker's start; a task that imported the app); ``unkeep``: unfreeze
    all first (the task let an app go: a new package replaced it).

    - **Cyclic garbage.** A task's objects that live through it (the model, its optimizers,
      Opacus' hooks and accountant: reference cycles) reach Python's oldest generation, whose
      collection runs rarely in a process of 400,000 objects. Left alone, a digits-quick
      worker's heap rose by about 55 KB a task until a full collection took most of it back
      (one process: +21.5 MB from task 100 to task 500). So every task ends with
      ``gc.collect()``.
    - **Cheap because what was alive is frozen.** A collection walks every object it can see:
      0.2 s here for all of them. Everything alive at the worker's start (torch, opacus, Flower)
      and after a task that imported the app (the app, its caches, whatever else lives then)
      is moved out of the collector's sight (``gc.freeze``), so the collection after a task
      walks only what the tasks since made: about 1 ms (median in a deployment; at most 40 ms
      in 900 tasks). Frozen objects are still freed by reference counting (an evicted dataset
      cache), but a reference cycle through a frozen object is never collected: a new app
      package first unfreezes all (the old app's modules are such cycles) and pays one full
      collection. A package that then fails to import freezes nothing (the old app must go):
      until one imports, every task pays a full collection (0.2 s; those tasks fail anyway).
      The app's caches must not hold cycles (a model, an Opacus object); today they hold
      numbers, tuples, read-only arrays and datasets of tensors.
    - **Freed pages go back to the system** (glibc's ``malloc_trim``, 0.1 ms): without it glibc
      keeps them for reuse and the worker's PSS creeps up for tens of tasks.

    What else grew was oneDNN's cache (torch's CPU convolutions), which keeps the kernels it
    built per input shape, up to ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` (1024) of them: Poisson
    sampling gives every step a batch size of its own. The private model's convolutions now run
    on a few batch sizes planned around the expected batch (common/batch_shapes.py), so it holds
    a few shapes, all met in the first rounds (docker/README.md, "The worker's memory")."""
    t = time.perf_counter()
    if unkeep:
        gc.unfreeze()
    freed = gc.collect()
    if unkeep:
        log.info("an app package was let go: %d objects freed", freed)
    if keep:
        gc.freeze()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    return time.perf_counter() - t


def _supernode(argv: list[str]) -> int:
    from flwr.supernode.cli import flower_supernode

    from common.flwr_runtime import check_flwr_version, fast_polls

    check_flwr_version()
    port = argparse.ArgumentParser(add_help=False)
    port.add_argument("--port", type=int, default=SUPERNODE_RUNTIME_PORT)
    fast_polls(on_message=functools.partial(send_wake, port.parse_known_args(argv)[0].port))
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["supernode"]:  # every other argument is flower-supernode's own
        return _supernode(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m client.worker", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve the SuperNode's ClientApp tasks in this process")
    run.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (its --port), loopback")
    tls = run.add_mutually_exclusive_group(required=True)
    tls.add_argument("--insecure", action="store_true", help="plain HTTP to the SuperNode (loopback only)")
    tls.add_argument("--root-certificates", type=Path, help="CA certificate of the Runtime API's TLS")
    run.add_argument("--superexec-auth-secret-file", type=Path, help="the SuperNode's SuperExec secret, if it sets one")
    run.add_argument("--poll-interval", type=float, default=0.1,
                     help="seconds between asks for a task while the SuperNode sends no wakes (default 0.1)")
    run.add_argument("--woken-poll-interval", type=float, default=1.0,
                     help="seconds between asks once the SuperNode wakes this worker for each task (default 1)")
    run.add_argument("--max-tasks", type=int, default=0, help="exit after this many tasks (0 = never; tests)")
    run.add_argument("--preload", default=",".join(PRELOAD),
                     help=f"modules to import at start, before the first task (default {','.join(PRELOAD)}); "
                          "not the app's own packages (client, common): the app's import replaces them, and "
                          "frozen at start (worker._settle_memory) their old copies would stay in memory")
    sub.add_parser("supernode", help="flower-supernode with short polls; pass flower-supernode's arguments")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per poll
    for name in filter(None, args.preload.split(",")):
        importlib.import_module(name)  # paid once at start, not in the first round
    return _serve(args)


if __name__ == "__main__":
    raise SystemExit(main())
