"""Privacy-utility: final quality of the global model at several epsilons, with its CPU cost.

    python -m simulations.bench_privacy_utility                       # images: VAE and GAN, iid and dirichlet
    python -m simulations.bench_privacy_utility --only lm             # Shakespeare LM at epsilon 3, 8, inf
    python -m simulations.bench_privacy_utility --only lm --lm-preset lm-pretrained   # from public pretraining
    python -m simulations.bench_privacy_utility --families vae --partitioners iid --epsilons 10 inf
    python -m simulations.bench_privacy_utility --families merf --rounds 1 --max-steps 1   # one release per site

Images: Fashion-MNIST over ``--sites`` sites (IID, or Dirichlet with ``data.dirichlet-alpha``),
site-level DP-SGD calibrated to each target epsilon at delta = 1e-5 (``inf`` = DP off), then
Inception FID of the final global model with ``--fid-n`` generated samples against as many
held-out real images (the FID is reported with its N). LM: Shakespeare by role, held-out
perplexity of the final model. Each job runs the same server loop, strategy and ClientApp as
``flwr run`` (``--transport local``: in one fresh process, whose CPU time is read exactly
from the kernel; ``--transport flwr``: through a real simulation, CPU time then summed over
every process the launch started, sampled). The compute budget of a job is fixed by its
settings (sites x rounds x local steps) and printed in CPU-minutes beside its result.

Published centralized DP results on Fashion-MNIST at epsilon = 10 (FID, lower is better) are
printed beside ours for reference: they are centralized, GPU-trained and differently tuned;
ours are federated and CPU-bound.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from simulations.benchlib import MACHINE, as_sets, load_note, parse_sets, save_png, thread_env
from simulations.launch import ROOT

PUBLISHED_FID_EPS10 = {"GS-WGAN": 131.3, "DP-MERF": 132.6, "DP-Sinkhorn": 128.3, "DPDM": 18.6}
IMAGE_PRESETS = {"vae": None, "gan": "gan-fashion", "merf": "merf-fashion"}  # None = the pyproject defaults


def _eps(text: str) -> float:
    return math.inf if text.lower() in ("inf", "infinity", "none") else float(text)


def job_overrides(family: str, partitioner: str | None, epsilon: float, args: argparse.Namespace) -> dict:
    rounds, steps = (args.lm_rounds, args.lm_max_steps) if family == "lm" else (args.rounds, args.max_steps)
    o: dict = {"run.num-rounds": rounds, "train.max-steps": steps, "run.seed": args.seed, "privacy.ledger-dir": "",
               "eval.every": rounds}  # the final model only
    if family != "lm":
        o.update({"data.partitioner": partitioner, "eval.fid-inception-n": args.fid_n, "eval.fid-inception-every": 0,
                  "eval.fid-domain-n": min(args.fid_n, 2000) or 200})
    if math.isinf(epsilon):
        o["privacy.enabled"] = False
    else:
        o.update({"privacy.enabled": True, "privacy.target-epsilon": epsilon, "privacy.delta": 1e-5})
    o.update(args.sets)
    return o


def run_job(preset: str | None, overrides: dict, sites: int, work: Path, transport: str, threads: int) -> dict:
    """One job; its final round record, wall time and CPU seconds."""
    env = {**os.environ, **thread_env(threads)}
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if transport == "local":
        spec = work / "local-job.json"
        spec.write_text(json.dumps({"preset": preset, "overrides": overrides, "num_nodes": sites,
                                    "run_dir": str(work / "run")}))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        code = subprocess.run([sys.executable, "-m", "simulations.benchlib", str(spec)], cwd=ROOT, env=env).returncode
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if code != 0:
            raise RuntimeError(f"the job failed (exit {code}): {overrides}")
        lines = (work / "run" / "rounds.jsonl").read_text().splitlines()
    else:
        from simulations.benchlib import run_flower

        res = run_flower(preset, overrides, sites, work, env=thread_env(threads))
        cpu = float("nan")  # Ray's processes are not our children; see --transport local
        lines = [json.dumps(r) for r in res["records"]]
    recs = [json.loads(line) for line in lines if line.strip()]
    return {"final": recs[-1], "wall_s": time.time() - t0, "cpu_s": cpu}


def quality(final: dict) -> tuple[str, float | None, float | None]:
    ev = final.get("eval") or {}
    for key in ("fid-inception", "perplexity", "fid-domain", "neg-elbo"):
        if ev.get(key) is not None:
            return key, ev[key], ev.get(f"{key}-n")
    return "-", None, None


def print_table(rows: list[dict]) -> None:
    print(f"{'family':<7}{'partition':<10}{'target eps':>11}{'reached':>9}{'metric':>15}{'value':>10}{'N':>7}"
          f"{'CPU-min':>9}{'wall-min':>9}  sites x rounds x steps")
    for r in rows:
        print(f"{r['family']:<7}{r['partition']:<10}{r['epsilon']:>11g}"
              f"{'-' if r['epsilon_reached'] is None else format(r['epsilon_reached'], '.2f'):>9}"
              f"{r['metric']:>15}{'-' if r['value'] is None else format(r['value'], _value_format(r)):>10}"
              f"{'-' if r['n'] is None else int(r['n']):>7}{_num(r.get('cpu_min')):>9}{_num(r.get('wall_min')):>9}"
              f"  {r['sites']} x {r['rounds']} x {r['max_steps']}{'  ' + r['note'] if r.get('note') else ''}"
              f"{'  next-token accuracy ' + format(r['accuracy'], '.4f') if r.get('accuracy') is not None else ''}"
              f"{'  preset ' + r['preset'] if r.get('preset') else ''}")


def _value_format(row: dict) -> str:
    return ".3f" if row["metric"] == "perplexity" else ".1f"


def _num(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, lm in zip(axes, (False, True)):
        groups: dict[str, list[dict]] = {}
        for r in rows:
            if (r["family"] == "lm") == lm and r["value"] is not None:  # a cell without a result has no point
                groups.setdefault(f"{r['family']} {r['partition']}", []).append(r)
        finite = [r["epsilon"] for g in groups.values() for r in g if math.isfinite(r["epsilon"])]
        x_inf = 2 * max(finite) if finite else 1.0
        for label, g in groups.items():
            g = sorted(g, key=lambda r: r["epsilon"])
            xs = [x_inf if math.isinf(r["epsilon"]) else r["epsilon"] for r in g]
            ax.plot(xs, [r["value"] for r in g], marker="o", label=label)
        if not lm and groups:
            ax.axhline(PUBLISHED_FID_EPS10["GS-WGAN"], color="grey", ls=":", label="GS-WGAN at eps 10 (central)")
        ax.set_xscale("log")
        ax.set_xlabel(f"epsilon (no DP plotted at {x_inf:g})")
        ax.set_ylabel("perplexity" if lm else "FID")
        ax.set_title("LM, Shakespeare by role" if lm else "images, Fashion-MNIST")
        if groups:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    save_png(fig, png)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["images", "lm", "all"], default="images")
    ap.add_argument("--families", nargs="+", default=["vae", "gan"], choices=sorted(IMAGE_PRESETS))
    ap.add_argument("--partitioners", nargs="+", default=["iid", "dirichlet"], choices=["iid", "dirichlet"])
    ap.add_argument("--epsilons", nargs="+", type=_eps, default=[1.0, 10.0, math.inf])
    ap.add_argument("--lm-epsilons", nargs="+", type=_eps, default=[3.0, 8.0, math.inf])
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--lm-sites", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-steps", type=int, default=40, help="local DP-SGD steps per site and round")
    ap.add_argument("--lm-rounds", type=int, default=10, help="the LM's rounds (its preset's)")
    ap.add_argument("--lm-max-steps", type=int, default=100, help="the LM's local steps per site and round")
    ap.add_argument("--lm-preset", default="lm-shakespeare",
                    help="the LM's preset (lm-pretrained: DP fine-tuning from public pretraining, README)")
    ap.add_argument("--fid-n", type=int, default=2000, help="Inception FID samples (and real images)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--transport", choices=["local", "flwr"], default="local")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (0 = torch's default)")
    ap.add_argument("--image-preset", default=None, help="replace the image presets (e.g. digits-quick for a smoke run)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--png", type=Path, default=ROOT / "docs" / "img" / "privacy_utility.png")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--keep-runs", type=Path, default=None, metavar="DIR",
                    help="copy every job's run folder (records, text samples or image grids, final model) here")
    ap.add_argument("--replot", nargs="+", type=Path, default=None, metavar="JSON",
                    help="run nothing: merge the rows of earlier --json files into one table and PNG")
    args = ap.parse_args(argv)
    args.sets = parse_sets(args.sets)
    if args.replot:
        rows = [r for path in args.replot for r in json.loads(path.read_text())["rows"]]
        for r in rows:
            r["epsilon"] = _eps(str(r["epsilon"]))
        plot(rows, args.png)
        print_table(rows)
        return {"rows": rows}

    jobs = []
    if args.only in ("images", "all"):
        for fam in args.families:
            for part in args.partitioners:
                for eps in args.epsilons:
                    jobs.append((fam, part, eps, args.image_preset or IMAGE_PRESETS[fam], args.sites))
    if args.only in ("lm", "all"):
        for eps in args.lm_epsilons:
            jobs.append(("lm", None, eps, args.lm_preset, args.lm_sites))

    rows, loads = [], []
    with tempfile.TemporaryDirectory(prefix="fedgen-pu-") as tmp:
        for i, (fam, part, eps, preset, sites) in enumerate(jobs):
            ov = job_overrides(fam, part, eps, args)
            if fam != "vae" and args.image_preset:  # the image preset replaces the family's own
                ov["task.family"] = fam
            print(f"[{i + 1}/{len(jobs)}] {fam} {part or 'roles'} eps={eps:g}: {as_sets(ov)}", flush=True)
            res = run_job(preset, ov, sites, Path(tmp) / f"job-{i}", args.transport, args.threads)
            loads.append(os.getloadavg()[0])
            if args.keep_runs:  # the run folder (records, samples, final model) outlives the temporary one
                kept = args.keep_runs / f"job-{i}-{fam}-{part or 'roles'}-eps{eps:g}"
                shutil.copytree(Path(tmp) / f"job-{i}", kept, dirs_exist_ok=True)
                print(f"kept: {kept}", flush=True)
            key, value, n = quality(res["final"])
            rows.append({"family": fam, "partition": part or "roles", "epsilon": eps, "metric": key, "value": value,
                         "n": n, "epsilon_reached": res["final"].get("epsilon_max"), "preset": preset,
                         "accuracy": (res["final"].get("eval") or {}).get("next-token-accuracy"),
                         "cpu_min": res["cpu_s"] / 60, "wall_min": res["wall_s"] / 60, "sites": sites,
                         "rounds": ov["run.num-rounds"], "max_steps": ov["train.max-steps"]})

    date = time.strftime("%Y-%m-%d")
    summary = {"machine": MACHINE, "date": date, "transport": args.transport, "rows": rows,
               "published_fid_eps10": PUBLISHED_FID_EPS10, "sets": args.sets, "loads": loads}
    if args.json:  # before the plot: what the jobs measured is kept even if drawing fails
        args.json.write_text(json.dumps(summary, indent=1, default=str))
    plot(rows, args.png)

    print(f"\nprivacy-utility: {MACHINE}, {date}, transport {args.transport}, seed {args.seed}, "
          f"{load_note(loads)}; PNG {args.png}")
    print("published centralized FID at eps 10: " + ", ".join(f"{k} {v}" for k, v in PUBLISHED_FID_EPS10.items()))
    print_table(rows)
    return summary


if __name__ == "__main__":
    main()
