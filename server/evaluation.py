"""Server-side evaluation of the global model on held-out data, and sample artefacts."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord
from PIL import Image

from common import records as R
from common.config import AppConfig, ConfigError
from common.data.site import eval_dataset
from common.tasks import GenerativeTask, build_task, pick_device
from common.train import check_trainable
from server.fid import ImageFID
from server.init_model import load_init_model

#: Between two text samples in a samples file (the round's samples, and ``fedgen generate``'s .txt).
TEXT_SEPARATOR = "\n\n---\n\n"

log = logging.getLogger(__name__)

SAMPLE_SEED = 1234  # the same latents every round, so sample grids are comparable


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> one uint8 grid image (H', W') or (H', W', 3)."""
    n, c, h, w = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    grid = np.ones((c, ncol * (h + pad) + pad, nrow * (w + pad) + pad), dtype=np.float32)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y : y + h, x : x + w] = images[i].clamp(0, 1).numpy()
    out = (grid * 255).round().astype(np.uint8)
    return out[0] if c == 1 else out.transpose(1, 2, 0)


def held_out_source(cfg: AppConfig) -> str:
    """Where the server's held-out data comes from, for its log (common/data/site.py:eval_dataset)."""
    d = cfg.data
    if d.eval_path:
        return f"all of data.eval-path = {d.eval_path}, at most data.eval-max-examples = {d.eval_max_examples}"
    if d.dataset in ("image-folder", "text-folder"):
        return (f"the 20% of data.path = {d.path} held out from the simulated sites; a folder of the server's own, "
                "all of it held-out data, goes in data.eval-path")
    return {"digits": "the 20% of sklearn's digits held out from the sites", "fashion-mnist": "the test split",
            "shakespeare": "the held-out plays"}.get(d.dataset, "the dataset's held-out split")


def save_grid(images: torch.Tensor, path: Path) -> Path:
    """``images`` as one grid PNG at ``path``, enlarged 4x when small so a person can see them."""
    grid = image_grid(images)
    img = Image.fromarray(grid)
    if grid.shape[0] < 128:
        img = img.resize((img.width * 4, img.height * 4), Image.NEAREST)
    img.save(path)
    return path


class Evaluator:
    """Holds the held-out data and a task to load global weights into; built once per run."""

    def __init__(self, cfg: AppConfig) -> None:
        self.cfg = cfg
        self.device = pick_device(cfg.run.device)
        data, self.spec = eval_dataset(cfg)
        self.loader = torch.utils.data.DataLoader(data, batch_size=cfg.eval.batch_size)
        self.task: GenerativeTask = build_task(cfg, self.spec, self.device)
        try:  # a prefix that selects nothing is refused here, before round 1, not at every site
            check_trainable(self.task, cfg.train.trainable_prefixes)
        except ValueError as err:
            raise ConfigError([str(err)]) from None
        if cfg.task.init_from:  # round 1 starts from the model file (checked: ConfigError otherwise)
            digest = load_init_model(cfg, self.task, self.spec)
            log.info("initial model: %s (sha256 %s)", cfg.task.init_from, digest)
        self._baseline_done = False
        self.fid = self._image_fid(data) if self.spec.kind == "image" else None
        self._evaluations = 0
        log.info("server evaluation on %d held-out examples (%s)", len(data), held_out_source(cfg))

    def _image_fid(self, data: torch.utils.data.Dataset) -> ImageFID:
        """FID for every image model, against the held-out images (labels train the domain extractor)."""
        images, labels = data.tensors  # image held-out sets are TensorDatasets (images, labels)
        e = self.cfg.eval
        return ImageFID(images, labels if self.spec.num_classes else None, self.cfg.run.num_rounds,
                        e.fid_domain_n, e.fid_inception_n, e.fid_inception_every, e.cache_dir, e.batch_size,
                        self.device, min_reference=e.fid_min_reference)

    @property
    def notes(self) -> list[str]:
        """Why a metric this run would report is not computed (an FID refused for too few reference
        images), for every round record (``eval_notes``); empty when nothing is refused."""
        return list(self.fid.notes) if self.fid is not None else []

    def _scheduled_round(self) -> int:
        """The round being evaluated when the caller does not say: the n-th evaluation of
        ``server.rounds.run_rounds``' schedule (round 0, every ``eval.every``-th round, the last)."""
        n, every = self.cfg.run.num_rounds, self.cfg.eval.every
        schedule = [0] + [r for r in range(1, n + 1) if r % every == 0 or r == n]
        return schedule[min(self._evaluations, len(schedule) - 1)]

    def initial_arrays(self) -> ArrayRecord:
        return R.to_arrayrecord(self.task.modules)

    def server_update(self, arrays: ArrayRecord) -> tuple[ArrayRecord, dict[str, float]]:
        """The family's training at the server after a round's aggregation (its optional
        ``server_update()``, e.g. merf's generator): post-processing of the sites' DP outputs,
        no private data. Returns the weights the run continues from, and its metrics."""
        update = getattr(self.task, "server_update", None)
        if update is None:
            return arrays, {}
        R.load_arrayrecord(self.task.modules, arrays)
        t = time.time()
        metrics = dict(update())
        metrics["server-train-seconds"] = time.time() - t
        return R.to_arrayrecord(self.task.modules), metrics

    def evaluate(self, arrays: ArrayRecord, server_round: int | None = None) -> dict[str, float]:
        R.load_arrayrecord(self.task.modules, arrays)
        metrics = self.task.evaluate(self.loader)
        if self.fid is not None:
            rnd = self._scheduled_round() if server_round is None else server_round
            metrics.update(self.fid.evaluate(self.task.sample, rnd))
        self._evaluations += 1
        baseline = getattr(self.task, "baseline_metrics", None)
        if baseline is not None and not self._baseline_done:
            # A reference point reported with the first evaluation (round 0), e.g. the LM's
            # unigram-perplexity: what a model that learned nothing from context scores.
            metrics.update(baseline(self.loader))
            self._baseline_done = True
        return metrics

    def save_samples(self, arrays: ArrayRecord, path: Path) -> Path:
        R.load_arrayrecord(self.task.modules, arrays)
        samples = self.task.sample(self.cfg.eval.num_samples, SAMPLE_SEED)
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(samples, torch.Tensor):
            path = save_grid(samples, path.with_suffix(".png"))
        else:
            path = path.with_suffix(".txt")
            path.write_text(TEXT_SEPARATOR.join(samples))
        return path
