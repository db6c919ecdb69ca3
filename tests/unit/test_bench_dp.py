"""The DP-overhead benchmark runs end to end at a tiny size and reports what it promises (no timing asserted)."""

from __future__ import annotations

from simulations import bench_dp


def test_bench_dp_reports_every_family_and_mode(tmp_path, capsys):
    png = tmp_path / "dp.png"
    bench_dp.main(["--family", "all", "--quick", "--steps", "1", "--repeats", "1",
                   "--modes", "hooks", "ghost", "--png", str(png)])
    out = capsys.readouterr().out
    table = out[out.index("DP overhead:"):]
    for family in ("vae", "gan", "lm"):
        for mode in ("hooks", "ghost"):
            row = next(line for line in table.splitlines() if line.startswith(f"| {family:<6} | {mode:<9} |"))
            assert float(row.split("|")[5].split()[0]) > 0  # a median ratio, not an error
    assert "load average" in table and png.stat().st_size > 0
