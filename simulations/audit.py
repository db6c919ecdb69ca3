"""Run a privacy audit: a federated simulation with canaries, then a site-level audit.

    python -m simulations.audit                                   # audit-vae preset, 10 sites
    python -m simulations.audit --preset audit-lm --num-sites 4
    python -m simulations.audit --set privacy.enabled=false --set central-dp.enabled=false

Same as ``fedgen audit run``. The user-level figure comes from the simulation's canary
clients (``server/canaries.py``, stored by the server); the sample-level figure from one
audit-only model trained at the site ``audit.sample-partition`` on its own data
(``client/audit.py``). Both are stored in the run's store beside the claimed epsilons.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from client.audit import AuditRefused, run_sample_audit
from common.config import parse_node_config, parse_run_config
from server.runs_index import list_runs
from server.store import RunStore, StoreError
from simulations.launch import ROOT, launch

def _new_run(runs_dir: Path, since: float) -> Path:
    fresh = [r for r in list_runs(runs_dir) if (r["created_at"] or 0) >= since and not r.get("error")]
    if not fresh:
        raise StoreError(f"the audit simulation wrote no run under {runs_dir}: it failed before round 1 "
                         "(see its output above)")
    return Path(fresh[0]["run_dir"])


def sample_audit(run_dir: Path, num_sites: int | None = None) -> str:
    """The sample-level audit of one site with the run's own config, stored in the run's store.

    Returns a line on what it cost (or why the site refused it).
    """
    cfg = parse_run_config(json.loads((Path(run_dir) / "config.json").read_text()))
    with RunStore.open(run_dir, readonly=False) as store:
        sites = cfg.data.num_partitions or num_sites or _num_sites(store)
        site = parse_node_config({"partition-id": cfg.audit.sample_partition, "num-partitions": sites})
        try:
            r = run_sample_audit(cfg, site, num_canaries=cfg.audit.sample_canaries,
                                 epochs=cfg.audit.sample_epochs or None, confidence=cfg.audit.confidence,
                                 seed=cfg.audit.seed or None)
        except AuditRefused as err:
            return f"sample-level audit refused: {err}"
        store.record_audit({**r.as_dict(), "level": "sample"})
    return (f"the sample-level audit trained one more model at site {site.partition_id} for {r.seconds:.1f} s "
            f"({r.steps} steps, {r.m} canaries, {r.included} of them inserted)")


def _num_sites(store: RunStore) -> int:
    """How many sites the run had: the partition count its sites reported."""
    rows = [s for r in store.rounds() for s in r.get("sites", []) if s.get("partition_id") is not None]
    if not rows:
        raise StoreError(f"{store.run_dir}: no site has reported yet, so the number of sites is unknown; "
                         "pass it (--num-sites)")
    return len({s["node_id"] for s in rows})


def run_audit(preset: str | None, overrides: list[str], num_sites: int, runs_dir: Path, *, sample: bool = True,
              quiet: bool = False, extra_env: dict[str, str] | None = None) -> dict:
    """Run the audit simulation (and the sample-level audit); return what was stored.

    ``extra_env`` goes to every Flower process (e.g. fault injection in drills and tests).
    """
    runs_dir = Path(runs_dir).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    launch(preset, overrides, num_sites, runs_dir, quiet=quiet, extra_env=extra_env)
    run_dir = _new_run(runs_dir, started - 1.0)
    run_seconds = time.time() - started
    cfg = parse_run_config(json.loads((run_dir / "config.json").read_text()))
    notes = []
    if not cfg.audit.user_canaries:
        notes.append("no canary clients (audit.user-canaries = 0): no user-level audit")
    with RunStore.open(run_dir) as store:
        completed = store.run_info()["status"] == "completed"
    if sample and completed:
        notes.append(sample_audit(run_dir, num_sites))
    with RunStore.open(run_dir) as store:
        audits, info = store.audits(), store.run_info()
    user = next((a for a in audits if a["level"] == "user"), None)
    if user is not None:
        notes.insert(0, f"the federated run took {run_seconds:.0f} s with {user['canaries']} canary clients "
                        f"({user['details'].get('participations')} canary updates, made at the server; "
                        "no site trained more)")
    return {"run_id": info["run_id"], "run_dir": str(run_dir), "status": info["status"], "audits": audits,
            "run_seconds": run_seconds, "cost": "cost: " + "; ".join(notes) if notes else ""}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="audit-vae", help="a simulations/<name>.toml preset (default audit-vae)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--num-sites", type=int, default=10)
    ap.add_argument("--no-sample", action="store_true", help="skip the sample-level audit")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs")
    args = ap.parse_args(argv)
    result = run_audit(args.preset, args.overrides, args.num_sites, args.runs_dir, sample=not args.no_sample)
    for a in result["audits"]:
        print(f"{a['level']:>6}: claimed epsilon {a['claimed_epsilon']:.3f}, empirical {a['empirical_epsilon']:.3f}"
              f"{' VIOLATION' if a['violation'] else ''} ({a['method']})")
    print(result["cost"])
    if result["status"] != "completed":
        return 1
    return 3 if any(a["violation"] for a in result["audits"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
