"""The server's reply validator: nothing malformed or non-finite reaches aggregation."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given, settings
from hypothesis import strategies as st

from server.validation import InvalidUpdate, check_train_reply

SHAPES = {"m.w": (3, 4), "m.b": (4,)}


@pytest.fixture(autouse=True, scope="module")
def _identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def glob(v=0.0):
    return ArrayRecord({k: Array(np.full(s, v, dtype=np.float32)) for k, s in SHAPES.items()})


def reply(arrays: dict[str, np.ndarray] | None = None, metrics=None, n_arrays=1):
    req = Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="train")
    content = RecordDict()
    for i in range(n_arrays):
        content["arrays" if i == 0 else f"arrays{i}"] = ArrayRecord({k: Array(v) for k, v in (arrays or {}).items()})
    content["metrics"] = MetricRecord(metrics if metrics is not None else {"weight": 10.0})
    return Message(content=content, reply_to=req)


def good(v=0.5):
    return {k: np.full(s, v, dtype=np.float32) for k, s in SHAPES.items()}


def test_a_good_reply_passes():
    check_train_reply(reply(good()), glob())


@pytest.mark.parametrize("mutate, reason", [
    (lambda a: a.pop("m.b"), "missing"),
    (lambda a: a.update({"x.y": np.zeros(2, np.float32)}), "unexpected"),
    (lambda a: a.update({"m.w": np.zeros((4, 3), np.float32)}), "shape"),
    (lambda a: a.update({"m.w": np.zeros((3, 4), np.float64)}), "dtype"),
    (lambda a: a["m.w"].__setitem__((0, 0), np.nan), "NaN"),
    (lambda a: a["m.b"].__setitem__(1, np.inf), "NaN or infinite"),
])
def test_malformed_arrays_are_rejected_with_the_reason(mutate, reason):
    arrs = good()
    mutate(arrs)
    with pytest.raises(InvalidUpdate, match=reason):
        check_train_reply(reply(arrs), glob())


def test_update_norm_bound():
    far = {k: np.full(s, 10.0, dtype=np.float32) for k, s in SHAPES.items()}
    check_train_reply(reply(far), glob(), max_update_norm=0)  # bound off
    with pytest.raises(InvalidUpdate, match="update norm .* exceeds the bound 1"):
        check_train_reply(reply(far), glob(), max_update_norm=1.0)


@pytest.mark.parametrize("metrics, reason", [
    ({}, "weight"),
    ({"weight": 0.0}, "must be positive"),
    ({"weight": 5.0, "train-loss": float("nan")}, "not a finite number"),
])
def test_bad_metrics_are_rejected(metrics, reason):
    with pytest.raises(InvalidUpdate, match=reason):
        check_train_reply(reply(good(), metrics), glob())


def test_two_array_records_are_rejected():
    with pytest.raises(InvalidUpdate, match="one ArrayRecord"):
        check_train_reply(reply(good(), n_arrays=2), glob())


finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(finite, min_size=16, max_size=16), bound=st.floats(0.1, 1e4),
       poison=st.sampled_from([None, np.nan, np.inf, -np.inf]), where=st.integers(0, 15))
def test_property_accepts_iff_finite_and_within_bound(values, bound, poison, where):
    flat = np.array(values, dtype=np.float32)
    if poison is not None:
        flat[where] = poison
    arrs = {"m.w": flat[:12].reshape(3, 4), "m.b": flat[12:]}
    norm = float(np.sqrt(np.sum(flat.astype(np.float64) ** 2))) if poison is None else np.inf
    should_pass = poison is None and norm <= bound
    try:
        check_train_reply(reply(arrs), glob(), max_update_norm=bound)
        passed = True
    except InvalidUpdate:
        passed = False
    assert passed == should_pass
