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
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common import privacy
from common import records as R

log = logging.getLogger(__name__)


def clip_update(update: dict[str, np.ndarray], clip: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale the whole update (all arrays together) to L2 norm at most ``clip``."""
    norm = float(np.sqrt(sum(float(np.sum(u.astype(np.float64) ** 2)) for u in update.values())))
    scale = min(1.0, clip / (norm + 1e-12))
    return {k: u * scale for k, u in update.items()}, norm


class UserLevelDP(Strategy):
    """Wrap ``strategy``: clip, average, noise; account user-level epsilon per round."""

    def __init__(self, strategy: Strategy, noise_multiplier: float, clipping_norm: float, delta: float,
                 accountant: str = "rdp", seed: int = 0) -> None:
        if noise_multiplier <= 0 or clipping_norm <= 0:
            raise ValueError("central-dp needs a positive noise-multiplier and clipping-norm")
        self.strategy = strategy
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.delta = delta
        self.accountant = accountant
        self.rng = np.random.default_rng(seed)
        self.history: list[privacy.HistoryEntry] = []
        self._global: dict[str, np.ndarray] = {}
        self._sample_rate = 1.0
        self.last_clip_fraction: float | None = None

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
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        population = max(1, len(list(grid.get_node_ids())))
        self._sample_rate = min(1.0, len(messages) / population)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [m for m in replies if not m.has_error()]
        if not replies:
            return None, None
        k = len(replies)
        total = {key: np.zeros_like(v, dtype=np.float64) for key, v in self._global.items()
                 if np.issubdtype(v.dtype, np.floating)}
        clipped = 0
        for msg in replies:
            arrays = next(iter(msg.content.array_records.values()))
            update = {key: arrays[key].numpy().astype(np.float64) - self._global[key] for key in total}
            update, norm = clip_update(update, self.clipping_norm)
            clipped += norm > self.clipping_norm
            for key in total:
                total[key] += update[key]
        std = self.noise_multiplier * self.clipping_norm / k
        noised: dict[str, Array] = {}
        for key, ref in self._global.items():
            if key in total:
                mean = total[key] / k + self.rng.normal(0.0, std, size=ref.shape)
                noised[key] = Array(np.asarray(ref + mean, dtype=ref.dtype))
            else:  # integer buffers (e.g. counters) are not trained: keep the global value
                noised[key] = Array(np.asarray(ref))
        self.history = privacy.compact([*self.history, (self.noise_multiplier, self._sample_rate, 1)])
        self.last_clip_fraction = clipped / k
        log.info("round %d: user-level DP over %d site(s), noise std %.4g, %d/%d updates clipped, "
                 "user-level epsilon %.3f", server_round, k, std, clipped, k, self.epsilon())

        # Site metrics are aggregated as usual; the weights go to a single uniform release.
        metric_msgs = [m.content for m in replies]
        metrics = getattr(self.strategy, "train_metrics_aggr_fn")(metric_msgs, R.NUM_EXAMPLES)
        release = replies[0]
        release.content = RecordDict({"arrays": ArrayRecord(noised), "metrics": MetricRecord({R.NUM_EXAMPLES: 1.0})})
        new_arrays, _ = self.strategy.aggregate_train(server_round, [release])
        return new_arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        log.info("user-level DP: noise multiplier %g, clipping norm %g, delta %g around %s",
                 self.noise_multiplier, self.clipping_norm, self.delta, type(self.strategy).__name__)
