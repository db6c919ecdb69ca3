"""Every registered model family honours the GenerativeTask contract.

Families are picked up from the registry: a new family is tested here as soon as it
is registered and has a quick preset (``simulations/*.toml`` with its task.family).
"""

from __future__ import annotations

import functools
import sys
import tomllib

import pytest
import torch
from flwr.app import RecordDict

import client.dp
from client.dp import make_private, resolve_grad_sample_mode
from client.site import train_round
from tests.conftest import site_entry
from common import privacy
from common import records as R
from common.batch_shapes import CONVS, PADDED_MODES, BatchShapes, shapes_of
from common.config import AppConfig, parse_node_config
from common.data.site import site_dataset
from common.dp_step import unwrap
from common.models import merf_features
from common.tasks import GenerativeTask, build_task, registered_families
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
    # An in-memory ledger (Context.state): these tests need no file on disk.
    return parse_node_config({"partition-id": pid, "num-partitions": n, "unsafe-memory-ledger": True, **extra})


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
    server_modules = getattr(task, "server_modules", ())

    def changed(name):
        return any(not torch.equal(before[k], after[k]) for k in after if k.startswith(name + ".")
                   and after[k].is_floating_point())

    for name in task.modules:
        if name in server_modules:
            assert not changed(name), f"module {name} is trained at the server (server_modules), not at a site"
        else:
            assert changed(name), f"module {name} did not train"
    if server_modules:  # the family's server step trains them, on the aggregated weights alone
        assert callable(getattr(task, "server_update", None)), f"{family}: server_modules need a server_update()"
        before = {k: v.clone() for k, v in after.items()}
        task.server_update()
        after = R.state_dict_of(task.modules)
        assert all(changed(name) for name in server_modules), f"{family}: server_update() trained no server module"


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_is_deterministic_for_a_seed(family):
    _, task, _ = built(family)
    a, b = task.sample(4, seed=7), task.sample(4, seed=7)
    assert len(a) == 4
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    else:
        assert a == b and all(isinstance(s, str) for s in a)


# The settings that make a family class-conditional (its quick preset is unconditional): a family
# with such a setting names it here, so that sampling with labels is checked for it too.
CONDITIONAL = {"gan": {"gan.conditional": True}}
CONDITIONAL_PRESET = {"merf"}  # families whose quick preset is class-conditional already (labelled digits)
SAMPLE_CASES = [(family, {}) for family in FAMILIES] + sorted(CONDITIONAL.items())


@pytest.mark.parametrize(("family", "overrides"), SAMPLE_CASES,
                         ids=[f + ("-conditional" if o else "") for f, o in SAMPLE_CASES])
def test_sample_takes_class_labels_only_when_conditional(family, overrides):
    """``num_classes`` says whether ``sample`` can be told the classes (``fedgen generate`` writes
    class-balanced data with them): a conditional family draws the classes it is given, the same
    for the same seed and labels; labels of the wrong shape or range, or any labels for an
    unconditional family, are refused rather than ignored."""
    _, task, _ = built(family, **overrides)
    assert isinstance(task.num_classes, int) and task.num_classes >= 0
    if not overrides and family not in CONDITIONAL_PRESET:
        assert task.num_classes == 0, f"{family}: its quick preset is unconditional"
    if not task.num_classes:
        with pytest.raises(ValueError, match="unconditional"):
            task.sample(2, seed=7, labels=torch.zeros(2, dtype=torch.long))
        return
    assert task.num_classes == task.spec.num_classes
    last = task.num_classes - 1
    a = task.sample(4, seed=7, labels=torch.tensor([0, 0, last, last]))
    assert torch.equal(a, task.sample(4, seed=7, labels=torch.tensor([0, 0, last, last])))
    assert a.shape == (4, task.spec.channels, task.spec.image_size, task.spec.image_size)
    other = task.sample(4, seed=7, labels=torch.tensor([last, last, 0, 0]))
    assert not torch.equal(a[:2], other[:2]), "the labels do not change the samples"
    for bad in (torch.tensor([0, 1]), torch.tensor([0, 1, 2, task.num_classes]), torch.tensor([-1, 0, 0, 0]),
                torch.zeros(4)):
        with pytest.raises(ValueError):
            task.sample(4, seed=7, labels=bad)
    assert all(m.training for m in task.modules.values())  # left in the mode it was in


