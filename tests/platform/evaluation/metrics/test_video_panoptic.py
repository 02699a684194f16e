"""VPQ: windows of frames matched as tubes, sums over windows, by hand."""

import numpy as np
import pytest

from omgseg.core.structures import Category
from omgseg.platform.evaluation.metrics.video_panoptic import VideoPanopticEvaluator

CATS = [Category(1, "person", True), Category(2, "sky", False)]


def test_identity_switch_is_punished_only_in_windows_that_span_it():
    # 3 frames of 2x2: a person on the left column, sky on the right. The prediction gets
    # every frame right but gives the person a new id in frame 2 (an identity switch).
    gt = np.zeros((3, 2, 2), dtype=np.int64)
    gt[:, :, 0] = 1
    gt[:, :, 1] = 2
    pred = gt.copy()
    pred[2][gt[2] == 1] = 3
    ev = VideoPanopticEvaluator(CATS, windows=(1, 2, 3))
    ev.add(gt, {1: (1, False), 2: (2, False)}, pred, {1: 1, 2: 2, 3: 1})
    out = ev.compute()
    assert out["VPQ@1"] == pytest.approx(100.0)  # every single frame is perfect
    # n = 2: window (0, 1) perfect; window (1, 2): person tube 4 px, pred tube 1 has 2 px
    # (IoU 2/4, not > 0.5) and tube 3 has 2 px: 0 TP, 2 FP, 1 FN for person; sky perfect.
    person_pq_2 = 100 * 1 / (1 + 0.5 * 2 + 0.5 * 1)
    assert out["VPQ@2"] == pytest.approx((person_pq_2 + 100) / 2)
    # n = 3: one window; person tube 6 px, pred id 1 covers 4 (IoU 4/6 > 0.5): TP with IoU 2/3,
    # pred id 3 (2 px) is a FP.
    person_pq_3 = 100 * (4 / 6) / (1 + 0.5 * 1)
    assert out["VPQ@3"] == pytest.approx((person_pq_3 + 100) / 2)
    assert out["VPQ"] == pytest.approx((100 + out["VPQ@2"] + out["VPQ@3"]) / 3)


def test_windows_longer_than_the_video_are_skipped_and_merge_adds_up():
    gt = np.ones((2, 2, 2), dtype=np.int64)
    ev = VideoPanopticEvaluator(CATS, windows=(1, 4))
    ev.add(gt, {1: (1, False)}, gt, {1: 1})
    out = ev.compute()
    assert "VPQ@4" not in out and out["VPQ"] == 100
    other = VideoPanopticEvaluator(CATS, windows=(1, 4))
    other.add(gt, {1: (1, False)}, np.zeros_like(gt), {})
    merged = ev.merge(other).compute()
    assert merged["videos"] == 2 and merged["VPQ@1"] == pytest.approx(100 * 2 / (2 + 0.5 * 2))
    with pytest.raises(ValueError, match="window lengths must be >= 1"):
        VideoPanopticEvaluator(CATS, windows=(0,))
