"""Server checkpoints: written atomically after every completed round, verified on load.

A checkpoint holds plain tensors and Python scalars only, so it loads with
``torch.load(..., weights_only=True)``: the global weights of every module, the
strategy's server-side state (FedAdam/FedYogi moments, FedAvgM momentum, the user-level
DP accountant and its noise RNG), the round, RNG states, the resolved config with its
hash and the data's shape (``data_spec``; with the config it fixes the architecture, as in
the final model; absent from checkpoints written before it was added). ``checkpoints/index.json``
(rewritten atomically after each checkpoint) lists the files with their SHA-256; a file that is
missing, truncated or fails its digest is skipped in favour of the previous one when resuming
(:meth:`Checkpointer.latest`), and named in the error when asked for by round
(:meth:`Checkpointer.load`, which leaves the RNGs alone).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy

from common.atomic import write_bytes
from common.config import RESUME_ONLY_RUN_FIELDS, AppConfig
from common.tasks import DataSpec
from server.central_dp import UserLevelDP
from server.strategy import state_attributes

log = logging.getLogger(__name__)

VERSION = 1
# Keys that may differ between a crashed run and its resumption.
RESUME_KEYS = {"run.num-rounds", *(f"run.{name.replace('_', '-')}" for name in RESUME_ONLY_RUN_FIELDS)}


class CheckpointError(RuntimeError):
    pass


def _np_tree_to_torch(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, dict):
        return {k: _np_tree_to_torch(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_np_tree_to_torch(v) for v in value]
    return value


def _torch_tree_to_np(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, dict):
        return {k: _torch_tree_to_np(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_torch_tree_to_np(v) for v in value]
    return value


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """Server-side state of a strategy: what ``server/strategy.py`` declares for it, and our DP wrapper's."""
    state: dict[str, Any] = {}
    if isinstance(strategy, UserLevelDP):
        state["user_dp"] = strategy.state_dict()
        strategy = strategy.strategy
    for attr in state_attributes(strategy):
        value = getattr(strategy, attr, None)
        if value is not None:
            state[attr] = _np_tree_to_torch(value)
    return state


def restore_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    if isinstance(strategy, UserLevelDP):
        dp = state.get("user_dp")
        if dp is None:
            raise CheckpointError("the checkpoint has no user-level DP state but central-dp is enabled")
        strategy.load_state_dict(dp)  # history, noise RNG, and the adaptive bound where it was
        strategy = strategy.strategy
    for attr in state_attributes(strategy):
        if attr in state:
            setattr(strategy, attr, _torch_tree_to_np(state[attr]))


@dataclass
class Checkpoint:
    round: int
    arrays: ArrayRecord
    strategy: dict[str, Any]
    config: dict[str, Any]
    path: Path
    data_spec: dict[str, Any] | None = None  # None in checkpoints written before it was saved


class Checkpointer:
    def __init__(self, run_dir: Path, keep: int) -> None:
        self.dir = run_dir / "checkpoints"
        self.index = self.dir / "index.json"
        self.keep = max(1, keep)

    def _entries(self) -> list[dict]:
        if not self.index.exists():
            return []
        try:
            return json.loads(self.index.read_text())["checkpoints"]
        except (OSError, ValueError, KeyError) as err:
            log.warning("checkpoint index %s unreadable (%s); scanning files without digests", self.index, err)
            return [{"file": p.name, "round": int(p.stem.split("-")[1]), "sha256": None}
                    for p in sorted(self.dir.glob("round-*.pt"))]

    def save(self, rnd: int, arrays: ArrayRecord, strategy: Strategy, cfg: AppConfig,
             spec: DataSpec | None = None) -> Path:
        payload = {
            "version": VERSION,
            "round": rnd,
            "family": cfg.task.family,
            "arrays": arrays.to_torch_state_dict(),
            "strategy": strategy_state(strategy),
            "config": cfg.to_flat(),
            "config_hash": cfg.config_hash(),
            "data_spec": dataclasses.asdict(spec) if spec is not None else None,
            "rng": {"python": random.getstate(), "torch": torch.get_rng_state()},
        }
        buf = io.BytesIO()
        torch.save(payload, buf)
        data = buf.getvalue()
        path = self.dir / f"round-{rnd:04d}.pt"
        write_bytes(path, data)
        entries = [e for e in self._entries() if e["round"] != rnd]
        entries.append({"file": path.name, "round": rnd, "sha256": hashlib.sha256(data).hexdigest()})
        entries.sort(key=lambda e: e["round"])
        for old in entries[: -self.keep]:
            (self.dir / old["file"]).unlink(missing_ok=True)
        entries = entries[-self.keep :]
        write_bytes(self.index, json.dumps({"checkpoints": entries}, indent=1).encode())
        return path

    def _read(self, entry: dict) -> dict[str, Any]:
        """The payload of an index entry, verified; CheckpointError says why it is unusable."""
        path = self.dir / entry["file"]
        try:
            data = path.read_bytes()
            if entry.get("sha256") and hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise CheckpointError("SHA-256 mismatch (truncated or modified)")
            payload = torch.load(io.BytesIO(data), weights_only=True)
            if payload.get("version") != VERSION:
                raise CheckpointError(f"version {payload.get('version')} != {VERSION}")
        except CheckpointError:
            raise
        except (OSError, RuntimeError, EOFError, ValueError, KeyError) as err:
            raise CheckpointError(str(err)) from err
        return payload

    def _checkpoint(self, entry: dict, payload: dict[str, Any]) -> Checkpoint:
        arrays = ArrayRecord({k: Array(v.numpy()) for k, v in payload["arrays"].items()})
        return Checkpoint(payload["round"], arrays, payload["strategy"], payload["config"],
                          self.dir / entry["file"], payload.get("data_spec"))

    def rounds(self) -> list[int]:
        """The rounds the index lists a checkpoint for (kept: the last ``run.keep-checkpoints``), ascending."""
        return sorted(e["round"] for e in self._entries())

    def load(self, rnd: int) -> Checkpoint:
        """The checkpoint of round ``rnd``, verified, without touching the RNGs (a reader's load, not
        a resume). CheckpointError when there is none (naming the rounds there are) or it is damaged."""
        entry = next((e for e in self._entries() if e["round"] == rnd), None)
        if entry is None:
            have = self.rounds()
            kept = (f"checkpoints of rounds {', '.join(map(str, have))}" if len(have) > 1
                    else f"a checkpoint of round {have[0]} only" if have else "no checkpoints")
            raise CheckpointError(f"no checkpoint of round {rnd} in {self.dir} ({kept})")
        try:
            return self._checkpoint(entry, self._read(entry))
        except CheckpointError as err:
            raise CheckpointError(f"checkpoint {self.dir / entry['file']} is unusable: {err}") from None

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies, with the RNG states it saved restored (a resume);
        damaged ones are reported and skipped."""
        for entry in sorted(self._entries(), key=lambda e: e["round"], reverse=True):
            try:
                payload = self._read(entry)
            except CheckpointError as err:
                log.warning("checkpoint %s is unusable (%s); trying the previous one", self.dir / entry["file"], err)
                continue
            random.setstate(_as_tuple(payload["rng"]["python"]))
            torch.set_rng_state(payload["rng"]["torch"])
            return self._checkpoint(entry, payload)
        return None


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = (set(saved) | set(current)) - RESUME_KEYS
    return [f"{k}: checkpoint {saved.get(k)!r} != now {current.get(k)!r}"
            for k in sorted(keys) if saved.get(k) != current.get(k)]
