"""A ServerApp that imports only flwr: R rounds of one empty message per site, timed.

Writes one JSON line per round (``round``, ``started_at``, ``ended_at``, as fedgen's round
records) to ``run.records``; round 0 is the wait for the sites to register.
"""

from __future__ import annotations

import json
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    rounds, sites = int(cfg["run.num-rounds"]), int(cfg["run.num-sites"])
    poll, out = float(cfg["run.reply-poll-interval"]), str(cfg["run.records"])
    t = time.time()
    while len(nodes := sorted(grid.get_node_ids())) < sites:
        if time.time() - t > 120:
            raise RuntimeError(f"only {len(nodes)} of run.num-sites = {sites} sites registered within 120 s")
        time.sleep(poll)
    records = [{"round": 0, "started_at": t, "ended_at": time.time()}]
    for rnd in range(1, rounds + 1):
        t = time.time()
        msgs = [Message(RecordDict({"config": ConfigRecord({"server-round": rnd})}), dst_node_id=n,
                        message_type="train") for n in nodes[:sites]]
        pending = set(grid.push_messages(msgs))
        while pending:
            pending -= {m.metadata.reply_to_message_id for m in grid.pull_messages(pending)}
            if pending:
                time.sleep(poll)
        records.append({"round": rnd, "started_at": t, "ended_at": time.time()})
    with open(out, "w") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in records))
