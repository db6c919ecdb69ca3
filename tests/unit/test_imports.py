"""What a process pays to start: heavy imports stay out of the ServerApp unless a run needs them."""

from __future__ import annotations

import json
import subprocess
import sys

from simulations.launch import ROOT


def test_the_server_app_starts_without_opacus_or_scipy_stats():
    # opacus (torch.distributed, scipy.stats) is seconds of the cold start before round 1;
    # the server needs it only for user-level DP accounting, audits only for scipy.stats.
    code = "import json, sys, server.app; print(json.dumps(sorted(m for m in ('opacus', 'common.audit') if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_accounting_still_works_once_opacus_is_imported_lazily():
    code = ("import sys; from common import privacy; assert 'opacus' not in sys.modules; "
            "e = privacy.epsilon([(1.0, 0.01, 100)], 1e-5); assert 'opacus' in sys.modules; print(e)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert 0 < float(out.stdout.strip().splitlines()[-1]) < 10
