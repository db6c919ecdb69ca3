"""A site's side of secure aggregation (SecAgg+; the arithmetic and its guarantee: ``common/secagg.py``).

Four stages a round, each one message from the server (``server/secagg.py``):

1. ``keys``: two fresh key pairs, one to encrypt shares, one to agree masks; the public halves go back.
2. ``shares``: a fresh self-mask seed ``b``; ``b`` and the masking private key are split into
   Shamir shares, one per neighbour (and one kept), each sealed for its holder and handed to the
   server to route.
3. ``train``: the site trains as in any round (``client.site.train_round``: the same ledger,
   charge and replay), then sends its update only masked: the difference from the global model,
   clipped to the server's bound under user-level DP, quantized, plus its self mask and its
   pairwise masks with every neighbour that shared keys. The metrics go as in a plain round
   (DP outputs and data-independent values: README, "What a site sends").
4. ``unmask``: for each neighbour, the share of its ``b`` if the server says it sent its masked
   update, or the share of its masking key if it says it did not; never both for one neighbour,
   and nothing when the server counts this site as dropped while it is answering.

The secrets of a round live in the run's ``Context.state`` between its messages (the site's
own SuperNode keeps it; never sent) and are dropped after the unmask stage. A message of
another round than the state's, or out of order, is refused: nothing is reused across rounds.
"""

from __future__ import annotations

import logging
import secrets

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from common import records as R
from common import secagg as S
from common.config import AppConfig, SiteConfig
from client.site import RoundResult, train_round

log = logging.getLogger(__name__)

STATE = "secagg"  # the ConfigRecord in Context.state that holds this round's secrets


class ProtocolError(RuntimeError):
    """A secure-aggregation message that does not fit this site's state (order, round, sets)."""


def _state(state: RecordDict, server_round: int, stage: str) -> ConfigRecord:
    rec = state.get(STATE)
    if rec is None or int(rec["round"]) != server_round or rec["stage"] != stage:
        got = "none" if rec is None else f"round {int(rec['round'])}, after {rec['stage']}"
        raise ProtocolError(f"secure aggregation: expected the state of round {server_round} after {stage}, "
                            f"have {got}; this round's earlier stages did not reach this site")
    return rec


def keys(config: ConfigRecord, state: RecordDict) -> ConfigRecord:
    """Stage 1: fresh key pairs for this round; their public halves."""
    c_key, s_key = S.new_private_key(), S.new_private_key()
    state[STATE] = ConfigRecord({"round": int(config["round"]), "stage": "keys",
                                 "c-sk": S.private_bytes(c_key), "s-sk": S.private_bytes(s_key)})
    return ConfigRecord({"c-pk": S.public_bytes(c_key), "s-pk": S.public_bytes(s_key)})


def shares(config: ConfigRecord, state: RecordDict, me: int) -> ConfigRecord:
    """Stage 2: split a fresh self-mask seed and the masking key among this site's neighbours."""
    rec = _state(state, int(config["round"]), "keys")
    order, with_keys = S.node_ids(config["order"]), S.node_ids(config["nodes"])
    if me not in with_keys:
        raise ProtocolError("secure aggregation: this site's keys are not among the round's")
    c_pk = dict(zip(with_keys, config["c-pk"]))
    s_pk = dict(zip(with_keys, config["s-pk"]))
    planned = S.neighbours(order, me, int(config["degree"]))
    holders = [v for v in planned if v in c_pk]  # itself first; neighbours that sent no keys hold nothing
    t = S.threshold_for(len(planned), int(config["threshold"]))
    if len(holders) < t:
        raise ProtocolError(f"secure aggregation: {len(holders)} of this site's {len(planned)} share holders are "
                            f"left, fewer than the threshold {t}")
    b = secrets.token_bytes(32)
    b_shares, k_shares = S.split(b, t, len(holders)), S.split(bytes(rec["s-sk"]), t, len(holders))
    c_key = S.load_private(bytes(rec["c-sk"]))
    dst, boxes = [], []
    for v, b_share, k_share in zip(holders[1:], b_shares[1:], k_shares[1:]):
        dst.append(v)
        boxes.append(S.seal(S.agreed_seed(c_key, c_pk[v]), me, v, b_share, k_share))
    rec.update({"stage": "shares", "b": b, "order": S.node_strs(order), "degree": int(config["degree"]),
                "holders": S.node_strs(holders), "own-b": b_shares[0], "own-k": k_shares[0],
                "pk-nodes": S.node_strs(with_keys), "c-pk": [c_pk[v] for v in with_keys],
                "s-pk": [s_pk[v] for v in with_keys]})
    return ConfigRecord({"dst": S.node_strs(dst), "box": boxes, "b-hash": S.seed_hash(b)})


