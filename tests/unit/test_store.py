"""Run store: round-trips, run resolution, concurrent reading, refusal of bad databases."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from server.runs_index import list_runs, resolve_run
from server.store import (
    DB_NAME,
    SCHEMA_VERSION,
    RunStore,
    StoreError,
)

BIG_NODE = 2**64 - 17  # Flower node ids are uint64; this one does not fit a signed SQLite integer
T0 = 1_763_790_000.0


def site(node_id, partition_id, *, status="ok", epsilon=1.0, reason=None, loss=0.5):
    ok = status == "ok"
    return {
        "node_id": node_id, "partition_id": partition_id, "status": status, "reason": reason,
        "epsilon": epsilon if ok else None, "budget": 8.0, "delta": 1e-5,
        "noise_multiplier": 1.1 if ok else None, "sample_rate": 0.02 if ok else None,
        "clip_fraction": 0.4 if ok else None, "num_examples": 180 if ok else None,
        "train_loss": loss if ok else None, "metrics": {"train-loss": loss} if ok else {},
    }


def make_round(rnd: int, num_rounds: int = 10) -> dict:
    """A realistic record as the server sends it. Round 0 = initial-model evaluation."""
    if rnd == 0:
        sites, train, eps = [], {}, None
    else:
        sites = [
            site(101, 0, epsilon=0.9 * rnd, loss=1.0 / rnd),
            site(BIG_NODE, 1, epsilon=2.5 * rnd, loss=1.2 / rnd),
            site(303, 2, status="refused", reason="privacy budget exhausted") if rnd == 2
            else site(303, 2, epsilon=0.5 * rnd, loss=0.8 / rnd),
        ]
        train, eps = {"train-loss": round(0.9 - 0.1 * rnd, 3)}, 2.5 * rnd
    return {
        "round": rnd, "num_rounds": num_rounds,
        "started_at": T0 + 10 * rnd, "ended_at": T0 + 10 * rnd + 4.5,
        "sampled": [s["node_id"] for s in sites],
        "sites": sites,
        "train": train,
        "eval": {"neg-elbo": 150.0 - 10 * rnd, "fid-domain": 60.0 - 5 * rnd, "fid-domain-n": 500},
        "epsilon_max": eps, "user_epsilon": None,
        "bytes_sent": 1_000_000 * rnd, "bytes_received": 900_000 * rnd,
        "artifacts": {"samples": f"samples/round-{rnd:03d}.png", "checkpoint": f"checkpoints/round-{rnd:03d}.pt"},
    }


def make_run(runs_dir: Path, run_id: str = "run-a", n_rounds: int = 3, num_rounds: int = 10) -> RunStore:
    store = RunStore.create(runs_dir, run_id, config={"model": {"name": "vae"}, "rounds": num_rounds},
                            model="vae", strategy="fedavg", num_rounds=num_rounds)
    for rnd in range(n_rounds + 1):
        store.record_round(make_round(rnd, num_rounds))
    return store


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs"


@pytest.fixture
def writer(runs_dir: Path):
    store = make_run(runs_dir)
    yield store
    store.close()


# --------------------------------------------------------------------------- create / open / round-trip


def test_create_lays_out_run_folder_in_wal_mode(writer: RunStore, runs_dir: Path) -> None:
    assert writer.run_dir == runs_dir / "run-a"
    db = runs_dir / "run-a" / DB_NAME
    assert db.is_file()
    assert not [p for p in db.parent.iterdir() if p.name.endswith(".tmp")]  # build file cleaned up
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


def test_rounds_round_trip_exactly(writer: RunStore) -> None:
    expected = [make_round(r) for r in range(4)]
    assert writer.rounds() == expected
    with RunStore.open(writer.run_dir) as reader:
        assert reader.rounds() == expected
        assert reader.rounds()[0]["sites"] == []  # round 0: evaluation only
        assert reader.rounds()[1]["sites"][1]["node_id"] == BIG_NODE


def test_run_info_summarises_progress_best_metric_and_epsilon(writer: RunStore) -> None:
    info = writer.run_info()
    assert info["run_id"] == "run-a"
    assert (info["model"], info["strategy"], info["num_rounds"]) == ("vae", "fedavg", 10)
    assert info["status"] == "running" and info["ended_at"] is None
    assert info["config"] == {"model": {"name": "vae"}, "rounds": 10}
    assert info["rounds_done"] == 3 and info["last_round"] == 3
    # fid-domain wins over neg-elbo (priority order), minimum over rounds 0..3
    assert info["best_metric"] == {"key": "fid-domain", "value": 45.0, "round": 3}
    assert info["max_epsilon"] == pytest.approx(7.5)


def test_best_metric_prefers_inception_fid_and_falls_back(runs_dir: Path) -> None:
    # The family's own metric (the LM declares perplexity on its config section), not another family's.
    with RunStore.create(runs_dir, "b", config={}, model="lm", strategy="fedprox", num_rounds=2) as store:
        assert store.run_info()["best_metric"] is None
        store.record_round({"round": 0, "eval": {"perplexity": 20.0, "neg-elbo": 3.0}})
        store.record_round({"round": 1, "eval": {"perplexity": 12.5, "neg-elbo": 2.0}})
        assert store.run_info()["best_metric"] == {"key": "perplexity", "value": 12.5, "round": 1}
        store.record_round({"round": 2, "eval": {"fid-inception": 30.0, "perplexity": 11.0}})
        assert store.run_info()["best_metric"] == {"key": "fid-inception", "value": 30.0, "round": 2}
    with RunStore.create(runs_dir, "c", config={}, model="vae", strategy="fedavg", num_rounds=1) as store:
        store.record_round({"round": 0, "eval": {"perplexity": 20.0, "neg-elbo": 3.0}})
        assert store.run_info()["best_metric"] == {"key": "neg-elbo", "value": 3.0, "round": 0}


def test_a_higher_is_better_metric_is_best_at_its_maximum() -> None:
    from common.metrics import EvalMetric, best_metric

    acc = EvalMetric("accuracy", "Accuracy", "accuracy", lower_is_better=False)
    evals = [(0, {"accuracy": 0.2}), (1, {"accuracy": 0.7}), (2, {"accuracy": float("nan")}), (3, {"accuracy": 0.5})]
    assert best_metric(evals, [EvalMetric("fid-domain", "", ""), acc]) == {"key": "accuracy", "value": 0.7, "round": 1}


def test_record_round_replaces_a_redone_round_including_its_sites(writer: RunStore) -> None:
    redo = make_round(2)
    redo["sites"] = [site(101, 0, epsilon=9.9)]
    redo["eval"]["fid-domain"] = 1.0
    writer.record_round(redo)
    rounds = writer.rounds()
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert rounds[2]["sites"] == [site(101, 0, epsilon=9.9)]
    assert writer.run_info()["best_metric"] == {"key": "fid-domain", "value": 1.0, "round": 2}


def test_unknown_keys_are_kept_and_missing_ones_default(writer: RunStore) -> None:
    rec = {"round": 4, "aggregation": {"kind": "fedavg", "weights": [0.5, 0.5]},
           "sites": [{"node_id": 7, "status": "failed", "reason": "timeout", "gpu": "A100"}]}
    writer.record_round(rec)
    got = writer.rounds()[-1]
    assert got["aggregation"] == {"kind": "fedavg", "weights": [0.5, 0.5]}
    assert got["sites"][0]["gpu"] == "A100" and got["sites"][0]["reason"] == "timeout"
    assert got["train"] == {} and got["eval"] == {} and got["epsilon_max"] is None


def test_resumed_run_with_more_rounds_updates_the_plan(writer: RunStore) -> None:
    writer.record_round(make_round(4, num_rounds=20))
    assert writer.run_info()["num_rounds"] == 20


def test_invalid_records_are_rejected_without_writing(writer: RunStore) -> None:
    before = writer.rounds()
    bad_site = make_round(4)
    bad_site["sites"][2]["status"] = "exploded"
    with pytest.raises(StoreError, match="status must be one of"):
        writer.record_round(bad_site)
    with pytest.raises(StoreError, match="round"):
        writer.record_round({"eval": {}})
    with pytest.raises(StoreError, match="node_id"):
        writer.record_round({"round": 5, "sites": [{"node_id": -1, "status": "ok"}]})
    assert writer.rounds() == before


def test_crash_inside_the_transaction_leaves_no_half_round(writer: RunStore, monkeypatch) -> None:
    before = writer.rounds()

    def disk_error(conn, rows):
        raise sqlite3.OperationalError("disk I/O error")

    def killed(conn, rows):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "_insert_sites", disk_error)
    with pytest.raises(StoreError, match="cannot write"):
        writer.record_round({**make_round(3), "eval": {"fid-domain": 0.1}})  # a redo of round 3
    monkeypatch.setattr(writer, "_insert_sites", killed)
    with pytest.raises(KeyboardInterrupt):
        writer.record_round(make_round(4))
    monkeypatch.undo()
    assert writer.rounds() == before
    with RunStore.open(writer.run_dir) as reader:
        assert reader.rounds() == before
    writer.record_round(make_round(4))  # the store is still usable
    assert writer.run_info()["rounds_done"] == 4


def test_set_status_records_end_and_reason(writer: RunStore) -> None:
    writer.set_status("failed", "server crashed: out of memory")
    info = RunStore.open(writer.run_dir).run_info()
    assert info["status"] == "failed" and info["status_reason"] == "server crashed: out of memory"
    assert info["ended_at"] is not None
    writer.set_status("running")  # resumed
    assert writer.run_info()["ended_at"] is None
    with pytest.raises(StoreError, match="status must be one of"):
        writer.set_status("done")


def test_readonly_store_refuses_writes(writer: RunStore) -> None:
    with RunStore.open(writer.run_dir) as reader:
        with pytest.raises(StoreError, match="read-only"):
            reader.set_status("stopped")
    assert writer.run_info()["status"] == "running"


def test_create_refuses_existing_run_and_bad_ids(writer: RunStore, runs_dir: Path) -> None:
    with pytest.raises(StoreError, match="already exists"):
        RunStore.create(runs_dir, "run-a", config={}, model="vae", strategy="fedavg", num_rounds=1)
    for bad in ("", "../escape", "a/b", "latest", ".hidden"):
        with pytest.raises(StoreError, match="invalid run id"):
            RunStore.create(runs_dir, bad, config={}, model="vae", strategy="fedavg", num_rounds=1)


def test_numpy_like_scalars_are_stored_as_numbers(runs_dir: Path) -> None:
    class Scalar:  # mimics numpy.float32 / torch 0-d tensors
        def __init__(self, v):
            self.v = v

        def item(self):
            return self.v

    with RunStore.create(runs_dir, "np", config={"lr": Scalar(0.01)}, model="vae", strategy="fedavg",
                         num_rounds=1) as store:
        store.record_round({"round": 1, "train": {"train-loss": Scalar(0.25)}, "epsilon_max": Scalar(1.5),
                            "sites": [{"node_id": Scalar(5), "status": "ok", "epsilon": Scalar(1.5)}]})
        rec = store.rounds()[0]
        assert rec["train"] == {"train-loss": 0.25} and rec["epsilon_max"] == 1.5
        assert rec["sites"][0]["node_id"] == 5 and store.run_info()["config"] == {"lr": 0.01}


# --------------------------------------------------------------------------- concurrency


def test_reader_sees_last_commit_while_writer_is_mid_transaction(writer: RunStore) -> None:
    committed = writer.rounds()
    in_txn, release = threading.Event(), threading.Event()
    real_insert = writer._insert_sites
    errors: list[BaseException] = []

    def slow_insert(conn, rows):
        real_insert(conn, rows)  # round row + site rows written, not committed
        in_txn.set()
        release.wait(30)

    writer._insert_sites = slow_insert  # type: ignore[method-assign]
    redo = {**make_round(3), "eval": {"fid-domain": 0.5}}

    def write():
        try:
            writer.record_round(make_round(4))
            writer.record_round(redo)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    try:
        assert in_txn.wait(30)
        with RunStore.open(writer.run_dir) as reader:
            assert reader.rounds() == committed
            assert reader.run_info()["rounds_done"] == 3
            assert [r["run_id"] for r in list_runs(writer.run_dir.parent)] == ["run-a"]
    finally:
        release.set()
        thread.join(30)
    # the second write goes through the same slow path; it is released already
    assert not errors
    with RunStore.open(writer.run_dir) as reader:
        assert reader.run_info()["rounds_done"] == 4
        assert reader.rounds()[3]["eval"] == {"fid-domain": 0.5}


def test_reader_and_raw_writer_connection(writer: RunStore) -> None:
    """A second process-like connection holding a write lock does not block the reader."""
    conn = sqlite3.connect(writer.run_dir / DB_NAME, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE run SET status = 'failed'")
        conn.execute("DELETE FROM round")
        with RunStore.open(writer.run_dir) as reader:
            assert reader.run_info()["status"] == "running"
            assert len(reader.rounds()) == 4
        conn.execute("ROLLBACK")
    finally:
        conn.close()


# --------------------------------------------------------------------------- bad databases


def test_newer_schema_version_is_refused_with_upgrade_hint(writer: RunStore) -> None:
    writer.close()
    conn = sqlite3.connect(writer.run_dir / DB_NAME)
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError) as err:
        RunStore.open(writer.run_dir)
    msg = str(err.value)
    assert "99" in msg and "upgrade fedgen" in msg and str(writer.run_dir / DB_NAME) in msg


@pytest.mark.parametrize("content", [os.urandom(4096), b"", b"SQLite format 3\x00" + b"\xff" * 200])
def test_corrupt_or_foreign_database_raises_store_error(tmp_path: Path, content: bytes) -> None:
    run_dir = tmp_path / "runs" / "broken"
    run_dir.mkdir(parents=True)
    (run_dir / DB_NAME).write_bytes(content)
    with pytest.raises(StoreError) as err:
        RunStore.open(run_dir)
    assert str(run_dir / DB_NAME) in str(err.value)


def test_foreign_sqlite_database_is_not_taken_for_a_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "other"
    run_dir.mkdir()
    conn = sqlite3.connect(run_dir / DB_NAME)
    conn.execute("CREATE TABLE run (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not a fedgen run database"):
        RunStore.open(run_dir)


def test_open_missing_run(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no run folder"):
        RunStore.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="no run database"):
        RunStore.open(tmp_path / "empty")
    assert not (tmp_path / "empty" / DB_NAME).exists()  # opening never creates a database


# --------------------------------------------------------------------------- list / resolve


@pytest.fixture
def three_runs(runs_dir: Path) -> Path:
    for i, run_id in enumerate(["20251120-aaa", "20251121-bbb", "20251121-bbc"]):
        store = make_run(runs_dir, run_id, n_rounds=i + 1)
        store.close()
        time.sleep(0.01)  # distinct created_at; order is what is asserted, not time
    (runs_dir / "not-a-run").mkdir()
    (runs_dir / "stray.txt").write_text("x")
    return runs_dir


def test_list_runs_newest_first_with_corrupt_row(three_runs: Path) -> None:
    bad = three_runs / "20251122-bad"
    bad.mkdir()
    (bad / DB_NAME).write_bytes(os.urandom(2048))
    rows = list_runs(three_runs)
    assert [r["run_id"] for r in rows] == ["20251122-bad", "20251121-bbc", "20251121-bbb", "20251120-aaa"]
    assert rows[0]["status"] == "corrupt" and str(bad / DB_NAME) in rows[0]["error"]
    assert [r["rounds_done"] for r in rows[1:]] == [3, 2, 1]
    assert all(r["error"] is None for r in rows[1:])


def test_list_runs_empty_and_missing(runs_dir: Path) -> None:
    runs_dir.mkdir()
    assert list_runs(runs_dir) == []
    with pytest.raises(StoreError, match="does not exist"):
        list_runs(runs_dir / "nope")


def test_resolve_run(three_runs: Path) -> None:
    assert resolve_run(three_runs, "20251120-aaa") == three_runs / "20251120-aaa"
    assert resolve_run(three_runs, "20251120") == three_runs / "20251120-aaa"
    assert resolve_run(three_runs, "20251121-bbb") == three_runs / "20251121-bbb"  # exact beats prefix
    assert resolve_run(three_runs, "latest") == three_runs / "20251121-bbc"
    with pytest.raises(StoreError) as err:
        resolve_run(three_runs, "20251121")
    assert "ambiguous" in str(err.value)
    assert "20251121-bbb" in str(err.value) and "20251121-bbc" in str(err.value)
    with pytest.raises(StoreError, match="no run matching 'zzz'"):
        resolve_run(three_runs, "zzz")
    with pytest.raises(StoreError, match="no run matching"):
        resolve_run(three_runs, "not-a-run")  # folder without run.db is not a run


def test_resolve_run_empty_or_missing_store(runs_dir: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        resolve_run(runs_dir, "latest")
    runs_dir.mkdir()
    with pytest.raises(StoreError, match="no runs in"):
        resolve_run(runs_dir, "latest")


def test_schema_1_database_reads_without_audits_and_gains_the_table_when_written(tmp_path):
    store = RunStore.create(tmp_path, "old", config={}, model="vae", strategy="fedavg", num_rounds=1)
    store.close()
    db = tmp_path / "old" / DB_NAME
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE audit")
    conn.execute("PRAGMA user_version = 1")  # as fedgen before audits wrote it
    conn.commit()
    conn.close()
    with RunStore.open(tmp_path / "old") as ro:
        assert ro.audits() == []
    with RunStore.open(tmp_path / "old", readonly=False) as rw:
        rw.record_audit({"level": "sample", "method": "m", "m": 8, "empirical_epsilon": 0.0,
                         "claimed_epsilon": 8.0, "confidence": 0.95})
        assert [a["canaries"] for a in rw.audits()] == [8]
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    conn.close()
    with pytest.raises(StoreError, match="audit level"):
        with RunStore.open(tmp_path / "old", readonly=False) as rw:
            rw.record_audit({"level": "global", "m": 1, "empirical_epsilon": 0.0, "claimed_epsilon": 1.0})
