"""Clicks as RITM's clicker places them, NoC and mIoU over objects, and exact merging."""

import itertools

import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt

from omgseg.platform.evaluation.metrics.interactive import Clicker, InteractiveEvaluator, interior_point, mask_iou


def test_interior_point_is_farthest_from_the_boundary():
    mask = np.zeros((9, 20), bool)
    mask[1:8, 1:8] = True  # a 7x7 square: centre (4, 4)
    mask[0:9, 12:20] = True  # touches the border: its interior is measured against it too
    assert interior_point(mask[:, :10]) == (4.5, 4.5)
    with pytest.raises(ValueError, match="empty mask"):
        interior_point(np.zeros((3, 3), bool))


def _reference_click(gt, pred, not_clicked):
    """RITM's rule written the obvious way: full-frame distance transforms of the padded error
    regions, clicked pixels zeroed, positive only on a strictly deeper missed region."""
    depth = [distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1] * not_clicked for m in (gt & ~pred, pred & ~gt)]
    positive = depth[0].max() > depth[1].max()
    chosen = depth[0] if positive else depth[1]
    rows, cols = np.nonzero(chosen == chosen.max())
    return cols[0] + 0.5, rows[0] + 0.5, bool(positive)


def test_clicks_follow_ritm_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(30):
        gt = np.zeros((40, 50), bool)
        y, x, h, w = rng.integers(0, 30), rng.integers(0, 40), rng.integers(3, 20), rng.integers(3, 20)
        gt[y:y + h, x:x + w] = True
        clicker, not_clicked = Clicker(gt), np.ones(gt.shape, bool)
        pred = np.zeros_like(gt)
        for _ in range(5):
            expected = _reference_click(gt, pred, not_clicked)
            click = clicker.next(pred)
            assert (click.x, click.y, click.positive) == expected
            not_clicked[int(click.y), int(click.x)] = False
            pred = rng.random(gt.shape) < 0.5 if rng.random() < 0.5 else gt ^ (rng.random(gt.shape) < 0.05)


def test_a_tie_gives_a_negative_click_and_a_clicked_pixel_is_not_clicked_again():
    gt = np.zeros((9, 9), bool)
    gt[1:4, 1:4] = True  # missed: a 3x3 square, depth 2 at its centre
    pred = np.zeros((9, 9), bool)
    pred[5:8, 5:8] = True  # wrong: another 3x3 square, the same depth
    click = Clicker(gt).next(pred)
    assert not click.positive and (click.x, click.y) == (6.5, 6.5)
    clicker = Clicker(gt)
    first = clicker.first()
    assert first.positive and (first.x, first.y) == (2.5, 2.5)
    again = clicker.next(np.zeros_like(gt))  # the model ignored the click: the next one goes elsewhere
    assert again.positive and (again.x, again.y) != (2.5, 2.5)
    assert clicker.next(gt) is None  # exact: nothing left to click
    only_clicked = Clicker(gt)
    only_clicked.first()
    missed_centre = gt.copy()
    missed_centre[2, 2] = False  # the one error is the pixel clicked already
    assert only_clicked.next(missed_centre) is None


def test_the_box_crop_gives_the_full_frame_transform_near_the_border():
    gt = np.zeros((12, 12), bool)
    gt[0:6, 7:12] = True  # touches the top and right borders
    pred = np.zeros_like(gt)
    assert Clicker(gt).next(pred) == Clicker(gt).first()
    assert (Clicker(gt).first().x, Clicker(gt).first().y) == _reference_click(gt, pred, np.ones_like(gt))[:2]


def test_noc_nof_miou_and_merge_by_hand():
    a, b = InteractiveEvaluator(max_clicks=5, miou_at=(1, 3)), InteractiveEvaluator(max_clicks=5, miou_at=(1, 3))
    a.add([0.5, 0.86, 0.95])  # 0.85 at click 2, 0.90 at click 3; stopped there, so 0.95 holds after
    b.add([0.2, 0.3, 0.4, 0.5, 0.6])  # never reaches: NoC = max clicks, a failure
    b.add([0.2, 0.3, 0.4, 0.5, 0.91])  # reaches both exactly at the last click: RITM counts a failure too
    out = a.merge(b).compute()
    assert out["mIoU@1"] == pytest.approx(100 * 0.9 / 3) and out["mIoU@3"] == pytest.approx(100 * 1.75 / 3)
    assert out["NoC@85"] == pytest.approx((2 + 5 + 5) / 3) and out["NoC@90"] == pytest.approx((3 + 5 + 5) / 3)
    assert out["NoF@85"] == 2 and out["NoF@90"] == 2 and out["instances"] == 3
    with pytest.raises(ValueError, match="x: need 1 to 5 IoUs, got 6"):
        a.add([0.1] * 6, where="x")
    assert mask_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0


def test_the_simulation_stops_when_nothing_reported_can_change():
    protocol = InteractiveEvaluator(max_clicks=20)  # mIoU@1/3/5, NoC@85/90
    assert protocol.wants_more([0.95] * 4)  # mIoU@5 still to come
    assert not protocol.wants_more([0.5, 0.6, 0.7, 0.8, 0.91])
    assert protocol.wants_more([0.5, 0.6, 0.7, 0.8, 0.89])
    assert not protocol.wants_more([0.5] * 20)


def test_merging_in_any_order_gives_exactly_the_whole():
    rng = np.random.default_rng(1)
    curves = [list(rng.random(rng.integers(5, 21))) for _ in range(12)]
    whole = InteractiveEvaluator()
    for c in curves:
        whole.add(c)
    for order in itertools.islice(itertools.permutations(range(3)), 3):
        parts = [InteractiveEvaluator() for _ in range(3)]
        for k, c in enumerate(curves):
            parts[k % 3].add(c)
        merged = parts[order[0]].merge(parts[order[1]]).merge(parts[order[2]])
        assert merged.compute() == whole.compute()