def train(cfg: AppConfig, site: SiteConfig, global_arrays: ArrayRecord, config: ConfigRecord, secure: ConfigRecord,
          state: RecordDict, me: int, *, run_id: int | str, run_name: str) -> tuple[RoundResult, ArrayRecord | None]:
    """Stage 3: train as in any round, then mask the update. Returns the round's result (its
    metrics and status; no model arrays) and the masked update (None when the site refused)."""
    server_round = int(config["server-round"])
    rec = _state(state, server_round, "shares")
    shared = S.node_ids(secure["shared"])  # the sites whose shares reached the server: this site's pairwise partners
    if me not in shared:
        raise ProtocolError("secure aggregation: the server does not count this site's shares")
    result = train_round(cfg, site, global_arrays, server_round=server_round, state=state,
                         proximal_mu=float(config.get("proximal-mu", 0.0)), run_id=run_id, run_name=run_name)
    rec.update({"stage": "train", "inbox-from": S.node_strs(secure["inbox-from"]), "inbox": list(secure["inbox"])})
    if result.arrays is None:
        return result, None  # refused (budget): the server counts it as dropped and removes its masks
    reference = R.numpy_arrays(global_arrays)
    keys_ = S.float_keys(reference)
    trained = R.numpy_arrays(result.arrays)
    update = S.flatten(trained, keys_) - S.flatten(reference, keys_)
    quantizer = S.Quantizer(float(secure["range"]), int(secure["bits"]))
    clip = float(secure.get("clip-norm", 0.0))
    if clip > 0:  # user-level DP: clip so that even after rounding the update's norm is at most `clip`
        bound = clip - quantizer.l2_slack(update.size)
        if bound <= 0:
            raise S.OutOfRange(f"rounding {update.size} values at {quantizer.bits} bits can move an update by "
                               f"{quantizer.l2_slack(update.size):.3g}, more than the clipping norm {clip:g}; "
                               "raise strategy.secagg-bits")
        norm = float(np.linalg.norm(update))
        update = update * min(1.0, bound / (norm + 1e-12))
    q = quantizer.quantize(update, np.random.default_rng(secrets.randbits(128)))
    s_key = S.load_private(bytes(rec["s-sk"]))
    s_pk = dict(zip(S.node_ids(rec["pk-nodes"]), rec["s-pk"]))
    partners = [v for v in S.node_ids(rec["holders"])[1:] if v in shared]
    y = S.masked(q, bytes(rec["b"]), {v: S.agreed_seed(s_key, s_pk[v]) for v in partners}, me)
    result.arrays = None  # the update itself never leaves
    return result, ArrayRecord({S.MASKED_ARRAY: Array(y)})


def unmask(config: ConfigRecord, state: RecordDict, me: int) -> ConfigRecord:
    """Stage 4: the shares that remove the masks: ``b`` of the senders, the key of the others."""
    rec = _state(state, int(config["round"]), "train")
    sent, dropped = set(S.node_ids(config["sent"])), set(S.node_ids(config["dropped"]))
    if sent & dropped:
        raise ProtocolError("secure aggregation: the server lists a site both as sent and as dropped")
    if me in dropped or me not in sent:
        raise ProtocolError("secure aggregation: the server counts this site as dropped; revealing nothing")
    if not S.connected(S.node_ids(rec["order"]), int(rec["degree"]), sorted(sent)):
        raise ProtocolError("secure aggregation: the senders are not connected through their neighbours; "
                            "unmasking would reveal a partial sum; revealing nothing")
    c_key = S.load_private(bytes(rec["c-sk"]))
    c_pk = dict(zip(S.node_ids(rec["pk-nodes"]), rec["c-pk"]))
    inbox = dict(zip(S.node_ids(rec["inbox-from"]), rec["inbox"]))
    b_of, b_out, k_of, k_out = [me], [bytes(rec["own-b"])], [], []
    for v in S.node_ids(rec["holders"])[1:]:
        if v not in inbox or (v not in sent and v not in dropped):
            continue  # its shares never came (it dropped before sharing), or it is not in this round
        try:
            b_share, k_share = S.unseal(S.agreed_seed(c_key, c_pk[v]), bytes(inbox[v]), v, me)
        except Exception as err:  # noqa: BLE001 - one neighbour's unreadable box: skip it, reveal the rest
            log.warning("secure aggregation: the shares from node %d cannot be opened (%s); skipping them", v, err)
            continue
        if v in sent:
            b_of.append(v)
            b_out.append(b_share)
        else:
            k_of.append(v)
            k_out.append(k_share)
    del state[STATE]  # this round's secrets are spent
    return ConfigRecord({"b-of": S.node_strs(b_of), "b": b_out, "k-of": S.node_strs(k_of), "k": k_out})
