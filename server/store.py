"""Run store: one SQLite database per run, written by the server, read by the CLI.

Layout::

    <runs_dir>/<run_id>/run.db        this store (WAL mode)
    <runs_dir>/<run_id>/samples/...   artefacts, referenced by relative path from round rows

The database is opened in WAL mode so a reader (``fedgen status`` / ``watch``) never
blocks the writer (the server) and always sees the last committed round.  Every write
is a single transaction: a crash never leaves half a round behind.

Finding the runs of a runs directory (listing them, resolving ``latest`` or an id prefix)
is ``server.runs_index``.

The schema (the tables, their columns, a row to its dict and back) is ``server.store_schema``,
and how one value is stored ``server.store_values``; this module creates, opens, writes and
reads a run's database.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from common.config import family_eval_metrics
from common.metrics import FID_METRICS, best_metric
from server.store_schema import (
    APPLICATION_ID,
    AUDIT_TABLE,
    ROUND_TABLE,
    RUN_STATUSES,
    SCHEMA,
    SCHEMA_VERSION,
    SITE_COLUMNS,
    SITE_KEYS,
    SITE_ROUND_TABLE,
    SITE_STATUSES,
    SiteColumn,
    audit_from_row,
    audit_row,
    round_from_row,
    round_row,
    site_fields_from_metrics,
    site_from_row,
    site_row,
)
from server.store_values import StoreError, _dumps, _int, _loads

__all__ = [
    "APPLICATION_ID",
    "DB_NAME",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "SITE_COLUMNS",
    "SITE_KEYS",
    "SITE_STATUSES",
    "SiteColumn",
    "RunStore",
    "StoreError",
    "site_fields_from_metrics",
]

DB_NAME = "run.db"
BUSY_TIMEOUT_MS = 5000

_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _db_path(run_dir: str | Path) -> tuple[Path, Path]:
    path = Path(run_dir)
    if path.name == DB_NAME and not path.is_dir():
        return path.parent, path
    return path, path / DB_NAME


# --------------------------------------------------------------------------- store


class RunStore:
    """Handle on one run's database. Use :meth:`create` (server) or :meth:`open`."""

    def __init__(self, run_dir: Path, conn: sqlite3.Connection, *, readonly: bool) -> None:
        self.run_dir: Path = run_dir
        self.db_path: Path = run_dir / DB_NAME
        self.readonly = readonly
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.RLock()

    # ---- construction -------------------------------------------------------

    @classmethod
    def create(
        cls,
        runs_dir: str | Path,
        run_id: str,
        *,
        config: dict,
        model: str,
        strategy: str,
        num_rounds: int,
    ) -> "RunStore":
        """Create ``<runs_dir>/<run_id>/run.db`` and return a writable store.

        The database is built under a temporary name and linked into place, so a
        concurrent reader never sees a half-initialised ``run.db``.
        """
        if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id) or run_id == "latest":
            raise StoreError(
                f"invalid run id {run_id!r}: use letters, digits, '.', '_' or '-' "
                "(starting with a letter or digit, at most 128 characters, not 'latest')"
            )
        num_rounds_i = _int(num_rounds, "num_rounds")
        if num_rounds_i is None or num_rounds_i < 0:
            raise StoreError(f"invalid num_rounds {num_rounds!r}")
        config_json = _dumps(config if config is not None else {}, "run config")

        run_dir = Path(runs_dir) / run_id
        db_path = run_dir / DB_NAME
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create run folder {run_dir}: {exc.strerror or exc}") from exc
        if db_path.exists():
            raise StoreError(f"run {run_id!r} already exists: {db_path}")

        tmp_path = run_dir / f".{DB_NAME}.{os.getpid()}.{threading.get_ident()}.tmp"
        now = time.time()
        try:
            conn = sqlite3.connect(tmp_path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
            try:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":  # e.g. network file systems
                    warnings.warn(f"{db_path}: SQLite WAL mode unavailable (got {mode!r}); "
                                  "readers may briefly block the server", RuntimeWarning, stacklevel=2)
                conn.execute("BEGIN IMMEDIATE")
                for stmt in filter(str.strip, SCHEMA.split(";")):
                    conn.execute(stmt)
                conn.execute(
                    "INSERT INTO run (run_id, created_at, updated_at, model, strategy, num_rounds,"
                    " status, config_json) VALUES (?, ?, ?, ?, ?, ?, 'running', ?)",
                    (run_id, now, now, str(model), str(strategy), num_rounds_i, config_json),
                )
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            finally:
                conn.close()
            try:
                os.link(tmp_path, db_path)  # atomic, refuses to clobber
            except FileExistsError as exc:
                raise StoreError(f"run {run_id!r} already exists: {db_path}") from exc
            except OSError:  # file system without hard links
                os.replace(tmp_path, db_path)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot create run database {db_path}: {exc}") from exc
        except OSError as exc:
            raise StoreError(f"cannot create run database {db_path}: {exc.strerror or exc}") from exc
        finally:
            for suffix in ("", "-wal", "-shm"):
                try:
                    Path(f"{tmp_path}{suffix}").unlink()
                except FileNotFoundError:
                    pass
        return cls.open(run_dir, readonly=False)

    @classmethod
    def open(cls, run_dir: str | Path, *, readonly: bool = True) -> "RunStore":
        """Open an existing run folder (or its ``run.db``). Read-only by default."""
        run_dir, db_path = _db_path(run_dir)
        if not db_path.is_file():
            if not run_dir.exists():
                raise StoreError(f"no run folder at {run_dir}")
            raise StoreError(f"no run database at {db_path}")
        conn: sqlite3.Connection | None = None
        try:
            uri = db_path.resolve().as_uri() + ("?mode=ro" if readonly else "?mode=rw")
            conn = sqlite3.connect(
                uri, uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000,
                check_same_thread=False,
            )
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if app_id != APPLICATION_ID:
                raise StoreError(f"{db_path} is not a fedgen run database (empty, foreign or incompletely created)")
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{db_path} uses run-store schema version {version}, but this fedgen only "
                    f"understands up to version {SCHEMA_VERSION}; upgrade fedgen to read it"
                )
            if version < 1:
                raise StoreError(f"{db_path} has unknown run-store schema version {version}")
            if not readonly:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA foreign_keys = ON")
                if version == 1:  # schema 2 only adds the audit table
                    conn.execute("BEGIN IMMEDIATE")
                    conn.execute(AUDIT_TABLE.ddl)
                    conn.execute("PRAGMA user_version = 2")
                    conn.execute("COMMIT")
            conn.execute("PRAGMA synchronous = NORMAL")
            if conn.execute("SELECT count(*) FROM run").fetchone()[0] != 1:
                raise StoreError(f"{db_path} is damaged: expected exactly one run row")
        except StoreError:
            if conn is not None:
                conn.close()
            raise
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise StoreError(f"cannot read run database {db_path}: {exc}") from exc
        return cls(run_dir, conn, readonly=readonly)

    # ---- plumbing ----------------------------------------------------------

    def __repr__(self) -> str:
        return f"RunStore({str(self.run_dir)!r}, readonly={self.readonly})"

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _c(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"run store {self.db_path} is closed")
        return self._conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: a consistent snapshot across several queries."""
        with self._lock:
            conn = self._c()
            try:
                conn.execute("BEGIN")
                try:
                    yield conn
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read run database {self.db_path}: {exc}") from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise StoreError(f"run store {self.db_path} was opened read-only")
        with self._lock:
            conn = self._c()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise StoreError(f"cannot write run database {self.db_path}: {exc}") from exc

    # ---- writes ------------------------------------------------------------

    def record_round(self, record: dict) -> None:
        """Store one round (round row + all site rows) in a single transaction.

        An existing row for the same round is replaced, site rows included. Unknown
        top-level keys (and unknown per-site keys) are kept in ``extra_json``.
        """
        if not isinstance(record, dict):
            raise StoreError(f"round record must be a dict, got {type(record).__name__}")
        rnd = _int(record.get("round"), "round")
        if rnd is None or rnd < 0:
            raise StoreError(f"round record needs a non-negative integer 'round', got {record.get('round')!r}")
        num_rounds = _int(record.get("num_rounds"), "num_rounds")
        row = round_row(record, time.time())
        site_rows = [site_row(rnd, seq, site) for seq, site in enumerate(record.get("sites") or [])]
        with self._write() as conn:
            conn.execute("DELETE FROM site_round WHERE round = ?", (rnd,))
            conn.execute("DELETE FROM round WHERE round = ?", (rnd,))
            conn.execute(ROUND_TABLE.insert, row)
            self._insert_sites(conn, site_rows)
            if num_rounds is not None:  # a resumed run may extend the plan
                conn.execute("UPDATE run SET num_rounds = ?", (num_rounds,))
            conn.execute("UPDATE run SET updated_at = ?", (time.time(),))

    def _insert_sites(self, conn: sqlite3.Connection, site_rows: list[tuple]) -> None:
        conn.executemany(SITE_ROUND_TABLE.insert, site_rows)

    def record_audit(self, result: dict) -> None:
        """Store one audit result (``level``, ``method``, ``m``, ``empirical_epsilon``, ``claimed_epsilon``, ...).

        Infinite epsilons (no DP claim; an unbounded estimate) are stored as SQLite's
        infinity and read back as ``math.inf``.
        """
        row = audit_row(result, time.time())
        with self._write() as conn:
            conn.execute(AUDIT_TABLE.insert, row)
            conn.execute("UPDATE run SET updated_at = ?", (time.time(),))

    def audits(self) -> list[dict]:
        """Every audit of this run, oldest first ([] for a version-1 database)."""
        with self._read() as conn:
            has = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit'").fetchone()
            rows = conn.execute(AUDIT_TABLE.select).fetchall() if has else []
        out = []
        for row in rows:
            rec = audit_from_row(row)
            # A user-level audit reports two estimates; a violation is either above the claim.
            est = rec["details"].get("estimate", rec["empirical_epsilon"])
            est = float(est) if isinstance(est, (int, float, str)) else rec["empirical_epsilon"]
            rec["violation"] = max(rec["empirical_epsilon"], est) > rec["claimed_epsilon"]
            out.append(rec)
        return out

    def set_status(self, status: str, reason: str | None = None) -> None:
        """Set the run status; any status other than ``running`` also stamps ``ended_at``."""
        if status not in RUN_STATUSES:
            raise StoreError(f"run status must be one of {', '.join(RUN_STATUSES)}, got {status!r}")
        now = time.time()
        with self._write() as conn:
            conn.execute(
                "UPDATE run SET status = ?, status_reason = ?, ended_at = ?, updated_at = ?",
                (status, None if reason is None else str(reason), None if status == "running" else now, now),
            )

    # ---- reads -------------------------------------------------------------

    def run_info(self) -> dict:
        """The run row plus derived progress: rounds_done, best metric, max epsilon."""
        with self._read() as conn:
            run = conn.execute(
                "SELECT run_id, created_at, updated_at, ended_at, model, strategy, num_rounds,"
                " status, status_reason, config_json FROM run"
            ).fetchone()
            agg = conn.execute(
                "SELECT max(CASE WHEN round >= 1 THEN round END), max(round),"
                " max(epsilon_max), max(user_epsilon) FROM round"
            ).fetchone()
            evals = conn.execute("SELECT round, eval_metrics_json FROM round ORDER BY round").fetchall()
        if run is None:
            raise StoreError(f"{self.db_path} is damaged: the run row is missing")
        return {
            "run_id": run[0],
            "run_dir": str(self.run_dir),
            "created_at": run[1],
            "updated_at": run[2],
            "ended_at": run[3],
            "model": run[4],
            "strategy": run[5],
            "num_rounds": run[6],
            "status": run[7],
            "status_reason": run[8],
            "config": _loads(run[9], {}),
            "schema_version": SCHEMA_VERSION,
            "rounds_done": agg[0] or 0,
            "last_round": agg[1],
            # FID first (every image run), then the family's own (common/metrics.py).
            "best_metric": best_metric(((r, _loads(e, {})) for r, e in evals),
                                       FID_METRICS + family_eval_metrics(run[4])),
            "max_epsilon": agg[2],
            "max_user_epsilon": agg[3],
        }

    def rounds(self) -> list[dict]:
        """All round records, in the shape given to :meth:`record_round`, ordered by round."""
        with self._read() as conn:
            round_rows = conn.execute(ROUND_TABLE.select).fetchall()
            site_rows = conn.execute(SITE_ROUND_TABLE.select).fetchall()
        sites: dict[int, list[dict]] = {}
        for row in site_rows:
            rnd, site = site_from_row(row)
            sites.setdefault(rnd, []).append(site)
        return [round_from_row(row, sites) for row in round_rows]
