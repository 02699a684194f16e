"""Semantic segmentation: mIoU, per-class IoU, pixel accuracy (detectron2's SemSegEvaluator).

One confusion matrix over all pixels; ignore-label pixels are dropped. mIoU and mACC average
only the classes present in the ground truth (detectron2's rule; mmseg and torchmetrics'
MulticlassJaccardIndex count a class that is only predicted as IoU 0 instead).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from omgseg.platform.evaluation.metrics.files import read_label_png


class SemanticEvaluator:
    """reset / add label maps / merge / compute, over `num_classes` classes."""

    def __init__(self, num_classes: int, ignore_label: int = 255, class_names: Sequence[str] | None = None,
                 class_groups: Mapping[str, set[int]] | None = None) -> None:
        """class_groups: optional {name: class indices}, e.g. the classes seen and unseen in
        training; each adds mIoU_<name> over its classes present in the ground truth."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.class_groups = dict(class_groups or {})
        outside = {name: sorted(i for i in ids if not 0 <= i < num_classes) for name, ids in self.class_groups.items()}
        outside = {name: ids for name, ids in outside.items() if ids}
        if outside:
            raise ValueError(f"class groups name classes outside 0..{num_classes - 1}: {outside}")
        self.reset()

    def reset(self) -> None:
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)  # [gt, pred]

    def add(self, gt: np.ndarray, pred: np.ndarray, where: str = "prediction") -> None:
        gt, pred = np.asarray(gt), np.asarray(pred)
        if gt.shape != pred.shape:
            raise ValueError(f"{where}: prediction is {pred.shape}, ground truth {gt.shape}")
        keep = gt != self.ignore_label
        g, p = gt[keep].astype(np.int64), pred[keep].astype(np.int64)
        for name, values in (("ground-truth", g), ("predicted", p)):
            bad = values[(values < 0) | (values >= self.num_classes)]
            if bad.size:
                raise ValueError(f"{where}: {name} class ids {sorted(set(bad.tolist()))[:5]} are outside 0..{self.num_classes - 1}")
        self.confusion += np.bincount(g * self.num_classes + p, minlength=self.num_classes**2).reshape(
            self.num_classes, self.num_classes)

    def merge(self, other: SemanticEvaluator) -> SemanticEvaluator:
        self.confusion += other.confusion
        return self

    def compute(self) -> dict:
        tp = np.diag(self.confusion).astype(np.float64)
        gt = self.confusion.sum(1).astype(np.float64)
        pred = self.confusion.sum(0).astype(np.float64)
        present = gt > 0
        union = gt + pred - tp
        iou = np.divide(tp, union, out=np.zeros_like(tp), where=union > 0)
        acc = np.divide(tp, gt, out=np.zeros_like(tp), where=gt > 0)
        out = {
            "mIoU": 100 * float(iou[present].mean()) if present.any() else 0.0,
            "fwIoU": 100 * float((iou * gt)[present].sum() / gt.sum()) if gt.sum() else 0.0,
            "mACC": 100 * float(acc[present].mean()) if present.any() else 0.0,
            "pACC": 100 * float(tp.sum() / gt.sum()) if gt.sum() else 0.0,
        }
        for group, ids in self.class_groups.items():
            member = np.zeros(self.num_classes, dtype=bool)
            member[sorted(ids)] = True
            chosen = member & present
            out[f"mIoU_{group}"] = 100 * float(iou[chosen].mean()) if chosen.any() else 0.0
            out[f"N_{group}"] = int(chosen.sum())
        for name, value, here in zip(self.class_names, iou, present):
            if here:
                out[f"IoU-{name}"] = 100 * float(value)
        return out


def evaluate_semantic_pngs(gt_dir: Path, pred_dir: Path, num_classes: int, ignore_label: int = 255) -> dict:
    """mIoU of single-channel prediction PNGs against ground-truth PNGs of the same names."""
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"ground-truth folder {gt_dir} does not exist")
    files = sorted(gt_dir.glob("*.png"))
    if not files:
        raise ValueError(f"{gt_dir}: no PNG files")
    evaluator = SemanticEvaluator(num_classes, ignore_label)
    for gt_path in files:
        pred_path = pred_dir / gt_path.name
        if not pred_path.is_file():
            raise FileNotFoundError(f"prediction {pred_path} for {gt_path.name} does not exist")
        modes = ("L", "P", "I", "I;16")
        gt = read_label_png(gt_path, "ground-truth", modes)
        pred = read_label_png(pred_path, "predicted", modes)
        evaluator.add(gt, pred, where=str(pred_path))
    return {**evaluator.compute(), "images": len(files)}
