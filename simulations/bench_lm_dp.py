"""Per-step cost of DP-SGD for the language model: Opacus grad-sample modes vs no DP.

Runs the LM task's own ``train_step`` on random token windows, with each mode's model and
optimizer built once, and times the modes *interleaved* (none, hooks, ew, functorch, none,
...) so that load from other processes hits them alike, rotating the order every repeat;
reports the median over repeats.

    python -m simulations.bench_lm_dp                # batch 16, context 32, default lm.* sizes
    python -m simulations.bench_lm_dp --batch 32 --context 64 --layers 4 --width 128
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings

import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from common.config import parse_run_config
from common.data.text import make_tokenizer
from common.tasks import DataSpec, GenerativeTask, build_task

log = logging.getLogger("simulations.bench_lm_dp")

MODES = ("none", "hooks", "ew", "functorch")
VOCAB = make_tokenizer("char").vocab_size


def _setup(mode: str, args: argparse.Namespace, data: TensorDataset) -> tuple[GenerativeTask, dict, DataLoader]:
    cfg = parse_run_config({"task.family": "lm", "data.dataset": "shakespeare", "lm.layers": args.layers,
                            "lm.heads": args.heads, "lm.width": args.width, "lm.context": args.context})
    task = build_task(cfg, DataSpec(kind="text", vocab_size=VOCAB))
    optimizers = task.make_optimizers()
    loader = DataLoader(data, batch_size=args.batch, shuffle=True, drop_last=True)
    if mode != "none":
        engine = PrivacyEngine()
        module, opt, loader = engine.make_private(module=task.modules["lm"], optimizer=optimizers["lm"],
                                                  data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                                                  poisson_sampling=False, grad_sample_mode=mode)
        task.modules["lm"], optimizers["lm"] = module, opt
    return task, optimizers, loader


def _time(task: GenerativeTask, optimizers: dict, batches: list, steps: int) -> float:
    t = time.perf_counter()
    for i in range(steps):
        task.train_step(batches[i % len(batches)], optimizers)
    return (time.perf_counter() - t) / steps * 1000.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    modes = args.modes.split(",")

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, VOCAB, (args.batch * 8, args.context + 1), generator=g)
    data = TensorDataset(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    runs = {}
    for mode in modes:
        task, optimizers, loader = _setup(mode, args, data)
        batches = list(loader)
        _time(task, optimizers, batches, 3)  # warm-up
        runs[mode] = (task, optimizers, batches)

    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.repeats):
        for mode in modes[r % len(modes):] + modes[: r % len(modes)]:  # rotate: no mode always runs first
            times[mode].append(_time(*runs[mode], args.steps))

    base = statistics.median(times["none"]) if "none" in times else float("nan")
    log.info("LM %d layers, width %d, %d heads; batch %d, context %d; %d thread(s); median of %d x %d steps",
             args.layers, args.width, args.heads, args.batch, args.context, args.threads, args.repeats, args.steps)
    log.info("%-10s %10s %10s", "mode", "ms/step", "vs no-DP")
    for mode in modes:
        ms = statistics.median(times[mode])
        log.info("%-10s %10.1f %9.2fx", mode, ms, ms / base)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
