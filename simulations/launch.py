"""Run a fedgen job as a real `flwr run` simulation, and exit non-zero if it failed.

    python -m simulations.launch                      # the default job (--preset default)
    python -m simulations.launch --preset digits-quick --num-sites 3
    python -m simulations.launch --set privacy.enabled=false        # the default job without DP
    python -m simulations.launch --ray-address HEAD:6379             # the sites on an existing Ray cluster

What it does, so that nothing outlives it and a failed run is never reported as a
success (``flwr run --stream`` exits 0 even when the run failed):
1. starts a private ``flower-superlink --simulation`` on free loopback ports, with its
   own ``FLWR_HOME`` (connection config written there, not in your home folder);
2. ``flwr run . local --stream`` with the merged run config and the number of sites;
3. reads the run's final status with ``flwr ls --format json``;
4. stops the SuperLink and every process it started, by process group.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from pathlib import Path

from simulations.procs import kill_all, processes_with_env, trees

ROOT = Path(__file__).resolve().parent.parent

FLOWER_ENV = {
    # Offline: never let the SuperLink try to install the app's dependencies per run.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(flwr_home)}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def _toml_value(value: object) -> str:
    return json.dumps(value)  # TOML accepts JSON strings, numbers and lowercase booleans


def _parse_override(item: str) -> tuple[str, object]:
    key, eq, raw = item.partition("=")
    if not eq:
        raise SystemExit(f"--set expects key=value, got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: take it as a string
    return key.strip(), value


def merged_run_config(preset: str | None, overrides: list[str], runs_dir: Path) -> dict[str, object]:
    config: dict[str, object] = {}
    if preset:
        path = Path(preset)
        if not path.exists():
            path = ROOT / "simulations" / f"{preset}.toml"
        if not path.exists():
            known = sorted(p.stem for p in (ROOT / "simulations").glob("*.toml"))
            raise SystemExit(f"preset {preset!r} not found; known presets: {known}")
        config.update(tomllib.loads(path.read_text()))
    config.update(_parse_override(o) for o in overrides)
    config.setdefault("run.runs-dir", str(runs_dir))
    init_from = str(config.get("task.init-from") or "")
    if init_from and not Path(init_from).expanduser().is_absolute():
        # Flower runs the ServerApp in another folder: a preset's relative path means the project's.
        config["task.init-from"] = str(ROOT / init_from)
    if not config.get("privacy.ledger-dir"):
        # Beside the runs the job writes (a run.runs-dir from the preset or --set wins over --runs-dir).
        config["privacy.ledger-dir"] = site_ledger_dir(Path(str(config["run.runs-dir"])).resolve(),
                                                       str(config.get("run.resume", "")))
    return config


def site_ledger_dir(runs_dir: Path, resume: str) -> str:
    """Where the simulated sites keep their privacy ledgers for this job.

    A new job gets a fresh folder (simulated sites are new sites); a resumed job reuses the
    folder of the run it resumes, so every site continues from what it already spent.
    """
    if resume:
        from server.runs_index import resolve_run
        from server.store import StoreError

        try:
            saved = json.loads((resolve_run(runs_dir, resume) / "config.json").read_text())
        except (StoreError, OSError, ValueError) as err:
            raise SystemExit(f"run.resume = {resume!r}: {err}") from None
        if saved.get("privacy.ledger-dir"):
            return saved["privacy.ledger-dir"]
    return str(runs_dir / ".site-ledgers" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")


def start_superlink(flwr_home: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    # Flower 1.41 serves the Control, Fleet and runtime APIs over HTTP on one --host/--port.
    port, health = free_port(), free_port()
    log = (flwr_home / "superlink.log").open("w")
    cmd = ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
           "--host", "127.0.0.1", "--port", str(port), "--health-server-address", f"127.0.0.1:{health}",
           "--database", str(flwr_home / "state.db")]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"flower-superlink exited with {proc.returncode}; see {flwr_home / 'superlink.log'}")
            try:
                with urllib.request.urlopen(f"http://{address}/health", timeout=1) as resp:
                    if resp.status == 200:
                        return proc, address
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit("flower-superlink did not start within 60 s")
    except BaseException:
        # A timeout, or a SIGTERM / Ctrl-C while it starts: the SuperLink (in a session of its
        # own) would outlive us, so stop it and what it started.
        stop(proc, flwr_home)
        raise


def stop(proc: subprocess.Popen, flwr_home: Path | None = None) -> None:
    """Stop the SuperLink and everything it started.

    SuperExec, the simulation runtime and Ray's daemons run in sessions of their own, so a
    process-group kill misses them; every one of them inherited our private FLWR_HOME,
    which is how they are found.
    """
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    if flwr_home is not None:
        kill_started_under(flwr_home)


def kill_started_under(flwr_home: Path, patience: float = 20.0) -> None:
    """SIGKILL every process that inherited ``FLWR_HOME=flwr_home`` and every process below one.

    The children count too: Ray's agents rewrite their process title over their environment
    (seen here: some ``ray::DashboardAgent`` processes no longer show ``FLWR_HOME``), and killing
    their raylet first would orphan them. So each round of kills takes the whole trees, found
    while their roots are still alive.
    """
    deadline = time.monotonic() + patience
    while (left := processes_with_env("FLWR_HOME", str(flwr_home))) and time.monotonic() < deadline:
        kill_all([pid for pid in trees(left) if pid != os.getpid()])
        time.sleep(0.2)


def run_status(env: dict[str, str]) -> dict:
    out = subprocess.run(["flwr", "ls", "local", "--format", "json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    try:
        runs = json.loads(out.stdout).get("runs", [])
    except json.JSONDecodeError:
        raise SystemExit(f"could not read the run status from `flwr ls`: {out.stdout}{out.stderr}") from None
    if not runs:
        raise SystemExit(f"`flwr ls` lists no run: the job was not submitted ({out.stdout}{out.stderr})")
    return max(runs, key=lambda r: r.get("pending-at") or "")


def _terminate(signum, _frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through `finally`, which stops the SuperLink


def launch(preset: str | None, overrides: list[str], num_sites: int, runs_dir: Path, *, quiet: bool = False,
           extra_env: dict[str, str] | None = None, flwr_home: Path | None = None,
           phases: dict[str, float] | None = None, app_dir: Path = ROOT,
           run_config: dict[str, object] | None = None, ray_address: str | None = None) -> int:
    """Run one job; returns 0 only if Flower reports it ``finished:completed``.

    ``app_dir`` is the Flower app to run (default: fedgen); with ``run_config`` given, that
    config is sent as it is instead of fedgen's preset + overrides (used for another app).

    ``flwr_home`` (default: a temporary folder, removed afterwards) holds the SuperLink's
    state, its log and the connection config; ``extra_env`` is added to every process.
    ``phases``, when given, receives wall-clock times (``time.time()``) of the steps:
    ``superlink-ready``, ``run-submitted`` (``flwr run`` started), ``run-returned``, ``stopped``.

    ``ray_address``: run the sites on an existing Ray cluster (``ray start --head`` on one
    machine, ``ray start --address`` on the others) instead of a private local Ray. Flower's
    simulation runtime calls ``ray.init()`` without an address, which then joins the cluster
    that Ray's own ``RAY_ADDRESS`` names: the SuperLink and what it starts get that variable.
    """
    if ray_address:
        extra_env = {**(extra_env or {}), "RAY_ADDRESS": ray_address}
    phases = phases if phases is not None else {}
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    runs_dir = runs_dir.resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedgen-flwr-") as tmp:
        flwr_home = Path(flwr_home or tmp)
        flwr_home.mkdir(parents=True, exist_ok=True)
        env = {**flower_env(flwr_home), **(extra_env or {})}
        if not ray_address:  # a RAY_ADDRESS of the caller's shell must not send a local job to a cluster
            env.pop("RAY_ADDRESS", None)
        config = run_config if run_config is not None else merged_run_config(preset, overrides, runs_dir)
        config_file = flwr_home / "run-config.toml"
        config_file.write_text("".join(f'"{k}" = {_toml_value(v)}\n' for k, v in config.items()))
        proc, address = start_superlink(flwr_home, env)
        phases["superlink-ready"] = time.time()
        try:
            (flwr_home / "config.toml").write_text(
                f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "{address}"\ninsecure = true\n'
            )
            cmd = ["flwr", "run", str(app_dir), "local", "--stream", "--run-config", str(config_file),
                   "--federation-config", f"num-supernodes={num_sites}"]
            phases["run-submitted"] = time.time()
            with (flwr_home / "run.log").open("w") as run_log:
                # Quiet: the run's stream goes to a file, whose end is printed if the run fails.
                out = None if not quiet else run_log
                code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=out).returncode
            phases["run-returned"] = time.time()
            status = run_status(env)
        finally:
            stop(proc, flwr_home)
            phases["stopped"] = time.time()
        state = str(status.get("status", "?"))  # e.g. finished:completed, finished:failed
        ok = code == 0 and state == "finished:completed"
        if not ok and quiet:  # the folder may be temporary: say why now
            print(failure_tail(flwr_home), file=sys.stderr)
    details = "" if ok or not status.get("status-details") else f" ({status['status-details']})"
    print(f"fedgen: flwr run exited {code}; run {status.get('run-id', '?')} status: {state}{details}"
          f"{'' if ok else ' -- FAILED'}; records under {runs_dir}", file=sys.stderr)
    return 0 if ok else 1


def failure_tail(flwr_home: Path, lines: int = 40) -> str:
    """The end of a failed quiet run's stream and the SuperLink's error lines, for the error report."""
    parts = []
    for name, keep in (("run.log", lambda line: True), ("superlink.log", lambda line: "ERROR" in line)):
        path = flwr_home / name
        text = path.read_text(errors="replace").splitlines() if path.exists() else []
        chosen = [line for line in text if keep(line)][-lines:]
        if chosen:
            parts.append(f"--- {path} (last {len(chosen)} lines{'' if name == 'run.log' else ' with ERROR'}):")
            parts.extend(chosen)
    return "\n".join(parts) or f"(no log under {flwr_home})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="default",
                    help="a simulations/<name>.toml preset or a path to a TOML file (default: 'default', the "
                         "default job; 'vae-fashion': pyproject.toml's settings alone)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one run-config key (repeatable)")
    ap.add_argument("--num-sites", type=int, default=10, help="simulated SuperNodes (default 10)")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs", help="where run folders go (default ./runs)")
    ap.add_argument("--ray-address", default=os.environ.get("FEDGEN_RAY_ADDRESS") or None,
                    help="run the sites on this existing Ray cluster (HOST:PORT of `ray start --head`; also "
                         "FEDGEN_RAY_ADDRESS) instead of a private local Ray")
    args = ap.parse_args(argv)
    return launch(args.preset, args.overrides, args.num_sites, args.runs_dir, ray_address=args.ray_address)


if __name__ == "__main__":
    raise SystemExit(main())
