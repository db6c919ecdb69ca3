"""Deployed rounds against simulated ones: Flower's stock site path and fedgen's warm worker.

    python -m simulations.bench_deploy                                  # digits-quick, 3 sites
    python -m simulations.bench_deploy --preset vae-fashion --rounds 5 --stock-rounds 3
    python -m simulations.bench_deploy --modes simulation simulation+secagg warm warm+secagg

One invocation runs the same job up to four ways on this machine, one after the other, and prints
them side by side (the machine is shared: only ratios measured in one run are compared):

1. ``simulation``: ``simulations.launch`` (Flower's simulation engine, Ray actors);
2. ``warm``: a real deployment on loopback (TLS, node auth; ``simulations.deployment``) whose
   sites run fedgen's warm worker (``client/worker.py``) beside a SuperNode in process isolation;
3. ``stock``: the same deployment with Flower's own site path (a new ClientApp process for
   every message, ``--isolation subprocess``);
4. ``warm-sqlite``: ``warm`` with the SuperLink's state in SQLite, as ``docker/compose.yaml``
   keeps it (the others keep it in memory, ``simulations.deploy``'s default).

Every deployed site's processes run one torch thread (``Deployment(site_threads=1)``): the
three sites share this machine's cores, as the simulation's do.

Any mode with ``+secagg`` (``simulation+secagg``, ``warm+secagg``...) runs the same job with
secure aggregation (``strategy.secure-aggregation = true``, ``server/secagg.py``).

For each: the first round's wall time, the median of the steady rounds (2..R), their ratios to
the simulation's, and the messages a round exchanges with the sites (each way). For each
deployment, the CPU seconds a steady round costs each role (SuperLink, SuperNodes, workers,
ServerApp...: the deployment shares this machine's cores, so CPU is what a round waits for).
For the warm workers, each one's PSS (proportional set size, ``/proc/PID/smaps_rollup``) after
every round, and the ServerApp's: flat means no growth from round to round. With 11 rounds or
more, each worker's PSS at round 10 and at the last round, and its least-squares growth a round
between them; the same for its USS (unique set size: the pages no other process maps). PSS
divides each shared page among the processes that map it, so another process that maps torch
(a test run beside the benchmark) moves every worker's PSS; with two sites or more the workers'
USS mostly stays, as they already share most of those pages with each other (a page counts as a
process's own while no other process maps it: when the others that did have gone, or before
another one touches it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from simulations.deployment import Deployment
from simulations.launch import launch
from simulations.procs import cpu_times, processes_with_env
from simulations.runs import round_seconds, run_records


def memory_mib(pid: int) -> dict[str, float] | None:
    """A process's PSS and USS (the pages only it maps) in MiB, {"pss", "uss"} (None once it is gone)."""
    try:
        return rollup_mib(Path(f"/proc/{pid}/smaps_rollup").read_text())
    except OSError:
        return None


def rollup_mib(text: str) -> dict[str, float] | None:
    """PSS and USS (Private_Clean + Private_Dirty) in MiB from the text of an ``smaps_rollup``."""
    fields: dict[str, float] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("Pss", "Private_Clean", "Private_Dirty"):
            fields[name] = int(rest.split()[0]) / 1024
    if "Pss" not in fields:
        return None
    return {"pss": fields["Pss"], "uss": fields.get("Private_Clean", 0.0) + fields.get("Private_Dirty", 0.0)}


def pss_mib(pid: int) -> float | None:
    """A process's proportional set size in MiB (None once it is gone)."""
    mem = memory_mib(pid)
    return mem["pss"] if mem else None


def pss_growth(after_round: list[float | None], start: int = 10) -> dict | None:
    """A worker's first and last PSS readings from round ``start`` on (rounds counted from 1), and
    the least-squares MiB a round between them; None with fewer than two readings there."""
    points = [(r, v) for r, v in enumerate(after_round, 1) if r >= start and v is not None]
    if len(points) < 2:
        return None
    slope, _ = statistics.linear_regression([float(r) for r, _ in points], [v for _, v in points])
    (first, at_first), (last, at_last) = points[0], points[-1]
    return {"first_round": first, "first_mib": at_first, "last_round": last, "last_mib": at_last,
            "mib_a_round": slope}


