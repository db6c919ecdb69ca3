"""Checks on a site's reply before it may touch the global model."""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord, Message

from common import records as R


class InvalidUpdate(ValueError):
    """A reply that must not be aggregated; the message says why."""


def check_train_reply(msg: Message, global_arrays: ArrayRecord, max_update_norm: float = 0.0,
                      wire_dtype: str = "float32") -> ArrayRecord:
    """Raise :class:`InvalidUpdate` unless the reply is safe to aggregate; return its model
    unpacked (one array per tensor, still in ``wire_dtype``).

    Expected: exactly one ArrayRecord (packed on the wire: ``common.records.unpack``) with the
    global model's keys and shapes, the global model's dtypes except that floating-point arrays
    travel as ``wire_dtype`` (``strategy.update-dtype``; the caller casts them back to float32
    afterwards), finite values, an update norm within ``max_update_norm`` (when > 0), and one
    MetricRecord with a positive ``num-examples`` and numeric, finite metrics.
    """
    content = msg.content
    arrays = list(content.array_records.values())
    metrics = list(content.metric_records.values())
    if len(arrays) != 1:
        raise InvalidUpdate(f"expected one ArrayRecord, got {len(arrays)}")
    if len(metrics) != 1:
        raise InvalidUpdate(f"expected one MetricRecord, got {len(metrics)}")
    if content.get(R.ARRAYS) is not arrays[0] or content.get(R.METRICS) is not metrics[0]:
        # Flower's strategies find the records by the first reply's keys: one reply with other
        # keys would stop the aggregation of all of them.
        raise InvalidUpdate(f"the ArrayRecord and MetricRecord must be named {R.ARRAYS!r} and {R.METRICS!r}")
    try:
        got, ref = R.unpack(arrays[0], like=global_arrays), global_arrays
    except ValueError as err:
        raise InvalidUpdate(str(err)) from None
    missing, extra = set(ref.keys()) - set(got.keys()), set(got.keys()) - set(ref.keys())
    if missing or extra:
        raise InvalidUpdate(f"array keys differ from the global model: missing {sorted(missing)[:3]}, "
                            f"unexpected {sorted(extra)[:3]}")
    sq = 0.0
    for key, ref_arr in ref.items():
        a = got[key]
        want = wire_dtype if np.issubdtype(np.dtype(ref_arr.dtype), np.floating) else ref_arr.dtype
        if tuple(a.shape) != tuple(ref_arr.shape) or a.dtype != want:
            raise InvalidUpdate(f"{key}: shape/dtype {tuple(a.shape)}/{a.dtype}, expected "
                                f"{tuple(ref_arr.shape)}/{want}")
        try:
            x = a.numpy()
        except Exception as err:  # noqa: BLE001 - bytes that are not one .npy array
            raise InvalidUpdate(f"{key}: unreadable array data ({type(err).__name__})") from None
        if np.issubdtype(x.dtype, np.floating):
            if not np.isfinite(x).all():
                raise InvalidUpdate(f"{key}: contains NaN or infinite values")
            sq += float(np.sum((x.astype(np.float64) - ref_arr.numpy().astype(np.float64)) ** 2))
    if max_update_norm > 0 and math.sqrt(sq) > max_update_norm:
        raise InvalidUpdate(f"update norm {math.sqrt(sq):.3g} exceeds the bound {max_update_norm:g}")
    m = metrics[0]
    if R.WEIGHT not in m:
        raise InvalidUpdate(f"metrics lack {R.WEIGHT!r}")
    for key, value in m.items():
        if isinstance(value, list) or not math.isfinite(float(value)):
            raise InvalidUpdate(f"metric {key!r} = {value!r} is not a finite number")
    if float(m[R.WEIGHT]) <= 0:
        raise InvalidUpdate(f"{R.WEIGHT} must be positive, got {m[R.WEIGHT]}")
    return got
