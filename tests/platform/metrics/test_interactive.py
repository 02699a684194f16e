"""The interior click and mIoU over instances."""

import numpy as np
import pytest

from omgseg.platform.metrics.interactive import InteractiveEvaluator, interior_point


def test_interior_point_is_farthest_from_the_boundary():
    mask = np.zeros((9, 20), bool)
    mask[1:8, 1:8] = True  # a 7x7 square: centre (4, 4)
    mask[0:9, 12:20] = True  # touches the border: its interior is measured against it too
    assert interior_point(mask[:, :10]) == (4.5, 4.5)
    with pytest.raises(ValueError, match="empty mask"):
        interior_point(np.zeros((3, 3), bool))


def test_miou_is_a_mean_over_instances_and_merges():
    gt = np.zeros((4, 4), bool)
    gt[:2] = True
    half = np.zeros((4, 4), bool)
    half[:1] = True
    a, b = InteractiveEvaluator(), InteractiveEvaluator()
    a.add(gt, gt)
    b.add(half, gt)
    out = a.merge(b).compute()
    assert out["mIoU@1"] == pytest.approx(75) and out["instances"] == 2
    with pytest.raises(ValueError, match=r"x: predicted mask is \(3, 3\)"):
        a.add(np.zeros((3, 3), bool), gt, where="x")
