"""simulations.bench_downstream: what it accepts from `fedgen generate`, and that its CNN learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simulations import bench_downstream as bd


def test_an_npz_without_labels_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "unlabelled.npz"
    np.savez(path, images=np.zeros((4, 1, 8, 8), dtype=np.uint8))
    with pytest.raises(SystemExit, match="class-conditional"):
        bd.load_synthetic(path)


@pytest.mark.parametrize("layout", ["nchw", "nhw", "nhwc"])
def test_uint8_images_in_any_layout_load_as_nchw_in_unit_range(tmp_path, layout):
    images = np.full((3, 1, 8, 8), 255, dtype=np.uint8)
    images = {"nchw": images, "nhw": images[:, 0], "nhwc": images.transpose(0, 2, 3, 1)}[layout]
    path = tmp_path / "s.npz"
    np.savez(path, images=images, labels=np.array([0, 1, 2]))
    x, y = bd.load_synthetic(path)
    assert x.shape == (3, 1, 8, 8) and float(x.max()) == 1.0 and y.tolist() == [0, 1, 2]


def test_the_cnn_learns_separable_classes_and_scores_labels_it_never_saw_as_wrong():
    """Two classes told apart by brightness: trained on the right labels it scores near 1 on
    held-out images; trained on swapped labels near 0 (the score is accuracy on the test set)."""
    g = torch.Generator().manual_seed(0)

    def images(n):
        y = torch.arange(n) % 2
        return (torch.rand(n, 1, 8, 8, generator=g) * 0.3 + 0.6 * y[:, None, None, None]), y

    x, y = images(200)
    tx, ty = images(100)
    assert bd.train_and_test(x, y, tx, ty, epochs=3, seed=0) > 0.95
    assert bd.train_and_test(x, 1 - y, tx, ty, epochs=3, seed=0) < 0.05
