"""Start a real fedgen deployment on this machine: one SuperLink and N SuperNodes, TLS and node auth.

    python -m simulations.deploy --sites 3 --preset digits-quick           # run one job, then stop
    python -m simulations.deploy --sites 3 --preset digits-quick --compare # ... and the same job as a simulation
    python -m simulations.deploy --sites 3 --serve                         # keep it up; run jobs yourself

The same topology as ``docker/compose.yaml``, without Docker, on loopback only:

1. a CA and a SuperLink certificate for 127.0.0.1/localhost (Python ``cryptography``) and,
   for every site, its own EC P-384 node key pair (OpenSSH format, what Flower reads);
2. ``flower-superlink`` with TLS on its one port (Fleet, Control and Runtime APIs) and
   ``--enable-supernode-auth``: only SuperNodes whose public key was registered may join;
   by default in ``process`` isolation with a separate ``flower-superexec`` that runs the
   ServerApp and proves a shared secret (``--superexec-auth-secret-file``), as in compose;
3. ``flwr supernode register`` for each site's public key (over the TLS Control API);
4. one ``flower-supernode`` per site, each with its own ``--node-config`` (partition, ledger
   in the site's own folder, optional data path and budget), its own Runtime API port and
   its own ``FLWR_HOME``; waits until ``flwr supernode list`` shows them online;
5. ``flwr run <app> fedgen --run-config ...`` (the connection lives in the operator's
   ``$FLWR_HOME/config.toml``, not in pyproject), then reads the final status with
   ``flwr ls --format json``, like ``simulations.launch``;
6. stops every process it started, and their children (each SuperNode's
   ``flower-superexec`` and ClientApps, the SuperLink's SuperExec and ServerApp), by PID.

``--insecure`` runs without TLS and without node auth (Flower refuses auth without TLS);
it prints a warning and is meant for debugging only.

:class:`Deployment` is the same machinery as a Python API (used by
``tests/integration/test_deployment.py``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulations.launch import ROOT, _toml_value, flower_env, free_port, merged_run_config

CONNECTION = "fedgen"  # the SuperLink connection name in the operator's $FLWR_HOME/config.toml
LOOPBACK = "127.0.0.1"
#: What we set for every Flower process. Flower reads FLWR_SUPEREXEC_TASK_POLL_INTERVAL in
#: every flower-superexec (how often it asks its SuperNode/SuperLink for a task to launch;
#: Flower's default 1 s). The SuperNode's 3 s idle poll of the SuperLink and the ServerApp's
#: 3 s poll for replies are fixed in Flower 1.41.
DEFAULT_TASK_POLL_INTERVAL = 0.2
INSECURE_WARNING = ("WARNING: --insecure: no TLS and no SuperNode authentication; anyone who can reach "
                    "the port can read the traffic and join as a site. Use it only to debug on loopback.")


# --------------------------------------------------------------------------- credentials


@dataclass(frozen=True)
class Credentials:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def make_credentials(out: Path, hosts: tuple[str, ...] = (LOOPBACK, "localhost"), days: int = 30) -> Credentials:
    """A CA and a SuperLink certificate signed by it, valid for ``hosts`` (names or IPs).

    EC P-384 keys; the CA carries key usage (critical) and a subject key identifier, the
    leaf an authority key identifier and serverAuth, so strict verifiers (Python 3.13's
    default ``VERIFY_X509_STRICT``) accept the chain. Private keys are written 0600.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedgen"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "fedgen federation CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedgen"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    pkcs8, none = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    creds = Credentials(out / "ca.crt", out / "ca.key", out / "superlink.crt", out / "superlink.key")
    creds.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    _write_private(creds.ca_key, ca_key.private_bytes(pem, pkcs8, none))
    creds.server_cert.write_bytes(cert.public_bytes(pem))
    _write_private(creds.server_key, key.private_bytes(pem, pkcs8, none))
    return creds


def make_node_key(private_path: Path) -> tuple[Path, Path]:
    """A SuperNode's EC P-384 key pair in OpenSSH format (``ssh-keygen -t ecdsa -b 384``).

    The private key stays at the site (``--auth-supernode-private-key``); the public key
    (``<name>.pub``) is what the SuperLink operator registers with ``flwr supernode register``.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()))
    public_path = private_path.with_name(private_path.name + ".pub")
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                          serialization.PublicFormat.OpenSSH) + b"\n")
    return private_path, public_path


# --------------------------------------------------------------------------- processes


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, from /proc; None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # the command name may contain spaces and parentheses
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19])


def _descendants(pid: int) -> list[tuple[int, int]]:
    """Every live descendant of ``pid`` as (pid, start time), so a reused PID is never signalled."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            children.setdefault(st[0], []).append((int(entry.name), st[1]))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child[0])
    return out


