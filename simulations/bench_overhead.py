"""Federation overhead: R rounds x K sites through `flwr run` against the same job in one process.

    python -m simulations.bench_overhead                          # digits-quick VAE, 3 sites, 6 rounds, 3 pairs
    python -m simulations.bench_overhead --sites 5 --rounds 8 --set train.max-steps=40

Both sides run the same server loop (server.rounds.run_rounds), strategy, validation,
evaluation and ClientApp code, with the same config and seed; the in-process side
(simulations.benchlib.LocalGrid, in a fresh Python process) calls the ClientApp directly,
so the difference is what Flower adds: SuperLink, message serialization, Ray, polling.
The two run alternately (flwr, local, flwr, local, ...) so a noisy machine slows both
alike; figures are medians over the pairs of per-pair values:

* steady round ratio: median wall time of rounds 2..R under flwr / the same in-process,
  split into the sites' own calls (the seconds each reply reports: data, model, accounting,
  the training loop's wall and CPU time) and the rest of the round (server evaluation and
  aggregation on both sides; messages, SuperLink and Ray under flwr): a training loop whose
  wall time exceeds its CPU time waited for a core;
* cold start: from the launch to the start of round 1 (SuperLink, `flwr run` submit,
  SuperExec, simulation process, Ray, ServerApp imports, round-0 evaluation), plus the
  first round's excess over a steady round (Ray actor start, ClientApp imports, first
  data load), broken down by phase;
* peak memory: PSS (and RSS) summed over every process each side started;
* Flower's floor (``--plain``, on by default): the same launch of ``simulations/plainapp``,
  an app that imports only flwr and whose sites answer at once, run third in every pair:
  what any app pays on this machine before and in each round.

Prints the table last; writes a PNG (--png).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from simulations.benchlib import (
    MACHINE,
    load_note,
    load_run_config,
    median,
    parse_sets,
    run_flower,
    run_local_subprocess,
    run_plain,
    save_png,
    site_sums,
    thread_env,
)
from simulations.launch import ROOT
from simulations.runs import round_seconds


def flower_phases(res: dict) -> dict[str, float]:
    """Seconds spent in each phase before steady state, from the launcher's clock and the round records."""
    recs, ph, t0 = res["records"], res["phases"], res["t0"]
    r0 = next(r for r in recs if r["round"] == 0)
    r1 = next(r for r in recs if r["round"] == 1)
    steady = median(round_seconds(recs)[1:])
    return {
        "superlink-start": ph["superlink-ready"] - t0,
        "submit-to-serverapp": r0["started_at"] - ph["run-submitted"],  # flwr run, SuperExec, imports, Evaluator
        "round-0-eval": r0["ended_at"] - r0["started_at"],
        "to-round-1": r1["started_at"] - r0["ended_at"],
        "round-1-excess": (r1["ended_at"] - r1["started_at"]) - steady,  # Ray actor, ClientApp imports
        "before-round-1": r1["started_at"] - t0,
        "cold-start": (r1["ended_at"] - t0) - steady,
        "shutdown": res["t_end"] - recs[-1]["ended_at"],
    }


SITE_KEYS = {"sites": "site-seconds", "train": "train-seconds", "train_cpu": "train-cpu-seconds"}


def site_times(recs: list[dict], side: str) -> dict[str, list[float]]:
    """Per round, the seconds the sites' own calls took (summed over sites; they run one at a
    time on both sides), their training loops' wall and CPU seconds: ``{side}_sites``..."""
    return {f"{side}_{name}": site_sums(recs, key) for name, key in SITE_KEYS.items()}


def local_phases(res: dict) -> dict[str, float]:
    recs, t0 = res["records"], res["t0"]
    r0 = next(r for r in recs if r["round"] == 0)
    r1 = next(r for r in recs if r["round"] == 1)
    steady = median(round_seconds(recs)[1:])
    return {"before-round-1": r1["started_at"] - t0, "cold-start": (r1["ended_at"] - t0) - steady,
            "round-0-eval": r0["ended_at"] - r0["started_at"],
            "round-1-excess": (r1["ended_at"] - r1["started_at"]) - steady}


