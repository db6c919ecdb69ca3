"""User-level (central) DP at the server, around any Flower strategy.

The mechanism, each aggregated round (DP-FedAvg, McMahan et al. 2018, "Learning
Differentially Private Recurrent Language Models", with a fixed denominator):

    release = global + ( sum over valid replies of clip(delta_i, C) + N(0, (z_u C)^2 I) ) / m

``delta_i`` is a site's model update (its reply minus the global model), ``clip`` scales
the whole update to L2 norm at most ``C``, and ``m`` is the number of sites the round was
sent to, fixed by the sampling *before any reply arrives*.

Guarantee. Adjacency: add or remove one site (all of its data, hence its whole update).
The sum of clipped updates has L2 sensitivity ``C`` under that adjacency; the noise has
std ``z_u C``, so the sum is the Gaussian mechanism with noise multiplier ``z_u``, and
dividing by the data-independent ``m`` is post-processing. A site that was sampled but
dropped, failed, or whose update was rejected contributes zero, which is exactly the
"removed" neighbour: no special case, and the noise never depends on who replied (an
earlier version divided by the realised number of replies ``k``, so both the mean and the
noise's spread changed with one site's participation). Every round that ran is released
and charged, whatever the number of valid replies: skipping a round when too few sites
replied would itself reveal the count.

Estimator. ``sum / m`` is an unbiased estimate of the mean update of the ``m`` sampled
sites when they all reply; a site that does not reply counts as a zero update, so with
dropouts the step is shrunk by ``k / m`` (biased towards zero, never noisier).

Accounting: the user-level accountant composes, every released round, a subsampled
Gaussian mechanism with noise multiplier ``z`` and sampling rate ``q = sampled /
population``. Flower samples a fixed number of sites without replacement, and the
Poisson-sampling RDP analysis used here is the standard approximation for that (as in
DP-FedAvg); with ``fraction-train = 1`` there is no amplification (q = 1) and the figure
is exact. The noised release is handed to the wrapped strategy as a single
uniform-weight reply, so its server optimiser (FedAdam, FedYogi, FedAvgM momentum) only
post-processes it and keeps its own state.

Adaptive clipping (``central-dp.clipping = "adaptive"``; Andrew et al., "Differentially
Private Learning with Adaptive Clipping", 2021). The server sends the current bound C with
every train message; each site clips its own update with Flower's ``adaptiveclipping_mod``.
The server re-clips every reply to C (a no-op for honest sites, the guarantee for any
other), and releases one more value, the *centred* count of updates that fit under C:

    noisy = sum over counted replies of (b_i - 1/2) + N(0, sigma_b^2),   b_i = 1 if ||delta_i|| <= C

Adding or removing one site moves that sum by at most 1/2 (a missing site contributes 0,
not -1/2), so the count is the Gaussian mechanism with multiplier ``2 sigma_b``. The
fraction that fit is estimated over the same fixed ``m``, ``noisy / m + 1/2``, and C moves
geometrically towards the ``target-quantile``: ``C <- C exp(-lr (fraction - target))``.
The update sum (multiplier ``z_u``) and the count (multiplier ``2 sigma_b``) together are
the Gaussian mechanism with ``z^-2 = z_u^-2 + (2 sigma_b)^-2`` (two Gaussian mechanisms
on one site's contribution compose as one with the summed squared sensitivity-to-noise
ratios). So the accountant charges the configured ``z`` every round and the updates are
noised at ``z_u = (z^-2 - (2 sigma_b)^-2)^-1/2`` (which needs ``2 sigma_b > z``).

What the round record publishes (``last_round``) is data-independent (``m``, C, the noise
scales) or the released noisy fraction; not the number of valid replies, nor how many
updates were clipped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from common import privacy
from common import records as R

log = logging.getLogger(__name__)


def single_reply(arrays: ArrayRecord) -> Message:
    """A model the server computed (a noised release, a securely summed mean), as the one
    uniform-weight reply a wrapped strategy aggregates: its server optimiser (FedAdam, FedYogi,
    FedAvgM) then only post-processes it and keeps its own state."""
    return Message(content=RecordDict({R.ARRAYS: arrays, R.METRICS: MetricRecord({R.WEIGHT: 1.0})}),
                   dst_node_id=0, message_type="train")


def clip_update(update: dict[str, np.ndarray], clip: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale the whole update (all arrays together) to L2 norm at most ``clip``."""
    norm = float(np.sqrt(sum(float(np.sum(u.astype(np.float64) ** 2)) for u in update.values())))
    scale = min(1.0, clip / (norm + 1e-12))
    return {k: u * scale for k, u in update.items()}, norm


