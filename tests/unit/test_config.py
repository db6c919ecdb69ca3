"""The run config: every key declared in pyproject, every error reported at once."""

from __future__ import annotations

import tomllib

import pytest

from common.config import AppConfig, ConfigError, parse_node_config, parse_run_config
from tests.conftest import ROOT, pyproject_run_config


def test_pyproject_declares_exactly_the_config_keys():
    # Flower refuses overrides of undeclared keys, and we refuse unknown keys: both lists must agree.
    assert set(pyproject_run_config()) == set(AppConfig().to_flat())


def test_pyproject_defaults_parse():
    cfg = parse_run_config(pyproject_run_config())
    assert cfg.task.family == "vae" and cfg.privacy.enabled


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "simulations").glob("*.toml")))
def test_every_preset_parses_and_only_uses_declared_keys(preset):
    overrides = tomllib.loads((ROOT / "simulations" / preset).read_text())
    assert set(overrides) <= set(pyproject_run_config()), set(overrides) - set(pyproject_run_config())
    parse_run_config({**pyproject_run_config(), **overrides})


def test_all_errors_reported_at_once_with_key_and_fix():
    raw = {**pyproject_run_config(), "privacy.target-epsilon": -1.0, "strategy.name": "fedmagic",
           "train.batch-size": 0, "privacy.targt-epsilon": 3.0, "task.family": "diffusion"}
    with pytest.raises(ConfigError) as info:
        parse_run_config(raw)
    msg = str(info.value)
    assert len(info.value.problems) == 5, msg
    assert "privacy.target-epsilon = -1.0" in msg and "greater than 0" in msg
    assert "strategy.name = 'fedmagic'" in msg and "fedavg" in msg
    assert "train.batch-size = 0" in msg
    assert "privacy.targt-epsilon: unknown key" in msg
    assert "task.family = 'diffusion'" in msg and "vae" in msg


def test_a_target_the_calibration_cannot_aim_at_is_refused_before_round_one():
    """The calibration lands within 0.005 below the target: a target not above that, or an
    infinite one, is a config error naming the key; an explicit noise multiplier needs none."""
    for bad in (0.005, 0.001, float("inf")):
        with pytest.raises(ConfigError, match="target-epsilon"):
            parse_run_config({"privacy.target-epsilon": bad})
    assert parse_run_config({"privacy.target-epsilon": 0.001, "privacy.noise-multiplier": 2.0})
    assert parse_run_config({"privacy.target-epsilon": 0.006}).privacy.target_epsilon == 0.006


def test_key_without_section_is_named():
    with pytest.raises(ConfigError, match="epsilon: keys have the form"):
        parse_run_config({"epsilon": 3})


def test_cross_field_check_names_both_keys():
    with pytest.raises(ConfigError, match="min-train-nodes .* must not exceed min-available-nodes"):
        parse_run_config({"strategy.min-train-nodes": 5, "strategy.min-available-nodes": 2})


def test_config_is_frozen_and_hash_tracks_values():
    cfg = parse_run_config(pyproject_run_config())
    with pytest.raises(Exception):
        cfg.run.num_rounds = 9  # type: ignore[misc]
    other = parse_run_config({**pyproject_run_config(), "run.num-rounds": 9})
    assert cfg.config_hash() != other.config_hash()
    assert cfg.config_hash() == parse_run_config(pyproject_run_config()).config_hash()


def test_node_config_partition_out_of_range_and_unknown_key():
    assert parse_node_config({"partition-id": 2, "num-partitions": 3}).partition_id == 2
    with pytest.raises(ConfigError, match="node config") as info:
        parse_node_config({"partition-id": 3, "num-partitions": 3, "colour": "red"})
    assert "colour: unknown key" in str(info.value)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_NUMERIC = sorted(k for k, v in AppConfig().to_flat().items() if isinstance(v, (int, float))
                  and not isinstance(v, bool))


@settings(max_examples=60, deadline=None)
@given(bad=st.sets(st.sampled_from(_NUMERIC), max_size=6),
       unknown=st.sets(st.from_regex(r"run\.zz[a-z]{1,6}", fullmatch=True), max_size=3))
def test_property_every_bad_key_is_reported_and_nothing_else(bad, unknown):
    raw = {**pyproject_run_config(), **{k: "not-a-number" for k in bad}, **{k: 1 for k in unknown}}
    if not bad and not unknown:
        parse_run_config(raw)
        return
    with pytest.raises(ConfigError) as info:
        parse_run_config(raw)
    named = {p.split(" ")[0].rstrip(":") for p in info.value.problems}
    assert named == set(bad) | set(unknown)
