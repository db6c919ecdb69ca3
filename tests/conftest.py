"""Shared fixtures: the app's default run config and quick configs for tests."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from common.config import AppConfig, parse_run_config

ROOT = Path(__file__).resolve().parent.parent


def pyproject_run_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def quick_config(**overrides) -> AppConfig:
    """The digits-quick preset on top of the pyproject defaults, plus overrides (dotted keys)."""
    raw = pyproject_run_config()
    raw.update(tomllib.loads((ROOT / "simulations" / "digits-quick.toml").read_text()))
    raw.update(overrides)
    return parse_run_config(raw)


@pytest.fixture
def quick_cfg() -> AppConfig:
    return quick_config()


@pytest.fixture(autouse=True, scope="session")
def _reproducible_noise():
    """Tests draw DP noise and sampling from run.seed (common.privacy.noise_seed), so that every
    run of the suite computes the same numbers; real runs never set this."""
    from common.privacy import INSECURE_REPRODUCIBLE_NOISE

    before = os.environ.get(INSECURE_REPRODUCIBLE_NOISE)
    os.environ[INSECURE_REPRODUCIBLE_NOISE] = "1"
    yield
    if before is None:
        os.environ.pop(INSECURE_REPRODUCIBLE_NOISE, None)
    else:
        os.environ[INSECURE_REPRODUCIBLE_NOISE] = before


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """In-process training in tests uses one thread: the machine has 2 cores and the
    integration tests run Flower processes beside it (measured 4x faster under load)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_process():
    """The processes the tests start (SuperLink, simulation, Ray actors, SuperNodes, ClientApps)
    use one intra-op thread each too, as the benchmarks do (simulations.benchlib.thread_env):
    torch and Ray otherwise give each of them both cores, and their OpenMP workers spin against
    each other. Measured on this 2-core machine under the other jobs' load, one digits-quick
    launch (3 sites, 3 rounds, fresh FID cache): 104 s -> 55 s, and 182 s -> 77 s."""
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update({k: "1" for k in saved})
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def flower_identity():
    """Flower's Messages need a task identity; strategy tests build them outside any run."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield


class FakeGrid:
    """The part of a Grid a strategy's configure_train reads: n connected node ids; and
    ``push_messages``, which gives each message an id (as Flower's grids do) and keeps it in
    ``pending`` for a subclass's ``pull_messages`` to answer."""

    def __init__(self, n: int) -> None:
        self.nodes = list(range(100, 100 + n))
        self.pending: dict = {}

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def push_messages(self, messages):
        from uuid import uuid4

        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            self.pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids


def site_entry(cfg, site, state=None):
    """The site's ledger entry for its records (the key is their digest), as ``client/privacy_state.py`` keeps it."""
    from client.privacy_state import SitePrivacy, dataset_key
    from common.data.site import site_dataset

    data, _ = site_dataset(cfg, site)
    return SitePrivacy(cfg, site, dataset_key(cfg, data), state).load()


def pytest_collection_modifyitems(config, items):
    """Files with slow tests (real Flower jobs, the Inception FID) run first, in their usual order.

    ``scripts/test.sh`` hands whole files to two pytest-xdist workers in this order
    (``--dist loadfile --no-loadscope-reorder``): the long files start at once, and the many
    short ones fill in behind them, so that neither worker is left with a long file at the end.
    """
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: the order within each group stays
