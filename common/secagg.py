"""Secure aggregation: the arithmetic of SecAgg+ shared by sites and server (issue 22).

The protocol (Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead"; Bonawitz et al. 2017 when every site is every other's neighbour) runs in four
stages per training round; ``client/secagg.py`` is a site's side, ``server/secagg.py`` the
server's. This module is the part both need: quantization, the masks, the neighbour graph,
secret sharing and the encryption of shares.

What the server learns. Each site ``u`` sends ``y_u = q_u + PRG(b_u) + sum_v s(u, v) PRG(k_uv)``
(mod 2^32, per coordinate), where ``q_u`` is its quantized update, ``b_u`` a fresh secret seed,
``k_uv`` the key it agrees with neighbour ``v`` (ECDH), and ``s(u, v) = +1`` if ``u < v`` else
``-1``. Every ``PRG`` output is uniform on ``[0, 2^32)``, so ``y_u`` alone is uniform whatever
``q_u`` is (a one-time pad). In the sum over the sites that sent one, the pairwise masks of two
such sites cancel; the server removes the rest with seeds it reconstructs from ``t`` Shamir
shares held by the sites: ``b_u`` of every site that sent ``y_u``, and the masking key of every
site that shared keys but sent nothing (so its pairwise masks in the others' ``y`` can be
recomputed). An honest site reveals, for each neighbour, a share of ``b`` or a share of the key,
never both, so the server never holds both secrets of one ``y``. Trust model: honest but
curious server and sites. With every site neighbouring every other, fewer than ``t`` sites
colluding with the server learn nothing beyond the sum (Bell et al.'s semi-honest guarantee);
on a sparse graph only while the honest senders stay connected without the colluders (not
checked: a reviewer showed one colluder bridging a dropout's gap). A malicious server that
tells sites different lists of who dropped is outside it (the paper's malicious variant adds
signatures and a consistency round).

Our own choices, each because the primitive at hand was not enough:

- The masks come from ChaCha20 keyed by the full 256-bit seed (``prg``). Flower's
  ``pseudo_rand_gen`` folds its seed to 32 bits and draws from NumPy's Mersenne Twister: a
  server could try all 2^32 seeds of a mask. Key agreement, Shamir sharing and share
  encryption are Flower's own (``flwr.common.secure_aggregation``).
- Quantization is deterministic in its range and refuses values outside it
  (:class:`Quantizer`): Flower's clips silently. The field is 2^32 and the number of summands
  is checked against it before a round (:meth:`Quantizer.max_summands`), so the sum never wraps.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import math
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

try:  # Flower's secure-aggregation primitives (flwr pinned in pyproject; tests/unit/test_secagg.py)
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
except ImportError as err:  # pragma: no cover - only with another flwr
    raise ImportError(f"flwr's secure-aggregation primitives moved ({err}); common/secagg.py was written for the "
                      "flwr version pinned in pyproject.toml") from err

MASKED = "secagg-masked"  # a site's reply: the ArrayRecord of its masked update...
MASKED_ARRAY = "y"  # ...one uint32 array
DEFAULT_RANGE = 1.0  # strategy.secagg-range = 0 without user-level DP (with it: the clipping norm)
FIELD_BITS = 32  # masked values and their sums live in Z_(2^32): uint32 arithmetic wraps exactly there
CURVE = ec.SECP384R1()  # Flower's curve for its SecAgg+ keys


class OutOfRange(ValueError):
    """A value to quantize lies outside the quantizer's range (never clipped silently)."""