#: Who a deployment's process is, from its command line (the first match).
ROLES = (("flower-superlink", "SuperLink"), ("client.worker supernode", "SuperNodes"), ("flower-supernode", "SuperNodes"),
         ("client.worker run", "workers"), ("flwr-serverapp", "ServerApp"), ("flwr-clientapp", "workers"),
         ("flower-superexec", "SuperExecs"))


def role_of(pid: int) -> str | None:
    """The role a process plays (:data:`ROLES`; "other"), or None once it is gone."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    return next((name for key, name in ROLES if key in cmd), "other")


def cpu_seconds_by_role(pids: list[int]) -> dict[str, float]:
    """CPU seconds (user + system) each role's live processes have used so far, and under
    "exited children" what their children that have exited and been waited for used (the
    stock path's ClientApp processes, one per message)."""
    out: dict[str, float] = {}
    for pid in pids:
        role, times = role_of(pid), cpu_times(pid)
        if role is None or times is None:
            continue
        out[role] = out.get(role, 0.0) + times[0]
        out["exited children"] = out.get("exited children", 0.0) + times[1]
    return out


MODES = {"warm": ("warm", "memory"), "stock": ("stock", "memory"), "warm-sqlite": ("warm", "sqlite")}
#: A mode with this suffix runs the same job with secure aggregation (server/secagg.py), e.g. warm+secagg.
SECURE = "+secagg"


def deployed(mode: str, preset: str | None, overrides: list[str], sites: int, work: Path) -> dict:
    """One deployed job; its round seconds and, for warm workers, PSS and USS per site after each round."""
    runs = work / "runs"
    worker, state = MODES[mode]
    with Deployment(work / "dep", site_worker=worker, superlink_state=state) as dep:
        dep.start_superlink()
        dep.add_sites([{"partition-id": i, "num-partitions": sites} for i in range(sites)])
        dep.wait_online(sites)
        handle = dep.submit(dep.write_run_config(preset, [f"strategy.min-available-nodes={sites}", *overrides], runs))
        pss: dict[int, list[float | None]] = {}
        uss: dict[int, list[float | None]] = {}
        cpu: dict[int, dict[str, float]] = {}
        server_pss: dict[int, float] = {}
        while handle.proc.poll() is None:
            _, recs = run_records(runs, newest=True) if runs.exists() else (None, [])
            for rnd in {r["round"] for r in recs if r["round"] >= 1} - set(pss):
                mem = [memory_mib(s.worker.pid) if s.worker else None for s in dep.sites]
                pss[rnd] = [m["pss"] if m else None for m in mem]
                uss[rnd] = [m["uss"] if m else None for m in mem]
                pids = processes_with_env("FLWR_HOME", str(dep.work_dir), below=True)
                cpu[rnd] = cpu_seconds_by_role(pids)
                server_pss[rnd] = sum(pss_mib(pid) or 0.0 for pid in pids if role_of(pid) == "ServerApp")
            time.sleep(0.1)
        status = dep.wait(handle)
        _, recs = run_records(runs, newest=True)
    return {"status": status.get("status"), "rounds": round_seconds(recs), "pss": [pss[r] for r in sorted(pss)],
            "uss": [uss[r] for r in sorted(uss)],
            "messages": messages_per_round(recs, sites), "cpu_per_round": steady_cpu(cpu),
            "serverapp_pss": [server_pss[r] for r in sorted(server_pss)]}


def steady_cpu(cpu: dict[int, dict[str, float]]) -> dict[str, float]:
    """CPU seconds per steady round by role: from the sample after round 1 to the last one
    (each taken within 0.1 s of the round's record). A role must be in both samples: a process
    that starts or ends between them is not counted (none does in a run that completes)."""
    rounds = sorted(cpu)
    if len(rounds) < 2:
        return {}
    first, last = cpu[rounds[0]], cpu[rounds[-1]]
    per = {role: (last[role] - first[role]) / (rounds[-1] - rounds[0]) for role in last if role in first}
    return {**per, "all": sum(per.values())}


def messages_per_round(recs: list[dict], sites: int) -> float:
    """Messages each steady round exchanged with the sites (each way counted): one train message
    and its reply per site in a plain round, the four stages' under secure aggregation."""
    counts = [r["secagg"]["messages"] if r.get("secagg") else 2 * len(r["sampled"]) for r in recs if r["round"] >= 1]
    return statistics.median(counts) if counts else float("nan")


def simulated(preset: str | None, overrides: list[str], sites: int, work: Path) -> dict:
    runs = work / "runs"
    code = launch(preset, overrides, sites, runs, quiet=True)
    _, recs = run_records(runs, newest=True)
    return {"status": "finished:completed" if code == 0 else f"exit {code}", "rounds": round_seconds(recs),
            "pss": [], "uss": [],
            "messages": messages_per_round(recs, sites)}


def summary(rounds: list[float]) -> tuple[float, float]:
    """(first round, median of the steady rounds 2..R)."""
    return rounds[0], statistics.median(rounds[1:]) if len(rounds) > 1 else float("nan")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="digits-quick")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10, help="rounds of the simulated and warm jobs (default 10)")
    ap.add_argument("--stock-rounds", type=int, default=4, help="rounds of the stock job (slow; default 4)")
    ap.add_argument("--modes", nargs="+", default=["simulation", "warm", "warm-sqlite", "stock"],
                    choices=[m + suffix for m in ("simulation", *MODES) for suffix in ("", SECURE)])
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (the sites' and workers' logs)")
    args = ap.parse_args(argv)
    results: dict[str, dict] = {}
    with (contextlib.nullcontext(str(args.keep)) if args.keep
          else tempfile.TemporaryDirectory(prefix="fedgen-bench-deploy-")) as tmp:
        for mode in args.modes:
            rounds = args.stock_rounds if mode == "stock" else args.rounds
            overrides = [*args.overrides, f"run.num-rounds={rounds}", "eval.fid-inception-n=0"]
            base = mode.removesuffix(SECURE)
            if base != mode:
                overrides.append("strategy.secure-aggregation=true")
            work = Path(tmp) / mode
            t0 = time.time()
            if base == "simulation":
                results[mode] = simulated(args.preset, overrides, args.sites, work)
            else:
                results[mode] = deployed(base, args.preset, overrides, args.sites, work)
            results[mode]["wall_s"] = time.time() - t0
            print(f"{mode}: {results[mode]['status']}, round seconds "
                  f"{', '.join(f'{s:.2f}' for s in results[mode]['rounds'])}", flush=True)
    sim_steady = summary(results["simulation"]["rounds"])[1] if "simulation" in results else float("nan")
    print(f"\nbench_deploy: {args.preset}, {args.sites} sites, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print(f"{'mode':<19}{'rounds':>7}{'first s':>9}{'steady s':>10}{'steady / sim':>14}{'first / steady':>16}"
          f"{'messages':>10}")
    for mode, res in results.items():
        first, steady = summary(res["rounds"])
        print(f"{mode:<19}{len(res['rounds']):>7}{first:>9.2f}{steady:>10.2f}{steady / sim_steady:>14.2f}"
              f"{first / steady:>16.2f}{res['messages']:>10.0f}")
    for mode, res in results.items():
        if res.get("cpu_per_round"):
            print(f"{mode}: CPU seconds a steady round: "
                  + ", ".join(f"{role} {sec:.3f}" for role, sec in sorted(res["cpu_per_round"].items())))
    for mode, res in results.items():  # every mode whose sites ran warm workers (warm, warm-sqlite, +secagg)
        for kind in ("pss", "uss"):
            rows = res.get(kind) or []
            if not any(v is not None for r in rows for v in r):
                continue
            name = kind.upper()
            print(f"{mode} workers' {name} (MiB) after each round, per site: "
                  + "; ".join(f"site {i + 1}: " + " ".join("-" if r[i] is None else f"{r[i]:.0f}" for r in rows)
                              for i in range(len(rows[0]))))
            growth = res[f"{kind}_growth"] = [pss_growth([r[i] for r in rows]) for i in range(len(rows[0]))]
            if any(growth):  # a worker the supervisor restarted mixes two processes' readings
                print(f"{mode} workers' {name} from round 10 on: " + "; ".join(
                    f"site {i + 1}: {g['first_mib']:.1f} MiB at round {g['first_round']}, {g['last_mib']:.1f} at "
                    f"round {g['last_round']} ({g['mib_a_round']:+.4f} MiB a round)"
                    for i, g in enumerate(growth) if g))
        if res.get("serverapp_pss"):
            print(f"{mode}: the ServerApp's PSS (MiB) after each round: "
                  + " ".join(f"{v:.0f}" for v in res["serverapp_pss"]))
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "sites": args.sites, "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
