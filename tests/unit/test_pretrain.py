"""Public pretraining, then private fine-tuning (issue 20): the public text, task.init-from, train.trainable."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch
from flwr.app import RecordDict

from client.site import train_round
from common import privacy
from common import records as R
from common.config import ConfigError, parse_node_config
from common.data.shakespeare import (
    load_shakespeare,
    shakespeare_heldout_plays,
    shakespeare_public_plays,
    shakespeare_public_text,
    shakespeare_split,
    site_text,
)
from common.data.site import public_dataset, site_dataset
from common.data.text import TextDataError
from common.tasks import build_task
from common.train import freeze_except
from server.evaluation import Evaluator
from server.pretrain import pretrain
from simulations.launch import merged_run_config
from tests.conftest import ROOT, quick_config, site_entry

LM_QUICK = tomllib.loads((ROOT / "simulations" / "lm-quick.toml").read_text())
PUBLIC = 8  # as the lm-pretrained preset


def lm_config(**overrides):
    return quick_config(**{**LM_QUICK, "data.public-plays": PUBLIC, **overrides})


def site(pid: int = 0, n: int = 3):
    return parse_node_config({"partition-id": pid, "num-partitions": n, "unsafe-memory-ledger": True})


# --------------------------------------------------------------------------- the public text


def test_public_plays_are_no_sites_and_never_evaluated_over_the_actual_splits():
    plays = load_shakespeare()
    heldout = set(shakespeare_heldout_plays(4, 0))
    public = set(shakespeare_public_plays(4, PUBLIC, 0))
    clients, eval_text = shakespeare_split(4, 0, 2000, PUBLIC)
    assert len(public) == PUBLIC and not public & heldout
    assert not {c.play for c in clients} & public  # no site holds a public play's role
    # The held-out plays (the server's text) do not move when plays are made public.
    assert eval_text == shakespeare_split(4, 0, 2000)[1]
    assert eval_text == "\n".join(s.text for p in sorted(heldout) for s in plays[p])
    text = shakespeare_public_text(4, PUBLIC, 0)
    assert text == "\n".join(s.text for p in sorted(public) for s in plays[p])
    # Every site's whole text is its clients' role corpora, none from a public or held-out play.
    n = 4
    for pid in range(n):
        mine = clients[pid::n]
        assert site_text(pid, n, heldout_plays=4, seed=0, min_chars=2000, public_plays=PUBLIC) == "\n".join(
            c.text for c in mine)
        assert not {c.play for c in mine} & (public | heldout)
    # Without public plays the sites hold every play that is not held out, as before.
    assert {c.play for c in shakespeare_split(4, 0, 2000)[0]} & public


@pytest.mark.parametrize("seed, heldout, public, min_chars", [(1, 4, 8, 2000), (2, 3, 12, 500), (5, 6, 1, 10_000)])
def test_public_held_out_and_site_plays_are_disjoint_in_other_splits_too(seed, heldout, public, min_chars):
    clients, _ = shakespeare_split(heldout, seed, min_chars, public)
    held, pub = set(shakespeare_heldout_plays(heldout, seed)), set(shakespeare_public_plays(heldout, public, seed))
    assert len(held) == heldout and len(pub) == public and not held & pub
    assert not {c.play for c in clients} & (held | pub)


def test_public_dataset_needs_public_plays_and_too_many_are_refused():
    with pytest.raises(TextDataError, match="data.public-plays"):
        public_dataset(lm_config(**{"data.public-plays": 0}))
    with pytest.raises(TextDataError, match="public_plays=34 but 34 plays are not held out"):
        shakespeare_split(4, 0, 2000, 34)
    with pytest.raises(ConfigError, match="data.public-plays = 2 reserves whole Shakespeare plays"):
        quick_config(**{"data.public-plays": 2})  # digits


# --------------------------------------------------------------------------- pretraining and init-from


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pretrained") / "lm.pt"
    metrics = pretrain(lm_config(), 30, out)
    return out, metrics


def test_round_zero_of_a_fine_tuning_run_is_the_pretrained_model(pretrained):
    path, metrics = pretrained
    ev = Evaluator(lm_config(**{"task.init-from": str(path)}))
    got = ev.evaluate(ev.initial_arrays())
    assert got["perplexity"] == metrics["perplexity"] and got["next-token-accuracy"] == metrics["next-token-accuracy"]
    fresh = Evaluator(lm_config()).evaluate(Evaluator(lm_config()).initial_arrays())
    assert fresh["perplexity"] > got["perplexity"]  # 30 steps did move it
    saved = torch.load(path, weights_only=True)["state_dict"]
    sent = ev.initial_arrays().to_torch_state_dict()
    assert set(sent) == set(saved) and all(torch.equal(sent[k], saved[k]) for k in saved)


@pytest.mark.parametrize("override, problem", [
    ({"lm.width": 64, "lm.heads": 2}, "lm.width: the model file has 32, this run 64"),
    ({"lm.heads": 1}, "lm.heads: the model file has 2, this run 1"),  # the same shapes: only the config tells
    ({"lm.tokenizer": "byte"}, "lm.tokenizer: the model file has 'char', this run 'byte'"),
])
def test_an_incompatible_model_file_is_refused_before_round_one(pretrained, override, problem):
    path, _ = pretrained
    with pytest.raises(ConfigError, match="task.init-from") as err:
        Evaluator(lm_config(**{"task.init-from": str(path), **override}))
    assert problem in str(err.value)


def test_the_pretrained_file_says_what_it_is(pretrained):
    saved = torch.load(pretrained[0], weights_only=True)
    assert saved["config"]["privacy.enabled"] is False  # trained without DP, and saved as such
    assert saved["pretrained_on"] == {"kind": "public-plays", "dp": False,
                                      "plays": shakespeare_public_plays(4, PUBLIC, 0)}


@pytest.mark.parametrize("override", [{"run.seed": 1}, {"data.public-plays": 6}, {"data.heldout-plays": 5}])
def test_a_model_pretrained_on_other_plays_than_this_runs_public_ones_is_refused(pretrained, override):
    # With another seed or count, some of the plays it learned without DP are a site's or held out.
    cfg = lm_config(**{"task.init-from": str(pretrained[0]), **override})
    assert set(shakespeare_public_plays(4, PUBLIC, 0)) - set(shakespeare_public_plays(
        cfg.data.heldout_plays, cfg.data.public_plays, cfg.run.seed))
    with pytest.raises(ConfigError, match="pretrained without DP on the plays"):
        Evaluator(cfg)


def _run_model(tmp_path: Path, pretrained, **config) -> Path:
    """A run's final model (what save_model writes at the end of a job), with these config values."""
    from server.run_model import save_model

    cfg = lm_config(**config)
    out = tmp_path / "final_model.pt"
    saved = torch.load(pretrained[0], weights_only=True)
    save_model(out, saved["state_dict"], cfg, public_dataset(lm_config())[1])
    return out


