"""One site of a loopback deployment (``simulations.deployment``): its record, the commands
that start it, and the supervisor that restarts its warm worker.

A site is a SuperNode and, with the warm worker (the default), ``python -m client.worker run``
beside it, as the two containers of a site in ``docker/compose.yaml``: the SuperNode in
process isolation holds the TLS, node-authenticated link to the SuperLink; the worker takes
its tasks on the SuperNode's Runtime API (loopback) with a secret only the two of them read.
With the stock path, Flower's own ``flower-supernode`` launches a ClientApp process per
message (``isolation`` subprocess), or a separate ``flower-superexec`` does (process).
"""

from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from simulations.launch import _toml_value

LOOPBACK = "127.0.0.1"
#: How a site runs its ClientApp: "warm" (one long-lived process, ``python -m client.worker``) or
#: "stock" (Flower's: a fresh flwr-clientapp process per message, ``isolation``).
SITE_WORKERS = {"warm": "fedgen's warm worker beside the SuperNode (client/worker.py)",
                "stock": "Flower's own: a new ClientApp process for every message"}
#: How often a supervisor (here a thread; compose `restart:` or systemd in production) looks for a dead worker.
SUPERVISE_INTERVAL = 0.5


@dataclass
class Site:
    name: str
    dir: Path
    port: int  # this SuperNode's Runtime API (what its ClientApps connect to)
    node_config: dict[str, Any]
    key: Path | None
    public_key: Path | None
    registered: bool = True
    procs: list[subprocess.Popen] = field(default_factory=list)
    node_id: int | None = None
    worker: subprocess.Popen | None = None  # the warm worker, when the deployment uses one
    worker_cmd: list[str] = field(default_factory=list)
    worker_restarts: int = 0

    @property
    def log(self) -> Path:
        return self.dir / "supernode.log"

    @property
    def worker_log(self) -> Path:
        return self.dir / "worker.log"

    @property
    def secret(self) -> Path:
        """The SuperExec secret the site's SuperNode and its warm worker share."""
        return self.dir / "superexec.secret"


def node_config_arg(config: dict[str, Any]) -> str:
    """``--node-config`` form: space-separated ``key=value`` with TOML values (strings quoted)."""
    for key, value in config.items():
        if isinstance(value, str) and '"' in value:
            raise ValueError(f"node-config {key}: double quotes are not supported in values ({value!r})")
    return " ".join(f"{k}={_toml_value(v)}" for k, v in config.items())


@dataclass
class SiteCommands:
    supernode: list[str]
    worker: list[str] | None = None  # warm: the worker beside the SuperNode
    superexec: list[str] | None = None  # stock, process isolation: Flower's ClientApp launcher


def site_commands(site: Site, *, superlink: str, site_worker: str, isolation: str, ca_cert: Path | None,
                  max_retries: int | None = None) -> SiteCommands:
    """The commands that start ``site`` against the SuperLink at ``superlink`` (no TLS and no
    node auth when ``ca_cert`` is None). Warm: the SuperNode requires ``site.secret``."""
    warm = site_worker == "warm"
    supernode = [sys.executable, "-m", "client.worker", "supernode"] if warm else ["flower-supernode"]
    cmd = [*supernode, "--superlink", superlink, "--host", LOOPBACK, "--port", str(site.port),
           "--isolation", "process" if warm else isolation, "--node-config", node_config_arg(site.node_config)]
    if ca_cert is None:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(ca_cert), "--auth-supernode-private-key", str(site.key)]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    runtime_api = f"{LOOPBACK}:{site.port}"
    if warm:  # only the site's own worker may take its tasks (as in docker/compose.yaml)
        cmd += ["--superexec-auth-secret-file", str(site.secret)]
        return SiteCommands(cmd, worker=[sys.executable, "-m", "client.worker", "run", "--runtime-api-address",
                                         runtime_api, "--insecure", "--superexec-auth-secret-file", str(site.secret)])
    if isolation == "process":
        # The ClientApp launcher runs beside the SuperNode, not under it (what a second
        # container does in Docker); the Runtime API stays on loopback.
        return SiteCommands(cmd, superexec=["flower-superexec", "--runtime-api-address", runtime_api, "--insecure"])
    return SiteCommands(cmd)


class WorkerSupervisor:
    """A thread that restarts a site's warm worker when it exits, as compose's ``restart:
    unless-stopped`` or systemd's ``Restart=always`` do in a real deployment. ``lock`` is held
    around every restart: whoever stops a site (clearing its ``worker_cmd``) or the whole
    deployment (``stop``) under it cannot interleave with one."""

    def __init__(self, sites: list[Site], spawn: Callable[[Site, list[str]], subprocess.Popen],
                 lock: threading.Lock) -> None:
        self.sites, self.spawn, self.lock = sites, spawn, lock
        self.closing = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="worker-supervisor", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self.lock:
            self.closing.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self.closing.wait(SUPERVISE_INTERVAL):
            for site in list(self.sites):
                with self.lock:
                    cmd = list(site.worker_cmd)
                    if self.closing.is_set() or not cmd or site.worker is None or site.worker.poll() is None:
                        continue
                    site.worker_restarts += 1
                    try:
                        with site.worker_log.open("a") as fh:
                            fh.write(f"supervisor: worker exited {site.worker.returncode}; restart "
                                     f"{site.worker_restarts}\n")
                        site.worker = self.spawn(site, cmd)
                        site.procs.append(site.worker)
                    except OSError as err:  # keep supervising the others; try again next time
                        print(f"deploy: restarting {site.name}'s worker failed: {err}", file=sys.stderr)
