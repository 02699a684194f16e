"""Video instance segmentation AP (YouTube-VIS), through pycocotools' COCOeval.

The YouTube-VIS toolkit is COCOeval with one change: the IoU of two tubes is
sum_t |d_t ∩ g_t| / sum_t |d_t ∪ g_t| over the video's frames (a frame where only one of them
exists adds its area to the union; frames where both are absent add nothing; an empty union
gives 0), and an instance's area is the mean of its non-empty per-frame areas. We reuse
pycocotools' matching, accumulation and summary by overriding only `computeIoU`. Unlike the
toolkit (which zips frame lists), tubes of different lengths are an error.
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
from omgseg.platform.evaluation.metrics.instance import ThingEvaluator

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10")

Tube = list  # per frame: a COCO RLE dict, or None where the object is absent


def tube_iou(pred: Tube, gt: Tube, crowd: bool = False) -> float:
    """Spatio-temporal IoU of two tubes of equal length (crowd: intersection over |pred|)."""
    if len(pred) != len(gt):
        raise ValueError(f"tubes have {len(pred)} and {len(gt)} frames")
    inter = union = 0.0
    for d, g in zip(pred, gt):
        d_area = float(mask_utils.area(d)) if d is not None else 0.0
        g_area = float(mask_utils.area(g)) if g is not None else 0.0
        both = float(mask_utils.area(mask_utils.merge([d, g], intersect=True))) if d is not None and g is not None else 0.0
        inter += both
        union += d_area if crowd else d_area + g_area - both
    return inter / union if union > 0 else 0.0


def _mean_area(tube: Tube) -> float:
    areas = [float(mask_utils.area(r)) for r in tube if r is not None]
    areas = [a for a in areas if a > 0]
    return sum(areas) / len(areas) if areas else 0.0


class _TubeEval(COCOeval):
    """COCOeval whose IoU is the tube IoU; annotations carry their tube under 'tube'."""

    def computeIoU(self, imgId, catId):  # noqa: N802 - pycocotools' name
        p = self.params
        gts = self._gts[imgId, catId] if p.useCats else [g for c in p.catIds for g in self._gts[imgId, c]]
        dts = self._dts[imgId, catId] if p.useCats else [d for c in p.catIds for d in self._dts[imgId, c]]
        if not gts or not dts:
            return []
        order = np.argsort([-d["score"] for d in dts], kind="mergesort")
        dts = [dts[i] for i in order[: p.maxDets[-1]]]
        return np.array([[tube_iou(d["tube"], g["tube"], bool(g["iscrowd"])) for g in gts] for d in dts])


class VideoInstanceEvaluator(ThingEvaluator):
    """reset / add one video / merge / compute (YouTube-VIS AP, AR1, AR10)."""

    KEY = "video_id"

    def add(self, video_id: int, gt_masks: np.ndarray, gt_categories: Sequence[int], gt_iscrowd: Sequence[bool],
            pred_masks: np.ndarray, pred_categories: Sequence[int], pred_scores: Sequence[float],
            where: str = "video") -> None:
        """gt_masks (N, T, H, W) and pred_masks (K, T, H, W) bool; categories are data set ids."""
        if gt_masks.ndim != 4 or pred_masks.ndim != 4:
            raise ValueError(f"{where}: masks must be (N, T, H, W), got {gt_masks.shape} and {pred_masks.shape}")
        if len(pred_masks) and len(gt_masks) and pred_masks.shape[1:] != gt_masks.shape[1:]:
            raise ValueError(f"{where}: predicted tubes are {pred_masks.shape[1:]}, ground truth {gt_masks.shape[1:]}")
        self._open({"id": video_id}, pred_categories, where)
        for tube, category, crowd in zip(gt_masks, gt_categories, gt_iscrowd):
            if int(category) in self._ids:
                self.gt.append({"video_id": video_id, "category_id": int(category), "iscrowd": int(bool(crowd)),
                                "tube": _encode_tube(tube)})
        for tube, category, score in zip(pred_masks, pred_categories, pred_scores):
            self.results.append({"video_id": video_id, "category_id": int(category), "score": float(score),
                                 "tube": _encode_tube(tube)})

    def compute(self) -> dict:
        return tube_ap(*self.in_order(), self.categories)


def _encode_tube(tube: np.ndarray) -> Tube:
    out = []
    for frame in tube:
        if frame.any():
            rle = mask_utils.encode(np.asfortranarray(frame.astype(np.uint8)))
            out.append(rle)
        else:
            out.append(None)
    return out


def tube_ap(videos: list[dict], gt: list[dict], results: list[dict], categories: Sequence[Category]) -> dict:
    if not results:
        return {name: 0.0 for name in STAT_NAMES}
    images = [{"id": v["id"]} for v in videos]
    cats = [{"id": c.id, "name": c.name} for c in categories]

    def annotations(items: list[dict], with_score: bool) -> list[dict]:
        out = []
        for k, a in enumerate(items, start=1):
            ann = {"id": k, "image_id": a["video_id"], "category_id": a["category_id"], "tube": a["tube"],
                   "area": _mean_area(a["tube"]), "iscrowd": a.get("iscrowd", 0), "bbox": [0, 0, 0, 0]}
            if with_score:
                ann["score"] = a["score"]
            out.append(ann)
        return out

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt, coco_dt = COCO(), COCO()
        coco_gt.dataset = {"images": images, "categories": cats, "annotations": annotations(gt, False)}
        coco_dt.dataset = {"images": images, "categories": cats, "annotations": annotations(results, True)}
        coco_gt.createIndex()
        coco_dt.createIndex()
        evaluator = _TubeEval(coco_gt, coco_dt, iouType="bbox")  # 'bbox': no mask conversion; IoU is ours
        evaluator.params.maxDets = [1, 10, 100]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    values = list(stats[:6]) + [stats[6], stats[7]]
    return {name: 100 * max(float(v), 0.0) for name, v in zip(STAT_NAMES, values)}


def evaluate_ytvis(gt_json: Path, pred_json: Path) -> dict:
    """AP of a YouTube-VIS results JSON against a YouTube-VIS annotation JSON."""
    with field_errors(f"{gt_json} / {pred_json}", name_values=False):
        return _evaluate_ytvis(Path(gt_json), Path(pred_json))


def _evaluate_ytvis(gt_json: Path, pred_json: Path) -> dict:
    gt, results = (read_json(p) for p in (gt_json, pred_json))
    for key in ("videos", "annotations", "categories"):
        if not isinstance(gt, dict) or not isinstance(gt.get(key), list):
            raise ValueError(f"{gt_json}: a YouTube-VIS JSON needs {key!r}")
    if not isinstance(results, list):
        raise ValueError(f"{pred_json}: YouTube-VIS results are a list")
    lengths = {v["id"]: len(v["file_names"]) for v in gt["videos"]}
    sizes = {v["id"]: (int(v["height"]), int(v["width"])) for v in gt["videos"]}
    categories = [Category(int(c["id"]), str(c["name"]), True) for c in gt["categories"]]
    known = {c.id for c in categories}

    def tube(segmentations: list, where: str, video: int) -> Tube:
        if len(segmentations) != lengths[video]:
            raise ValueError(f"{where}: {len(segmentations)} frames, video {video} has {lengths[video]}")
        for t, s in enumerate(segmentations):
            if s is not None:
                check_segmentation(s, *sizes[video], f"{where} frame {t}")
        return [None if s is None else _as_rle(s, sizes[video], where) for s in segmentations]

    videos = [{"id": v["id"]} for v in gt["videos"]]
    gt_items = [{"video_id": a["video_id"], "category_id": a["category_id"], "iscrowd": a.get("iscrowd", 0),
                 "tube": tube(a["segmentations"], f"{gt_json} annotation {a.get('id')}", a["video_id"])}
                for a in gt["annotations"]]
    pred_items = []
    for k, r in enumerate(results):
        for key in ("video_id", "category_id", "segmentations", "score"):
            if key not in r:
                raise ValueError(f"{pred_json}: result {k} has no {key!r} field")
        if r["video_id"] not in lengths:
            raise ValueError(f"{pred_json}: result {k} refers to video {r['video_id']} not in {gt_json}")
        if r["category_id"] not in known:
            raise ValueError(f"{pred_json}: result {k} has category id {r['category_id']} not in {gt_json}")
        pred_items.append({"video_id": r["video_id"], "category_id": r["category_id"], "score": r["score"],
                           "tube": tube(r["segmentations"], f"{pred_json} result {k}", r["video_id"])})
    return tube_ap(videos, gt_items, pred_items, categories)


def _as_rle(segmentation, size: tuple[int, int], where: str) -> dict:
    """A frame's segmentation (polygons, uncompressed or compressed RLE) -> compressed RLE."""
    h, w = size
    if isinstance(segmentation, list):  # polygons
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        raise ValueError(f"{where}: a frame's segmentation must be polygons or RLE with 'counts' and 'size'")
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, h, w)
    counts = segmentation["counts"]
    return {"size": segmentation["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}