def plot(pairs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    for i, p in enumerate(pairs):
        a.plot(range(1, len(p["flwr_rounds"]) + 1), p["flwr_rounds"], "o-", color="C0", alpha=0.7,
               label="flwr run" if i == 0 else None)
        a.plot(range(1, len(p["local_rounds"]) + 1), p["local_rounds"], "s--", color="C1", alpha=0.7,
               label="in-process" if i == 0 else None)
        if "plain_rounds" in p:
            a.plot(range(1, len(p["plain_rounds"]) + 1), p["plain_rounds"], "^:", color="C2", alpha=0.7,
                   label="plain Flower app" if i == 0 else None)
    a.set_xlabel("round")
    a.set_ylabel("wall time (s)")
    a.set_title("round time, every pair")
    a.legend()
    keys = ["superlink-start", "submit-to-serverapp", "round-0-eval", "to-round-1", "round-1-excess"]

    def stack(x: int, side: str, phases: list[str], colors: list[str], **style) -> None:
        """One bar of ``side``'s median phases, stacked in order."""
        bottom = 0.0
        for k, color in zip(phases, colors):
            v = median(p[side][k] for p in pairs)
            b.bar(x, v, bottom=bottom, color=color, label=k if x == 0 else None, **style)
            bottom += v

    phase_colors = [f"C{i}" for i in range(len(keys))]
    stack(0, "flwr_phases", keys, phase_colors)
    stack(1, "local_phases", ["before-round-1", "round-1-excess"], ["grey", "silver"])
    ticks = ["flwr run", "in-process"]
    if all("plain_phases" in p for p in pairs):
        stack(2, "plain_phases", keys, phase_colors, alpha=0.5)
        ticks.append("plain app")
    b.set_xticks(range(len(ticks)), ticks)
    b.set_ylabel("seconds to steady state (median)")
    b.set_title("cold start")
    b.legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=9)
    save_png(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="digits-quick")
    ap.add_argument("--sites", type=int, default=3, help="K simulated sites (all trained every round)")
    ap.add_argument("--rounds", type=int, default=6, help="R rounds (>= 2: round 1 is the cold one)")
    ap.add_argument("--pairs", type=int, default=3, help="alternating (flwr, in-process) runs")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process, both sides (0 = unset)")
    ap.add_argument("--png", type=Path, default=ROOT / "docs" / "img" / "overhead.png")
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    ap.add_argument("--plain", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the plain Flower app (simulations/plainapp) in every pair: Flower's floor")
    args = ap.parse_args(argv)
    if args.rounds < 2:
        ap.error("--rounds must be at least 2 (round 1 includes the cold start)")
    overrides = {"run.num-rounds": args.rounds, "strategy.fraction-train": 1.0,
                 "strategy.min-train-nodes": min(2, args.sites), "strategy.min-available-nodes": min(2, args.sites),
                 **parse_sets(args.sets)}
    cfg = load_run_config(args.preset, overrides)
    pairs = []
    with tempfile.TemporaryDirectory(prefix="fedgen-bench-overhead-") as tmp:
        for i in range(args.pairs):
            env = thread_env(args.threads)
            f = run_flower(args.preset, overrides, args.sites, Path(tmp) / f"flwr-{i}", env=env)
            lo = run_local_subprocess(args.preset, overrides, args.sites, Path(tmp) / f"local-{i}", env=env)
            fr, lr = round_seconds(f["records"]), round_seconds(lo["records"])
            plain = {}
            if args.plain:
                pl = run_plain(args.sites, args.rounds, Path(tmp) / f"plain-{i}", cfg["run.reply-poll-interval"], env=env)
                plain = {"plain_rounds": round_seconds(pl["records"]), "plain_phases": flower_phases(pl),
                         "plain_pss": pl["mem"].peak_pss, "plain_rss": pl["mem"].peak_rss}
            pairs.append({**plain,
                "flwr_rounds": fr, "local_rounds": lr, **site_times(f["records"], "flwr"),
                **site_times(lo["records"], "local"),
                "ratio": median(fr[1:]) / median(lr[1:]),
                "flwr_phases": flower_phases(f), "local_phases": local_phases(lo),
                "flwr_pss": f["mem"].peak_pss, "flwr_rss": f["mem"].peak_rss,
                "local_pss": lo["mem"].peak_pss, "local_rss": lo["mem"].peak_rss,
                "flwr_breakdown": f["mem"].breakdown(), "load": [f["load"], lo["load"]],
            })
            print(f"pair {i + 1}/{args.pairs}: steady round flwr {median(fr[1:]):.2f}s, in-process "
                  f"{median(lr[1:]):.2f}s, ratio {pairs[-1]['ratio']:.2f}; cold start flwr "
                  f"{pairs[-1]['flwr_phases']['cold-start']:.1f}s"
                  + (f"; plain app: steady round {median(plain['plain_rounds'][1:]):.2f}s, cold start "
                     f"{plain['plain_phases']['cold-start']:.1f}s" if plain else ""), flush=True)

    def med(key, side="flwr_phases"):
        return median(p[side][key] for p in pairs)

    summary = {
        "machine": MACHINE, "date": time.strftime("%Y-%m-%d"), "preset": args.preset, "sites": args.sites,
        "rounds": args.rounds, "pairs": args.pairs, "sets": args.sets, "threads": args.threads,
        "load": load_note(x for p in pairs for x in p["load"]),
        "family": cfg["task.family"], "dataset": cfg["data.dataset"],
        "steady_round_flwr_s": median(median(p["flwr_rounds"][1:]) for p in pairs),
        "steady_round_local_s": median(median(p["local_rounds"][1:]) for p in pairs),
        "steady_ratio": median(p["ratio"] for p in pairs),
        **{f"steady_{name}_{side}_s": median(median(p[f"{side}_{name}"][1:]) for p in pairs)
           for name in SITE_KEYS for side in ("flwr", "local")},
        "cold_start_s": med("cold-start"), "before_round1_s": med("before-round-1"),
        "cold_start_local_s": med("cold-start", "local_phases"),
        "phases_s": {k: med(k) for k in pairs[0]["flwr_phases"]},
        "peak_pss_flwr_gib": median(p["flwr_pss"] for p in pairs) / 2**30,
        "peak_rss_flwr_gib": median(p["flwr_rss"] for p in pairs) / 2**30,
        "peak_pss_local_gib": median(p["local_pss"] for p in pairs) / 2**30,
        "peak_rss_local_gib": median(p["local_rss"] for p in pairs) / 2**30,
        "memory_breakdown_flwr": [(k, round(p, 3), round(r, 3), n) for k, p, r, n in pairs[-1]["flwr_breakdown"]],
        "pairs_raw": [{k: v for k, v in p.items() if k != "flwr_breakdown"} for p in pairs],
    }
    for side in ("flwr", "local"):  # the round's time not spent in the sites' calls
        summary[f"steady_outside_{side}_s"] = summary[f"steady_round_{side}_s"] - summary[f"steady_sites_{side}_s"]
    if args.plain:
        summary.update({
            "steady_round_plain_s": median(median(p["plain_rounds"][1:]) for p in pairs),
            "cold_start_plain_s": med("cold-start", "plain_phases"),
            "phases_plain_s": {k: med(k, "plain_phases") for k in pairs[0]["plain_phases"]},
            "peak_pss_plain_gib": median(p["plain_pss"] for p in pairs) / 2**30,
            "peak_rss_plain_gib": median(p["plain_rss"] for p in pairs) / 2**30,
        })
    title = (f"fedgen federation overhead: {summary['family']} on {summary['dataset']}, K={args.sites} sites, "
             f"R={args.rounds} rounds, {args.pairs} pairs, {args.threads} thread(s)/process, {MACHINE} ({summary['load']}), {summary['date']}")
    plot(pairs, args.png, title)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))

    s = summary
    print(f"\n{title}")
    print("cold-start phases (median s): " + ", ".join(f"{k}={v:.2f}" for k, v in s["phases_s"].items()))
    print("flwr memory at peak (last pair, GiB PSS/RSS): " + ", ".join(
        f"{k} x{n}={p:.2f}/{r:.2f}" for k, p, r, n in s["memory_breakdown_flwr"]))
    if args.plain:
        print("plain Flower app phases (median s): "
              + ", ".join(f"{k}={v:.2f}" for k, v in s["phases_plain_s"].items()))
        print(f"fedgen's cold start above the plain app's: {s['cold_start_s'] - s['cold_start_plain_s']:.2f} s; "
              f"its steady round above the plain app's: {s['steady_round_flwr_s'] - s['steady_round_plain_s']:.3f} s")
    print(f"png: {args.png}")

    def plain_cell(key: str, fmt: str) -> str:
        return f"{s[key]:>11{fmt}}" if args.plain else f"{'-':>11}"

    print(f"{'figure':<34} {'flwr run':>10} {'in-process':>11} {'ratio':>7} {'plain app':>11}")
    print(f"{'steady round (s, median)':<34} {s['steady_round_flwr_s']:>10.3f} {s['steady_round_local_s']:>11.3f} "
          f"{s['steady_ratio']:>7.2f} {plain_cell('steady_round_plain_s', '.3f')}")
    print(f"{'  of which in site calls (s)':<34} {s['steady_sites_flwr_s']:>10.3f} "
          f"{s['steady_sites_local_s']:>11.3f} {s['steady_sites_flwr_s'] / s['steady_sites_local_s']:>7.2f} {'-':>11}")
    print(f"{'  of which outside them (s)':<34} {s['steady_outside_flwr_s']:>10.3f} "
          f"{s['steady_outside_local_s']:>11.3f} {'-':>7} {plain_cell('steady_round_plain_s', '.3f')}")
    print(f"{'  training loops, wall (s)':<34} {s['steady_train_flwr_s']:>10.3f} {s['steady_train_local_s']:>11.3f} "
          f"{s['steady_train_flwr_s'] / s['steady_train_local_s']:>7.2f} {'-':>11}")
    print(f"{'  training loops, CPU (s)':<34} {s['steady_train_cpu_flwr_s']:>10.3f} "
          f"{s['steady_train_cpu_local_s']:>11.3f} {s['steady_train_cpu_flwr_s'] / s['steady_train_cpu_local_s']:>7.2f}"
          f" {'-':>11}")
    print(f"{'cold start to steady state (s)':<34} {s['cold_start_s']:>10.2f} {s['cold_start_local_s']:>11.2f} "
          f"{s['cold_start_s'] / s['cold_start_local_s']:>7.2f} {plain_cell('cold_start_plain_s', '.2f')}")
    before_plain = f"{s['phases_plain_s']['before-round-1']:>11.2f}" if args.plain else f"{'-':>11}"
    print(f"{'launch to round-1 start (s)':<34} {s['before_round1_s']:>10.2f} {'-':>11} {'-':>7} {before_plain}")
    print(f"{'peak PSS, all processes (GiB)':<34} {s['peak_pss_flwr_gib']:>10.2f} {s['peak_pss_local_gib']:>11.2f} "
          f"{s['peak_pss_flwr_gib'] / s['peak_pss_local_gib']:>7.2f} {plain_cell('peak_pss_plain_gib', '.2f')}")
    print(f"{'peak RSS sum (GiB)':<34} {s['peak_rss_flwr_gib']:>10.2f} {s['peak_rss_local_gib']:>11.2f} "
          f"{s['peak_rss_flwr_gib'] / s['peak_rss_local_gib']:>7.2f} {plain_cell('peak_rss_plain_gib', '.2f')}")
    return summary


if __name__ == "__main__":
    main()
