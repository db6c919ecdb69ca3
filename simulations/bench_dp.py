"""DP overhead: one local epoch with DP-SGD divided by the same epoch without DP.

    python -m simulations.bench_dp                         # VAE on Fashion-MNIST, one site's share
    python -m simulations.bench_dp --preset digits-quick --modes hooks ew --repeats 5

Both variants run in this one process, interleaved (DP, plain, DP, plain, ...), on the
same data, model and steps; the figure is the median of the per-pair ratios, so a
noisy machine slows both sides alike. Prints the table last.
"""

from __future__ import annotations

import argparse
import statistics
import time
import tomllib

import torch

from client.dp import make_private
from common import privacy
from common.config import parse_node_config, parse_run_config
from common.data.site import site_dataset
from common.tasks import build_task
from common.train import train_local
from simulations.launch import ROOT


def load_cfg(preset: str | None, overrides: dict):
    raw = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    if preset:
        raw.update(tomllib.loads((ROOT / "simulations" / f"{preset}.toml").read_text()))
    raw.update(overrides)
    return parse_run_config(raw)


def one_epoch(cfg, data, spec, dp_mode: str | None, steps: int) -> float:
    task = build_task(cfg, spec)
    optimizers = task.make_optimizers()
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.train.batch_size, shuffle=True)
    if dp_mode:
        q, _ = privacy.steps_per_round(len(data), cfg.train.batch_size, 1, 0)
        plan = privacy.DPPlan(1.0, q, steps, 1e-5, "rdp", cfg.privacy.max_grad_norm)
        loader = make_private(task, optimizers, loader, plan, [], dp_mode).loader
    t = time.perf_counter()
    train_local(task, loader, optimizers, steps)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset")
    ap.add_argument("--modes", nargs="+", default=["hooks", "ew", "functorch"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--num-partitions", type=int, default=10, help="the site holds 1/N of the data")
    ap.add_argument("--steps", type=int, default=0, help="steps per epoch (0 = a full epoch)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_cfg(args.preset, {})
    data, spec = site_dataset(cfg, parse_node_config({"partition-id": 0, "num-partitions": args.num_partitions}))
    _, full_steps = privacy.steps_per_round(len(data), cfg.train.batch_size, 1, 0)
    steps = args.steps or full_steps
    one_epoch(cfg, data, spec, None, 2)  # warm-up
    rows = []
    for mode in args.modes:
        try:
            one_epoch(cfg, data, spec, mode, 2)
        except Exception as err:  # a mode this model cannot use is reported, not fatal
            rows.append((mode, None, None, None, f"{type(err).__name__}: {str(err)[:80]}"))
            continue
        ratios, dp_t, plain_t = [], [], []
        for _ in range(args.repeats):
            d = one_epoch(cfg, data, spec, mode, steps)
            p = one_epoch(cfg, data, spec, None, steps)
            dp_t.append(d)
            plain_t.append(p)
            ratios.append(d / p)
        rows.append((mode, statistics.median(dp_t), statistics.median(plain_t), statistics.median(ratios), ""))
    print(f"\nDP overhead: {cfg.task.family} on {cfg.data.dataset}, {len(data)} records, batch "
          f"{cfg.train.batch_size}, {steps} steps/epoch, 1 thread, median of {args.repeats} interleaved pairs")
    print(f"{'mode':<10} {'DP s/epoch':>11} {'plain s/epoch':>14} {'ratio':>7}")
    for mode, d, p, r, note in rows:
        if r is None:
            print(f"{mode:<10} {'-':>11} {'-':>14} {'-':>7}  {note}")
        else:
            print(f"{mode:<10} {d:>11.3f} {p:>14.3f} {r:>7.2f}")


if __name__ == "__main__":
    main()
