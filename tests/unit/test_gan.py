"""The GAN family: layers by image size, DP on the discriminator only, exact accounting, learning."""

from __future__ import annotations

import tomllib

import pytest
import torch
from flwr.app import RecordDict
from torch import nn

from client.dp import make_private
from client.site import train_round
from tests.conftest import site_entry
from common import privacy
from common import records as R
from common.config import AppConfig, ConfigError, parse_node_config
from common.data.site import eval_dataset, site_dataset
from common.models.gan import Discriminator, GANConfig, Generator
from common.tasks import GenerativeTask, build_task
from common.train import train_local
from server.evaluation import Evaluator
from server.fid import FIDScorer, domain_extractor
from tests.conftest import ROOT, quick_config


def gan_config(**overrides) -> AppConfig:
    preset = tomllib.loads((ROOT / "simulations" / "gan-digits.toml").read_text())
    return quick_config(**{**preset, **overrides})


def site(pid: int = 0, n: int = 3):
    return parse_node_config({"partition-id": pid, "num-partitions": n, "unsafe-memory-ledger": True})


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fid-cache")


@pytest.mark.parametrize("size", [8, 28, 32])
def test_layers_by_image_size_and_no_batchnorm_in_discriminator(size):
    cfg = GANConfig(image_size=size, width=8, latent_dim=4)
    gen, disc = Generator(cfg), Discriminator(cfg)
    x = gen(torch.randn(5, 4))
    assert x.shape == (5, 1, size, size) and 0 <= x.min() and x.max() <= 1
    assert disc(x).shape == (5,)
    assert cfg.stages == (1 if size < 16 else 2)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in disc.modules())


def test_task_is_a_generative_task_with_private_discriminator_only():
    cfg = gan_config()
    data, spec = site_dataset(cfg, site())
    task = build_task(cfg, spec)
    assert isinstance(task, GenerativeTask) and task.family == "gan"
    assert set(task.modules) == {"generator", "discriminator"} and task.private_modules == ("discriminator",)
    prefixes = {k.split(".")[0] for k in R.to_arrayrecord(task.modules).keys()}
    assert prefixes == {"generator", "discriminator"}  # one ArrayRecord: every strategy merges both


def test_conditional_gan_samples_classes_in_turn_and_needs_labels():
    cfg = gan_config(**{"gan.conditional": True})
    data, spec = site_dataset(cfg, site())
    task = build_task(cfg, spec)
    assert task.modules["discriminator"].embed is not None
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.train.batch_size, shuffle=True)
    res = train_local(task, loader, task.make_optimizers(), steps=3)
    assert res.steps == 3 and torch.isfinite(torch.tensor(res.mean_loss))
    assert task.sample(12, seed=3).shape == (12, 1, 8, 8)
    with pytest.raises(ValueError, match="gan.conditional = true needs labelled data"):
        build_task(cfg, spec.__class__(kind="image", image_size=8, channels=1, num_classes=None))


def test_both_ratio_settings_above_one_are_refused():
    with pytest.raises(ConfigError, match="at most one of d-steps-per-g-step and g-steps-per-d-step"):
        gan_config(**{"gan.d-steps-per-g-step": 2, "gan.g-steps-per-d-step": 2})


def _adam_steps(opt: torch.optim.Optimizer) -> int:
    inner = getattr(opt, "original_optimizer", opt)
    p = next(iter(inner.param_groups[0]["params"]))
    return int(inner.state[p]["step"]) if inner.state.get(p) else 0


@pytest.mark.parametrize("ratio", [{}, {"gan.g-steps-per-d-step": 3}, {"gan.d-steps-per-g-step": 2},
                                   {"gan.conditional": True}])
