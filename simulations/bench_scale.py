"""Scale: 1,000 simulated sites with 10 sampled per round, against 10 sites all sampled.

    python -m simulations.bench_scale                     # 1000 vs 10 sites, 10 rounds, Fashion-MNIST, tiny VAE
    python -m simulations.bench_scale --sites 200 --sample 5 --rounds 4

Both jobs are `flwr run` simulations with the same model, steps, seed and per-site data:
``data.num-partitions`` is the large run's site count in both, so every site (in either
run) holds one of the same 1/N shares of Fashion-MNIST and does the same local work; the
only difference is how many SuperNodes exist (and so how many sit idle each round). They
run alternately (small, large, small, large, ...) and the figures are medians of per-pair
values: peak memory (PSS summed over every process the launch started, and the per-process
picture at the peak) and the median round time over rounds 2..R (round 1 includes the
Ray and ClientApp start).

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
    median,
    parse_sets,
    run_flower,
    save_png,
    thread_env,
)
from simulations.launch import ROOT
from simulations.runs import round_seconds

# Small on purpose: what is measured is the federation at scale, not the model.
SCALE_CONFIG = {
    "task.family": "vae", "data.dataset": "fashion-mnist", "vae.width": 8, "vae.latent-dim": 8,
    "train.batch-size": 16, "train.max-steps": 4, "data.eval-max-examples": 500,
    "eval.fid-domain-n": 500, "eval.fid-inception-n": 0, "eval.num-samples": 16,
}


def job(sites_total: int, sampled: int, partitions: int, rounds: int, extra: dict) -> dict:
    return {**SCALE_CONFIG, "run.num-rounds": rounds, "data.num-partitions": partitions,
            "strategy.fraction-train": sampled / sites_total, "strategy.min-train-nodes": sampled,
            "strategy.min-available-nodes": sampled, **extra}


def measure(res: dict) -> dict:
    recs, mem = res["records"], res["mem"]
    rt = round_seconds(recs)
    ledgers = [f for f in (res["run_dir"].parent / ".site-ledgers").rglob("*.json")]
    return {"ledger_files": len(ledgers), "ledger_bytes": sum(f.stat().st_size for f in ledgers),"round_s": median(rt[1:]), "rounds": rt, "peak_pss": mem.peak_pss, "peak_rss": mem.peak_rss,
            "breakdown": mem.breakdown(), "max_by_label": mem.max_by_label,
            "sampled": [len(r["sampled"]) for r in recs if r["round"] >= 1],
            "ok": [sum(s["status"] == "ok" for s in r["sites"]) for r in recs if r["round"] >= 1],
            "timeline": [(t - res["t0"], p) for t, p in mem.timeline],
            "round_marks": [r["started_at"] - res["t0"] for r in recs if r["round"] >= 1], "load": res["load"]}


def plot(pairs: list[dict], args, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    last = pairs[-1]
    for key, color, label in (("small", "C1", f"{args.base_sites} sites"), ("large", "C0", f"{args.sites} sites")):
        tl = last[key]["timeline"]
        a.plot([t for t, _ in tl], [p / 2**30 for _, p in tl], color=color, label=label)
        for m in last[key]["round_marks"]:
            a.axvline(m, color=color, alpha=0.15)
        for p in pairs:
            b.plot(range(1, len(p[key]["rounds"]) + 1), p[key]["rounds"], "o-", color=color, alpha=0.6,
                   label=label if p is pairs[0] else None)
    a.axhline(3.0 * 10**9 / 2**30, color="red", ls=":", label="3 GB target")
    a.set_xlabel("seconds since launch (last pair; faint lines: round starts)")
    a.set_ylabel("PSS, all processes (GiB)")
    a.legend(fontsize=7)
    b.set_xlabel("round")
    b.set_ylabel("round wall time (s)")
    b.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    save_png(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=1000, help="simulated sites of the large run")
    ap.add_argument("--sample", type=int, default=10, help="sites sampled per round (both runs)")
    ap.add_argument("--base-sites", type=int, default=0, help="sites of the small run (default: --sample)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=1)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process (0 = unset)")
    ap.add_argument("--png", type=Path, default=ROOT / "docs" / "img" / "scale.png")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    args.base_sites = args.base_sites or args.sample
    extra = parse_sets(args.sets)
    pairs = []
    with tempfile.TemporaryDirectory(prefix="fedgen-bench-scale-") as tmp:
        for i in range(args.pairs):
            small = measure(run_flower(None, job(args.base_sites, args.sample, args.sites, args.rounds, extra),
                                       args.base_sites, Path(tmp) / f"small-{i}", env=thread_env(args.threads)))
            large = measure(run_flower(None, job(args.sites, args.sample, args.sites, args.rounds, extra),
                                       args.sites, Path(tmp) / f"large-{i}", env=thread_env(args.threads)))
            pairs.append({"small": small, "large": large, "time_ratio": large["round_s"] / small["round_s"],
                          "mem_ratio": large["peak_pss"] / small["peak_pss"]})
            print(f"pair {i + 1}/{args.pairs}: round {small['round_s']:.2f}s vs {large['round_s']:.2f}s; "
                  f"peak PSS {small['peak_pss'] / 2**30:.2f} vs {large['peak_pss'] / 2**30:.2f} GiB", flush=True)
    date = time.strftime("%Y-%m-%d")
    s = {
        "machine": MACHINE, "date": date, "sites": args.sites, "base_sites": args.base_sites, "sample": args.sample,
        "rounds": args.rounds, "pairs": args.pairs, "sets": args.sets, "config": SCALE_CONFIG, "threads": args.threads,
        "load": load_note(p[k]["load"] for p in pairs for k in ("small", "large")),
        "round_small_s": median(p["small"]["round_s"] for p in pairs),
        "round_large_s": median(p["large"]["round_s"] for p in pairs),
        "time_ratio": median(p["time_ratio"] for p in pairs),
        "peak_pss_small_gib": median(p["small"]["peak_pss"] for p in pairs) / 2**30,
        "peak_pss_large_gib": median(p["large"]["peak_pss"] for p in pairs) / 2**30,
        "peak_rss_small_gib": median(p["small"]["peak_rss"] for p in pairs) / 2**30,
        "peak_rss_large_gib": median(p["large"]["peak_rss"] for p in pairs) / 2**30,
        "mem_ratio": median(p["mem_ratio"] for p in pairs),
        "ledger_files_large": pairs[-1]["large"]["ledger_files"],
        "ledger_bytes_large": pairs[-1]["large"]["ledger_bytes"],
        "sampled_per_round": pairs[-1]["large"]["sampled"], "ok_per_round": pairs[-1]["large"]["ok"],
        "breakdown_small": [(k, round(p, 3), round(r, 3), n) for k, p, r, n in pairs[-1]["small"]["breakdown"]],
        "breakdown_large": [(k, round(p, 3), round(r, 3), n) for k, p, r, n in pairs[-1]["large"]["breakdown"]],
        "pairs_raw": [{k: {kk: vv for kk, vv in v.items() if kk != "timeline"} if isinstance(v, dict) else v
                       for k, v in p.items()} for p in pairs],
    }
    title = (f"fedgen scale: {args.sites} vs {args.base_sites} sites, {args.sample} sampled/round, "
             f"{args.rounds} rounds, {args.pairs} pair(s), {MACHINE} ({s['load']}), {date}")
    plot(pairs, args, args.png, title)
    if args.json:
        args.json.write_text(json.dumps(s, indent=1))
    print(f"\n{title}\npng: {args.png}")
    for key in ("small", "large"):
        n = args.base_sites if key == "small" else args.sites
        print(f"memory at peak, {n} sites (GiB PSS/RSS): " + ", ".join(
            f"{k} x{c}={p:.2f}/{r:.2f}" for k, p, r, c in s[f"breakdown_{key}"]))
    print(f"idle-site state on disk (large run): {s['ledger_files_large']} ledger files, "
          f"{s['ledger_bytes_large'] / 1e3:.1f} kB in all")
    print(f"{'figure':<32} {str(args.base_sites) + ' sites':>10} {str(args.sites) + ' sites':>11} {'ratio':>7}")
    print(f"{'round time (s, median r2..R)':<32} {s['round_small_s']:>10.2f} {s['round_large_s']:>11.2f} "
          f"{s['time_ratio']:>7.2f}")
    print(f"{'peak PSS, all processes (GiB)':<32} {s['peak_pss_small_gib']:>10.2f} {s['peak_pss_large_gib']:>11.2f} "
          f"{s['mem_ratio']:>7.2f}")
    print(f"{'peak RSS sum (GiB)':<32} {s['peak_rss_small_gib']:>10.2f} {s['peak_rss_large_gib']:>11.2f} "
          f"{s['peak_rss_large_gib'] / s['peak_rss_small_gib']:>7.2f}")
    return s


if __name__ == "__main__":
    main()
