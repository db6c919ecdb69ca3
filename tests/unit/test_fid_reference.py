"""eval.fid-min-reference: below it an FID is refused, said once in the log, in every round record,
in the run store and in `fedgen status`; the domain extractor is not trained. At or above it, FID
is scored as before."""

from __future__ import annotations

import json
from pathlib import Path
from uuid import uuid4

import pytest
import torch
from flwr.app import MetricRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAvg
from rich.console import Console
from typer.testing import CliRunner

from cli.app import app
from cli.views import render_status, status_payload
from server import fid
from server.evaluation import Evaluator
from server.fid import ImageFID
from server.round_records import RoundRecorder
from server.rounds import run_rounds
from server.store import RunStore
from server.strategy import aggregate_train_metrics
from tests.conftest import FakeGrid, quick_config
from tests.unit.test_eval_path import image_folder

HELD_OUT = 30  # images in the server's folder


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("heldout"), HELD_OUT, classes=3)


def server_config(heldout: Path, cache_dir: Path, min_reference: int, **overrides):
    return quick_config(**{"data.dataset": "image-folder", "data.eval-path": str(heldout), "data.image-size": 8,
                           "eval.cache-dir": str(cache_dir), "eval.fid-domain-n": 40, "eval.fid-inception-n": 0,
                           "eval.fid-min-reference": min_reference, **overrides})


def no_training(*args, **kwargs):
    raise AssertionError("the domain extractor was trained (or loaded) for a refused FID")


