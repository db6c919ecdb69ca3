"""fedgen ClientApp: turns Flower Messages into calls of :mod:`client.site`."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.mods import central_dp_clipping_mod
from client.site import evaluate_round, train_round
from common import records as R
from common.config import parse_node_config, parse_run_config
from common.logs import setup_logging

app = ClientApp()


@app.train(mods=[central_dp_clipping_mod])  # the site clips its own update when the server adapts the bound
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
def evaluate(msg: Message, context: Context) -> Message:
    setup_logging()
    cfg = parse_run_config(context.run_config)
    site = parse_node_config(context.node_config)
    metrics = evaluate_round(cfg, site, R.from_wire(msg.content[R.ARRAYS]))
    return Message(content=RecordDict({R.METRICS: MetricRecord(metrics)}), reply_to=msg)
