"""Image loaders: IDX parsing/validation, real Fashion-MNIST, sklearn digits, image folders."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.data.images import (
    FASHION_MNIST_DIR,
    DataError,
    ImageDataset,
    load_digits,
    load_fashion_mnist,
    load_image_folder,
    load_images,
)

RNG = np.random.default_rng(0)


def idx_bytes(magic: int, arr: np.ndarray) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_fashion(
    root: Path, n: int = 3, hw: tuple[int, int] = (4, 5), gz: bool = True, prefix: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    images = RNG.integers(0, 256, size=(n, *hw), dtype=np.uint8)
    labels = RNG.integers(0, 10, size=n, dtype=np.uint8)
    for name, magic, arr in (
        (f"{prefix}-images-idx3-ubyte", 2051, images),
        (f"{prefix}-labels-idx1-ubyte", 2049, labels),
    ):
        data = idx_bytes(magic, arr)
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (root / name).write_bytes(data)
    return images, labels


# --------------------------------------------------------------------------- IDX parsing


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_parse_to_dataset(tmp_path: Path, gz: bool) -> None:
    images, labels = write_fashion(tmp_path, n=3, hw=(4, 5), gz=gz)
    t_images, t_labels = write_fashion(tmp_path, n=2, hw=(4, 5), gz=gz, prefix="t10k")

    ds = load_fashion_mnist(tmp_path, "train")
    assert ds.images.shape == (3, 1, 4, 5) and ds.images.dtype == torch.float32
    np.testing.assert_allclose(ds.images[:, 0].numpy(), images / 255.0, rtol=0, atol=1e-7)
    assert ds.labels is not None and ds.labels.dtype == torch.int64
    assert ds.labels.tolist() == labels.tolist()
    assert ds.num_classes == 10 and len(ds) == 3

    test = load_fashion_mnist(tmp_path, "test")
    assert test.images.shape == (2, 1, 4, 5)
    assert test.labels is not None and test.labels.tolist() == t_labels.tolist()


def test_fashion_mnist_is_cached_per_root_and_split(tmp_path: Path) -> None:
    write_fashion(tmp_path)
    a = load_fashion_mnist(tmp_path, "train")
    assert load_fashion_mnist(str(tmp_path) + "/", "train") is a  # str/Path/trailing slash: one key
    other = tmp_path / "other"
    write_fashion(other, n=5)
    assert len(load_fashion_mnist(other, "train")) == 5


def test_load_images_fashion_resize_is_cached(tmp_path: Path) -> None:
    write_fashion(tmp_path, n=3, hw=(28, 28))
    native = load_images("fashion-mnist", str(tmp_path), "train", None)
    assert load_images("fashion-mnist", str(tmp_path), "train", 28) is native  # no second copy
    big = load_images("fashion-mnist", str(tmp_path), "train", 32)
    assert big.images.shape == (3, 1, 32, 32) and torch.equal(big.labels, native.labels)
    assert 0.0 <= float(big.images.min()) and float(big.images.max()) <= 1.0
    assert load_images("fashion-mnist", str(tmp_path), "train", 32) is big


def test_truncated_gz_idx_raises_with_path(tmp_path: Path) -> None:
    write_fashion(tmp_path, n=4)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    full = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(full[:-7]))  # valid gzip, short payload
    with pytest.raises(DataError) as exc:
        load_fashion_mnist(tmp_path, "train")
    msg = str(exc.value)
    assert str(path) in msg and "truncated" in msg
    assert "apt-get install --reinstall dataset-fashion-mnist" in msg and "data.path" in msg


def test_cut_gzip_stream_raises_with_path(tmp_path: Path) -> None:
    write_fashion(tmp_path, n=50, hw=(28, 28))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])  # gzip stream itself cut off
    with pytest.raises(DataError, match="truncated or corrupt") as exc:
        load_fashion_mnist(tmp_path, "train")
    assert str(path) in str(exc.value)


def test_truncated_plain_idx_raises(tmp_path: Path) -> None:
    write_fashion(tmp_path, gz=False)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DataError, match="truncated") as exc:
        load_fashion_mnist(tmp_path, "train")
    assert str(path) in str(exc.value)


def test_wrong_magic_raises(tmp_path: Path) -> None:
    write_fashion(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(2051, np.zeros((3, 4, 5)))))  # images file as labels
    with pytest.raises(DataError, match="magic number 2051, expected 2049") as exc:
        load_fashion_mnist(tmp_path, "train")
    assert str(path) in str(exc.value)


def test_image_label_count_mismatch_raises(tmp_path: Path) -> None:
    write_fashion(tmp_path, n=3)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(2049, np.zeros(2)))
    )
    with pytest.raises(DataError, match="3 images but .* 2 labels"):
        load_fashion_mnist(tmp_path, "train")


def test_missing_dir_raises_with_path_and_install_hint(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as exc:
        load_fashion_mnist(missing, "train")
    msg = str(exc.value)
    assert str(missing) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "data.path" in msg


def test_missing_file_raises_with_exact_path(tmp_path: Path) -> None:
    write_fashion(tmp_path)  # train only
    with pytest.raises(DataError) as exc:
        load_fashion_mnist(tmp_path, "test")
    msg = str(exc.value)
    assert str(tmp_path / "t10k-images-idx3-ubyte.gz") in msg
    assert "apt-get install dataset-fashion-mnist" in msg


def test_real_fashion_mnist() -> None:
    root = Path(FASHION_MNIST_DIR)
    if not root.is_dir():
        pytest.fail(
            f"{root} is missing: the project setup must install it "
            "(`sudo apt-get install dataset-fashion-mnist`)"
        )
    for split, n in (("train", 60000), ("test", 10000)):
        ds = load_images("fashion-mnist", None, split, None)
        assert ds.images.shape == (n, 1, 28, 28) and ds.images.dtype == torch.float32
        assert 0.0 <= float(ds.images.min()) and float(ds.images.max()) <= 1.0
        assert float(ds.images.max()) > 0.99  # really scaled by 255, not 255*255
        assert ds.labels is not None and sorted(ds.labels.unique().tolist()) == list(range(10))
        assert ds.labels.bincount().tolist() == [n // 10] * 10  # Fashion-MNIST is balanced


# --------------------------------------------------------------------------- digits


def _sorted_rows(x: torch.Tensor) -> np.ndarray:
    rows = x.reshape(len(x), -1).numpy()
    return rows[np.lexsort(rows.T[::-1])]


def test_digits_full() -> None:
    ds = load_digits()
    assert ds.images.shape == (1797, 1, 8, 8) and ds.num_classes == 10
    assert float(ds.images.min()) == 0.0 and float(ds.images.max()) == 1.0


def test_digits_train_test_split_is_disjoint_80_20_and_deterministic() -> None:
    full = load_digits()
    train = load_images("digits", None, "train", None)
    test = load_images("digits", None, "test", None)
    assert (len(train), len(test)) == (1438, 359)  # round(0.2 * 1797) = 359
    assert train.images.shape[1:] == (1, 8, 8)
    assert 0.0 <= float(train.images.min()) and float(test.images.max()) <= 1.0
    # train + test is exactly the full dataset as a multiset -> disjoint and covering
    both = torch.cat([train.images, test.images])
    np.testing.assert_array_equal(_sorted_rows(both), _sorted_rows(full.images))
    assert train.labels is not None and test.labels is not None
    assert sorted(torch.cat([train.labels, test.labels]).tolist()) == sorted(full.labels.tolist())
    again = load_images("digits", None, "test", None)
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)


def test_digits_resize() -> None:
    ds = load_images("digits", None, "test", 28)
    assert ds.images.shape == (359, 1, 28, 28)
    assert 0.0 <= float(ds.images.min()) and float(ds.images.max()) <= 1.0


# --------------------------------------------------------------------------- image folder


def _png(path: Path, value: int, size: tuple[int, int] = (10, 6), mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, value, value)
    Image.new(mode, size, color).save(path)


def test_flat_image_folder(tmp_path: Path) -> None:
    for i, v in enumerate([0, 128, 255]):
        _png(tmp_path / f"img{i}.png", v)
    (tmp_path / "notes.txt").write_text("ignored")
    ds = load_image_folder(tmp_path, 4)
    assert ds.images.shape == (3, 1, 4, 4) and ds.labels is None and ds.num_classes is None
    means = ds.images.mean(dim=(1, 2, 3)).tolist()
    assert means == pytest.approx([0.0, 128 / 255, 1.0], abs=1e-6)


def test_class_subfolders_give_labels(tmp_path: Path) -> None:
    _png(tmp_path / "cat" / "a.png", 10)
    _png(tmp_path / "cat" / "b.jpg", 20, mode="RGB")
    _png(tmp_path / "dog" / "c.jpeg", 200, mode="RGB")
    ds = load_image_folder(tmp_path, 8)
    assert ds.images.shape == (3, 1, 8, 8) and ds.num_classes == 2
    assert ds.labels is not None and ds.labels.tolist() == [0, 0, 1]
    assert float(ds.images[2].mean()) == pytest.approx(200 / 255, abs=0.02)  # RGB -> gray


def test_corrupt_image_names_file(tmp_path: Path) -> None:
    _png(tmp_path / "good.png", 50)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError) as exc:
        load_image_folder(tmp_path, 4)
    assert str(bad) in str(exc.value)


def test_empty_and_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match="no images") as exc:
        load_image_folder(tmp_path, 4)
    assert str(tmp_path) in str(exc.value)
    with pytest.raises(DataError, match="not found"):
        load_image_folder(tmp_path / "missing", 4)


def test_mixed_folder_layout_rejected(tmp_path: Path) -> None:
    _png(tmp_path / "top.png", 1)
    _png(tmp_path / "cls" / "x.png", 2)
    with pytest.raises(DataError, match="mixes"):
        load_image_folder(tmp_path, 4)


def test_image_folder_holdout_split(tmp_path: Path) -> None:
    for i in range(10):
        _png(tmp_path / f"{i:02d}.png", i * 20)
    train = load_images("image-folder", str(tmp_path), "train", 4)
    test = load_images("image-folder", str(tmp_path), "test", 4)
    assert (len(train), len(test)) == (8, 2)
    values = sorted(train.images.mean(dim=(1, 2, 3)).tolist() + test.images.mean(dim=(1, 2, 3)).tolist())
    assert values == pytest.approx([i * 20 / 255 for i in range(10)], abs=1e-6)
    with pytest.raises(ValueError, match="image_size"):
        load_images("image-folder", str(tmp_path), "train", None)


# --------------------------------------------------------------------------- dataset / dispatch


def test_subset_and_validation() -> None:
    x = torch.arange(5, dtype=torch.float32).reshape(5, 1, 1, 1) / 4
    ds = ImageDataset(x, torch.arange(5), "toy", 5)
    sub = ds.subset(np.array([4, 1]))
    assert sub.images.flatten().tolist() == [1.0, 0.25] and sub.labels.tolist() == [4, 1]
    assert sub.name == "toy" and len(sub) == 2
    assert ds.subset([True, False, True, False, False]).labels.tolist() == [0, 2]
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        ImageDataset(torch.zeros(2, 3, 4, 4), None, "rgb", None)
    with pytest.raises(ValueError, match="labels must be int64"):
        ImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(3, dtype=torch.int64), "bad", 1)


def test_load_images_rejects_unknown_dataset_and_split() -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        load_images("cifar", None, "train", None)
    with pytest.raises(ValueError, match="split"):
        load_images("digits", None, "validation", None)
