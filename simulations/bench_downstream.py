"""Downstream accuracy: a small CNN trained only on synthetic labelled images, tested on real ones.

    fedgen generate RUN -n 10000 -o /tmp/synthetic.npz          # a class-conditional image run
    python -m simulations.bench_downstream /tmp/synthetic.npz     # Fashion-MNIST's test split
    python -m simulations.bench_downstream /tmp/synthetic.npz --real-train 10000 --json out.json

The papers' second metric for private image generators (GS-WGAN, DP-MERF, DPDM): train a
classifier on the generated data alone, report its accuracy on the real test set. Printed
beside it, the same CNN with the same recipe trained on as many real training images (the
ceiling a perfect generator would reach). One seed, fixed; CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.data.images import load_fashion_mnist


class SmallCNN(nn.Module):
    def __init__(self, channels: int, size: int, classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * (size // 4) ** 2, 128), nn.ReLU(), nn.Linear(128, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)


def train_and_test(x: torch.Tensor, y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                   epochs: int, seed: int) -> float:
    """Accuracy on (test_x, test_y) of the CNN trained on (x, y) with Adam; fixed seed."""
    torch.manual_seed(seed)
    classes = int(max(y.max(), test_y.max())) + 1
    net = SmallCNN(x.shape[1], x.shape[-1], classes)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x), generator=g).split(128):
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(b).argmax(1) for b in test_x.split(1000)])
    return float((pred == test_y).float().mean())


def load_synthetic(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(path) as npz:
        if "labels" not in npz:
            raise SystemExit(f"{path} has no labels: generate it from a class-conditional run (e.g. merf, or "
                             "gan.conditional = true)")
        images = torch.from_numpy(npz["images"]).float()
        labels = torch.from_numpy(npz["labels"]).long()
    if images.max() > 1.5:  # uint8 pixels
        images = images / 255.0
    if images.ndim == 3:
        images = images[:, None]
    elif images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):  # (N, H, W, C)
        images = images.permute(0, 3, 1, 2)
    return images, labels


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("synthetic", type=Path, help="a .npz written by `fedgen generate` (images and labels)")
    ap.add_argument("--real-train", type=int, default=None, help="real training images for the ceiling "
                    "(default: as many as the synthetic set; 0 skips it)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    x, y = load_synthetic(args.synthetic)
    test = load_fashion_mnist(split="test")
    test_x, test_y = test.images.float(), test.labels.long()
    if x.shape[1:] != test_x.shape[1:]:
        raise SystemExit(f"synthetic images are {tuple(x.shape[1:])}, Fashion-MNIST's are {tuple(test_x.shape[1:])}")
    out: dict = {"synthetic": str(args.synthetic), "n": len(x), "epochs": args.epochs, "seed": args.seed}
    t = time.time()
    out["synthetic_accuracy"] = train_and_test(x, y, test_x, test_y, epochs=args.epochs, seed=args.seed)
    out["synthetic_seconds"] = time.time() - t
    n_real = len(x) if args.real_train is None else args.real_train
    if n_real:
        train = load_fashion_mnist(split="train")
        idx = torch.randperm(len(train.images), generator=torch.Generator().manual_seed(args.seed))[:n_real]
        out["real_n"] = n_real
        out["real_accuracy"] = train_and_test(train.images[idx].float(), train.labels[idx].long(), test_x, test_y,
                                              epochs=args.epochs, seed=args.seed)
    print(f"CNN trained on {len(x)} synthetic images: test accuracy {out['synthetic_accuracy']:.3f}"
          + (f"   (same CNN on {n_real} real training images: {out['real_accuracy']:.3f})" if n_real else ""))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
