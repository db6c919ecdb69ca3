"""What data a site trains on and what the server evaluates on, from the config.

Sites get their partition of the training split (or their own folder); the server
gets the held-out split, which no site ever sees, or the whole of its own folder
(``data.eval-path``). Public text (:func:`public_dataset`, ``data.public-plays``) is
neither: whole plays no site holds and the server never scores, to pretrain on.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from common.config import AppConfig, SiteConfig
from common.data.images import DataError, ImageDataset, load_image_folder, load_images
from common.data.partition import partition_for_site
from common.data.shakespeare import shakespeare_public_text, shakespeare_split, site_text
from common.data.text import TextDataError, TokenBlocks, load_text_folder
from common.data.tokenizers import make_tokenizer
from common.tasks import DataSpec

IMAGE_DATASETS = ("digits", "fashion-mnist", "image-folder")
DEFAULT_FOLDER_IMAGE_SIZE = 28
TEXT_DATASETS = ("shakespeare", "text-folder")
TEXT_HOLDOUT_FRACTION = 0.2  # text-folder: the server evaluates on the last 20% of data.path's text
EVAL_PATH = "data.eval-path"
#: What the server's own folder (data.eval-path) holds, by dataset.
EVAL_FOLDER_HOLDS = {"image-folder": "PNG/JPEG images (flat, or one subfolder per class)",
                     "fashion-mnist": "the Fashion-MNIST IDX test files (t10k-images-idx3-ubyte.gz, "
                                      "t10k-labels-idx1-ubyte.gz)",
                     "text-folder": "UTF-8 .txt files"}


def _size(cfg: AppConfig) -> int | None:
    """Requested image size; None keeps the dataset's own (folders need one: 28)."""
    if cfg.data.image_size:
        return cfg.data.image_size
    return DEFAULT_FOLDER_IMAGE_SIZE if cfg.data.dataset == "image-folder" else None


def _image_spec(ds: ImageDataset) -> DataSpec:
    return DataSpec(kind="image", image_size=ds.images.shape[-1], channels=ds.images.shape[1], num_classes=ds.num_classes)


def _as_torch(ds: ImageDataset) -> TensorDataset:
    labels = ds.labels if ds.labels is not None else torch.zeros(len(ds), dtype=torch.long)
    return TensorDataset(ds.images, labels)


def _text_blocks(cfg: AppConfig, text: str) -> tuple[TokenBlocks, DataSpec]:
    """Encode with the task's tokenizer (lm.tokenizer) and cut into lm.context windows."""
    tok = make_tokenizer(cfg.lm.tokenizer)
    return TokenBlocks(tok.encode(text), cfg.lm.context), DataSpec(kind="text", vocab_size=tok.vocab_size)


def _text_folder_corpus(cfg: AppConfig) -> tuple[str, str]:
    """(train, held-out) text of a run-wide text folder (data.path): the first 80% and the last 20%."""
    if not cfg.data.path:
        raise TextDataError("data.dataset = 'text-folder' needs data.path (a folder of UTF-8 .txt files) "
                            "unless every site sets its own data-path")
    text = load_text_folder(cfg.data.path)
    cut = int(len(text) * (1 - TEXT_HOLDOUT_FRACTION))
    return text[:cut], text[cut:]


def _site_text(cfg: AppConfig, site: SiteConfig) -> str:
    """A site's own folder; else its role corpora (shakespeare) or contiguous slice (text-folder)."""
    d = cfg.data
    if site.data_path:
        return load_text_folder(site.data_path)  # all of it is the site's training text
    num_partitions = d.num_partitions or site.num_partitions
    if site.partition_id >= num_partitions:
        raise ValueError(f"partition-id {site.partition_id} is not below data.num-partitions {num_partitions}")
    if d.dataset == "shakespeare":
        return site_text(site.partition_id, num_partitions, heldout_plays=d.heldout_plays, seed=cfg.run.seed,
                         min_chars=d.min_chars, public_plays=d.public_plays)
    train, _ = _text_folder_corpus(cfg)
    size = len(train) // num_partitions
    return train[site.partition_id * size:(site.partition_id + 1) * size]


def public_dataset(cfg: AppConfig) -> tuple[TokenBlocks, DataSpec]:
    """The public text (shakespeare with data.public-plays > 0) as lm.context windows: what a
    model may be pretrained on without privacy, disjoint from every site's text and the server's."""
    d = cfg.data
    if d.dataset != "shakespeare" or not d.public_plays:
        raise TextDataError("pretraining needs public text: data.dataset = 'shakespeare' with data.public-plays "
                            f"> 0 (got data.dataset = {d.dataset!r}, data.public-plays = {d.public_plays})")
    return _text_blocks(cfg, shakespeare_public_text(d.heldout_plays, d.public_plays, cfg.run.seed))


