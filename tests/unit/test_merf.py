"""merf's release (common/models/merf.py): the class means it carries, its sensitivity, its noise.

The release is one DP-SGD step of the ``release`` module. These tests check the mechanism on
neighbouring datasets: noise 0 shows what is released and how far one record moves it; noise
z shows the Gaussian noise is there at the stated scale.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import TensorDataset

from client.dp import make_private
from common import privacy
from common.dp_step import unwrap
from common.models import merf
from common.tasks import DataSpec, build_task
from tests.conftest import quick_config

SPEC = DataSpec(kind="image", image_size=8, channels=1, num_classes=3)


def task_and_data(n: int = 60, seed: int = 0, **overrides):
    cfg = quick_config(**{"task.family": "merf", "merf.width": 8, **overrides})
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 3)
    return build_task(cfg, SPEC), data


def release(task, data, *, noise: float, clip: float = 1.0, mode: str = "hooks") -> torch.Tensor:
    """theta after one full-batch private step (sample rate 1) from zero, times the expected
    batch size: the noised sum of clipped psi per class, as the mechanism releases it."""
    optimizers = task.make_optimizers()
    loader = torch.utils.data.DataLoader(data, batch_size=len(data))
    dp = make_private(task, optimizers, loader, plan=privacy.DPPlan(noise, 1.0, 1, 1e-5, "rdp", clip),
                      history=[], grad_sample_mode=mode)
    batch = next(iter(dp.loader))
    assert len(batch[0]) == len(data)  # sample rate 1: every record, every time
    task.train_step(batch, optimizers)
    assert sum(s for _, _, s in dp.engine.accountant.history) == 1
    return unwrap(task.modules["release"]).theta.weight.detach().clone() * optimizers["release"].expected_batch_size


@pytest.mark.parametrize("squares, features", [(False, "random"), (True, "random"), (False, "public-mnist")])
def test_every_record_has_a_gradient_of_norm_one(squares, features, tmp_path):
    task, data = task_and_data(**{"merf.second-moments": squares, "merf.features": features,
                                  "eval.cache-dir": str(tmp_path)})
    psi = unwrap(task.modules["release"]).psi(data.tensors[0])
    assert torch.allclose(psi.norm(dim=1), torch.ones(len(data)), atol=1e-5)


def test_the_public_feature_map_is_the_same_in_every_process_and_learned_the_digits(tmp_path, monkeypatch):
    """Two parties fit the same weights from the seed and the public digits (one thread, fixed
    order) without moving the caller's random stream; an unusable cache file (empty, not
    finite, another map's) is refitted to the same; a third party loads them from its cache
    instead of refitting, but never another size's or seed's entry. The fit moved every weight
    and bias away from the random start and classifies the public digits far above chance."""
    from common.models import merf_features

    a, b, start = (merf.Features(1, 8, seed=7, width=8) for _ in range(3))
    rng = torch.get_rng_state()
    merf_features.fit_to_public_digits(a, 7, str(tmp_path / "a"))
    assert torch.equal(rng, torch.get_rng_state())
    merf_features.fit_to_public_digits(b, 7, str(tmp_path / "b"))
    assert all(torch.equal(u, v) for u, v in zip(a.conv_weights(), b.conv_weights()))
    assert all(not torch.equal(u, v) for u, v in zip(a.conv_weights(), start.conv_weights()))
    (cached,) = (tmp_path / "a").glob("merf-public-mnist-*.pt")
    assert torch.load(cached, weights_only=True)["accuracy"] > 0.5

    (broken,) = (tmp_path / "b").glob("merf-public-mnist-*.pt")
    not_finite = [w.clone() for w in a.conv_weights()]
    not_finite[0][0, 0, 0, 0] = float("nan")
    for content in ([torch.zeros(3)], not_finite, None):
        if content is None:
            broken.write_bytes(b"")
        else:
            torch.save({"weights": content, "accuracy": 1.0}, broken)
        d = merf.Features(1, 8, seed=7, width=8)
        merf_features.fit_to_public_digits(d, 7, str(tmp_path / "b"))
        assert all(torch.equal(u, v) for u, v in zip(a.conv_weights(), d.conv_weights()))

    def refit(*args, **kwargs):
        raise AssertionError("refitted")

    monkeypatch.setattr(merf_features, "_train", refit)
    c = merf.Features(1, 8, seed=7, width=8)
    merf_features.fit_to_public_digits(c, 7, str(tmp_path / "a"))
    assert all(torch.equal(u, v) for u, v in zip(a.conv_weights(), c.conv_weights()))
    # Another seed or image size (the same weight shapes) is another cache entry: fitted anew.
    for other, seed in ((merf.Features(1, 8, seed=8, width=8), 8), (merf.Features(1, 10, seed=7, width=8), 7)):
        with pytest.raises(AssertionError, match="refitted"):
            merf_features.fit_to_public_digits(other, seed, str(tmp_path / "a"))


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_without_noise_the_release_is_each_class_mean_of_the_features(mode):
    task, data = task_and_data()
    torch.manual_seed(0)
    release(task, data, noise=0.0, mode=mode)
    means, shares = unwrap(task.modules["release"]).class_means()
    x, y = data.tensors
    phi = unwrap(task.modules["release"]).features(x)
    for c in range(3):
        assert torch.allclose(means[c], phi[y == c].mean(0), atol=1e-5)
    assert torch.allclose(shares, torch.full((3,), 1 / 3), atol=1e-5)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_one_record_moves_the_release_by_at_most_the_clipping_bound(mode, monkeypatch):
    """Neighbouring datasets (one record added). Features scaled to norm 3 (a broken feature
    map): the clipping bound C still caps the record's influence; without clipping it is 3."""
    monkeypatch.setattr(merf.Features, "forward", lambda self, x: 3 * self._blocks(x)[0])
    task, data = task_and_data()
    extra = TensorDataset(torch.ones(1, 1, 8, 8), torch.tensor([1]))
    neighbour = torch.utils.data.ConcatDataset([data, extra])
    clip = 0.5
    torch.manual_seed(0)
    a = release(task, data, noise=0.0, clip=clip, mode=mode)
    task, _ = task_and_data()
    b = release(task, neighbour, noise=0.0, clip=clip, mode=mode)
    moved = (b - a).norm()
    assert moved == pytest.approx(clip, rel=1e-4)  # every record is clipped (norm 3 > C): exactly C
    assert (b - a)[[0, 2]].abs().max() < 1e-5  # and only its own class's row moves


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])  # ghost and bk add the noise in code of their own
def test_the_noise_is_gaussian_with_std_z_times_c(mode):
    task, data = task_and_data()
    torch.manual_seed(0)
    exact = release(task, data, noise=0.0, clip=0.7, mode=mode)
    task, _ = task_and_data()
    torch.manual_seed(1)
    noisy = release(task, data, noise=1.3, clip=0.7, mode=mode)
    err = (noisy - exact).flatten()
    assert err.mean().abs() < 0.05
    assert err.std().item() == pytest.approx(1.3 * 0.7, rel=0.03)  # about 10,000 entries


