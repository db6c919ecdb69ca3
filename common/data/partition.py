"""Deterministic index splits: train/holdout, IID and Dirichlet label-skew partitions."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, Protocol, Self, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PartitionKind = Literal["iid", "dirichlet"]
MAX_DIRICHLET_ATTEMPTS = 100


class Partitionable(Protocol):
    """What :func:`partition_for_site` needs of a dataset (``common.data.images.ImageDataset`` has
    it): a frozen dataclass with a ``name``, optional ``labels``, a length and ``subset(idx)``."""

    name: str
    labels: torch.Tensor | None

    def __len__(self) -> int: ...

    def subset(self, idx: np.ndarray) -> Self: ...


DatasetT = TypeVar("DatasetT", bound=Partitionable)


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into (train_idx, holdout_idx): disjoint, sorted, deterministic for ``seed``.

    The holdout gets ``round(n * fraction)`` indices, clamped so that both parts are non-empty.
    """
    if n < 2:
        raise ValueError(f"holdout_split needs n >= 2 examples, got n={n}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    k = min(max(round(n * fraction), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


def _check_num_partitions(n: int, num_partitions: int) -> None:
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if num_partitions > n:
        raise ValueError(
            f"cannot split {n} examples into {num_partitions} non-empty partitions "
            f"(num_partitions > number of examples)"
        )


def iid_partition(n: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Shuffle ``range(n)`` and cut it into ``num_partitions`` near-equal (±1), sorted parts."""
    _check_num_partitions(n, num_partitions)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, num_partitions)]


def dirichlet_partition(
    labels: np.ndarray, num_partitions: int, alpha: float, seed: int, min_size: int = 2
) -> list[np.ndarray]:
    """Label-skew partition: each class is split across partitions with proportions ~ Dir(alpha).

    Standard scheme (Hsu et al. 2019 / Yurochkin et al. 2019): per class, shuffle its indices,
    draw proportions from a symmetric Dirichlet, zero the share of partitions that already hold
    >= n / num_partitions examples (keeps sizes balanced), and cut. The whole draw is repeated
    (up to ``MAX_DIRICHLET_ATTEMPTS`` times) until every partition has >= ``min_size`` examples.
    Smaller ``alpha`` means more skew.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    n = int(y.size)
    _check_num_partitions(n, num_partitions)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"dirichlet alpha must be a finite number > 0, got {alpha}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if min_size * num_partitions > n:
        raise ValueError(
            f"cannot give each of {num_partitions} partitions >= {min_size} examples "
            f"with only {n} examples"
        )

    rng = np.random.default_rng(seed)
    class_idx = [np.flatnonzero(y == c) for c in np.unique(y)]
    cap = n / num_partitions
    sizes = np.zeros(num_partitions, dtype=np.int64)
    for attempt in range(1, MAX_DIRICHLET_ATTEMPTS + 1):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        sizes[:] = 0
        for idx in class_idx:
            idx = rng.permutation(idx)
            props = rng.dirichlet(np.full(num_partitions, alpha)) * (sizes < cap)
            total = props.sum()
            # all mass on full partitions (possible for tiny alpha): spread over the open ones
            props = props / total if total > 0 else (sizes < cap) / np.count_nonzero(sizes < cap)
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
            for p, chunk in enumerate(np.split(idx, cuts)):
                parts[p].append(chunk)
                sizes[p] += len(chunk)
        if sizes.min() >= min_size:
            log.debug("dirichlet partition (alpha=%s) found after %d attempt(s)", alpha, attempt)
            return [np.sort(np.concatenate(p)) for p in parts]
    raise ValueError(
        f"dirichlet partition with alpha={alpha} could not give all {num_partitions} partitions "
        f">= {min_size} examples in {MAX_DIRICHLET_ATTEMPTS} attempts (n={n}, "
        f"smallest partition had {int(sizes.min())}); use a larger alpha, fewer partitions "
        f"or a smaller min_size"
    )


def partition_indices(
    kind: PartitionKind,
    n_or_labels: int | np.ndarray | Sequence[int],
    num_partitions: int,
    seed: int,
    alpha: float | None = None,
    min_size: int = 2,
) -> list[np.ndarray]:
    """Dispatch to :func:`iid_partition` (int n or labels) or :func:`dirichlet_partition` (labels)."""
    if kind == "iid":
        n = n_or_labels if isinstance(n_or_labels, (int, np.integer)) else len(n_or_labels)
        return iid_partition(int(n), num_partitions, seed)
    if kind == "dirichlet":
        if isinstance(n_or_labels, (int, np.integer)):
            raise ValueError("dirichlet partitioning needs the label array, not just a count")
        if alpha is None:
            raise ValueError("dirichlet partitioning needs alpha (e.g. data.dirichlet-alpha = 0.5)")
        return dirichlet_partition(np.asarray(n_or_labels), num_partitions, alpha, seed, min_size)
    raise ValueError(f"unknown partition kind {kind!r}; expected 'iid' or 'dirichlet'")


class _LabelsKey:
    """Hashable stand-in for a label array (by content digest), so lru_cache can key on it."""

    __slots__ = ("labels", "digest")

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = np.ascontiguousarray(labels)
        self.digest = hashlib.sha1(self.labels.tobytes()).hexdigest() + str(self.labels.dtype)

    def __hash__(self) -> int:
        return hash(self.digest)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _LabelsKey) and other.digest == self.digest


@functools.lru_cache(maxsize=32)
def _cached_partitions(
    kind: str, n: int, labels: _LabelsKey | None, num_partitions: int, seed: int, alpha: float | None
) -> tuple[np.ndarray, ...]:
    source: int | np.ndarray = n if labels is None else labels.labels
    parts = partition_indices(kind, source, num_partitions, seed, alpha)  # type: ignore[arg-type]
    for p in parts:
        p.flags.writeable = False  # shared by every caller: protect the cache
    log.info(
        "partitioned %d examples (%s, %d partitions, seed=%d, alpha=%s); sizes %s",
        n, kind, num_partitions, seed, alpha, [len(p) for p in parts],
    )
    return tuple(parts)


def partition_for_site(
    dataset: DatasetT,
    partition_id: int,
    num_partitions: int,
    kind: str,
    *,
    seed: int,
    alpha: float | None,
) -> DatasetT:
    """The ``partition_id``-th of ``num_partitions`` partitions of ``dataset``.

    Index lists are cached per (kind, data, num_partitions, seed, alpha), keyed on a digest of the
    labels (dirichlet) or on len(dataset) (iid), so many simulated clients in one process share them.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id must be in [0, {num_partitions}), got {partition_id}")
    if kind == "dirichlet":
        if dataset.labels is None:
            raise ValueError(
                f"dirichlet partitioning needs labels but dataset {dataset.name!r} has none "
                f"(e.g. a flat image folder); use kind 'iid' or one subfolder per class"
            )
        key: _LabelsKey | None = _LabelsKey(dataset.labels.numpy())
    elif kind == "iid":
        key = None
    else:
        raise ValueError(f"unknown partition kind {kind!r}; expected 'iid' or 'dirichlet'")
    parts = _cached_partitions(kind, len(dataset), key, num_partitions, seed, alpha)
    part = dataset.subset(parts[partition_id])
    return dataclasses.replace(part, name=f"{dataset.name}[{partition_id}/{num_partitions}]")
