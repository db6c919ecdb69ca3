"""The server's side of secure aggregation: it learns the sum of the sites' updates, not one of them.

``strategy.secure-aggregation = true``. One training round becomes four exchanges with the
sampled sites (SecAgg+, Bell et al. 2020; the arithmetic and its guarantee: ``common/secagg.py``;
a site's side: ``client/secagg.py``):

1. ``keys``: each site's two public keys.
2. ``shares``: the public keys of all who answered, in a random ring order that fixes each site's
   neighbours (``strategy.secagg-degree``); back come sealed shares, routed in stage 3.
3. ``train``: the strategy's own train message plus the shares addressed to the site; back come
   the site's metrics and its masked, quantized update.
4. ``unmask``: who sent a masked update and who did not; back come the shares that rebuild the
   self masks of the first and the masking keys of the second.

The server sums the masked updates, removes the masks and dequantizes: the sum of the updates
(trained minus global) of the sites that sent one, exact up to rounding (each coordinate of each
update moves less than one quantization step, unbiased). A site that drops after sharing its
keys is survived while every secret still has ``t`` holders answering; otherwise the round
fails cleanly: nothing is aggregated and the record says why.

:meth:`SecureRound.run` returns what the round loop needs; the plain and the secure paths share
everything after it (rows, records, the strategy's own step on the aggregate).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from common import records as R
from common import secagg as S
from common.config import AppConfig
from server.exchange import sender_of

log = logging.getLogger(__name__)

SECAGG = "secagg"  # the ConfigRecord of the protocol's fields in every secure message


@dataclass
class SecureOutcome:
    """A secure round as the round loop sees it."""

    replies: list[Message]  # stage 3's replies (metrics and status; their masked arrays removed)
    dst_of: dict[str, int]  # stage 3's message id -> node
    total: dict[str, np.ndarray] | None  # sum of the senders' updates (float64), None if the round failed
    senders: list[int]  # the sites whose update is in the sum
    failed: dict[int, str] = field(default_factory=dict)  # sites that dropped before stage 3, and why
    reason: str = ""  # why the sum could not be computed ('' when it was)
    stats: dict = field(default_factory=dict)  # for the round record


class SecureRound:
    """Runs the four stages; ``exchange(grid, messages, timeout, poll) -> (replies, dst_of)``."""

    def __init__(self, grid, cfg: AppConfig, exchange: Callable) -> None:
        self.grid, self.cfg, self.exchange = grid, cfg, exchange

    def quantizer(self, clip_norm: float) -> S.Quantizer:
        """The round's quantizer: range the user-level clipping norm, else ``strategy.secagg-range``."""
        st = self.cfg.strategy
        return S.Quantizer(clip_norm or st.secagg_range or S.DEFAULT_RANGE, st.secagg_bits)

    def _stage(self, nodes: list[int], content_of: Callable[[int], RecordDict],
               message_type: str) -> tuple[dict[int, Message], dict[str, int], float]:
        messages = [Message(content=content_of(n), dst_node_id=n, message_type=message_type) for n in nodes]
        t = time.perf_counter()
        replies, dst_of = self.exchange(self.grid, messages, self.cfg.run.round_timeout,
                                        self.cfg.run.reply_poll_interval)
        by_node = {}
        for msg in replies:
            by_node[sender_of(msg, dst_of)] = msg
        return by_node, dst_of, time.perf_counter() - t

    def run(self, rnd: int, train_messages: list[Message], global_arrays: ArrayRecord,
            clip_norm: float = 0.0) -> SecureOutcome:
        """One secure round. ``clip_norm`` > 0 (user-level DP): the bound every site clips its
        update to, the one the server's noise is scaled to (the strategy's current one)."""
        st = self.cfg.strategy
        quantizer = self.quantizer(clip_norm)
        sampled = [int(m.metadata.dst_node_id) for m in train_messages]
        reference = R.numpy_arrays(global_arrays)
        keys_ = S.float_keys(reference)
        dim = sum(reference[k].size for k in keys_)
        stats: dict = {"bits": st.secagg_bits, "range": quantizer.value_range, "step": quantizer.step,
                       "sampled": len(sampled), "messages": 0}
        failed: dict[int, str] = {}
        state = {"replies": [], "dst_of": {}, "senders": []}

        def fail(reason: str) -> SecureOutcome:
            log.error("round %d: %s; nothing is aggregated", rnd, reason)
            return SecureOutcome(list(state["replies"]), dict(state["dst_of"]), None, list(state["senders"]), failed,
                                 reason, stats)

        def stage(nodes, content_of, message_type, name):
            stats["messages"] += 2 * len(nodes)
            replies, dst_of, stats[f"{name}-seconds"] = self._stage(nodes, content_of, message_type)
            return replies, dst_of

        def answered(nodes: list[int], replies: dict[int, Message], name: str) -> list[int]:
            kept = []
            for n in nodes:
                msg = replies.get(n)
                if msg is not None and not msg.has_error() and SECAGG in msg.content.config_records:
                    kept.append(n)
                    continue
                why = "no reply"
                if msg is not None and msg.has_error():
                    why = msg.error.reason
                elif msg is not None and R.STATUS_RECORD in msg.content.config_records:
                    why = str(msg.content[R.STATUS_RECORD].get(R.REASON, "the site failed"))
                failed[n] = f"secure aggregation, stage {name}: {why}"
            return kept

        try:
            S.check_field(quantizer, len(sampled))
        except OverflowError as err:
            return fail(f"secure aggregation: {err}")
        base = {"round": rnd}

        # 1: keys
        keys, _ = stage(sampled, lambda n: RecordDict({SECAGG: ConfigRecord(base)}), "query.secagg_keys", "keys")
        with_keys = answered(sampled, keys, "keys")
        c_pk, s_pk = {}, {}
        for n in list(with_keys):  # a key that is not a point of the curve drops its site, no one else
            try:
                rec = keys[n].content[SECAGG]
                c_pk[n], s_pk[n] = S.checked_public(rec["c-pk"]), S.checked_public(rec["s-pk"])
            except (KeyError, TypeError, ValueError) as err:
                failed[n] = f"secure aggregation, stage keys: unusable public keys ({err})"
                with_keys.remove(n)
        if not with_keys:
            return fail("secure aggregation: no site sent usable keys")
        order = list(with_keys)
        secrets.SystemRandom().shuffle(order)  # the ring: who neighbours whom
        degree = st.secagg_degree
        holders = len(S.neighbours(order, order[0], degree)) if order else 0
        try:
            t = S.threshold_for(holders, st.secagg_threshold)
        except ValueError as err:
            return fail(f"secure aggregation: {err}")
        stats.update({"threshold": t, "holders": holders})
        if len(with_keys) < max(t, 2):
            return fail(f"secure aggregation: {len(with_keys)} site(s) sent usable keys, fewer than the threshold "
                        f"{t} (or 2)")

        # 2: shares
        shares_cfg = ConfigRecord({**base, "order": S.node_strs(order), "degree": degree,
                                   "threshold": st.secagg_threshold, "nodes": S.node_strs(with_keys), "c-pk": [c_pk[n] for n in with_keys],
                                   "s-pk": [s_pk[n] for n in with_keys]})
        shared_replies, _ = stage(with_keys, lambda n: RecordDict({SECAGG: shares_cfg}), "query.secagg_shares",
                                  "shares")
        shared = answered(with_keys, shared_replies, "shares")
        if len(shared) < max(t, 2):
            return fail(f"secure aggregation: {len(shared)} site(s) shared keys, fewer than the threshold {t} (or 2)")
        boxes: dict[int, list[tuple[int, bytes]]] = {}
        b_hash: dict[int, bytes] = {}
        for src in list(shared):  # a malformed reply drops its site: no one masks with it
            try:
                rec = shared_replies[src].content[SECAGG]
                boxes[src] = [(dst, bytes(box)) for dst, box in zip(S.node_ids(rec["dst"]), rec["box"], strict=True)]
                b_hash[src] = bytes(rec["b-hash"])
            except (KeyError, TypeError, ValueError) as err:
                failed[src] = f"secure aggregation, stage shares: a malformed reply ({err})"
                shared.remove(src)
        if len(shared) < max(t, 2):
            return fail(f"secure aggregation: {len(shared)} site(s) shared keys, fewer than the threshold {t} (or 2)")
        inbox: dict[int, list[tuple[int, bytes]]] = {n: [] for n in shared}
        for src in shared:
            for dst, box in boxes[src]:
                if dst in inbox:
                    inbox[dst].append((src, box))

        # 3: train and mask
        train_of = {int(m.metadata.dst_node_id): m for m in train_messages}
        range_cfg = {"range": quantizer.value_range, "bits": st.secagg_bits, "shared": S.node_strs(shared)}
        if clip_norm:
            range_cfg["clip-norm"] = float(clip_norm)

        def train_content(n: int) -> RecordDict:
            content = RecordDict(dict(train_of[n].content.items()))
            content[SECAGG] = ConfigRecord({**range_cfg, "inbox-from": S.node_strs(s for s, _ in inbox[n]),
                                            "inbox": [box for _, box in inbox[n]]})
            return content

        trained, dst_of = stage(shared, train_content, "train.secagg", "train")
        state["replies"], state["dst_of"] = list(trained.values()), dst_of
        masked: dict[int, np.ndarray] = {}
        for n in shared:
            msg = trained.get(n)
            if msg is None:
                failed[n] = "secure aggregation, stage train: no reply"
                continue
            if msg.has_error() or S.MASKED not in msg.content.array_records:
                continue  # the site's own failure or refusal: its row says why
            rec = msg.content.array_records[S.MASKED]
            try:
                y = rec[S.MASKED_ARRAY].numpy() if S.MASKED_ARRAY in rec else None
            except (ValueError, TypeError):
                y = None
            del msg.content[S.MASKED]  # the loop reads metrics and status only
            if y is None or y.dtype != np.uint32 or y.shape != (dim,):
                # Counted as dropped: its self mask is never revealed, so its masked array, if
                # anything, stays a one-time pad; its pairwise masks come out with its key.
                failed[n] = (f"secure aggregation: a malformed masked update (expected uint32 of shape ({dim},), "
                             f"got {'nothing readable' if y is None else f'{y.dtype} of shape {y.shape}'})")
                continue
            masked[n] = y
        senders = [n for n in shared if n in masked]
        dropped = [n for n in shared if n not in masked]
        state["senders"] = senders
        stats.update({"sent": len(senders), "dropped-after-sharing": len(dropped),
                      "masked-bytes": int(sum(y.nbytes for y in masked.values()))})
        if len(senders) < max(t, 2):
            return fail(f"secure aggregation: {len(senders)} masked update(s), fewer than the threshold {t} (or 2)")
        if not S.connected(order, degree, senders):
            return fail("secure aggregation: the sites that sent are not connected through their neighbours "
                        "(too many dropped on a sparse graph); unmasking would reveal partial sums. Raise "
                        "strategy.secagg-degree")

        # 4: unmask
        unmask_cfg = ConfigRecord({**base, "sent": S.node_strs(senders), "dropped": S.node_strs(dropped)})
        revealed, _ = stage(senders, lambda n: RecordDict({SECAGG: unmask_cfg}), "query.secagg_unmask", "unmask")
        b_shares: dict[int, list[bytes]] = {n: [] for n in senders}
        # A dropped site's key is needed only where one of its neighbours sent: its masks are there.
        k_shares: dict[int, list[bytes]] = {v: [] for v in dropped
                                            if any(u in masked for u in S.neighbours(order, v, degree)[1:])}
        for n in answered(senders, revealed, "unmask"):
            try:  # a malformed reply is ignored whole: its shares count for nothing
                rec = revealed[n].content[SECAGG]
                got_b = [(v, bytes(x)) for v, x in zip(S.node_ids(rec["b-of"]), rec["b"], strict=True)]
                got_k = [(v, bytes(x)) for v, x in zip(S.node_ids(rec["k-of"]), rec["k"], strict=True)]
            except (KeyError, TypeError, ValueError) as err:
                log.warning("round %d: site %d's unmask reply is malformed (%s); its shares are not used", rnd, n, err)
                continue
            for v, share in got_b:
                if v in b_shares:
                    b_shares[v].append(share)
            for v, share in got_k:
                if v in k_shares:
                    k_shares[v].append(share)
        short = [n for n, got in {**b_shares, **k_shares}.items() if len(got) < t]
        if short:
            return fail(f"secure aggregation: fewer than {t} shares came back for {len(short)} site(s)' secrets "
                        "(too many sites dropped in the unmask stage)")
        # Every rebuilt secret is checked: a self-mask seed against the hash its site committed to
        # in stage 2, a masking key against its public key; a wrong share is outvoted when more
        # than t came back (S.rebuild), and a secret no subset rebuilds fails the round.
        self_seeds = {n: S.rebuild(b_shares[n], t, lambda b, n=n: S.seed_hash(b) == b_hash[n]) for n in senders}
        keys_of = {v: S.rebuild(k_shares[v], t, lambda k, v=v: S.public_of(k) == s_pk[v]) for v in k_shares}
        bad = sorted(n for n, x in {**self_seeds, **keys_of}.items() if x is None)
        if bad:
            return fail(f"secure aggregation: the shares of {len(bad)} site(s)' secrets do not rebuild them "
                        "(a holder sent a wrong share)")
        total = np.zeros(dim, dtype=np.uint32)
        for y in masked.values():
            total += y
        for n in senders:
            total -= S.prg(self_seeds[n], b"self", dim)
        for v, raw in keys_of.items():  # its pairwise masks stayed in its sending neighbours' updates
            key = S.load_private(raw)
            for u in S.neighbours(order, v, degree)[1:]:
                if u in masked:
                    mask = S.prg(S.agreed_seed(key, s_pk[u]), b"pair", dim)
                    total = total - mask if S.pair_sign(u, v) > 0 else total + mask
        vector = quantizer.dequantize_sum(total, len(senders))
        stats.update({"max-abs-error-bound": len(senders) * quantizer.step,
                      "rms-error-bound": quantizer.step * np.sqrt(len(senders)) / 2})
        return SecureOutcome(state["replies"], dst_of, S.unflatten(vector, reference, keys_), senders, failed, "",
                             stats)
