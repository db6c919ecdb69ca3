"""The one module that reaches into Flower's internals: a site's ClientApp run in-process, the
SuperNode's polls, and the ServerApp's first retry of a reply's arrays.

Pinned to the exact flwr version in pyproject.toml (:data:`FLWR_VERSION`);
``tests/unit/test_flwr_runtime.py`` fails with a clear message when the names or signatures
used here change. Everything else in fedgen uses Flower's public API only.

What Flower 1.41 does on a SuperNode for every message (``flwr.supernode.runtime.run_clientapp``):
a fresh ``flwr-clientapp`` process pulls the task's input (message, context, run, FAB) from the
SuperNode's Runtime API with the task's token, installs the FAB, imports the ClientApp, runs it
once, pushes the reply and the task's status, and exits. :class:`TaskRunner` does the same steps
in a long-lived process (``client.worker``) and keeps the imported ClientApp (and so torch,
opacus and whatever the app caches) per FAB hash. :func:`acquire_task` is the SuperExec's
``AcquireTask`` call (signed with the SuperExec's shared secret when one is set). In this
process the task's message is pulled with short retries (:data:`PULL_INITIAL_BACKOFF`).

:func:`fast_polls` shortens the SuperNode's fixed waits (3 s after an empty pull from the
SuperLink, 0.5 s between checks for a ClientApp's reply) for ``python -m client.worker
supernode``, which then starts Flower's own ``flower-supernode`` entry point; it also tells the
worker when a message is in (``client.wake``).

:func:`quick_reply_pulls` (the ServerApp, ``server/app.py``): the SuperLink hands the ServerApp a
site's reply as soon as the message is in, while the SuperNode still pushes its arrays; Flower
then waits 1 s before it asks for a missing array again. Measured on loopback: 2 of 5 steady
rounds of digits-quick spent 1.1-1.25 s in one such pull (docs/RESULTS.md, "Deployed rounds").
"""

from __future__ import annotations

import functools
import logging
import sys
import time
import types
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Callable

from flwr.app import Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.config import get_project_dir
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.superlink.grid import http_grid
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode import start_client_internal
from flwr.supernode.runtime import run_clientapp
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

log = logging.getLogger(__name__)

#: The flwr release this module was written against (pyproject.toml pins the same).
FLWR_VERSION = "1.41.0"
#: The Runtime API method the SuperExec's secret protects (flwr.supercore.superexec.run_superexec).
ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"


def check_flwr_version() -> None:
    """Refuse to run on another flwr than :data:`FLWR_VERSION`: these internals are not API."""
    installed = version("flwr")
    if installed != FLWR_VERSION:
        raise RuntimeError(f"common/flwr_runtime.py uses Flower internals of flwr {FLWR_VERSION}, but flwr "
                           f"{installed} is installed: install flwr=={FLWR_VERSION} (pyproject.toml), or port "
                           "this module to the new release and run tests/unit/test_flwr_runtime.py")


def runtime_client(address: str, *, insecure: bool, root_certificates: bytes | None,
                   token: str | None = None, secret: bytes | None = None, retry: bool = True) -> RuntimeHttpClient:
    """A client of a SuperNode's Runtime API: as a task (``token``) or as the SuperExec (``secret``).
    ``retry=False``: a refused request raises at once (Flower's retry waits and, on 401, sends SIGINT)."""
    interceptors: list = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp" if token else "SuperExec")]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    if secret:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=frozenset({ACQUIRE_TASK})))
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=insecure,
                                                 root_certificates=root_certificates, interceptors=interceptors,
                                                 retry_invoker=make_simple_http_retry_invoker() if retry else None)


def acquire_task(client: RuntimeHttpClient) -> str | None:
    """The token of a ClientApp task waiting at the SuperNode, or None when there is none."""
    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
    return res.token if res.HasField("task") and res.token else None


@dataclass
class TaskOutcome:
    status: str  # flwr's SubStatus: completed or failed
    details: str
    run_id: int | None
    fab_hash: str | None
    loaded: bool  # the ClientApp was imported for this task (not already warm)
    phases: dict[str, float]  # seconds: pull (the task's input), load, app, push (the reply), status, close
    #                           (and memory: client.worker's cleanup after the task)


#: How a message's arrays are pulled when they are not there yet (a task's input from the
#: SuperNode, which hands out the task while it still fetches the arrays from the SuperLink; a
#: reply's at the ServerApp, :func:`quick_reply_pulls`): Flower's retry starts at 1 s and
#: doubles; on loopback we retry sooner (docs/RESULTS.md, "Deployed rounds").
PULL_INITIAL_BACKOFF, PULL_BACKOFF_CAP = 0.02, 0.5