def test_too_few_reference_images_refuse_the_domain_fid_without_training_it(heldout, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(fid, "domain_extractor", no_training)
    with caplog.at_level("WARNING", logger="server.fid"):
        ev = Evaluator(server_config(heldout, tmp_path, HELD_OUT + 1))
    (note,) = ev.notes
    assert note == (f"fid-domain refused: {HELD_OUT} real reference image(s), fewer than eval.fid-min-reference = "
                    f"{HELD_OUT + 1} (a Frechet distance estimated from so few images means nothing); give the "
                    "server more held-out images (data.eval-path) or lower eval.fid-min-reference")
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [note]  # once, at start
    for rnd in (0, 1, 2):
        metrics = ev.evaluate(ev.initial_arrays(), server_round=rnd)
        assert "neg-elbo" in metrics and not any(k.startswith("fid") for k in metrics), metrics
    assert list(tmp_path.iterdir()) == []  # no extractor, no real statistics cached
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [note]


def test_at_the_minimum_the_domain_fid_is_scored_as_before(heldout, tmp_path, caplog):
    with caplog.at_level("INFO", logger="server.evaluation"):
        at_min = Evaluator(server_config(heldout, tmp_path, HELD_OUT))
    assert at_min.notes == []
    assert f"server evaluation on {HELD_OUT} held-out examples (all of data.eval-path = {heldout}" in caplog.text
    m = at_min.evaluate(at_min.initial_arrays(), server_round=0)
    assert m["fid-domain-ref-n"] == HELD_OUT and m["fid-domain-n"] == 40 and m["fid-domain"] > 0
    before = Evaluator(server_config(heldout, tmp_path, 2))  # the smallest minimum: no refusal, as before the key
    assert before.evaluate(before.initial_arrays(), server_round=0)["fid-domain"] == pytest.approx(m["fid-domain"])


def test_inception_is_refused_on_the_reference_images_it_would_use(monkeypatch):
    def no_weights():
        raise AssertionError("Inception weights read for a refused FID")

    monkeypatch.setattr(fid, "inception_weights_path", no_weights)
    images, labels = torch.rand(300, 1, 8, 8), torch.arange(300) % 3
    few_used = ImageFID(images, labels, num_rounds=2, domain_n=50, inception_n=100, inception_every=0,
                        cache_dir=".", min_reference=200)
    assert few_used.refused == {"inception"} and len(few_used.notes) == 1
    assert few_used.notes[0].startswith("fid-inception refused: 100 real reference image(s), fewer than "
                                        "eval.fid-min-reference = 200")
    assert few_used.notes[0].endswith("raise eval.fid-inception-n to at least 200 or lower eval.fid-min-reference")
    few_held = ImageFID(images[:50], None, num_rounds=2, domain_n=50, inception_n=500, inception_every=0,
                        cache_dir=".", min_reference=200)
    assert few_held.refused == {"domain", "inception"}
    assert [n.split(":")[0] for n in few_held.notes] == ["fid-domain-ae refused", "fid-inception refused"]
    assert all(n.endswith("(data.eval-path) or lower eval.fid-min-reference") for n in few_held.notes)
    assert few_held.evaluate(lambda n, seed: torch.rand(n, 1, 8, 8), server_round=2) == {}
    off = ImageFID(images[:50], None, num_rounds=2, domain_n=0, inception_n=0, inception_every=0, cache_dir=".",
                   min_reference=200)
    assert off.notes == []  # a metric that is off is not refused


def test_eval_min_reference_is_validated():
    from common.config import ConfigError

    with pytest.raises(ConfigError, match=r"eval\.fid-min-reference = 1: Input should be greater than or equal to 2"):
        quick_config(**{"eval.fid-min-reference": 1})


class EchoGrid(FakeGrid):
    """Every site sends the global model back unchanged (a valid update)."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.pending: dict[str, Message] = {}

    def push_messages(self, messages):
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids do
            self.pending[msg.metadata.message_id] = msg
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids):
        out = []
        for mid in list(ids):
            msg = self.pending.pop(mid)
            content = RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"weight": 1.0})})
            out.append(Message(content=content, reply_to=msg))
        return out


@pytest.mark.usefixtures("flower_identity")
def test_the_refusal_is_in_every_round_record_the_store_and_fedgen_status(heldout, tmp_path, monkeypatch):
    monkeypatch.setattr(fid, "domain_extractor", no_training)
    cfg = server_config(heldout, tmp_path / "cache", 200, **{"run.num-rounds": 1, "strategy.min-train-nodes": 1})
    evaluator = Evaluator(cfg)
    store = RunStore.create(tmp_path / "runs", "refused-fid", config=cfg.to_flat(), model="vae", strategy="fedavg",
                            num_rounds=1)
    strategy = FedAvg(min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0, weighted_by_key="weight",
                      train_metrics_aggr_fn=aggregate_train_metrics)
    outcome = run_rounds(EchoGrid(2), cfg, strategy, evaluator, RoundRecorder(store.run_dir, store, 1), store.run_dir)
    store.set_status(outcome.status)
    store.close()
    assert outcome.status == "completed"
    (note,) = evaluator.notes
    assert "fid-domain refused: 30 real reference image(s)" in note

    jsonl = [json.loads(line) for line in (store.run_dir / "rounds.jsonl").read_text().splitlines()]
    with RunStore.open(store.run_dir) as reader:
        stored, info = reader.rounds(), reader.run_info()
    for records in (outcome.records, jsonl, stored):
        assert [r["round"] for r in records] == [0, 1]
        for rec in records:
            assert rec["eval_notes"] == [note]
            assert "neg-elbo" in rec["eval"] and "fid-domain" not in rec["eval"]  # the other metrics still there
    assert info["best_metric"]["key"] == "neg-elbo"

    payload = status_payload(info, stored)
    assert payload["eval_notes"] == [note] and payload["last_round"]["eval_notes"] == [note]
    console = Console(record=True, width=400)
    console.print(render_status(info, stored))
    assert f"Note: {note}" in console.export_text()

    runner = CliRunner(env={"FEDGEN_RUNS_DIR": None, "COLUMNS": "400", "NO_COLOR": "1"})
    human = runner.invoke(app, ["status", "refused-fid", "--runs-dir", str(tmp_path / "runs")])
    assert human.exit_code == 0 and "fid-domain refused: 30 real reference image(s)" in human.stdout
    as_json = runner.invoke(app, ["status", "refused-fid", "--runs-dir", str(tmp_path / "runs"), "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)["eval_notes"] == [note]


@pytest.mark.usefixtures("flower_identity")
def test_a_run_with_enough_reference_images_has_no_notes(heldout, tmp_path):
    cfg = server_config(heldout, tmp_path / "cache", HELD_OUT, **{"run.num-rounds": 1, "strategy.min-train-nodes": 1,
                                                                   "eval.fid-domain-n": 10})
    strategy = FedAvg(min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0, weighted_by_key="weight",
                      train_metrics_aggr_fn=aggregate_train_metrics)
    recorded: list[dict] = []
    run_rounds(EchoGrid(1), cfg, strategy, Evaluator(cfg), recorded.append, tmp_path)
    assert [("eval_notes" in r, "fid-domain" in r["eval"]) for r in recorded] == [(False, True), (False, True)]