def test_a_runs_model_is_reused_only_if_it_is_a_dp_release_on_the_same_split(pretrained, tmp_path: Path):
    no_dp = _run_model(tmp_path, pretrained, **{"privacy.enabled": False})
    with pytest.raises(ConfigError, match="trained without DP"):
        Evaluator(lm_config(**{"task.init-from": str(no_dp)}))
    other_split = _run_model(tmp_path, pretrained, **{"run.seed": 3})
    with pytest.raises(ConfigError, match="run.seed: the model's run had 3, this run 0"):
        Evaluator(lm_config(**{"task.init-from": str(other_split)}))
    dp = _run_model(tmp_path, pretrained)
    ev = Evaluator(lm_config(**{"task.init-from": str(dp)}))  # a DP release on this split: accepted
    assert ev.evaluate(ev.initial_arrays())["perplexity"] == pytest.approx(pretrained[1]["perplexity"])


def test_non_finite_or_misshapen_weights_are_refused(pretrained, tmp_path: Path):
    saved = torch.load(pretrained[0], weights_only=True)
    key = next(iter(saved["state_dict"]))
    nan = {**saved, "state_dict": {**saved["state_dict"], key: saved["state_dict"][key] * float("nan")}}
    torch.save(nan, tmp_path / "nan.pt")
    with pytest.raises(ConfigError, match="not all finite"):
        Evaluator(lm_config(**{"task.init-from": str(tmp_path / "nan.pt")}))
    shape = {**saved, "state_dict": {**saved["state_dict"], key: torch.zeros(3)}}
    torch.save(shape, tmp_path / "shape.pt")
    with pytest.raises(ConfigError, match="do not fit this run's model"):
        Evaluator(lm_config(**{"task.init-from": str(tmp_path / "shape.pt")}))
    torch.save({**saved, "config": "lm"}, tmp_path / "config.pt")
    with pytest.raises(ConfigError, match="config malformed"):
        Evaluator(lm_config(**{"task.init-from": str(tmp_path / "config.pt")}))


