"""Modules <-> one Flower ArrayRecord, and the names of the metrics we exchange.

Every federated module of a task travels in a single ArrayRecord whose keys are
prefixed with the module's name (``vae.encoder.0.weight``,
``generator.net.1.weight``...), so every Flower strategy merges all of them.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from common.tasks import unwrap

# Keys of the MetricRecord a site sends back after training.
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"
DELTA = "delta"
BUDGET = "budget"
NOISE = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
CLIP_FRACTION = "clip-fraction"
STEPS = "steps"
PARTITION = "partition-id"
BUDGET_EXHAUSTED = "budget-exhausted"
# Keys of the ConfigRecord a site sends back (status of the round at that site).
STATUS = "status"
REASON = "reason"


def state_dict_of(modules: dict[str, nn.Module]) -> "OrderedDict[str, torch.Tensor]":
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, module in modules.items():
        for key, value in unwrap(module).state_dict().items():
            out[f"{name}.{key}"] = value.detach().cpu()
    return out


def to_arrayrecord(modules: dict[str, nn.Module]) -> ArrayRecord:
    return ArrayRecord(torch_state_dict=state_dict_of(modules))


def load_arrayrecord(modules: dict[str, nn.Module], record: ArrayRecord) -> None:
    """Load prefixed arrays into the modules; a missing or foreign key is an error."""
    state = record.to_torch_state_dict()
    expected = state_dict_of(modules)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            "the global model does not match this task's modules: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; "
            "were the server and this site started with the same task.family and model settings?"
        )
    for name, module in modules.items():
        prefix = f"{name}."
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        unwrap(module).load_state_dict(sub, strict=True)


def numpy_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}
