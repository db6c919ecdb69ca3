"""Checkpoints: atomic, verified, keep-k, strategy state and RNG restored, config diffs listed."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAdam, FedAvgM

from server.central_dp import UserLevelDP
from common.tasks import DataSpec
from server.checkpoints import (CheckpointError, Checkpointer, config_differences, restore_strategy_state,
                                strategy_state)
from tests.conftest import quick_config


def arrays(v: float) -> ArrayRecord:
    return ArrayRecord({"vae.w": Array(np.full((3, 2), v, dtype=np.float32))})


def test_latest_round_trips_weights_strategy_state_and_rng(tmp_path):
    cfg = quick_config()
    adam = FedAdam()
    adam.m_t = {"vae.w": np.ones((3, 2))}
    adam.v_t = {"vae.w": np.full((3, 2), 2.0)}
    ck = Checkpointer(tmp_path, keep=3)
    random.seed(5)
    torch.manual_seed(5)
    ck.save(1, arrays(1.0), adam, cfg)
    expected_py, expected_torch = random.random(), torch.rand(1)
    random.seed(99)
    torch.manual_seed(99)
    got = ck.latest()
    assert got.round == 1 and np.allclose(got.arrays["vae.w"].numpy(), 1.0)
    fresh = FedAdam()
    restore_strategy_state(fresh, got.strategy)
    assert np.allclose(fresh.v_t["vae.w"], 2.0) and np.allclose(fresh.m_t["vae.w"], 1.0)
    assert random.random() == expected_py and torch.equal(torch.rand(1), expected_torch)
    assert got.config == cfg.to_flat()


def test_keeps_the_last_k(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    for r in range(1, 5):
        ck.save(r, arrays(float(r)), FedAvgM(server_momentum=0.9), quick_config())
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt")) == ["round-0003.pt", "round-0004.pt"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, damage):
    ck = Checkpointer(tmp_path, keep=3)
    ck.save(1, arrays(1.0), FedAvgM(), quick_config())
    path = ck.save(2, arrays(2.0), FedAvgM(), quick_config())
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    else:
        path.unlink()
    got = ck.latest()
    assert got.round == 1 and np.allclose(got.arrays["vae.w"].numpy(), 1.0)


def test_load_by_round_leaves_the_rngs_alone_and_names_the_rounds_kept(tmp_path):
    """What `fedgen generate --round K` reads: one round's weights, config and data spec, verified;
    a round not kept, or a damaged file, is an error naming what there is."""
    ck = Checkpointer(tmp_path, keep=2)
    spec = DataSpec(kind="image", image_size=8, channels=1, num_classes=10)
    for r in range(1, 4):
        ck.save(r, arrays(float(r)), FedAvgM(), quick_config(), spec)
    assert ck.rounds() == [2, 3]
    torch.manual_seed(7)
    expected = torch.rand(1)
    torch.manual_seed(7)
    got = ck.load(2)
    assert torch.equal(torch.rand(1), expected)  # unlike latest(), a reader's load restores no RNG
    assert got.round == 2 and np.allclose(got.arrays["vae.w"].numpy(), 2.0)
    assert DataSpec(**got.data_spec) == spec and got.config == quick_config().to_flat()
    with pytest.raises(CheckpointError, match=r"no checkpoint of round 1 .*\(checkpoints of rounds 2, 3\)"):
        ck.load(1)
    path = tmp_path / "checkpoints" / "round-0003.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"round-0003.pt is unusable: SHA-256 mismatch"):
        ck.load(3)
    assert Checkpointer(tmp_path / "elsewhere", keep=1).rounds() == []


def test_user_level_dp_state_survives(tmp_path):
    dp = UserLevelDP(FedAdam(), 1.2, 0.5, 1e-5, seed=3, adaptive=True)
    dp.history = [(1.2, 0.5, 4)]
    dp.clipping_norm, dp.count_stddev = 0.37, 1.5  # the adaptive bound after some rounds
    dp.rng.normal(size=3)
    ck = Checkpointer(tmp_path, keep=1)
    ck.save(4, arrays(0.0), dp, quick_config())
    expected = dp.rng.normal(size=3)
    other = UserLevelDP(FedAdam(), 1.2, 0.5, 1e-5, seed=0, adaptive=True)
    restore_strategy_state(other, ck.latest().strategy)
    assert other.history == [(1.2, 0.5, 4)]
    assert (other.clipping_norm, other.count_stddev) == (0.37, 1.5)
    assert np.allclose(other.rng.normal(size=3), expected)


def test_checkpoint_holds_only_plain_tensors(tmp_path):
    Checkpointer(tmp_path, 1).save(1, arrays(0.0), FedAdam(), quick_config())
    torch.load(tmp_path / "checkpoints" / "round-0001.pt", weights_only=True)  # raises if it pickled code


def test_config_differences_name_each_key_and_ignore_resume_keys():
    a = quick_config().to_flat()
    b = quick_config(**{"train.lr": 0.5, "run.resume": "latest", "run.num-rounds": 9}).to_flat()
    diffs = config_differences(a, b)
    assert diffs == [f"train.lr: checkpoint {a['train.lr']!r} != now 0.5"]
    assert strategy_state(FedAdam()) == {}
