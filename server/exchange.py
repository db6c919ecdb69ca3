"""How a round's messages travel: pushed to the sites, replies pulled, arrays in their wire form."""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from common import records as R


def exchange(grid: Grid, messages: list[Message], timeout: float,
             poll_interval: float) -> tuple[list[Message], dict[str, int]]:
    """Push the round's messages and pull replies every ``poll_interval`` s until all are in or time is up.

    Returns the replies and, for each pushed message id, the node it was sent to. Flower's own
    ``send_and_receive`` sleeps 3 s between pulls; the last reply of a round waits on average
    half the interval before the server sees it (``run.reply-poll-interval``, 20 ms by default).
    """
    dsts = [int(m.metadata.dst_node_id) for m in messages]
    ids = list(grid.push_messages(messages))
    dst_of = {mid: dst for mid, dst in zip(ids, dsts) if mid}
    pending = set(dst_of)
    replies: list[Message] = []
    end = time.monotonic() + timeout
    while pending and time.monotonic() < end:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending -= {m.metadata.reply_to_message_id for m in got}
        if pending:
            time.sleep(min(poll_interval, max(0.0, end - time.monotonic())))
    return replies, dst_of


def payload_bytes(msg: Message) -> int:
    """Bytes of model arrays a message carries (the bulk of what crosses the network)."""
    return sum(a.count_bytes() for a in msg.content.array_records.values())


def encode(messages: list[Message], dtype: str) -> list[Message]:
    """The model arrays of outgoing messages as they travel (``common.records.to_wire``: cast to
    ``strategy.update-dtype`` and packed into one array), once per distinct record."""
    cast: dict[int, ArrayRecord] = {}
    for msg in messages:
        for key, rec in list(msg.content.array_records.items()):
            if any(rec is done for done in cast.values()):
                continue  # Flower's strategies share one RecordDict between their messages
            if id(rec) not in cast:
                cast[id(rec)] = R.to_wire(rec, dtype)
            msg.content[key] = cast[id(rec)]
    return messages


def sender_of(msg: Message, dst_of: dict[str, int]) -> int:
    """The node a reply answers for: the one its request was sent to (a reply the SuperLink writes
    for a node that went offline comes from the SuperLink itself), else its source."""
    return dst_of.get(msg.metadata.reply_to_message_id, int(msg.metadata.src_node_id))
