"""Video panoptic quality (VPQ), as VIPSeg's and VPSNet's evaluation define it.

For each window length n, every window of n consecutive frames (stride 1) is stacked into one
volume; segments become tubes (areas summed over the window) and are matched with the PQ rules
(`pq_stats`). TP, FP, FN and IoU sums add up over all windows of all videos; VPQ@n is the
class mean of PQ from those sums, and VPQ the mean over the window lengths. VIPSeg's own
script uses n = 1, 2, 4, 6, 8; windows longer than a video are skipped for that video.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from omgseg.datasets.clip import Category
from omgseg.platform.metrics.panoptic import GtSegment, PQStats, pq_stats, pq_summary

VIPSEG_WINDOWS = (1, 2, 4, 6, 8)


class VideoPanopticEvaluator:
    """reset / add one video / merge / compute."""

    def __init__(self, categories: Sequence[Category], windows: Sequence[int] = VIPSEG_WINDOWS) -> None:
        if not windows or min(windows) < 1:
            raise ValueError(f"window lengths must be >= 1, got {list(windows)}")
        self.categories = list(categories)
        self._by_id = {c.id: c for c in self.categories}
        self.windows = tuple(windows)
        self.reset()

    def reset(self) -> None:
        self.stats = {n: PQStats() for n in self.windows}
        self.videos = 0

    def add(self, gt_ids: np.ndarray, gt_segments: Mapping[int, tuple[int, bool]], pred_ids: np.ndarray,
            pred_segments: Mapping[int, int], where: str = "video") -> None:
        """gt_ids / pred_ids (T, H, W); gt_segments {id: (category id, iscrowd)} with areas
        taken from the maps per window; pred_segments {id: category id}."""
        if gt_ids.ndim != 3 or gt_ids.shape != pred_ids.shape:
            raise ValueError(f"{where}: need equal (T, H, W) maps, got {gt_ids.shape} and {pred_ids.shape}")
        t = gt_ids.shape[0]
        for n in self.windows:
            for start in range(t - n + 1):
                gt, pred = gt_ids[start:start + n], pred_ids[start:start + n]
                ids, counts = np.unique(gt, return_counts=True)
                area = dict(zip(ids.tolist(), counts.tolist()))
                window_gt = {k: GtSegment(c, crowd, area[k]) for k, (c, crowd) in gt_segments.items() if k in area}
                present = set(np.unique(pred).tolist())
                window_pred = {k: c for k, c in pred_segments.items() if k in present}
                self.stats[n].merge(pq_stats(gt, window_gt, pred, window_pred, self._by_id, f"{where} frames {start}..{start + n - 1}"))
        self.videos += 1

    def merge(self, other: VideoPanopticEvaluator) -> VideoPanopticEvaluator:
        for n in self.windows:
            self.stats[n].merge(other.stats[n])
        self.videos += other.videos
        return self

    def compute(self) -> dict:
        out: dict = {"videos": self.videos}
        values = []
        for n in self.windows:
            summary = pq_summary(self.stats[n], self.categories)
            if summary["N"] == 0:
                continue  # no video was long enough for this window
            out[f"VPQ@{n}"] = summary["PQ"]
            out[f"VPQ@{n}_th"] = summary["PQ_th"]
            out[f"VPQ@{n}_st"] = summary["PQ_st"]
            values.append(summary["PQ"])
        out["VPQ"] = sum(values) / len(values) if values else 0.0
        return out
