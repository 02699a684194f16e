"""Panoptic quality (PQ, SQ, RQ) with panopticapi's rules, for images and for video volumes.

Rules (panopticapi `pq_compute_single_core`, docs/reference.md): a (ground truth, prediction) pair
is a candidate unless the ground truth is crowd or the categories differ; union = pred area +
gt area - intersection - |pred ∩ void|; a match needs IoU > 0.5. Unmatched non-crowd ground
truth are false negatives. An unmatched prediction is not a false positive when more than
half of it lies on void or on a crowd region of its category (one crowd region per category,
the last one listed wins). Classes with no TP, FP or FN are left out of the averages.

Written here rather than calling panopticapi because it is not on PyPI, reads only files,
and cannot take video volumes (VPQ applies the same rules to stacked frames).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from omgseg.core.structures import Category
from omgseg.platform.evaluation.metrics.files import field_errors, read_id_png, read_json

OFFSET = 2**32  # id pairs are packed as gt * OFFSET + pred: ids are < 2**24 (RGB encoding)


@dataclass(frozen=True)
class GtSegment:
    category_id: int
    iscrowd: bool
    area: int  # panopticapi takes it from the JSON, not from the PNG


@dataclass
class PQStats:
    """Per category: sum of matched IoUs, TP, FP, FN. Summable across images and workers; the
    IoU sums are exact fractions, so the merged sum does not depend on the order of the merges."""

    iou: dict[int, Fraction] = field(default_factory=dict)
    tp: dict[int, int] = field(default_factory=dict)
    fp: dict[int, int] = field(default_factory=dict)
    fn: dict[int, int] = field(default_factory=dict)

    def add_match(self, category: int, iou: float) -> None:
        self.iou[category] = self.iou.get(category, 0) + Fraction(iou)
        self.tp[category] = self.tp.get(category, 0) + 1

    def merge(self, other: PQStats) -> PQStats:
        for name in ("iou", "tp", "fp", "fn"):
            mine, theirs = getattr(self, name), getattr(other, name)
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        return self


def _check_segments(pred_area: Mapping[int, int], pred_segments: Mapping[int, int],
                    gt_segments: Mapping[int, GtSegment], categories: Mapping[int, Category], where: str) -> None:
    """The prediction's map and segment list agree and every category is known; raises naming `where`."""
    missing = sorted(set(pred_area) - set(pred_segments))
    if missing:
        raise ValueError(f"{where}: segment ids {missing} are in the prediction map but not in its segments_info")
    unknown = sorted({c for c in pred_segments.values() if c not in categories})
    if unknown:
        raise ValueError(f"{where}: predicted category ids {unknown} are not in the category list")
    not_drawn = sorted(set(pred_segments) - set(pred_area))
    if not_drawn:
        raise ValueError(f"{where}: segments_info ids {not_drawn} do not occur in the prediction map")
    gt_unknown = sorted({s.category_id for s in gt_segments.values() if s.category_id not in categories})
    if gt_unknown:
        raise ValueError(f"{where}: ground-truth category ids {gt_unknown} are not in the category list")


