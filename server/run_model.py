"""A run's trained model on disk: written at the end of a job, read back to draw samples.

``final_model.pt`` is self-describing (:func:`save_model`): the weights, the resolved config and
the data's shape, which together fix the architecture. :func:`load_run_model` rebuilds the task
from it, or from one round's checkpoint (``server.checkpoints``); :func:`draw` takes N samples
from it in batches, the classes balanced when the model is class-conditional. That is what
``fedgen generate`` writes, and what a reader of synthetic data (a downstream benchmark) can call
to get the same samples. Reading a model writes nothing into the run folder, and sampling is
post-processing of the DP-trained weights: it costs no privacy.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from common import atomic
from common import records as R
from common.config import AppConfig, ConfigError, parse_run_config
from common.tasks import DataSpec, GenerativeTask, build_task, pick_device
from server.checkpoints import CheckpointError, Checkpointer, config_differences
from server.store import RunStore, StoreError

__all__ = ["FINAL_MODEL", "Batch", "RunModel", "draw", "load_run_model", "npz_bytes", "read_model_file", "save_model"]

FINAL_MODEL = "final_model.pt"


def save_model(path: Path, arrays_state: dict[str, torch.Tensor], cfg: AppConfig, spec: DataSpec,
               extra: dict[str, Any] | None = None) -> None:
    """The final model, self-describing: weights, the resolved config and the data's shape
    (together they fix the architecture: ``build_task(parse_run_config(config),
    DataSpec(**data_spec))``), the tokenizer's name for the LM, and the library versions. Plain
    tensors and scalars only (``torch.load(..., weights_only=True)``), written atomically.
    ``extra``: more plain entries (a pretrained model's provenance, ``server.init_model``)."""
    from importlib.metadata import version  # opacus' version without importing it (seconds)

    meta = {"family": cfg.task.family, "config_hash": cfg.config_hash(), "config": cfg.to_flat(),
            "data_spec": dataclasses.asdict(spec),
            "versions": {name: version(name) for name in ("torch", "flwr", "opacus", "fedgen")}}
    if cfg.task.family == "lm":
        meta["tokenizer"] = cfg.lm.tokenizer
    atomic.torch_save({"state_dict": arrays_state, **meta, **(extra or {})}, path)


@dataclass
class RunModel:
    """A run's model rebuilt as a task with its trained weights."""

    task: GenerativeTask
    cfg: AppConfig
    path: Path  # the file the weights came from
    round: int | None  # the checkpoint's round; None for the final model

    @property
    def source(self) -> str:
        return "final model" if self.round is None else f"round {self.round}"


def read_model_file(path: Path) -> dict[str, Any]:
    """A fedgen model file's contents (``save_model``), checked for its parts and their types."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged or foreign file: torch raises several kinds
        raise StoreError(f"cannot read {path}: {type(err).__name__}: {err}") from None
    missing = [k for k in ("state_dict", "config", "data_spec") if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise StoreError(f"{path} is not a fedgen final model (no {', '.join(missing)})")
    bad = [k for k in ("state_dict", "config", "data_spec") if not isinstance(saved[k], dict)]
    if bad or not all(isinstance(v, torch.Tensor) for v in saved["state_dict"].values()):
        raise StoreError(f"{path} is not a fedgen final model ({', '.join(bad) or 'state_dict'} malformed)")
    return saved


def _no_final_model(run_dir: Path, checkpoints: list[int]) -> StoreError:
    """Why the run has no final model, and what it has instead."""
    why = ""
    try:
        with RunStore.open(run_dir) as store:
            info = store.run_info()
        config = info.get("config") or {}
        if config.get("audit.user-canaries"):
            why = ": an audit run's model holds its canaries and is never saved"
        why += f" (status {info['status']}{': ' + info['status_reason'] if info.get('status_reason') else ''}" \
               f"; {info['rounds_done']}/{info['num_rounds']} rounds recorded)"
    except StoreError:
        pass
    if checkpoints:
        rounds = f"rounds {', '.join(map(str, checkpoints))}" if len(checkpoints) > 1 else f"round {checkpoints[0]}"
        instead = f"; it has checkpoints of {rounds}: use --round {checkpoints[-1]} for the latest"
    else:
        instead = "; it has no checkpoints either"
    return StoreError(f"run {run_dir.name} has no {FINAL_MODEL}{why}{instead}")


def _parse(config: dict[str, Any], where: Path) -> AppConfig:
    try:
        return parse_run_config(config)
    except ConfigError as err:
        raise StoreError(f"the config saved in {where} does not parse with this fedgen: {err}") from None


def _checkpoint_spec(run_dir: Path, config: dict[str, Any], cfg: AppConfig) -> DataSpec:
    """The data spec of a checkpoint written before checkpoints carried it: the final model's
    when it was made with the same settings, else the run's held-out data's, as the server had it."""
    final = run_dir / FINAL_MODEL
    if final.is_file():
        model = read_model_file(final)
        if not config_differences(model["config"], config):
            return DataSpec(**model["data_spec"])
    from common.data.site import eval_dataset  # reads the dataset the run was evaluated on

    return eval_dataset(cfg)[1]


def load_run_model(run_dir: Path, round_: int | None = None, device: torch.device | None = None) -> RunModel:
    """The run's final model (``round_`` None) or its checkpoint of round ``round_``, as a task
    on ``device`` (default: CUDA when there is one, else the CPU). StoreError names what the run
    has when the asked-for model is not there."""
    device = device or pick_device("auto")
    checkpointer = Checkpointer(run_dir, keep=1)  # keep only matters when saving
    if round_ is None:
        path = run_dir / FINAL_MODEL
        if not path.is_file():
            raise _no_final_model(run_dir, checkpointer.rounds())
        saved = read_model_file(path)
        cfg, spec = _parse(saved["config"], path), DataSpec(**saved["data_spec"])
        arrays = ArrayRecord(torch_state_dict=saved["state_dict"])
    else:
        try:
            ckpt = checkpointer.load(round_)
        except CheckpointError as err:
            raise StoreError(f"run {run_dir.name}: {err}") from None
        path, arrays = ckpt.path, ckpt.arrays
        config = ckpt.config or json.loads((run_dir / "config.json").read_text())
        cfg = _parse(config, path)
        spec = DataSpec(**ckpt.data_spec) if ckpt.data_spec else _checkpoint_spec(run_dir, config, cfg)
    task = build_task(cfg, spec, device)
    try:
        R.load_arrayrecord(task.modules, arrays)
    except ValueError as err:
        raise StoreError(f"the weights in {path} do not fit the model its config describes: {err}") from None
    return RunModel(task, cfg, path, round_)


@dataclass
class Batch:
    """Samples ``start`` to ``start + len(samples)`` of a draw: images as uint8 (n, C, H, W) or texts,
    and their class labels (int64, ``None`` when the model is unconditional)."""

    start: int
    samples: np.ndarray | list[str]
    labels: np.ndarray | None


def batch_seeds(seed: int, batches: int) -> list[int]:
    """The seed of each batch: ``seed`` itself for the first (so one batch is ``sample(n, seed)``),
    then seeds derived from it."""
    derived = np.random.SeedSequence(seed).generate_state(max(batches - 1, 0), np.uint64)
    return [seed, *(int(s) for s in derived)]


def balanced_labels(n: int, num_classes: int) -> torch.Tensor | None:
    """Classes in turn, ``0, 1, ..., K-1, 0, ...``: each class n // K or n // K + 1 times; None when unconditional."""
    return torch.arange(n) % num_classes if num_classes else None


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [0, 1] -> uint8 0..255 (rounded), as a PNG or an 8-bit array stores them."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def npz_bytes(batches: list[Batch]) -> bytes:
    """Drawn image batches as one compressed ``.npz``: ``images`` (N, C, H, W) uint8 and, when
    the model is class-conditional, ``labels`` (what ``fedgen generate -o FILE.npz`` writes)."""
    import io

    arrays = {"images": np.concatenate([b.samples for b in batches])}
    if batches and batches[0].labels is not None:
        arrays["labels"] = np.concatenate([b.labels for b in batches])
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def draw(task: GenerativeTask, n: int, seed: int, batch_size: int) -> Iterator[Batch]:
    """n samples of ``task`` in batches of at most ``batch_size`` (memory stays bounded), through the
    family's ``sample`` only; a class-conditional model draws the classes in turn (balanced). The
    same (seed, batch_size) give the same samples."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"draw needs n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    labels = balanced_labels(n, task.num_classes)
    starts = range(0, n, batch_size)
    for start, seed_i in zip(starts, batch_seeds(seed, len(starts))):
        stop = min(n, start + batch_size)
        part = labels[start:stop] if labels is not None else None
        out = task.sample(stop - start, seed_i, labels=part)
        samples = to_uint8(out) if isinstance(out, torch.Tensor) else list(out)
        yield Batch(start, samples, part.numpy() if part is not None else None)
