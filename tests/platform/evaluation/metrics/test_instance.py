"""Mask AP through pycocotools: perfect, empty, hand-checkable, merge and file errors."""

import json

import numpy as np
import pytest

from omgseg.core.structures import Category
from omgseg.platform.evaluation.metrics.instance import InstanceEvaluator, encode, evaluate_coco_instances

CATS = [Category(1, "person", True), Category(2, "car", True), Category(3, "sky", False)]


def _masks():
    masks = np.zeros((2, 32, 32), dtype=bool)
    masks[0, 2:12, 2:12] = True
    masks[1, 16:30, 10:30] = True
    return masks


def test_perfect_empty_and_wrong_class():
    gt = _masks()
    ev = InstanceEvaluator(CATS)
    ev.add(1, gt, [1, 2], [False, False], gt, [1, 2], [0.9, 0.8])
    assert ev.compute()["AP"] == pytest.approx(100.0)
    empty = InstanceEvaluator(CATS)
    empty.add(1, gt, [1, 2], [False, False], np.zeros((0, 32, 32), bool), [], [])
    assert empty.compute()["AP"] == 0.0
    wrong = InstanceEvaluator(CATS)
    wrong.add(1, gt, [1, 2], [False, False], gt, [2, 1], [0.9, 0.8])
    assert wrong.compute()["AP"] == 0.0


def test_half_the_objects_found_gives_half_the_ap():
    # Two persons; one predicted exactly, the other missed: recall 0.5 at precision 1, so AP
    # (101-point interpolation) is 51/101 for the class.
    gt = _masks()
    ev = InstanceEvaluator(CATS)
    ev.add(1, gt, [1, 1], [False, False], gt[:1], [1], [0.9])
    assert ev.compute()["AP"] == pytest.approx(100 * 51 / 101, abs=1e-6)


def test_merge_equals_the_whole():
    gt = _masks()
    a, b, whole = InstanceEvaluator(CATS), InstanceEvaluator(CATS), InstanceEvaluator(CATS)
    for ev, image in ((a, 1), (b, 2), (whole, 1), (whole, 2)):
        ev.add(image, gt, [1, 2], [False, False], gt[:1], [1], [0.7])
    assert a.merge(b).compute() == whole.compute()


def test_files_and_errors(tmp_path):
    gt = _masks()
    gt_json = {"images": [{"id": 1, "height": 32, "width": 32}], "categories": [{"id": 1, "name": "person"}],
               "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": encode(gt[0]),
                                "area": float(gt[0].sum()), "iscrowd": 0, "bbox": [2, 2, 10, 10]}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt_json))
    (tmp_path / "pred.json").write_text(json.dumps([{"image_id": 1, "category_id": 1,
                                                     "segmentation": encode(gt[0]), "score": 0.5}]))
    assert evaluate_coco_instances(tmp_path / "gt.json", tmp_path / "pred.json")["AP"] == pytest.approx(100)
    (tmp_path / "bad.json").write_text(json.dumps([{"image_id": 1, "category_id": 7,
                                                    "segmentation": encode(gt[0]), "score": 0.5}]))
    with pytest.raises(ValueError, match="bad.json: result 0 has category id 7"):
        evaluate_coco_instances(tmp_path / "gt.json", tmp_path / "bad.json")
    with pytest.raises(ValueError, match=r"predicted category ids \[3\] are not thing categories"):
        InstanceEvaluator(CATS).add(1, gt, [1, 2], [False, False], gt[:1], [3], [0.5])
