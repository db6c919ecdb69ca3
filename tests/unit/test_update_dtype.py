"""strategy.update-dtype = float16: applied both ways, bytes halve, math stays float32."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common import records as R
from common.data.site import site_dataset
from common.tasks import build_task
from server.validation import InvalidUpdate, check_train_reply
from tests.conftest import pyproject_run_config, quick_config

F16_EPS = 2.0**-11  # float16 relative rounding error (10-bit mantissa)


@pytest.fixture(autouse=True, scope="module")
def _identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def vae_arrays() -> ArrayRecord:
    cfg = quick_config()
    from common.config import parse_node_config

    _, spec = site_dataset(cfg, parse_node_config({"partition-id": 0, "num-partitions": 2}))
    return R.to_arrayrecord(build_task(cfg, spec).modules)


def test_float16_round_trip_halves_bytes_and_keeps_values():
    ref = vae_arrays()
    wire = R.to_wire(ref, "float16")
    assert {a.dtype for a in wire.values()} == {"float16"} and len(wire) == 1
    data = sum(a.numpy().nbytes for a in ref.values())
    assert sum(a.numpy().nbytes for a in wire.values()) * 2 == data
    # What a message carries (Flower's count): the array data halves; the packed array's one
    # .npy header (same length for <f2 and <f4) stays, so the whole is just above half.
    packed32 = R.to_wire(ref, "float32")
    assert packed32.count_bytes() - wire.count_bytes() == data // 2
    assert 0.5 < wire.count_bytes() / packed32.count_bytes() < 0.53
    back = R.from_wire(wire)
    assert list(back.keys()) == list(ref.keys())
    for key, arr in ref.items():
        x, y = arr.numpy(), back[key].numpy()
        assert y.dtype == np.float32 and y.shape == x.shape
        np.testing.assert_allclose(y, x, rtol=F16_EPS, atol=6e-8)  # 6e-8: float16's subnormal step


def test_a_model_travels_as_one_packed_array_and_unpacks_exactly():
    ref = vae_arrays()
    assert len(ref) > 10
    wire = R.to_wire(ref, "float32")
    assert len(wire) == 1 and R.is_packed(wire)
    assert wire.count_bytes() < ref.count_bytes()  # the same values, one .npy header instead of many
    back = R.from_wire(wire)
    assert list(back.keys()) == list(ref.keys())
    for key, arr in ref.items():
        assert back[key].dtype == arr.dtype and back[key].shape == arr.shape
        np.testing.assert_array_equal(back[key].numpy(), arr.numpy())
    assert R.from_wire(ref) is ref  # an unpacked float32 record passes through


def test_a_malformed_pack_is_refused_by_the_server():
    glob = ArrayRecord({"m.w": Array(np.zeros((3, 4), np.float32)), "m.b": Array(np.zeros(4, np.float32))})
    good = R.to_wire(glob, "float32")
    check_train_reply(_reply(good), glob)
    key, arr = next(iter(good.items()))
    flat = arr.numpy()
    bad = {
        "one value short": ArrayRecord({key: Array(flat[:-1].copy())}),
        "unreadable layout": ArrayRecord({R.PACKED_PREFIX + "[[": Array(flat)}),
        "a name twice": ArrayRecord({R.PACKED_PREFIX + '[["m.w",[8]],["m.w",[8]]]': Array(flat)}),
        "integer values": ArrayRecord({key: Array(flat.astype(np.int64))}),
        "another layout": ArrayRecord({R.PACKED_PREFIX + '[["m.w",[4,3]],["m.b",[4]]]': Array(flat)}),
        # What an independent review crafted to crash the server (each once escaped as another exception):
        "an infinite size": ArrayRecord({R.PACKED_PREFIX + '[["m.w",[Infinity]]]': Array(flat)}),
        "a size past int64": ArrayRecord({R.PACKED_PREFIX + f'[["m.w",[{2**70}]],["m.b",[1e300]]]': Array(flat)}),
        "deep nesting": ArrayRecord({R.PACKED_PREFIX + "[" * 5000 + "]" * 5000: Array(flat)}),
        "no array data": ArrayRecord({key: Array(dtype="float32", shape=(16,), stype="numpy.ndarray", data=b"")}),
    }
    for what, rec in bad.items():
        with pytest.raises(InvalidUpdate):
            check_train_reply(_reply(rec), glob)
        if what != "another layout":  # a well-formed pack of other shapes unpacks without a template
            with pytest.raises(ValueError, match="packed record"):
                R.unpack(rec)
        with pytest.raises(ValueError, match="packed record"):  # the server's way: against the global model
            R.unpack(rec, like=glob)


def test_the_server_never_parses_a_sites_layout():
    """A reply whose key is not exactly the global model's layout is refused by a string
    comparison: a huge key costs the server nothing (it once built 300,000 arrays from 4 MB)."""
    glob = ArrayRecord({"m.w": Array(np.zeros((3, 4), np.float32))})
    huge = R.PACKED_PREFIX + "[" + ",".join(f'["k{i}",[0]]' for i in range(300_000)) + "]"
    import time

    start = time.perf_counter()
    with pytest.raises(InvalidUpdate, match="not the global model's"):
        check_train_reply(_reply(ArrayRecord({huge: Array(np.zeros(0, np.float32))})), glob)
    assert time.perf_counter() - start < 1.0  # a string comparison, not 300,000 arrays (11 s before)


def test_a_zero_dimensional_tensor_stays_zero_dimensional():
    rec = ArrayRecord({"m.t": Array(np.array(0.5, np.float32)), "m.w": Array(np.ones((2, 0), np.float32))})
    back = R.from_wire(R.to_wire(rec, "float32"))
    assert back["m.t"].shape == () and back["m.w"].shape == (2, 0) and float(back["m.t"].numpy()) == 0.5
    check_train_reply(_reply(R.to_wire(rec, "float32")), rec)


def test_records_under_other_names_are_refused():
    glob = ArrayRecord({"m.w": Array(np.zeros(3, np.float32))})
    req = Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="train")
    odd = Message(content=RecordDict({"x": R.to_wire(glob, "float32"), "metrics": MetricRecord({"weight": 1.0})}),
                  reply_to=req)
    with pytest.raises(InvalidUpdate, match="must be named"):
        check_train_reply(odd, glob)


def test_a_reply_with_other_metric_keys_is_dropped_not_the_round():
    """Flower's strategies refuse to aggregate replies whose metric keys differ: the odd one is dropped."""
    from server.rounds import _same_metric_keys

    glob = ArrayRecord({"m.w": Array(np.zeros(3, np.float32))})

    def reply(metrics):
        req = Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="train")
        return Message(content=RecordDict({"arrays": glob, "metrics": MetricRecord(metrics)}), reply_to=req)

    good = [reply({"weight": 1.0, "steps": 2.0}), reply({"weight": 1.0, "steps": 3.0}),
            reply({"weight": 1.0, "steps": 2.0, "extra": 7.0})]
    rows = {id(m): {"status": "ok", "reason": None} for m in good}
    kept = _same_metric_keys(good, rows)
    assert kept == good[:2]
    assert rows[id(good[2])]["status"] == "failed" and "extra" in rows[id(good[2])]["reason"]
    assert _same_metric_keys(good[:2], rows) == good[:2]


