"""Reading what a job wrote: its run folder under a runs dir and the round records in it.

A run folder is one with a ``rounds.jsonl`` (one JSON record per round, written by
``server.round_records.RoundRecorder``); round 0 is the initial evaluation, rounds 1..R are trained.
Used by the deployment CLI and the benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_rounds(path: Path) -> list[dict]:
    """The records of one ``rounds.jsonl``-style file (one JSON object a line; blank lines skipped)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_records(runs_dir: Path, *, newest: bool = False) -> tuple[Path | None, list[dict]]:
    """A run folder under ``runs_dir`` and its round records.

    By default ``runs_dir`` must hold exactly one run (a benchmark's own runs dir), else
    ``ValueError``. With ``newest``, the most recently modified run folder is read (a shared
    runs dir), and ``(None, [])`` is returned when there is none yet.
    """
    folders = sorted((p for p in runs_dir.iterdir() if (p / "rounds.jsonl").exists()), key=lambda p: p.stat().st_mtime)
    if newest:
        if not folders:
            return None, []
    elif len(folders) != 1:
        raise ValueError(f"expected exactly one run folder (with rounds.jsonl) under {runs_dir}, "
                         f"found {len(folders)}: {[p.name for p in folders]}")
    return folders[-1], read_rounds(folders[-1] / "rounds.jsonl")


def round_seconds(records: list[dict]) -> list[float]:
    """Wall time of rounds 1..R (round 0 is the initial evaluation)."""
    return [r["ended_at"] - r["started_at"] for r in records if r["round"] >= 1]