def _pids_with_flwr_home_under(folder: Path) -> list[int]:
    prefix = f"FLWR_HOME={folder}".encode()
    found = []
    for env_file in Path("/proc").glob("[0-9]*/environ"):
        try:
            if any(v == prefix or v.startswith(prefix + b"/") for v in env_file.read_bytes().split(b"\0")):
                found.append(int(env_file.parent.name))
        except (OSError, ValueError):
            continue
    return [pid for pid in found if pid != os.getpid()]


def _signal(pid: int, started: int, sig: int) -> None:
    st = _stat(pid)
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
    tree = _descendants(proc.pid)
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            proc.send_signal(sig)
    for pid, started in tree:
        _signal(pid, started, sig)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc.poll() is not None and all(_stat(p) is None or _stat(p)[1] != s for p, s in tree):
            break
        time.sleep(0.1)
    for pid, started in tree + _descendants(proc.pid):
        _signal(pid, started, signal.SIGKILL)
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


# --------------------------------------------------------------------------- the topology


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

    @property
    def log(self) -> Path:
        return self.dir / "supernode.log"


def node_config_arg(config: dict[str, Any]) -> str:
    """``--node-config`` form: space-separated ``key=value`` with TOML values (strings quoted)."""
    for key, value in config.items():
        if isinstance(value, str) and '"' in value:
            raise ValueError(f"node-config {key}: double quotes are not supported in values ({value!r})")
    return " ".join(f"{k}={_toml_value(v)}" for k, v in config.items())


