"""Modules <-> one Flower ArrayRecord, and the names of the metrics we exchange.

Every federated module of a task travels in a single ArrayRecord whose keys are
prefixed with the module's name (``vae.encoder.0.weight``,
``generator.net.1.weight``...), so every Flower strategy merges all of them.
"""

from __future__ import annotations

import json
import math
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
REFUSED_BY_POLICY = "refused-by-policy"  # the site's policy forbids what the run asks (client/policy.py)
AWAITING_APPROVAL = "awaiting-approval"  # the site's operator has not approved this run config yet
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


def packed_key(layout: list[tuple[str, tuple[int, ...]]]) -> str:
    """The key of a packed record: the prefix, then every tensor's name and shape in order."""
    return PACKED_PREFIX + json.dumps([[k, list(shape)] for k, shape in layout], separators=(",", ":"))


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
    flat = np.concatenate([_cast(x, dtype, k).ravel() for k, x in arrays])
    return ArrayRecord(OrderedDict([(packed_key([(k, x.shape) for k, x in arrays]), Array(flat))]))


def is_packed(record: ArrayRecord) -> bool:
    return len(record) == 1 and next(iter(record.keys())).startswith(PACKED_PREFIX)


def _read_layout(key: str) -> list[tuple[str, tuple[int, ...]]]:
    try:
        layout = [(str(name), tuple(int(d) for d in shape)) for name, shape in json.loads(key[len(PACKED_PREFIX):])]
    except Exception as err:  # noqa: BLE001 - any malformed JSON (deep nesting, Infinity, wrong types)
        raise ValueError(f"packed record: unreadable layout ({type(err).__name__})") from None
    if len({name for name, _ in layout}) != len(layout) or any(d < 0 for _, s in layout for d in s):
        raise ValueError("packed record: the layout repeats a name or has a negative size")
    return layout


def unpack(record: ArrayRecord, like: ArrayRecord | None = None) -> ArrayRecord:
    """One array per tensor again, in the sender's dtype (``to_wire``'s packing undone); a
    record that is not packed comes back as it is. Any malformed pack is a ValueError that says
    what is wrong, never another exception.

    ``like``: the layout the record must have (the server passes the global model it sent).
    The record's key is then compared with that layout's key as a string and never parsed: a
    site's reply cannot make the server parse its JSON or build arrays it did not ask for.
    """
    if not is_packed(record):
        return record
    key, arr = next(iter(record.items()))
    if like is None:
        layout = _read_layout(key)
    else:
        layout = [(k, tuple(a.shape)) for k, a in like.items()]
        if key != packed_key(layout):
            raise ValueError("packed record: its layout (tensor names and shapes) is not the global model's")
    try:
        flat = arr.numpy()
    except Exception as err:  # noqa: BLE001 - bytes that are not one .npy array: EOFError, MemoryError, ...
        raise ValueError(f"packed record: unreadable array data ({type(err).__name__})") from None
    sizes = [math.prod(shape) for _, shape in layout]  # Python ints: no overflow
    if flat.ndim != 1 or flat.size != sum(sizes) or not _is_float(flat.dtype):
        raise ValueError(f"packed record: {flat.size} {flat.dtype} values in shape {flat.shape} for a layout "
                         f"of {sum(sizes)} floating-point values")
    out, start = OrderedDict(), 0
    for (name, shape), size in zip(layout, sizes):
        out[name] = Array(flat[start:start + size].reshape(shape).copy())  # .copy(): keeps a 0-d tensor 0-d
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
