"""The user-level audit over many seeds: does either estimate ever exceed the claim?

    python -m simulations.bench_user_audit --seeds 20 --out docs/user-audit-seeds.json

Runs the integration test's audit job (preset ``audit-digits``, 3 simulated sites, site 2
crashing in round 2, user-level DP with adaptive clipping, ``audit.user-canaries``
canary clients) once per seed ``1..N`` (``audit.seed`` fixes the canaries' secrets and
``run.seed`` the rest, with ``FEDGEN_INSECURE_REPRODUCIBLE_NOISE=1`` so that each seed's run
repeats exactly, as the integration test's does), without the sample-level audit, and prints one row per seed:
the claimed user-level epsilon, both estimates (equal variances, unequal variances) and
whether either exceeds the claim. Every seed is reported; none is chosen.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common.privacy import INSECURE_REPRODUCIBLE_NOISE
from simulations.audit import run_audit


def one_seed(seed: int, num_sites: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        res = run_audit("audit-digits", [f"audit.seed={seed}", f"run.seed={seed}", *extra], num_sites, Path(tmp),
                        sample=False, quiet=True,
                        extra_env={"FEDGEN_INJECT_FAULTS": "2:crash@2", INSECURE_REPRODUCIBLE_NOISE: "1"})
    user = next((a for a in res["audits"] if a["level"] == "user"), None)
    if user is None:
        return {"seed": seed, "status": res["status"], "error": "no user-level audit was stored"}
    d = user["details"]
    return {"seed": seed, "status": res["status"], "claimed": user["claimed_epsilon"],
            "equal_variances": d["empirical_epsilon"], "unequal_variances": d["epsilon_unequal_variances"],
            "fitted_null": d["epsilon_fitted_null"], "canaries": user["canaries"], "inserted": d["inserted"],
            "violation": bool(user["violation"]), "run_seconds": res["run_seconds"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=20, help="seeds 1..N")
    ap.add_argument("--num-sites", type=int, default=3)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here (after every seed)")
    args = ap.parse_args(argv)
    rows = []
    print(f"{'seed':>4} {'claimed':>8} {'equal':>8} {'unequal':>8} {'fitted':>8}  verdict")
    for seed in range(1, args.seeds + 1):
        r = one_seed(seed, args.num_sites, args.overrides)
        rows.append(r)
        if "error" in r:
            print(f"{seed:>4}  {r['status']}: {r['error']}")
        else:
            print(f"{seed:>4} {r['claimed']:8.3f} {r['equal_variances']:8.3f} {r['unequal_variances']:8.3f} "
                  f"{r['fitted_null']:8.3f}  {'VIOLATION' if r['violation'] else 'ok'}", flush=True)
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1))
    done = [r for r in rows if "error" not in r]
    bad = [r["seed"] for r in done if r["violation"]]
    if done:
        print(f"{len(done)} seeds: largest estimate {max(max(r['equal_variances'], r['unequal_variances']) for r in done):.3f}"
              f" vs claimed {max(r['claimed'] for r in done):.3f}; violations: {bad or 'none'}")
    return 1 if bad or len(done) < len(rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
