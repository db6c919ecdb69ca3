"""The language-model family: tokenization through the task, learning, DP, samples, text data wiring."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest
import torch
from flwr.app import RecordDict

from client.site import train_round
from tests.conftest import site_entry
from common import privacy
from common import records as R
from common.config import AppConfig, ConfigError, parse_node_config, parse_run_config
from common.data.site import eval_dataset, site_dataset
from common.data.shakespeare import site_text
from common.data.text import TextDataError
from common.data.tokenizers import make_tokenizer
from common.models.lm import PROMPTS, LMTask, _char_counts
from common.tasks import DataSpec, build_task
from common.train import train_local
from server.evaluation import Evaluator
from tests.conftest import ROOT, pyproject_run_config, quick_config

LM_QUICK = tomllib.loads((ROOT / "simulations" / "lm-quick.toml").read_text())


# One torch thread per test: the session fixture in tests/conftest.py.


def lm_config(**overrides) -> AppConfig:
    return quick_config(**{**LM_QUICK, **overrides})


def site(pid: int = 0, n: int = 3, **extra):
    return parse_node_config({"partition-id": pid, "num-partitions": n, "unsafe-memory-ledger": True, **extra})


def loader(data, batch_size: int = 64, **kw) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(data, batch_size=batch_size, **kw)


# --------------------------------------------------------------------------- tokenization


def test_char_tokenization_round_trips_through_the_task_and_its_data():
    cfg = lm_config()
    data, spec = site_dataset(cfg, site())
    task = build_task(cfg, spec)
    assert spec == DataSpec(kind="text", vocab_size=97) and task.tokenizer == make_tokenizer("char")
    text = "To be, or not to be:\nthat is the question!"
    assert task.tokenizer.decode(task.tokenizer.encode(text)) == text
    # Unknown characters become the one <unk> id (decoded as U+FFFD).
    assert task.tokenizer.encode("é") == [0] and task.tokenizer.decode(task.tokenizer.encode("café")) == "caf\ufffd"
    # The site's windows decode back to its text, in order.
    raw = site_text(0, 3, heldout_plays=cfg.data.heldout_plays, seed=cfg.run.seed, min_chars=cfg.data.min_chars)
    x0, y0 = data[0]
    x1, _ = data[1]
    assert x0.shape == (cfg.lm.context,) and torch.equal(x0[1:], y0[:-1])
    assert task.tokenizer.decode(torch.cat([x0, x1])) == raw[: 2 * cfg.lm.context]
    assert task.metadata() == {"tokenizer": task.tokenizer.to_config()}


def test_byte_tokenization_is_an_option_and_counts_characters(tmp_path: Path):
    (tmp_path / "a.txt").write_text("Ça va? Naïve café — déjà vu. " * 20, encoding="utf-8")
    cfg = lm_config(**{"data.dataset": "text-folder", "lm.tokenizer": "byte"})
    data, spec = site_dataset(cfg, site(data_path=str(tmp_path)))
    task = build_task(cfg, spec)
    assert spec.vocab_size == 256
    text = "Ça va? — naïve"
    ids = task.tokenizer.encode(text)
    assert task.tokenizer.decode(ids) == text and len(ids) > len(text)
    assert _char_counts(torch.tensor(ids), byte_level=True) == len(text)
    metrics = task.evaluate(loader(data))
    assert metrics["eval-n"] == len(data) * cfg.lm.context
    assert metrics["perplexity"] > math.exp(metrics["eval-loss"])  # fewer chars than byte tokens


def test_task_refuses_data_built_for_another_tokenizer_or_kind():
    cfg = lm_config()
    with pytest.raises(ValueError, match="lm.tokenizer"):
        LMTask(cfg, DataSpec(kind="text", vocab_size=256), torch.device("cpu"))
    with pytest.raises(ValueError, match="needs text data"):
        LMTask(cfg, DataSpec(kind="image", image_size=8), torch.device("cpu"))


def test_lm_config_heads_must_divide_width():
    with pytest.raises(ConfigError, match="lm: .*width \\(30\\) must be a multiple of heads \\(4\\)"):
        parse_run_config({**pyproject_run_config(), "lm.width": 30, "lm.heads": 4})


# --------------------------------------------------------------------------- learning and metrics


def test_short_cpu_run_beats_the_unigram_baseline_on_held_out_plays():
    cfg = lm_config()
    data, spec = site_dataset(cfg, site())
    held_out, eval_spec = eval_dataset(cfg)
    assert eval_spec == spec and len(held_out) == cfg.data.eval_max_examples
    task = build_task(cfg, spec)
    ev_loader = loader(held_out, 256)
    unigram = task.baseline_metrics(ev_loader)["unigram-perplexity"]
    before = task.evaluate(ev_loader)["perplexity"]
    res = train_local(task, loader(data, 32, shuffle=True, generator=torch.Generator().manual_seed(0)),
                      task.make_optimizers(), steps=200)
    after = task.evaluate(ev_loader)
    assert 15 < unigram < 40  # English characters: ~24 for Shakespeare
    assert before > unigram  # an untrained model is worse than character frequencies
    assert after["perplexity"] < unigram, (after, unigram, res)
    assert after["bits-per-char"] == pytest.approx(math.log2(after["perplexity"]))
    assert after["eval-n"] == len(held_out) * cfg.lm.context


def test_perplexity_equals_torchmetrics_over_all_tokens():
    from torchmetrics.text import Perplexity

    cfg = lm_config()
    held_out, spec = eval_dataset(cfg)
    task = build_task(cfg, spec)
    subset = torch.utils.data.Subset(held_out, range(10))
    metric = Perplexity()
    with torch.no_grad():
        for x, y in loader(subset, 3):
            metric.update(task.modules["lm"](x), y)
    assert task.evaluate(loader(subset, 3))["perplexity"] == pytest.approx(float(metric.compute()), rel=1e-4)


# --------------------------------------------------------------------------- DP


def test_dp_applies_and_epsilon_composes_over_rounds():
    cfg = lm_config(**{"run.num-rounds": 3})
    s, state = site(), RecordDict()
    data, spec = site_dataset(cfg, s)
    arrays = R.to_arrayrecord(build_task(cfg, spec).modules)
    eps = []
    for rnd in (1, 2):
        res = train_round(cfg, s, arrays, rnd, state)
        assert res.status == "ok" and res.metrics[R.STEPS] == cfg.train.max_steps
        eps.append(res.metrics[R.EPSILON])
    assert 0 < eps[0] < eps[1] < cfg.privacy.target_epsilon
    assert res.metrics[R.NOISE] > 0 and R.CLIP_FRACTION not in res.metrics  # not a DP output: not sent
    entry = site_entry(cfg, s, state)
    assert entry.history == [(res.metrics[R.NOISE], res.metrics[R.SAMPLE_RATE], 2 * cfg.train.max_steps)]
    assert eps[1] == pytest.approx(privacy.epsilon(entry.history, res.metrics[R.DELTA]), rel=1e-12)
    new, old = res.arrays.to_torch_state_dict(), arrays.to_torch_state_dict()
    assert set(new) == set(old) and any(not torch.equal(new[k], old[k]) for k in new)


@pytest.mark.parametrize("mode", ["hooks", "ew", "functorch"])
def test_an_empty_poisson_batch_still_takes_a_noisy_charged_step(mode):
    from client.dp import make_private

    cfg = lm_config()
    data, spec = site_dataset(cfg, site())
    task = build_task(cfg, spec)
    optimizers = task.make_optimizers()
    q, steps = privacy.steps_per_round(len(data), cfg.train.batch_size, 1, 1)
    dp = make_private(task, optimizers, loader(data, cfg.train.batch_size),
                      plan=privacy.DPPlan(1.0, q, steps, 1e-5, "rdp", 1.0), history=[], grad_sample_mode=mode)
    before = [p.detach().clone() for p in task.modules["lm"].parameters()]
    empty = torch.zeros(0, cfg.lm.context, dtype=torch.long)
    assert task.train_step((empty, empty), optimizers)["batch-size"] == 0
    assert dp.history == [(1.0, q, 1)]
    assert any(not torch.equal(a, b) for a, b in zip(before, task.modules["lm"].parameters()))
    task.train_step(next(iter(dp.loader)), optimizers)  # and a real batch afterwards still works
    assert dp.history == [(1.0, q, 2)]


# --------------------------------------------------------------------------- samples and server


def test_sample_returns_the_requested_number_of_strings():
    cfg = lm_config(**{"lm.sample-length": 12})
    task = build_task(cfg, DataSpec(kind="text", vocab_size=97))
    for n in (1, 3, len(PROMPTS) + 3):
        out = task.sample(n, seed=5)
        assert len(out) == n and all(isinstance(s, str) for s in out)
        assert [s[: len(PROMPTS[i % len(PROMPTS)])] for i, s in enumerate(out)] == [
            PROMPTS[i % len(PROMPTS)] for i in range(n)]
        assert all(len(s) == len(PROMPTS[i % len(PROMPTS)]) + 12 for i, s in enumerate(out))
        assert not any("\ufffd" in s for s in out)  # <unk> is never generated
    assert task.sample(4, seed=5) == task.sample(4, seed=5) != task.sample(4, seed=6)


def test_server_reports_unigram_baseline_once_and_writes_text_samples(tmp_path: Path):
    cfg = lm_config()
    ev = Evaluator(cfg)
    arrays = ev.initial_arrays()
    first, second = ev.evaluate(arrays), ev.evaluate(arrays)
    assert {"perplexity", "bits-per-char", "eval-loss", "eval-n", "unigram-perplexity"} <= set(first)
    assert "unigram-perplexity" not in second and second["perplexity"] == first["perplexity"]
    path = ev.save_samples(arrays, tmp_path / "samples" / "round-000")
    assert path.suffix == ".txt"
    texts = path.read_text().split("\n\n---\n\n")
    assert len(texts) == cfg.eval.num_samples and texts[0].startswith(PROMPTS[0])


# --------------------------------------------------------------------------- text data wiring


def test_text_folder_errors_name_the_file(tmp_path: Path):
    cfg = lm_config(**{"data.dataset": "text-folder"})
    (tmp_path / "a.txt").write_text("Some good text. " * 10, encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(TextDataError, match=r"b\.txt is not valid UTF-8"):
        site_dataset(cfg, site(data_path=str(tmp_path)))
    (tmp_path / "b.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(TextDataError, match=r"b\.txt is empty"):
        site_dataset(cfg, site(data_path=str(tmp_path)))
    with pytest.raises(TextDataError, match="needs data.path"):
        eval_dataset(cfg)


def test_text_folder_site_and_server_split(tmp_path: Path):
    text = "".join(f"line {i}: the quick brown fox.\n" for i in range(200))
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    cfg = lm_config(**{"data.dataset": "text-folder", "data.path": str(tmp_path)})
    own, spec = site_dataset(cfg, site(data_path=str(tmp_path)))  # the site's own folder: all of it
    parts = [site_dataset(cfg, site(pid))[0] for pid in range(3)]
    held_out, eval_spec = eval_dataset(cfg)
    ctx = cfg.lm.context
    assert spec == eval_spec and len(own) == (len(text) - 1) // ctx
    tok = make_tokenizer("char")
    train_part = tok.decode(torch.cat([parts[0][i][0] for i in range(len(parts[0]))]))
    assert text.startswith(train_part)
    assert tok.decode(held_out[len(held_out) - 1][1]) in text[int(len(text) * 0.8):]
    assert sum(len(p) for p in parts) * ctx <= 0.8 * len(text)
