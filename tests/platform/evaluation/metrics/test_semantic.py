"""mIoU by hand, the ignore label, classes absent from the ground truth, merging, files."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex

from omgseg.platform.evaluation.metrics.semantic import SemanticEvaluator, evaluate_semantic_pngs


def test_hand_computed_iou_accuracy_and_ignore():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 2, 0]])
    ev = SemanticEvaluator(3, class_names=["a", "b", "c"])
    ev.add(gt, pred)
    out = ev.compute()
    # class 0: tp 3, gt 4, pred 3 -> 3/4; class 1: tp 2, gt 3, pred 3 -> 2/4; class 2 absent from gt.
    assert out["IoU-a"] == pytest.approx(75.0) and out["IoU-b"] == pytest.approx(50.0)
    assert "IoU-c" not in out and out["mIoU"] == pytest.approx(62.5)
    assert out["pACC"] == pytest.approx(100 * 5 / 7)
    assert out["mACC"] == pytest.approx(100 * (3 / 4 + 2 / 3) / 2)


def test_agrees_with_torchmetrics_when_every_class_is_in_the_ground_truth():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, size=(3, 16, 16))
    pred = np.where(rng.random(gt.shape) < 0.7, gt, rng.integers(0, 4, size=gt.shape))
    ev = SemanticEvaluator(4)
    for g, p in zip(gt, pred):
        ev.add(g, p)
    theirs = MulticlassJaccardIndex(num_classes=4, average="macro")(torch.from_numpy(pred), torch.from_numpy(gt))
    assert ev.compute()["mIoU"] == pytest.approx(100 * float(theirs), abs=1e-4)


def test_merge_and_errors(tmp_path):
    a, b, whole = SemanticEvaluator(2), SemanticEvaluator(2), SemanticEvaluator(2)
    x, y = np.array([[0, 1]]), np.array([[1, 1]])
    a.add(x, y)
    b.add(y, y)
    whole.add(x, y)
    whole.add(y, y)
    assert a.merge(b).compute() == whole.compute()
    with pytest.raises(ValueError, match=r"img: predicted class ids \[5\] are outside 0..1"):
        SemanticEvaluator(2).add(x, np.array([[5, 0]]), where="img")
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    Image.fromarray(np.array([[0, 1]], dtype=np.uint8)).save(tmp_path / "gt" / "a.png")
    Image.fromarray(np.array([[0, 1]], dtype=np.uint8)).save(tmp_path / "pred" / "a.png")
    assert evaluate_semantic_pngs(tmp_path / "gt", tmp_path / "pred", 2)["mIoU"] == 100
    Image.fromarray(np.array([[0, 1]], dtype=np.uint8)).save(tmp_path / "gt" / "b.png")
    with pytest.raises(FileNotFoundError, match="pred/b.png for b.png does not exist"):
        evaluate_semantic_pngs(tmp_path / "gt", tmp_path / "pred", 2)


def test_seen_and_unseen_classes_are_averaged_apart():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 2, 0]])
    ev = SemanticEvaluator(3, class_groups={"seen": {0}, "unseen": {1, 2}})
    ev.add(gt, pred)
    out = ev.compute()
    # IoUs as in test_hand_computed_iou_accuracy_and_ignore: class 0 75, class 1 50, class 2 absent.
    assert out["mIoU_seen"] == pytest.approx(75.0) and out["N_seen"] == 1
    assert out["mIoU_unseen"] == pytest.approx(50.0) and out["N_unseen"] == 1
    with pytest.raises(ValueError, match=r"outside 0..2: \{'x': \[3\]\}"):
        SemanticEvaluator(3, class_groups={"x": {3}})