@dataclass(frozen=True)
class Quantizer:
    """Stochastic rounding of values in ``[-value_range, value_range]`` to ``bits``-bit integers.

    ``x`` becomes ``q`` in ``0..levels`` with ``E[q] step - value_range = x`` and
    ``|q step - value_range - x| < step`` per coordinate, ``step = 2 value_range / levels``.
    A sum of ``k`` quantized vectors dequantizes with the offset ``k value_range``; it is
    exact in the field while ``k levels < 2^32`` (:meth:`max_summands`).
    """

    value_range: float
    bits: int

    def __post_init__(self) -> None:
        if not (self.value_range > 0 and math.isfinite(self.value_range)):
            raise ValueError(f"the quantization range must be a positive number, got {self.value_range}")
        if not 1 <= self.bits < FIELD_BITS:
            raise ValueError(f"quantization bits must be in 1..{FIELD_BITS - 1}, got {self.bits}")

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    @property
    def step(self) -> float:
        return 2 * self.value_range / self.levels

    def max_summands(self) -> int:
        """How many quantized vectors can be summed in the field without wrapping around."""
        return ((1 << FIELD_BITS) - 1) // self.levels

    def l2_slack(self, dim: int) -> float:
        """Largest L2 distance rounding can move a vector of ``dim`` coordinates (``step sqrt(dim)``)."""
        return self.step * math.sqrt(dim)

    def quantize(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if not np.isfinite(x).all():
            raise OutOfRange("the update has non-finite values; nothing can be quantized")
        worst = float(np.abs(x).max(initial=0.0))
        if worst > self.value_range:
            raise OutOfRange(f"an update coordinate of magnitude {worst:.4g} lies outside the secure-aggregation "
                             f"range {self.value_range:g}; raise strategy.secagg-range (or lower train.lr)")
        scaled = (x + self.value_range) / self.step
        low = np.floor(scaled)
        q = low + (rng.random(x.shape) < (scaled - low))
        return np.clip(q, 0, self.levels).astype(np.uint32)

    def dequantize_sum(self, total: np.ndarray, count: int) -> np.ndarray:
        """The real-valued sum of ``count`` vectors whose quantized values sum to ``total``."""
        if count > self.max_summands():
            raise OverflowError(f"{count} summands of {self.bits} bits overflow the 2^{FIELD_BITS} field")
        return total.astype(np.float64) * self.step - count * self.value_range


def check_field(quantizer: Quantizer, sites: int) -> None:
    """Refuse, before anything is sent, a round whose sum could wrap around the field."""
    if sites > quantizer.max_summands():
        raise OverflowError(
            f"{sites} sites with strategy.secagg-bits = {quantizer.bits} could overflow the 2^{FIELD_BITS} field "
            f"(at most {quantizer.max_summands()} summands); lower strategy.secagg-bits")


# ---- the pseudo-random masks ----------------------------------------------------------

def prg(seed: bytes, label: bytes, length: int) -> np.ndarray:
    """``length`` uniform uint32 words from a 32-byte secret ``seed``: ChaCha20's keystream
    under a key derived from the seed for this ``label`` (HKDF-SHA256), so the self mask and a
    pairwise mask never share a keystream even if their seeds were equal."""
    if len(seed) < 16:
        raise ValueError("a mask seed needs at least 128 bits")
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedgen-secagg-" + label).derive(seed)
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(4 * length))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


def pair_sign(me: int, other: int) -> int:
    """+1 for the smaller node id of a pair, -1 for the larger: their masks cancel in the sum."""
    return 1 if me < other else -1


def masked(q: np.ndarray, self_seed: bytes, pair_seeds: dict[int, bytes], me: int) -> np.ndarray:
    """``q + PRG(self_seed) + sum_v pair_sign(me, v) PRG(pair_seeds[v])`` in the field."""
    y = q.astype(np.uint32) + prg(self_seed, b"self", q.size)
    for other, seed in pair_seeds.items():
        mask = prg(seed, b"pair", q.size)
        y = y + mask if pair_sign(me, other) > 0 else y - mask
    return y.astype(np.uint32)


# ---- keys, the neighbour graph, shares ------------------------------------------------

def new_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE)


def public_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)


def private_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_numbers().private_value.to_bytes(48, "big")


def load_private(raw: bytes) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(raw, "big"), CURVE)


def node_ids(values) -> list[int]:
    """Node ids as they travel in the protocol's ConfigRecords (strings: they exceed int64)."""
    return [int(v) for v in values]


def node_strs(ids) -> list[str]:
    return [str(int(v)) for v in ids]


def checked_public(raw) -> bytes:
    """Public key bytes, refused (ValueError) unless they are a point of the curve."""
    raw = bytes(raw)
    ec.EllipticCurvePublicKey.from_encoded_point(CURVE, raw)
    return raw


def public_of(private_raw: bytes) -> bytes:
    """The public key bytes of a private key's bytes (b'' when they are not a valid key)."""
    try:
        return public_bytes(load_private(private_raw))
    except ValueError:
        return b""


def seed_hash(seed: bytes) -> bytes:
    """A site's commitment to its self-mask seed (stage 2): SHA-256, which reveals nothing of a
    256-bit random seed and lets the server check the seed it rebuilds from shares."""
    return hashlib.sha256(b"fedgen-secagg-self-seed" + seed).digest()


def rebuild(shares: list[bytes], t: int, valid, tries: int = 64) -> bytes | None:
    """The secret ``t`` of ``shares`` rebuild and ``valid`` accepts, trying other subsets when
    one is wrong (at most ``tries``); None if none does."""
    for i, subset in enumerate(itertools.combinations(shares, t)):
        if i >= tries:
            break
        try:
            secret = combine(list(subset))
        except ValueError:
            continue
        if valid(secret):
            return secret
    return None


