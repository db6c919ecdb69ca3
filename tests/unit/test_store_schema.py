"""The run store's schema (``server/store_schema.py``): what a database of each version holds."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from server.store import DB_NAME, SCHEMA_VERSION, RunStore

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
