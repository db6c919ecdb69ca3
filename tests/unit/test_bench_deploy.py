"""simulations.bench_deploy's CPU accounting: which role a process plays, and a steady round's share."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from simulations.bench_deploy import cpu_seconds_by_role, memory_mib, pss_growth, pss_mib, rollup_mib, steady_cpu


def test_a_process_is_counted_under_the_role_its_command_line_names():
    # a busy child whose command line names the worker: its CPU time lands under "workers"
    code = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code, "client.worker run"])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and cpu_seconds_by_role([child.pid]).get("workers", 0) < 0.25:
            time.sleep(0.05)
        used = cpu_seconds_by_role([child.pid, os.getpid()])
        assert 0.25 <= used["workers"] < 5 and used["other"] > 0  # this test's own process: no role
    finally:
        child.kill()
        child.wait()
    assert cpu_seconds_by_role([child.pid]) == {}  # gone: nothing
    # waited for, its CPU is its parent's (this process's) "exited children"
    assert cpu_seconds_by_role([os.getpid()])["exited children"] >= 0.25


def test_a_steady_round_is_the_cpu_between_the_first_and_the_last_sample_over_the_rounds_between():
    cpu = {1: {"SuperLink": 1.0, "workers": 2.0}, 5: {"SuperLink": 3.0, "workers": 2.4, "ServerApp": 9.0}}
    assert steady_cpu(cpu) == pytest.approx({"SuperLink": 0.5, "workers": 0.1, "all": 0.6})
    assert steady_cpu({1: {"SuperLink": 1.0}}) == {}


def test_a_workers_growth_is_read_from_round_10_on_by_least_squares():
    early = [300.0] * 9  # rounds 1-9 do not count
    assert pss_growth(early + [400.0, 401.0, None, 403.0]) == pytest.approx(
        {"first_round": 10, "first_mib": 400.0, "last_round": 13, "last_mib": 403.0, "mib_a_round": 1.0})
    assert pss_growth(early + [None, 400.0, 400.0, None])["first_round"] == 11  # the rounds read, named
    assert pss_growth(early + [400.0] * 5)["mib_a_round"] == pytest.approx(0.0)
    assert pss_growth(early + [400.0]) is None and pss_growth([1.0, 2.0], start=1)["mib_a_round"] == pytest.approx(1.0)


def test_a_process_memory_is_read_as_pss_and_its_private_pages():
    mem = memory_mib(os.getpid())
    assert mem is not None and 0 < mem["uss"] <= mem["pss"] + 1e-6  # private pages count whole in PSS too
    assert pss_mib(os.getpid()) > 0 and memory_mib(2**22 + 12345) is None  # no such process


def test_uss_is_the_private_pages_clean_and_dirty():
    rollup = ("55d0-7ffd ---p 00000000 00:00 0  [rollup]\nRss:  409600 kB\nPss:  307200 kB\n"
              "Pss_Anon:  102400 kB\nShared_Clean:  102400 kB\nPrivate_Clean:  51200 kB\nPrivate_Dirty:  153600 kB\n"
              "Referenced:  409600 kB\n")
    assert rollup_mib(rollup) == {"pss": 300.0, "uss": 200.0}
    assert rollup_mib("Rss: 4 kB\n") is None


def test_every_mode_with_warm_workers_reports_their_memory_and_a_mode_without_none(monkeypatch, capsys):
    import simulations.bench_deploy as bench

    def deployed(mode, preset, overrides, sites, work):
        reading = None if mode == "stock" else 400.0
        rows = [[reading, reading] for _ in range(12)]
        return {"status": "finished:completed", "rounds": [2.0] + [1.0] * 11, "pss": rows, "uss": rows,
                "messages": 6, "cpu_per_round": {}, "serverapp_pss": [] if mode == "stock" else [450.0] * 12}

    monkeypatch.setattr(bench, "deployed", deployed)
    results = bench.main(["--modes", "warm", "warm-sqlite", "stock", "--sites", "2", "--rounds", "12"])
    out = capsys.readouterr().out
    for mode in ("warm", "warm-sqlite"):
        assert f"{mode} workers' PSS from round 10 on" in out and f"{mode} workers' USS from round 10 on" in out
        assert results[mode]["uss_growth"][0]["mib_a_round"] == pytest.approx(0.0)
        assert f"{mode}: the ServerApp's PSS" in out
    assert "stock workers'" not in out and "uss_growth" not in results["stock"]
