"""`fedgen generate`: synthetic data from a run's final model or a checkpoint, on tiny run folders
written without Flower (a freshly built task saved as the server saves it)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg
from PIL import Image
from typer.testing import CliRunner

from cli.app import app
from server.evaluation import TEXT_SEPARATOR
from common import records as R
from common.config import AppConfig
from common.data.tokenizers import make_tokenizer
from common.models.lm import PROMPTS
from common.tasks import DataSpec, build_task
from server.checkpoints import Checkpointer
from server.run_model import FINAL_MODEL, draw, load_run_model, save_model, to_uint8
from server.store import RunStore
from tests.conftest import ROOT, quick_config

DIGITS = DataSpec(kind="image", image_size=8, channels=1, num_classes=10)  # what the server's eval data gives


def preset(name: str, **overrides) -> AppConfig:
    return quick_config(**{**tomllib.loads((ROOT / "simulations" / f"{name}.toml").read_text()), **overrides})


def vae_cfg() -> AppConfig:
    return quick_config()


def cgan_cfg() -> AppConfig:
    return preset("gan-digits", **{"gan.conditional": True})


def lm_cfg() -> AppConfig:
    return preset("lm-quick", **{"lm.sample-length": 12})


def lm_spec(cfg: AppConfig) -> DataSpec:
    return DataSpec(kind="text", vocab_size=make_tokenizer(cfg.lm.tokenizer).vocab_size)


def shifted(state: dict[str, torch.Tensor], by: float) -> dict[str, torch.Tensor]:
    return {k: v + by if v.is_floating_point() else v for k, v in state.items()}


def make_run(runs_dir: Path, run_id: str, cfg: AppConfig, spec: DataSpec, *, final: bool = True,
             checkpoints: tuple[int, ...] = (), checkpoint_spec: bool = True,
             status: str = "completed") -> dict[int | None, dict[str, torch.Tensor]]:
    """A run folder as the server leaves it: run.db, config.json, checkpoints of ``checkpoints``
    (weights shifted by 0.01 x round, so that each round samples differently) and, with ``final``,
    final_model.pt. Returns the weights saved, by round (None: the final model)."""
    store = RunStore.create(runs_dir, run_id, config=cfg.to_flat(), model=cfg.task.family, strategy="fedavg",
                            num_rounds=cfg.run.num_rounds)
    run_dir = store.run_dir
    (run_dir / "config.json").write_text(json.dumps(cfg.to_flat(), indent=1, sort_keys=True))
    state = dict(R.state_dict_of(build_task(cfg, spec).modules))
    saved: dict[int | None, dict[str, torch.Tensor]] = {}
    checkpointer = Checkpointer(run_dir, keep=5)
    for rnd in checkpoints:
        saved[rnd] = shifted(state, 0.01 * rnd)
        checkpointer.save(rnd, ArrayRecord(torch_state_dict=saved[rnd]), FedAvg(), cfg,
                          spec if checkpoint_spec else None)
    if final:
        saved[None] = state
        save_model(run_dir / FINAL_MODEL, state, cfg, spec)
    if status != "running":
        store.set_status(status, "boom" if status == "failed" else None)
    store.close()
    return saved


def expected_images(cfg: AppConfig, spec: DataSpec, state, n: int, seed: int, labels=None) -> np.ndarray:
    task = build_task(cfg, spec)
    R.load_arrayrecord(task.modules, ArrayRecord(torch_state_dict=state))
    return to_uint8(task.sample(n, seed, labels=labels))


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    runs_dir = tmp_path / "runs"
    make_run(runs_dir, "vae-run", vae_cfg(), DIGITS, checkpoints=(1, 2))
    make_run(runs_dir, "cgan-run", cgan_cfg(), DIGITS)
    make_run(runs_dir, "lm-run", lm_cfg(), lm_spec(lm_cfg()))
    return runs_dir


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env={"FEDGEN_RUNS_DIR": None, "COLUMNS": "200", "NO_COLOR": "1"})


def gen(runner: CliRunner, runs_dir: Path, *args: str):
    return runner.invoke(app, ["generate", *args, "--runs-dir", str(runs_dir)])


def ok(result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result.stdout


def error_line(result) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert result.stdout == "" and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def pngs(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


# --------------------------------------------------------------------------- images


def test_vae_writes_n_pngs_reproducibly_for_a_seed(runner, runs: Path, tmp_path: Path) -> None:
    out = ok(gen(runner, runs, "vae-run", "-n", "12", "-o", str(tmp_path / "a")))
    assert "12 images from run vae-run (final model, seed 0)" in out
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == [f"{i:05d}.png" for i in range(12)]
    images = pngs(tmp_path / "a")
    assert all(im.shape == (8, 8) and im.dtype == np.uint8 for im in images)  # native size, greyscale
    ok(gen(runner, runs, "vae-run", "-n", "12", "-o", str(tmp_path / "b")))
    ok(gen(runner, runs, "vae-run", "-n", "12", "-o", str(tmp_path / "c"), "--seed", "1"))
    assert all(np.array_equal(x, y) for x, y in zip(images, pngs(tmp_path / "b")))
    assert not all(np.array_equal(x, y) for x, y in zip(images, pngs(tmp_path / "c")))
    # One batch is the family's own sample(n, seed) of the final model's weights.
    want = expected_images(vae_cfg(), DIGITS, load_final_state(runs / "vae-run"), 12, 0)
    assert np.array_equal(np.stack(images)[:, None], want)


def load_final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / FINAL_MODEL, weights_only=True)["state_dict"]


def test_vae_npz_in_batches_matches_the_pngs_of_the_same_seed_and_batch_size(runner, runs: Path,
                                                                             tmp_path: Path) -> None:
    result = json.loads(ok(gen(runner, runs, "vae", "-n", "7", "--batch-size", "3", "--seed", "5",
                               "-o", str(tmp_path / "s.npz"), "--json")))
    assert result["run_id"] == "vae-run" and result["format"] == "npz" and result["class_counts"] is None
    with np.load(tmp_path / "s.npz") as archive:
        assert set(archive.files) == {"images"}  # unconditional: no labels
        images = archive["images"]
    assert images.shape == (7, 1, 8, 8) and images.dtype == np.uint8
    ok(gen(runner, runs, "vae", "-n", "7", "--batch-size", "3", "--seed", "5", "-o", str(tmp_path / "d")))
    assert np.array_equal(np.stack(pngs(tmp_path / "d"))[:, None], images)
    assert len({images[i].tobytes() for i in range(7)}) == 7  # every batch draws its own latents


def test_conditional_gan_writes_balanced_class_folders_and_labels(runner, runs: Path, tmp_path: Path) -> None:
    out = ok(gen(runner, runs, "cgan-run", "-n", "25", "--batch-size", "7", "-o", str(tmp_path / "g")))
    assert "10 classes (2-3 each)" in out
    folders = sorted(p.name for p in (tmp_path / "g").iterdir())
    assert folders == [str(c) for c in range(10)]
    counts = {c: sorted(p.name for p in (tmp_path / "g" / c).iterdir()) for c in folders}
    assert {c: len(v) for c, v in counts.items()} == {str(c): 3 if c < 5 else 2 for c in range(10)}
    assert counts["0"] == ["00000.png", "00001.png", "00002.png"]

    summary = json.loads(ok(gen(runner, runs, "cgan-run", "-n", "25", "--batch-size", "7",
                                "-o", str(tmp_path / "g.npz"), "--json")))
    assert summary["class_counts"] == {str(c): 3 if c < 5 else 2 for c in range(10)}
    with np.load(tmp_path / "g.npz") as archive:
        images, labels = archive["images"], archive["labels"]
    assert images.shape == (25, 1, 8, 8) and images.dtype == np.uint8 and labels.shape == (25,)
    assert np.array_equal(np.bincount(labels, minlength=10), [3] * 5 + [2] * 5)
    # The folder and the archive hold the same images under the same classes.
    for i, (image, label) in enumerate(zip(images, labels)):
        png = np.asarray(Image.open(tmp_path / "g" / str(label) / f"{i // 10:05d}.png"))
        assert np.array_equal(png, image[0])
    # The first batch is sample(7, seed 0) with those labels.
    want = expected_images(cgan_cfg(), DIGITS, load_final_state(runs / "cgan-run"), 7, 0, torch.arange(7))
    assert np.array_equal(images[:7], want)


# --------------------------------------------------------------------------- text


def test_lm_writes_n_text_samples_reproducibly(runner, runs: Path, tmp_path: Path) -> None:
    ok(gen(runner, runs, "lm-run", "-n", "10", "--batch-size", "4", "-o", str(tmp_path / "a.txt")))
    ok(gen(runner, runs, "lm-run", "-n", "10", "--batch-size", "4", "-o", str(tmp_path / "b.txt")))
    text = (tmp_path / "a.txt").read_text()
    samples = text.split(TEXT_SEPARATOR)
    assert len(samples) == 10 and text == (tmp_path / "b.txt").read_text()
    assert samples[0].startswith(PROMPTS[0]) and samples[4].startswith(PROMPTS[0])  # prompts cycle per batch
    ok(gen(runner, runs, "lm-run", "-n", "10", "--batch-size", "4", "--seed", "3", "-o", str(tmp_path / "c.txt")))
    assert (tmp_path / "c.txt").read_text() != text


# --------------------------------------------------------------------------- --round


def test_round_takes_the_checkpoint_weights(runner, tmp_path: Path) -> None:
    runs_dir = tmp_path / "runs"
    saved = make_run(runs_dir, "vae-run", vae_cfg(), DIGITS, checkpoints=(1, 2))
    out = ok(gen(runner, runs_dir, "latest", "-n", "4", "--round", "1", "-o", str(tmp_path / "r1.npz")))
    assert "(round 1, seed 0)" in out
    with np.load(tmp_path / "r1.npz") as archive:
        got = archive["images"]
    assert np.array_equal(got, expected_images(vae_cfg(), DIGITS, saved[1], 4, 0))
    assert not np.array_equal(got, expected_images(vae_cfg(), DIGITS, saved[None], 4, 0))

    line = error_line(gen(runner, runs_dir, "latest", "-n", "4", "--round", "7", "-o", str(tmp_path / "r7.npz")))
    assert "no checkpoint of round 7" in line and "(checkpoints of rounds 1, 2)" in line
    assert not (tmp_path / "r7.npz").exists()


def test_a_checkpoint_without_its_data_spec_takes_it_from_the_final_model_or_the_data(runner, tmp_path: Path) -> None:
    """Checkpoints written before they carried the data spec still load."""
    runs_dir = tmp_path / "runs"
    saved = make_run(runs_dir, "old-run", vae_cfg(), DIGITS, checkpoints=(1,), checkpoint_spec=False)
    model = load_run_model(runs_dir / "old-run", 1)
    assert model.task.spec == DIGITS and model.round == 1
    (runs_dir / "old-run" / FINAL_MODEL).unlink()  # no final model: the spec of the run's data (digits)
    assert load_run_model(runs_dir / "old-run", 1).task.spec == DIGITS
    ok(gen(runner, runs_dir, "old-run", "-n", "2", "--round", "1", "-o", str(tmp_path / "o.npz")))
    with np.load(tmp_path / "o.npz") as archive:
        assert np.array_equal(archive["images"], expected_images(vae_cfg(), DIGITS, saved[1], 2, 0))


def test_draw_balances_classes_and_keeps_batches_bounded() -> None:
    task = build_task(cgan_cfg(), DIGITS)
    batches = list(draw(task, 23, seed=0, batch_size=5))
    assert [len(b.samples) for b in batches] == [5, 5, 5, 5, 3] and [b.start for b in batches] == [0, 5, 10, 15, 20]
    labels = np.concatenate([b.labels for b in batches])
    assert np.array_equal(labels, np.arange(23) % 10)
    with pytest.raises(ValueError):
        next(draw(task, 0, seed=0, batch_size=5))


# --------------------------------------------------------------------------- runs without a model


def test_a_run_without_final_model_names_what_it_has(runner, tmp_path: Path) -> None:
    runs_dir = tmp_path / "runs"
    make_run(runs_dir, "live-run", vae_cfg(), DIGITS, final=False, checkpoints=(1, 2), status="running")
    line = error_line(gen(runner, runs_dir, "live-run", "-n", "3", "-o", str(tmp_path / "x")))
    assert "run live-run has no final_model.pt (status running" in line
    assert "checkpoints of rounds 1, 2: use --round 2" in line
    make_run(runs_dir, "dead-run", vae_cfg(), DIGITS, final=False, status="failed")
    line = error_line(gen(runner, runs_dir, "dead-run", "-n", "3", "-o", str(tmp_path / "x")))
    assert "(status failed: boom" in line and "no checkpoints either" in line
    audit = quick_config(**{"audit.user-canaries": 40, "central-dp.enabled": True})
    make_run(runs_dir, "audit-run", audit, DIGITS, final=False)
    line = error_line(gen(runner, runs_dir, "audit-run", "-n", "3", "-o", str(tmp_path / "x")))
    assert "an audit run's model holds its canaries and is never saved" in line
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- arguments and outputs


@pytest.mark.parametrize(("args", "expect"), [
    (["vae-run", "-n", "0", "-o", "{tmp}/x"], "-n must be at least 1, got 0"),
    (["vae-run", "-n", "-3", "-o", "{tmp}/x"], "-n must be at least 1, got -3"),
    (["vae-run", "-n", "2", "--batch-size", "0", "-o", "{tmp}/x"], "--batch-size must be at least 1"),
    (["vae-run", "-n", "2", "-o", "{tmp}/x.txt"], "the vae model draws images: give -o a folder (PNGs) or a .npz"),
    (["vae-run", "-n", "2", "-o", "{tmp}/x.png"], "the vae model draws images"),
    (["lm-run", "-n", "2", "-o", "{tmp}/x.npz"], "the lm model writes text: give -o a .txt file"),
    (["lm-run", "-n", "2", "-o", "{tmp}/x"], "the lm model writes text"),
    (["nope", "-n", "2", "-o", "{tmp}/x"], "no run matching 'nope'"),
    (["vae-run", "-n", "2", "-o", "{runs}/vae-run/samples"], "is inside the run folder"),
])
def test_bad_requests_are_one_red_line(runner, runs: Path, tmp_path: Path, args, expect) -> None:
    line = error_line(gen(runner, runs, *(a.format(tmp=tmp_path, runs=runs) for a in args)))
    assert expect in line
    assert not (tmp_path / "x").exists() and not (runs / "vae-run" / "samples").exists()


def test_an_existing_output_needs_force(runner, runs: Path, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    ok(gen(runner, runs, "vae-run", "-n", "5", "-o", str(folder)))
    (folder / "notes.md").write_text("mine")
    line = error_line(gen(runner, runs, "vae-run", "-n", "2", "-o", str(folder)))
    assert "is not empty; use --force" in line
    ok(gen(runner, runs, "vae-run", "-n", "2", "-o", str(folder), "--force"))
    # The earlier PNGs are replaced (none left over from the larger N); other files stay.
    assert sorted(p.name for p in folder.iterdir()) == ["00000.png", "00001.png", "notes.md"]

    archive = tmp_path / "s.npz"
    ok(gen(runner, runs, "vae-run", "-n", "3", "-o", str(archive)))
    assert "exists; use --force" in error_line(gen(runner, runs, "vae-run", "-n", "2", "-o", str(archive)))
    ok(gen(runner, runs, "vae-run", "-n", "2", "-o", str(archive), "--force"))
    with np.load(archive) as a:
        assert a["images"].shape[0] == 2
    (tmp_path / "plain").write_text("a file, not a folder")
    assert "is a file" in error_line(gen(runner, runs, "vae-run", "-n", "2", "-o", str(tmp_path / "plain")))
    (tmp_path / "dir.npz").mkdir()
    assert "is a folder" in error_line(gen(runner, runs, "vae-run", "-n", "2", "-o", str(tmp_path / "dir.npz"),
                                           "--force"))


def test_generate_writes_nothing_into_the_run_folder(runner, runs: Path, tmp_path: Path) -> None:
    def listing() -> dict[str, int]:
        return {str(p.relative_to(runs)): p.stat().st_mtime_ns for p in runs.rglob("*")}

    before = listing()
    ok(gen(runner, runs, "vae-run", "-n", "3", "-o", str(tmp_path / "a")))
    ok(gen(runner, runs, "vae-run", "-n", "3", "--round", "2", "-o", str(tmp_path / "b.npz")))
    ok(gen(runner, runs, "lm-run", "-n", "2", "-o", str(tmp_path / "c.txt")))
    assert listing() == before
