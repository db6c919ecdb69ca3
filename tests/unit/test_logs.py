"""The console shows each log line once."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_a_flower_log_line_is_printed_once_even_after_opacus_configured_the_root_logger():
    code = ("import opacus.utils.module_utils, logging, flwr.serverapp\n"  # Opacus calls basicConfig on import
            "from common.logs import setup_logging\n"
            "setup_logging()\n"
            "logging.getLogger('flwr').info('flower-line')\n"
            "logging.getLogger('server.job').info('fedgen-line')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert text.count("flower-line") == 1, text
    assert text.count("fedgen-line") == 1, text
