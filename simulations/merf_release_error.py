"""How far a merf run's released class means are from the exact ones (an analyst's check).

    python -m simulations.merf_release_error RUN_DIR         # a finished merf run on Fashion-MNIST

Reads the run's final model, takes the class means and shares the server read from the
averaged release (``Release.class_means``), and compares them with the exact class means of
the same feature map over all of Fashion-MNIST's training images: the error the privacy noise
left. Only someone holding all the data can run it; the server cannot (it never sees the data).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common import records as R
from common.config import parse_run_config
from common.data.images import load_fashion_mnist
from common.dp_step import unwrap
from common.tasks import DataSpec, build_task
from flwr.app import ArrayRecord


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    args = ap.parse_args(argv)
    ckpt = torch.load(args.run_dir / "final_model.pt", weights_only=True)
    cfg = parse_run_config(ckpt["config"])
    if cfg.task.family != "merf" or cfg.data.dataset != "fashion-mnist":
        raise SystemExit(f"{args.run_dir} is a {cfg.task.family} run on {cfg.data.dataset}; this check reads a merf "
                         "run on fashion-mnist")
    task = build_task(cfg, DataSpec(**ckpt["data_spec"]))
    R.load_arrayrecord(task.modules, ArrayRecord(torch_state_dict=ckpt["state_dict"]))
    release = unwrap(task.modules["release"])
    means, shares = release.class_means()
    train = load_fashion_mnist(split="train")
    classes, dim = means.shape
    sums, counts = torch.zeros(classes, dim), torch.zeros(classes)
    with torch.no_grad():
        for x, y in zip(train.images.split(2000), train.labels.split(2000)):
            sums.index_add_(0, y.long(), release.features(x.float()))
            counts += torch.bincount(y.long(), minlength=classes).float()
    exact = sums / counts[:, None]
    out = {"error_norm": [float(e) for e in (means - exact).norm(dim=1)],
           "mean_norm": [float(e) for e in exact.norm(dim=1)],
           "share_error": [float(e) for e in (shares - counts / counts.sum()).abs()]}
    print("per-class error of the released mean (norm):", " ".join(f"{e:.4f}" for e in out["error_norm"]))
    print("per-class exact mean (norm):                ", " ".join(f"{e:.3f}" for e in out["mean_norm"]))
    print(f"largest error of a released class share: {max(out['share_error']):.4f}")
    return out


if __name__ == "__main__":
    main()
