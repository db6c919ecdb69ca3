"""Communication: bytes per round per site for each family, float32 against float16 on the wire.

    python -m simulations.bench_comm                                  # vae, gan, lm; 3 sites, 3 rounds, flwr run
    python -m simulations.bench_comm --families lm --seeds 0 1 2
    python -m simulations.bench_comm --transport local                # same server loop, in this process (fast)

For every family and seed the same job runs twice, back to back, identical except for
``strategy.update-dtype`` (float32, then float16): same seed, so the same data order,
partitions and DP noise draws; what differs is the rounding of the weights on the wire.
Bytes come from the round records (``bytes_sent`` / ``bytes_received``, Flower's
``ArrayRecord.count_bytes`` of every model array in the messages), divided by the sites
sampled (down) and the sites that replied (up). The metric is the server's evaluation
after the last round: negative ELBO and domain FID (vae), domain FID (gan), perplexity
(lm), on the held-out data. With several seeds the table also shows the seed-to-seed
spread of the float32 metric, the yardstick for the float16 difference.

Prints the table last; writes a PNG (--png).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tomllib
from pathlib import Path

from simulations.benchlib import (
    MACHINE,
    load_run_config,
    median,
    parse_sets,
    run_flower,
    run_local,
    save_png,
    thread_env,
)
from simulations.launch import ROOT

# family -> presets applied in order (lm-quick is written to go on top of digits-quick), metrics
FAMILIES = {
    "vae": (["digits-quick"], ["neg-elbo", "fid-domain"]),
    "gan": (["gan-digits"], ["fid-domain"]),
    "lm": (["digits-quick", "lm-quick"], ["perplexity"]),
}
DTYPES = ("float32", "float16")


def family_overrides(family: str, rounds: int, sites: int, extra: dict) -> dict:
    presets, _ = FAMILIES[family]
    out: dict = {}
    for p in presets:
        out.update(tomllib.loads((ROOT / "simulations" / f"{p}.toml").read_text()))
    out.update({"run.num-rounds": rounds, "strategy.fraction-train": 1.0,
                "strategy.min-train-nodes": min(2, sites), "strategy.min-available-nodes": min(2, sites)})
    out.update(extra)
    return out


def one_job(transport: str, overrides: dict, sites: int, work: Path, threads: int) -> list[dict]:
    if transport == "flwr":
        return run_flower(None, overrides, sites, work, env=thread_env(threads))["records"]
    return run_local(load_run_config(None, overrides), sites, work / "run")


def summarize(recs: list[dict], metrics: list[str]) -> dict:
    rounds = [r for r in recs if r["round"] >= 1]
    down = [r["bytes_sent"] / len(r["sampled"]) for r in rounds if r["sampled"]]
    up = [r["bytes_received"] / max(1, sum(s["status"] == "ok" for s in r["sites"])) for r in rounds]
    last = rounds[-1]["eval"]
    return {"down": median(down), "up": median(up), "metrics": {m: last.get(m) for m in metrics},
            "curve": {m: [r["eval"].get(m) for r in rounds] for m in metrics}}


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = list(results)
    fig, axes = plt.subplots(1, 1 + len(fams), figsize=(3.2 * (1 + len(fams)), 3))
    ax = axes[0]
    for i, dt in enumerate(DTYPES):
        vals = [median(s[dt]["down"] + s[dt]["up"] for s in results[f]) / 1e3 for f in fams]
        ax.bar([j + 0.4 * i for j in range(len(fams))], vals, width=0.4, label=dt)
    ax.set_xticks([j + 0.2 for j in range(len(fams))], fams)
    ax.set_ylabel("kB per site per round (down + up)")
    ax.legend(fontsize=7)
    for ax, fam in zip(axes[1:], fams):
        metric = FAMILIES[fam][1][0]
        for seed_res in results[fam]:
            for dt, style in zip(DTYPES, ("o-", "s--")):
                ys = seed_res[dt]["curve"][metric]
                ax.plot(range(1, len(ys) + 1), ys, style, color="C0" if dt == "float32" else "C1", alpha=0.7,
                        label=dt if seed_res is results[fam][0] else None)
        ax.set_title(f"{fam}: {metric}", fontsize=9)
        ax.set_xlabel("round")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    save_png(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--transport", choices=["flwr", "local"], default="flwr",
                    help="flwr: a real `flwr run` simulation per job; local: the same server loop in process")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process (0 = unset)")
    ap.add_argument("--png", type=Path, default=ROOT / "docs" / "img" / "communication.png")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    extra = parse_sets(args.sets)
    if args.transport == "local" and args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="fedgen-bench-comm-") as tmp:
        for fam in args.families:
            results[fam] = []
            for seed in args.seeds:
                pair = {}
                for dt in DTYPES:
                    ov = family_overrides(fam, args.rounds, args.sites,
                                          {**extra, "run.seed": seed, "strategy.update-dtype": dt})
                    recs = one_job(args.transport, ov, args.sites, Path(tmp) / f"{fam}-{seed}-{dt}", args.threads)
                    pair[dt] = summarize(recs, FAMILIES[fam][1])
                results[fam].append(pair)
                print(f"{fam} seed {seed}: " + "; ".join(
                    f"{dt} down {pair[dt]['down']:.0f} B up {pair[dt]['up']:.0f} B {pair[dt]['metrics']}"
                    for dt in DTYPES), flush=True)

    date = time.strftime("%Y-%m-%d")
    title = (f"fedgen communication: {args.sites} sites, {args.rounds} rounds, seeds {args.seeds}, "
             f"transport {args.transport}, {MACHINE}, {date}")
    rows = []
    for fam, per_seed in results.items():
        for metric in FAMILIES[fam][1]:
            f32 = [s["float32"]["metrics"][metric] for s in per_seed]
            f16 = [s["float16"]["metrics"][metric] for s in per_seed]
            rows.append({
                "family": fam, "metric": metric,
                "down32": median(s["float32"]["down"] for s in per_seed),
                "up32": median(s["float32"]["up"] for s in per_seed),
                "down16": median(s["float16"]["down"] for s in per_seed),
                "up16": median(s["float16"]["up"] for s in per_seed),
                "ratio": median((s["float16"]["down"] + s["float16"]["up"]) / (s["float32"]["down"] + s["float32"]["up"])
                                for s in per_seed),
                "metric32": median(f32), "metric16": median(f16),
                "rel_diff": median((b - a) / abs(a) for a, b in zip(f32, f16)),
                "seed_spread32": (max(f32) - min(f32)) / abs(median(f32)) if len(f32) > 1 else None,
                "n_seeds": len(per_seed),
            })
    summary = {"machine": MACHINE, "date": date, "sites": args.sites, "rounds": args.rounds, "seeds": args.seeds,
               "transport": args.transport, "sets": args.sets, "rows": rows, "raw": results}
    plot(results, args.png, title)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    print(f"\n{title}\npng: {args.png}")
    print(f"{'family':<6} {'metric':<11} {'f32 down B':>10} {'f32 up B':>9} {'f16 down B':>10} {'f16 up B':>9} "
          f"{'bytes f16/f32':>13} {'metric f32':>10} {'metric f16':>10} {'rel diff':>8} {'seed spread':>11}")
    for r in rows:
        spread = "-" if r["seed_spread32"] is None else f"{r['seed_spread32']:.2%}"
        print(f"{r['family']:<6} {r['metric']:<11} {r['down32']:>10.0f} {r['up32']:>9.0f} {r['down16']:>10.0f} "
              f"{r['up16']:>9.0f} {r['ratio']:>13.3f} {r['metric32']:>10.4g} {r['metric16']:>10.4g} "
              f"{r['rel_diff']:>+8.2%} {spread:>11}")
    return summary


if __name__ == "__main__":
    main()