@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew"])
def test_accountant_charged_exactly_once_per_real_discriminator_step(ratio, mode):
    cfg = gan_config(**ratio)
    data, spec = site_dataset(cfg, site())
    task = build_task(cfg, spec)
    optimizers = task.make_optimizers()
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.train.batch_size)
    q, _ = privacy.steps_per_round(len(data), cfg.train.batch_size, 1, 0)
    history = [(1.3, q, 5)]  # from earlier rounds: continued, not double counted
    dp = make_private(task, optimizers, loader, plan=privacy.DPPlan(1.0, q, 7, 1e-5, "rdp", 1.0), history=history,
                      grad_sample_mode=mode)
    calls = 0
    step = task.train_step

    def counted(batch, opts):
        nonlocal calls
        calls += 1
        return step(batch, opts)

    task.train_step = counted  # type: ignore[method-assign]
    res = train_local(task, dp.loader, optimizers, steps=7)
    real_d_steps = calls
    assert res.steps == real_d_steps == 7
    assert sum(s for _, _, s in privacy.compact(dp.history)) == 5 + real_d_steps  # not per generator step, not twice
    assert _adam_steps(optimizers["discriminator"]) == real_d_steps
    g_expected = {"gan.g-steps-per-d-step": 3 * 7, "gan.d-steps-per-g-step": 7 // 2}
    assert _adam_steps(optimizers["generator"]) == g_expected.get(next(iter(ratio), ""), 7)
    assert not hasattr(task.modules["generator"], "_module")  # the generator is never wrapped by Opacus


def test_generator_step_leaves_the_discriminators_private_gradient_alone():
    cfg = gan_config()
    data, spec = site_dataset(cfg, site())
    task = build_task(cfg, spec)
    optimizers = task.make_optimizers()
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.train.batch_size)
    q, _ = privacy.steps_per_round(len(data), cfg.train.batch_size, 1, 0)
    dp = make_private(task, optimizers, loader, plan=privacy.DPPlan(1.0, q, 2, 1e-5, "rdp", 1.0), history=[],
                      grad_sample_mode="hooks")
    batch = next(iter(dp.loader))
    task.train_step(batch, optimizers)
    opt_d = optimizers["discriminator"]
    # Per-sample gradients are from the discriminator step only: real batch + the fixed B fakes.
    assert len(opt_d.grad_samples[0]) == len(batch[0]) + cfg.train.batch_size
    assert dp.seen == len(batch[0]) + cfg.train.batch_size
    task.train_step(next(iter(dp.loader)), optimizers)  # no stale per-sample gradients: the next step works


def test_dp_site_round_ledger_counts_real_discriminator_steps():
    cfg = gan_config(**{"train.max-steps": 4, "gan.g-steps-per-d-step": 2})
    state = RecordDict()
    data, spec = site_dataset(cfg, site())
    arrays = R.to_arrayrecord(build_task(cfg, spec).modules)
    for rnd in (1, 2):
        res = train_round(cfg, site(), arrays, rnd, state)
        assert res.status == "ok" and res.metrics[R.STEPS] == 4
        arrays = res.arrays
    entry = site_entry(cfg, site(), state)
    assert sum(s for _, _, s in entry.history) == 8
    assert 0 < res.metrics[R.EPSILON] <= cfg.privacy.target_epsilon
    assert {k.split(".")[0] for k in arrays.keys()} == {"generator", "discriminator"}


def test_short_cpu_run_lowers_domain_fid(cache_dir):
    cfg = gan_config(**{"privacy.enabled": False})
    torch.manual_seed(0)
    data, spec = site_dataset(cfg, parse_node_config({"partition-id": 0, "num-partitions": 1}))
    held, _ = eval_dataset(cfg)
    images, labels = held.tensors
    scorer = FIDScorer(domain_extractor(images, labels, cache_dir))
    scorer.set_real(images)
    task = build_task(cfg, spec)
    before = scorer.score(task.sample(500, seed=1))
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.train.batch_size, shuffle=True)
    train_local(task, loader, task.make_optimizers(), steps=300)
    after = scorer.score(task.sample(500, seed=1))
    assert after < 0.5 * before, (before, after)


def test_server_evaluator_writes_sample_grid_and_reports_named_fid(tmp_path, cache_dir):
    cfg = gan_config(**{"eval.cache-dir": str(cache_dir), "eval.fid-domain-n": 200})
    ev = Evaluator(cfg)
    arrays = ev.initial_arrays()
    metrics = ev.evaluate(arrays, server_round=0)
    assert metrics["fid-domain-n"] == 200 and metrics["fid-domain"] > 0
    assert "fid-inception" not in metrics  # eval.fid-inception-n = 0 in the quick preset
    assert {"disc-loss", "disc-acc-real", "disc-acc-fake"} <= set(metrics)
    path = ev.save_samples(arrays, tmp_path / "samples" / "round-000")
    assert path.suffix == ".png" and path.stat().st_size > 0
