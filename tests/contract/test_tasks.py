"""Every registered model family honours the GenerativeTask contract.

Families are picked up from the registry: a new family is tested here as soon as it
is registered and has a quick preset (``simulations/*.toml`` with its task.family).
"""

from __future__ import annotations

import tomllib

import pytest
import torch
from flwr.app import RecordDict

from client.dp import make_private
from client.site import train_round
from common import privacy
from common import records as R
from common.config import AppConfig, parse_node_config
from common.data.site import site_dataset
from common.tasks import GenerativeTask, build_task, registered_families, unwrap
from common.train import train_local
from tests.conftest import ROOT, pyproject_run_config, quick_config

FAMILIES = sorted(registered_families())


def family_config(family: str, **overrides) -> AppConfig:
    """The family's quick preset (a preset that selects the family and is meant for tests)."""
    for path in sorted((ROOT / "simulations").glob("*.toml")):
        preset = tomllib.loads(path.read_text())
        fam = preset.get("task.family", pyproject_run_config()["task.family"])
        if fam == family and ("quick" in path.stem or "digits" in path.stem):
            return quick_config(**{**preset, **overrides})
    raise AssertionError(f"family {family!r} has no quick preset in simulations/ (name it {family}-quick.toml)")


def site(pid: int = 0, n: int = 3, **extra):
    return parse_node_config({"partition-id": pid, "num-partitions": n, **extra})


def built(family: str, **overrides) -> tuple[AppConfig, GenerativeTask, torch.utils.data.Dataset]:
    cfg = family_config(family, **overrides)
    data, spec = site_dataset(cfg, site())
    return cfg, build_task(cfg, spec), data


@pytest.mark.parametrize("family", FAMILIES)
def test_task_satisfies_protocol(family):
    _, task, _ = built(family)
    assert isinstance(task, GenerativeTask)
    assert task.family == family
    assert task.private_modules and set(task.private_modules) <= set(task.modules)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_initial_weights_and_arrays_round_trip(family):
    _, a, _ = built(family)
    _, b, _ = built(family)
    rec = R.to_arrayrecord(a.modules)
    assert all(torch.equal(x, y) for x, y in zip(R.state_dict_of(a.modules).values(),
                                                   R.state_dict_of(b.modules).values()))
    prefixes = {k.split(".")[0] for k in rec.keys()}
    assert prefixes == set(a.modules)  # one ArrayRecord, every module, prefixed
    with torch.no_grad():
        for p in unwrap(next(iter(b.modules.values()))).parameters():
            p.add_(1.0)
    R.load_arrayrecord(b.modules, rec)
    assert all(torch.equal(x, y) for x, y in zip(R.state_dict_of(a.modules).values(),
                                                   R.state_dict_of(b.modules).values()))


@pytest.mark.parametrize("family", FAMILIES)
def test_local_training_changes_weights_with_finite_loss(family):
    cfg, task, data = built(family)
    before = {k: v.clone() for k, v in R.state_dict_of(task.modules).items()}
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.train.batch_size, shuffle=True)
    res = train_local(task, loader, task.make_optimizers(), steps=3)
    assert res.steps == 3 and torch.isfinite(torch.tensor(res.mean_loss))
    after = R.state_dict_of(task.modules)
    for name in task.modules:
        changed = any(not torch.equal(before[k], after[k]) for k in after if k.startswith(name + ".")
                      and after[k].is_floating_point())
        assert changed, f"module {name} did not train"


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_is_deterministic_for_a_seed(family):
    _, task, _ = built(family)
    a, b = task.sample(4, seed=7), task.sample(4, seed=7)
    assert len(a) == 4
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    else:
        assert a == b and all(isinstance(s, str) for s in a)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_sample_clipping_bounds_the_private_gradient(family):
    """With noise 0, the privatised gradient is a mean of clipped per-sample gradients: its
    norm is at most C * (per-sample gradients) / (expected batch size)."""
    cfg, task, data = built(family)
    clip = 1e-3
    optimizers = task.make_optimizers()
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.train.batch_size)
    q, steps = privacy.steps_per_round(len(data), cfg.train.batch_size, 1, 1)
    plan = privacy.DPPlan(0.0, q, steps, 1e-5, "rdp", clip)
    dp = make_private(task, optimizers, loader, plan, [], cfg.privacy.grad_sample_mode)
    name = task.private_modules[0]
    opt = optimizers[name]
    batch = next(iter(dp.loader))
    task.train_step(batch, optimizers)
    n_samples = len(opt.grad_samples[0])
    assert n_samples > 0
    grad_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in opt.params)).item()
    assert grad_norm <= clip * n_samples / opt.expected_batch_size * (1 + 1e-4)
    assert dp.seen == n_samples and dp.clip_fraction == 1.0  # every sample needed clipping at C=1e-3
    # Modules that do not see private data are not wrapped by Opacus.
    for other, module in task.modules.items():
        if other != name:
            assert not hasattr(module, "_module"), f"{other} must not be made private"


@pytest.mark.parametrize("family", FAMILIES)
def test_dp_round_charges_accountant_once_per_private_step(family):
    cfg = family_config(family, **{"train.max-steps": 4, "run.num-rounds": 2})
    state = RecordDict()
    arrays = None
    for rnd in (1, 2):
        if arrays is None:
            data, spec = site_dataset(cfg, site())
            arrays = R.to_arrayrecord(build_task(cfg, spec).modules)
        res = train_round(cfg, site(), arrays, rnd, state)
        assert res.status == "ok"
        assert res.metrics[R.STEPS] == 4
    from client.site import PrivacyState, dataset_key
    entry = PrivacyState(state, site(), dataset_key(cfg, site())).load()
    assert sum(s for _, _, s in entry.history) == 8  # 2 rounds x 4 private steps, nothing else
    assert res.metrics[R.EPSILON] == pytest.approx(privacy.epsilon(entry.history, res.metrics[R.DELTA]))
