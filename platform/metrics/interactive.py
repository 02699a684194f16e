"""Interactive segmentation with one click, OMG-Seg's COCO-SAM protocol.

Every non-crowd segment of the ground truth (stuff included) is one instance; the click is the
point inside its mask farthest from the mask's boundary (distance transform); the score is
the mean IoU over all instances (not over classes): mIoU@1.

Multi-click protocols (NoC@85/90, mIoU@3/5) need several positive clicks per prompt, which the
model's prompt encoder does not take yet (it takes one positive click plus negatives).
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


class InteractiveEvaluator:
    """reset / add one instance's predicted and true mask / merge / compute (mIoU@1, percent)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.iou_sum = 0.0
        self.count = 0

    def add(self, pred: np.ndarray, gt: np.ndarray, where: str = "instance") -> None:
        if pred.shape != gt.shape:
            raise ValueError(f"{where}: predicted mask is {pred.shape}, ground truth {gt.shape}")
        union = np.logical_or(pred, gt).sum()
        self.iou_sum += float(np.logical_and(pred, gt).sum() / union) if union else 1.0
        self.count += 1

    def merge(self, other: InteractiveEvaluator) -> InteractiveEvaluator:
        self.iou_sum += other.iou_sum
        self.count += other.count
        return self

    def compute(self) -> dict:
        return {"mIoU@1": 100 * self.iou_sum / self.count if self.count else 0.0, "instances": self.count}
