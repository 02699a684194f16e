"""Interactive segmentation: simulated clicks, mIoU after k clicks and NoC (RITM / SimpleClick).

Every non-crowd segment of the ground truth (stuff included) is one instance, as in OMG-Seg's
COCO-SAM protocol. The first click is the point inside the mask farthest from its boundary;
each next click goes into the larger error region (false negatives or false positives, the
one whose interior point lies deeper), at its interior-most point, positive for missed object
pixels and negative for wrong ones. NoC@t is the number of clicks until IoU >= t (the maximum,
20, when never reached); NoF@t counts instances that never reach t. mIoU@k averages over
instances (not classes).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import distance_transform_edt


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) pixel centre of the point of `mask` farthest from its boundary (first in raster
    order on ties). The image border counts as boundary, as it does for a user."""
    if not mask.any():
        raise ValueError("cannot click on an empty mask")
    distance = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(distance)), mask.shape)
    return col + 0.5, row + 0.5


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 1.0


def next_click(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float, bool] | None:
    """(x, y, positive) of the corrective click, or None when the prediction is exact."""
    missed = gt & ~pred
    wrong = pred & ~gt
    depth_missed = distance_transform_edt(np.pad(missed, 1))[1:-1, 1:-1]
    depth_wrong = distance_transform_edt(np.pad(wrong, 1))[1:-1, 1:-1]
    if depth_missed.max(initial=0) == 0 and depth_wrong.max(initial=0) == 0:
        return None
    positive = depth_missed.max() >= depth_wrong.max()
    depth = depth_missed if positive else depth_wrong
    row, col = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return col + 0.5, row + 0.5, bool(positive)


class InteractiveEvaluator:
    """reset / add one instance's IoU after each click / merge / compute (percent)."""

    def __init__(self, max_clicks: int = 20, thresholds: tuple[float, ...] = (0.85, 0.90),
                 miou_at: tuple[int, ...] = (1, 3, 5)) -> None:
        if max_clicks < max(miou_at):
            raise ValueError(f"max_clicks {max_clicks} must cover mIoU@{max(miou_at)}")
        self.max_clicks = max_clicks
        self.thresholds = thresholds
        self.miou_at = miou_at
        self.reset()

    def reset(self) -> None:
        self.curves: list[list[float]] = []  # per instance: IoU after click 1, 2, ...

    def add(self, ious: list[float], where: str = "instance") -> None:
        """IoUs after each click; a shorter list (the simulation stopped once the prediction
        was exact) is extended with its last value."""
        if not ious or len(ious) > self.max_clicks:
            raise ValueError(f"{where}: need 1 to {self.max_clicks} IoUs, got {len(ious)}")
        self.curves.append(list(ious) + [ious[-1]] * (self.max_clicks - len(ious)))

    def merge(self, other: InteractiveEvaluator) -> InteractiveEvaluator:
        self.curves += other.curves
        return self

    def compute(self) -> dict:
        if not self.curves:
            return {"instances": 0}
        curves = np.asarray(self.curves)
        out: dict = {f"mIoU@{k}": 100 * float(curves[:, k - 1].mean()) for k in self.miou_at}
        for t in self.thresholds:
            reached = curves >= t
            clicks = np.where(reached.any(1), reached.argmax(1) + 1, self.max_clicks)
            out[f"NoC@{round(100 * t)}"] = float(clicks.mean())
            out[f"NoF@{round(100 * t)}"] = int((~reached.any(1)).sum())
        out["instances"] = len(self.curves)
        return out