def test_the_server_step_trains_the_generator_towards_the_release():
    """Post-processing: the generator's features move towards the released class means."""
    cfg = quick_config(**{"task.family": "merf", "merf.width": 8, "merf.generator-steps": 150,
                          "merf.generator-per-class": 16})
    task = build_task(cfg, SPEC)
    _, data = task_and_data()
    torch.manual_seed(0)
    release(task, data, noise=0.0)
    rel = unwrap(task.modules["release"])
    means, _ = rel.class_means()

    def distance() -> float:
        y = torch.arange(3).repeat_interleave(32)
        got = torch.zeros_like(means).index_add(0, y, rel.features(task.sample(len(y), 5, y))) / 32
        return float(((got - means) ** 2).sum())

    before = distance()
    out = task.server_update()
    assert math.isfinite(out["generator-match"])
    assert distance() < 0.5 * before


def test_the_server_step_does_nothing_before_any_release():
    task, _ = task_and_data()
    before = [p.clone() for p in task.modules["generator"].parameters()]
    assert task.server_update() == {}
    assert all(torch.equal(a, b) for a, b in zip(before, task.modules["generator"].parameters()))


def test_the_server_evaluator_runs_the_family_step_on_the_merged_weights():
    """The round loop hands every merged model to ``Evaluator.server_update``: for merf the
    generator changes and the release does not; a family without the step is left as it is."""
    from common import records as R
    from server.evaluation import Evaluator

    cfg = quick_config(**{"task.family": "merf", "merf.width": 8, "merf.generator-steps": 5,
                          "eval.fid-domain-n": 0})
    ev = Evaluator(cfg)
    spec_task = build_task(cfg, ev.spec)
    rel = unwrap(spec_task.modules["release"])
    with torch.no_grad():
        rel.theta.weight.normal_()
    merged = R.to_arrayrecord(spec_task.modules)
    out, metrics = ev.server_update(merged)
    assert set(metrics) == {"generator-match", "server-train-seconds"}
    for key in merged:
        same = (out[key].numpy() == merged[key].numpy()).all()
        assert same == (not key.startswith("generator.")), key
    vae = Evaluator(quick_config(**{"eval.fid-domain-n": 0}))
    arrays = vae.initial_arrays()
    assert vae.server_update(arrays) == (arrays, {})