def pq_stats(
    gt_ids: np.ndarray,
    gt_segments: Mapping[int, GtSegment],
    pred_ids: np.ndarray,
    pred_segments: Mapping[int, int],
    categories: Mapping[int, Category],
    where: str = "prediction",
) -> PQStats:
    """PQ statistics of one image (H, W) or one video volume (T, H, W).

    gt_ids / pred_ids: segment ids, 0 = void. gt_segments: {id: GtSegment}; pred_segments:
    {id: category id}. Raises naming `where` when ids and segment lists disagree.
    """
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"{where}: prediction is {pred_ids.shape}, ground truth {gt_ids.shape}")
    pred_labels, pred_areas = np.unique(pred_ids, return_counts=True)
    pred_area = dict(zip(pred_labels.tolist(), pred_areas.tolist()))
    pred_area.pop(0, None)
    _check_segments(pred_area, pred_segments, gt_segments, categories, where)
    pairs, counts = np.unique(gt_ids.astype(np.uint64) * OFFSET + pred_ids.astype(np.uint64), return_counts=True)
    intersection = {(int(p // OFFSET), int(p % OFFSET)): int(c) for p, c in zip(pairs.tolist(), counts.tolist())}

    stats = PQStats()
    matched: set[tuple[int, int]] = set()
    for (gt, pred), inter in intersection.items():
        g, category = gt_segments.get(gt), pred_segments.get(pred)
        if g is None or category is None or g.iscrowd or g.category_id != category:
            continue
        iou = inter / (pred_area[pred] + g.area - inter - intersection.get((0, pred), 0))
        if iou > 0.5:
            stats.add_match(g.category_id, iou)
            matched.add((gt, pred))
    _count_unmatched(stats, gt_segments, pred_segments, pred_area, intersection, matched)
    return stats


def _count_unmatched(stats: PQStats, gt_segments: Mapping[int, GtSegment], pred_segments: Mapping[int, int],
                     pred_area: Mapping[int, int], intersection: Mapping[tuple[int, int], int],
                     matched: set[tuple[int, int]]) -> None:
    """False negatives (unmatched non-crowd ground truth) and false positives (unmatched
    predictions, unless more than half of one lies on void or on its category's crowd region)."""
    gt_matched = {gt for gt, _ in matched}
    pred_matched = {pred for _, pred in matched}
    crowd_by_category: dict[int, int] = {}
    for gt, g in gt_segments.items():
        if g.iscrowd:
            crowd_by_category[g.category_id] = gt  # the last one wins, as in panopticapi
        elif gt not in gt_matched:
            stats.fn[g.category_id] = stats.fn.get(g.category_id, 0) + 1
    for pred, category in pred_segments.items():
        if pred in pred_matched:
            continue
        ignored = intersection.get((0, pred), 0)
        if category in crowd_by_category:
            ignored += intersection.get((crowd_by_category[category], pred), 0)
        if ignored / pred_area[pred] <= 0.5:
            stats.fp[category] = stats.fp.get(category, 0) + 1


def pq_summary(stats: PQStats, categories: Sequence[Category], class_groups: Mapping[str, set[int]] | None = None) -> dict:
    """PQ/SQ/RQ in percent over all, thing and stuff classes, plus per-class values.

    class_groups: {name: category ids}, e.g. the classes seen and unseen in training; each
    group adds PQ_<name>, SQ_<name>, RQ_<name> and N_<name> over its classes."""
    per_class = {}
    for c in categories:
        tp, fp, fn = stats.tp.get(c.id, 0), stats.fp.get(c.id, 0), stats.fn.get(c.id, 0)
        if tp + fp + fn == 0:
            continue
        iou = float(stats.iou.get(c.id, 0))
        denominator = tp + 0.5 * fp + 0.5 * fn
        per_class[c.id] = {
            "name": c.name, "isthing": c.isthing, "PQ": 100 * iou / denominator,
            "SQ": 100 * iou / tp if tp else 0.0, "RQ": 100 * tp / denominator, "TP": tp, "FP": fp, "FN": fn,
        }
    subsets = {"": lambda k, r: True, "_th": lambda k, r: r["isthing"], "_st": lambda k, r: not r["isthing"]}
    for name, ids in (class_groups or {}).items():
        subsets[f"_{name}"] = lambda k, r, ids=ids: k in ids
    out: dict = {}
    for suffix, keep in subsets.items():
        rows = [r for k, r in per_class.items() if keep(k, r)]
        for metric in ("PQ", "SQ", "RQ"):
            out[f"{metric}{suffix}"] = sum(r[metric] for r in rows) / len(rows) if rows else 0.0
        out[f"N{suffix}"] = len(rows)
    out["per_class"] = {str(k): v for k, v in per_class.items()}
    return out


class PanopticEvaluator:
    """reset / add one image (or volume) / merge another worker's / compute."""

    def __init__(self, categories: Sequence[Category], class_groups: Mapping[str, set[int]] | None = None) -> None:
        """class_groups: optional {name: category ids} reported separately (see pq_summary)."""
        self.categories = list(categories)
        self._by_id = {c.id: c for c in self.categories}
        self.class_groups = dict(class_groups or {})
        self.reset()

    def reset(self) -> None:
        self.stats = PQStats()
        self.count = 0

    def add(self, gt_ids: np.ndarray, gt_segments: Mapping[int, GtSegment], pred_ids: np.ndarray,
            pred_segments: Mapping[int, int], where: str = "prediction") -> None:
        self.stats.merge(pq_stats(gt_ids, gt_segments, pred_ids, pred_segments, self._by_id, where))
        self.count += 1

    def merge(self, other: PanopticEvaluator) -> PanopticEvaluator:
        self.stats.merge(other.stats)
        self.count += other.count
        return self

    def compute(self) -> dict:
        return {**pq_summary(self.stats, self.categories, self.class_groups), "images": self.count}


# ---------------------------------------------------------------------------------------------
# COCO panoptic files


def read_panoptic_json(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict) or "annotations" not in data:
        raise ValueError(f"{path}: a COCO panoptic JSON needs an 'annotations' list")
    return data


def evaluate_coco_panoptic(gt_json: Path, gt_dir: Path, pred_json: Path, pred_dir: Path) -> dict:
    """PQ of prediction files against ground-truth files, both in the COCO panoptic format."""
    with field_errors(f"{gt_json} / {pred_json}", name_values=False):
        return _evaluate_coco_panoptic(*map(Path, (gt_json, gt_dir, pred_json, pred_dir)))


def _evaluate_coco_panoptic(gt_json: Path, gt_dir: Path, pred_json: Path, pred_dir: Path) -> dict:
    gt = read_panoptic_json(gt_json)
    pred = read_panoptic_json(pred_json)
    if "categories" not in gt:
        raise ValueError(f"{gt_json}: needs a 'categories' list")
    categories = [Category.from_json(c, str(gt_json)) for c in gt["categories"]]
    predictions = {}
    for k, ann in enumerate(pred["annotations"]):
        for key in ("image_id", "file_name", "segments_info"):
            if key not in ann:
                raise ValueError(f"{pred_json}: annotations[{k}] has no {key!r} field")
        predictions[ann["image_id"]] = ann
    evaluator = PanopticEvaluator(categories)
    for ann in gt["annotations"]:
        image_id = ann["image_id"]
        if image_id not in predictions:
            raise ValueError(f"{pred_json}: no prediction for image {image_id} ({ann['file_name']})")
        p = predictions[image_id]
        gt_ids = read_id_png(gt_dir / ann["file_name"], f"{gt_json}: ground-truth")
        pred_ids = read_id_png(pred_dir / p["file_name"], f"{pred_json}: predicted")
        with field_errors(f"{gt_json}: segments_info of image {image_id}"):
            gt_segments = {int(s["id"]): GtSegment(int(s["category_id"]), bool(s.get("iscrowd", 0)), int(s["area"]))
                           for s in ann["segments_info"]}
        with field_errors(f"{pred_json}: segments_info of image {image_id}"):
            pred_segments = {int(s["id"]): int(s["category_id"]) for s in p["segments_info"]}
        evaluator.add(gt_ids, gt_segments, pred_ids, pred_segments, where=f"{pred_dir / p['file_name']}")
    return evaluator.compute()
