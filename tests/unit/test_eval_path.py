"""data.eval-path: the server's own folder of held-out data, used whole, or a clear error naming the key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.config import ConfigError
from common.data.images import DataError
from common.data.site import eval_dataset
from common.data.text import TextDataError
from tests.conftest import quick_config
from tests.unit.test_image_data import write_fashion


def image_folder(path: Path, n: int, classes: int = 0) -> Path:
    rng = np.random.default_rng(n)
    for i in range(n):
        folder = path / f"class-{i % classes}" if classes else path
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return path


def folder_config(dataset: str, eval_path: Path | str, **overrides):
    family = {"task.family": "lm", "lm.context": 8} if dataset == "text-folder" else {}
    return quick_config(**{"data.dataset": dataset, "data.eval-path": str(eval_path), "data.image-size": 8,
                           **family, **overrides})


def test_an_image_eval_folder_is_used_whole(tmp_path):
    """All 100 images, not the 20 of a holdout split (the issue: 19 of 100 were used)."""
    folder = image_folder(tmp_path / "heldout", 100)
    data, spec = eval_dataset(folder_config("image-folder", folder))
    assert len(data) == 100 and spec.image_size == 8 and spec.num_classes is None
    # data.path (the simulated sites' folder) is not what the server evaluates on.
    sites = image_folder(tmp_path / "sites", 30)
    data, _ = eval_dataset(folder_config("image-folder", folder, **{"data.path": str(sites)}))
    assert len(data) == 100
    # Without data.eval-path, today's behaviour: the 20% holdout of data.path.
    data, _ = eval_dataset(quick_config(**{"data.dataset": "image-folder", "data.path": str(folder),
                                           "data.image-size": 8}))
    assert len(data) == 20


def test_an_eval_folder_is_capped_by_eval_max_examples(tmp_path):
    folder = image_folder(tmp_path / "heldout", 40, classes=4)
    data, spec = eval_dataset(folder_config("image-folder", folder, **{"data.eval-max-examples": 25}))
    images, labels = data.tensors
    assert len(data) == 25 and spec.num_classes == 4 and set(labels.tolist()) <= {0, 1, 2, 3}
    again, _ = eval_dataset(folder_config("image-folder", folder, **{"data.eval-max-examples": 25}))
    assert (again.tensors[0] == images).all()  # the same draw (run.seed)


def test_a_fashion_eval_folder_uses_all_of_its_test_files(tmp_path):
    write_fashion(tmp_path, n=7, hw=(28, 28), prefix="t10k")
    data, spec = eval_dataset(folder_config("fashion-mnist", tmp_path, **{"data.image-size": 0}))
    assert len(data) == 7 and spec.num_classes == 10 and spec.image_size == 28


def test_a_text_eval_folder_is_all_held_out(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 90)
    (tmp_path / "b.txt").write_text("y" * 9)
    data, spec = eval_dataset(folder_config("text-folder", tmp_path))
    assert spec.kind == "text" and len(data) == (100 - 8 - 1) // 8 + 1  # 100 chars joined by "\n", all of them


@pytest.mark.parametrize("dataset", ["image-folder", "fashion-mnist", "text-folder"])
def test_an_eval_path_that_is_missing_or_not_a_folder_names_the_key(tmp_path, dataset):
    error = TextDataError if dataset == "text-folder" else DataError
    with pytest.raises(error, match=r"data\.eval-path = '.*nowhere' does not exist: set it to the server's own"):
        eval_dataset(folder_config(dataset, tmp_path / "nowhere"))
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(error, match=r"data\.eval-path = '.*file\.png' is not a folder"):
        eval_dataset(folder_config(dataset, tmp_path / "file.png"))


@pytest.mark.parametrize(("dataset", "message"), [
    ("image-folder", r"contains no images .*set data\.eval-path to a folder of images"),
    ("fashion-mnist", r"t10k-images-idx3-ubyte\.gz .*set data\.eval-path to a folder with the Fashion-MNIST IDX test"),
    ("text-folder", r"no \.txt files in .*\(data\.eval-path\)"),
], ids=["image-folder", "fashion-mnist", "text-folder"])
def test_an_eval_folder_without_a_usable_file_names_the_key(tmp_path, dataset, message):
    (tmp_path / "notes.md").write_text("nothing to evaluate on")
    write_fashion(tmp_path, n=3, prefix="train")  # training files only: not the server's test files
    with pytest.raises((DataError, TextDataError), match=message):
        eval_dataset(folder_config(dataset, tmp_path))


def test_an_unreadable_file_in_the_eval_folder_names_the_key(tmp_path):
    image_folder(tmp_path, 3)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"^data\.eval-path = '.*': cannot read image .*broken\.png"):
        eval_dataset(folder_config("image-folder", tmp_path))
    (tmp_path / "t.txt").write_text("too short")  # fewer tokens than one window of lm.context = 64
    with pytest.raises(TextDataError, match=r"^data\.eval-path = '.*': the text has"):
        eval_dataset(folder_config("text-folder", tmp_path, **{"lm.context": 64}))


@pytest.mark.parametrize(("dataset", "family"), [("digits", "vae"), ("shakespeare", "lm")])
def test_eval_path_with_a_bundled_dataset_is_a_config_error_naming_the_fix(tmp_path, dataset, family):
    with pytest.raises(ConfigError, match=rf"data\.eval-path = .*data\.dataset = '{dataset}' is bundled.*"
                                          r"remove data\.eval-path, or use data\.dataset = 'image-folder'"):
        quick_config(**{"data.dataset": dataset, "task.family": family, "data.eval-path": str(tmp_path)})
