"""The interior click and mIoU over instances."""

import numpy as np
import pytest

from omgseg.platform.evaluation.metrics.interactive import InteractiveEvaluator, interior_point, mask_iou, next_click


def test_interior_point_is_farthest_from_the_boundary():
    mask = np.zeros((9, 20), bool)
    mask[1:8, 1:8] = True  # a 7x7 square: centre (4, 4)
    mask[0:9, 12:20] = True  # touches the border: its interior is measured against it too
    assert interior_point(mask[:, :10]) == (4.5, 4.5)
    with pytest.raises(ValueError, match="empty mask"):
        interior_point(np.zeros((3, 3), bool))


def test_next_click_goes_into_the_deeper_error_region():
    gt = np.zeros((10, 10), bool)
    gt[1:9, 1:9] = True
    pred = np.zeros((10, 10), bool)
    pred[1:9, 1:4] = True  # the right part of the object is missed
    x, y, positive = next_click(pred, gt)
    assert positive and 4 <= x - 0.5 <= 8 and 1 <= y - 0.5 <= 8 and gt[int(y), int(x)]
    wrong = gt.copy()
    wrong[0:10, 9] = True  # only a thin false-positive strip remains
    x, y, positive = next_click(wrong, gt)
    assert not positive and int(x) == 9
    assert next_click(gt, gt) is None


def test_noc_miou_at_k_and_merge_by_hand():
    a, b = InteractiveEvaluator(max_clicks=5, miou_at=(1, 3)), InteractiveEvaluator(max_clicks=5, miou_at=(1, 3))
    a.add([0.5, 0.86, 0.95])  # reaches 0.85 at click 2 and 0.90 at click 3; padded with 0.95
    b.add([0.2, 0.3, 0.4, 0.5, 0.6])  # never reaches: NoC = max clicks
    out = a.merge(b).compute()
    assert out["mIoU@1"] == pytest.approx(35) and out["mIoU@3"] == pytest.approx((95 + 40) / 2)
    assert out["NoC@85"] == pytest.approx((2 + 5) / 2) and out["NoC@90"] == pytest.approx((3 + 5) / 2)
    assert out["NoF@85"] == 1 and out["instances"] == 2
    with pytest.raises(ValueError, match="x: need 1 to 5 IoUs, got 6"):
        a.add([0.1] * 6, where="x")
    assert mask_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0
