"""Inception FID against CPU time for ``merf``: what more server training buys (issue 19's curve).

    python -m simulations.bench_merf_curve                                    # merf-fashion, 10 IID sites
    python -m simulations.bench_merf_curve --steps 500 1000 --set merf.width=64 --out /tmp/w64.json
    python -m simulations.bench_merf_curve --preset merf-digits --num-sites 3 --steps 20 40 --inception-n 0
    python -m simulations.bench_merf_curve --replot a.json b.json --png curve.png   # plot earlier runs together

Everything runs in this one process on one torch thread, and CPU seconds are this process's own
(``time.process_time``), so a second job on the other core does not inflate them:

1. **The release**: the preset's federation run in this process (``benchlib.LocalGrid``: the
   ClientApp, the round loop, the strategy and the ledgers of a ``flwr run``, without the
   transport), with the server's generator training off (``merf.generator-steps`` 0) and no
   FID. Its CPU time covers every site's release and what the job does around it in this
   process (the ClientApp's imports, the server's setup and its feature-distance evaluations,
   the public feature fit when its cache is cold); its epsilon is the round record's, as the
   launcher prints it. One round only (``run.num-rounds`` 1, as the merf presets): with more,
   a job trains the generator after every round, which this bench does not reproduce.
2. **The generator's training at the server** on that release, exactly ``MERFTask.server_update``
   planned for the largest ``--steps``: under the preset's ``merf.generator-schedule``
   (constant by default: a snapshot is then what a job planned to stop there would train, up
   to the random draws; ``cosine`` spans the whole plan). At
   every ``--steps`` value the generator is scored as the server's last evaluation scores it
   (``ImageFID``: Inception and domain FID at the preset's N against the held-out images, the
   same latents), a sample grid is saved, and the evaluation's CPU time is left out of the
   training's.

Under the cosine schedule a point before the last is a snapshot of the longer run, taken before
its learning rate has annealed: not what a job planned to stop at that many steps would score (measured on
merf-fashion at 3,000 steps: a snapshot of a 6,500-step plan scored better than the 3,000-step
plan, docs/RESULTS.md). The printed crossing of ``--target`` is linear between the two points
around it (on CPU minutes of training: the release plus the generator's steps). Sampling and
scoring are post-processing: no privacy cost.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from simulations.benchlib import LocalGrid, load_run_config, parse_sets

GATE = 131.3  # GS-WGAN's published FID at epsilon 10 (centralized): the "point where it crosses 131.3"


def note(msg: str) -> None:
    """Progress on stderr (stdout ends with the table)."""
    print(f"bench_merf_curve: {msg}", file=sys.stderr, flush=True)


def crossing(points: list[dict], target: float) -> float | None:
    """Training CPU minutes at which the Inception FID first falls below ``target``, linear between
    the two points around it; when the first scored point is already below, its own minutes
    (nothing earlier was scored); None when no point is below it."""
    prev = None
    for p in points:
        fid = p.get("fid_inception")
        if fid is None:
            continue
        if fid < target:
            if prev is None:
                return p["train_cpu_min"]
            x0, y0, x1, y1 = prev["train_cpu_min"], prev["fid_inception"], p["train_cpu_min"], fid
            return x0 + (y0 - target) * (x1 - x0) / (y0 - y1)
        prev = p
    return None


def release(run_config: dict, num_sites: int, work: Path) -> tuple[object, dict]:
    """The sites' release through the round loop (generator untrained); (arrays, its record)."""
    from common.config import parse_run_config
    from server.evaluation import Evaluator
    from server.rounds import run_rounds
    from server.strategy import build_strategy

    cfg = parse_run_config(run_config)
    random.seed(cfg.run.seed)  # as the job seeds it (server/job.py): site sampling, then
    torch.manual_seed(cfg.run.seed)  # the generator's initial weights
    records: list[dict] = []
    arrays: dict[int, object] = {}
    outcome = run_rounds(LocalGrid(run_config, num_sites), cfg, build_strategy(cfg), Evaluator(cfg),
                         records.append, work, on_round_end=lambda rnd, a: arrays.__setitem__(rnd, a))
    if outcome.status != "completed" or not arrays:
        raise SystemExit(f"the release did not complete: {outcome.status}: {outcome.reason}")
    last = max(arrays)
    rec = next(r for r in reversed(records) if r.get("round") == last)
    return arrays[last], rec


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="merf-fashion")
    ap.add_argument("--num-sites", type=int, default=10)
    ap.add_argument("--steps", type=int, nargs="+", default=[250, 500, 1000, 2000, 3000, 4500, 6000],
                    help="generator steps at which to score (the schedule is planned for the largest)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override")
    ap.add_argument("--inception-n", type=int, default=None, help="override eval.fid-inception-n (0: domain only)")
    ap.add_argument("--inception-at", type=int, nargs="+", default=None, metavar="STEPS",
                    help="score Inception FID at these of --steps only (default: all; it costs minutes a point "
                    "on one thread, the domain FID a second)")
    ap.add_argument("--target", type=float, default=GATE, help="Inception FID whose crossing is reported")
    ap.add_argument("--out", type=Path, default=None, help="JSON results (and grids beside it)")
    ap.add_argument("--png", type=Path, default=None, help="plot Inception FID against training CPU minutes")
    ap.add_argument("--replot", type=Path, nargs="+", default=None, metavar="JSON",
                    help="plot these earlier results together (with --png) and run nothing")
    ap.add_argument("--synthetic", type=int, default=0, metavar="N",
                    help="also write the last generator's model (OUT-model/final_model.pt) and N labelled samples "
                    "(OUT-synthetic.npz, as `fedgen generate -n N` writes them) for bench_downstream")
    args = ap.parse_args(argv)
    if args.replot:
        results = [json.loads(path.read_text()) for path in args.replot]
        for result in results:
            _print(result)
        if args.png:
            plot(results, args.png, args.target)
        return {"results": results}
    steps = sorted(set(args.steps))
    if steps[0] < 1:
        ap.error("--steps must be positive")
    if args.inception_at is not None and not set(args.inception_at) <= set(steps):
        ap.error(f"--inception-at {sorted(set(args.inception_at) - set(steps))}: not among --steps")

    from common import records as R
    from common.config import parse_run_config
    from common.logs import setup_logging
    from server.evaluation import SAMPLE_SEED, Evaluator, save_grid

    setup_logging()
    torch.set_num_threads(1)
    _commit()  # cached: the code this process runs, read now rather than when the hour is over
    overrides = parse_sets(args.set)
    if args.inception_n is not None:
        overrides["eval.fid-inception-n"] = args.inception_n
    # Planned for the largest --steps; the bench itself says when Inception FID is scored (--inception-at).
    base = load_run_config(args.preset, {**overrides, "merf.generator-steps": steps[-1], "eval.fid-inception-every": 0})
    work = Path(tempfile.mkdtemp(prefix="merf-curve-run-"))
    if not base.get("privacy.ledger-dir"):  # a fresh ledger per site, as the launcher gives a simulation
        base["privacy.ledger-dir"] = str(work / ".site-ledgers")
    cfg = parse_run_config(base)  # a wrong preset or key fails here, before minutes of release
    if cfg.task.family != "merf" or cfg.run.num_rounds != 1:
        ap.error(f"the curve is of merf's one-round release (task.family merf, run.num-rounds 1); the run config "
                 f"has task.family {cfg.task.family}, run.num-rounds {cfg.run.num_rounds}")
    out = args.out or Path(tempfile.mkdtemp(prefix="merf-curve-")) / "curve.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    # 1. The release, timed on this process's CPU clock.
    quiet = {**base, "merf.generator-steps": 0, "eval.fid-domain-n": 0, "eval.fid-inception-n": 0}
    c0, w0 = time.process_time(), time.time()
    arrays, rec = release(quiet, args.num_sites, work)
    release_cpu, release_wall = time.process_time() - c0, time.time() - w0
    note(f"release: {args.num_sites} sites, epsilon {rec.get('epsilon_max')}, {release_cpu:.0f} CPU-s "
         f"({release_wall:.0f} s wall)")

    # 2. The generator, planned for the largest step count, scored at each.
    evaluator = Evaluator(cfg)  # the held-out images and the FID extractors the server uses
    task = evaluator.task
    R.load_arrayrecord(task.modules, arrays)
    points: list[dict] = []
    eval_cpu = 0.0
    train_start = time.process_time()

    def snapshot(done: int) -> None:
        nonlocal eval_cpu
        if done not in steps:
            return
        c = time.process_time()
        gen_cpu = c - train_start - eval_cpu
        t = time.time()
        # The last round's evaluation scores Inception FID; an earlier round's only the domain FID.
        due = args.inception_at is None or done in args.inception_at
        fids = evaluator.fid.evaluate(task.sample, cfg.run.num_rounds if due else 0)
        save_grid(task.sample(cfg.eval.num_samples, SAMPLE_SEED), out.with_name(f"{out.stem}-{done}.png"))
        eval_cpu += time.process_time() - c
        point = {"steps": done, "generator_cpu_s": round(gen_cpu, 1),
                 "train_cpu_min": round((release_cpu + gen_cpu) / 60, 2),
                 "fid_inception": fids.get("fid-inception"), "fid_domain": fids.get("fid-domain", fids.get("fid-domain-ae")),
                 "eval_wall_s": round(time.time() - t, 1)}
        points.append(point)
        note(f"snapshot {point}")
        _write(out, args, base, rec, release_cpu, release_wall, points)

    task.train_generator(after_step=snapshot)
    if not points:
        raise SystemExit(f"nothing was released (epsilon {rec.get('epsilon_max')}; did every site refuse?): "
                         "the generator had nothing to train on")
    result = _write(out, args, base, rec, release_cpu, release_wall, points)
    if args.synthetic:
        _save_synthetic(out, task, cfg, evaluator.spec, args.synthetic)
    _print(result)
    if args.png:
        plot([result], args.png, args.target)
    return result


