"""The round loop's endings, driven by a grid whose sites answer from a script."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from server.rounds import run_rounds
from server.strategy import aggregate_train_metrics
from tests.conftest import FakeGrid, quick_config

pytestmark = pytest.mark.usefixtures("flower_identity")


class ScriptedGrid(FakeGrid):
    """Each node answers ``answer(node, round)``: "ok" (a trained update) or "refused" (budget spent)."""

    def __init__(self, n: int, answer) -> None:
        super().__init__(n)
        self.answer = answer

    def pull_messages(self, ids):
        out = []
        for mid in list(ids):
            msg = self.pending.pop(mid)
            rnd = int(msg.content["config"]["server-round"])
            what = self.answer(int(msg.metadata.dst_node_id), rnd)
            if what == "crash":
                out.append(Message(content=RecordDict({"metrics": MetricRecord({}), "status": ConfigRecord(
                    {"status": "failed", "reason": "RuntimeError: injected"})}), reply_to=msg))
                continue
            if what in ("refused", "awaiting", "policy"):
                status = {"refused": "budget-exhausted", "awaiting": "awaiting-approval",
                          "policy": "refused-by-policy"}[what]
                content = RecordDict({"metrics": MetricRecord({"weight": 0.0, "epsilon": 8.0}),
                                      "status": ConfigRecord({"status": status, "reason": f"{status}: why"})})
            else:
                arrays = ArrayRecord({"w": Array(np.full(3, float(rnd), dtype=np.float32))})
                content = RecordDict({"arrays": arrays, "metrics": MetricRecord(
                    {"weight": 10.0, "train-loss": 1.0, "epsilon": float(rnd)})})
            out.append(Message(content=content, reply_to=msg))
        return out


class NoEval:
    notes: list[str] = []

    def initial_arrays(self) -> ArrayRecord:
        return ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})

    def server_update(self, arrays: ArrayRecord) -> tuple[ArrayRecord, dict[str, float]]:
        return arrays, {}

    def evaluate(self, arrays: ArrayRecord, server_round: int | None = None) -> dict[str, float]:
        return {}

    def save_samples(self, arrays: ArrayRecord, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        return path


def run(tmp_path, num_rounds: int, answer):
    cfg = quick_config(**{"run.num-rounds": num_rounds, "strategy.min-train-nodes": 1})
    strategy = FedAvg(min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0, weighted_by_key="weight",
                      train_metrics_aggr_fn=aggregate_train_metrics)
    recorded: list[dict] = []
    outcome = run_rounds(ScriptedGrid(2, answer), cfg, strategy, NoEval(), recorded.append, tmp_path)
    return outcome, recorded


def test_every_site_refusing_the_last_round_stops_the_run_it_does_not_complete(tmp_path):
    outcome, recorded = run(tmp_path, 3, lambda node, rnd: "refused" if rnd == 3 else "ok")
    assert outcome.status == "stopped" and "privacy budget" in outcome.reason and "round 3" in outcome.reason
    assert [r["round"] for r in recorded] == [0, 1, 2, 3]
    # The refused sites' spend (8.0, what they report) is still the federation's epsilon.
    assert recorded[3]["epsilon_max"] == 8.0 and {s["status"] for s in recorded[3]["sites"]} == {"refused"}
    assert np.allclose(outcome.arrays["w"].numpy(), 2.0)  # the model of round 2 stands


def test_refusals_before_the_last_round_stop_at_the_next_round(tmp_path):
    outcome, recorded = run(tmp_path, 4, lambda node, rnd: "refused" if rnd >= 2 else "ok")
    assert outcome.status == "stopped" and "privacy budget" in outcome.reason
    assert [r["round"] for r in recorded] == [0, 1, 2]
    assert outcome.rounds_done == 2


def test_one_site_refusing_the_last_round_still_completes_with_the_other(tmp_path):
    outcome, recorded = run(tmp_path, 2, lambda node, rnd: "refused" if (rnd == 2 and node == 100) else "ok")
    assert outcome.status == "completed" and outcome.rounds_done == 2
    assert recorded[2]["epsilon_max"] == 8.0  # the refusing site has spent 8: the maximum is over every site
    assert np.allclose(outcome.arrays["w"].numpy(), 2.0)


class SlowGrid(ScriptedGrid):
    """Replies become visible one pull after another: pull k returns at most the k-th reply."""

    def pull_messages(self, ids):
        first = sorted(ids)[:1]
        return super().pull_messages(first)


def _round_messages(n: int) -> list[Message]:
    arrays = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    return [Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                    dst_node_id=node, message_type="train") for node in range(1, n + 1)]


def test_exchange_sleeps_the_configured_poll_interval_between_pulls(monkeypatch):
    import server.rounds as rounds

    slept: list[float] = []
    monkeypatch.setattr(rounds.time, "sleep", slept.append)
    replies, dst_of = rounds.exchange(SlowGrid(3, lambda node, rnd: "ok"), _round_messages(3),
                                      timeout=60.0, poll_interval=0.05)
    assert len(replies) == 3 and sorted(dst_of.values()) == [1, 2, 3]
    assert slept == [0.05, 0.05]  # one sleep between each of the three pulls, none after the last


def test_exchange_never_sleeps_past_the_round_timeout(monkeypatch):
    import server.rounds as rounds

    clock = iter(range(0, 10_000)).__next__  # each monotonic() read is one second later
    monkeypatch.setattr(rounds.time, "monotonic", lambda: float(clock()))
    slept: list[float] = []
    monkeypatch.setattr(rounds.time, "sleep", slept.append)
    replies, _ = rounds.exchange(SlowGrid(3, lambda node, rnd: "ok"), _round_messages(3),
                                 timeout=2.5, poll_interval=5.0)
    assert len(replies) < 3  # the timeout ended the wait with replies still out
    assert slept and all(s <= 2.5 for s in slept)


def test_reply_poll_interval_is_validated_and_may_change_on_resume():
    from common.config import ConfigError, parse_run_config
    from server.checkpoints import RESUME_KEYS

    assert quick_config().run.reply_poll_interval == 0.02
    with pytest.raises(ConfigError, match="reply-poll-interval"):
        parse_run_config({"run.reply-poll-interval": 0.0})
    assert "run.reply-poll-interval" in RESUME_KEYS


def test_the_federation_epsilon_remembers_sites_not_heard_from_this_round():
    from server.round_records import known_epsilons

    rounds = [{"sites": [{"node_id": 1, "partition_id": 0, "epsilon": 5.0},
                         {"node_id": 2, "partition_id": 1, "epsilon": 7.0}]},
              {"sites": [{"node_id": 1, "partition_id": 0, "epsilon": 6.0},  # site 1 not sampled
                         {"node_id": 3, "partition_id": None, "status": "failed"}]}]
    known = known_epsilons(rounds)
    assert known == {"partition-0": 6.0, "partition-1": 7.0} and max(known.values()) == 7.0


def test_a_site_that_fails_before_reading_its_node_config_is_named_in_the_round_record(tmp_path):
    """A site whose node config (or data) breaks answers ``failed`` itself, with the error and the
    partition its node config names; the round record says which site it was."""
    from flwr.app import Context

    from client.app import train
    from tests.conftest import pyproject_run_config

    run_config = {**pyproject_run_config(), "data.dataset": "digits"}
    bad_node = {"partition-id": 1, "num-partitions": 2, "public-num-examples": -5, "unsafe-memory-ledger": True}

    class FailingSiteGrid(ScriptedGrid):
        def pull_messages(self, ids):
            out = []
            for mid in list(ids):
                msg = self.pending.pop(mid)
                node = int(msg.metadata.dst_node_id)
                context = Context(run_id=1, node_id=node, node_config=dict(bad_node), state=RecordDict(),
                                  run_config=run_config)
                out.append(train(msg, context))  # the real ClientApp handler
            return out

    cfg = quick_config(**{"run.num-rounds": 1, "strategy.min-train-nodes": 1})
    strategy = FedAvg(min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0, weighted_by_key="weight",
                      train_metrics_aggr_fn=aggregate_train_metrics)
    recorded: list[dict] = []
    outcome = run_rounds(FailingSiteGrid(1, None), cfg, strategy, NoEval(), recorded.append, tmp_path)
    (row,) = recorded[-1]["sites"]
    assert row["status"] == "failed" and row["partition_id"] == 1 and row["node_id"] == 100
    assert "public-num-examples" in row["reason"] and "ConfigError" in row["reason"]
    assert outcome.status == "failed" and "public-num-examples" in outcome.reason


def test_sites_awaiting_approval_are_asked_again_and_a_policy_refusal_is_final(tmp_path):
    """Issue 24: round 1 refused at every site (awaiting their operators' approval) does not end
    the run; a site refused by its policy is never sampled again, like one out of budget."""
    asked: list[tuple[int, int]] = []

    def answer(node, rnd):
        asked.append((node, rnd))
        if rnd == 1:
            return "awaiting"
        return "policy" if node == 101 else "ok"

    outcome, recorded = run(tmp_path, 3, answer)
    assert outcome.status == "completed", outcome.reason
    r1 = next(r for r in recorded if r["round"] == 1)
    assert all(row["status"] == "refused" and row["awaiting_approval"] for row in r1["sites"])
    assert sorted(n for n, rnd in asked if rnd == 2) == [100, 101]  # both asked again
    assert [n for n, rnd in asked if rnd == 3] == [100]  # the policy's refusal is final


def test_a_run_whose_sites_still_await_approval_at_the_last_round_stops_and_says_so(tmp_path):
    outcome, _ = run(tmp_path, 2, lambda node, rnd: "awaiting")
    assert outcome.status == "stopped" and "await their operator's approval" in outcome.reason


def test_one_failing_site_does_not_end_a_run_whose_others_await_approval(tmp_path):
    """Found by review: rows [awaiting approval, failed] in round 1 ended the run as failed."""
    def answer(node, rnd):
        if rnd == 1:
            return "awaiting" if node == 100 else "crash"
        return "ok"

    outcome, _ = run(tmp_path, 2, answer)
    assert outcome.status == "completed", outcome.reason
