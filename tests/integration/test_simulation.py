"""A real `flwr run` simulation (private SuperLink, Ray backend) of the VAE on digits."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from flwr.app import ArrayRecord

from cli.app import app as cli_app
from common import records as R
from server.checkpoints import Checkpointer
from server.store import RunStore
from simulations.launch import launch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    code = launch("digits-quick", ["run.num-rounds=3"], num_sites=3, runs_dir=runs, quiet=True)
    assert code == 0, "the simulation failed; run `python -m simulations.launch --preset digits-quick` to see why"
    (run_dir,) = [p for p in runs.iterdir() if (p / "run.db").exists()]
    return run_dir


def test_every_round_is_recorded_with_decreasing_loss(finished_run):
    recs = [json.loads(line) for line in (finished_run / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [0, 1, 2, 3]
    # Under DP the sites send no training loss (not a DP output); the server's held-out loss falls.
    assert all("train-loss" not in r["train"] for r in recs[1:])
    elbo = [r["eval"]["neg-elbo"] for r in recs]
    assert elbo[-1] < elbo[1] < elbo[0]
    for r in recs[1:]:
        assert len(r["sites"]) == 3 and all(s["status"] == "ok" for s in r["sites"])
        assert r["bytes_sent"] > 0 and r["bytes_received"] > 0
        assert (finished_run / r["artifacts"]["samples"]).exists()


def test_epsilon_is_composed_over_rounds_and_within_target(finished_run):
    recs = [json.loads(line) for line in (finished_run / "rounds.jsonl").read_text().splitlines()][1:]
    eps = [r["epsilon_max"] for r in recs]
    assert eps[0] < eps[1] < eps[2] <= 8.0
    assert eps[2] == pytest.approx(8.0, rel=0.01)  # calibrated to reach the target at the last round


def test_store_and_cli_read_the_real_run(finished_run):
    with RunStore.open(finished_run) as store:
        info = store.run_info()
        assert info["status"] == "completed" and info["rounds_done"] == 3
        assert len(store.rounds()) == 4
    result = CliRunner().invoke(cli_app, ["status", "latest", "--runs-dir", str(finished_run.parent), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["run"]["status"] == "completed"


def test_final_model_loads_without_unpickling_code(finished_run):
    ckpt = torch.load(finished_run / "final_model.pt", weights_only=True)
    assert ckpt["family"] == "vae"
    assert any(k.startswith("vae.encoder") for k in ckpt["state_dict"])
    cfg = json.loads((finished_run / "config.json").read_text())
    assert cfg["run.num-rounds"] == 3 and cfg["data.dataset"] == "digits"
    # Self-describing: the model file alone rebuilds the task (config) and says what made it.
    assert ckpt["config"] == cfg and set(ckpt["versions"]) == {"torch", "flwr", "opacus", "fedgen"}
    from common.config import parse_run_config
    from common.tasks import DataSpec, build_task

    task = build_task(parse_run_config(ckpt["config"]), DataSpec(**ckpt["data_spec"]))
    R.load_arrayrecord(task.modules, ArrayRecord(torch_state_dict=ckpt["state_dict"]))


def test_invalid_config_fails_the_run_before_round_one(tmp_path, capfd):
    code = launch("digits-quick", ["privacy.target-epsilon=-1", "train.batch-size=0"], num_sites=2,
                  runs_dir=tmp_path, quiet=False)
    out = capfd.readouterr()
    assert code == 1
    text = out.out + out.err
    assert "privacy.target-epsilon = -1" in text and "train.batch-size = 0" in text
    assert not any(tmp_path.iterdir())  # no run folder: nothing started


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory):
    """The same job as ``finished_run`` with secure aggregation (SecAgg+, server/secagg.py)."""
    runs = tmp_path_factory.mktemp("secure-runs")
    # The same job also logs each round live to TensorBoard, and to an MLflow server that is not
    # there (port 9): a tracker that fails must not fail or stall the run (issue 23).
    tb = runs / "tensorboard-logs"  # beside the run folders (only those with a run.db are runs)
    code = launch("digits-quick", ["run.num-rounds=3", "strategy.secure-aggregation=true",
                                   f"run.tensorboard-dir={json.dumps(str(tb))}",
                                   'run.mlflow-uri="http://127.0.0.1:9"'], num_sites=3, runs_dir=runs, quiet=True)
    assert code == 0, ("the secure simulation failed; run `python -m simulations.launch --preset digits-quick "
                       "--set strategy.secure-aggregation=true` to see why")
    (run_dir,) = [p for p in runs.iterdir() if (p / "run.db").exists()]
    return run_dir


def _event_accumulator(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_a_run_logs_live_to_tensorboard_and_an_unreachable_mlflow_does_not_stop_it(secure_run):
    ea = _event_accumulator(secure_run.parent / "tensorboard-logs" / secure_run.name)
    assert [e.step for e in ea.Scalars("eval/neg-elbo")] == [0, 1, 2, 3]
    assert [e.step for e in ea.Scalars("privacy/epsilon-max")] == [1, 2, 3]
    assert [e.step for e in ea.Images("samples")] == [0, 1, 2, 3]
    with RunStore.open(secure_run) as store:
        assert store.run_info()["status"] == "completed"


def test_export_to_tensorboard_reads_back_with_tensorboards_own_reader(finished_run, tmp_path):
    for _ in range(2):  # exported twice: the second replaces the first
        result = CliRunner().invoke(cli_app, ["export", "latest", "--runs-dir", str(finished_run.parent),
                                              "--tensorboard", str(tmp_path)])
        assert result.exit_code == 0, result.output
    ea = _event_accumulator(tmp_path / finished_run.name)
    recs = [json.loads(line) for line in (finished_run / "rounds.jsonl").read_text().splitlines()]
    got = [(e.step, e.value) for e in ea.Scalars("eval/neg-elbo")]
    assert got == [(r["round"], pytest.approx(r["eval"]["neg-elbo"], rel=1e-6)) for r in recs]
    assert [e.step for e in ea.Scalars("privacy/site/partition-0/epsilon")] == [1, 2, 3]
    assert [e.step for e in ea.Scalars("sites/ok")] == [0, 1, 2, 3]
    assert [e.step for e in ea.Images("samples")] == [0, 1, 2, 3]
    assert "config/text_summary" in ea.Tags()["tensors"]


def test_export_to_mlflow_reads_back_through_its_client_and_is_idempotent(finished_run, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for _ in range(2):
        result = CliRunner().invoke(cli_app, ["export", "latest", "--runs-dir", str(finished_run.parent),
                                              "--mlflow", uri, "--experiment", "fedgen-test"])
        assert result.exit_code == 0, result.output
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fedgen-test").experiment_id])
    assert run.data.tags["fedgen.run"] == finished_run.name
    history = client.get_metric_history(run.info.run_id, "privacy.epsilon-max")
    assert sorted(m.step for m in history) == [1, 2, 3]  # once each, after two exports
    assert run.data.params["privacy.target-epsilon"] == "8.0"
    assert len(client.list_artifacts(run.info.run_id, "samples")) == 4


def _round_one_model(run_dir) -> dict[str, torch.Tensor]:
    """Round 1's checkpoint, read as the project reads one (verified, tensors only)."""
    return Checkpointer(run_dir, keep=3).load(1).arrays.to_torch_state_dict()