def site_dataset(cfg: AppConfig, site: SiteConfig) -> tuple[Dataset, DataSpec]:
    """The training data this site holds: its partition, or its own folder."""
    d = cfg.data
    if d.dataset in TEXT_DATASETS:
        return _text_blocks(cfg, _site_text(cfg, site))
    if d.dataset not in IMAGE_DATASETS:
        raise NotImplementedError(f"data.dataset = {d.dataset!r} is not an image dataset")
    if site.data_path:
        # A site's own data: all of it is the site's training set (no partitioning, no holdout).
        if d.dataset == "image-folder":
            ds = load_image_folder(site.data_path, _size(cfg))
        elif d.dataset == "digits":
            raise ValueError(
                f"node config data-path = {site.data_path!r}, but data.dataset = 'digits' is the copy bundled "
                "with scikit-learn and cannot come from a folder; use data.dataset = 'image-folder' for a "
                "folder of images, or remove data-path"
            )
        else:
            ds = load_images(d.dataset, site.data_path, "train", _size(cfg))
    else:
        full = load_images(d.dataset, d.path or None, "train", _size(cfg))
        num_partitions = d.num_partitions or site.num_partitions
        if site.partition_id >= num_partitions:
            raise ValueError(f"partition-id {site.partition_id} is not below data.num-partitions {num_partitions}")
        ds = partition_for_site(full, site.partition_id, num_partitions, d.partitioner, seed=cfg.run.seed,
                                alpha=d.dirichlet_alpha)
    return _as_torch(ds), _image_spec(ds)


def _eval_folder_images(cfg: AppConfig) -> ImageDataset:
    """All of the server's own folder (data.eval-path): no holdout split, every image is held out."""
    d = cfg.data
    if d.dataset == "image-folder":
        return load_image_folder(d.eval_path, _size(cfg), EVAL_PATH)
    return load_images(d.dataset, d.eval_path, "test", _size(cfg), EVAL_PATH)  # fashion-mnist: its t10k files


def _checked_eval_folder(cfg: AppConfig) -> None:
    """A clear error, naming data.eval-path, when it is not a folder (the loaders check its files)."""
    path = Path(cfg.data.eval_path).expanduser()
    if not path.is_dir():
        problem = "is not a folder" if path.exists() else "does not exist"
        error = TextDataError if cfg.data.dataset in TEXT_DATASETS else DataError
        raise error(f"{EVAL_PATH} = {cfg.data.eval_path!r} {problem}: set it to the server's own folder of "
                    f"{EVAL_FOLDER_HOLDS[cfg.data.dataset]}, or leave it empty to evaluate on the dataset's "
                    "held-out split")


def eval_dataset(cfg: AppConfig) -> tuple[Dataset, DataSpec]:
    """The server's held-out data (never on any site), capped at data.eval-max-examples.

    With data.eval-path: all of that folder (images, the IDX test files, .txt text); an error
    naming the key when it is missing or holds nothing usable. Without: the dataset's test split,
    or the 20% holdout of data.path (image-folder, digits), or the last 20% of data.path's text.
    Text: the held-out plays (shakespeare) or the held-out text (text-folder), as lm.context
    windows; the cap counts windows, drawn uniformly at random with run.seed.
    """
    d = cfg.data
    if d.eval_path:  # common.config refuses it for the bundled datasets (digits, shakespeare)
        _checked_eval_folder(cfg)
        try:
            return _capped_eval_dataset(cfg)
        except (DataError, TextDataError) as err:
            if EVAL_PATH in str(err):
                raise
            raise type(err)(f"{EVAL_PATH} = {d.eval_path!r}: {err}") from err
    return _capped_eval_dataset(cfg)


def _capped_eval_dataset(cfg: AppConfig) -> tuple[Dataset, DataSpec]:
    d = cfg.data
    if d.dataset in TEXT_DATASETS:
        if d.eval_path:
            text = load_text_folder(d.eval_path, EVAL_PATH)
        elif d.dataset == "shakespeare":
            text = shakespeare_split(d.heldout_plays, cfg.run.seed, d.min_chars, d.public_plays)[1]
        else:
            text = _text_folder_corpus(cfg)[1]
        blocks, spec = _text_blocks(cfg, text)
        if len(blocks) <= d.eval_max_examples:
            return blocks, spec
        g = torch.Generator().manual_seed(cfg.run.seed)
        idx = torch.randperm(len(blocks), generator=g)[: d.eval_max_examples].sort().values
        return Subset(blocks, idx.tolist()), spec
    if d.dataset not in IMAGE_DATASETS:
        raise NotImplementedError(f"data.dataset = {d.dataset!r} is not an image dataset")
    ds = _eval_folder_images(cfg) if d.eval_path else load_images(d.dataset, d.path or None, "test", _size(cfg))
    if len(ds) > d.eval_max_examples:
        g = torch.Generator().manual_seed(cfg.run.seed)
        idx = torch.randperm(len(ds), generator=g)[: d.eval_max_examples].sort().values
        ds = ds.subset(idx.numpy())
    return _as_torch(ds), _image_spec(ds)
