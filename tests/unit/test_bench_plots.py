"""The benchmarks' plots draw whatever the jobs measured, including cells without a result."""

from __future__ import annotations

import math

from simulations import bench_privacy_utility as pu


def _row(family, eps, value):
    return {"family": family, "partition": "iid", "epsilon": eps, "metric": "fid-inception", "value": value,
            "n": None if value is None else 2000, "epsilon_reached": None, "cpu_min": 1.0, "wall_min": 1.0,
            "sites": 10, "rounds": 1, "max_steps": 20}


def test_privacy_utility_plot_skips_cells_without_a_result(tmp_path):
    # A job run with --fid-n 0 has no FID: its cell has value None (this used to crash the plot,
    # after the jobs had run, and lose their table and JSON).
    png = tmp_path / "pu.png"
    pu.plot([_row("gan", 10.0, None), _row("vae", 1.0, None)], png)
    assert png.stat().st_size > 0


def test_privacy_utility_plot_draws_the_measured_points(tmp_path):
    png = tmp_path / "pu.png"
    pu.plot([_row("gan", 10.0, 204.6), _row("gan", 1.0, None), _row("gan", math.inf, 151.9),
             _row("lm", 8.0, 11.7)], png)
    assert png.stat().st_size > 0
