"""The benchmark scripts run end to end at tiny sizes and print the figures they promise.

No timing is asserted (the machine is shared): only that each script finishes, prints its
table last, returns / writes the fields docs/RESULTS.md quotes, and keeps its PNG small.
"""

from __future__ import annotations

import json

import pytest

PNG_LIMIT = 200 * 1024


def _table_tail(out: str, header: str, rows: int) -> list[str]:
    lines = [line for line in out.strip().splitlines() if line.strip()]
    idx = max(i for i, line in enumerate(lines) if line.startswith(header))
    assert len(lines) - idx == rows + 1, f"the table is not the last output:\n{out[-2000:]}"
    return lines[idx:]


def _png_ok(path):
    assert path.exists() and 0 < path.stat().st_size < PNG_LIMIT


def test_bench_comm_in_process(tmp_path, capsys):
    """Every family, float32 against float16, with the same server loop in process (no Flower)."""
    from simulations import bench_comm

    png, js = tmp_path / "comm.png", tmp_path / "comm.json"
    s = bench_comm.main(["--transport", "local", "--rounds", "1", "--sites", "2", "--set", "train.max-steps=2",
                         "--set", "eval.fid-domain-n=200", "--set", "privacy.ledger-dir=",
                         "--png", str(png), "--json", str(js)])
    table = _table_tail(capsys.readouterr().out, "family", 4)  # vae: 2 metrics, gan, lm
    assert [r.split()[0] for r in table[1:]] == ["vae", "vae", "gan", "lm"]
    for row in s["rows"]:
        assert row["down32"] > 0 and row["up32"] > 0
        assert 0.5 < row["ratio"] < 0.53  # float16: half the array bytes, plus headers
        assert row["metric32"] is not None and row["metric16"] is not None
    assert {"machine", "date", "sites", "rounds", "seeds", "transport", "rows"} <= set(json.loads(js.read_text()))
    _png_ok(png)


@pytest.mark.slow
def test_bench_overhead_tiny(tmp_path, capsys):
    from simulations import bench_overhead

    png, js = tmp_path / "overhead.png", tmp_path / "overhead.json"
    s = bench_overhead.main(["--pairs", "1", "--rounds", "2", "--sites", "2", "--set", "train.max-steps=2",
                             "--set", "eval.fid-domain-n=200", "--png", str(png), "--json", str(js)])
    table = _table_tail(capsys.readouterr().out, "figure", 9)
    assert "steady round" in table[1] and "cold start" in table[6] and "peak PSS" in table[8]
    assert "in site calls" in table[2] and "outside them" in table[3] and "training loops, CPU" in table[5]
    for key in ("steady_ratio", "steady_round_flwr_s", "steady_round_local_s", "cold_start_s", "before_round1_s",
                "peak_pss_flwr_gib", "peak_pss_local_gib", "machine", "date", "load"):
        assert key in s and s[key] is not None, key
    assert s["steady_ratio"] > 0 and s["peak_pss_flwr_gib"] > 0
    # The steady round split into the sites' own calls (from their replies) and the rest.
    for side in ("flwr", "local"):
        assert 0 < s[f"steady_train_{side}_s"] < s[f"steady_sites_{side}_s"] < s[f"steady_round_{side}_s"]
        assert s[f"steady_train_cpu_{side}_s"] > 0
        assert s[f"steady_outside_{side}_s"] == pytest.approx(s[f"steady_round_{side}_s"] - s[f"steady_sites_{side}_s"])
    assert {"superlink-start", "submit-to-serverapp", "round-0-eval", "round-1-excess"} <= set(s["phases_s"])
    assert any(label.startswith("ray: ClientAppActor") for label, *_ in s["memory_breakdown_flwr"])
    # Flower's floor, the plain app, ran beside them: its rounds are timed and its cold start split.
    assert s["steady_round_plain_s"] > 0 and s["cold_start_plain_s"] > 0 and s["peak_pss_plain_gib"] > 0
    assert {"superlink-start", "submit-to-serverapp", "round-1-excess"} <= set(s["phases_plain_s"])
    assert "plain app" in table[0] and len(s["pairs_raw"][0]["plain_rounds"]) == 2
    _png_ok(png)