def test_a_secure_simulation_aggregates_what_the_plain_one_does_within_the_quantization_error(
        finished_run, secure_run):
    """Both runs train the same updates in round 1 (the tests' reproducible noise, the same seeds,
    uniform weights under DP): the secure round's model differs from the plain one by no more
    than its stated quantization error of the mean (one step) plus float32 rounding."""
    recs = [json.loads(line) for line in (secure_run / "rounds.jsonl").read_text().splitlines()]
    r1 = recs[1]
    assert r1["secagg"]["reason"] == "" and r1["secagg"]["sent"] == 3 and r1["secagg"]["messages"] == 24
    assert [s["status"] for s in r1["sites"]] == ["ok"] * 3
    plain, secure = _round_one_model(finished_run), _round_one_model(secure_run)
    assert plain.keys() == secure.keys()
    worst = max(float((plain[k].double() - secure[k].double()).abs().max()) for k in plain
                if plain[k].is_floating_point())
    assert 0 < worst <= r1["secagg"]["max-abs-error-bound"] / 3 + 1e-6, worst
    # The privacy figures are the sites' own, as in the plain run.
    assert [r["epsilon_max"] for r in recs[1:]] == pytest.approx(
        [json.loads(x)["epsilon_max"] for x in (finished_run / "rounds.jsonl").read_text().splitlines()[1:]])