def test_a_record_with_an_integer_array_is_cast_but_not_packed():
    rec = ArrayRecord({"m.w": Array(np.ones(3, np.float32)), "m.n": Array(np.arange(2))})
    wire = R.to_wire(rec, "float16")
    assert list(wire.keys()) == ["m.w", "m.n"] and wire["m.w"].dtype == "float16" and wire["m.n"].dtype == "int64"


def test_values_float16_cannot_hold_fail_at_the_sender():
    rec = ArrayRecord({"m.w": Array(np.array([1.0, 7e4], dtype=np.float32))})
    with pytest.raises(OverflowError, match="m.w.*65504"):
        R.to_wire(rec, "float16")


def _reply(arrays: ArrayRecord) -> Message:
    req = Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="train")
    return Message(content=RecordDict({"arrays": arrays, "metrics": MetricRecord({"weight": 5.0})}),
                   reply_to=req)


def test_validation_expects_the_configured_wire_dtype():
    glob = ArrayRecord({"m.w": Array(np.zeros((3, 4), np.float32)), "m.n": Array(np.zeros(2, np.int64))})
    half = R.to_wire(glob, "float16")
    assert half["m.n"].dtype == "int64"  # only floating-point arrays change
    check_train_reply(_reply(half), glob, wire_dtype="float16")
    with pytest.raises(InvalidUpdate, match="expected \\(3, 4\\)/float16"):
        check_train_reply(_reply(glob), glob, wire_dtype="float16")  # a site that ignored the setting
    with pytest.raises(InvalidUpdate, match="float32"):
        check_train_reply(_reply(half), glob)  # default: float32 on the wire


def test_the_site_receives_and_replies_in_float16():
    from client.app import train

    run_config = {**pyproject_run_config(), **{k: v for k, v in quick_config().to_flat().items()},
                  "strategy.update-dtype": "float16", "train.max-steps": 2, "privacy.ledger-dir": ""}
    glob = vae_arrays()
    msg = Message(content=RecordDict({"arrays": R.to_wire(glob, "float16"),
                                      "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_message_id"] = "m1"
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2, "unsafe-memory-ledger": True}, state=RecordDict(),
                  run_config=run_config)
    reply = train(msg, ctx)
    out = reply.content["arrays"]
    assert {a.dtype for a in out.values()} == {"float16"}
    check_train_reply(reply, glob, wire_dtype="float16")


def test_a_float16_job_sends_and_receives_half_the_bytes():
    """The server loop end to end (in process): same job, float32 vs float16 on the wire."""
    from simulations.benchlib import run_local

    def job(dtype, tmp):
        raw = {**pyproject_run_config(), **quick_config().to_flat(), "run.num-rounds": 1, "train.max-steps": 2,
               "eval.fid-domain-n": 0, "privacy.ledger-dir": "", "strategy.update-dtype": dtype}
        (rec,) = [r for r in run_local(raw, 2, tmp) if r["round"] == 1]
        assert all(s["status"] == "ok" for s in rec["sites"]), rec["sites"]
        return rec

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        f32, f16 = job("float32", Path(tmp) / "a"), job("float16", Path(tmp) / "b")
    assert 0.5 < f16["bytes_sent"] / f32["bytes_sent"] < 0.53
    assert 0.5 < f16["bytes_received"] / f32["bytes_received"] < 0.53
    # Same seed, same data: the model differs only by rounding of the starting weights. (Under DP
    # the sites send no training loss: the server's evaluation of the merged model is compared.)
    assert f16["eval"]["neg-elbo"] == pytest.approx(f32["eval"]["neg-elbo"], rel=0.02)