def plot(results: list[dict], png: Path, target: float) -> None:
    """Inception FID against training CPU minutes, one line per result, beside the issue's marks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from simulations.benchlib import save_png

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in results:
        pts = [p for p in r["points"] if p.get("fid_inception") is not None]
        # The learning-rate schedule first: results from before merf.generator-schedule existed were cosine.
        label = f"{r['config'].get('merf.generator-schedule', 'cosine')} rate"
        extra = {k: v for k, v in r["overrides"].items() if k != "merf.generator-schedule" and v}
        label += "".join(f", {k}={v}" for k, v in extra.items())
        label += f", {r.get('planned_steps', r['config'].get('merf.generator-steps'))} steps planned"
        ax.plot([p["train_cpu_min"] for p in pts], [p["fid_inception"] for p in pts], marker="o", label=label)
    ax.axhline(target, color="grey", ls=":", label=f"{target:g} (GS-WGAN at eps 10, central)")
    ax.axhline(100, color="black", ls="--", lw=0.8, label="issue 19's target: 100")
    ax.axvline(60, color="black", ls="-.", lw=0.8, label="one CPU-hour")
    ax.set_xlabel("training CPU minutes (sites' release + server's generator)")
    ax.set_ylabel("Inception FID, N = 2,000")
    ax.legend(fontsize=6)
    fig.tight_layout()
    save_png(fig, png)


def _save_synthetic(out: Path, task, cfg, spec, n: int) -> None:  # noqa: ANN001 - a MERFTask, AppConfig, DataSpec
    """The trained model as a run's final model, and n samples drawn as ``fedgen generate`` draws them."""
    from common import atomic
    from common import records as R
    from server.run_model import FINAL_MODEL, draw, npz_bytes, save_model

    model = out.with_name(f"{out.stem}-model") / FINAL_MODEL
    model.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, dict(R.to_arrayrecord(task.modules).to_torch_state_dict()), cfg, spec)
    synthetic = out.with_name(f"{out.stem}-synthetic.npz")
    atomic.write_bytes(synthetic, npz_bytes(list(draw(task, n, seed=0, batch_size=256))))
    note(f"model {model} and {n} samples {synthetic} written")


