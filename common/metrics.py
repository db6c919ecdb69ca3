"""Server-evaluation metrics by name: how the CLI labels them and which one is a run's best.

Every image run is scored by FID (:data:`FID_METRICS`, computed by ``server/fid.py`` for
any image family); a model family adds its own held-out metrics by declaring them on its
config section (``eval_metrics`` in ``common/config.py``; e.g. the VAE's negative ELBO).
A run's headline ("best") metric is the first of FID-Inception, FID-domain and the
family's own metrics that it recorded, at its best round in that metric's direction.
No torch here: the CLI and the run store read this.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EvalMetric:
    key: str  # the name in a round record's "eval" dict
    title: str  # a plot panel's title
    axis: str  # a plot's y-axis label
    lower_is_better: bool = True


FID_METRICS: tuple[EvalMetric, ...] = (
    EvalMetric("fid-inception", "FID (Inception features)", "FID"),
    EvalMetric("fid-domain", "FID (domain features)", "FID"),
)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def best_metric(evals: Iterable[tuple[int, dict]], metrics: Sequence[EvalMetric]) -> dict | None:
    """The first of ``metrics`` present in any round: its best value and the round of it.

    ``evals`` are ``(round, eval dict)`` pairs; ties keep the earliest round."""
    evals = list(evals)
    for metric in metrics:
        best: tuple[float, int] | None = None
        for rnd, values in evals:
            value = _number(values.get(metric.key)) if isinstance(values, dict) else None
            if value is None:
                continue
            better = best is None or (value < best[0] if metric.lower_is_better else value > best[0])
            if better:
                best = (value, rnd)
        if best is not None:
            return {"key": metric.key, "value": best[0], "round": best[1]}
    return None
