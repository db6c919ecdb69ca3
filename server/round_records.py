"""A round's record: one row per sampled site, the human-readable line, where records are written."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from flwr.app import Message

from common import records as R
from server.store import site_fields_from_metrics

log = logging.getLogger("server.rounds")  # the round lines keep the loop's logger name


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def round_line(rec: dict, num_rounds: int) -> str:
    """One human-readable line per round."""
    sites = rec["sites"]
    ok = sum(s["status"] == "ok" for s in sites)
    failed = sum(s["status"] == "failed" for s in sites)
    refused = sum(s["status"] == "refused" for s in sites)
    ev = " ".join(f"{k}={_fmt(v)}" for k, v in rec["eval"].items() if not k.endswith("-n"))
    parts = [
        f"round {rec['round']}/{num_rounds}",
        f"sites ok={ok} failed={failed}" + (f" refused={refused}" if refused else ""),
        *([f"train-loss={_fmt(rec['train'][R.TRAIN_LOSS])}"] if R.TRAIN_LOSS in rec["train"] else []),
        ev or "eval=-",
        f"eps_max={_fmt(rec.get('epsilon_max'), '.3f')}"
        + (f" user_eps={rec['user_epsilon']:.3f}" if rec.get("user_epsilon") is not None else ""),
        f"{rec['ended_at'] - rec['started_at']:.1f}s",
    ]
    return " | ".join(parts)


class RoundRecorder:
    """Writes each round to ``rounds.jsonl`` and to the run store, and prints its line; ``also``
    (the live trackers, server/trackers.py) gets the record after that, and never raises."""

    def __init__(self, run_dir: Path, store: Any, num_rounds: int, also: Any = None) -> None:
        self.run_dir, self.store, self.num_rounds, self.also = run_dir, store, num_rounds, also
        self.jsonl = run_dir / "rounds.jsonl"

    def __call__(self, rec: dict) -> None:
        with self.jsonl.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if self.store is not None:
            self.store.record_round(rec)
        log.info("%s", round_line(rec, self.num_rounds))
        if self.also is not None:
            self.also(rec)


def site_row(msg: Message, status: str, reason: str | None) -> dict:
    """A round record's entry for one reply: the columns of the run store's site table that the
    reply's metrics fill (``server/store_schema.py``: SITE_COLUMNS), and every metric it sent."""
    metrics: dict[str, float] = {}
    if not msg.has_error():
        for m in msg.content.metric_records.values():
            metrics.update({k: float(v) for k, v in m.items() if not isinstance(v, list)})
    return {"node_id": int(msg.metadata.src_node_id), "status": status, "reason": reason,
            **site_fields_from_metrics(metrics), "metrics": metrics}


def site_tag(row: dict) -> str:
    """A site's name across rounds and restarts: its partition when it reported one, else its node id."""
    part = row.get("partition_id")
    return f"partition-{part}" if part is not None else f"node-{row['node_id']}"


def known_epsilons(records: list[dict]) -> dict[str, float]:
    """Every site's last reported epsilon in recorded rounds (the federation's epsilon is their maximum)."""
    known: dict[str, float] = {}
    for rec in records:
        for row in rec.get("sites") or []:
            if row.get("epsilon") is not None:
                known[site_tag(row)] = float(row["epsilon"])
    return known


