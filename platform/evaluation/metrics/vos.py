"""Video object segmentation: DAVIS 2017 region (J) and boundary (F) measures.

Follows davis2017-evaluation: J is mask IoU (1 when both masks are empty); F compares
1-pixel boundary maps with a tolerance disk of radius ceil(0.008 x image diagonal); the first
and last frames of each sequence are not scored; per object: mean, recall (share of frames
above 0.5) and decay (first quarter of the frames minus the last); J&F is the mean of the
J and F means over all objects.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy.ndimage import binary_dilation

from omgseg.platform.evaluation.metrics.files import read_label_png

BOUNDARY_TOLERANCE = 0.008


def j_measure(pred: np.ndarray, gt: np.ndarray) -> float:
    union = np.logical_or(pred, gt).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, gt).sum() / union)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` that differ from their right, lower or lower-right neighbour."""
    mask = mask.astype(bool)
    right = np.zeros_like(mask)
    down = np.zeros_like(mask)
    diag = np.zeros_like(mask)
    right[:, :-1] = mask[:, 1:]
    down[:-1, :] = mask[1:, :]
    diag[:-1, :-1] = mask[1:, 1:]
    edges = (mask ^ right) | (mask ^ down) | (mask ^ diag)
    edges[-1, :] = mask[-1, :] ^ right[-1, :]
    edges[:, -1] = mask[:, -1] ^ down[:, -1]
    edges[-1, -1] = False
    return edges


def _disk(radius: int) -> np.ndarray:
    y, x = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    return x * x + y * y <= radius * radius


def f_measure(pred: np.ndarray, gt: np.ndarray) -> float:
    radius = math.ceil(BOUNDARY_TOLERANCE * math.hypot(*gt.shape))
    pred_b, gt_b = boundary_map(pred), boundary_map(gt)
    n_pred, n_gt = int(pred_b.sum()), int(gt_b.sum())
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0 or n_gt == 0:
        return 0.0  # precision or recall is 0
    disk = _disk(radius)
    precision = float((pred_b & binary_dilation(gt_b, disk)).sum() / n_pred)
    recall = float((gt_b & binary_dilation(pred_b, disk)).sum() / n_gt)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _statistics(per_frame: np.ndarray) -> tuple[float, float, float]:
    """Mean, recall (> 0.5) and decay (first quarter minus last quarter) of per-frame values."""
    if per_frame.size == 0:
        return float("nan"), float("nan"), float("nan")
    edges = np.round(np.linspace(1, per_frame.size, 5) + 1e-10).astype(int) - 1
    bins = [per_frame[edges[i]:edges[i + 1] + 1] for i in range(4)]
    return float(per_frame.mean()), float((per_frame > 0.5).mean()), float(bins[0].mean() - bins[3].mean())


class VOSEvaluator:
    """reset / add one sequence / merge / compute (J&F and its parts, in percent)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.objects: list[dict] = []  # per object: J and F statistics

    def add(self, sequence: str, gt: np.ndarray, pred: np.ndarray) -> None:
        """gt, pred: (N objects, T, H, W) bool; object n of pred is the prediction for object n of gt."""
        if gt.ndim != 4 or gt.shape != pred.shape:
            raise ValueError(f"{sequence}: need equal (objects, T, H, W) masks, got {gt.shape} and {pred.shape}")
        frames = range(1, gt.shape[1] - 1)  # the first (given) and last frames are not scored
        for n in range(gt.shape[0]):
            j = np.array([j_measure(pred[n, t], gt[n, t]) for t in frames])
            f = np.array([f_measure(pred[n, t], gt[n, t]) for t in frames])
            self.objects.append({"sequence": sequence, "object": n + 1, "J": _statistics(j), "F": _statistics(f)})

    def merge(self, other: VOSEvaluator) -> VOSEvaluator:
        self.objects += other.objects
        return self

    def compute(self) -> dict:
        # In (sequence, object) order: merged workers give exactly the numbers of one process.
        scored = sorted((o for o in self.objects if not math.isnan(o["J"][0])), key=lambda o: (o["sequence"], o["object"]))
        if not scored:
            return {"J&F": 0.0, "objects": 0}
        out = {}
        for measure in ("J", "F"):
            stats = np.array([o[measure] for o in scored])
            out[f"{measure}-Mean"], out[f"{measure}-Recall"], out[f"{measure}-Decay"] = (100 * stats.mean(0)).tolist()
        out["J&F"] = (out["J-Mean"] + out["F-Mean"]) / 2
        out["objects"] = len(scored)
        return out


def _read_palette(path: Path) -> np.ndarray:
    """A DAVIS mask: a palette (or grey) PNG of object indices."""
    return read_label_png(path, "DAVIS mask", ("P", "L"))


def evaluate_davis(gt_dir: Path, pred_dir: Path) -> dict:
    """J&F of prediction folders against DAVIS `Annotations/480p`-style folders (one sub-folder
    of palette PNGs per sequence, pixel value = object index, 0 = background)."""
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"ground-truth folder {gt_dir} does not exist")
    evaluator = VOSEvaluator()
    sequences = sorted(p for p in gt_dir.iterdir() if p.is_dir())
    if not sequences:
        raise ValueError(f"{gt_dir}: no sequence folders")
    for seq in sequences:
        gt_files = sorted(seq.glob("*.png"))
        if not gt_files:
            raise ValueError(f"{seq}: no PNG masks")
        masks = [_read_palette(p) for p in gt_files]
        shapes = {m.shape for m in masks}
        if len(shapes) > 1:
            raise ValueError(f"{seq}: its masks differ in size ({sorted(shapes)})")
        gt = np.stack(masks)
        preds = []
        for p in gt_files:
            pred_path = pred_dir / seq.name / p.name
            if not pred_path.is_file():
                raise FileNotFoundError(f"prediction {pred_path} does not exist")
            preds.append(_read_palette(pred_path))
        if any(p.shape != gt.shape[1:] for p in preds):
            raise ValueError(f"{pred_dir / seq.name}: masks differ in size from the ground truth {gt.shape[1:]}")
        pred = np.stack(preds)
        if pred.shape != gt.shape:
            raise ValueError(f"{pred_dir / seq.name}: masks are {pred.shape[1:]}, ground truth {gt.shape[1:]}")
        ids = [int(i) for i in np.unique(gt) if i not in (0, 255)]
        evaluator.add(seq.name, np.stack([gt == i for i in ids]), np.stack([pred == i for i in ids]))
    return evaluator.compute()