def test_an_adaptive_server_optimizer_is_refused_with_the_fix():
    from common.config import ConfigError

    for name in ("fedadam", "fedyogi"):
        with pytest.raises(ConfigError, match="use fedavg"):
            quick_config(**{"task.family": "merf", "strategy.name": name})
    quick_config(**{"task.family": "merf", "strategy.name": "median"})  # a robust rule is fine


# theta's shape for the digits preset: 10 classes x (feature dim + the count coordinate)
DIGITS_THETA = (10, merf.Features(1, 8, seed=7).dim + 1)


def _site_round(global_theta: torch.Tensor):
    """One DP round of the merf-digits preset at site 0 (in-memory ledger) from a global model
    whose theta is ``global_theta``; (global arrays, reply)."""
    import tomllib

    from flwr.app import RecordDict

    from client.site import train_round
    from common import records as R
    from common.config import parse_node_config
    from common.data.site import site_dataset
    from tests.conftest import ROOT

    preset = tomllib.loads((ROOT / "simulations" / "merf-digits.toml").read_text())
    cfg = quick_config(**preset)
    site = parse_node_config({"partition-id": 0, "num-partitions": 3, "unsafe-memory-ledger": True})
    _, spec = site_dataset(cfg, site)
    task = build_task(cfg, spec)
    with torch.no_grad():
        unwrap(task.modules["release"]).theta.weight.copy_(global_theta)
    arrays = R.to_arrayrecord(task.modules)
    return arrays, train_round(cfg, site, arrays, 1, RecordDict())


def test_a_site_sends_back_only_theta_changed_and_no_feature_map():
    """Whatever the global weights, the reply differs from them in release.theta alone (the DP
    output); the feature map is not in the arrays at all (rebuilt from merf.feature-seed)."""
    theta = torch.randn(DIGITS_THETA)
    sent, reply = _site_round(theta)
    assert reply.status == "ok"
    assert not any(".features." in key for key in sent)
    for key in sent:
        same = (reply.arrays[key].numpy() == sent[key].numpy()).all()
        assert same == (key != "release.theta.weight"), key


def test_an_overflowing_loss_the_server_chose_does_not_make_a_dp_site_fail():
    """The server picks theta so that each class-0 record's loss is 1e37: the exact mean loss
    overflows (float32) exactly when class 0 has enough records. A site that failed on it would
    tell the server about its records; under DP it checks only the update it releases."""
    theta = torch.zeros(DIGITS_THETA)
    theta[0, -1] = -1e38  # loss of a class-0 record: -theta[0, -1] * 0.1 = 1e37; 35 of them overflow
    _, reply = _site_round(theta)
    assert reply.status == "ok"
    assert torch.isfinite(torch.from_numpy(reply.arrays["release.theta.weight"].numpy())).all()


def test_the_unbiased_match_is_the_pairwise_estimate_and_the_plain_one_is_biased_towards_no_spread():
    """``merf.unbiased-match``: the loss is ``sum_{i != j} <phi_i, phi_j> / (B (B - 1)) - 2 <m, mu>
    + ||mu||^2`` per class (MMD^2's unbiased estimate), computed here pair by pair; averaged over
    many batches it is the exact squared distance of the expected features from the target,
    while the plain batch loss exceeds it by the features' variance / B. A wrong sign or
    denominator in the correction fails one of the two."""
    task, _ = task_and_data(**{"merf.generator-per-class": 4, "merf.unbiased-match": True})
    b, classes, dim = 4, 3, 5
    g = torch.Generator().manual_seed(0)
    support = torch.randn(6, dim, generator=g)
    support = support / support.norm(dim=1, keepdim=True)  # features of norm 1, as the map's
    target = torch.randn(classes, dim, generator=g) * 0.3
    y = torch.arange(classes).repeat_interleave(b)

    def losses(phi: torch.Tensor) -> tuple[float, float]:
        got = torch.zeros(classes, dim).index_add(0, y, phi) / b
        plain = ((got - target) ** 2).sum()
        return float(plain), float(plain - task._variance_term(phi, got, y))

    phi = support[torch.randint(len(support), (len(y),), generator=g)]
    pairwise = 0.0
    for c in range(classes):
        rows = phi[y == c]
        gram = rows @ rows.T
        m = rows.mean(0)
        pairwise += float((gram.sum() - gram.diagonal().sum()) / (b * (b - 1)) - 2 * m @ target[c] + target[c] @ target[c])
    assert losses(phi)[1] == pytest.approx(pairwise, rel=1e-5, abs=1e-6)

    # Expectations exactly: each row drawn uniformly from the support, every batch of B rows
    # enumerated (6^4), each batch passed to the loss as one "class" of its own.
    import itertools

    idx = torch.tensor(list(itertools.product(range(len(support)), repeat=b)))
    ids = torch.arange(len(idx)).repeat_interleave(b)
    plain_avg = unbiased_avg = 0.0
    for c in range(classes):
        phi = support[idx.flatten()]
        got = phi.view(len(idx), b, dim).mean(1)
        plain = ((got - target[c]) ** 2).sum(1)
        plain_avg += float(plain.mean())
        unbiased_avg += float(plain.mean() - task._variance_term(phi, got, ids) / len(idx))
    mean = support.mean(0)
    exact = float(((mean - target) ** 2).sum())
    spread = float(((support - mean) ** 2).sum(1).mean())
    assert unbiased_avg == pytest.approx(exact, rel=1e-4)
    assert plain_avg == pytest.approx(exact + classes * spread / b, rel=1e-4)
    assert classes * spread / b > 0.1 * exact  # the bias is far larger than the tolerance