def _quick_pulls() -> None:
    """``pull_task_input`` pulls the message with these backoffs in this process."""
    run_clientapp.pull_and_inflate_object_from_tree = _with_backoff(run_clientapp.pull_and_inflate_object_from_tree,
                                                                    PULL_INITIAL_BACKOFF, PULL_BACKOFF_CAP)


class TaskRunner:
    """Runs ClientApp tasks in this process; the imported ClientApp is kept per FAB hash.

    A FAB with another hash (another version of the app) replaces the loaded one: the previous
    app's modules are dropped from ``sys.modules`` first, so its code never runs again. Modules
    outside the app's folder (torch, opacus, flwr) stay loaded: that is the point."""

    def __init__(self, address: str, *, insecure: bool, root_certificates: bytes | None) -> None:
        self.address, self.insecure, self.root_certificates = address, insecure, root_certificates
        self._fab_hash: str | None = None
        self._app: ClientApp | None = None
        self._app_dir: Path | None = None
        # How many apps were imported, and how many were let go (replaced by another package,
        # whether or not that one loads): the worker frees a forgotten app's objects (client.worker).
        self.loads = self.forgets = 0
        _quick_pulls()

    def _load(self, fab_id: str, fab_version: str, fab_hash: str, fab_content: bytes) -> bool:
        if self._app is not None and fab_hash == self._fab_hash:
            return False
        previous = self._app_dir
        # Forget the old app before touching anything: if this load fails (an import error in
        # the new version), no later task may run an app whose modules were half replaced.
        self.forgets += self._app is not None
        self._app = self._fab_hash = self._app_dir = None
        install_from_fab(fab_content, skip_prompt=True)
        app_dir = Path(get_project_dir(fab_id, fab_version, fab_hash)).resolve()
        _drop_app_modules(app_dir, previous)
        app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(fab_id, fab_version, fab_hash)
        self._app, self._fab_hash, self._app_dir = app, fab_hash, app_dir
        self.loads += 1
        return True

    def run(self, token: str, on_input: Callable[[], None] | None = None) -> TaskOutcome:
        """Pull the task's input, run the ClientApp, push its reply and status. Never raises for
        what the ClientApp does: an exception becomes an error reply, as in ``flwr-clientapp``.
        ``on_input`` is called once the input is in, before the ClientApp runs."""
        client = runtime_client(self.address, insecure=self.insecure, root_certificates=self.root_certificates,
                                token=token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = reply = context = run = fab = None
        status, details, loaded = SubStatus.FAILED, "ClientApp task failed due to unknown reason", False
        phases: dict[str, float] = {}
        t = time.perf_counter()
        try:
            message, context, run, fab = pull_task_input(client)
            phases["pull"], t = time.perf_counter() - t, time.perf_counter()
            if on_input is not None:
                on_input()
            loaded = self._load(run.fab_id, run.fab_version, fab.hash_str, fab.content)
            phases["load"], t = time.perf_counter() - t, time.perf_counter()
            reply = self._app(message=message, context=context)
            phases["app"], t = time.perf_counter() - t, time.perf_counter()
            status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # noqa: BLE001 - the ClientApp's failure is the reply, not the worker's
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError) \
                else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            details = f"{type(ex)}:<'{ex}'>"
            log.error("ClientApp raised an exception", exc_info=ex)
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
        finally:
            t = time.perf_counter()
            try:
                if reply is not None and context is not None:
                    try:
                        push_message(client, reply, context)
                    except Exception as ex:  # noqa: BLE001 - the SuperNode answers for a lost reply
                        log.error("failed to push the reply", exc_info=ex)
                        status, details = SubStatus.FAILED, f"pushing the reply failed: {ex}"
                phases["push"], t = time.perf_counter() - t, time.perf_counter()
                push_task_output(client=client, context=context, sub_status=status, details=details)
                phases["status"], t = time.perf_counter() - t, time.perf_counter()
            finally:
                try:
                    if heartbeat.is_running:  # a heartbeat thread that died on an HTTP error raises in stop()
                        heartbeat.stop()
                finally:
                    client.close()
                phases["close"] = time.perf_counter() - t
        return TaskOutcome(status, details, getattr(run, "run_id", None), getattr(fab, "hash_str", None), loaded,
                           phases)