# Opacus grad-sample modes (privacy.grad-sample-mode). Every family supports every mode; a
# family that could not use one would drop it here, with the reason, and in its README row.
MODES = ("hooks", "ew", "functorch", "ghost", "bk")
FAMILY_MODES = {family: MODES for family in FAMILIES}
CASES = [(family, mode) for family in FAMILIES for mode in FAMILY_MODES[family]]


def private_step(family: str, mode: str, clip: float, batch=None):
    """One private step (noise 0) in ``mode`` on ``batch`` (default: the first Poisson batch).

    Returns the batch, the privatised gradient of the private module (flat), this step's
    per-example gradient norms before clipping, and the DP handles. The RNG is seeded
    before the step, so every mode sees the same latents (VAE noise, GAN fakes).
    """
    cfg, task, data = built(family)
    optimizers = task.make_optimizers()
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.train.batch_size)
    q, steps = privacy.steps_per_round(len(data), cfg.train.batch_size, 1, 1)
    plan = privacy.DPPlan(0.0, q, steps, 1e-5, "rdp", clip)
    dp = make_private(task, optimizers, loader, plan=plan, history=[], grad_sample_mode=mode)
    name = task.private_modules[0]
    opt = optimizers[name]
    if batch is None:
        torch.manual_seed(1)
        batch = next(iter(dp.loader))
    torch.manual_seed(2)
    task.train_step(batch, optimizers)
    grad = torch.cat([p.grad.reshape(-1) for p in opt.params])
    # Modules that do not see private data are not wrapped by Opacus.
    for other, module in task.modules.items():
        if other != name:
            assert not hasattr(module, "_module"), f"{other} must not be made private"
    return batch, grad, dp.last_norms, dp, opt


@functools.lru_cache(maxsize=None)
def hooks_reference(family: str):
    """Opacus' hooks mode, with no clipping in effect: the batch and its per-example norms."""
    batch, _, norms, _, _ = private_step(family, "hooks", 1e9)
    return batch, norms


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_grad_sample_mode_is_one_the_family_supports(family):
    _, task, _ = built(family)
    assert resolve_grad_sample_mode("auto", task) in FAMILY_MODES[family]
    assert resolve_grad_sample_mode("functorch", task) == "functorch"  # an explicit setting wins


@pytest.mark.parametrize(("family", "mode"), CASES)
def test_per_sample_clipping_bounds_the_private_gradient(family, mode):
    """With noise 0, the privatised gradient is a mean of clipped per-sample gradients: its
    norm is at most C * (per-sample gradients) / (expected batch size)."""
    clip = 1e-3
    _, grad, norms, dp, opt = private_step(family, mode, clip)
    n_samples = len(norms)
    assert n_samples > 0
    assert grad.norm().item() <= clip * n_samples / opt.expected_batch_size * (1 + 1e-4)
    assert dp.seen == n_samples and dp.clip_fraction == 1.0  # every sample needed clipping at C=1e-3
    assert sum(s for _, _, s in dp.engine.accountant.history) == 1  # one step, one charge