class Deployment:
    """A SuperLink and its SuperNodes on loopback, all processes owned (and stopped) by this object.

    ``work_dir`` holds everything: ``certs/``, ``superlink/`` (its FLWR_HOME, state.db, log),
    ``operator/`` (the CLI's FLWR_HOME with ``config.toml``) and one folder per site (its
    FLWR_HOME, node key, ledger, log). Use as a context manager; :meth:`close` stops all.
    """

    def __init__(self, work_dir: Path, *, app_dir: Path = ROOT, insecure: bool = False,
                 isolation: str = "subprocess", server_isolation: str = "process",
                 task_poll_interval: float | None = DEFAULT_TASK_POLL_INTERVAL) -> None:
        for what, value in (("isolation", isolation), ("server_isolation", server_isolation)):
            if value not in ("subprocess", "process"):
                raise ValueError(f"{what} must be 'subprocess' or 'process', got {value!r}")
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

    # ---- environment and commands

    def env(self, home: Path) -> dict[str, str]:
        home.mkdir(parents=True, exist_ok=True)
        env = flower_env(home)
        if self.task_poll_interval is not None:
            env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(self.task_poll_interval)
        return env

    def _spawn(self, cmd: list[str], home: Path, log: Path) -> subprocess.Popen:
        # cwd = the app folder, as in simulations.launch: relative run-config paths (run.runs-dir,
        # eval.cache-dir) mean the same thing in a local deployment and in a simulation.
        with log.open("ab") as fh:
            proc = subprocess.Popen(cmd, env=self.env(home), stdout=fh, stderr=subprocess.STDOUT, cwd=self.app_dir,
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
               "--database", str(home / "state.db"), "--disable-runtime-dependency-installation"]
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
            _write_private(secret, os.urandom(32).hex().encode())
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
        cmd = ["flower-supernode", "--superlink", self.address, "--host", LOOPBACK, "--port", str(site.port),
               "--isolation", self.isolation, "--node-config", node_config_arg(site.node_config)]
        if self.insecure:
            cmd.append("--insecure")
        else:
            cmd += ["--root-certificates", str(self.creds.ca_cert), "--auth-supernode-private-key", str(site.key)]
        if max_retries is not None:
            cmd += ["--max-retries", str(max_retries)]
        site.procs.append(self._spawn(cmd, home, site.log))
        if self.isolation == "process":
            # The ClientApp launcher runs beside the SuperNode, not under it (what a second
            # container does in Docker); the Runtime API stays on loopback.
            cmd = ["flower-superexec", "--runtime-api-address", f"{LOOPBACK}:{site.port}", "--insecure"]
            site.procs.append(self._spawn(cmd, home, site.dir / "superexec.log"))
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
        for proc in reversed(self._procs):
            stop_process(proc)
        self._procs.clear()
        for pid in _pids_with_flwr_home_under(self.work_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_records(runs_dir: Path) -> list[dict]:
    """The round records of the newest run folder under ``runs_dir``."""
    folders = sorted((p for p in runs_dir.iterdir() if (p / "rounds.jsonl").exists()), key=lambda p: p.stat().st_mtime)
    if not folders:
        return []
    return [json.loads(line) for line in (folders[-1] / "rounds.jsonl").read_text().splitlines() if line.strip()]


def round_seconds(records: list[dict]) -> list[float]:
    return [r["ended_at"] - r["started_at"] for r in records if r["round"] > 0]


# --------------------------------------------------------------------------- CLI


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=3, help="SuperNodes to start (default 3)")
    ap.add_argument("--preset", help="a simulations/<name>.toml preset (or a path to a TOML file)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one run-config key (repeatable)")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs", help="where run folders go (default ./runs)")
    ap.add_argument("--app", type=Path, default=ROOT, help="the Flower app folder to run (default: this checkout)")
    ap.add_argument("--work-dir", type=Path, help="certs, keys, ledgers, logs (default: a new temporary folder, "
                    "removed at the end; a kept folder keeps each site's privacy ledger across runs)")
    ap.add_argument("--data-path", action="append", default=[], metavar="PATH",
                    help="a site's own data folder (node config data-path); repeat once per site")
    ap.add_argument("--privacy-budget", type=float, default=0.0, help="every site's epsilon budget (0 = the run's)")
    ap.add_argument("--isolation", choices=("subprocess", "process"), default="subprocess",
                    help="SuperNode isolation: the SuperNode launches ClientApps (subprocess) or a separate "
                         "flower-superexec does (process)")
    ap.add_argument("--server-isolation", choices=("subprocess", "process"), default="process",
                    help="SuperLink isolation: a separate ServerApp runner authenticated with a shared secret "
                         "(process, as in docker/compose.yaml) or one the SuperLink launches (subprocess)")
    ap.add_argument("--task-poll-interval", type=float, default=DEFAULT_TASK_POLL_INTERVAL,
                    help=f"seconds between a SuperExec's task polls (FLWR_SUPEREXEC_TASK_POLL_INTERVAL; "
                         f"default {DEFAULT_TASK_POLL_INTERVAL}, Flower's own 1.0)")
    ap.add_argument("--insecure", action="store_true", help="no TLS, no node auth (debugging only; prints a warning)")
    ap.add_argument("--serve", action="store_true", help="start the topology, print how to use it, wait for Ctrl-C")
    ap.add_argument("--compare", action="store_true",
                    help="also run the same job as a simulation (simulations.launch) and print both round times")
    args = ap.parse_args(argv)
    if args.data_path and len(args.data_path) != args.sites:
        ap.error(f"--data-path given {len(args.data_path)} time(s); give it once per site ({args.sites})")

    signal.signal(signal.SIGTERM, _terminate)  # unwind through `finally`: nothing outlives us
    keep = args.work_dir is not None
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedgen-deploy-"))
    runs_dir = args.runs_dir.resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        with Deployment(work, app_dir=args.app, insecure=args.insecure, isolation=args.isolation,
                        server_isolation=args.server_isolation, task_poll_interval=args.task_poll_interval) as dep:
            dep.start_superlink()
            configs: list[dict[str, Any]] = []
            for i in range(args.sites):
                config: dict[str, Any] = {"partition-id": i, "num-partitions": args.sites}
                if args.data_path:
                    config["data-path"] = str(Path(args.data_path[i]).resolve())
                if args.privacy_budget:
                    config["privacy-budget"] = args.privacy_budget
                configs.append(config)
            dep.add_sites(configs)
            dep.wait_online(args.sites)
            online_s = time.time() - t0
            print(f"deploy: SuperLink {dep.address} ({'INSECURE' if args.insecure else 'TLS + node auth'}), "
                  f"{args.sites} SuperNodes online after {online_s:.1f}s; work dir {work}", file=sys.stderr)
            if args.serve:
                print(f"deploy: run jobs with\n  FLWR_HOME={dep.operator_home} flwr run . {CONNECTION} "
                      f"--run-config simulations/digits-quick.toml --stream\nCtrl-C stops everything.", file=sys.stderr)
                try:
                    while all(p.poll() is None for p in dep._procs):
                        time.sleep(1)
                except KeyboardInterrupt:
                    pass
                return 0
            overrides = [f"strategy.min-available-nodes={args.sites}", *args.overrides]
            status = dep.run(args.preset, overrides, runs_dir)
        state = str(status.get("status", "?"))
        records = run_records(runs_dir)
        ok = state == "finished:completed"
        print(f"deploy: run {status.get('run-id', '?')} status: {state}{'' if ok else ' -- FAILED'}; "
              f"records under {runs_dir}", file=sys.stderr)
        if records:
            first = next((r for r in records if r["round"] == 1), None)
            if first:
                print(f"deploy: topology start -> round 1 started {first['started_at'] - t0:.1f}s, "
                      f"ended {first['ended_at'] - t0:.1f}s", file=sys.stderr)
            print("deploy: round seconds (deployment): "
                  + ", ".join(f"{s:.1f}" for s in round_seconds(records)), file=sys.stderr)
        if args.compare:
            from simulations.launch import launch

            sim_runs = Path(tempfile.mkdtemp(prefix="fedgen-sim-runs-"))
            try:
                code = launch(args.preset, args.overrides, args.sites, sim_runs, quiet=True)
                print(f"deploy: round seconds (simulation, exit {code}): "
                      + ", ".join(f"{s:.1f}" for s in round_seconds(run_records(sim_runs))), file=sys.stderr)
            finally:
                shutil.rmtree(sim_runs, ignore_errors=True)
        return 0 if ok else 1
    except DeployError as err:
        print(f"deploy: {err}", file=sys.stderr)
        return 1
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
