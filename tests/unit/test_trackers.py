"""What a round gives the trackers, and a tracker that fails never stops the run (issue 23)."""

from __future__ import annotations

import logging

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

    def start(self, run_name, params, fresh):
        pass

    def log_round(self, rec, run_dir):
        Broken.calls += 1
        raise ConnectionError("the tracking server is down")

    def close(self):
        pass


def test_a_failing_tracker_warns_once_and_is_dropped(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(T, "trackers_for", lambda *a: [Broken()])
    live = T.LiveTrackers(tmp_path, {}, "", "http://127.0.0.1:9")
    with caplog.at_level(logging.WARNING):
        for rnd in range(3):
            live({**REC, "round": rnd})  # never raises
    assert Broken.calls == 1 and live.trackers == []
    assert sum("the run goes on without it" in r.message for r in caplog.records) == 1


def test_a_missing_tracker_library_names_its_extra():
    with pytest.raises(T.TrackerError, match=r"pip install -e '\.\[mlflow\]'"):
        T._need("no_such_tracker_module", "mlflow")
