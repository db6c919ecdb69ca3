"""User-level (central) DP at the server, around any Flower strategy, tolerant of dropouts.

Each site's model update (its reply minus the global model) is clipped to L2 norm C,
the clipped updates are averaged *uniformly* over the k sites that actually replied,
and Gaussian noise of standard deviation ``sigma * C / k`` is added to that mean.

Why this is right when sites drop out: one site changes the uniform mean of k clipped
updates by at most C / k, so noise ``sigma * C / k`` is the Gaussian mechanism with
noise multiplier ``sigma`` *for the k sites that took part*, whatever k turned out to
be. A site that was sampled but failed contributed nothing, so for it the round is as
if it had not been sampled. Flower's wrappers instead divide by the planned number of
sites and abandon the whole round when any site fails.

Accounting: the user-level accountant composes, every aggregated round, a subsampled
Gaussian mechanism with noise multiplier ``sigma`` and sampling rate ``q = sampled /
population``. Flower samples a fixed number of sites without replacement, and the
Poisson-sampling RDP analysis used here is the standard approximation for that
(as in DP-FedAvg, McMahan et al. 2018); with ``fraction-train = 1`` there is no
amplification (q = 1) and the figure is exact.

The noised mean is handed to the wrapped strategy as a single uniform-weight reply, so
its server optimiser (FedAdam, FedYogi, FedAvgM momentum) only post-processes the
private release and keeps its own state.

Adaptive clipping (``central-dp.clipping = "adaptive"``; Andrew et al., "Differentially
Private Learning with Adaptive Clipping", 2021): the server sends the current bound C
with every train message; each site clips its own update with Flower's
``adaptiveclipping_mod`` and reports one bit, whether its update had to be clipped. The server re-clips every reply to C (a no-op for honest sites, and the
guarantee for any other), adds Gaussian noise of std ``sigma_b`` to the count of bits and
moves C geometrically towards the ``target-quantile`` of update norms:
``C <- C * exp(-lr * (noisy_count / k - target))``. Releasing the noisy count costs
privacy too. The paper's accounting: noising the update sum at multiplier ``z_u`` and the
(centred, sensitivity 1/2) bit count at std ``sigma_b`` is the Gaussian mechanism with
multiplier ``z`` where ``z**-2 = z_u**-2 + (2 sigma_b)**-2``. So the accountant keeps
charging the configured ``z`` every round, and the updates are noised at the larger
``z_u = (z**-2 - (2 sigma_b)**-2) ** -0.5`` (which needs ``2 sigma_b > z``). With dropped
sites the count and the mean are over the k sites that replied, as above.
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
    """Wrap ``strategy``: clip, average, noise; account user-level epsilon per round."""

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
        self.last_clip_fraction: float | None = None
        self.last_round: dict[str, float] = {}
        # Replies left out of the adaptive count (an audit's canary clients, server/canaries.py):
        # the bound follows the real sites' norms, not the canaries' fixed one.
        self.uncounted: set[int] = set()

    # --- accounting -------------------------------------------------------------------
    def epsilon(self) -> float:
        return privacy.epsilon(self.history, self.delta, self.accountant)

    def epsilon_after_next(self, sample_rate: float) -> float:
        return privacy.epsilon(privacy.compact([*self.history, (self.noise_multiplier, sample_rate, 1)]),
                               self.delta, self.accountant)

    # --- Strategy ---------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = {k: v.numpy() for k, v in arrays.items()}
        if self.adaptive:
            config[KEY_CLIPPING_NORM] = float(self.clipping_norm)  # read by the sites' adaptiveclipping_mod
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        population = max(1, len(list(grid.get_node_ids())))
        self._sample_rate = min(1.0, len(messages) / population)
        if self.adaptive and self.count_stddev <= 0:
            self.count_stddev = auto_count_stddev(self.noise_multiplier, len(messages))
        return messages

    def update_noise_multiplier(self) -> float:
        """Multiplier of the noise on the update mean (larger than the accounted one when adaptive)."""
        if not self.adaptive:
            return self.noise_multiplier
        return adaptive_noise_multiplier(self.noise_multiplier, self.count_stddev)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [m for m in replies if not m.has_error()]
        if not replies:
            return None, None
        k = len(replies)
        total = {key: np.zeros_like(v, dtype=np.float64) for key, v in self._global.items()
                 if np.issubdtype(v.dtype, np.floating)}
        fitted = counted = 0  # updates that fit under C (the sites' norm bits), of those counted
        clip = self.clipping_norm
        for msg in replies:
            arrays = next(iter(msg.content.array_records.values()))
            update = {key: arrays[key].numpy().astype(np.float64) - self._global[key] for key in total}
            # Adaptive: the site already clipped (a no-op here); this re-clip is what the
            # guarantee rests on, whatever a site sent.
            update, norm = clip_update(update, clip)
            if id(msg) not in self.uncounted:
                fitted += self._norm_bit(msg, norm, clip)
                counted += 1
            for key in total:
                total[key] += update[key]
        z_update = self.update_noise_multiplier()
        std = z_update * clip / k
        noised: dict[str, Array] = {}
        for key, ref in self._global.items():
            if key in total:
                mean = total[key] / k + self.rng.normal(0.0, std, size=ref.shape)
                noised[key] = Array(np.asarray(ref + mean, dtype=ref.dtype))
            else:  # integer buffers (e.g. counters) are not trained: keep the global value
                noised[key] = Array(np.asarray(ref))
        self.history = privacy.compact([*self.history, (self.noise_multiplier, self._sample_rate, 1)])
        counted = max(counted, 1)
        clipped = counted - fitted
        self.last_clip_fraction = clipped / counted
        self.last_round = {"sites": float(k), "clipping-norm": float(clip), "clip-fraction": clipped / counted,
                           "noise-std": float(std), "noise-multiplier": float(self.noise_multiplier),
                           "update-noise-multiplier": float(z_update), "sample-rate": float(self._sample_rate),
                           "delta": float(self.delta)}
        if self.adaptive:
            # Andrew et al.: C moves towards the target quantile of the norms, from a noisy count.
            noisy = (fitted + self.rng.normal(0.0, self.count_stddev)) / counted
            self.clipping_norm = clip * float(np.exp(-self.clip_norm_lr * (noisy - self.target_quantile)))
            self.last_round["next-clipping-norm"] = float(self.clipping_norm)
        self.uncounted = set()
        log.info("round %d: user-level DP over %d site(s), clip %.4g, noise std %.4g, %d/%d updates clipped, "
                 "user-level epsilon %.3f", server_round, k, clip, std, clipped, counted, self.epsilon())

        # Site metrics are aggregated as usual; the weights go to a single uniform release.
        metric_msgs = [m.content for m in replies]
        metrics = getattr(self.strategy, "train_metrics_aggr_fn")(metric_msgs, R.NUM_EXAMPLES)
        release = replies[0]
        release.content = RecordDict({"arrays": ArrayRecord(noised), "metrics": MetricRecord({R.NUM_EXAMPLES: 1.0})})
        new_arrays, _ = self.strategy.aggregate_train(server_round, [release])
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
