"""A simulation on an existing Ray cluster (issue 23): the test starts a Ray head with
`ray start --head` (its own temp folder and port), runs a 3-site simulation against it with
`simulations.launch --ray-address`, checks that the run completed and that the sites'
ClientApp actors ran on that cluster (in its session logs), then stops the head."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from simulations.launch import free_port, launch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_head():
    temp = Path(tempfile.mkdtemp(prefix="rayc-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    port = free_port()
    ray = str(Path(sys.executable).parent / "ray")
    proc = subprocess.Popen([ray, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            assert proc.poll() is None, f"`ray start --head` exited {proc.returncode}"
            assert time.monotonic() < deadline, "the Ray head did not listen within 60 s"
            time.sleep(0.5)
    try:
        yield f"127.0.0.1:{port}", temp
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the head and every process it started: its session only
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_simulation_runs_its_sites_on_an_existing_ray_cluster(ray_head, tmp_path):
    address, temp = ray_head
    runs = tmp_path / "runs"
    code = launch("digits-quick", ["run.num-rounds=1"], num_sites=3, runs_dir=runs, quiet=True, ray_address=address)
    assert code == 0
    (run_dir,) = [p for p in runs.iterdir() if (p / "run.db").exists()]
    recs = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [s["status"] for s in recs[-1]["sites"]] == ["ok"] * 3
    # The sites' actors ran on that cluster: its own session logs hold their output.
    logs = [p.read_text(errors="replace") for p in (temp / "session_latest" / "logs").glob("worker-*")]
    ran = [text for text in logs if ":actor_name:ClientAppActor" in text]
    assert ran and any("common.data.partition: partitioned" in text for text in ran)
