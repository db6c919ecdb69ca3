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

:class:`simulations.deployment.Deployment` is the same machinery as a Python API (used by
``tests/integration/test_deployment.py``); certificates and keys come from ``simulations.certs``,
process control from ``simulations.procs``.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from simulations.deployment import CONNECTION, DEFAULT_TASK_POLL_INTERVAL, Deployment, DeployError
from simulations.launch import ROOT
from simulations.runs import round_seconds, run_records



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
    ap.add_argument("--site-worker", choices=("warm", "stock"), default="warm",
                    help="warm (default): each SuperNode in process isolation with fedgen's warm worker beside "
                         "it (python -m client.worker: one long-lived ClientApp process); stock: Flower's own "
                         "launch of a new ClientApp process for every message (--isolation)")
    ap.add_argument("--isolation", choices=("subprocess", "process"), default="subprocess",
                    help="with --site-worker stock: the SuperNode launches ClientApps (subprocess) or a separate "
                         "flower-superexec does (process)")
    ap.add_argument("--server-isolation", choices=("subprocess", "process"), default="process",
                    help="SuperLink isolation: a separate ServerApp runner authenticated with a shared secret "
                         "(process, as in docker/compose.yaml) or one the SuperLink launches (subprocess)")
    ap.add_argument("--task-poll-interval", type=float, default=DEFAULT_TASK_POLL_INTERVAL,
                    help=f"seconds between a SuperExec's task polls (FLWR_SUPEREXEC_TASK_POLL_INTERVAL; "
                         f"default {DEFAULT_TASK_POLL_INTERVAL}, Flower's own 1.0)")
    ap.add_argument("--site-threads", type=int, default=1,
                    help="torch threads of each site's processes (default 1: every site shares this machine's "
                         "cores, as a simulation's sites share them; 0 = torch's default)")
    ap.add_argument("--superlink-state", choices=("memory", "sqlite"), default="memory",
                    help="where the SuperLink keeps its state: memory (default: this topology lives as long as "
                         "this command) or sqlite (as docker/compose.yaml: survives a SuperLink restart, slower)")
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
                        server_isolation=args.server_isolation, task_poll_interval=args.task_poll_interval,
                        site_worker=args.site_worker, site_threads=args.site_threads,
                        superlink_state=args.superlink_state) as dep:
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
                  f"{args.sites} SuperNodes online after {online_s:.1f}s, site worker {args.site_worker}; "
                  f"work dir {work}", file=sys.stderr)
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
        _, records = run_records(runs_dir, newest=True)
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
                      + ", ".join(f"{s:.1f}" for s in round_seconds(run_records(sim_runs, newest=True)[1])), file=sys.stderr)
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
