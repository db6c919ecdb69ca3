"""The run store's schema (``server/store_schema.py``): what a database of each version holds, and
the site-entry keys a site's reply fills."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from server.store import DB_NAME, SCHEMA_VERSION, SITE_COLUMNS, RunStore, site_fields_from_metrics

ROOT = Path(__file__).resolve().parents[2]

#: The DDL of every schema version, as fedgen of that version created it. Never edit an entry:
#: a change to the tables (a column, a type, a constraint, an index, their order) is a new
#: SCHEMA_VERSION, an upgrade step in ``RunStore.open``, and a new entry here.
FROZEN_SCHEMAS: dict[int, str] = {
    2: """
    CREATE TABLE run (
        run_id        TEXT PRIMARY KEY,
        created_at    REAL NOT NULL,
        updated_at    REAL NOT NULL,
        ended_at      REAL,
        model         TEXT NOT NULL,
        strategy      TEXT NOT NULL,
        num_rounds    INTEGER NOT NULL,
        status        TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'stopped')),
        status_reason TEXT,
        config_json   TEXT NOT NULL
    );
    CREATE TABLE round (
        round              INTEGER PRIMARY KEY CHECK (round >= 0),
        num_rounds         INTEGER,
        started_at         REAL,
        ended_at           REAL,
        sampled_json       TEXT NOT NULL DEFAULT '[]',
        train_metrics_json TEXT NOT NULL DEFAULT '{}',
        eval_metrics_json  TEXT NOT NULL DEFAULT '{}',
        epsilon_max        REAL,
        user_epsilon       REAL,
        bytes_sent         INTEGER,
        bytes_received     INTEGER,
        artifacts_json     TEXT NOT NULL DEFAULT '{}',
        extra_json         TEXT NOT NULL DEFAULT '{}',
        recorded_at        REAL NOT NULL
    );
    CREATE TABLE site_round (
        round            INTEGER NOT NULL REFERENCES round(round) ON DELETE CASCADE,
        seq              INTEGER NOT NULL,
        node_id          INTEGER NOT NULL,
        partition_id     INTEGER,
        status           TEXT NOT NULL CHECK (status IN ('ok', 'failed', 'refused')),
        reason           TEXT,
        epsilon          REAL,
        budget           REAL,
        delta            REAL,
        noise_multiplier REAL,
        sample_rate      REAL,
        clip_fraction    REAL,
        num_examples     INTEGER,
        train_loss       REAL,
        metrics_json     TEXT NOT NULL DEFAULT '{}',
        extra_json       TEXT NOT NULL DEFAULT '{}',
        PRIMARY KEY (round, seq)
    );
    CREATE INDEX site_round_node ON site_round (node_id, round);
    CREATE TABLE audit (
        seq               INTEGER PRIMARY KEY,
        level             TEXT NOT NULL CHECK (level IN ('user', 'sample')),
        method            TEXT NOT NULL,
        canaries          INTEGER NOT NULL,
        confidence        REAL,
        empirical_epsilon REAL NOT NULL,
        claimed_epsilon   REAL NOT NULL,
        delta             REAL,
        seconds           REAL,
        details_json      TEXT NOT NULL DEFAULT '{}',
        recorded_at       REAL NOT NULL
    );
