"""PQ against hand computations, panopticapi's edge cases, torchmetrics, and the file format."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.detection import PanopticQuality

from omgseg.core.structures import Category
from omgseg.datasets.clip import encode_id_map_rgb
from omgseg.platform.evaluation.metrics.panoptic import GtSegment, PanopticEvaluator, evaluate_coco_panoptic

CATS = [Category(1, "person", True), Category(2, "car", True), Category(3, "sky", False)]


def _eval(gt, gt_segs, pred, pred_segs) -> dict:
    evaluator = PanopticEvaluator(CATS)
    evaluator.add(np.asarray(gt), gt_segs, np.asarray(pred), pred_segs)
    return evaluator.compute()


def _areas(ids, segs):
    ids = np.asarray(ids)
    return {k: GtSegment(c, crowd, int((ids == k).sum())) for k, (c, crowd) in segs.items()}


def test_perfect_and_empty_predictions():
    gt = np.zeros((4, 4), dtype=np.int64)
    gt[:2] = 1
    gt[2:] = 2
    segs = _areas(gt, {1: (1, False), 2: (3, False)})
    perfect = _eval(gt, segs, gt, {1: 1, 2: 3})
    assert perfect["PQ"] == 100 and perfect["SQ"] == 100 and perfect["RQ"] == 100
    assert perfect["PQ_th"] == 100 and perfect["N_st"] == 1
    empty = _eval(gt, segs, np.zeros_like(gt), {})
    assert empty["PQ"] == 0 and empty["per_class"]["1"]["FN"] == 1


def _partial_case():
    """gt person rows 0-1 (8 px), gt car rows 2-3 (8 px). Pred person rows 0-2 (12 px):
    IoU 8 / 12. Pred car row 3 (4 px): IoU 4 / 8 = 0.5 exactly -> not a match."""
    gt = np.zeros((4, 4), dtype=np.int64)
    gt[:2] = 1
    gt[2:] = 2
    pred = np.zeros((4, 4), dtype=np.int64)
    pred[:3] = 5
    pred[3] = 6
    return gt, _areas(gt, {1: (1, False), 2: (2, False)}), pred, {5: 1, 6: 2}


def test_partial_match_by_hand():
    out = _eval(*_partial_case())
    person, car = out["per_class"]["1"], out["per_class"]["2"]
    assert person["PQ"] == pytest.approx(100 * 8 / 12)
    assert (car["TP"], car["FP"], car["FN"]) == (0, 1, 1)
    assert out["PQ"] == pytest.approx((100 * 8 / 12 + 0) / 2)


def test_void_is_removed_from_the_union_and_void_predictions_are_not_false_positives():
    gt = np.zeros((4, 4), dtype=np.int64)
    gt[:2, :2] = 1  # 4 px; the rest is void
    pred = np.zeros((4, 4), dtype=np.int64)
    pred[:2, :3] = 7  # 6 px: 4 on the person, 2 on void -> union 6 - 2 = 4, IoU 1
    pred[3, :] = 8  # all void: ignored, not a false positive
    out = _eval(gt, _areas(gt, {1: (1, False)}), pred, {7: 1, 8: 2})
    assert out["per_class"]["1"]["PQ"] == 100
    assert "2" not in out["per_class"]  # car: no TP, FP or FN -> left out of the mean


def test_crowd_regions_absorb_predictions_of_their_category():
    gt = np.zeros((4, 4), dtype=np.int64)
    gt[:, :2] = 1  # person crowd
    gt[:, 2:] = 2  # sky
    pred = np.zeros((4, 4), dtype=np.int64)
    pred[:3, :2] = 5  # person on the crowd: ignored
    pred[:, 2:] = 6
    pred[3, :2] = 7  # car on the crowd: a crowd of another category does not absorb it
    out = _eval(gt, _areas(gt, {1: (1, True), 2: (3, False)}), pred, {5: 1, 6: 3, 7: 2})
    assert "1" not in out["per_class"]
    assert out["per_class"]["2"]["FP"] == 1 and out["per_class"]["3"]["PQ"] == 100


def test_agrees_with_torchmetrics_without_void_and_crowd():
    """torchmetrics' PanopticQuality as an independent oracle, on the cases where the two
    definitions agree: no void, no crowd, and thing classes only (torchmetrics merges all
    segments of a stuff class into one)."""
    things = [Category(1, "a", True), Category(2, "b", True), Category(3, "c", True)]
    rng = np.random.default_rng(0)
    ours = PanopticEvaluator(things)
    theirs = PanopticQuality(things={1, 2, 3}, stuffs={99})
    for _ in range(30):
        gt = rng.integers(1, 6, size=(12, 12))
        pred = gt.copy()
        noise = rng.random((12, 12)) < 0.25
        pred[noise] = rng.integers(1, 7, size=int(noise.sum()))
        gt_cat = {k: int(rng.integers(1, 4)) for k in np.unique(gt).tolist()}
        pred_cat = {k: (gt_cat.get(k, 1) if rng.random() < 0.8 else int(rng.integers(1, 4)))
                    for k in np.unique(pred).tolist()}
        ours.add(gt, _areas(gt, {k: (c, False) for k, c in gt_cat.items()}), pred, pred_cat)

        def pairs(ids, cats):
            return torch.from_numpy(np.stack([np.vectorize(cats.get)(ids), ids], axis=-1))[None]

        theirs.update(pairs(pred, pred_cat), pairs(gt, gt_cat))
    assert ours.compute()["PQ"] == pytest.approx(100 * float(theirs.compute()), abs=1e-4)


def test_merge_equals_the_whole():
    rng = np.random.default_rng(1)
    whole, first, second = PanopticEvaluator(CATS), PanopticEvaluator(CATS), PanopticEvaluator(CATS)
    for i in range(6):
        gt = rng.integers(1, 4, size=(8, 8))
        pred = np.where(rng.random((8, 8)) < 0.8, gt, 0)
        segs = _areas(gt, {1: (1, False), 2: (2, False), 3: (3, False)})
        pred_segs = {k: k for k in np.unique(pred).tolist() if k}
        whole.add(gt, segs, pred, pred_segs)
        (first if i < 3 else second).add(gt, segs, pred, pred_segs)
    merged, expected = first.merge(second).compute(), whole.compute()
    assert merged["images"] == expected["images"] == 6
    for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
        assert merged[key] == pytest.approx(expected[key], abs=1e-9)


def test_bad_predictions_are_named():
    gt = np.ones((2, 2), dtype=np.int64)
    segs = _areas(gt, {1: (1, False)})
    with pytest.raises(ValueError, match=r"img7: segment ids \[4\] are in the prediction map but not in its segments_info"):
        PanopticEvaluator(CATS).add(gt, segs, np.full((2, 2), 4), {}, where="img7")
    with pytest.raises(ValueError, match=r"predicted category ids \[9\]"):
        PanopticEvaluator(CATS).add(gt, segs, gt, {1: 9})
    with pytest.raises(ValueError, match=r"segments_info ids \[2\] do not occur"):
        PanopticEvaluator(CATS).add(gt, segs, gt, {1: 1, 2: 1})
    with pytest.raises(ValueError, match=r"prediction is \(3, 2\), ground truth \(2, 2\)"):
        PanopticEvaluator(CATS).add(gt, segs, np.ones((3, 2), dtype=np.int64), {1: 1})


def _write(folder, name, ids):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(encode_id_map_rgb(ids.astype(np.uint32))).save(folder / name)


def test_file_api_reads_coco_panoptic(tmp_path):
    gt = np.zeros((4, 4), dtype=np.int64)
    gt[:2] = 10
    gt[2:] = 20
    _write(tmp_path / "gt", "a.png", gt)
    _write(tmp_path / "pred", "a.png", np.where(gt == 10, 3, 4))
    gt_json = {"categories": [c.to_json() for c in CATS], "annotations": [{"image_id": 1, "file_name": "a.png",
               "segments_info": [{"id": 10, "category_id": 1, "iscrowd": 0, "area": 8},
                                 {"id": 20, "category_id": 3, "iscrowd": 0, "area": 8}]}]}
    pred_json = {"annotations": [{"image_id": 1, "file_name": "a.png",
                 "segments_info": [{"id": 3, "category_id": 1}, {"id": 4, "category_id": 3}]}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt_json))
    (tmp_path / "pred.json").write_text(json.dumps(pred_json))
    out = evaluate_coco_panoptic(tmp_path / "gt.json", tmp_path / "gt", tmp_path / "pred.json", tmp_path / "pred")
    assert out["PQ"] == 100 and out["images"] == 1
    (tmp_path / "pred" / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match="pred/a.png does not exist"):
        evaluate_coco_panoptic(tmp_path / "gt.json", tmp_path / "gt", tmp_path / "pred.json", tmp_path / "pred")


def test_eval_command_end_to_end(tmp_path, capsys):
    from omgseg.platform.cli import main

    gt = np.zeros((4, 4), dtype=np.int64)
    gt[:2], gt[2:] = 10, 20
    _write(tmp_path / "gt", "a.png", gt)
    _write(tmp_path / "pred", "a.png", np.where(gt == 10, 3, 0))  # sky missed
    (tmp_path / "gt.json").write_text(json.dumps({"categories": [c.to_json() for c in CATS], "annotations": [
        {"image_id": 1, "file_name": "a.png", "segments_info": [{"id": 10, "category_id": 1, "iscrowd": 0, "area": 8},
                                                                 {"id": 20, "category_id": 3, "iscrowd": 0, "area": 8}]}]}))
    (tmp_path / "pred.json").write_text(json.dumps({"annotations": [
        {"image_id": 1, "file_name": "a.png", "segments_info": [{"id": 3, "category_id": 1}]}]}))
    args = ["eval", "coco-panoptic", "--gt-json", str(tmp_path / "gt.json"), "--gt-dir", str(tmp_path / "gt"),
            "--pred-json", str(tmp_path / "pred.json"), "--pred-dir", str(tmp_path / "pred")]
    assert main([*args, "--out", str(tmp_path / "out" / "pq.json")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["PQ"] == pytest.approx(50.0) and result["PQ_th"] == 100 and result["PQ_st"] == 0
    assert json.loads((tmp_path / "out" / "pq.json").read_text()) == result
    assert main(["eval", "coco-panoptic", "--gt-json", str(tmp_path / "gt.json")]) == 1
    assert "needs --gt-dir, --pred-json, --pred-dir" in capsys.readouterr().err


def test_seen_and_unseen_classes_are_averaged_apart():
    # The partial case: person PQ 200/3, car PQ 0; sky has no TP/FP/FN.
    evaluator = PanopticEvaluator(CATS, {"seen": {1, 3}, "unseen": {2}})
    evaluator.add(*_partial_case())
    out = evaluator.compute()
    assert out["PQ_seen"] == pytest.approx(100 * 8 / 12) and out["N_seen"] == 1  # sky is left out
    assert out["PQ_unseen"] == 0 and out["N_unseen"] == 1
    assert out["PQ"] == pytest.approx((out["PQ_seen"] + out["PQ_unseen"]) / 2)
