"""Operator CLI `fedgen`: human and --json output of every command, and its error paths."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import read_commands
from cli.app import app
from cli.plots import build_figure
from server.store import DB_NAME, RunStore

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
T0 = 1_763_790_000.0
RUN_ID = "20251122-0537-vae"


def site(node_id, partition_id, epsilon, *, status="ok", reason=None, loss=0.5):
    ok = status == "ok"
    return {
        "node_id": node_id, "partition_id": partition_id, "status": status, "reason": reason,
        "epsilon": epsilon if ok else None, "budget": 8.0, "delta": 1e-5, "noise_multiplier": 1.1,
        "sample_rate": 0.02, "clip_fraction": 0.4 if ok else None, "num_examples": 180 if ok else None,
        "train_loss": loss if ok else None, "metrics": {},
    }


def make_round(rnd: int, *, text_samples: bool = False) -> dict:
    """Round 0 = initial evaluation. Round 2: site 303 refused; round 3: site 303 failed and
    site 202 at 7.5 of its 8.0 budget (94%)."""
    sites = []
    if rnd:
        third = {2: site(303, 2, None, status="refused", reason="privacy budget exhausted"),
                 3: site(303, 2, None, status="failed", reason="timeout after 60s")}
        sites = [site(101, 0, 1.0 * rnd, loss=0.7 / rnd), site(202, 1, 2.5 * rnd, loss=0.8 / rnd),
                 third.get(rnd, site(303, 2, 0.5 * rnd))]
    ext = "txt" if text_samples else "png"
    return {
        "round": rnd, "num_rounds": 10,
        "started_at": T0 + 10 * rnd, "ended_at": T0 + 10 * rnd + 4.5,
        "sampled": [s["node_id"] for s in sites], "sites": sites,
        "train": {"train-loss": [None, 0.812, 0.634, 0.517][rnd]} if rnd else {},
        "eval": {"neg-elbo": [150.0, 131.4, 124.9, 120.3][rnd], "fid-domain": [60.0, 52.5, 47.25, 45.1][rnd],
                 "fid-domain-n": 500},
        "epsilon_max": 2.5 * rnd if rnd else None, "user_epsilon": None,
        "bytes_sent": 1_234_567 * rnd, "bytes_received": 1_200_000 * rnd,
        "artifacts": {"samples": f"samples/round-{rnd:03d}.{ext}", "checkpoint": f"checkpoints/round-{rnd:03d}.pt"},
    }


def create_run(runs_dir: Path, run_id: str = RUN_ID, *, n_rounds: int = 3, text_samples: bool = False,
               model: str = "vae") -> RunStore:
    store = RunStore.create(runs_dir, run_id, config={"model": model}, model=model, strategy="fedavg",
                            num_rounds=10)
    for rnd in range(n_rounds + 1):
        store.record_round(make_round(rnd, text_samples=text_samples))
    return store


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    store = create_run(tmp_path / "runs")
    store.close()
    return tmp_path / "runs"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env={"FEDGEN_RUNS_DIR": None, "COLUMNS": "200", "NO_COLOR": "1"})


def run(runner: CliRunner, runs_dir: Path | None, *args: str):
    argv = list(args) + (["--runs-dir", str(runs_dir)] if runs_dir is not None else [])
    return runner.invoke(app, argv)


def ok(result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result.stdout


# --------------------------------------------------------------------------- runs


def test_runs_table_shows_progress_best_metric_and_epsilon(runner, runs_dir: Path) -> None:
    out = ok(run(runner, runs_dir, "runs"))
    for needle in (RUN_ID, "vae", "fedavg", "3/10", "running", "fid-domain=45.10", "7.50"):
        assert needle in out


def test_runs_json(runner, runs_dir: Path) -> None:
    rows = json.loads(ok(run(runner, runs_dir, "runs", "--json")))
    assert len(rows) == 1
    row = rows[0]
    assert row["run_id"] == RUN_ID and row["rounds_done"] == 3 and row["num_rounds"] == 10
    assert row["best_metric"] == {"key": "fid-domain", "value": 45.1, "round": 3}
    assert row["max_epsilon"] == 7.5 and row["status"] == "running" and row["error"] is None


def test_runs_uses_env_runs_dir_and_lists_corrupt_runs(runner, runs_dir: Path) -> None:
    bad = runs_dir / "zz-broken"
    bad.mkdir()
    (bad / DB_NAME).write_bytes(os.urandom(1024))
    result = runner.invoke(app, ["runs"], env={"FEDGEN_RUNS_DIR": str(runs_dir)})
    out = ok(result)
    assert "zz-broken" in out and "corrupt" in out and RUN_ID in out
    rows = json.loads(ok(runner.invoke(app, ["runs", "--json"], env={"FEDGEN_RUNS_DIR": str(runs_dir)})))
    assert {r["run_id"]: r["status"] for r in rows} == {"zz-broken": "corrupt", RUN_ID: "running"}


def test_runs_in_empty_store(runner, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert "No runs" in ok(run(runner, tmp_path / "empty", "runs"))
    assert json.loads(ok(run(runner, tmp_path / "empty", "runs", "--json"))) == []


# --------------------------------------------------------------------------- status


def test_status_human(runner, runs_dir: Path) -> None:
    out = ok(run(runner, runs_dir, "status", "latest"))
    assert "3/10 rounds (30%)" in out and "round 4 in progress" in out
    assert "0.5170" in out and "120.3" in out and "45.10" in out  # latest train/eval metrics
    lines = out.splitlines()
    near = next(line for line in lines if " 202 " in line and "7.50" in line)
    assert "94%" in near and "over 90% of budget" in near
    assert "over 90%" not in next(line for line in lines if " 101 " in line and "3.00" in line)
    # failed/refused sites from all rounds, latest first
    failed = out.index("timeout after 60s", out.index("Failed / refused"))
    refused = out.index("privacy budget exhausted")
    assert failed < refused


def test_status_json(runner, runs_dir: Path) -> None:
    data = json.loads(ok(run(runner, runs_dir, "status", RUN_ID[:8], "--json")))
    assert data["run"]["run_id"] == RUN_ID
    assert data["progress"] == {"rounds_done": 3, "num_rounds": 10, "fraction": 0.3, "last_round": 3,
                                "current_round": 4}
    assert data["last_round"]["eval"]["fid-domain"] == 45.1
    assert data["sites_round"] == 3
    near = {s["node_id"]: s["near_budget"] for s in data["sites"]}
    assert near == {101: False, 202: True, 303: False}
    assert [(p["round"], p["node_id"], p["status"]) for p in data["problems"]] == [
        (3, 303, "failed"), (2, 303, "refused")]


def test_status_of_fresh_run_without_rounds(runner, tmp_path: Path) -> None:
    create_run(tmp_path, "fresh", n_rounds=-1).close()
    out = ok(run(runner, tmp_path, "status", "fresh"))
    assert "0/10 rounds" in out and "No rounds recorded yet" in out


# --------------------------------------------------------------------------- watch


def test_watch_exits_when_run_completes(runner, runs_dir: Path) -> None:
    def finish_later() -> None:
        with RunStore.open(runs_dir / RUN_ID, readonly=False) as writer:
            writer.record_round(make_round(3))  # a round lands while watching
            threading.Event().wait(0.3)
            writer.set_status("completed", "all rounds done")

    thread = threading.Thread(target=finish_later)
    thread.start()
    result = run(runner, runs_dir, "watch", "latest", "--interval", "0.02")
    thread.join(30)
    out = ok(result)
    assert "3/10 rounds" in out
    assert f"Run {RUN_ID} completed after 3/10 rounds: all rounds done" in out.splitlines()


def test_watch_json_streams_one_object_per_change(runner, runs_dir: Path) -> None:
    def finish_later() -> None:
        with RunStore.open(runs_dir / RUN_ID, readonly=False) as writer:
            threading.Event().wait(0.2)
            writer.set_status("stopped", "operator request")

    thread = threading.Thread(target=finish_later)
    thread.start()
    result = run(runner, runs_dir, "watch", RUN_ID, "--interval", "0.02", "--json")
    thread.join(30)
    snapshots = [json.loads(line) for line in ok(result).splitlines()]
    assert snapshots[0]["run"]["status"] == "running"
    assert snapshots[-1]["run"]["status"] == "stopped"
    assert snapshots[-1]["run"]["status_reason"] == "operator request"


def test_watch_ctrl_c_exits_130_without_traceback(runner, runs_dir: Path, monkeypatch) -> None:
    def ctrl_c(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(read_commands, "_sleep", ctrl_c)
    result = run(runner, runs_dir, "watch", "latest")
    assert result.exit_code == 130
    assert "Traceback" not in result.output and "interrupted" in result.stderr


# --------------------------------------------------------------------------- plot


def test_build_figure_panels_and_lines(runs_dir: Path) -> None:
    with RunStore.open(runs_dir / RUN_ID) as store:
        rounds = store.rounds()
    fig = build_figure(rounds)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["Training loss", "Server evaluation: FID (domain features)",
                      "Server evaluation: Negative ELBO", "Privacy spent"]
    train, fid, elbo, eps = fig.axes
    assert list(train.lines[0].get_xdata()) == [1, 2, 3]  # round 0 has no training
    assert list(fid.lines[0].get_ydata()) == [60.0, 52.5, 47.25, 45.1]
    assert list(elbo.lines[0].get_xdata()) == [0, 1, 2, 3]
    assert [line.get_label() for line in eps.lines] == ["max sample-level ε (over sites)", "site budget ε=8"]
    assert all(ax.get_xlabel() == "round" and ax.get_ylabel() and ax.get_legend() for ax in fig.axes)


def test_build_figure_with_user_epsilon_and_perplexity() -> None:
    rounds = [{"round": r, "train": {"train-loss": 1.0 / r}, "eval": {"perplexity": 10.0 - r},
               "epsilon_max": 0.5 * r, "user_epsilon": 1.5 * r, "sites": []} for r in (1, 2)]
    fig = build_figure(rounds)
    assert [ax.get_title() for ax in fig.axes][1] == "Server evaluation: Perplexity"
    assert len(fig.axes) == 3
    assert [line.get_label() for line in fig.axes[-1].lines] == ["max sample-level ε (over sites)", "user-level ε"]


def test_plot_writes_png(runner, runs_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "out" / "metrics.png"
    out = ok(run(runner, runs_dir, "plot", "latest", "-o", str(target)))
    assert out.strip() == str(target.resolve())
    assert target.read_bytes()[:8] == PNG_SIGNATURE
    data = json.loads(ok(run(runner, runs_dir, "plot", RUN_ID, "-o", str(tmp_path / "m2.png"), "--json")))
    assert data["path"] == str((tmp_path / "m2.png").resolve()) and data["rounds"] == 4
    assert len(data["panels"]) == 4
    assert (tmp_path / "m2.png").read_bytes()[:8] == PNG_SIGNATURE


def test_plot_rejects_unknown_image_type(runner, runs_dir: Path, tmp_path: Path) -> None:
    result = run(runner, runs_dir, "plot", "latest", "-o", str(tmp_path / "x.docx"))
    assert result.exit_code == 2 and "unsupported image type" in result.output


# --------------------------------------------------------------------------- samples


def test_samples_paths_of_last_round(runner, runs_dir: Path) -> None:
    out = ok(run(runner, runs_dir, "samples", "latest"))
    run_dir = (runs_dir / RUN_ID).resolve()
    assert str(run_dir / "samples" / "round-003.png") in out
    assert str(run_dir / "checkpoints" / "round-003.pt") in out
    assert "(missing)" in out  # the fixture never wrote the files


def test_samples_prints_text_samples_of_a_chosen_round(runner, tmp_path: Path) -> None:
    create_run(tmp_path, "lm", text_samples=True, model="gpt").close()
    sample = tmp_path / "lm" / "samples" / "round-002.txt"
    sample.parent.mkdir()
    sample.write_text("the patient was discharged\nno acute distress\n")
    out = ok(run(runner, tmp_path, "samples", "lm", "--round", "2"))
    assert str(sample.resolve()) in out and "the patient was discharged" in out and "no acute distress" in out
    data = json.loads(ok(run(runner, tmp_path, "samples", "lm", "--round", "2", "--json")))
    assert data["round"] == 2
    assert data["artifacts"]["samples"] == str(sample.resolve())
    assert data["samples_text"] == {str(sample.resolve()): "the patient was discharged\nno acute distress\n"}
    assert data["missing"] == [str((tmp_path / "lm" / "checkpoints" / "round-002.pt").resolve())]


# --------------------------------------------------------------------------- error paths


def corrupt_store(tmp_path: Path) -> Path:
    runs_dir = tmp_path / "corrupt"
    (runs_dir / "bad-run").mkdir(parents=True)
    (runs_dir / "bad-run" / DB_NAME).write_bytes(os.urandom(4096))
    return runs_dir


def future_store(tmp_path: Path) -> Path:
    runs_dir = tmp_path / "future"
    create_run(runs_dir, "new-run", n_rounds=1).close()
    conn = sqlite3.connect(runs_dir / "new-run" / DB_NAME)
    conn.execute("PRAGMA user_version = 7")
    conn.commit()
    conn.close()
    return runs_dir


@pytest.mark.parametrize("command", [
    ["status", "{ref}"], ["watch", "{ref}", "--interval", "0.01"], ["plot", "{ref}", "-o", "{tmp}/p.png"],
    ["samples", "{ref}"], ["status", "{ref}", "--json"],
])
@pytest.mark.parametrize("case, ref, expect", [
    ("unknown", "nope", "no run matching 'nope'"),
    ("ambiguous", "20251122", "ambiguous"),
    ("missing-dir", "latest", "does not exist"),
    ("empty-store", "latest", "no runs in"),
    ("corrupt", "bad-run", "cannot read run database"),
    ("future", "new-run", "upgrade fedgen"),
])
def test_errors_are_one_red_line_and_exit_1(runner, runs_dir: Path, tmp_path: Path, command, case, ref,
                                            expect) -> None:
    if case == "ambiguous":
        create_run(runs_dir, "20251122-0600-gpt", n_rounds=1).close()
        store = runs_dir
    elif case == "missing-dir":
        store = tmp_path / "nowhere"
    elif case == "empty-store":
        store = tmp_path / "empty"
        store.mkdir()
    elif case == "corrupt":
        store = corrupt_store(tmp_path)
    elif case == "future":
        store = future_store(tmp_path)
    else:
        store = runs_dir
    args = [a.format(ref=ref, tmp=tmp_path) for a in command]
    result = run(runner, store, *args)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0]
    assert "Traceback" not in result.output


def test_runs_on_missing_dir_is_an_error(runner, tmp_path: Path) -> None:
    result = run(runner, tmp_path / "nowhere", "runs")
    assert result.exit_code == 1 and "does not exist" in result.stderr and "Traceback" not in result.output


def test_samples_errors(runner, runs_dir: Path, tmp_path: Path) -> None:
    result = run(runner, runs_dir, "samples", "latest", "--round", "9")
    assert result.exit_code == 1 and "has no round 9 (rounds 0-3)" in result.stderr
    create_run(tmp_path / "s", "fresh", n_rounds=-1).close()
    result = run(runner, tmp_path / "s", "samples", "fresh")
    assert result.exit_code == 1 and "no round with samples" in result.stderr
    result = run(runner, tmp_path / "s", "plot", "fresh")
    assert result.exit_code == 1 and "nothing to plot" in result.stderr


def test_error_message_is_red_on_a_colour_terminal(runs_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)
    result = CliRunner().invoke(app, ["status", "nope", "--runs-dir", str(runs_dir)])
    assert result.exit_code == 1
    assert "\x1b[" in result.stderr and "31" in result.stderr  # ANSI red


def test_usage_error_exits_2(runner, runs_dir: Path) -> None:
    assert run(runner, runs_dir, "status").exit_code == 2
    assert run(runner, runs_dir, "watch", "latest", "--interval", "0").exit_code == 2


# --------------------------------------------------------------------------- audits


def _audits(runs_dir: Path, *, violation: bool = False) -> None:
    with RunStore.open(runs_dir / RUN_ID, readonly=False) as store:
        store.record_audit({"level": "user", "method": "one-shot canary clients", "m": 100, "confidence": None,
                            "empirical_epsilon": 4.25, "claimed_epsilon": 9.01, "delta": 1e-5, "seconds": 3.0,
                            "participations": 250})
        store.record_audit({"level": "sample", "method": "one-run", "m": 128, "confidence": 0.95,
                            "empirical_epsilon": 9.5 if violation else 0.3, "claimed_epsilon": 8.0,
                            "delta": 1e-5, "seconds": 41.0})
        store.record_audit({"level": "sample", "method": "one-run", "m": 128, "confidence": 0.95,
                            "empirical_epsilon": 2.7, "claimed_epsilon": float("inf"), "delta": 1e-5, "seconds": 9.0})


def test_audit_show_puts_claimed_and_empirical_epsilon_side_by_side(runner, runs_dir: Path) -> None:
    _audits(runs_dir)
    out = ok(run(runner, runs_dir, "audit", "show", "latest"))
    assert "claimed ε" in out and "empirical ε" in out
    assert "9.01" in out and "4.25" in out and "ok: estimate within the claim" in out
    assert "ok: lower bound within the claim" in out and "no DP claim; lower bound 2.70" in out and "∞" in out
    payload = json.loads(ok(run(runner, runs_dir, "audit", "show", "latest", "--json")))
    assert [a["level"] for a in payload["audits"]] == ["user", "sample", "sample"]
    assert payload["audits"][2]["claimed_epsilon"] is None  # strict JSON: inf -> null
    assert not any(a["violation"] for a in payload["audits"])


def test_status_shows_audits_and_flags_a_violation(runner, runs_dir: Path) -> None:
    _audits(runs_dir, violation=True)
    out = ok(run(runner, runs_dir, "status", "latest"))
    assert "Privacy audits" in out and "VIOLATION" in out
    payload = json.loads(ok(run(runner, runs_dir, "status", "latest", "--json")))
    assert [a["violation"] for a in payload["audits"]] == [False, True, False]


def test_audit_show_without_audits_is_an_error(runner, runs_dir: Path) -> None:
    result = run(runner, runs_dir, "audit", "show", "latest")
    assert result.exit_code == 1 and "has no audit" in result.output and "fedgen audit run" in result.output