def _write(out: Path, args: argparse.Namespace, base: dict, rec: dict, release_cpu: float, release_wall: float,
           points: list[dict]) -> dict:
    """The results so far, rewritten after every point (an interrupted run keeps what it measured)."""
    from common import atomic

    result = {"preset": args.preset, "num_sites": args.num_sites, "overrides": parse_sets(args.set),
              "planned_steps": base["merf.generator-steps"], "commit": _commit(),
              "config": {k: v for k, v in base.items() if k.startswith(("merf.", "privacy.target", "eval.fid"))},
              "epsilon_max": rec.get("epsilon_max"), "release_cpu_s": round(release_cpu, 1),
              "release_wall_s": round(release_wall, 1), "threads": torch.get_num_threads(),
              "points": points, "target": args.target, "crossing_cpu_min": crossing(points, args.target)}
    atomic.write_bytes(out, (json.dumps(result, indent=1) + "\n").encode())
    return result


@functools.lru_cache(maxsize=1)
def _commit() -> str | None:
    """The checkout's commit, with "+dirty" when its tracked files differ from it (None outside git)."""
    import subprocess

    from simulations.launch import ROOT

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def _print(result: dict) -> None:
    print(f"\nmerf: {result['num_sites']} sites, epsilon {result['epsilon_max']}, release "
          f"{result['release_cpu_s']:.0f} CPU-s; {result['overrides'] or 'preset defaults'}")
    print("| generator steps | generator CPU-s | training CPU-min (release + generator) | Inception FID | domain FID |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for p in result["points"]:
        fi = "-" if p["fid_inception"] is None else f"{p['fid_inception']:.1f}"
        fd = "-" if p["fid_domain"] is None else f"{p['fid_domain']:.1f}"
        print(f"| {p['steps']:,} | {p['generator_cpu_s']:.0f} | {p['train_cpu_min']:.1f} | {fi} | {fd} |")
    x = result["crossing_cpu_min"]
    scored = [p["train_cpu_min"] for p in result["points"] if p["fid_inception"] is not None]
    if x is None:
        when = "not reached at any point"
    elif x == scored[0]:
        when = f"already at the first scored point ({x:.1f} CPU-minutes of training)"
    else:
        when = f"from about {x:.1f} CPU-minutes of training (linear between the points around it)"
    print(f"Inception FID below {result['target']:g}: {when}")


if __name__ == "__main__":
    main()