@pytest.mark.slow
def test_bench_scale_tiny(tmp_path, capsys):
    from simulations import bench_scale

    png, js = tmp_path / "scale.png", tmp_path / "scale.json"
    s = bench_scale.main(["--sites", "8", "--sample", "2", "--rounds", "2", "--set", "data.dataset=digits",
                          "--set", "eval.fid-domain-n=200", "--png", str(png), "--json", str(js)])
    table = _table_tail(capsys.readouterr().out, "figure", 3)
    assert "round time" in table[1] and "peak PSS" in table[2]
    assert s["sampled_per_round"] == [2, 2] and s["ok_per_round"] == [2, 2]
    for key in ("round_small_s", "round_large_s", "time_ratio", "peak_pss_small_gib", "peak_pss_large_gib",
                "mem_ratio", "breakdown_large", "machine", "date", "load"):
        assert key in s and s[key] is not None, key
    _png_ok(png)


def test_bench_privacy_utility_tiny(tmp_path, capsys):
    """Two tiny in-process jobs (DP at epsilon 10 and no DP); the table and the PNG it promises."""
    from simulations import bench_privacy_utility as pu

    png, js = tmp_path / "pu.png", tmp_path / "pu.json"
    s = pu.main(["--image-preset", "digits-quick", "--families", "vae", "--partitioners", "iid", "--epsilons", "10",
                 "inf", "--sites", "2", "--rounds", "1", "--max-steps", "2", "--fid-n", "0",
                 "--set", "eval.fid-domain-n=200", "--png", str(png), "--json", str(js)])
    table = _table_tail(capsys.readouterr().out, "family", 2)
    assert "CPU-min" in table[0]
    dp, plain = s["rows"]
    assert dp["epsilon"] == 10 and dp["epsilon_reached"] == pytest.approx(10, rel=0.01)
    assert plain["epsilon_reached"] is None and plain["epsilon"] == float("inf")
    for row in s["rows"]:
        assert row["metric"] == "fid-domain" and row["value"] > 0 and row["n"] == 200 and row["cpu_min"] > 0
    assert json.loads(js.read_text())["published_fid_eps10"]["GS-WGAN"] == 131.3
    _png_ok(png)
    # --replot merges earlier runs' rows without running anything
    again = pu.main(["--replot", str(js), str(js), "--png", str(tmp_path / "merged.png")])
    assert [r["value"] for r in again["rows"]] == [r["value"] for r in s["rows"]] * 2
    assert again["rows"][1]["epsilon"] == float("inf")
    _png_ok(tmp_path / "merged.png")


def test_bench_merf_curve_tiny(tmp_path, capsys):
    """A real release (3 digit sites, in process), the generator scored at two step counts of one
    planned run; the JSON, the grids, the saved model and the synthetic set it promises."""
    import numpy as np

    from simulations import bench_merf_curve as mc

    out = tmp_path / "curve.json"
    s = mc.main(["--preset", "merf-digits", "--num-sites", "3", "--steps", "10", "4", "--inception-n", "0",
                 "--synthetic", "30", "--out", str(out), "--png", str(tmp_path / "plot.png")])
    lines = [line for line in capsys.readouterr().out.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("Inception FID below 131.3") and lines[-5].startswith("| generator steps")
    assert json.loads(out.read_text()) == s
    assert s["epsilon_max"] > 0 and s["release_cpu_s"] > 0 and s["threads"] == 1
    assert s["config"]["merf.generator-steps"] == 10  # planned for the largest --steps (the preset says 200)
    assert s["planned_steps"] == 10 and s["commit"]
    steps = [p["steps"] for p in s["points"]]
    assert steps == [4, 10]
    first, last = s["points"]
    assert 0 < first["generator_cpu_s"] <= last["generator_cpu_s"]
    assert last["fid_inception"] is None and first["fid_domain"] > 0 and last["fid_domain"] > 0
    assert s["crossing_cpu_min"] is None
    for n in steps:
        _png_ok(tmp_path / f"curve-{n}.png")
    assert (tmp_path / "curve-model" / "final_model.pt").is_file()
    data = np.load(tmp_path / "curve-synthetic.npz")
    assert data["images"].shape == (30, 1, 8, 8) and np.bincount(data["labels"]).tolist() == [3] * 10
    _png_ok(tmp_path / "plot.png")
    # --replot draws earlier results together without running anything
    again = mc.main(["--replot", str(out), str(out), "--png", str(tmp_path / "merged.png")])
    assert again["results"] == [s, s]
    _png_ok(tmp_path / "merged.png")
    # another family, or more than one round, is refused before any release is computed
    for preset, extra in (("digits-quick", []), ("merf-digits", ["--set", "run.num-rounds=2"])):
        with pytest.raises(SystemExit):
            mc.main(["--preset", preset, "--steps", "1", "--out", str(tmp_path / "x.json"), *extra])
        assert not (tmp_path / "x.json").exists()
    assert "task.family merf, run.num-rounds 1" in capsys.readouterr().err
