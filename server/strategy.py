"""Build the configured Flower strategy; aggregate site metrics the way privacy needs.

Train metrics are averaged by number of examples, except the privacy figures: the
federation's epsilon is the *maximum* over sites (each site's guarantee is its own;
the weakest one is what an operator must see) and budgets aggregate as a minimum.
"""

from __future__ import annotations

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

from common import records as R
from common.config import AppConfig
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


def build_strategy(cfg: AppConfig) -> Strategy:
    """The configured strategy, wrapped in user-level DP when ``central-dp.enabled``."""
    inner = _base_strategy(cfg)
    c = cfg.central_dp
    if not c.enabled:
        return inner
    return UserLevelDP(inner, c.noise_multiplier, c.clipping_norm, c.delta, cfg.privacy.accountant, cfg.run.seed,
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
    if s.name == "fedavg":
        return FedAvg(**common)
    if s.name == "fedprox":
        return FedProx(proximal_mu=s.proximal_mu, **common)
    if s.name == "fedavgm":
        return FedAvgM(server_learning_rate=s.server_lr, server_momentum=s.server_momentum, **common)
    if s.name == "fedadam":
        return FedAdam(eta=s.server_lr, tau=s.tau, **common)
    if s.name == "fedyogi":
        return FedYogi(eta=s.server_lr, tau=s.tau, **common)
    # Robust aggregation (Byzantine-tolerant); the same for every model family.
    if s.name == "krum":
        return Krum(num_malicious_nodes=s.num_malicious_nodes, **common)
    if s.name == "multikrum":
        return MultiKrum(num_malicious_nodes=s.num_malicious_nodes, **common)
    if s.name == "bulyan":
        return Bulyan(num_malicious_nodes=s.num_malicious_nodes, **common)
    if s.name == "trimmedavg":
        return FedTrimmedAvg(beta=s.trim_beta, **common)
    if s.name == "median":
        return FedMedian(**common)
    raise ValueError(f"strategy.name = {s.name!r} is not supported")