@pytest.mark.parametrize(("family", "mode"), [c for c in CASES if c[1] != "hooks"])
def test_every_mode_clips_each_example_like_hooks(family, mode):
    """Same batch, same latents, noise 0 and a clipping bound between the per-example norms
    (about half the examples clipped): every mode computes the same per-example norms and
    the same privatised gradient as Opacus' hooks mode, which materialises each example's
    gradient. This is what shows that ghost clipping (norms from activations and backprops,
    then a second backward of the re-weighted losses) really bounds each example."""
    batch, ref_norms = hooks_reference(family)
    ranked = ref_norms.sort().values
    k = len(ranked) // 2
    clip = float(ranked[k - 1] + ranked[k]) / 2
    equal = float(ranked[-1] - ranked[0]) <= 1e-4 * float(ranked[-1])
    if equal:  # a family whose every example has the same norm (merf: exactly 1): clip them all
        clip = float(ranked[0]) / 2
    _, ref_grad, _, ref_dp, _ = private_step(family, "hooks", clip, batch)
    _, grad, norms, dp, _ = private_step(family, mode, clip, batch)
    assert torch.allclose(norms, ref_norms, rtol=1e-3, atol=1e-6)
    assert 0 < dp.clipped == ref_dp.clipped <= dp.seen == ref_dp.seen
    assert (dp.clipped == dp.seen) == equal
    assert (grad - ref_grad).norm() <= 1e-4 * ref_grad.norm()


# The families whose private step runs convolutions (padded to a multiple of 8 rows under hooks,
# ghost and bk: common/batch_shapes.py); the test below fails for a family not listed right.
CONV_FAMILIES = ("gan", "merf", "vae")


def conv_calls(monkeypatch) -> list[tuple]:
    """Record every convolution torch runs (the layers' and Opacus' per-example ones): the shapes
    of its tensors and its other arguments, i.e. what oneDNN builds a kernel for."""
    calls: list[tuple] = []
    for name in ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
        def recorded(*args, _f=getattr(torch.nn.functional, name), _name=name, **kwargs):
            calls.append((_name, *(tuple(a.shape) if isinstance(a, torch.Tensor) else a
                                   for a in (*args, *kwargs.values()))))
            return _f(*args, **kwargs)
        monkeypatch.setattr(torch.nn.functional, name, recorded)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_the_convolutions_batch_sizes_are_planned_around_the_rows_the_private_module_sees(family):
    """make_private plans the padded sizes (common/batch_shapes.py) around the expected Poisson
    batch plus the rows the family declares it adds (``extra_private_rows``: the GAN's fakes),
    and that declaration is what its private step really does."""
    batch, ref_norms = hooks_reference(family)
    cfg, task, data = built(family)
    assert getattr(task, "extra_private_rows", 0) == len(ref_norms) - len(batch[0])
    optimizers = task.make_optimizers()
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.train.batch_size)
    q, steps = privacy.steps_per_round(len(data), cfg.train.batch_size, 1, 1)
    make_private(task, optimizers, loader, plan=privacy.DPPlan(1.0, q, steps, 1e-5, "rdp", 1.0), history=[],
                 grad_sample_mode="hooks")
    expected = BatchShapes.around(q, len(data), getattr(task, "extra_private_rows", 0))
    private = task.modules[task.private_modules[0]]
    plans = [shapes_of(layer) for layer in private.modules() if isinstance(layer, CONVS)]
    plans += [layer.batch_shapes for layer in private.modules() if hasattr(layer, "batch_shapes")]
    assert bool(plans) == (family in CONV_FAMILIES)
    assert all(p == expected for p in plans), (plans, expected)


