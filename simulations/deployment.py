"""A real fedgen deployment on this machine as a Python API: one SuperLink and N SuperNodes on
loopback, with TLS and SuperNode authentication, every process owned and stopped by PID.

:class:`Deployment` brings up the topology of ``docker/compose.yaml`` without Docker; what it
does step by step is told in ``simulations/deploy.py``, its command line. The credentials come
from ``simulations.certs``, process control from ``simulations.procs``. Used by
``python -m simulations.deploy`` and ``tests/integration/test_deployment.py``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulations.certs import Credentials, make_credentials, make_node_key, write_private
from simulations.launch import ROOT, _toml_value, flower_env, free_port, merged_run_config
from simulations.procs import kill_all, processes_with_env, stop_process

CONNECTION = "fedgen"  # the SuperLink connection name in the operator's $FLWR_HOME/config.toml
LOOPBACK = "127.0.0.1"
#: What we set for every Flower process. Flower reads FLWR_SUPEREXEC_TASK_POLL_INTERVAL in
#: every flower-superexec (how often it asks its SuperNode/SuperLink for a task to launch;
#: Flower's default 1 s). The SuperNode's 3 s idle poll of the SuperLink and the ServerApp's
#: 3 s poll for replies are fixed in Flower 1.41.
DEFAULT_TASK_POLL_INTERVAL = 0.2
#: How a site runs its ClientApp: "warm" (one long-lived process, ``python -m client.worker``) or
#: "stock" (Flower's: a fresh flwr-clientapp process per message, ``isolation``).
SITE_WORKERS = {"warm": "fedgen's warm worker beside the SuperNode (client/worker.py)",
                "stock": "Flower's own: a new ClientApp process for every message"}
#: How often a supervisor (here a thread; compose `restart:` or systemd in production) looks for a dead worker.
SUPERVISE_INTERVAL = 0.5
INSECURE_WARNING = ("WARNING: --insecure: no TLS and no SuperNode authentication; anyone who can reach "
                    "the port can read the traffic and join as a site. Use it only to debug on loopback.")


class DeployError(RuntimeError):
    """The deployment could not be brought up or a command failed; names the log to read."""


@dataclass
class RunHandle:
    run_id: int
    proc: subprocess.Popen  # `flwr run --stream`: ends when the run does
    log: Path


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


def node_config_arg(config: dict[str, Any]) -> str:
    """``--node-config`` form: space-separated ``key=value`` with TOML values (strings quoted)."""
    for key, value in config.items():
        if isinstance(value, str) and '"' in value:
            raise ValueError(f"node-config {key}: double quotes are not supported in values ({value!r})")
    return " ".join(f"{k}={_toml_value(v)}" for k, v in config.items())


#: Where the SuperLink keeps its state (``Deployment(superlink_state=...)``).
SUPERLINK_STATES = ("memory", "sqlite")
FLWR_IN_MEMORY_DB = ":flwr-in-memory:"  # flwr.supercore.constant.FLWR_IN_MEMORY_DB_NAME (checked in tests)


class Deployment:
    """A SuperLink and its SuperNodes on loopback, all processes owned (and stopped) by this object.

    ``work_dir`` holds everything: ``certs/``, ``superlink/`` (its FLWR_HOME, state.db if any, log),
    ``operator/`` (the CLI's FLWR_HOME with ``config.toml``) and one folder per site (its
    FLWR_HOME, node key, ledger, log). Use as a context manager; :meth:`close` stops all.
    """

    def __init__(self, work_dir: Path, *, app_dir: Path = ROOT, insecure: bool = False,
                 isolation: str = "subprocess", server_isolation: str = "process",
                 task_poll_interval: float | None = DEFAULT_TASK_POLL_INTERVAL, site_worker: str = "warm",
                 site_threads: int = 1, superlink_state: str = "memory",
                 extra_env: dict[str, str] | None = None) -> None:
        for what, value in (("isolation", isolation), ("server_isolation", server_isolation)):
            if value not in ("subprocess", "process"):
                raise ValueError(f"{what} must be 'subprocess' or 'process', got {value!r}")
        if site_worker not in SITE_WORKERS:
            raise ValueError(f"site_worker must be one of {sorted(SITE_WORKERS)}, got {site_worker!r}")
        # warm: each site's SuperNode in process isolation with fedgen's worker beside it
        # (client/worker.py); stock: Flower's own launch of a ClientApp process per message.
        self.site_worker = site_worker
        # Every site of this deployment shares this machine's cores (a real site has its own):
        # torch's default of one thread per core in each of N site processes oversubscribes the
        # cores and made a site's training steps 5-10x slower than in a simulation, which runs
        # the sites one at a time (docs/RESULTS.md, "Deployed rounds"). 0: torch's default.
        if site_threads < 0:
            raise ValueError(f"site_threads must be >= 0 (0 = torch's default), got {site_threads}")
        self.site_threads = site_threads
        # The SuperLink's state (runs, messages, their arrays, registered node keys): in memory
        # (Flower's own default) or in SQLite (docker/compose.yaml: it survives a SuperLink
        # restart). flwr 1.41's SQL state costs CPU on every request (1.4 s against 3.0 s per
        # steady round of digits-quick, 3 sites: docs/RESULTS.md); this SuperLink lives only as
        # long as this object, so nothing is lost by keeping it in memory.
        if superlink_state not in SUPERLINK_STATES:
            raise ValueError(f"superlink_state must be one of {SUPERLINK_STATES}, got {superlink_state!r}")
        self.superlink_state = superlink_state
        self.extra_env = dict(extra_env or {})  # e.g. client.faults' FEDGEN_INJECT_FAULTS for drills and tests
        self.work_dir, self.app_dir = work_dir.resolve(), app_dir.resolve()
        if self.app_dir == self.work_dir or self.app_dir in self.work_dir.parents:
            # `flwr run` packs *.json/*.toml of the app folder into the FAB: keys, ledgers and
            # Flower state must never ride along to the server and every site.
            raise ValueError(f"the work dir {self.work_dir} must be outside the app folder {self.app_dir}")
        self.insecure, self.isolation, self.server_isolation = insecure, isolation, server_isolation
        self.task_poll_interval = task_poll_interval
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.creds: Credentials | None = None
        self.superlink: subprocess.Popen | None = None
        self.address = ""
        self.sites: list[Site] = []
        self.operator_home = self.work_dir / "operator"
        self.started_at = time.time()
        self._procs: list[subprocess.Popen] = []
        self._closing = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._supervising = threading.Lock()

    # ---- environment and commands

    def env(self, home: Path) -> dict[str, str]:
        home.mkdir(parents=True, exist_ok=True)
        env = {**flower_env(home), **self.extra_env}
        if self.task_poll_interval is not None:
            env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(self.task_poll_interval)
        return env

    def _spawn(self, cmd: list[str], home: Path, log: Path, *, site: bool = False) -> subprocess.Popen:
        # cwd = the app folder, as in simulations.launch: relative run-config paths (run.runs-dir,
        # eval.cache-dir) mean the same thing in a local deployment and in a simulation.
        env = self.env(home)
        if site and self.site_threads:  # the site's ClientApps inherit it (torch reads it at import)
            env.update(OMP_NUM_THREADS=str(self.site_threads), MKL_NUM_THREADS=str(self.site_threads))
        with log.open("ab") as fh:
            proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=self.app_dir,
                                    start_new_session=True)
        self._procs.append(proc)
        return proc

    def flwr(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI as the operator (connection ``fedgen`` in ``operator/config.toml``)."""
        out = subprocess.run(["flwr", *args], cwd=self.app_dir, env=self.env(self.operator_home),
                             capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise DeployError(f"`flwr {' '.join(args)}` exited {out.returncode}:\n{out.stdout}{out.stderr}")
        return out

    def flwr_json(self, *args: str, timeout: float = 120) -> dict:
        out = self.flwr(*args, "--format", "json", timeout=timeout, check=False)
        try:
            payload = json.loads(out.stdout[out.stdout.index("{"):]) if "{" in out.stdout else {}
        except json.JSONDecodeError:
            payload = {}
        if not payload.get("success", False):
            raise DeployError(f"`flwr {' '.join(args)}` failed:\n{out.stdout}{out.stderr}")
        return payload

    # ---- SuperLink

    def start_superlink(self, timeout: float = 90) -> str:
        home = self.work_dir / "superlink"
        home.mkdir(parents=True, exist_ok=True)
        port = free_port()
        cmd = ["flower-superlink", "--host", LOOPBACK, "--port", str(port), "--isolation", self.server_isolation,
               "--database", str(home / "state.db") if self.superlink_state == "sqlite" else FLWR_IN_MEMORY_DB,
               "--disable-runtime-dependency-installation"]
        if self.insecure:
            print(INSECURE_WARNING, file=sys.stderr)
            cmd.append("--insecure")
        else:
            self.creds = make_credentials(self.work_dir / "certs")
            cmd += ["--ssl-ca-certfile", str(self.creds.ca_cert), "--ssl-certfile", str(self.creds.server_cert),
                    "--ssl-keyfile", str(self.creds.server_key), "--enable-supernode-auth"]
        secret = home / "superexec.secret"
        if self.server_isolation == "process" and not self.insecure:
            # The ServerApp runner must prove this secret to take a run's task from the Runtime
            # API, which shares the SuperLink's one port with the Fleet and Control APIs.
            write_private(secret, os.urandom(32).hex().encode())
            cmd += ["--superexec-auth-secret-file", str(secret)]
        self.superlink = self._spawn(cmd, home, home / "superlink.log")
        self.address = f"{LOOPBACK}:{port}"
        self._write_connection()
        if self.server_isolation == "process":
            runner = ["flower-superexec", "--runtime-api-address", self.address]
            if self.insecure:
                runner.append("--insecure")
            else:
                runner += ["--root-certificates", str(self.creds.ca_cert), "--superexec-auth-secret-file", str(secret)]
            self._spawn(runner, home, home / "serverapp-runner.log")
        scheme = "http" if self.insecure else "https"
        context = None if self.insecure else ssl.create_default_context(cafile=str(self.creds.ca_cert))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.superlink.poll() is not None:
                raise DeployError(f"flower-superlink exited {self.superlink.returncode}; see {home / 'superlink.log'}")
            try:
                with urllib.request.urlopen(f"{scheme}://{self.address}/health", timeout=2, context=context) as r:
                    if r.status == 200:
                        return self.address
            except OSError:
                pass
            time.sleep(0.2)
        raise DeployError(f"flower-superlink did not answer on {self.address} within {timeout:g}s; "
                          f"see {home / 'superlink.log'}")

    def _write_connection(self) -> None:
        """The operator's Flower config: where `flwr run . fedgen` connects, and how."""
        self.operator_home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "{self.address}"']
        lines.append("insecure = true" if self.insecure else f"root-certificates = {_toml_value(str(self.creds.ca_cert))}")
        (self.operator_home / "config.toml").write_text("\n".join(lines) + "\n")

    # ---- SuperNodes

    def new_site(self, node_config: dict[str, Any] | None = None, *, name: str | None = None,
                 register: bool = True, ledger: bool = True) -> Site:
        """A site folder with its own node key (registered with the SuperLink unless told not to)."""
        return self.new_sites([node_config or {}], names=[name] if name else None, register=register,
                              ledger=ledger)[0]

    def new_sites(self, node_configs: list[dict[str, Any]], *, names: list[str] | None = None,
                  register: bool = True, ledger: bool = True) -> list[Site]:
        """Site folders, each with its own node key; the keys are registered concurrently."""
        sites = []
        for i, node_config in enumerate(node_configs):
            name = names[i] if names else f"site-{len(self.sites) + 1}"
            site_dir = self.work_dir / name
            site_dir.mkdir(parents=True, exist_ok=True)
            config = dict(node_config)
            if ledger:
                config.setdefault("ledger-path", str(site_dir / "ledger.json"))
            key = pub = None
            if not self.insecure:
                key, pub = make_node_key(site_dir / "node.key")
            site = Site(name, site_dir, free_port(), config, key, pub, registered=register or self.insecure)
            self.sites.append(site)
            sites.append(site)
        if register and not self.insecure:
            # `flwr supernode register <public key> fedgen`: what the SuperLink operator runs for
            # every site that sent its public key.
            env = self.env(self.operator_home)
            procs = [(site, subprocess.Popen(["flwr", "supernode", "register", str(site.public_key), CONNECTION,
                                              "--name", site.name, "--format", "json"], cwd=self.app_dir, env=env,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
                     for site in sites]
            for site, proc in procs:
                out, err = proc.communicate(timeout=120)
                try:
                    site.node_id = int(json.loads(out[out.index("{"):])["node-id"])
                except (ValueError, KeyError, TypeError):
                    raise DeployError(f"registering {site.name}'s key failed:\n{out}{err}") from None
        return sites

    def start_site(self, site: Site, *, max_retries: int | None = None) -> Site:
        home = site.dir / "home"
        warm = self.site_worker == "warm"
        supernode = [sys.executable, "-m", "client.worker", "supernode"] if warm else ["flower-supernode"]
        cmd = [*supernode, "--superlink", self.address, "--host", LOOPBACK, "--port", str(site.port),
               "--isolation", "process" if warm else self.isolation, "--node-config", node_config_arg(site.node_config)]
        if self.insecure:
            cmd.append("--insecure")
        else:
            cmd += ["--root-certificates", str(self.creds.ca_cert), "--auth-supernode-private-key", str(site.key)]
        if max_retries is not None:
            cmd += ["--max-retries", str(max_retries)]
        secret = site.dir / "superexec.secret"
        if warm:  # only the site's own worker may take its tasks (as in docker/compose.yaml)
            if not secret.exists():
                write_private(secret, os.urandom(32).hex().encode())
            cmd += ["--superexec-auth-secret-file", str(secret)]
        site.procs.append(self._spawn(cmd, home, site.log, site=True))
        if warm:
            # The worker runs beside the SuperNode (a second container in Docker) and speaks to
            # its Runtime API on loopback; a supervisor starts it again if it dies.
            site.worker_cmd = [sys.executable, "-m", "client.worker", "run", "--runtime-api-address",
                               f"{LOOPBACK}:{site.port}", "--insecure", "--superexec-auth-secret-file", str(secret)]
            site.worker = self._spawn(site.worker_cmd, home, site.worker_log, site=True)
            site.procs.append(site.worker)
            self._supervise()
        elif self.isolation == "process":
            # The ClientApp launcher runs beside the SuperNode, not under it (what a second
            # container does in Docker); the Runtime API stays on loopback.
            cmd = ["flower-superexec", "--runtime-api-address", f"{LOOPBACK}:{site.port}", "--insecure"]
            site.procs.append(self._spawn(cmd, home, site.dir / "superexec.log", site=True))
        return site

    def add_sites(self, node_configs: list[dict[str, Any]]) -> list[Site]:
        """Registered sites with these node configs, started."""
        return [self.start_site(site) for site in self.new_sites(node_configs)]

    def nodes(self) -> list[dict]:
        return self.flwr_json("supernode", "list", CONNECTION)["nodes"]

    def wait_online(self, count: int, timeout: float = 120) -> list[dict]:
        """Block until ``count`` SuperNodes are online; fail early if a SuperNode exited."""
        deadline = time.monotonic() + timeout
        online: list[dict] = []
        while time.monotonic() < deadline:
            for site in self.sites:
                if not site.registered:
                    continue  # a site started to be refused (tests) is expected to exit
                if site.procs and site.procs[0].poll() is not None and site.procs[0].returncode != 0:
                    raise DeployError(f"{site.name}: flower-supernode exited {site.procs[0].returncode}; see {site.log}")
            online = [n for n in self.nodes() if n["status"] == "online"]
            if len(online) >= count:
                return online
            time.sleep(0.5)
        raise DeployError(f"only {len(online)} of {count} SuperNodes online after {timeout:g}s; "
                          f"see {[str(s.log) for s in self.sites]}")

    def kill_site(self, site: Site, sig: int = signal.SIGKILL) -> None:
        """Stop a site the hard way (SIGKILL: a crash) or gracefully (SIGTERM)."""
        with self._supervising:  # a stopped site is not restarted by the supervisor
            site.worker_cmd = []
        for proc in site.procs:
            stop_process(proc, grace=5, sig=sig)

    def _supervise(self) -> None:
        """Start (once) the thread that restarts a site's warm worker when it exits, as compose's
        ``restart: unless-stopped`` or systemd's ``Restart=always`` do in a real deployment."""
        if self._supervisor is not None:
            return

        def loop() -> None:
            while not self._closing.wait(SUPERVISE_INTERVAL):
                for site in list(self.sites):
                    with self._supervising:  # kill_site() and close() cannot interleave with a restart
                        cmd = list(site.worker_cmd)
                        if self._closing.is_set() or not cmd or site.worker is None or site.worker.poll() is None:
                            continue
                        site.worker_restarts += 1
                        try:
                            with site.worker_log.open("a") as fh:
                                fh.write(f"supervisor: worker exited {site.worker.returncode}; restart "
                                         f"{site.worker_restarts}\n")
                            site.worker = self._spawn(cmd, site.dir / "home", site.worker_log, site=True)
                            site.procs.append(site.worker)
                        except OSError as err:  # keep supervising the others; try again next time
                            print(f"deploy: restarting {site.name}'s worker failed: {err}", file=sys.stderr)

        self._supervisor = threading.Thread(target=loop, name="worker-supervisor", daemon=True)
        self._supervisor.start()

    # ---- runs

    def write_run_config(self, preset: str | None, overrides: list[str], runs_dir: Path) -> Path:
        config = merged_run_config(preset, overrides, runs_dir.resolve())
        path = self.operator_home / f"run-config-{time.monotonic_ns()}.toml"
        self.operator_home.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f'"{k}" = {_toml_value(v)}\n' for k, v in config.items()))
        return path

    def submit(self, run_config: Path, timeout: float = 300) -> RunHandle:
        """``flwr run <app> fedgen --run-config FILE --stream`` in the background; returns once the
        SuperLink has accepted the run (its id is known). The streamed logs go to a file."""
        log = self.operator_home / f"run-{time.monotonic_ns()}.log"
        proc = self._spawn(["flwr", "run", str(self.app_dir), CONNECTION, "--run-config", str(run_config), "--stream"],
                           self.operator_home, log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            match = re.search(r"Successfully started run (\d+)", text)
            if match:
                return RunHandle(int(match.group(1)), proc, log)
            if proc.poll() is not None:
                raise DeployError(f"`flwr run` exited {proc.returncode} before starting a run:\n{text[-3000:]}")
            time.sleep(0.3)
        raise DeployError(f"`flwr run` did not start a run within {timeout:g}s; see {log}")

    def status(self, run_id: int) -> dict:
        runs = self.flwr_json("ls", CONNECTION, "--run-id", str(run_id)).get("runs", [])
        if not runs:
            raise DeployError(f"`flwr ls` does not know run {run_id}")
        return runs[0]

    def wait(self, handle: RunHandle, timeout: float = 1800) -> dict:
        """Wait for the run to finish (its log stream ends with it); return its `flwr ls` status."""
        try:
            handle.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeployError(f"run {handle.run_id} not finished after {timeout:g}s; see {handle.log}") from None
        for _ in range(20):  # the stream can end a moment before the status is final
            status = self.status(handle.run_id)
            if str(status.get("status", "")).startswith("finished"):
                return status
            time.sleep(1)
        return status

    def run(self, preset: str | None, overrides: list[str], runs_dir: Path, timeout: float = 1800) -> dict:
        return self.wait(self.submit(self.write_run_config(preset, overrides, runs_dir)), timeout)

    # ---- teardown

    def close(self) -> None:
        """Stop the SuperNodes first (so none lingers waiting), then the SuperLink; every child too.

        Then a last sweep: every process still running whose FLWR_HOME lies in our work dir
        (they all inherit it, however detached) is killed.
        """
        with self._supervising:
            self._closing.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
        for proc in reversed(self._procs):
            stop_process(proc)
        self._procs.clear()
        kill_all(processes_with_env("FLWR_HOME", str(self.work_dir), below=True))

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
