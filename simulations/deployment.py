"""A real fedgen deployment on this machine as a Python API: one SuperLink and N SuperNodes on
loopback, with TLS and SuperNode authentication, every process owned and stopped by PID.

:class:`Deployment` brings up the topology of ``docker/compose.yaml`` without Docker; what it
does step by step is told in ``simulations/deploy.py``, its command line. The credentials come
from ``simulations.certs``, process control from ``simulations.procs``, each site's commands and
its worker's supervisor from ``simulations.deploy_site``. Used by
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simulations.certs import Credentials, make_credentials, make_node_key, write_private
from simulations.deploy_site import LOOPBACK, SITE_WORKERS, Site, WorkerSupervisor, site_commands
from simulations.launch import ROOT, _toml_value, flower_env, free_port, merged_run_config
from simulations.procs import kill_all, processes_with_env, stop_process

CONNECTION = "fedgen"  # the SuperLink connection name in the operator's $FLWR_HOME/config.toml
#: What we set for every Flower process. Flower reads FLWR_SUPEREXEC_TASK_POLL_INTERVAL in
#: every flower-superexec (how often it asks its SuperNode/SuperLink for a task to launch;
#: Flower's default 1 s). The SuperNode's 3 s idle poll of the SuperLink and the ServerApp's
#: 3 s poll for replies are fixed in Flower 1.41.
DEFAULT_TASK_POLL_INTERVAL = 0.2
INSECURE_WARNING = ("WARNING: --insecure: no TLS and no SuperNode authentication; anyone who can reach "
                    "the port can read the traffic and join as a site. Use it only to debug on loopback.")


class DeployError(RuntimeError):
    """The deployment could not be brought up or a command failed; names the log to read."""


@dataclass
class RunHandle:
    run_id: int
    proc: subprocess.Popen  # `flwr run --stream`: ends when the run does
    log: Path


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
        self._supervising = threading.Lock()
        self._supervisor = WorkerSupervisor(self.sites, lambda site, cmd: self._spawn(
            cmd, site.dir / "home", site.worker_log, site=True), self._supervising)

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
        if self.site_worker == "warm" and not site.secret.exists():
            write_private(site.secret, os.urandom(32).hex().encode())
        cmds = site_commands(site, superlink=self.address, site_worker=self.site_worker, isolation=self.isolation,
                             ca_cert=None if self.insecure else self.creds.ca_cert, max_retries=max_retries)
        site.procs.append(self._spawn(cmds.supernode, home, site.log, site=True))
        if cmds.worker:
            # The worker runs beside the SuperNode (a second container in Docker) and speaks to
            # its Runtime API on loopback; the supervisor starts it again if it dies.
            site.worker_cmd = cmds.worker
            site.worker = self._spawn(site.worker_cmd, home, site.worker_log, site=True)
            site.procs.append(site.worker)
            self._supervisor.start()
        if cmds.superexec:
            site.procs.append(self._spawn(cmds.superexec, home, site.dir / "superexec.log", site=True))
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
        self._supervisor.stop()
        for proc in reversed(self._procs):
            stop_process(proc)
        self._procs.clear()
        kill_all(processes_with_env("FLWR_HOME", str(self.work_dir), below=True))

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
