"""What a round gives the trackers, and a tracker that fails never stops the run (issue 23)."""

from __future__ import annotations

import logging
import threading

import pytest

from server import trackers as T

REC = {"round": 2, "started_at": 10.0, "ended_at": 12.5, "sampled": [1, 2, 3],
       "sites": [{"node_id": 1, "status": "ok", "partition_id": 0, "epsilon": 3.5, "budget": 8.0},
                 {"node_id": 2, "status": "failed", "partition_id": None, "epsilon": None},
                 {"node_id": 3, "status": "refused", "partition_id": 2, "epsilon": 8.0, "budget": 8.0}],
       "train": {"epsilon": 3.5, "sites": 1.0}, "eval": {"neg-elbo": 30.1, "fid-domain": float("nan")},
       "epsilon_max": 8.0, "user_epsilon": None, "bytes_sent": 100, "bytes_received": 50}


def test_a_round_gives_its_metrics_privacy_sites_bytes_and_time():
    got = T.round_scalars(REC)
    assert got["eval/neg-elbo"] == 30.1 and "eval/fid-domain" not in got  # NaN is not a point
    assert got["privacy/epsilon-max"] == 8.0 and "privacy/user-epsilon" not in got
    assert got["privacy/site/partition-0/epsilon"] == 3.5 and got["privacy/site/partition-2/budget"] == 8.0
    assert (got["sites/sampled"], got["sites/ok"], got["sites/failed"], got["sites/refused"]) == (3, 1, 1, 1)
    assert got["comm/bytes-sent"] == 100 and got["time/round-seconds"] == 2.5
    assert T.flat_params({"privacy": {"enabled": True, "target_epsilon": 8.0}, "x": 1}) == \
        {"privacy.enabled": "true", "privacy.target_epsilon": "8.0", "x": "1"}


class Broken:
    calls = 0

    def start(self, run_name, params, fresh, resume_from=0):
        pass

    def log_round(self, rec, run_dir):
        Broken.calls += 1
        raise ConnectionError("the tracking server is down")

    def close(self, status=""):
        pass


def test_a_failing_tracker_warns_once_and_is_dropped(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(T, "trackers_for", lambda *a: [Broken()])
    with caplog.at_level(logging.WARNING):
        live = T.LiveTrackers(tmp_path, {}, "", "http://127.0.0.1:9")
        for rnd in range(3):
            live({**REC, "round": rnd})  # never raises
        live.close("completed")
    assert Broken.calls == 1 and live.trackers == []
    assert sum("the run goes on without it" in r.message for r in caplog.records) == 1


def test_a_slow_tracker_never_makes_a_round_wait(tmp_path, monkeypatch):
    """Found by review: MLflow's requests ran inside the round loop, up to seconds each. The
    records now go to a queue that a thread of the trackers' own drains."""
    release = threading.Event()
    seen = []

    class Slow(Broken):
        def log_round(self, rec, run_dir):
            release.wait()  # a tracker server that does not answer
            seen.append(rec["round"])

    monkeypatch.setattr(T, "trackers_for", lambda *a: [Slow()])
    live = T.LiveTrackers(tmp_path, {}, "", "http://slow")
    for rnd in range(3):
        live({**REC, "round": rnd})  # returns while the tracker is still stuck on round 0
    assert seen == []
    release.set()
    live.close("completed")
    assert seen == [0, 1, 2]


def test_a_resumed_run_logs_its_retrained_rounds_again_without_duplicates_in_tensorboard(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra (in the test extra)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = T.TensorBoardTracker(tmp_path)
    first.start("run-a", {}, fresh=False)
    for rnd in range(4):
        first.log_round({**REC, "round": rnd, "eval": {"neg-elbo": 10.0 + rnd}}, tmp_path)
    first.close()
    again = T.TensorBoardTracker(tmp_path)  # resumed from the checkpoint of round 2: trains round 3 again
    again.start("run-a", {}, fresh=False, resume_from=3)
    again.log_round({**REC, "round": 3, "eval": {"neg-elbo": 99.0}}, tmp_path)
    again.close()
    ea = EventAccumulator(str(tmp_path / "run-a"))
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("eval/neg-elbo")] == [(0, 10.0), (1, 11.0), (2, 12.0), (3, 99.0)]


def test_mlflow_finds_a_run_whose_name_has_quotes_and_ends_it_with_the_runs_status(tmp_path):
    mlflow = pytest.importorskip("mlflow", reason="the mlflow extra (in the test extra)")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    for _ in range(2):
        tracker = T.MLflowTracker(uri)
        tracker.start("bob's \"run\"", {"a.b": "1"}, fresh=True)
        tracker.log_round({**REC, "round": 1}, tmp_path)
        tracker.close("completed")
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fedgen").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["fedgen.run"] == "bob's \"run\""
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval.neg-elbo")] == [1]


def test_a_missing_tracker_library_names_its_extra():
    with pytest.raises(T.TrackerError, match=r"pip install -e '\.\[mlflow\]'"):
        T._need("no_such_tracker_module", "mlflow")
