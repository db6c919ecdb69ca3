"""How many real reference images an FID needs: real-vs-real against real-vs-noise, by size n.

    python -m simulations.bench_fid_reference                               # digits and Fashion-MNIST, domain
    python -m simulations.bench_fid_reference --datasets digits --inception-sizes 20 50 100 200
    python -m simulations.bench_fid_reference --json docs/fid_reference.json

For each data set and size n, ``--repeats`` times: two disjoint random sets of n real images
(A, the reference, and B) and n images of uniform noise. The domain extractor is trained on A
with A's labels, exactly as the server trains it on its held-out images
(``server.fid.domain_extractor``; a fresh cache folder, so nothing is reused), and
``server.fid.FIDScorer`` with A as the real statistics scores B (real-vs-real: what a perfect
generator would score) and the noise (real-vs-noise: what a useless one scores).

Inception (``--inception-sizes``, off by default: ~0.2-0.4 s per image on this CPU): the
pool's features (2 x max n real, max n noise) are computed once with
``server.fid.InceptionFeatures`` and every draw is scored by ``FIDScorer`` on those features
(a lookup extractor), so the repeats cost nothing more.

The table: median and maximum over the repeats of real-vs-real, the minimum of real-vs-noise,
and the worst ratio: the largest, over the repeats, of real-vs-real / real-vs-noise of one draw
(the same extractor and reference set for both: the scale of a domain extractor's features
changes with the images it was trained on, the ratio does not).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common.data.images import load_digits, load_fashion_mnist
from server.fid import FIDScorer, InceptionFeatures, _Frozen, domain_extractor

SIZES = (20, 50, 100, 200, 500)


def pool(dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The images to draw from: all 1,797 digits; Fashion-MNIST's 10,000 test images."""
    ds = load_digits() if dataset == "digits" else load_fashion_mnist(split="test")
    return ds.images, ds.labels


def draws(num: int, n: int, repeats: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``repeats`` pairs of disjoint index sets of size n out of ``num``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(repeats):
        perm = torch.randperm(num, generator=g)
        out.append((perm[:n], perm[n:2 * n]))
    return out


def domain_rows(dataset: str, sizes: list[int], repeats: int, seed: int) -> list[dict]:
    images, labels = pool(dataset)
    rows = []
    for n in sizes:
        rr, rn, secs = [], [], []
        for r, (a, b) in enumerate(draws(len(images), n, repeats, seed + n)):
            t = time.time()
            with tempfile.TemporaryDirectory() as cache:
                extractor = domain_extractor(images[a], labels[a], cache)
            scorer = FIDScorer(extractor)
            scorer.set_real(images[a])
            noise = torch.rand(n, *images.shape[1:], generator=torch.Generator().manual_seed(seed + 1000 * r + n))
            rr.append(scorer.score(images[b]))
            rn.append(scorer.score(noise))
            secs.append(time.time() - t)
        rows.append(summary(dataset, "domain", n, rr, rn, secs))
        print(line(rows[-1]), flush=True)
    return rows


class _Lookup(_Frozen):
    """'Images' that are row indices into precomputed features (the measurement's cache only)."""

    def __init__(self, features: torch.Tensor, name: str) -> None:
        super().__init__()
        self.features, self.name, self.num_features, self.cache_id = features, name, features.shape[1], name

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.features[idx.long().view(-1)]


def inception_rows(dataset: str, sizes: list[int], repeats: int, seed: int) -> list[dict]:
    images, _ = pool(dataset)
    top = max(sizes)
    g = torch.Generator().manual_seed(seed)
    real_idx = torch.randperm(len(images), generator=g)[:2 * top]
    noise = torch.rand(top, *images.shape[1:], generator=g)
    t = time.time()
    net = InceptionFeatures()
    feats = torch.cat([net(images[real_idx]), net(noise)])  # rows 0..2top-1 real, then noise
    print(f"{dataset} inception: features of {len(feats)} images in {time.time() - t:.0f}s", flush=True)
    scorer_ext = _Lookup(feats, "inception")
    rows = []
    for n in sizes:
        rr, rn = [], []
        for a, b in draws(2 * top, n, repeats, seed + n):
            scorer = FIDScorer(scorer_ext)
            scorer.set_real(a.view(-1, 1))
            rr.append(scorer.score(b.view(-1, 1)))
            rn.append(scorer.score((2 * top + torch.arange(n)).view(-1, 1)))
        rows.append(summary(dataset, "inception", n, rr, rn, []))
        print(line(rows[-1]), flush=True)
    return rows


def summary(dataset: str, extractor: str, n: int, rr: list[float], rn: list[float], secs: list[float]) -> dict:
    return {"dataset": dataset, "extractor": extractor, "n": n, "repeats": len(rr),
            "real_real": rr, "real_noise": rn,
            "real_real_median": statistics.median(rr), "real_real_max": max(rr),
            "real_noise_median": statistics.median(rn), "real_noise_min": min(rn),
            "worst_ratio": max(a / b for a, b in zip(rr, rn)), "seconds": sum(secs)}


def line(row: dict) -> str:
    return (f"{row['dataset']:>13} {row['extractor']:>9} n={row['n']:>4}: real-vs-real median "
            f"{row['real_real_median']:10.4g} max {row['real_real_max']:10.4g} | real-vs-noise min "
            f"{row['real_noise_min']:10.4g} | worst ratio {row['worst_ratio']:.3f}")


def table(rows: list[dict]) -> str:
    out = ["| data | extractor | n | real-vs-real, median | real-vs-real, max | real-vs-noise, min "
           "| worst draw: real-vs-real / real-vs-noise |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['dataset']} | {r['extractor']} | {r['n']:,} | {r['real_real_median']:.4g} | "
                   f"{r['real_real_max']:.4g} | {r['real_noise_min']:.4g} | "
                   f"{r['worst_ratio']:.3f} (1/{1 / r['worst_ratio']:.0f}) |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["digits", "fashion-mnist"], choices=["digits", "fashion-mnist"])
    p.add_argument("--sizes", nargs="*", type=int, default=list(SIZES), help="n for the domain extractor; none = skip")
    p.add_argument("--inception-sizes", nargs="*", type=int, default=[], help="n for Inception; none = skip")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="write every draw's numbers here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    for dataset in args.datasets:
        if args.sizes:
            rows += domain_rows(dataset, args.sizes, args.repeats, args.seed)
        if args.inception_sizes:
            rows += inception_rows(dataset, args.inception_sizes, args.repeats, args.seed)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v
                                                  for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
