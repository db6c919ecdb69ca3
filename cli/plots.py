"""The metrics figure of ``fedgen plot``: training loss, server evaluation, privacy spent.

matplotlib is imported inside :func:`build_figure`: it is slow and only ``plot`` needs it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

from common.config import family_eval_metrics
from common.metrics import FID_METRICS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["PLOT_EVAL_METRICS", "build_figure"]

#: Server-evaluation metrics plotted (one panel each, when present): FID and every family's own
#: (declared on its config section, common/metrics.py), with their titles and axis labels.
PLOT_EVAL_METRICS = {m.key: (m.title, m.axis) for m in FID_METRICS + family_eval_metrics()}


def _series(rounds: list[dict], get: Callable[[dict], Any]) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rounds:
        value = get(r)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(r["round"])
            ys.append(float(value))
    return xs, ys


def _train_loss_key(rounds: list[dict]) -> str | None:
    keys = [k for r in rounds for k in (r.get("train") or {})]
    if "train-loss" in keys:
        return "train-loss"
    return next((k for k in keys if "loss" in k), None)


def build_figure(rounds: list[dict], *, title: str | None = None) -> "Figure":
    """Figure with one panel for training loss, one per server-eval metric present, one for ε."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    eval_keys = [k for k in PLOT_EVAL_METRICS if _series(rounds, lambda r, k=k: (r.get("eval") or {}).get(k))[0]]
    n = 2 + len(eval_keys)
    fig = Figure(figsize=(8, 2.4 * n + 0.6), layout="constrained")
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    if title:
        fig.suptitle(title)

    def finish(ax: Any, ylabel: str, empty: str) -> None:
        ax.set_xlabel("round")
        ax.tick_params(labelbottom=True)  # shared x axis, but keep round numbers on every panel
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(loc="best", fontsize="small")
        else:
            ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center", color="grey")

    ax = axes[0]
    loss_key = _train_loss_key(rounds)
    if loss_key:
        xs, ys = _series(rounds, lambda r: (r.get("train") or {}).get(loss_key))
        ax.plot(xs, ys, marker="o", label=f"{loss_key} (aggregated)")
    ax.set_title("Training loss")
    finish(ax, "loss", "no training loss recorded")

    for ax, key in zip(axes[1:-1], eval_keys):
        xs, ys = _series(rounds, lambda r, k=key: (r.get("eval") or {}).get(k))
        ax.plot(xs, ys, marker="o", color="tab:green", label=key)
        panel_title, ylabel = PLOT_EVAL_METRICS[key]
        ax.set_title(f"Server evaluation: {panel_title}")
        finish(ax, ylabel, "")

    ax = axes[-1]
    xs, ys = _series(rounds, lambda r: r.get("epsilon_max"))
    if xs:
        ax.plot(xs, ys, marker="o", color="tab:red", label="max sample-level ε (over sites)")
    xs, ys = _series(rounds, lambda r: r.get("user_epsilon"))
    if xs:
        ax.plot(xs, ys, marker="s", color="tab:purple", label="user-level ε")
    budgets = {s["budget"] for r in rounds for s in r.get("sites") or [] if s.get("budget") is not None}
    if budgets:
        tight = min(budgets)
        label = f"site budget ε={tight:g}" if len(budgets) == 1 else f"tightest site budget ε={tight:g}"
        ax.axhline(tight, color="grey", linestyle="--", label=label)
    ax.set_ylim(bottom=0)
    ax.set_title("Privacy spent")
    finish(ax, "ε", "no privacy accounting recorded")
    return fig
