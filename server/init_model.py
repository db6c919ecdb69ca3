"""The model a run starts from: ``task.init-from``, checked before round 1.

A model file (``server.run_model.save_model``) is either a public pretraining's output
(``server.pretrain``: it carries ``pretrained_on``, the public plays it read, trained without
DP) or a run's ``final_model.pt``. Starting from it is safe for the sites only if its weights
carry nothing private that no ledger accounts for:

- a pretrained model must have read exactly this run's public plays (``data.public-plays`` with
  this run's ``run.seed`` and ``data.heldout-plays``): never a play a site holds (its text
  would enter the federation with no DP) nor a held-out play (the server would score the model
  on its own training text);
- a run's model must be a DP release (``privacy.enabled`` or ``central-dp.enabled``: its
  epsilon is on the ledgers of the sites that trained it; reusing it is post-processing) made
  on this run's data split, so that none of this run's held-out text was in its training data.

Anything else is refused with a :class:`ConfigError` naming ``task.init-from``, as are a file
that is missing or not a fedgen model, whose family, architecture (the family section's
``architecture`` keys), tokenizer or data shape differ from this run's (weights that load by
shape could still mean something else), or whose weights are not all finite.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from common import records as R
from common.config import AppConfig, ConfigError
from common.data.shakespeare import shakespeare_public_plays
from common.tasks import DataSpec, GenerativeTask
from server.run_model import read_model_file
from server.store import StoreError

KEY = "task.init-from"
#: What decides which records are whose (sites', held-out, public): a run's model is reused only on the same split.
SPLIT_KEYS = ("data.dataset", "data.path", "run.seed", "data.heldout-plays", "data.public-plays")


def architecture_differences(saved_config: dict[str, Any], cfg: AppConfig) -> list[str]:
    """The family and the architecture keys (its config section's ``architecture``) on which a
    saved model's config and ``cfg`` differ, as 'key: saved X, this run Y'."""
    family = cfg.task.family
    keys = ["task.family"] + [f"{family}.{k.replace('_', '-')}" for k in getattr(cfg, family).architecture]
    flat = cfg.to_flat()
    return [f"{k}: the model file has {saved_config.get(k)!r}, this run {flat[k]!r}"
            for k in keys if saved_config.get(k) != flat[k]]


def public_plays(cfg: AppConfig) -> list[str]:
    """The plays this run's config makes public (empty when it makes none)."""
    d = cfg.data
    if d.dataset != "shakespeare" or not d.public_plays:
        return []
    return shakespeare_public_plays(d.heldout_plays, d.public_plays, cfg.run.seed)


def pretraining_provenance(cfg: AppConfig) -> dict[str, Any]:
    """What a pretrained model file records about its training data (``server.pretrain``)."""
    return {"pretrained_on": {"kind": "public-plays", "plays": public_plays(cfg), "dp": False}}


def provenance_problems(saved: dict[str, Any], cfg: AppConfig) -> list[str]:
    """Why this model file's training data make it unsafe to start this run from (empty: it is safe)."""
    origin = saved.get("pretrained_on")
    if origin is not None:
        plays = sorted(origin.get("plays") or []) if isinstance(origin, dict) else None
        if not isinstance(origin, dict) or origin.get("kind") != "public-plays" or not plays:
            return [f"the model file says it was pretrained on {origin!r}, which this fedgen cannot check"]
        mine = public_plays(cfg)
        if plays != mine:
            return [f"the model was pretrained without DP on the plays {plays}, but this run's public plays are "
                    f"{mine or 'none'} (data.public-plays, data.heldout-plays and run.seed must be the "
                    "pretraining's): a site or the held-out text may hold the text it learned"]
        return []
    config = saved["config"]
    if not (config.get("privacy.enabled") or config.get("central-dp.enabled")):
        return ["the model is a run's trained without DP (privacy.enabled and central-dp.enabled false): its "
                "weights would carry its sites' records into this run with no privacy accounting; start from a "
                "DP run's model or a public pretraining (python -m simulations.pretrain)"]
    flat = cfg.to_flat()
    return [f"{k}: the model's run had {config.get(k)!r}, this run {flat[k]!r} (a run's model is reused only on "
            "the same data split, so that no held-out record was in its training data)"
            for k in SPLIT_KEYS if config.get(k) != flat[k]]


def load_init_model(cfg: AppConfig, task: GenerativeTask, spec: DataSpec) -> str:
    """Load ``task.init-from`` into ``task`` after every check above; the file's sha256 (for the log)."""
    path = Path(cfg.task.init_from).expanduser()

    def refuse(problems: list[str]) -> ConfigError:
        return ConfigError([f"{KEY} = {cfg.task.init_from!r}: {p}" for p in problems])

    if not path.is_file():
        raise refuse(["no such file; give a model file written by python -m simulations.pretrain or a run's "
                      "final_model.pt, or leave it empty"])
    try:
        saved = read_model_file(path)
    except StoreError as err:
        raise refuse([str(err)]) from None
    problems = [f"does not fit this run; set it as the model file has it, or pretrain again with this run's "
                f"settings: {p}" for p in architecture_differences(saved["config"], cfg)]
    if saved["data_spec"] != dataclasses.asdict(spec):
        problems.append(f"the model file was made for data of shape {saved['data_spec']}, this run's data is "
                        f"{dataclasses.asdict(spec)}")
    problems += provenance_problems(saved, cfg)
    bad = R.non_finite(saved["state_dict"])
    if bad:
        problems.append(f"its weights {bad[:3]} are not all finite")
    if problems:
        raise refuse(problems)
    try:
        R.load_arrayrecord(task.modules, ArrayRecord(torch_state_dict=saved["state_dict"]))
    except (ValueError, RuntimeError, TypeError) as err:  # load_state_dict raises RuntimeError on a shape mismatch
        raise refuse([f"its weights do not fit this run's model: {err}"]) from None
    return hashlib.sha256(path.read_bytes()).hexdigest()