""",
}


def _normalised(sql: str) -> str:
    return " ".join(sql.split())


def schema_of(conn: sqlite3.Connection) -> dict[tuple[str, str], str]:
    """Every table and index a database declares, with its DDL normalised for whitespace."""
    rows = conn.execute("SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL").fetchall()
    return {(kind, name): _normalised(sql) for kind, name, sql in rows}


def frozen_schema(version: int) -> dict[tuple[str, str], str]:
    assert version in FROZEN_SCHEMAS, f"add the DDL of run-store schema version {version} to FROZEN_SCHEMAS"
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(FROZEN_SCHEMAS[version])
        return schema_of(conn)
    finally:
        conn.close()


def db_schema(db: Path) -> dict[tuple[str, str], str]:
    conn = sqlite3.connect(db)
    try:
        return schema_of(conn)
    finally:
        conn.close()


def assert_frozen(got: dict, version: int) -> None:
    want = frozen_schema(version)
    changed = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    assert not changed, (
        f"the run-store schema is not the frozen schema of version {version} (SCHEMA_VERSION); changed: "
        f"{', '.join(f'{kind} {name}' for kind, name in changed)}. A schema change needs a new "
        "SCHEMA_VERSION, an upgrade in RunStore.open and a new FROZEN_SCHEMAS entry.\n"
        + "\n".join(f"{k}:\n  now:    {got.get(k)}\n  frozen: {want.get(k)}" for k in changed)
    )


def test_a_new_store_has_the_frozen_schema_of_its_version(tmp_path: Path) -> None:
    RunStore.create(tmp_path, "new", config={}, model="vae", strategy="fedavg", num_rounds=1).close()
    assert_frozen(db_schema(tmp_path / "new" / DB_NAME), SCHEMA_VERSION)


def test_a_version_1_store_opened_for_writing_gains_exactly_the_frozen_audit_table(tmp_path: Path) -> None:
    RunStore.create(tmp_path, "old", config={}, model="vae", strategy="fedavg", num_rounds=1).close()
    db = tmp_path / "old" / DB_NAME
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE audit")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    RunStore.open(tmp_path / "old", readonly=False).close()
    assert_frozen(db_schema(db), 2)


def test_the_frozen_check_names_a_changed_table(tmp_path: Path) -> None:
    RunStore.create(tmp_path, "r", config={}, model="vae", strategy="fedavg", num_rounds=1).close()
    db = tmp_path / "r" / DB_NAME
    conn = sqlite3.connect(db)
    conn.execute("ALTER TABLE round ADD COLUMN note TEXT")
    conn.commit()
    conn.close()
    with pytest.raises(AssertionError, match="changed: table round") as failure:
        assert_frozen(db_schema(db), SCHEMA_VERSION)
    assert "note TEXT" in str(failure.value)


# --------------------------------------------------------------------------- a site's reply -> its entry


def test_each_site_column_names_the_reply_metric_it_is_filled_from() -> None:
    from common import records as R

    assert {c.key: c.metric for c in SITE_COLUMNS if c.metric} == {
        "partition_id": R.PARTITION, "epsilon": R.EPSILON, "budget": R.BUDGET, "delta": R.DELTA,
        "noise_multiplier": R.NOISE, "sample_rate": R.SAMPLE_RATE, "clip_fraction": R.CLIP_FRACTION,
        "num_examples": R.NUM_EXAMPLES, "train_loss": R.TRAIN_LOSS,
    }


def test_site_fields_from_a_dp_reply() -> None:
    from common import records as R

    metrics = {R.WEIGHT: 1.0, R.PARTITION: 3.0, R.EPSILON: 1.25, R.BUDGET: 8.0, R.DELTA: 1e-5, R.NOISE: 1.1,
               R.SAMPLE_RATE: 0.02, R.CLIP_FRACTION: 0.4, R.TRAIN_LOSS: 0.5, R.STEPS: 40.0, R.SITE_SECONDS: 2.5}
    fields = site_fields_from_metrics(metrics)
    assert fields == {"partition_id": 3, "epsilon": 1.25, "budget": 8.0, "delta": 1e-5, "noise_multiplier": 1.1,
                      "sample_rate": 0.02, "clip_fraction": 0.4, "num_examples": None, "train_loss": 0.5}
    assert type(fields["partition_id"]) is int
    assert list(fields) == [c.key for c in SITE_COLUMNS if c.metric]  # a site entry's key order


def test_site_fields_of_a_reply_without_them_are_none() -> None:
    assert site_fields_from_metrics({}) == dict.fromkeys(
        ["partition_id", "epsilon", "budget", "delta", "noise_multiplier", "sample_rate", "clip_fraction",
         "num_examples", "train_loss"])
    plain = site_fields_from_metrics({"num-examples": 180.0, "train-loss": 0.7, "partition-id": 0.0})
    assert (plain["partition_id"], plain["num_examples"], plain["epsilon"]) == (0, 180.0, None)


def test_a_site_entry_built_from_a_reply_round_trips_through_the_store(tmp_path: Path) -> None:
    metrics = {"partition-id": 2.0, "epsilon": 0.75, "num-examples": 180.0, "train-loss": 0.5}
    entry = {"node_id": 2**64 - 1, "status": "ok", "reason": None, **site_fields_from_metrics(metrics),
             "metrics": metrics}
    with RunStore.create(tmp_path, "r", config={}, model="vae", strategy="fedavg", num_rounds=1) as store:
        store.record_round({"round": 1, "sites": [entry]})
        assert store.rounds()[0]["sites"] == [entry]


def test_the_run_store_imports_neither_torch_nor_flower() -> None:
    # Every read-only CLI command opens the store; torch and Flower would add seconds to each.
    code = "import json, sys, server.store; print(json.dumps(sorted(m for m in ('torch', 'flwr') if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
