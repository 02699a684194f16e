"""Video panoptic quality (VPQ), as VIPSeg's and VPSNet's evaluation define it.

For each window length n, every window of n consecutive frames (stride 1) is stacked into one
volume; segments become tubes (areas summed over the window) and are matched with the PQ rules
(`pq_stats`). TP, FP, FN and IoU sums add up over all windows of all videos; VPQ@n is the
class mean of PQ from those sums, and VPQ the mean over the window lengths. VIPSeg's own
script uses n = 1, 2, 4, 6, 8; windows longer than a video are skipped for that video.

`evaluate_vipseg` reads VIPSeg's public files (the ground truth its
create_panoptic_video_labels.py writes, predictions as its eval_vpq_vspw.py reads them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from omgseg.core.structures import Category
from omgseg.platform.evaluation.metrics.files import field_errors, read_id_png, read_json
from omgseg.platform.evaluation.metrics.panoptic import GtSegment, PQStats, pq_stats, pq_summary

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


# ---------------------------------------------------------------------------------------------
# VIPSeg result files


def _json_object(path: Path, keys: Sequence[str]) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    for key in keys:
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: needs a {key!r} list")
    return data


def _field(entry: object, key: str, where: str):
    if not isinstance(entry, dict) or key not in entry:
        raise ValueError(f"{where} has no {key!r} field")
    return entry[key]


def _by_video(data: dict, path: Path) -> dict[str, list]:
    """{video_id: its list of per-frame entries} from an 'annotations' list; a video listed
    twice is an error (the reference would silently keep the last)."""
    out: dict[str, list] = {}
    for k, entry in enumerate(data["annotations"]):
        where = f"{path}: annotations[{k}]"
        video_id = _field(entry, "video_id", where)
        frames = _field(entry, "annotations", where)
        if not isinstance(frames, list):
            raise ValueError(f"{where}: 'annotations' must be a list of frames")
        if video_id in out:
            raise ValueError(f"{where}: video {video_id!r} is listed twice")
        out[video_id] = frames
    return out


def _frame_segments(entry: dict, where: str, categories: Mapping[int, Category]) -> dict[int, dict]:
    """{id: segment} of one frame's segments_info; one id listed twice must keep its category."""
    info = _field(entry, "segments_info", where)
    if not isinstance(info, list):
        raise ValueError(f"{where}: 'segments_info' must be a list")
    out: dict[int, dict] = {}
    for s in info:
        seg_id, category = int(_field(s, "id", f"{where} segment")), int(_field(s, "category_id", f"{where} segment"))
        if category not in categories:
            raise ValueError(f"{where}: segment {seg_id} has unknown category id {category}; "
                             f"known: {sorted(categories)}")
        if seg_id in out and out[seg_id]["category_id"] != category:
            raise ValueError(f"{where}: segment {seg_id} is listed with categories "
                             f"{out[seg_id]['category_id']} and {category}")
        out[seg_id] = {"category_id": category, "iscrowd": bool(s.get("iscrowd", 0))}
    return out


def _check_drawn(ids: np.ndarray, segments: Mapping[int, dict], png: Path, json_path: Path) -> None:
    """Every id in the PNG is listed for that frame and every listed id is in the PNG."""
    drawn = set(np.unique(ids).tolist()) - {0}
    missing = sorted(drawn - set(segments))
    if missing:
        raise ValueError(f"{png}: segment ids {missing} are in the PNG but not in its segments_info in {json_path}")
    absent = sorted(set(segments) - drawn)
    if absent:
        raise ValueError(f"{png}: segments_info ids {absent} in {json_path} do not occur in the PNG")


def _add_to_tubes(tubes: dict[int, tuple[int, bool]], frame: Mapping[int, dict], where: str) -> None:
    """A segment id names one tube across the video, so it must keep one category."""
    for seg_id, s in frame.items():
        value = (s["category_id"], s["iscrowd"])
        if tubes.setdefault(seg_id, value)[0] != value[0]:
            raise ValueError(f"{where}: segment {seg_id} has category {value[0]} here but "
                             f"{tubes[seg_id][0]} in an earlier frame of the video")


def evaluate_vipseg(gt_json: Path, gt_dir: Path, pred_json: Path, pred_dir: Path,
                    windows: Sequence[int] = VIPSEG_WINDOWS) -> dict:
    """VPQ of predictions in VIPSeg's result format against its COCO-video ground truth.

    gt_json: `{"videos": [{"video_id", "images": [{"id", "width", "height", "file_name"}]}],
    "annotations": [{"video_id", "annotations": [{"image_id", "file_name", "segments_info":
    [{"id", "category_id", "iscrowd", "area"}]}]}], "categories": [...]}` as VIPSeg's
    create_panoptic_video_labels.py and splitjson.py write it (panoptic_gt_VIPSeg_val.json);
    gt_dir/<video_id>/<file_name>: RGB id PNGs (panomasksRGB/). pred_json: `{"annotations":
    [{"video_id", "annotations": [{"file_name"?, "segments_info": [{"id", "category_id"}]}]}]}`;
    pred_dir/<video_id>/<file_name of the ground-truth image>: RGB id PNGs (pan_pred/).

    As VIPSeg's eval_vpq_vspw.py: every video of gt_json is scored, its ground-truth and
    predicted frame entries are paired by position and must be as many; predicted videos
    absent from the ground truth are ignored. Areas come from the PNGs (the ground truth's
    JSON areas are what the reference sums, and create_panoptic_video_labels.py takes them
    from the same PNGs). Stricter than the reference: a segment id must keep its category
    across a video (the reference takes each window's first frame), a prediction entry's
    file_name, when given, must be the ground-truth frame's, and the ids a PNG draws must be
    those its frame lists in both files (the reference checks this for the prediction, and
    create_panoptic_video_labels.py for the ground truth it writes).

    Returns VideoPanopticEvaluator.compute() (VPQ@n and VPQ@n_th / _st per window, VPQ,
    "videos") plus "frames".
    """
    with field_errors(f"{gt_json} / {pred_json}", name_values=False):
        return _evaluate_vipseg(Path(gt_json), Path(gt_dir), Path(pred_json), Path(pred_dir), windows)