def adaptive_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """Multiplier for the update noise so that update + bit count together cost ``noise_multiplier``."""
    if 2.0 * count_stddev <= noise_multiplier:
        raise ValueError(
            f"central-dp.clipped-count-stddev = {count_stddev:g} is too small for noise-multiplier "
            f"{noise_multiplier:g}: adaptive clipping needs 2 * clipped-count-stddev > noise-multiplier; "
            f"raise it (e.g. to {noise_multiplier:g}) or set it to 0 for the automatic value"
        )
    return (noise_multiplier ** -2 - (2.0 * count_stddev) ** -2) ** -0.5


def auto_count_stddev(noise_multiplier: float, expected_sites: int) -> float:
    """The paper's ``expected sites / 20``, but never below the noise multiplier.

    For the tens of sites of a cross-silo federation, sites/20 is far below any useful
    noise multiplier (and 2 sigma_b > z is required); sigma_b = z costs 15% more update
    noise ((1 - 1/4) ** -0.5 = 1.155) and keeps the noisy fraction's std at z / k.
    """
    return max(expected_sites / 20.0, noise_multiplier)


class UserLevelDP(Strategy):
    """Wrap ``strategy``: clip, sum, noise, divide by the planned count; account user-level epsilon."""

    def __init__(self, strategy: Strategy, noise_multiplier: float, clipping_norm: float, delta: float,
                 accountant: str = "rdp", seed: int = 0, *, adaptive: bool = False,
                 target_quantile: float = 0.5, clip_norm_lr: float = 0.2, count_stddev: float = 0.0) -> None:
        if noise_multiplier <= 0 or clipping_norm <= 0:
            raise ValueError("central-dp needs a positive noise-multiplier and clipping-norm")
        self.strategy = strategy
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm  # adaptive: the current bound, moved every round
        self.delta = delta
        self.accountant = accountant
        self.adaptive = adaptive
        self.target_quantile = target_quantile
        self.clip_norm_lr = clip_norm_lr
        self.count_stddev = count_stddev  # 0 = automatic, fixed at the first round
        if adaptive and count_stddev > 0:
            adaptive_noise_multiplier(noise_multiplier, count_stddev)  # refuse a bad setting up front
        self.rng = np.random.default_rng(seed)
        self.history: list[privacy.HistoryEntry] = []
        self._global: dict[str, np.ndarray] = {}
        self._sample_rate = 1.0
        self._denominator = 1  # m: the sites this round was sent to, fixed before any reply
        self.last_round: dict[str, float] = {}
        # Replies left out of the adaptive count (an audit's canary clients, server/canaries.py):
        # the bound follows the real sites' norms, not the canaries' fixed one.
        self.uncounted: set[int] = set()

    # --- accounting and checkpointed state ----------------------------------------------
    def epsilon(self) -> float:
        return privacy.epsilon(self.history, self.delta, self.accountant)

    def epsilon_after_next(self, sample_rate: float) -> float:
        return privacy.epsilon(privacy.compact([*self.history, (self.noise_multiplier, sample_rate, 1)]),
                               self.delta, self.accountant)

    def charge(self, sample_rate: float) -> None:
        """Compose one more released round into the user-level history."""
        self.history = privacy.compact([*self.history, (self.noise_multiplier, float(sample_rate), 1)])

    def state_dict(self) -> dict:
        """Everything a resumed run needs: the accountant history, the noise RNG, the adaptive bound."""
        return {"history": [list(h) for h in self.history], "rng": self.rng.bit_generator.state,
                "clipping_norm": float(self.clipping_norm), "count_stddev": float(self.count_stddev)}

    def load_state_dict(self, state: dict) -> None:
        self.history = [(float(n), float(q), int(s)) for n, q, s in state["history"]]
        self.rng.bit_generator.state = state["rng"]
        self.clipping_norm = float(state.get("clipping_norm", self.clipping_norm))
        self.count_stddev = float(state.get("count_stddev", self.count_stddev))

    # --- Strategy ---------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = {k: v.numpy() for k, v in arrays.items()}
        if self.adaptive:
            config[KEY_CLIPPING_NORM] = float(self.clipping_norm)  # read by the sites' adaptiveclipping_mod
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        population = max(1, len(list(grid.get_node_ids())))
        self._sample_rate = min(1.0, len(messages) / population)
        self._denominator = max(1, len(messages))
        if self.adaptive and self.count_stddev <= 0:
            self.count_stddev = auto_count_stddev(self.noise_multiplier, len(messages))
        return messages

    def update_noise_multiplier(self) -> float:
        """Multiplier of the noise on the update sum (larger than the accounted one when adaptive)."""
        if not self.adaptive:
            return self.noise_multiplier
        return adaptive_noise_multiplier(self.noise_multiplier, self.count_stddev)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Release the noised model of this round (always, whatever the number of valid replies)."""
        replies = [m for m in replies if not m.has_error()]
        total = {key: np.zeros_like(v, dtype=np.float64) for key, v in self._global.items()
                 if np.issubdtype(v.dtype, np.floating)}
        centred = 0.0  # sum of (b_i - 1/2) over the counted replies
        clip = self.clipping_norm
        for msg in replies:
            arrays = next(iter(msg.content.array_records.values()))
            update = {key: arrays[key].numpy().astype(np.float64) - self._global[key] for key in total}
            # Adaptive: the site already clipped (a no-op here); this re-clip is what the
            # guarantee rests on, whatever a site sent.
            update, norm = clip_update(update, clip)
            if id(msg) not in self.uncounted:
                centred += self._norm_bit(msg, norm, clip) - 0.5
            for key in total:
                total[key] += update[key]
        return self._release(server_round, total, centred, replies)

    def release_sum(self, server_round: int, total: dict[str, np.ndarray] | None, replies: list[Message]
                    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Release the noised model from the sum of the sites' clipped updates, computed without the
        server seeing one (secure aggregation, ``server/secagg.py``): each site clipped its own update
        to ``C`` (rounding included), so the sum has L2 sensitivity ``C`` under adding or removing one
        honest site, whatever the others sent. ``total`` None (the secure round failed): the release
        is the noise alone, charged as every round that ran. Fixed clipping only (the config refuses
        adaptive: its count needs each site's bit)."""
        if self.adaptive:
            raise ValueError("adaptive clipping needs each site's clipped bit; not under secure aggregation")
        zeros = {key: np.zeros_like(v, dtype=np.float64) for key, v in self._global.items()
                 if np.issubdtype(v.dtype, np.floating)}
        total = {key: np.asarray((total or {}).get(key, zeros[key]), dtype=np.float64) for key in zeros}
        return self._release(server_round, total, 0.0, [m for m in replies if not m.has_error()])

    def _release(self, server_round: int, total: dict[str, np.ndarray], centred: float, replies: list[Message]
                 ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Noise the update sum, divide by the planned ``m``, charge; the wrapped strategy's step on it."""
        m = self._denominator
        clip = self.clipping_norm
        z_update = self.update_noise_multiplier()
        noised: dict[str, Array] = {}
        for key, ref in self._global.items():
            if key in total:
                step = (total[key] + self.rng.normal(0.0, z_update * clip, size=ref.shape)) / m
                noised[key] = Array(np.asarray(ref + step, dtype=ref.dtype))
            else:  # integer buffers (e.g. counters) are not trained: keep the global value
                noised[key] = Array(np.asarray(ref))
        self.charge(self._sample_rate)
        self.last_round = {"denominator": float(m), "clipping-norm": float(clip),
                           "noise-std": float(z_update * clip / m), "noise-multiplier": float(self.noise_multiplier),
                           "update-noise-multiplier": float(z_update), "sample-rate": float(self._sample_rate),
                           "delta": float(self.delta)}
        if self.adaptive:
            noisy_fit = (centred + self.rng.normal(0.0, self.count_stddev)) / m + 0.5
            self.clipping_norm = clip * float(np.exp(-self.clip_norm_lr * (noisy_fit - self.target_quantile)))
            self.last_round.update({"count-stddev": float(self.count_stddev), "noisy-fit-fraction": float(noisy_fit),
                                    "next-clipping-norm": float(self.clipping_norm)})
        self.uncounted = set()
        log.info("round %d: user-level DP release over m = %d planned site(s), clip %.4g, noise std %.4g, "
                 "user-level epsilon %.3f", server_round, m, clip, z_update * clip / m, self.epsilon())

        # Site metrics (DP outputs of each site) are aggregated as usual; the weights go to a
        # single uniform release.
        metrics = (getattr(self.strategy, "train_metrics_aggr_fn")([r.content for r in replies], R.WEIGHT)
                   if replies else None)
        new_arrays, _ = self.strategy.aggregate_train(server_round, [single_reply(ArrayRecord(noised))])
        return new_arrays, metrics
    def _norm_bit(self, msg: Message, norm: float, clip: float) -> int:
        """1 if the update fit under C, from the norm received wherever that decides it.

        Strictly under C: it fit. Over C: the site did not clip it (no mod, or a dishonest
        site), so it did not fit. At C: a site that clipped and one whose update had
        exactly that norm look alike, so the site's own bit decides when adaptive. Flower's
        mod sets ``norm_bit`` = 1 when it *had to clip* (scaling factor < 1), the
        complement of the paper's b. (Flower's own wrapper then moves C by ``clipped -
        target``, which shrinks the bound exactly when too many updates are clipped; we do
        the paper's update on the fraction that fit.)
        """
        if norm < clip * (1 - 1e-6):
            return 1
        if norm > clip * (1 + 1e-6):
            return 0
        if self.adaptive:
            for rec in msg.content.metric_records.values():
                if KEY_NORM_BIT in rec:
                    return 1 - int(bool(rec[KEY_NORM_BIT]))
        return 1

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        log.info("user-level DP: noise multiplier %g, %s clipping norm %g, delta %g around %s",
                 self.noise_multiplier, "adaptive, initial" if self.adaptive else "fixed", self.clipping_norm,
                 self.delta, type(self.strategy).__name__)
