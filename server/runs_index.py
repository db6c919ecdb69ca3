"""The runs directory: list the runs in it and resolve an operator's reference to one.

A run is a sub-folder of the runs directory holding a ``run.db`` (``server.store``).
Writing and reading one run is ``RunStore``'s job; this module only finds runs.
"""

from __future__ import annotations

from pathlib import Path

from server.store import DB_NAME, RunStore, StoreError

__all__ = ["list_runs", "resolve_run"]


def _run_dirs(runs_dir: str | Path) -> list[Path]:
    root = Path(runs_dir)
    if not root.exists():
        raise StoreError(f"runs directory {root} does not exist")
    if not root.is_dir():
        raise StoreError(f"runs directory {root} is not a directory")
    try:
        return sorted(p for p in root.iterdir() if p.is_dir() and (p / DB_NAME).is_file())
    except OSError as exc:
        raise StoreError(f"cannot list runs directory {root}: {exc.strerror or exc}") from exc


def _corrupt_row(run_dir: Path, error: str) -> dict:
    try:
        mtime = (run_dir / DB_NAME).stat().st_mtime
    except OSError:
        mtime = None
    return {
        "run_id": run_dir.name, "run_dir": str(run_dir), "created_at": mtime, "updated_at": mtime,
        "ended_at": None, "model": None, "strategy": None, "num_rounds": None,
        "status": "corrupt", "status_reason": error, "config": None, "schema_version": None,
        "rounds_done": None, "last_round": None, "best_metric": None, "max_epsilon": None,
        "max_user_epsilon": None, "error": error,
    }


def list_runs(runs_dir: str | Path) -> list[dict]:
    """``run_info`` of every run folder with a ``run.db``, newest first.

    Unreadable databases are listed with status ``"corrupt"`` and the error message
    (also in ``error``); healthy rows have ``error`` = None. Raises StoreError only when
    ``runs_dir`` itself is missing or unreadable.
    """
    rows = []
    for run_dir in _run_dirs(runs_dir):
        try:
            with RunStore.open(run_dir) as store:
                info = store.run_info()
            info["error"] = None
        except StoreError as exc:
            info = _corrupt_row(run_dir, str(exc))
        rows.append(info)
    rows.sort(key=lambda r: (r["created_at"] or 0.0, r["run_id"]), reverse=True)
    return rows


def resolve_run(runs_dir: str | Path, ref: str) -> Path:
    """Run folder for ``ref``: a full run id, a unique id prefix, or ``latest``."""
    dirs = _run_dirs(runs_dir)
    if not dirs:
        raise StoreError(f"no runs in {Path(runs_dir)}")
    ref = (ref or "").strip()
    if not ref:
        raise StoreError("empty run reference: give a run id, a unique prefix, or 'latest'")
    by_name = {d.name: d for d in dirs}
    if ref in by_name:
        return by_name[ref]
    if ref == "latest":
        return Path(list_runs(runs_dir)[0]["run_dir"])
    matches = [d for d in dirs if d.name.startswith(ref)]
    if not matches:
        raise StoreError(f"no run matching {ref!r} in {Path(runs_dir)} (see `fedgen runs`)")
    if len(matches) > 1:
        names = ", ".join(d.name for d in matches[:10]) + (", ..." if len(matches) > 10 else "")
        raise StoreError(f"run prefix {ref!r} is ambiguous in {Path(runs_dir)}: matches {names}")
    return matches[0]