def _evaluate_vipseg(gt_json: Path, gt_dir: Path, pred_json: Path, pred_dir: Path,
                     windows: Sequence[int] = VIPSEG_WINDOWS) -> dict:
    gt_json, gt_dir, pred_json, pred_dir = map(Path, (gt_json, gt_dir, pred_json, pred_dir))
    gt = _json_object(gt_json, ("videos", "annotations", "categories"))
    pred = _json_object(pred_json, ("annotations",))
    categories = [Category.from_json(c, str(gt_json)) for c in gt["categories"]]
    by_id = {c.id: c for c in categories}
    if len(by_id) != len(categories):
        raise ValueError(f"{gt_json}: category ids are not unique")
    gt_frames, pred_frames = _by_video(gt, gt_json), _by_video(pred, pred_json)
    evaluator = VideoPanopticEvaluator(categories, windows)
    frames = 0
    for k, video in enumerate(gt["videos"]):
        video_id = _field(video, "video_id", f"{gt_json}: videos[{k}]")
        images = _field(video, "images", f"{gt_json}: video {video_id!r}")
        if video_id not in gt_frames:
            raise ValueError(f"{gt_json}: video {video_id!r} has no entry in 'annotations'")
        if video_id not in pred_frames:
            raise ValueError(f"{pred_json}: no prediction for video {video_id!r} (listed in {gt_json})")
        gt_entries, pred_entries = gt_frames[video_id], pred_frames[video_id]
        if len(gt_entries) != len(images):
            raise ValueError(f"{gt_json}: video {video_id!r} lists {len(images)} images but "
                             f"{len(gt_entries)} annotations")
        if len(pred_entries) != len(images):
            raise ValueError(f"{pred_json}: video {video_id!r} has {len(pred_entries)} frame entries, "
                             f"the ground truth {len(images)} ({gt_json})")
        if not images:
            raise ValueError(f"{gt_json}: video {video_id!r} has no frames")
        gt_maps, pred_maps = [], []
        gt_tubes: dict[int, tuple[int, bool]] = {}
        pred_tubes: dict[int, tuple[int, bool]] = {}
        for t, (image, gt_entry, pred_entry) in enumerate(zip(images, gt_entries, pred_entries)):
            name = _field(image, "file_name", f"{gt_json}: video {video_id!r} images[{t}]")
            for path, entry in ((gt_json, gt_entry), (pred_json, pred_entry)):
                if isinstance(entry, dict) and entry.get("file_name", name) != name:
                    raise ValueError(f"{path}: video {video_id!r} frame {t} is {entry['file_name']!r}, "
                                     f"but the ground-truth image there is {name!r} ({gt_json})")
            gt_png, pred_png = gt_dir / video_id / name, pred_dir / video_id / name
            gt_ids = read_id_png(gt_png, f"{gt_json}: video {video_id!r} frame {t}: ground-truth")
            pred_ids = read_id_png(pred_png, f"{pred_json}: video {video_id!r} frame {t}: predicted")
            if pred_ids.shape != gt_ids.shape:
                raise ValueError(f"{pred_png}: prediction is {pred_ids.shape[1]}x{pred_ids.shape[0]} (WxH), "
                                 f"ground truth {gt_png} is {gt_ids.shape[1]}x{gt_ids.shape[0]}")
            if gt_maps and gt_ids.shape != gt_maps[0].shape:
                raise ValueError(f"{gt_png}: is {gt_ids.shape[1]}x{gt_ids.shape[0]} (WxH), but the first frame "
                                 f"of video {video_id!r} is {gt_maps[0].shape[1]}x{gt_maps[0].shape[0]}")
            gt_segments = _frame_segments(gt_entry, f"{gt_json}: video {video_id!r} frame {t} ({name})", by_id)
            pred_segments = _frame_segments(pred_entry, f"{pred_json}: video {video_id!r} frame {t} ({name})", by_id)
            _check_drawn(gt_ids, gt_segments, gt_png, gt_json)
            _check_drawn(pred_ids, pred_segments, pred_png, pred_json)
            _add_to_tubes(gt_tubes, gt_segments, str(gt_png))
            _add_to_tubes(pred_tubes, pred_segments, str(pred_png))
            gt_maps.append(gt_ids)
            pred_maps.append(pred_ids)
        evaluator.add(np.stack(gt_maps), gt_tubes, np.stack(pred_maps), {i: c for i, (c, _) in pred_tubes.items()},
                      where=f"{pred_dir / video_id}")  # (T, H, W) volumes
        frames += len(images)
    return {**evaluator.compute(), "frames": frames}