@pytest.mark.parametrize(("family", "mode"), [(f, m) for f in FAMILIES for m in PADDED_MODES])
def test_padded_convolutions_change_no_example_gradient(family, mode, monkeypatch):
    """common/batch_shapes.py: two Poisson batches of different sizes that the plan runs as the
    same padded pieces run every convolution (the layers', a family's own and the per-example
    gradients') with the same shapes, and the per-example norms, the clipping and the privatised
    gradient are those of the unpadded step (about half the examples clipped). A small plan (8
    and 16 rows) makes every batch here run in pieces, the last one padded."""
    batch, ref_norms = hooks_reference(family)
    shapes = BatchShapes((8, 16))
    monkeypatch.setattr(BatchShapes, "around", classmethod(lambda cls, *args, **kwargs: shapes))
    extra = len(ref_norms) - len(batch[0])  # rows the private module sees besides the real ones (GAN: fakes)

    def padded_last(rows: int) -> bool:
        pieces = shapes.pieces(rows)
        return len(pieces) >= 2 and pieces[-1][0] < pieces[-1][1]

    sizes = [(a, b) for a in range(len(batch[0]), 0, -1) for b in range(a - 1, 0, -1)
             if padded_last(a + extra) and padded_last(b + extra)
             and [run for _, run in shapes.pieces(a + extra)] == [run for _, run in shapes.pieces(b + extra)]]
    a, b = sizes[0]
    ranked = ref_norms.sort().values
    equal = float(ranked[-1] - ranked[0]) <= 1e-4 * float(ranked[-1])  # merf: every norm is 1
    clip = float(ranked[0]) / 2 if equal else float(ranked[len(ranked) // 2 - 1] + ranked[len(ranked) // 2]) / 2
    calls = conv_calls(monkeypatch)

    def step(rows: int):
        calls.clear()
        out = private_step(family, mode, clip, tuple(t[:rows] for t in batch))
        return out, list(calls)

    (_, grad, norms, dp, _), padded_a = step(a)
    _, padded_b = step(b)
    # Unpadded: the layers (client.dp), the per-example convolution (client.dp) and merf's features.
    monkeypatch.setattr(client.dp, "pad_conv_batches", lambda *args: 0)
    whole = lambda fn, inputs, shapes: fn(*inputs)  # noqa: E731
    monkeypatch.setattr(client.dp, "in_pieces", whole)
    monkeypatch.setattr(merf_features, "in_pieces", whole)
    (_, ref_grad, plain_norms, ref_dp, _), plain_a = step(a)
    _, plain_b = step(b)
    assert bool(padded_a) == (family in CONV_FAMILIES)
    assert padded_a == padded_b  # no new kernel for a new batch size the plan runs alike
    if family in CONV_FAMILIES:
        assert plain_a != plain_b  # (unpadded, the convolutions meet every size)
    assert len(norms) == len(plain_norms) == a + extra
    assert torch.allclose(norms, plain_norms, rtol=1e-4, atol=1e-7)
    assert 0 < dp.clipped == ref_dp.clipped <= dp.seen == ref_dp.seen == a + extra
    assert (dp.clipped == dp.seen) == equal
    assert (grad - ref_grad).norm() <= 1e-5 * ref_grad.norm()


@pytest.mark.parametrize("mode", ["ghost", "bk"])
@pytest.mark.parametrize("family", FAMILIES)
def test_ghost_refuses_a_step_whose_loss_bypassed_backward_mean(family, mode, monkeypatch):
    """Under ghost clipping and bk the optimizer only adds noise; a plain backward would release
    an unclipped gradient, so the private step must fail before any weight moves."""
    cfg, task, data = built(family)
    monkeypatch.setattr(sys.modules[type(task).__module__], "backward_mean",
                        lambda module, opt, losses: losses.mean().backward())
    optimizers = task.make_optimizers()
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.train.batch_size)
    q, steps = privacy.steps_per_round(len(data), cfg.train.batch_size, 1, 1)
    dp = make_private(task, optimizers, loader, plan=privacy.DPPlan(1.0, q, steps, 1e-5, "rdp", 1.0), history=[],
                      grad_sample_mode=mode)
    name = task.private_modules[0]
    before = [p.detach().clone() for p in optimizers[name].params]
    with pytest.raises(RuntimeError, match="not clipped"):
        task.train_step(next(iter(dp.loader)), optimizers)
    assert all(torch.equal(a, p) for a, p in zip(before, optimizers[name].params))
    assert not dp.engine.accountant.history  # nothing released, nothing charged


@pytest.mark.parametrize(("family", "mode"), CASES)
def test_dp_round_charges_accountant_once_per_private_step(family, mode):
    # Four steps a round, also for a family whose preset takes the whole site in one batch (merf).
    cfg = family_config(family, **{"train.max-steps": 4, "train.local-epochs": 4, "run.num-rounds": 2,
                                   "privacy.grad-sample-mode": mode})
    state = RecordDict()
    arrays = None
    for rnd in (1, 2):
        if arrays is None:
            data, spec = site_dataset(cfg, site())
            arrays = R.to_arrayrecord(build_task(cfg, spec).modules)
        res = train_round(cfg, site(), arrays, rnd, state)
        assert res.status == "ok"
        assert res.metrics[R.STEPS] == 4
    entry = site_entry(cfg, site(), state)
    assert sum(s for _, _, s in entry.history) == 8  # 2 rounds x 4 private steps, nothing else
    assert res.metrics[R.EPSILON] == pytest.approx(privacy.epsilon(entry.history, res.metrics[R.DELTA]))


@pytest.mark.parametrize("family", FAMILIES)
def test_accountant_charges_the_rate_the_sampler_uses(family):
    """Opacus' own hook charges 1 / len(loader), and for some batch counts (93, 99, 105, 117,
    123, ...) its loader's len() rounds one short: a site sampling at 1/123 was charged 1/122
    and ran out of budget a round early. Here 123 records in batches of 1 hit such a count."""
    _, task, data = built(family)
    assert len(data) >= 123
    data, size = torch.utils.data.Subset(data, range(123)), 1  # ceil(123 / 1) = 123 batches
    optimizers = task.make_optimizers()
    loader = torch.utils.data.DataLoader(data, batch_size=size)
    q, _ = privacy.steps_per_round(len(data), size, 1, 2)
    assert q == 1 / 123 and int(1 / q) == 122  # the float rounding this test is about
    dp = make_private(task, optimizers, loader, plan=privacy.DPPlan(1.0, q, 2, 1e-5, "rdp", 1.0), history=[],
                      grad_sample_mode="auto")
    batches = iter(dp.loader)
    for _ in range(2):
        task.train_step(next(batches), optimizers)
    assert privacy.compact(dp.history) == [(1.0, q, 2)]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_scores_canaries_for_the_sample_level_audit(family):
    """What the audit needs from a family: a name for its score and a per-canary loss,
    deterministic for a seed, one finite value per canary."""
    from client.audit import make_canaries

    cfg, task, _ = built(family)
    assert isinstance(task.canary_score, str) and task.canary_score
    canaries = make_canaries(task.spec, 6, torch.Generator().manual_seed(0), cfg.lm.context)
    a, b = task.canary_losses(canaries, seed=3), task.canary_losses(canaries, seed=3)
    assert a.shape == (6,) and a.dtype == torch.float64 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert all(m.training for m in task.modules.values())  # left in the mode it was in


@pytest.mark.parametrize("family", FAMILIES)
def test_the_family_declares_its_held_out_metrics_and_evaluate_reports_them(family):
    """The CLI plots and the run store's best metric read a family's metrics from its config
    section (common/metrics.py): a family that forgets them, or names one its evaluate() does
    not report, would show no headline."""
    from common.config import family_eval_metrics
    from common.metrics import FID_METRICS, EvalMetric

    declared = family_eval_metrics(family)  # raises, naming the fix, if the section lacks eval_metrics
    assert all(isinstance(m, EvalMetric) for m in declared)
    assert not {m.key for m in declared} & {m.key for m in FID_METRICS}, "FID is the server's, not a family's"
    _, task, data = built(family)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, range(16)), batch_size=8)
    reported = task.evaluate(loader)
    missing = [m.key for m in declared if m.key not in reported]
    assert not missing, f"{family}: eval_metrics declares {missing} but evaluate() reports only {sorted(reported)}"


def test_a_family_without_declared_metrics_is_named_with_the_fix(monkeypatch):
    from common import config

    monkeypatch.setattr(config.VAESection, "eval_metrics", None)
    with pytest.raises(TypeError, match=r"AppConfig.vae .*eval_metrics: ClassVar"):
        config.family_eval_metrics("vae")