def agreed_seed(key: ec.EllipticCurvePrivateKey, peer_public: bytes) -> bytes:
    """32 secret bytes two nodes agree on (ECDH + HKDF, Flower's ``generate_shared_key``)."""
    peer = ec.EllipticCurvePublicKey.from_encoded_point(CURVE, peer_public)
    return base64.urlsafe_b64decode(generate_shared_key(key, peer))


def neighbours(order: list[int], node: int, degree: int) -> list[int]:
    """The nodes that hold ``node``'s shares and share a pairwise mask with it, itself first:
    the ``ceil(degree / 2)`` nearest on each side of the ring ``order`` (every node when
    ``degree`` is 0 or the ring is that small). Symmetric: ``v`` is ``u``'s neighbour exactly when
    ``u`` is ``v``'s. SecAgg+'s sparse graph; the server draws ``order`` at random each round."""
    n = len(order)
    half = (degree + 1) // 2
    if degree <= 0 or 2 * half >= n - 1:
        return [node] + [v for v in order if v != node]
    i = order.index(node)
    return [node] + [order[(i - k) % n] for k in range(1, half + 1)] + [order[(i + k) % n] for k in range(1, half + 1)]


def connected(order: list[int], degree: int, nodes: list[int]) -> bool:
    """Whether ``nodes`` form one group through the neighbour graph among themselves.

    The server learns the self mask of every sender and the masking key of every site that
    shared keys and sent nothing, so it can strip the masks from the sum over *any* group of
    senders with no neighbour among the other senders. Only when the senders are connected is
    that group all of them, and the sum all it learns (a sparse graph with dropouts can cut it:
    found by review). Checked by the server before it unmasks and by every site before it reveals."""
    if not nodes:
        return True
    members, seen, todo = set(nodes), {nodes[0]}, [nodes[0]]
    while todo:
        u = todo.pop()
        for v in neighbours(order, u, degree)[1:]:
            if v in members and v not in seen:
                seen.add(v)
                todo.append(v)
    return seen == members


def threshold_for(holders: int, threshold: int) -> int:
    """Shares needed to reconstruct: ``threshold`` if set, else a majority of the holders.

    More than half the holders, so that the server with a minority of colluding sites never
    holds enough shares of both secrets of one site. Equal to the holders, no dropout can be
    survived (a site that drops takes its own share with it)."""
    t = threshold if threshold > 0 else holders // 2 + 1
    if not holders // 2 < t <= holders:
        raise ValueError(f"strategy.secagg-threshold = {threshold}: each secret has {holders} holders this round; "
                         f"use 0 (a majority) or a count from {holders // 2 + 1} to {holders}")
    return t


def split(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """``holders`` Shamir shares of ``secret``, any ``threshold`` of which rebuild it."""
    return create_shares(secret, threshold, holders)


def combine(shares: list[bytes]) -> bytes:
    return combine_shares(shares)


def seal(key: bytes, src: int, dst: int, b_share: bytes, key_share: bytes) -> bytes:
    """A share pair for ``dst``, encrypted (Fernet, Flower's ``encrypt``) under the seed ``src``
    and ``dst`` agree on; the server routes it and cannot read it."""
    body = b"".join([src.to_bytes(8, "little"), dst.to_bytes(8, "little"), len(b_share).to_bytes(4, "little"),
                     b_share, key_share])
    return encrypt(base64.urlsafe_b64encode(key), body)


def unseal(key: bytes, ciphertext: bytes, src: int, dst: int) -> tuple[bytes, bytes]:
    """The (b share, key share) in a sealed pair; refuses one not from ``src`` to ``dst``."""
    body = decrypt(base64.urlsafe_b64encode(key), ciphertext)
    got_src, got_dst = int.from_bytes(body[:8], "little"), int.from_bytes(body[8:16], "little")
    if (got_src, got_dst) != (src, dst):
        raise ValueError(f"a share sealed from {got_src} to {got_dst} was routed as from {src} to {dst}")
    mark = int.from_bytes(body[16:20], "little")
    return body[20:20 + mark], body[20 + mark:]


# ---- model updates as one vector --------------------------------------------------------

def float_keys(arrays: dict[str, np.ndarray]) -> list[str]:
    """The keys of the trained (floating) arrays, in the record's order; integer buffers stay the global's."""
    return [k for k, v in arrays.items() if np.issubdtype(v.dtype, np.floating)]


def flatten(arrays: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in keys]) if keys else np.zeros(0)


def unflatten(vector: np.ndarray, like: dict[str, np.ndarray], keys: list[str]) -> dict[str, np.ndarray]:
    out, i = {}, 0
    for k in keys:
        n = like[k].size
        out[k] = vector[i:i + n].reshape(like[k].shape)
        i += n
    if i != vector.size:
        raise ValueError(f"a vector of {vector.size} values for arrays of {i}")
    return out
