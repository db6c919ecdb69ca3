"""Reading a finished simulation's run folder, for the integration tests."""

from __future__ import annotations

import json
from pathlib import Path


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]


def only_run(runs: Path) -> Path:
    (run_dir,) = [p for p in runs.iterdir() if (p / "run.db").exists()]
    return run_dir
