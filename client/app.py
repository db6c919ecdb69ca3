"""fedgen ClientApp: turns Flower Messages into calls of :mod:`client.site`."""

from __future__ import annotations

import functools
import logging

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import secagg
from client.mods import central_dp_clipping_mod
from client.site import evaluate_round, train_round
from common import records as R
from common.config import parse_node_config, parse_run_config
from common.secagg import MASKED
from common.logs import setup_logging

app = ClientApp()
log = logging.getLogger(__name__)

#: Longest error text a failing site sends (its operator's log keeps the whole traceback).
MAX_REASON_CHARS = 500


def _partition_of(context: Context) -> int | None:
    """The partition the node config names, read raw: also when the node config is invalid."""
    value = context.node_config.get("partition-id")
    try:
        return int(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def reports_failures(handler):
    """A site that fails answers ``failed`` itself, with the error and its partition (from the node
    config, data-independent), so the round record says which site it was; Flower's own error
    reply (a crashed process, a timeout) carries neither. Nothing was trained or charged that the
    ledger does not already hold: a charge is written ahead and stays (client/privacy_state.py)."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as err:  # noqa: BLE001 - every failure becomes a reply, never a lost message
            pid = _partition_of(context)
            log.exception("site %s failed", pid)
            reason = f"{type(err).__name__}: {err}"
            if len(reason) > MAX_REASON_CHARS:
                reason = reason[:MAX_REASON_CHARS - 3] + "..."
            metrics = MetricRecord({R.PARTITION: pid} if pid is not None else {})
            status = ConfigRecord({R.STATUS: R.FAILED, R.REASON: reason})
            return Message(content=RecordDict({R.METRICS: metrics, R.STATUS_RECORD: status}), reply_to=msg)

    return wrapped


@app.train(mods=[central_dp_clipping_mod])  # the site clips its own update when the server adapts the bound
@reports_failures
def train(msg: Message, context: Context) -> Message:
    setup_logging()
    cfg = parse_run_config(context.run_config)
    site = parse_node_config(context.node_config)
    config = msg.content[R.CONFIG]
    result = train_round(
        cfg,
        site,
        R.from_wire(msg.content[R.ARRAYS]),
        server_round=int(config["server-round"]),
        state=context.state,
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        run_id=context.run_id,
        run_name=str(config.get(R.RUN_NAME, "")),
    )
    content = RecordDict({
        R.METRICS: MetricRecord(result.metrics),
        R.STATUS_RECORD: ConfigRecord({R.STATUS: result.status, R.REASON: result.reason}),
    })
    if result.arrays is not None:
        content[R.ARRAYS] = R.to_wire(result.arrays, cfg.strategy.update_dtype)
    return Message(content=content, reply_to=msg)


@app.evaluate()
@reports_failures
def evaluate(msg: Message, context: Context) -> Message:
    setup_logging()
    cfg = parse_run_config(context.run_config)
    site = parse_node_config(context.node_config)
    metrics = evaluate_round(cfg, site, R.from_wire(msg.content[R.ARRAYS]))
    return Message(content=RecordDict({R.METRICS: MetricRecord(metrics)}), reply_to=msg)


# Secure aggregation's four stages (client/secagg.py); the third trains as ``train`` does.
SECAGG = "secagg"


def _secagg_reply(msg: Message, record: ConfigRecord) -> Message:
    return Message(content=RecordDict({SECAGG: record}), reply_to=msg)


@app.query("secagg_keys")
@reports_failures
def secagg_keys(msg: Message, context: Context) -> Message:
    return _secagg_reply(msg, secagg.keys(msg.content[SECAGG], context.state))


@app.query("secagg_shares")
@reports_failures
def secagg_shares(msg: Message, context: Context) -> Message:
    return _secagg_reply(msg, secagg.shares(msg.content[SECAGG], context.state, int(context.node_id)))


@app.train("secagg")
@reports_failures
def secagg_train(msg: Message, context: Context) -> Message:
    setup_logging()
    cfg = parse_run_config(context.run_config)
    config = msg.content[R.CONFIG]
    result, masked = secagg.train(cfg, parse_node_config(context.node_config), R.from_wire(msg.content[R.ARRAYS]),
                                  config, msg.content[SECAGG], context.state, int(context.node_id),
                                  run_id=context.run_id, run_name=str(config.get(R.RUN_NAME, "")))
    content = RecordDict({
        R.METRICS: MetricRecord(result.metrics),
        R.STATUS_RECORD: ConfigRecord({R.STATUS: result.status, R.REASON: result.reason}),
        SECAGG: ConfigRecord({"round": int(config["server-round"])}),
    })
    if masked is not None:
        content[MASKED] = masked
    return Message(content=content, reply_to=msg)


@app.query("secagg_unmask")
@reports_failures
def secagg_unmask(msg: Message, context: Context) -> Message:
    return _secagg_reply(msg, secagg.unmask(msg.content[SECAGG], context.state, int(context.node_id)))
