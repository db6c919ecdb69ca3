"""Holdout / IID / Dirichlet partitioning and the per-site helper."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.data import partition as P
from common.data.images import ImageDataset
from common.data.partition import (
    dirichlet_partition,
    holdout_split,
    iid_partition,
    partition_for_site,
    partition_indices,
)

LABELS = np.repeat(np.arange(10), 100)  # 1000 examples, balanced


def assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    for p in parts:
        assert np.all(np.diff(p) > 0), "each partition sorted and without duplicates"
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def mean_label_entropy(parts: list[np.ndarray], labels: np.ndarray) -> float:
    ents = []
    for p in parts:
        q = np.bincount(labels[p], minlength=labels.max() + 1) / len(p)
        q = q[q > 0]
        ents.append(float(-(q * np.log(q)).sum()))
    return float(np.mean(ents))


# --------------------------------------------------------------------------- holdout


def test_holdout_split() -> None:
    train, hold = holdout_split(100, 0.2, seed=3)
    assert (len(train), len(hold)) == (80, 20)
    assert_disjoint_cover([train, hold], 100)
    again = holdout_split(100, 0.2, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((train, hold), again))
    assert not np.array_equal(hold, holdout_split(100, 0.2, seed=4)[1])
    assert [len(x) for x in holdout_split(2, 0.01, 0)] == [1, 1]  # both parts non-empty


@pytest.mark.parametrize("n,fraction", [(1, 0.2), (10, 0.0), (10, 1.0), (10, -0.5)])
def test_holdout_split_errors(n: int, fraction: float) -> None:
    with pytest.raises(ValueError):
        holdout_split(n, fraction, 0)


# --------------------------------------------------------------------------- iid


def test_iid_partition() -> None:
    parts = iid_partition(103, 10, seed=1)
    assert len(parts) == 10
    assert_disjoint_cover(parts, 103)
    assert {len(p) for p in parts} <= {10, 11}
    assert all(np.array_equal(a, b) for a, b in zip(parts, iid_partition(103, 10, seed=1)))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, iid_partition(103, 10, seed=2)))


@pytest.mark.parametrize("n,k", [(5, 6), (5, 0), (0, 1)])
def test_iid_partition_errors(n: int, k: int) -> None:
    with pytest.raises(ValueError, match="partition"):
        iid_partition(n, k, 0)


# --------------------------------------------------------------------------- dirichlet


def test_dirichlet_partition_deterministic_disjoint_cover() -> None:
    parts = dirichlet_partition(LABELS, 8, alpha=0.5, seed=7)
    assert len(parts) == 8
    assert_disjoint_cover(parts, len(LABELS))
    same = dirichlet_partition(LABELS, 8, alpha=0.5, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(parts, same))
    other = dirichlet_partition(LABELS, 8, alpha=0.5, seed=8)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_small_alpha_is_more_skewed_than_iid() -> None:
    iid = iid_partition(len(LABELS), 10, seed=0)
    skewed = dirichlet_partition(LABELS, 10, alpha=0.1, seed=0)
    mild = dirichlet_partition(LABELS, 10, alpha=100.0, seed=0)
    h_iid, h_skew, h_mild = (mean_label_entropy(p, LABELS) for p in (iid, skewed, mild))
    assert h_skew < 0.6 * h_iid
    assert h_skew < h_mild
    assert h_iid > 0.95 * np.log(10)  # iid partitions see (almost) all classes uniformly


def test_min_size_respected() -> None:
    unconstrained = [dirichlet_partition(LABELS, 10, 0.1, seed, min_size=0) for seed in range(10)]
    assert min(len(p) for parts in unconstrained for p in parts) < 10  # the constraint matters
    for seed in range(10):
        parts = dirichlet_partition(LABELS, 10, alpha=0.1, seed=seed, min_size=10)
        assert min(len(p) for p in parts) >= 10
        assert_disjoint_cover(parts, len(LABELS))


def test_min_size_unreachable_gives_clear_error() -> None:
    one_class = np.zeros(100, dtype=np.int64)  # one class: one Dirichlet draw decides everything
    with pytest.raises(ValueError, match="attempts.*larger alpha"):
        dirichlet_partition(one_class, 10, alpha=0.001, seed=0, min_size=5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=-1.0), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(num_partitions=1001), "num_partitions > number"),
        (dict(num_partitions=0), "num_partitions"),
        (dict(num_partitions=100, min_size=11), "only 1000 examples"),
    ],
)
def test_dirichlet_errors(kwargs: dict, match: str) -> None:
    args = dict(labels=LABELS, num_partitions=10, alpha=0.5, seed=0) | kwargs
    with pytest.raises(ValueError, match=match):
        dirichlet_partition(**args)


def test_dirichlet_rejects_bad_labels() -> None:
    with pytest.raises(ValueError, match="1-D"):
        dirichlet_partition(LABELS.reshape(10, 100), 2, 0.5, 0)
    with pytest.raises(ValueError, match="integers"):
        dirichlet_partition(LABELS.astype(float), 2, 0.5, 0)


# --------------------------------------------------------------------------- dispatch


def test_partition_indices_dispatch() -> None:
    by_n = partition_indices("iid", 1000, 4, seed=0)
    by_labels = partition_indices("iid", LABELS, 4, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(by_n, by_labels))
    d = partition_indices("dirichlet", LABELS, 4, seed=0, alpha=0.3)
    assert all(np.array_equal(a, b) for a, b in zip(d, dirichlet_partition(LABELS, 4, 0.3, 0)))
    with pytest.raises(ValueError, match="needs alpha"):
        partition_indices("dirichlet", LABELS, 4, seed=0)
    with pytest.raises(ValueError, match="label array"):
        partition_indices("dirichlet", 1000, 4, seed=0, alpha=0.3)
    with pytest.raises(ValueError, match="unknown partition kind"):
        partition_indices("shards", LABELS, 4, seed=0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- per-site helper


def toy_dataset(labels: np.ndarray | None, name: str = "toy") -> ImageDataset:
    n = 1000 if labels is None else len(labels)
    images = (torch.arange(n, dtype=torch.float32) / n).reshape(n, 1, 1, 1)
    y = None if labels is None else torch.from_numpy(labels.astype(np.int64))
    return ImageDataset(images, y, name, None if labels is None else 10)


@pytest.mark.parametrize("kind,alpha", [("iid", None), ("dirichlet", 0.3)])
def test_partition_for_site_covers_dataset_and_caches(kind: str, alpha: float | None) -> None:
    ds = toy_dataset(LABELS)
    before = P._cached_partitions.cache_info()
    sites = [partition_for_site(ds, i, 5, kind, seed=11, alpha=alpha) for i in range(5)]
    after = P._cached_partitions.cache_info()
    assert after.misses - before.misses <= 1 and after.hits - before.hits >= 4  # computed once
    assert sites[2].name == "toy[2/5]"
    # images encode their original index: together the sites are exactly the dataset
    idx = torch.cat([s.images.flatten() for s in sites]) * len(ds)
    assert sorted(idx.round().long().tolist()) == list(range(len(ds)))
    expected = partition_indices(kind, LABELS, 5, seed=11, alpha=alpha)  # type: ignore[arg-type]
    assert sites[3].labels.tolist() == LABELS[expected[3]].tolist()


def test_partition_cache_keys_on_label_content() -> None:
    a = partition_for_site(toy_dataset(LABELS), 0, 4, "dirichlet", seed=0, alpha=0.2)
    shuffled = np.random.default_rng(1).permutation(LABELS)  # same name and length
    b = partition_for_site(toy_dataset(shuffled), 0, 4, "dirichlet", seed=0, alpha=0.2)
    expected = dirichlet_partition(shuffled, 4, 0.2, 0)[0]
    assert b.labels.tolist() == shuffled[expected].tolist()
    assert len(a) != len(b) or a.labels.tolist() != b.labels.tolist()


def test_partition_for_site_errors() -> None:
    with pytest.raises(ValueError, match="needs labels"):
        partition_for_site(toy_dataset(None), 0, 2, "dirichlet", seed=0, alpha=0.5)
    with pytest.raises(ValueError, match="partition_id"):
        partition_for_site(toy_dataset(LABELS), 2, 2, "iid", seed=0, alpha=None)
    with pytest.raises(ValueError, match="unknown partition kind"):
        partition_for_site(toy_dataset(LABELS), 0, 2, "shards", seed=0, alpha=None)


# --------------------------------------------------------------------------- property


@settings(max_examples=60, deadline=None)
@given(
    n_classes=st.integers(1, 6),
    n=st.integers(1, 120),
    k=st.integers(1, 12),
    alpha=st.floats(0.05, 10.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_partitions_are_disjoint_and_cover(n_classes: int, n: int, k: int, alpha: float, seed: int) -> None:
    k = min(k, n)
    labels = np.random.default_rng(seed).integers(0, n_classes, size=n)
    parts = iid_partition(n, k, seed)
    assert len(parts) == k and min(len(p) for p in parts) >= 1
    assert_disjoint_cover(parts, n)
    try:
        dparts = dirichlet_partition(labels, k, alpha, seed, min_size=1)
    except ValueError as e:  # allowed only as the documented "could not reach min_size" failure
        assert "attempts" in str(e)
        return
    assert len(dparts) == k and min(len(p) for p in dparts) >= 1
    assert_disjoint_cover(dparts, n)
