"""Build the configured Flower strategy; aggregate site metrics the way privacy needs.

Train metrics are averaged by number of examples, except the privacy figures: the
federation's epsilon is the *maximum* over sites (each site's guarantee is its own;
the weakest one is what an operator must see) and budgets aggregate as a minimum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from common import privacy
from common import records as R
from common.config import AppConfig, StrategySection
from server.central_dp import UserLevelDP

_MAX_KEYS = {R.EPSILON, R.NOISE, R.DELTA}
_MIN_KEYS = {R.BUDGET}
_SKIP_KEYS = {R.PARTITION, R.WEIGHT, R.NUM_EXAMPLES, R.BUDGET_EXHAUSTED}


def aggregate_train_metrics(replies: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean of site metrics; max for epsilon/noise/delta, min for budget."""
    metrics = [next(iter(r.metric_records.values())) for r in replies]
    weights = [float(m[weight_key]) for m in metrics]
    total = sum(weights) or 1.0
    out: dict[str, float] = {weight_key: total, "sites": float(len(metrics))}
    keys = {k for m in metrics for k in m.keys()} - _SKIP_KEYS
    for key in sorted(keys):
        values = [(float(m[key]), w) for m, w in zip(metrics, weights) if key in m]
        if key in _MAX_KEYS:
            out[key] = max(v for v, _ in values)
        elif key in _MIN_KEYS:
            out[key] = min(v for v, _ in values)
        else:
            wsum = sum(w for _, w in values) or 1.0
            out[key] = sum(v * w for v, w in values) / wsum
    return MetricRecord(out)


@dataclass(frozen=True)
class StrategySpec:
    """What fedgen needs from one aggregation strategy: how to build it and what to checkpoint.

    ``state``: the attributes holding server-side state that a resumed run must get back
    (server optimiser moments, momentum). ``per_round``: array attributes the strategy sets
    again from the global model at every ``configure_train`` (nothing to checkpoint).
    ``tests/contract/test_strategies.py`` fails when a strategy keeps array state after a
    round that its spec names in neither. ``sum_only``: it needs only the (uniform) mean of the
    updates, so it works under secure aggregation (``server/secagg.py``), which hands it that
    mean as one reply; the contract tests check that this equals aggregating the replies.
    """

    cls: type[Strategy]
    build: Callable[[StrategySection, dict], Strategy]
    state: tuple[str, ...] = ()
    per_round: tuple[str, ...] = ()
    sum_only: bool = True


# One entry per `strategy.name` (the config's Literal lists the same names).
STRATEGIES: dict[str, StrategySpec] = {
    "fedavg": StrategySpec(FedAvg, lambda s, common: FedAvg(**common)),
    "fedprox": StrategySpec(FedProx, lambda s, common: FedProx(proximal_mu=s.proximal_mu, **common)),
    "fedavgm": StrategySpec(FedAvgM, lambda s, common: FedAvgM(server_learning_rate=s.server_lr,
                                                               server_momentum=s.server_momentum, **common),
                            state=("momentum_vector",)),
    "fedadam": StrategySpec(FedAdam, lambda s, common: FedAdam(eta=s.server_lr, tau=s.tau, **common),
                            state=("m_t", "v_t"), per_round=("current_arrays",)),
    "fedyogi": StrategySpec(FedYogi, lambda s, common: FedYogi(eta=s.server_lr, tau=s.tau, **common),
                            state=("m_t", "v_t"), per_round=("current_arrays",)),
    # Robust aggregation (Byzantine-tolerant); the same for every model family.
    "krum": StrategySpec(Krum, lambda s, common: Krum(num_malicious_nodes=s.num_malicious_nodes, **common),
                         sum_only=False),
    "multikrum": StrategySpec(MultiKrum, lambda s, common: MultiKrum(num_malicious_nodes=s.num_malicious_nodes,
                                                                     **common), sum_only=False),
    "bulyan": StrategySpec(Bulyan, lambda s, common: Bulyan(num_malicious_nodes=s.num_malicious_nodes, **common),
                           sum_only=False),
    "trimmedavg": StrategySpec(FedTrimmedAvg, lambda s, common: FedTrimmedAvg(beta=s.trim_beta, **common),
                               sum_only=False),
    "median": StrategySpec(FedMedian, lambda s, common: FedMedian(**common), sum_only=False),
}


def spec_of(strategy: Strategy) -> StrategySpec:
    """The spec of this (unwrapped) strategy's class."""
    spec = next((sp for sp in STRATEGIES.values() if type(strategy) is sp.cls), None)
    if spec is None:
        raise ValueError(f"{type(strategy).__name__} is not in server/strategy.py's STRATEGIES: its server state "
                         "would not be checkpointed; add a StrategySpec for it")
    return spec


def state_attributes(strategy: Strategy) -> tuple[str, ...]:
    """The server-state attributes declared for this (unwrapped) strategy's class."""
    return spec_of(strategy).state


def build_strategy(cfg: AppConfig) -> Strategy:
    """The configured strategy, wrapped in user-level DP when ``central-dp.enabled``."""
    inner = _base_strategy(cfg)
    c = cfg.central_dp
    if not c.enabled:
        return inner
    # The noise on the released model is secret: fresh entropy (common.privacy.noise_seed).
    return UserLevelDP(inner, c.noise_multiplier, c.clipping_norm, c.delta, cfg.privacy.accountant,
                       privacy.noise_seed(cfg.run.seed),
                       adaptive=c.clipping == "adaptive", target_quantile=c.target_quantile,
                       clip_norm_lr=c.clip_norm_lr, count_stddev=c.clipped_count_stddev)


def _base_strategy(cfg: AppConfig) -> Strategy:
    s = cfg.strategy
    common = dict(
        fraction_train=s.fraction_train,
        fraction_evaluate=0.0,  # the server evaluates on held-out data; sites' data stays private
        min_train_nodes=s.min_train_nodes,
        min_evaluate_nodes=0,
        min_available_nodes=s.min_available_nodes,
        weighted_by_key=R.WEIGHT,
        train_metrics_aggr_fn=aggregate_train_metrics,
    )
    if s.name not in STRATEGIES:
        raise ValueError(f"strategy.name = {s.name!r} is not supported; use one of {sorted(STRATEGIES)}")
    return STRATEGIES[s.name].build(s, common)
