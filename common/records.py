"""Modules <-> one Flower ArrayRecord, and the names of the metrics we exchange.

Every federated module of a task travels in a single ArrayRecord whose keys are
prefixed with the module's name (``vae.encoder.0.weight``,
``generator.net.1.weight``...), so every Flower strategy merges all of them.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from common.dp_step import unwrap

# The records of a train message and of its reply (both sides use these names).
ARRAYS = "arrays"  # the model (server -> site) or the trained model (site -> server)
CONFIG = "config"  # the round's settings (server -> site)
METRICS = "metrics"  # the reply's MetricRecord (keys below)
STATUS_RECORD = "status"  # the reply's ConfigRecord: STATUS and REASON

# Keys of the MetricRecord a site sends back after training (README, "What a site sends").
WEIGHT = "weight"  # the reply's weight in the merge: the record count without DP; under DP a declared public size, or 1
NUM_EXAMPLES = "num-examples"  # without DP only: the exact record count
TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"
DELTA = "delta"
BUDGET = "budget"
NOISE = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
CLIP_FRACTION = "clip-fraction"
STEPS = "steps"
REPLAYED = "replayed"  # 1.0: the site answered with the update it had already trained for this request
PARTITION = "partition-id"
# Time at the site: wall seconds of the whole call (data, model, privacy accounting, training;
# in every reply), and in every trained or replayed reply (0 when replayed) the local training
# loop's wall seconds and its process's CPU seconds (with one torch thread, less than the wall
# time when the site waited for a core).
SITE_SECONDS = "site-seconds"
TRAIN_SECONDS = "train-seconds"
TRAIN_CPU_SECONDS = "train-cpu-seconds"
BUDGET_EXHAUSTED = "budget-exhausted"
FAILED = "failed"  # the site caught its own error: the reply says so, with its partition (client/app.py)
# Key of the train config the server sends: its name for the run, the same across a resume
# (the flwr run id is not).
RUN_NAME = "fedgen-run"
# Keys of the ConfigRecord a site sends back (status of the round at that site).
STATUS = "status"
REASON = "reason"


def state_dict_of(modules: dict[str, nn.Module]) -> "OrderedDict[str, torch.Tensor]":
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, module in modules.items():
        for key, value in unwrap(module).state_dict().items():
            out[f"{name}.{key}"] = value.detach().cpu()
    return out


def non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """The keys of a state dict whose floating-point tensor holds a NaN or an infinity."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


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


# What model arrays travel as (strategy.update-dtype). Models and aggregation stay float32;
# only the messages change: the sender casts, the receiver casts back before using them.
WIRE_DTYPES = ("float32", "float16")

# On the wire a model is one array, not one per tensor. Flower moves every Array of a message
# as its own objects (an Array and its chunks), each a signed request from the SuperLink to the
# SuperNode: 18 tensors cost about 40 requests and 0.7-1.2 s per message on loopback with TLS,
# one packed array about 10 (docs/RESULTS.md, "Deployed rounds"). The layout (every tensor's
# name and shape, in order) rides in the packed array's key: it is the architecture, public and
# the same in both directions, so Flower's clipping mods (which require the reply's keys to be
# the message's keys, and clip the flat difference: the same norm) work on packed records.
PACKED_PREFIX = "fedgen.packed:"


def _is_float(dtype: str) -> bool:
    return np.issubdtype(np.dtype(dtype), np.floating)


def _cast(x: np.ndarray, dtype: str, key: str) -> np.ndarray:
    y = x.astype(dtype, copy=False)
    if y is not x and not np.isfinite(y).all() and np.isfinite(x).all():
        raise OverflowError(f"strategy.update-dtype = {dtype!r} cannot carry {key}: its largest magnitude "
                            f"{float(np.abs(x).max()):.4g} exceeds {float(np.finfo(dtype).max):g}; "
                            "use strategy.update-dtype = 'float32'")
    return y


def to_wire(record: ArrayRecord, dtype: str) -> ArrayRecord:
    """The record as it travels: every floating-point array cast to ``dtype`` and, when all
    arrays are floating-point (every model here), packed into one flat array (``unpack``).

    A finite value the smaller type cannot hold (|x| > 65504 for float16) is an error here, at
    the sender, naming the array, rather than an infinite value the server would drop without
    the cause. A record with a non-float array is cast only, one array per tensor.
    """
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"update dtype {dtype!r}: use one of {WIRE_DTYPES}")
    if is_packed(record):
        raise ValueError("to_wire: the record is already packed")
    arrays = [(key, arr.numpy()) for key, arr in record.items()]
    if not arrays or not all(_is_float(x.dtype) for _, x in arrays):
        return ArrayRecord(OrderedDict((k, Array(_cast(x, dtype, k)) if _is_float(x.dtype) else record[k])
                                       for k, x in arrays))
    layout = json.dumps([[k, list(x.shape)] for k, x in arrays], separators=(",", ":"))
    flat = np.concatenate([_cast(x, dtype, k).ravel() for k, x in arrays])
    return ArrayRecord(OrderedDict([(PACKED_PREFIX + layout, Array(flat))]))


def is_packed(record: ArrayRecord) -> bool:
    return len(record) == 1 and next(iter(record.keys())).startswith(PACKED_PREFIX)


def unpack(record: ArrayRecord) -> ArrayRecord:
    """One array per tensor again, in the sender's dtype (``to_wire``'s packing undone); a
    record that is not packed comes back as it is. A malformed pack (what a faulty or hostile
    site could send) is a ValueError that says what is wrong."""
    if not is_packed(record):
        return record
    key, arr = next(iter(record.items()))
    try:
        layout = json.loads(key[len(PACKED_PREFIX):])
        names = [str(name) for name, _ in layout]
        shapes = [tuple(int(d) for d in shape) for _, shape in layout]
    except (ValueError, TypeError) as err:
        raise ValueError(f"packed record: unreadable layout ({err})") from None
    if len(set(names)) != len(names) or any(d < 0 for s in shapes for d in s):
        raise ValueError("packed record: the layout repeats a name or has a negative size")
    flat = arr.numpy()
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    if flat.ndim != 1 or flat.size != sum(sizes) or not _is_float(flat.dtype):
        raise ValueError(f"packed record: {flat.size} {flat.dtype} values in shape {flat.shape} for a layout "
                         f"of {sum(sizes)} floating-point values")
    out, start = OrderedDict(), 0
    for name, shape, size in zip(names, shapes, sizes):
        out[name] = Array(np.ascontiguousarray(flat[start:start + size].reshape(shape)))
        start += size
    return ArrayRecord(out)


def from_wire(record: ArrayRecord) -> ArrayRecord:
    """The record unpacked, with every floating-point array as float32 (what models and
    aggregation use)."""
    record = unpack(record)
    if all(not _is_float(a.dtype) or a.dtype == "float32" for a in record.values()):
        return record
    out = OrderedDict()
    for key, arr in record.items():
        out[key] = Array(arr.numpy().astype(np.float32)) if _is_float(arr.dtype) and arr.dtype != "float32" else arr
    return ArrayRecord(out)
