"""Interactive segmentation: simulated clicks, mIoU after k clicks and NoC, placed and counted as
RITM's evaluation does it (SamsungLabs/ritm_interactive_segmentation, isegm/inference/clicker.py
and utils.py; SimpleClick uses the same code).

Every non-crowd segment of the ground truth (stuff included) is one object, as in OMG-Seg's
COCO-SAM protocol. A `Clicker` places each click: into the error region (missed object pixels,
or wrongly predicted ones) whose interior lies deeper, at its pixel farthest from the region's
boundary (the image border counts as boundary), never on a pixel clicked before; positive only
when the missed region is strictly deeper (a tie gives a negative click). The first click is
the same rule on an empty prediction: the interior-most point of the object.

NoC@t is the number of the first click with IoU >= t (the maximum, 20, when never reached);
NoF@t counts the objects whose NoC@t is the maximum (so one that reaches t exactly at the last
click counts, as in RITM). mIoU@k averages over objects (not classes). docs/evaluation.md says
where the simulation departs from RITM and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from scipy.ndimage import distance_transform_edt


@dataclass(frozen=True)
class Click:
    """One click: (x, y) the pixel centre, positive on the object or negative off it."""

    x: float
    y: float
    positive: bool


def _deepest(region: np.ndarray, allowed: np.ndarray) -> tuple[float, int, int]:
    """(distance, row, col) of the pixel of `region` farthest from its boundary among the
    `allowed` ones; the first in raster order on ties; (0, -1, -1) when there is none.

    The distance transform runs on the region's bounding box with a one-pixel margin only,
    not the whole frame: every pixel outside the box is background, so the nearest background
    pixel of a pixel inside is within the margin or closer, and the values are the same."""
    rows, cols = np.nonzero(region.any(1))[0], np.nonzero(region.any(0))[0]
    if rows.size == 0:
        return 0.0, -1, -1
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = np.pad(region[top:bottom, left:right], 1)  # the margin: zeros (the image border too)
    depth = distance_transform_edt(crop)[1:-1, 1:-1] * allowed[top:bottom, left:right]
    flat = int(np.argmax(depth))  # raster order inside the box is raster order in the frame
    row, col = divmod(flat, depth.shape[1])
    return float(depth[row, col]), top + row, left + col


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) pixel centre of the point of `mask` farthest from its boundary (first in raster
    order on ties): the first click. The image border counts as boundary, as it does for a user."""
    if not mask.any():
        raise ValueError("cannot click on an empty mask")
    _, row, col = _deepest(mask, np.ones(mask.shape, dtype=bool))
    return col + 0.5, row + 0.5


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 1.0


class Clicker:
    """The clicks on one object (RITM's clicker): `first()`, then `next(prediction)` after each
    answer of the model. Pixels clicked before are never clicked again, so a model that ignores
    a click gets its next click elsewhere."""

    def __init__(self, gt: np.ndarray) -> None:
        if gt.ndim != 2 or gt.dtype != bool:
            raise ValueError(f"the object's mask must be (H, W) bool, got {gt.dtype} {gt.shape}")
        if not gt.any():
            raise ValueError("cannot click on an empty mask")
        self.gt = gt
        self.not_clicked = np.ones(gt.shape, dtype=bool)
        self.clicks: list[Click] = []

    def first(self) -> Click:
        """The first click: the interior-most point of the object (the rule below on an empty prediction)."""
        click = self.next(np.zeros_like(self.gt))
        assert click is not None  # a non-empty object always has an unclicked missed pixel at first
        return click

    def next(self, pred: np.ndarray) -> Click | None:
        """The corrective click for prediction `pred` (H, W) bool, or None when no error pixel is
        left to click (the prediction is exact, or wrong only on clicked pixels)."""
        if pred.shape != self.gt.shape:
            raise ValueError(f"prediction is {pred.shape}, the object's mask {self.gt.shape}")
        missed, row_m, col_m = _deepest(self.gt & ~pred, self.not_clicked)
        wrong, row_w, col_w = _deepest(pred & ~self.gt, self.not_clicked)
        if missed == 0 and wrong == 0:
            return None
        positive = missed > wrong
        row, col = (row_m, col_m) if positive else (row_w, col_w)
        self.not_clicked[row, col] = False
        click = Click(col + 0.5, row + 0.5, positive)
        self.clicks.append(click)
        return click


class InteractiveEvaluator:
    """reset / add one object's IoU after each click / merge / compute (percent).

    The state is sums over objects (IoU sums as exact fractions), so merged workers give
    exactly the numbers of one process whatever the order."""

    def __init__(self, max_clicks: int = 20, thresholds: tuple[float, ...] = (0.85, 0.90),
                 miou_at: tuple[int, ...] = (1, 3, 5)) -> None:
        if max_clicks < max(miou_at):
            raise ValueError(f"max_clicks {max_clicks} must cover mIoU@{max(miou_at)}")
        self.max_clicks = max_clicks
        self.thresholds = tuple(thresholds)
        self.miou_at = tuple(miou_at)
        self.reset()

    def reset(self) -> None:
        self.objects = 0
        self.iou_sums = {k: Fraction(0) for k in self.miou_at}  # IoU after click k, summed
        self.noc_sums = dict.fromkeys(self.thresholds, 0)  # NoC@t summed
        self.failures = dict.fromkeys(self.thresholds, 0)  # objects with NoC@t = max_clicks

    def wants_more(self, ious: Sequence[float]) -> bool:
        """Whether the simulation should click this object again after `ious`. As RITM's
        evaluate_sample with its target IoU at the highest threshold and its minimum number of
        clicks at the largest k of mIoU@k: later clicks would change none of the numbers."""
        n = len(ious)
        return n < self.max_clicks and not (n >= max(self.miou_at) and ious[-1] >= max(self.thresholds))

    def add(self, ious: Sequence[float], where: str = "object") -> None:
        """The object's IoU after click 1, 2, ...; a list that stops early (the simulation's
        rule above, or no pixel left to click) keeps its last mask, so its last IoU holds for
        the later clicks."""
        if not ious or len(ious) > self.max_clicks:
            raise ValueError(f"{where}: need 1 to {self.max_clicks} IoUs, got {len(ious)}")
        curve = np.asarray(list(ious) + [ious[-1]] * (self.max_clicks - len(ious)))
        for k in self.miou_at:
            self.iou_sums[k] += Fraction(float(curve[k - 1]))
        for t in self.thresholds:
            reached = np.flatnonzero(curve >= t)
            clicks = int(reached[0]) + 1 if reached.size else self.max_clicks
            self.noc_sums[t] += clicks
            self.failures[t] += clicks == self.max_clicks
        self.objects += 1

    def merge(self, other: InteractiveEvaluator) -> InteractiveEvaluator:
        if (other.max_clicks, other.thresholds, other.miou_at) != (self.max_clicks, self.thresholds, self.miou_at):
            raise ValueError("cannot merge interactive evaluators with different settings")
        self.objects += other.objects
        for k in self.miou_at:
            self.iou_sums[k] += other.iou_sums[k]
        for t in self.thresholds:
            self.noc_sums[t] += other.noc_sums[t]
            self.failures[t] += other.failures[t]
        return self

    def compute(self) -> dict:
        if not self.objects:
            return {"instances": 0}
        out: dict = {f"mIoU@{k}": 100 * float(self.iou_sums[k] / self.objects) for k in self.miou_at}
        for t in self.thresholds:
            out[f"NoC@{round(100 * t)}"] = self.noc_sums[t] / self.objects
            out[f"NoF@{round(100 * t)}"] = self.failures[t]
        out["instances"] = self.objects
        return out