def _drop_app_modules(app_dir: Path, previous: Path | None) -> None:
    """Forget the modules of an app's top-level packages that were imported from anywhere but
    ``app_dir`` (the previous FAB, or this project's own copy that the worker itself was
    started from), so that importing the ClientApp takes ``app_dir``'s code."""
    names = {p.name for p in app_dir.iterdir() if (p / "__init__.py").is_file()}
    names |= {p.stem for p in app_dir.glob("*.py")}
    for name in list(sys.modules):
        if name.split(".")[0] not in names:
            continue
        file = getattr(sys.modules[name], "__file__", None)
        if file is None or app_dir not in Path(file).resolve().parents:
            del sys.modules[name]
    if previous is not None:  # Flower inserts the folder as it gets it, maybe not resolved (a symlink)
        sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != previous]


class _FastTime(types.ModuleType):
    """``time`` with ``sleep`` capped: what ``flwr.supernode.start_client_internal`` sees."""

    def __init__(self, idle: float, reply: float) -> None:
        super().__init__("time")
        self._idle, self._reply = idle, reply

    def __getattr__(self, name: str):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        # 3 s: after an empty pull from the SuperLink (a request over TLS, signed: keep it >= 0.1 s);
        # 0.5 s: between checks of the node's own state for a ClientApp's reply (in-process, cheap).
        time.sleep(self._idle if seconds >= 1 else min(seconds, self._reply))


def _with_backoff(func, initial: float, cap: float):
    original = getattr(func, "__wrapped__", func)

    @functools.wraps(original)
    def call(*args, **kwargs):
        kwargs.setdefault("initial_backoff", initial)
        kwargs.setdefault("backoff_cap", cap)
        # Flower bounds a pull by its tries (500) and its time (2 h); shorter waits would spend
        # the tries in minutes: keep only the time bound.
        kwargs.setdefault("max_tries_per_object", None)
        return original(*args, **kwargs)

    return call


def fast_polls(idle: float = 0.2, reply: float = 0.01, pull_backoff: float = 0.01,
               pull_backoff_cap: float = PULL_BACKOFF_CAP,
               on_message: Callable[[], None] | None = None) -> None:
    """Shorten the SuperNode's fixed waits in this process (before ``flower_supernode()`` runs):
    ``idle`` after an empty pull from the SuperLink (Flower: 3 s), ``reply`` between checks for a
    ClientApp's reply (0.5 s; a look at the node's own memory, not a request), and the retries
    of a message's arrays that the SuperLink does not have yet (Flower: 1 s, doubling to 10 s;
    here ``pull_backoff`` doubling to ``pull_backoff_cap``). The SuperLink hands out a message as
    soon as the ServerApp has pushed it, before its arrays (on loopback, digits-quick: from a
    SuperNode's poll to its worker's task took 0.22-0.24 s in a round whose three SuperNodes
    polled while the ServerApp was still pushing, with 0.05 s doubling; 0.06-0.15 s in other
    rounds). ``on_message`` is called once a message's arrays are pulled (``client.wake``: the
    worker is told that a task waits)."""
    if not hasattr(start_client_internal, "time") or start_client_internal.time is not time:
        raise RuntimeError("flwr.supernode.start_client_internal no longer waits with the time module; "
                           f"common/flwr_runtime.py was written for flwr {FLWR_VERSION}: port fast_polls")
    start_client_internal.time = _FastTime(idle, reply)
    pull = _with_backoff(start_client_internal.pull_objects, pull_backoff, pull_backoff_cap)
    if on_message is not None:
        pull = _then(pull, on_message)
    start_client_internal.pull_objects = pull


def _then(pull, notify: Callable[[], None]):
    """``pull`` followed by ``notify()``. The SuperNode stores the arrays it returns right after
    (hashing each one: about 1 ms per MB) and then confirms the message to the SuperLink; a
    worker whose pull comes first retries the missing arrays after :data:`PULL_INITIAL_BACKOFF`."""

    @functools.wraps(pull)
    def call(*args, **kwargs):
        contents = pull(*args, **kwargs)
        notify()
        return contents

    return call


def quick_reply_pulls(initial_backoff: float = PULL_INITIAL_BACKOFF, backoff_cap: float = PULL_BACKOFF_CAP) -> None:
    """In the ServerApp's process: retry a reply's missing arrays after ``initial_backoff`` s
    (doubling up to ``backoff_cap``) instead of Flower's 1 s. Idempotent; a no-op in a
    simulation, whose grid does not pull objects."""
    if not callable(getattr(http_grid, "pull_objects", None)):
        raise RuntimeError("flwr.superlink.grid.http_grid no longer pulls a reply's arrays with pull_objects; "
                           f"common/flwr_runtime.py was written for flwr {FLWR_VERSION}: port quick_reply_pulls")
    http_grid.pull_objects = _with_backoff(http_grid.pull_objects, initial_backoff, backoff_cap)
