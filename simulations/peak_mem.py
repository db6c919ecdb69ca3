"""Run a command and report its wall time and the peak memory of its whole process tree.

    python -m simulations.peak_mem -- python -m simulations.launch

Samples every 0.25 s the summed RSS of the command and all its descendants (SuperLink,
ServerApp, Ray workers, ClientApps), read from /proc. Prints the figures last.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from simulations.procs import tree_pids


def tree_rss_bytes(root: int) -> int:
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in tree_pids(root):
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except OSError:
            pass
    return total


def main() -> int:
    argv = sys.argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise SystemExit(__doc__)
    t0 = time.monotonic()
    proc = subprocess.Popen(argv)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss_bytes(proc.pid))
        time.sleep(0.25)
    wall = time.monotonic() - t0
    print(f"peak_mem: exit {proc.returncode}, wall {wall:.1f} s, peak RSS of the process tree "
          f"{peak / 2**30:.2f} GiB", file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