def test_a_missing_or_foreign_model_file_is_refused(pretrained, tmp_path: Path):
    with pytest.raises(ConfigError, match="no such file"):
        Evaluator(lm_config(**{"task.init-from": str(tmp_path / "nope.pt")}))
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ConfigError, match="not a fedgen final model"):
        Evaluator(lm_config(**{"task.init-from": str(foreign)}))
    with pytest.raises(ConfigError, match="task.family: the model file has 'lm', this run 'vae'"):
        Evaluator(quick_config(**{"task.init-from": str(pretrained[0])}))


def test_the_launcher_resolves_a_relative_model_file_against_the_project(tmp_path: Path):
    cfg = merged_run_config("lm-pretrained", [], tmp_path)
    assert cfg["task.init-from"] == str(ROOT / "pretrained" / "lm-shakespeare.pt")


# --------------------------------------------------------------------------- train.trainable


def test_a_parameter_subset_trains_only_those_and_costs_the_same_privacy():
    full, part = lm_config(), lm_config(**{"train.trainable": "lm.ln_f, lm.head"})
    assert part.train.trainable == "lm.ln_f,lm.head"
    _, spec = site_dataset(full, site())
    arrays = R.to_arrayrecord(build_task(full, spec).modules)
    out = {}
    for name, cfg in (("full", full), ("part", part)):
        state = RecordDict()
        res = train_round(cfg, site(), arrays, 1, state)
        assert res.status == "ok"
        out[name] = (res, site_entry(cfg, site(), state))
    before = arrays.to_torch_state_dict()
    changed = {name: {k for k, v in res.arrays.to_torch_state_dict().items() if not torch.equal(v, before[k])}
               for name, (res, _) in out.items()}
    assert changed["part"] == {"lm.ln_f.weight", "lm.ln_f.bias", "lm.head.weight", "lm.head.bias"}
    assert len(changed["full"]) > len(changed["part"])
    (res_f, entry_f), (res_p, entry_p) = out["full"], out["part"]
    # The same plan, the same ledger history, the same epsilon: privacy does not depend on the subset.
    assert entry_p.history == entry_f.history == [(res_f.metrics[R.NOISE], res_f.metrics[R.SAMPLE_RATE],
                                                   full.train.max_steps)]
    assert res_p.metrics[R.EPSILON] == res_f.metrics[R.EPSILON] == pytest.approx(
        privacy.epsilon(entry_f.history, res_f.metrics[R.DELTA]), rel=1e-12)


def test_a_trainable_prefix_that_names_nothing_is_refused_before_round_one():
    with pytest.raises(ConfigError, match=r"\['lm.hed'\] match no parameter of the lm model"):
        Evaluator(lm_config(**{"train.trainable": "lm.head,lm.hed"}))
    with pytest.raises(ConfigError, match="separated by commas"):
        lm_config(**{"train.trainable": "lm.head,,lm.ln_f"})
    # The GAN's private module is its discriminator: training only the generator would leave
    # DP-SGD nothing to clip and noise.
    with pytest.raises(ConfigError, match=r"trains nothing of the private module\(s\) \['discriminator'\]"):
        Evaluator(quick_config(**{"task.family": "gan", "train.trainable": "generator"}))
    task = build_task(lm_config(), public_dataset(lm_config())[1])
    assert freeze_except(task, ()) == sorted(f"lm.{n}" for n, _ in task.modules["lm"].named_parameters())
    assert all(p.requires_grad for p in task.modules["lm"].parameters())
    assert freeze_except(task, ("lm.blocks.0",)) == sorted(
        f"lm.{n}" for n, _ in task.modules["lm"].named_parameters() if n.startswith("blocks.0."))
    assert not task.modules["lm"].head.weight.requires_grad
