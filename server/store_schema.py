"""The run store's schema: its tables and columns, and how a value is stored and read back.

``server.store`` (``RunStore``) executes what this module spells. Other modules import its
names from ``server.store``.

Schema (``PRAGMA user_version`` = :data:`SCHEMA_VERSION`, ``PRAGMA application_id`` =
:data:`APPLICATION_ID`):

* ``run``        exactly one row describing the run (status, resolved config, ...)
* ``round``      one row per server round; round 0 is the evaluation of the initial model
* ``site_round`` one row per (round, sampled site), ordered by ``seq`` (the order the
  server reported them in)
* ``audit``      (schema 2) one row per empirical privacy audit of the run: level (user /
  sample), method, canaries, confidence, the empirical and the claimed epsilon, cost.
  A version-1 database gains the table when opened for writing; read-only, it has none.

Flower node ids are unsigned 64-bit integers; SQLite integers are signed, so node ids
are stored with the same uint64 -> int64 mapping Flower's own state uses and mapped back
when read.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable

__all__ = [
    "APPLICATION_ID",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "SITE_COLUMNS",
    "SITE_KEYS",
    "SITE_STATUSES",
    "SiteColumn",
    "StoreError",
]

SCHEMA_VERSION: int = 2
#: Marks a SQLite file as a fedgen run database ("FGEN").
APPLICATION_ID: int = 0x4647454E

RUN_STATUSES = ("running", "completed", "failed", "stopped")
SITE_STATUSES = ("ok", "failed", "refused")

_U64 = 1 << 64
_I64 = 1 << 63


class StoreError(RuntimeError):
    """A run-store problem worth showing to the operator as-is (names the path)."""


# --------------------------------------------------------------------------- values


def _json_default(obj: Any) -> Any:
    item = getattr(obj, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    tolist = getattr(obj, "tolist", None)  # small numpy arrays
    if callable(tolist):
        return tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _dumps(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, default=_json_default, sort_keys=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"cannot store {what}: {exc}") from exc


def _loads(text: str | None, default: Any) -> Any:
    if text is None:
        return default
    return json.loads(text)


def _scalar(value: Any) -> Any:
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, (int, float, str)):
        return item()
    return value


def _float(value: Any, what: str) -> float | None:
    if value is None:
        return None
    value = _scalar(value)
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"cannot store {what}={value!r}: not a number") from exc


def _int(value: Any, what: str) -> int | None:
    if value is None:
        return None
    value = _scalar(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise StoreError(f"cannot store {what}={value!r}: not an integer")
    return value


def _node_to_db(node_id: Any, what: str) -> int:
    value = _int(node_id, what)
    if value is None or not 0 <= value < _U64:
        raise StoreError(f"cannot store {what}={node_id!r}: Flower node ids are unsigned 64-bit integers")
    return value - _U64 if value >= _I64 else value


def _node_from_db(value: int) -> int:
    return value + _U64 if value < 0 else value


def _text(value: Any, what: str) -> str | None:
    return None if value is None else str(value)


def _json_object(value: Any, what: str) -> str:
    return _dumps(dict(value or {}), what)


def _json_object_from_db(text: str | None) -> dict:
    return _loads(text, {})


def _as_stored(value: Any) -> Any:
    return value


# --------------------------------------------------------------------------- tables


_RUN_AND_ROUND_TABLES = """
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
"""
_AUDIT_TABLE = """CREATE TABLE audit (
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
"""
# ``site_round`` is generated from SITE_COLUMNS (below); _SCHEMA is all four tables.

_ROUND_KEYS = (
    "round", "num_rounds", "started_at", "ended_at", "sampled", "sites", "train", "eval",
    "epsilon_max", "user_epsilon", "bytes_sent", "bytes_received", "artifacts",
)


# --------------------------------------------------------------------------- site rows


@dataclass(frozen=True)
class SiteColumn:
    """One key of a site entry (a dict of a round record's ``sites``) and its ``site_round`` column.

    ``to_db(value, what)`` turns ``site.get(key)`` into what is stored (raising StoreError
    naming ``what``); ``from_db`` turns the stored value back.
    """

    key: str
    sql: str
    to_db: Callable[[Any, str], Any]
    from_db: Callable[[Any], Any] = _as_stored
    column: str = ""  # the column's name when it is not the key

    @property
    def name(self) -> str:
        return self.column or self.key


#: The per-site columns of ``site_round``, in table order. The table's DDL, the INSERT, the
#: SELECT and the conversions both ways are generated from this tuple; keys a site entry
#: has beyond these are kept in ``extra_json``.
SITE_COLUMNS: tuple[SiteColumn, ...] = (
    SiteColumn("node_id", "INTEGER NOT NULL", _node_to_db, _node_from_db),
    SiteColumn("partition_id", "INTEGER", _int),
    SiteColumn("status", "TEXT NOT NULL CHECK (status IN ({}))".format(", ".join(f"'{s}'" for s in SITE_STATUSES)),
               _text),
    SiteColumn("reason", "TEXT", _text),
    SiteColumn("epsilon", "REAL", _float),
    SiteColumn("budget", "REAL", _float),
    SiteColumn("delta", "REAL", _float),
    SiteColumn("noise_multiplier", "REAL", _float),
    SiteColumn("sample_rate", "REAL", _float),
    SiteColumn("clip_fraction", "REAL", _float),
    SiteColumn("num_examples", "INTEGER", _int),
    SiteColumn("train_loss", "REAL", _float),
    SiteColumn("metrics", "TEXT NOT NULL DEFAULT '{}'", _json_object, _json_object_from_db, column="metrics_json"),
)
SITE_KEYS: tuple[str, ...] = tuple(c.key for c in SITE_COLUMNS)
#: Every column of ``site_round``: the row's place (round, order reported), the site's keys, the rest.
_SITE_ROUND_COLUMNS = ("round", "seq", *(c.name for c in SITE_COLUMNS), "extra_json")


def _site_round_table() -> str:
    columns = [
        ("round", "INTEGER NOT NULL REFERENCES round(round) ON DELETE CASCADE"),
        ("seq", "INTEGER NOT NULL"),
        *((c.name, c.sql) for c in SITE_COLUMNS),
        ("extra_json", "TEXT NOT NULL DEFAULT '{}'"),
    ]
    width = max(len(name) for name, _ in columns)
    body = "".join(f"    {name:<{width}} {sql},\n" for name, sql in columns)
    return f"CREATE TABLE site_round (\n{body}    PRIMARY KEY (round, seq)\n);\n"


_SCHEMA = (
    _RUN_AND_ROUND_TABLES
    + _site_round_table()
    + "CREATE INDEX site_round_node ON site_round (node_id, round);\n"
    + _AUDIT_TABLE
)
_INSERT_SITE = "INSERT INTO site_round ({}) VALUES ({})".format(
    ", ".join(_SITE_ROUND_COLUMNS), ", ".join("?" * len(_SITE_ROUND_COLUMNS))
)
_SELECT_SITES = "SELECT round, {}, extra_json FROM site_round ORDER BY round, seq".format(
    ", ".join(c.name for c in SITE_COLUMNS)
)


def _site_row(rnd: int, seq: int, site: dict) -> tuple:
    """The ``site_round`` row (in :data:`_SITE_ROUND_COLUMNS` order) of one site entry."""
    if not isinstance(site, dict):
        raise StoreError(f"round {rnd}: site entry #{seq} must be a dict, got {type(site).__name__}")
    what = f"round {rnd} site #{seq}"
    status = site.get("status")
    if status not in SITE_STATUSES:
        raise StoreError(f"{what}: status must be one of {', '.join(SITE_STATUSES)}, got {status!r}")
    values = tuple(c.to_db(site.get(c.key), f"{what} {c.key}") for c in SITE_COLUMNS)
    extra = _dumps({k: v for k, v in site.items() if k not in SITE_KEYS}, f"{what} extra keys")
    return (rnd, seq, *values, extra)


def _site_from_row(values: tuple) -> dict:
    """A site entry back from a :data:`_SELECT_SITES` row without its round: the inverse of :func:`_site_row`."""
    site = {c.key: c.from_db(v) for c, v in zip(SITE_COLUMNS, values[:-1])}
    site.update(_loads(values[-1], {}))
    return site