def test_the_server_step_uses_the_unbiased_match_only_when_asked():
    """The same release and generator, one server step each way: the reported match differs by
    exactly the variance term of that step's samples, and is the plain one when the key is off."""
    matches = {}
    for unbiased in (False, True):
        torch.manual_seed(0)
        task, _ = task_and_data(**{"merf.generator-steps": 1, "merf.generator-per-class": 4,
                                   "merf.unbiased-match": unbiased})
        with torch.no_grad():
            unwrap(task.modules["release"]).theta.weight.copy_(torch.rand(
                unwrap(task.modules["release"]).theta.weight.shape, generator=torch.Generator().manual_seed(1)))
        if unbiased:  # the first step's samples, drawn as train_generator draws them
            rel = unwrap(task.modules["release"])
            y = torch.arange(3).repeat_interleave(4)
            z = torch.randn(len(y), task.latent_dim, generator=torch.Generator().manual_seed(task.seed))
            with torch.no_grad():
                phi = rel.features(task.modules["generator"](z, y))
                term = float(task._variance_term(phi, torch.zeros(3, phi.shape[1]).index_add(0, y, phi) / 4, y))
        matches[unbiased] = task.server_update()["generator-match"]
    assert term > 0
    assert matches[False] - matches[True] == pytest.approx(term, rel=1e-4)


def _generator_after(steps: int, stop: int, schedule: str) -> dict[str, torch.Tensor]:
    """The generator's weights after ``stop`` steps of a server training planned for ``steps``."""
    torch.manual_seed(0)
    task, _ = task_and_data(**{"merf.generator-steps": steps, "merf.generator-per-class": 2,
                               "merf.generator-schedule": schedule})
    with torch.no_grad():
        theta = unwrap(task.modules["release"]).theta.weight
        theta.copy_(torch.rand(theta.shape, generator=torch.Generator().manual_seed(1)))
    seen = {}

    def snap(done: int) -> None:
        if done == stop:
            seen.update({k: v.detach().clone() for k, v in task.modules["generator"].state_dict().items()})

    task.train_generator(after_step=snap)
    return seen


def test_a_constant_schedule_stops_where_a_longer_plan_passes_and_the_cosine_one_does_not():
    """``merf.generator-schedule``: with ``constant`` the generator after 3 steps of a 3-step plan is
    the 3-step snapshot of a 6-step plan (the curve's snapshots are planned jobs); with ``cosine``
    the two differ (the shorter plan has annealed its rate), and constant differs from cosine."""
    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    const3, const6 = _generator_after(3, 3, "constant"), _generator_after(6, 3, "constant")
    cos3, cos6 = _generator_after(3, 3, "cosine"), _generator_after(6, 3, "cosine")
    assert const3 and same(const3, const6)
    assert not same(cos3, cos6)
    assert not same(const3, cos3)


def test_the_curve_benchmark_reports_where_the_fid_crosses_the_target():
    from simulations.bench_merf_curve import crossing

    pts = [{"train_cpu_min": 10.0, "fid_inception": 150.0}, {"train_cpu_min": 20.0, "fid_inception": 130.0},
           {"train_cpu_min": 30.0, "fid_inception": 120.0}]
    assert crossing(pts, 140.0) == pytest.approx(15.0)
    assert crossing(pts, 131.3) == pytest.approx(10 + 18.7 / 20 * 10)
    assert crossing(pts, 100.0) is None
    assert crossing(pts, 160.0) == 10.0  # the first point already below: its own minutes
    assert crossing([{"train_cpu_min": 1.0, "fid_inception": None}], 100.0) is None
