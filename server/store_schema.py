"""The run store's schema: its tables, their columns, and a row written from a dict and read back.

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

How one value (a number, a JSON object, a Flower node id) is stored and read back is
``server.store_values``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

from server.store_values import (
    StoreError,
    _as_stored,
    _dumps,
    _float,
    _int,
    _json_list,
    _json_list_from_db,
    _json_object,
    _json_object_from_db,
    _loads,
    _node_from_db,
    _node_to_db,
    _str,
    _text,
)

__all__ = [
    "APPLICATION_ID",
    "AUDIT_COLUMNS",
    "AUDIT_LEVELS",
    "AUDIT_TABLE",
    "ROUND_COLUMNS",
    "ROUND_KEYS",
    "ROUND_TABLE",
    "RUN_STATUSES",
    "SCHEMA",
    "SCHEMA_VERSION",
    "SITE_COLUMNS",
    "SITE_KEYS",
    "SITE_ROUND_TABLE",
    "SITE_STATUSES",
    "Column",
    "SiteColumn",
    "Table",
    "audit_from_row",
    "audit_row",
    "round_from_row",
    "round_row",
    "site_from_row",
    "site_fields_from_metrics",
    "site_row",
]

SCHEMA_VERSION: int = 2
#: Marks a SQLite file as a fedgen run database ("FGEN").
APPLICATION_ID: int = 0x4647454E

RUN_STATUSES = ("running", "completed", "failed", "stopped")
SITE_STATUSES = ("ok", "failed", "refused")
AUDIT_LEVELS = ("user", "sample")


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return "{} IN ({})".format(column, ", ".join(f"'{v}'" for v in values))


# --------------------------------------------------------------------------- columns and tables


@dataclass(frozen=True)
class Column:
    """One key of the dicts a table's rows are written from and read back into, and its column.

    ``to_db(value, what)`` turns the dict's value into what is stored (raising StoreError
    naming ``what``); ``from_db`` turns the stored value back.
    """

    key: str
    sql: str  # the column's type and constraints in the table's DDL
    to_db: Callable[[Any, str], Any]
    from_db: Callable[[Any], Any] = _as_stored
    column: str = ""  # the column's name when it is not the key
    what: str = ""  # the value's name in an error message when it is not the key
    source: str = ""  # the key it is written from when it is not the key
    missing: Any = None  # what is written when the dict has no such key

    @property
    def name(self) -> str:
        return self.column or self.key

    def to_row(self, entry: dict, where: str = "") -> Any:
        """What is stored for ``entry``; an error names ``where`` (e.g. which site), then the value."""
        what = self.what or self.key
        return self.to_db(entry.get(self.source or self.key, self.missing), f"{where} {what}" if where else what)


@dataclass(frozen=True)
class SiteColumn(Column):
    """A :class:`Column` of a site entry (a dict of a round record's ``sites``) in ``site_round``.

    ``metric`` is the key of the site's reply metrics (``common/records.py``) the entry's value
    is taken from, through ``from_metric`` (:func:`site_fields_from_metrics`). The keys are
    spelled here, not imported: ``common.records`` imports torch and Flower, which no reader
    of the store (``fedgen status``...) should pay for; tests/unit/test_store_schema.py pins
    them to the constants.
    """

    metric: str = ""  # the reply metric the entry's value comes from, if any
    from_metric: Callable[[float], Any] = _as_stored


@dataclass(frozen=True)
class Table:
    """A table whose rows hold dicts: their keys' columns, between columns the writer fills itself.

    The DDL, the INSERT and the SELECT (both of every column, in table order) are generated
    from the columns, so they cannot disagree.
    """

    name: str
    columns: tuple[Column, ...]
    order_by: str  # the SELECT's order
    head: tuple[tuple[str, str], ...] = ()  # (name, sql) of the columns before the keys' ones
    tail: tuple[tuple[str, str], ...] = ()  # and after them
    constraints: tuple[str, ...] = ()  # table constraints, after the columns

    @property
    def definitions(self) -> tuple[tuple[str, str], ...]:
        """(name, sql) of every column, in table order."""
        return (*self.head, *((c.name, c.sql) for c in self.columns), *self.tail)

    @property
    def ddl(self) -> str:
        width = max(len(name) for name, _ in self.definitions)
        lines = [f"    {name:<{width}} {sql}" for name, sql in self.definitions]
        lines += [f"    {constraint}" for constraint in self.constraints]
        return f"CREATE TABLE {self.name} (\n" + ",\n".join(lines) + "\n);\n"

    @property
    def insert(self) -> str:
        names = [name for name, _ in self.definitions]
        return f"INSERT INTO {self.name} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"

    @property
    def select(self) -> str:
        names = ", ".join(name for name, _ in self.definitions)
        return f"SELECT {names} FROM {self.name} ORDER BY {self.order_by}"


_JSON_OBJECT = "TEXT NOT NULL DEFAULT '{}'"

# --------------------------------------------------------------------------- run


#: The run's one row, written by ``RunStore.create`` and read by ``RunStore.run_info``.
_RUN_TABLE = """CREATE TABLE run (
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
"""

# --------------------------------------------------------------------------- rounds


#: The keys of a round record (what ``RunStore.record_round`` takes and ``rounds()`` returns)
#: but its site entries, as the columns of ``round`` in table order.
ROUND_COLUMNS: tuple[Column, ...] = (
    Column("round", "INTEGER PRIMARY KEY CHECK (round >= 0)", _int),
    Column("num_rounds", "INTEGER", _int),
    Column("started_at", "REAL", _float),
    Column("ended_at", "REAL", _float),
    Column("sampled", "TEXT NOT NULL DEFAULT '[]'", _json_list, _json_list_from_db, column="sampled_json"),
    Column("train", _JSON_OBJECT, _json_object, _json_object_from_db, column="train_metrics_json",
           what="train metrics"),
    Column("eval", _JSON_OBJECT, _json_object, _json_object_from_db, column="eval_metrics_json",
           what="eval metrics"),
    Column("epsilon_max", "REAL", _float),
    Column("user_epsilon", "REAL", _float),
    Column("bytes_sent", "INTEGER", _int),
    Column("bytes_received", "INTEGER", _int),
    Column("artifacts", _JSON_OBJECT, _json_object, _json_object_from_db, column="artifacts_json"),
)


def _round_keys() -> tuple[str, ...]:
    keys = [c.key for c in ROUND_COLUMNS]
    keys.insert(keys.index("sampled") + 1, "sites")  # the site entries follow the sampled node ids
    return tuple(keys)


#: Every key of a round record, in the order ``rounds()`` returns them (its other keys follow).
ROUND_KEYS: tuple[str, ...] = _round_keys()
#: A round's row: its keys' columns, the record's other keys, when the row was written.
ROUND_TABLE = Table("round", ROUND_COLUMNS, order_by="round",
                    tail=(("extra_json", _JSON_OBJECT), ("recorded_at", "REAL NOT NULL")))

# --------------------------------------------------------------------------- site rows


#: The per-site columns of ``site_round``, in table order; keys a site entry has beyond these
#: are kept in ``extra_json``.
SITE_COLUMNS: tuple[SiteColumn, ...] = (
    SiteColumn("node_id", "INTEGER NOT NULL", _node_to_db, _node_from_db),
    SiteColumn("partition_id", "INTEGER", _int, metric="partition-id", from_metric=int),
    SiteColumn("status", f"TEXT NOT NULL CHECK ({_one_of('status', SITE_STATUSES)})", _text),
    SiteColumn("reason", "TEXT", _text),
    SiteColumn("epsilon", "REAL", _float, metric="epsilon"),
    SiteColumn("budget", "REAL", _float, metric="budget"),
    SiteColumn("delta", "REAL", _float, metric="delta"),
    SiteColumn("noise_multiplier", "REAL", _float, metric="noise-multiplier"),
    SiteColumn("sample_rate", "REAL", _float, metric="sample-rate"),
    SiteColumn("clip_fraction", "REAL", _float, metric="clip-fraction"),
    SiteColumn("num_examples", "INTEGER", _int, metric="num-examples"),
    SiteColumn("train_loss", "REAL", _float, metric="train-loss"),
    SiteColumn("metrics", _JSON_OBJECT, _json_object, _json_object_from_db, column="metrics_json"),
)
SITE_KEYS: tuple[str, ...] = tuple(c.key for c in SITE_COLUMNS)
#: A site's row: its round and place in the order reported, its keys' columns, the entry's other keys.
SITE_ROUND_TABLE = Table(
    "site_round", SITE_COLUMNS, order_by="round, seq",
    head=(("round", "INTEGER NOT NULL REFERENCES round(round) ON DELETE CASCADE"), ("seq", "INTEGER NOT NULL")),
    tail=(("extra_json", _JSON_OBJECT),),
    constraints=("PRIMARY KEY (round, seq)",),
)
_SITE_ROUND_INDEX = "CREATE INDEX site_round_node ON site_round (node_id, round);\n"

# --------------------------------------------------------------------------- audits


#: The keys of an audit (``audits()`` returns them under these names; ``RunStore.record_audit``
#: reads the canaries from the result's ``m``), as the columns of ``audit`` in table order.
AUDIT_COLUMNS: tuple[Column, ...] = (
    Column("level", f"TEXT NOT NULL CHECK ({_one_of('level', AUDIT_LEVELS)})", _text),
    Column("method", "TEXT NOT NULL", _str, missing=""),
    Column("canaries", "INTEGER NOT NULL", _int, source="m", what="audit m"),
    Column("confidence", "REAL", _float, what="audit confidence"),
    Column("empirical_epsilon", "REAL NOT NULL", _float),
    Column("claimed_epsilon", "REAL NOT NULL", _float),
    Column("delta", "REAL", _float, what="audit delta"),
    Column("seconds", "REAL", _float, what="audit seconds"),
)
#: An audit's row: its number (SQLite's), its keys' columns, the whole result, when it was written.
AUDIT_TABLE = Table("audit", AUDIT_COLUMNS, order_by="seq", head=(("seq", "INTEGER PRIMARY KEY"),),
                    tail=(("details_json", _JSON_OBJECT), ("recorded_at", "REAL NOT NULL")))

#: The DDL of a new run database: the four tables (frozen per version in tests/unit/test_store_schema.py).
SCHEMA = _RUN_TABLE + ROUND_TABLE.ddl + SITE_ROUND_TABLE.ddl + _SITE_ROUND_INDEX + AUDIT_TABLE.ddl

# --------------------------------------------------------------------------- rows


def round_row(record: dict, recorded_at: float) -> tuple:
    """The ``round`` row of a round record (its site entries aside)."""
    extra = {k: v for k, v in record.items() if k not in ROUND_KEYS}
    return (*(c.to_row(record) for c in ROUND_COLUMNS), _dumps(extra, "extra round keys"), recorded_at)


def round_from_row(row: tuple, sites: dict[int, list[dict]]) -> dict:
    """A round record back from its :data:`ROUND_TABLE` row, with its entries of ``sites`` (by round)."""
    *values, extra, _recorded_at = row
    stored = {c.key: c.from_db(v) for c, v in zip(ROUND_COLUMNS, values)}
    stored["sites"] = sites.get(stored["round"], [])
    record = {key: stored[key] for key in ROUND_KEYS}
    record.update(_loads(extra, {}))
    return record


def site_row(rnd: int, seq: int, site: dict) -> tuple:
    """The ``site_round`` row of one site entry."""
    if not isinstance(site, dict):
        raise StoreError(f"round {rnd}: site entry #{seq} must be a dict, got {type(site).__name__}")
    what = f"round {rnd} site #{seq}"
    status = site.get("status")
    if status not in SITE_STATUSES:
        raise StoreError(f"{what}: status must be one of {', '.join(SITE_STATUSES)}, got {status!r}")
    values = tuple(c.to_row(site, what) for c in SITE_COLUMNS)
    extra = _dumps({k: v for k, v in site.items() if k not in SITE_KEYS}, f"{what} extra keys")
    return (rnd, seq, *values, extra)


def site_from_row(row: tuple) -> tuple[int, dict]:
    """The round and the site entry of a :data:`SITE_ROUND_TABLE` row: the inverse of :func:`site_row`."""
    rnd, _seq, *values, extra = row
    site = {c.key: c.from_db(v) for c, v in zip(SITE_COLUMNS, values)}
    site.update(_loads(extra, {}))
    return rnd, site


def site_fields_from_metrics(metrics: Mapping[str, float]) -> dict[str, Any]:
    """The keys of a site entry that a site's reply metrics fill (None for a metric it did not send).

    ``partition_id`` is an int; the others are the metrics' values.
    """
    return {c.key: None if metrics.get(c.metric) is None else c.from_metric(metrics[c.metric])
            for c in SITE_COLUMNS if c.metric}


def audit_row(result: dict, recorded_at: float) -> tuple:
    """The ``audit`` row of an audit result; its infinite or NaN details are kept as text."""
    if result.get("level") not in AUDIT_LEVELS:
        levels = " or ".join(f"'{level}'" for level in AUDIT_LEVELS)
        raise StoreError(f"audit level must be {levels}, got {result.get('level')!r}")
    details = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in result.items()}
    seq = None  # SQLite numbers the row
    return (seq, *(c.to_row(result) for c in AUDIT_COLUMNS), _dumps(details, "audit details"), recorded_at)


def audit_from_row(row: tuple) -> dict:
    """An audit back from its :data:`AUDIT_TABLE` row: its keys, ``details`` (the whole result), ``recorded_at``."""
    _seq, *values, details, recorded_at = row
    audit = {c.key: c.from_db(v) for c, v in zip(AUDIT_COLUMNS, values)}
    audit["details"] = _loads(details, {})
    audit["recorded_at"] = recorded_at
    return audit
