"""Instance segmentation mask AP through pycocotools' COCOeval(iouType="segm") itself.

Results carry no `bbox` (as detectron2 writes them): with one, `loadRes` would use the box
area for the small/medium/large split instead of the mask area.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from omgseg.core.structures import Category
from omgseg.platform.evaluation.metrics.files import check_segmentation, field_errors, read_json

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def encode(mask: np.ndarray) -> dict:
    """(H, W) bool -> COCO compressed RLE with a str `counts` (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


class ThingEvaluator:
    """What the image and the video AP evaluators share: thing categories only, and per image
    (or video, named by `KEY`) its entry, ground truth and results. Workers' states merge by
    concatenation and are put in id order when computed, so merged workers give exactly the
    numbers of one process."""

    KEY = "image_id"

    def __init__(self, categories: Sequence[Category]) -> None:
        self.categories = [c for c in categories if c.isthing]
        self._ids = {c.id for c in self.categories}
        self.reset()

    def reset(self) -> None:
        self.entries: list[dict] = []  # one per image (or video): {"id", ...}
        self.gt: list[dict] = []
        self.results: list[dict] = []

    def _open(self, entry: dict, pred_categories: Sequence[int], where: str) -> None:
        """Check the predicted categories and record the image's (or video's) entry."""
        unknown = sorted({int(c) for c in pred_categories} - self._ids)
        if unknown:
            raise ValueError(f"{where}: predicted category ids {unknown} are not thing categories {sorted(self._ids)}")
        self.entries.append(entry)

    def merge(self, other: ThingEvaluator) -> ThingEvaluator:
        self.entries += other.entries
        self.gt += other.gt
        self.results += other.results
        return self

    def in_order(self) -> tuple[list[dict], list[dict], list[dict]]:
        """Entries, ground truth and results sorted by image (or video) id, each image's own order kept."""
        return (sorted(self.entries, key=lambda e: e["id"]), sorted(self.gt, key=lambda a: a[self.KEY]),
                sorted(self.results, key=lambda r: r[self.KEY]))


class InstanceEvaluator(ThingEvaluator):
    """reset / add one image's ground truth and predictions / merge / compute (COCO mask AP)."""

    def add(self, image_id: int, gt_masks: np.ndarray, gt_categories: Sequence[int], gt_iscrowd: Sequence[bool],
            pred_masks: np.ndarray, pred_categories: Sequence[int], pred_scores: Sequence[float],
            where: str = "prediction") -> None:
        """gt_masks (N, H, W) and pred_masks (K, H, W) bool; categories are data set ids."""
        height, width = gt_masks.shape[-2:] if gt_masks.ndim == 3 and gt_masks.shape[0] else pred_masks.shape[-2:]
        if pred_masks.ndim != 3 or (pred_masks.shape[0] and pred_masks.shape[-2:] != (height, width)):
            raise ValueError(f"{where}: predicted masks are {pred_masks.shape}, image is {height}x{width}")
        self._open({"id": image_id, "height": int(height), "width": int(width)}, pred_categories, where)
        for mask, category, crowd in zip(gt_masks, gt_categories, gt_iscrowd):
            if int(category) not in self._ids:
                continue  # stuff: not an instance
            rle = encode(mask)
            self.gt.append({"image_id": image_id, "category_id": int(category), "segmentation": rle,
                            "area": float(mask.sum()), "iscrowd": int(bool(crowd)), "bbox": list(mask_utils.toBbox(rle))})
        for mask, category, score in zip(pred_masks, pred_categories, pred_scores):
            self.results.append({"image_id": image_id, "category_id": int(category),
                                 "segmentation": encode(mask), "score": float(score)})

    def compute(self) -> dict:
        images, gt, results = self.in_order()
        annotations = [{**a, "id": k} for k, a in enumerate(gt, start=1)]
        return coco_mask_ap({"images": images, "annotations": annotations,
                             "categories": [{"id": c.id, "name": c.name} for c in self.categories]}, results)


def coco_mask_ap(gt: dict, results: list[dict]) -> dict:
    """COCOeval segm on in-memory ground truth (COCO instances dict) and results."""
    if not results:
        return {name: 0.0 for name in STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([{k: v for k, v in r.items() if k != "bbox"} for r in results])
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: 100 * max(float(v), 0.0) for name, v in zip(STAT_NAMES, evaluator.stats[:6])}


def evaluate_coco_instances(gt_json: Path, pred_json: Path) -> dict:
    """Mask AP of a COCO results JSON (RLE + score) against a COCO instances JSON."""
    with field_errors(f"{gt_json} / {pred_json}", name_values=False):
        return _evaluate_coco_instances(Path(gt_json), Path(pred_json))


def _evaluate_coco_instances(gt_json: Path, pred_json: Path) -> dict:
    for path in (gt_json, pred_json):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
    gt, results = (read_json(p) for p in (gt_json, pred_json))
    if not isinstance(results, list):
        raise ValueError(f"{pred_json}: COCO results are a list of detections")
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt, dict) or not isinstance(gt.get(key), list):
            raise ValueError(f"{gt_json}: a COCO instances JSON needs an {key!r} list")
    known = {c["id"] for c in gt["categories"]}
    sizes = {i["id"]: (i["height"], i["width"]) for i in gt["images"]}
    for k, a in enumerate(gt["annotations"]):
        if a["image_id"] not in sizes:
            raise ValueError(f"{gt_json}: annotations[{k}] refers to image {a['image_id']} not in its images")
        check_segmentation(a["segmentation"], *sizes[a["image_id"]], f"{gt_json}: annotations[{k}]")
    for k, r in enumerate(results):
        for key in ("image_id", "category_id", "segmentation", "score"):
            if not isinstance(r, dict) or key not in r:
                raise ValueError(f"{pred_json}: result {k} has no {key!r} field")
        if r["category_id"] not in known:
            raise ValueError(f"{pred_json}: result {k} has category id {r['category_id']} not in {gt_json}")
        if r["image_id"] not in sizes:
            raise ValueError(f"{pred_json}: result {k} refers to image {r['image_id']} not in {gt_json}")
        check_segmentation(r["segmentation"], *sizes[r["image_id"]], f"{pred_json}: result {k}")
    return coco_mask_ap(gt, results)

