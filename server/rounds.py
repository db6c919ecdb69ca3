"""The federated round loop: sample, train at the sites, validate, merge, evaluate, record.

Flower's ``Strategy.start`` runs a fixed loop with no place to drop a bad reply, stop
sampling a site whose budget is spent, or record a round atomically. This loop calls
the same strategy methods (``configure_train`` / ``aggregate_train``), so every Flower
strategy keeps its own sampling and server-side state, and adds what operators need.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common import records as R
from common.config import AppConfig
from server.canaries import CanaryClients
from server.central_dp import UserLevelDP, single_reply
from server.evaluation import Evaluator
from server.exchange import encode, exchange, payload_bytes, sender_of
from server.round_records import site_row, site_tag
from server.secagg import SecureOutcome, SecureRound
from server.strategy import aggregate_train_metrics
from server.validation import InvalidUpdate, check_train_reply

log = logging.getLogger(__name__)

#: A run under secure aggregation fails after this many rounds in a row whose sum could not be
#: unmasked (too many sites dropped); fewer, and it goes on without them (README, "Secure aggregation").
SECURE_FAILURES_TO_STOP = 3


class _ActiveGrid:
    """The grid as the strategy should see it: without sites that can no longer train."""

    def __init__(self, grid: Grid, excluded: set[int]) -> None:
        self._grid, self._excluded = grid, excluded

    def get_node_ids(self):  # noqa: ANN201 - mirrors Grid
        return [n for n in self._grid.get_node_ids() if n not in self._excluded]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


@dataclass
class Outcome:
    status: str  # completed | stopped | failed
    reason: str
    arrays: ArrayRecord
    rounds_done: int
    records: list[dict] = field(default_factory=list)


def _same_metric_keys(good: list[Message], row_of: dict[int, dict]) -> list[Message]:
    """The valid replies whose metric keys are the most common set among them; the others are
    dropped (their rows say why). Flower's strategies refuse to aggregate replies whose
    MetricRecords differ in keys, so one such reply would otherwise stop the whole round."""
    keys = [frozenset(msg.content[R.METRICS].keys()) for msg in good]
    if len(set(keys)) <= 1:
        return good
    common = Counter(keys).most_common(1)[0][0]
    for msg, k in zip(good, keys):
        if k != common:
            row = row_of[id(msg)]
            row["status"] = "failed"
            row["reason"] = (f"invalid update dropped: its metric keys differ from the other sites' "
                             f"({sorted(k ^ common)[:3]})")
    return [msg for msg, k in zip(good, keys) if k == common]


def _reply_status(msg: Message) -> tuple[str, str]:
    if msg.has_error():
        return "failed", msg.error.reason
    status = msg.content.get(R.STATUS_RECORD)
    # Refusals: the site's budget, its policy (client/policy.py), or its operator's approval pending.
    if status is not None and status.get(R.STATUS) in (R.BUDGET_EXHAUSTED, R.REFUSED_BY_POLICY, R.AWAITING_APPROVAL):
        return "refused", str(status.get(R.REASON, status.get(R.STATUS)))
    if status is not None and status.get(R.STATUS) == R.FAILED:  # the site caught its own error (client/app.py)
        return "failed", str(status.get(R.REASON, "the site failed"))
    return "ok", ""


def _awaiting_approval(msg: Message) -> bool:
    status = None if msg.has_error() else msg.content.get(R.STATUS_RECORD)
    return status is not None and status.get(R.STATUS) == R.AWAITING_APPROVAL


@dataclass
class _Merge:
    """What aggregating one round produced (nothing when it was not aggregated)."""

    arrays: ArrayRecord
    train_metrics: dict[str, float] = field(default_factory=dict)
    user_dp: dict | None = None  # user-level DP's published figures of the round
    canary_updates: int = 0


class RoundLoop:
    """One run's rounds. :meth:`run` reads as the round does: stop check, send, collect,
    validate, aggregate, evaluate, record; each phase is a method below it.

    ``canaries`` (an audit run): their updates join the valid replies of every aggregated
    round, each inserted canary with the real sites' sampling rate. ``known_epsilon``: the
    last epsilon each site reported before this process (a resumed run), by :func:`site_tag`.
    ``on_round_end(r, arrays)`` runs after each recorded round whose model was released.
    """

    def __init__(self, grid: Grid, cfg: AppConfig, strategy: Strategy, evaluator: Evaluator,
                 record: Callable[[dict], None], run_dir: Path, *,
                 on_round_end: Callable[[int, ArrayRecord], None] | None = None,
                 canaries: CanaryClients | None = None, known_epsilon: dict[str, float] | None = None) -> None:
        self.grid, self.cfg, self.strategy, self.evaluator = grid, cfg, strategy, evaluator
        self.record, self.run_dir, self.on_round_end, self.canaries = record, run_dir, on_round_end, canaries
        self.num_rounds = cfg.run.num_rounds
        self.exhausted: set[int] = set()  # sites that refused for lack of budget: never sampled again
        self.known = dict(known_epsilon or {})  # every site's last reported spend, sampled this round or not
        self.user_level = isinstance(strategy, UserLevelDP)
        self.active = _ActiveGrid(grid, self.exhausted)
        self.records: list[dict] = []
        self.secure = SecureRound(grid, cfg, exchange) if cfg.strategy.secure_aggregation else None
        self.secure_failures = 0  # secure rounds in a row whose sum failed

    def run(self, arrays: ArrayRecord, start_round: int = 1) -> Outcome:
        """Rounds ``start_round..num_rounds`` from ``arrays`` (round 0, the initial evaluation, when starting)."""
        if start_round == 1:
            self._record_initial(arrays)
        for rnd in range(start_round, self.num_rounds + 1):
            remaining = [n for n in self.grid.get_node_ids() if n not in self.exhausted]
            reason = self._stop_reason(rnd, remaining)
            if reason:
                log.warning("%s", reason)
                return Outcome("stopped", reason, arrays, rnd - 1, self.records)
            started = time.time()
            messages = self._messages(rnd, arrays)
            sampled = [int(m.metadata.dst_node_id) for m in messages]
            # A reply the SuperLink writes for a node that went offline comes from the SuperLink
            # itself: every reply is attributed to the node its request was sent to.
            secure = None
            if self.secure is None:
                replies, dst_of = exchange(self.grid, messages, self.cfg.run.round_timeout,
                                           self.cfg.run.reply_poll_interval)
            else:  # four exchanges; the replies carry metrics, the sum comes unmasked (server/secagg.py)
                # Under user-level DP the sites clip to the bound the server's noise is scaled to.
                secure = self.secure.run(rnd, messages, arrays,
                                         clip_norm=self.strategy.clipping_norm if self.user_level else 0.0)
                replies, dst_of = secure.replies, secure.dst_of
            # As they crossed the network: before _collect turns valid updates to float32.
            bytes_sent = sum(payload_bytes(m) for m in messages)
            bytes_received = (sum(payload_bytes(m) for m in replies if not m.has_error()) if secure is None
                              else secure.stats.get("masked-bytes", 0))
            rows, good = self._collect(rnd, replies, dst_of, sampled, arrays, secure)
            merge = self._aggregate(rnd, good, sampled, remaining, arrays, secure)
            arrays = merge.arrays
            released = (bool(good) if secure is None else secure.total is not None) or merge.user_dp is not None
            self._record_round(rnd, started, sampled, rows, merge, released,
                               bytes_sent=bytes_sent, bytes_received=bytes_received, secure=secure)
            if self.on_round_end is not None and released:
                self.on_round_end(rnd, arrays)
            end = self._end_reason(rnd, rows, good, secure, released)
            if end is not None:
                status, reason, done = end
                (log.warning if status == "stopped" else log.error)("%s", reason)
                return Outcome(status, reason, arrays, done, self.records)
        return Outcome("completed", "", arrays, self.num_rounds, self.records)

    # ---- the phases of a round ----------------------------------------------

    def _stop_reason(self, rnd: int, remaining: list[int]) -> str:
        """Why the run stops before round ``rnd`` (too few sites with budget, user-level budget), or ''."""
        cfg = self.cfg
        if self.exhausted and len(remaining) < cfg.strategy.min_train_nodes:
            return (f"only {len(remaining)} site(s) can still train (the others' privacy budget is spent or "
                    "their policy refuses this run), fewer than "
                    f"strategy.min-train-nodes = {cfg.strategy.min_train_nodes}; stopping before round {rnd}")
        if self.user_level and cfg.central_dp.max_epsilon > 0:
            n = len(remaining)
            q = min(1.0, max(int(n * cfg.strategy.fraction_train), cfg.strategy.min_train_nodes) / max(n, 1))
            if self.strategy.epsilon_after_next(q) > cfg.central_dp.max_epsilon:
                return (f"user-level epsilon would exceed central-dp.max-epsilon = {cfg.central_dp.max_epsilon:g} "
                        f"in round {rnd} (now {self.strategy.epsilon():.3f}); stopping")
        return ""

    def _messages(self, rnd: int, arrays: ArrayRecord) -> list[Message]:
        """The strategy samples the sites that can still train and builds their messages."""
        train_config = ConfigRecord({R.RUN_NAME: self.run_dir.name})  # lets a site recognise a round asked again
        return encode(list(self.strategy.configure_train(rnd, arrays, train_config, self.active)),
                       self.cfg.strategy.update_dtype)

    def _collect(self, rnd: int, replies: list[Message], dst_of: dict[str, int], sampled: list[int],
                 arrays: ArrayRecord, secure: SecureOutcome | None = None) -> tuple[list[dict], list[Message]]:
        """One row per sampled site (ok, failed, refused or silent) and the valid updates (under
        secure aggregation: the replies of the sites whose update is in the sum, metrics only)."""
        cfg = self.cfg
        rows, good, row_of = [], [], {}
        for msg in replies:
            status, reason = _reply_status(msg)
            node = sender_of(msg, dst_of)
            if status == "ok" and secure is not None:
                if node in secure.senders and secure.total is not None:
                    good.append(msg)
                elif node not in secure.senders:
                    status, reason = "failed", secure.failed.get(node, "secure aggregation: no masked update")
                else:  # its update was in a sum that could not be unmasked
                    status, reason = "failed", secure.reason
            elif status == "ok":
                try:
                    unpacked = check_train_reply(msg, arrays, cfg.strategy.max_update_norm,
                                                 cfg.strategy.update_dtype)
                    msg.content[R.ARRAYS] = R.from_wire(unpacked)  # aggregate in float32
                    good.append(msg)
                except InvalidUpdate as err:
                    status, reason = "failed", f"invalid update dropped: {err}"
            row = site_row(msg, status, reason or None)
            row["node_id"] = node
            if status == "refused" and _awaiting_approval(msg):
                row["awaiting_approval"] = True  # asked again next round: its operator may approve meanwhile
            elif status == "refused":
                self.exhausted.add(node)  # out of budget, or its policy forbids this run: never sampled again
            rows.append(row)
            row_of[id(msg)] = row
        good = _same_metric_keys(good, row_of)
        answered = {r["node_id"] for r in rows}
        for node in sampled:
            if node not in answered:
                # Under secure aggregation: why the site dropped, or why the round stopped before training.
                why = (secure.failed.get(node) or secure.reason) if secure is not None else None
                rows.append({"node_id": node, "status": "failed", "partition_id": None,
                             "reason": why or f"no reply within run.round-timeout = {cfg.run.round_timeout:g}s",
                             "metrics": {}})
        for row in rows:
            if row["status"] != "ok":
                log.warning("round %d: site %s %s: %s", rnd, row["node_id"], row["status"], row["reason"])
        return rows, good

    def _aggregate(self, rnd: int, good: list[Message], sampled: list[int], remaining: list[int],
                   arrays: ArrayRecord, secure: SecureOutcome | None = None) -> _Merge:
        """Merge the valid updates (and an audit's canaries) with the strategy, when the round counts."""
        cfg, strategy = self.cfg, self.strategy
        if secure is not None:
            return self._aggregate_sum(rnd, good, arrays, secure)
        # Under user-level DP every round that ran is released (and charged), whatever the number
        # of valid replies: skipping it would reveal that count (server/central_dp.py).
        if len(good) < cfg.strategy.min_train_nodes and not self.user_level:
            if good:
                log.warning("round %d: only %d valid update(s), fewer than strategy.min-train-nodes = %d; "
                            "the global model is unchanged", rnd, len(good), cfg.strategy.min_train_nodes)
            return _Merge(arrays)
        merged, extra = good, []
        if self.canaries is not None:
            extra = self.canaries.replies(arrays, len(sampled) / max(len(remaining), 1), good)
            merged = good + extra
            if self.user_level:
                strategy.uncounted = {id(m) for m in extra}  # canaries do not steer the clipping bound
        new_arrays, agg = strategy.aggregate_train(rnd, merged)
        if self.canaries is not None:  # the figures operators read are the real sites' own
            agg = aggregate_train_metrics([m.content for m in good], R.WEIGHT) if good else None
        server_metrics: dict[str, float] = {}
        if new_arrays is not None:  # the family's own step at the server, if it has one (post-processing)
            new_arrays, server_metrics = self.evaluator.server_update(new_arrays)
        return _Merge(
            arrays=new_arrays if new_arrays is not None else arrays,
            train_metrics={**{k: float(v) for k, v in (agg or {}).items() if not isinstance(v, list)},
                           **server_metrics},
            user_dp=dict(strategy.last_round) if self.user_level else None,  # bound, noise, noisy fraction
            canary_updates=len(extra),
        )

    def _aggregate_sum(self, rnd: int, good: list[Message], arrays: ArrayRecord, secure: SecureOutcome) -> _Merge:
        """Under secure aggregation: the strategy's step on the uniform mean of the senders' updates,
        handed over as one reply (server/strategy.py: ``sum_only``); user-level DP noises the sum."""
        strategy = self.strategy
        agg = aggregate_train_metrics([m.content for m in good], R.WEIGHT) if good else None
        if self.user_level:
            new_arrays, _ = strategy.release_sum(rnd, secure.total, good)
        elif secure.total is None or len(secure.senders) < self.cfg.strategy.min_train_nodes:
            if secure.total is not None:
                log.warning("round %d: only %d update(s) in the secure sum, fewer than strategy.min-train-nodes = "
                            "%d; the global model is unchanged", rnd, len(secure.senders),
                            self.cfg.strategy.min_train_nodes)
            return _Merge(arrays)
        else:
            reference = R.numpy_arrays(arrays)
            mean = {key: Array(np.asarray(value + secure.total[key] / len(secure.senders), dtype=value.dtype)
                               if key in secure.total else np.asarray(value))
                    for key, value in reference.items()}
            new_arrays, _ = strategy.aggregate_train(rnd, [single_reply(ArrayRecord(mean))])
        server_metrics: dict[str, float] = {}
        if new_arrays is not None:
            new_arrays, server_metrics = self.evaluator.server_update(new_arrays)
        return _Merge(
            arrays=new_arrays if new_arrays is not None else arrays,
            train_metrics={**{k: float(v) for k, v in (agg or {}).items() if not isinstance(v, list)},
                           **server_metrics},
            user_dp=dict(strategy.last_round) if self.user_level else None,
        )

    def _evaluate(self, rnd: int, arrays: ArrayRecord) -> tuple[dict, dict]:
        """Server evaluation and the sample grid, on round 0, every ``eval.every``-th round and the last."""
        if rnd % self.cfg.eval.every and rnd != self.num_rounds and rnd != 0:
            return {}, {}
        t = time.time()
        ev = self.evaluator.evaluate(arrays, rnd)
        ev["eval-seconds"] = time.time() - t
        path = self.evaluator.save_samples(arrays, self.run_dir / "samples" / f"round-{rnd:03d}")
        return ev, {"samples": str(path.relative_to(self.run_dir))}

    def _record_initial(self, arrays: ArrayRecord) -> None:
        t0 = time.time()
        ev, art = self._evaluate(0, arrays)
        self._emit({"round": 0, "num_rounds": self.num_rounds, "started_at": t0, "ended_at": time.time(),
                    "sampled": [], "sites": [], "train": {}, "eval": ev, **self._eval_notes(), "epsilon_max": None,
                    "user_epsilon": None, "bytes_sent": 0, "bytes_received": 0, "artifacts": art})

    def _record_round(self, rnd: int, started: float, sampled: list[int], rows: list[dict], merge: _Merge,
                      released: bool, *, bytes_sent: int, bytes_received: int,
                      secure: SecureOutcome | None = None) -> None:
        ev, art = self._evaluate(rnd, merge.arrays) if released else ({}, {})
        for row in rows:  # a refused site reports what it has spent too
            if row.get("epsilon") is not None:
                self.known[site_tag(row)] = float(row["epsilon"])
        rec = {"round": rnd, "num_rounds": self.num_rounds, "started_at": started, "ended_at": time.time(),
               "sampled": sampled, "sites": rows, "train": merge.train_metrics, "eval": ev, **self._eval_notes(),
               "epsilon_max": max(self.known.values()) if self.known else None,
               "user_epsilon": self.strategy.epsilon() if self.user_level else None,
               "user_dp": merge.user_dp,
               "bytes_sent": bytes_sent, "bytes_received": bytes_received, "artifacts": art}
        if self.canaries is not None:
            rec["canary_updates"] = merge.canary_updates
        if secure is not None:  # the protocol's figures, and why the sum failed if it did
            rec["secagg"] = {**secure.stats, "reason": secure.reason}
        self._emit(rec)

    def _eval_notes(self) -> dict:
        """``eval_notes`` for every round record while the evaluator refuses a metric (an FID from
        too few reference images): why it is missing from ``eval``; nothing otherwise."""
        notes = self.evaluator.notes
        return {"eval_notes": list(notes)} if notes else {}

    def _emit(self, rec: dict) -> None:
        self.record(rec)
        self.records.append(rec)

    def _end_reason(self, rnd: int, rows: list[dict], good: list[Message], secure: SecureOutcome | None = None,
                    released: bool = False) -> tuple[str, str, int] | None:
        """After a round with no valid update: ("stopped" | "failed", why, rounds done); None to go on
        (a valid update came, or every site refused before the last round: the stop check ends the run;
        or the secure sum failed, fewer than SECURE_FAILURES_TO_STOP rounds in a row: sites that
        dropped may be back for the next round)."""
        if good:
            self.secure_failures = 0
            return None
        if any(r.get("awaiting_approval") for r in rows):  # the others refused or failed (found by review)
            if rnd < self.num_rounds:
                return None  # some site's operator may approve before the next round
            waiting = sum(bool(r.get("awaiting_approval")) for r in rows)
            return ("stopped", f"no site trained in round {rnd}, the last: {waiting} site(s) still await their "
                               "operator's approval of this run config", rnd)
        if rows and all(r["status"] == "refused" for r in rows):
            if rnd < self.num_rounds:
                return None
            return ("stopped", f"every sampled site's privacy budget is exhausted in round {rnd}, the last; "
                               f"the model of round {rnd - 1} is final", rnd)  # rounds recorded, as at the top
        if secure is not None and secure.reason:
            self.secure_failures += 1
            if self.secure_failures < SECURE_FAILURES_TO_STOP and rnd < self.num_rounds:
                return None
            if rnd == self.num_rounds and self.secure_failures < SECURE_FAILURES_TO_STOP:
                return ("failed", f"secure aggregation failed in round {rnd}, the last: {secure.reason}",
                        rnd if released else rnd - 1)
            return ("failed", f"secure aggregation failed in {self.secure_failures} rounds in a row; the last "
                              f"(round {rnd}): {secure.reason}", rnd if released else rnd - 1)
        reasons = "; ".join(sorted({f"{r['reason']}" for r in rows})) or "no site replied"
        return "failed", f"every sampled site failed in round {rnd}: {reasons}", rnd - 1


def run_rounds(grid: Grid, cfg: AppConfig, strategy: Strategy, evaluator: Evaluator,
               record: Callable[[dict], None], run_dir: Path, *, arrays: ArrayRecord | None = None,
               start_round: int = 1, on_round_end: Callable[[int, ArrayRecord], None] | None = None,
               canaries: CanaryClients | None = None, known_epsilon: dict[str, float] | None = None) -> Outcome:
    """Run rounds ``start_round..num_rounds`` (:class:`RoundLoop`), from ``arrays`` or the initial model."""
    loop = RoundLoop(grid, cfg, strategy, evaluator, record, run_dir, on_round_end=on_round_end,
                     canaries=canaries, known_epsilon=known_epsilon)
    return loop.run(arrays if arrays is not None else evaluator.initial_arrays(), start_round)
