"""`omgseg eval vipseg`: VPQ read from VIPSeg's public files (its COCO-video ground truth and
the pred.json + pan_pred/ PNGs its eval_vpq_vspw.py reads), by hand and on synthetic data."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omgseg.datasets.clip import encode_id_map_rgb
from omgseg.datasets.synth import SynthSizes, write_synthetic
from omgseg.platform.cli import main
from omgseg.platform.evaluation.metrics.video_panoptic import evaluate_vipseg

SIZES = SynthSizes(coco_train=1, coco_val=1, ade_train=1, ade_val=1, video_train=2, video_val=3)


@pytest.fixture(scope="module")
def vipseg(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("synth"), formats=["vipseg"], seed=0, sizes=SIZES)["vipseg"]


def save_ids(path: Path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(encode_id_map_rgb(np.asarray(ids))).save(path)


def perfect_prediction(gt: dict) -> dict:
    """pred.json of a prediction that is the ground truth itself."""
    return {"annotations": [
        {"video_id": v["video_id"], "annotations": [
            {"file_name": f["file_name"], "segments_info": [{"id": s["id"], "category_id": s["category_id"]}
                                                            for s in f["segments_info"]]}
            for f in v["annotations"]]}
        for v in gt["annotations"]]}


def test_synthetic_ground_truth_matches_the_raw_panomasks(vipseg):
    """The COCO-video files say what the raw 16-bit masks say: id = raw value (200 -> void),
    category by VIPSeg's value rule, area from the PNG; one JSON per split of train/val.txt."""
    base = vipseg / "VIPSeg_720P"
    categories = {c["id"]: c for c in json.loads((base / "panoVIPSeg_categories.json").read_text())}
    seen_200 = False
    for split in ("train", "val"):
        gt = json.loads((base / f"panoptic_gt_VIPSeg_{split}.json").read_text())
        videos = (vipseg / f"{split}.txt").read_text().split()
        assert [v["video_id"] for v in gt["videos"]] == [a["video_id"] for a in gt["annotations"]] == videos
        assert {c["id"]: c for c in gt["categories"]} == categories
        for video, ann in zip(gt["videos"], gt["annotations"]):
            raw_names = sorted(p.name for p in (base / "panomasks" / video["video_id"]).iterdir())
            assert [i["file_name"] for i in video["images"]] == [f["file_name"] for f in ann["annotations"]] == raw_names
            for image, frame in zip(video["images"], ann["annotations"]):
                with Image.open(base / "panomasks" / video["video_id"] / image["file_name"]) as png:
                    raw = np.asarray(png).astype(np.int64)
                with Image.open(base / "panomasksRGB" / video["video_id"] / image["file_name"]) as png:
                    assert png.mode == "RGB" and png.size == (image["width"], image["height"])
                    rgb = np.asarray(png).astype(np.int64)
                ids = rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]
                seen_200 |= bool((raw == 200).any())
                assert np.array_equal(ids, np.where(raw == 200, 0, raw))
                assert frame["image_id"] == image["id"] == Path(image["file_name"]).stem
                expected = {}
                for value in set(np.unique(ids).tolist()) - {0}:
                    category = value // 100 - 1 if value > 124 else value - 1
                    assert categories[category]["isthing"] == (value > 124)
                    expected[value] = {"id": value, "category_id": category, "iscrowd": 0, "area": int((ids == value).sum())}
                assert {s["id"]: s for s in frame["segments_info"]} == expected
    assert seen_200


def test_synthetic_ground_truth_as_prediction_scores_100(vipseg, tmp_path):
    base = vipseg / "VIPSeg_720P"
    gt_json = base / "panoptic_gt_VIPSeg_val.json"
    gt = json.loads(gt_json.read_text())
    pred_json = tmp_path / "pred.json"
    pred_json.write_text(json.dumps(perfect_prediction(gt)))
    out = evaluate_vipseg(gt_json, base / "panomasksRGB", pred_json, base / "panomasksRGB")
    assert out["videos"] == SIZES.video_val
    assert out["frames"] == sum(len(v["images"]) for v in gt["videos"])
    for n in (1, 2, 4, 6, 8):
        assert out[f"VPQ@{n}"] == pytest.approx(100) and out[f"VPQ@{n}_th"] == pytest.approx(100)
        assert out[f"VPQ@{n}_st"] == pytest.approx(100)
    assert out["VPQ"] == pytest.approx(100)

    # An identity switch: a track seen in frames 2 and 3 gets a new id from frame 3 on. Every
    # frame stays perfect (VPQ@1 100); the windows spanning frames 2-3 see two tubes.
    video = gt["videos"][0]["video_id"]
    frames = gt["annotations"][0]["annotations"]
    seen = [{s["id"] for s in frames[t]["segments_info"] if s["id"] > 124} for t in (2, 3)]
    assert seen[0] & seen[1], "no thing is visible in both frames 2 and 3"
    switched, fresh = min(seen[0] & seen[1]), 2**24 - 1
    swapped = tmp_path / "swapped"
    pred = perfect_prediction(gt)
    for t, (image, frame) in enumerate(zip(gt["videos"][0]["images"], pred["annotations"][0]["annotations"])):
        with Image.open(base / "panomasksRGB" / video / image["file_name"]) as png:
            rgb = np.asarray(png).astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]
        if t >= 3:
            ids[ids == switched] = fresh
            for s in frame["segments_info"]:
                s["id"] = fresh if s["id"] == switched else s["id"]
        save_ids(swapped / video / image["file_name"], ids)
    for v in gt["videos"][1:]:
        for image in v["images"]:
            with Image.open(base / "panomasksRGB" / v["video_id"] / image["file_name"]) as png:
                (swapped / v["video_id"]).mkdir(parents=True, exist_ok=True)
                png.save(swapped / v["video_id"] / image["file_name"])
    pred_json.write_text(json.dumps(pred))
    out = evaluate_vipseg(gt_json, base / "panomasksRGB", pred_json, swapped)
    assert out["VPQ@1"] == pytest.approx(100)
    assert out["VPQ@2"] < 100 and out["VPQ@8"] < out["VPQ@1"]


# ---------------------------------------------------------------------------------------------
# A case computed by hand: one video of 2 frames, 4x4 pixels. Categories: 0 sky (stuff),
# 4 circle (thing). Ground truth, both frames:
#     1 1 1 1        1 = sky, 501 = circle instance 1, 0 = void
#     1 1 1 1
#   501 501 0 0
#   501 501 0 0
# Prediction (S = 131079, a sky id that needs the blue channel: 2 * 65536 + 7):
#   frame 0            frame 1
#   S  S  S  S         S  S  S  S
#   S  S  S  S         S  S  S  21     sky pixel (1, 3) taken by circle 21
#   20 20 0  0         21 21 22 0      circle 22 lies on void only
#   20 20 0  0         21 21 22 0
#
# VPQ@1 (two single-frame windows):
#   frame 0: sky IoU 1 (TP), circle 20 IoU 1 (TP).
#   frame 1: sky 7 of 8 px, union 8: IoU 7/8 (TP). circle 21: 5 px, 4 on 501, union 4 + 5 - 4 = 5:
#            IoU 4/5 (TP). 22 unmatched, 2/2 px on void: ignored (not a FP).
#   sky:    TP 2, IoU sum 1 + 7/8,  PQ = (15/8) / 2 = 93.75
#   circle: TP 2, IoU sum 1 + 4/5,  PQ = (9/5) / 2  = 90
#   VPQ@1 = (93.75 + 90) / 2 = 91.875
# VPQ@2 (one window, frames 0-1):
#   sky tube 16 px, pred S 15 px all on sky: IoU 15/16 (TP): PQ 93.75.
#   circle tube 501: 8 px. Tube 20: 4 px, IoU 4 / (8 + 4 - 4) = 0.5, not > 0.5. Tube 21: 5 px,
#   IoU 4 / (8 + 5 - 4) = 4/9. No match: FN 1; 20 and 21 are FPs (none of it on void); 22 is
#   on void: ignored. circle: TP 0, FP 2, FN 1: PQ 0.
#   VPQ@2 = (93.75 + 0) / 2 = 46.875, VPQ = (91.875 + 46.875) / 2 = 69.375.

S = 2 * 65536 + 7
GT_FRAME = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [501, 501, 0, 0], [501, 501, 0, 0]])
PRED_FRAMES = [
    np.array([[S, S, S, S], [S, S, S, S], [20, 20, 0, 0], [20, 20, 0, 0]]),
    np.array([[S, S, S, S], [S, S, S, 21], [21, 21, 22, 0], [21, 21, 22, 0]]),
]
PRED_SEGMENTS = [{S: 0, 20: 4}, {S: 0, 21: 4, 22: 4}]
CATEGORIES = [{"id": 0, "name": "sky", "isthing": 0, "color": [70, 130, 180]},
              {"id": 4, "name": "circle", "isthing": 1, "color": [220, 20, 60]}]


def write_case(root: Path, pred_frames=PRED_FRAMES, pred_segments=PRED_SEGMENTS, video="vid") -> tuple[Path, ...]:
    """The hand case as files: (gt_json, gt_dir, pred_json, pred_dir)."""
    gt_dir, pred_dir = root / "panomasksRGB", root / "pan_pred"
    names = [f"{t:05d}.png" for t in range(2)]
    gt_segments = [{"id": 1, "category_id": 0, "iscrowd": 0, "area": 8},
                   {"id": 501, "category_id": 4, "iscrowd": 0, "area": 4}]
    for name in names:
        save_ids(gt_dir / video / name, GT_FRAME)
    for name, ids in zip(names, pred_frames):
        save_ids(pred_dir / video / name, ids)
    gt = {
        "videos": [{"video_id": video, "images": [{"id": n[:-4], "width": 4, "height": 4, "file_name": n} for n in names]}],
        "annotations": [{"video_id": video, "annotations": [
            {"image_id": n[:-4], "file_name": n, "segments_info": gt_segments} for n in names]}],
        "categories": CATEGORIES,
    }
    pred = {"annotations": [{"video_id": video, "annotations": [
        {"file_name": n, "segments_info": [{"id": i, "category_id": c} for i, c in segs.items()]}
        for n, segs in zip(names, pred_segments)]}]}
    gt_json, pred_json = root / "panoptic_gt_VIPSeg_val.json", root / "pred.json"
    gt_json.write_text(json.dumps(gt))
    pred_json.write_text(json.dumps(pred))
    return gt_json, gt_dir, pred_json, pred_dir


def test_hand_computed_case(tmp_path):
    out = evaluate_vipseg(*write_case(tmp_path), windows=(1, 2))
    assert out["VPQ@1"] == pytest.approx(91.875)
    assert out["VPQ@1_st"] == pytest.approx(93.75) and out["VPQ@1_th"] == pytest.approx(90.0)
    assert out["VPQ@2"] == pytest.approx(46.875)
    assert out["VPQ@2_st"] == pytest.approx(93.75) and out["VPQ@2_th"] == pytest.approx(0.0)
    assert out["VPQ"] == pytest.approx(69.375)
    assert out["videos"] == 1 and out["frames"] == 2
    # VIPSeg's default windows: 4, 6 and 8 frames do not fit a 2-frame video and are skipped.
    default = evaluate_vipseg(*write_case(tmp_path))
    assert "VPQ@4" not in default and default["VPQ"] == pytest.approx(69.375)


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_pred_png_id_missing_from_segments_info_names_the_png(tmp_path):
    gt_json, gt_dir, pred_json, pred_dir = write_case(tmp_path, pred_segments=[{S: 0, 20: 4}, {S: 0, 21: 4}])
    with pytest.raises(ValueError, match=r"pan_pred/vid/00001\.png: segment ids \[22\] are in the PNG but not"):
        evaluate_vipseg(gt_json, gt_dir, pred_json, pred_dir)


def test_segments_info_id_absent_from_the_png_names_the_png(tmp_path):
    files = write_case(tmp_path, pred_segments=[{S: 0, 20: 4, 99: 4}, PRED_SEGMENTS[1]])
    with pytest.raises(ValueError, match=r"pan_pred/vid/00000\.png: segments_info ids \[99\]"):
        evaluate_vipseg(*files)


def test_missing_pred_png(tmp_path):
    gt_json, gt_dir, pred_json, pred_dir = write_case(tmp_path)
    (pred_dir / "vid" / "00001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"predicted PNG .*pan_pred/vid/00001\.png does not exist"):
        evaluate_vipseg(gt_json, gt_dir, pred_json, pred_dir)


def test_video_missing_from_pred_json(tmp_path):
    gt_json, gt_dir, pred_json, pred_dir = write_case(tmp_path)
    edit_json(pred_json, lambda d: d["annotations"][0].update(video_id="other"))
    with pytest.raises(ValueError, match=r"pred\.json: no prediction for video 'vid'"):
        evaluate_vipseg(gt_json, gt_dir, pred_json, pred_dir)


def test_frame_count_mismatch(tmp_path):
    gt_json, gt_dir, pred_json, pred_dir = write_case(tmp_path)
    edit_json(pred_json, lambda d: d["annotations"][0]["annotations"].pop())
    with pytest.raises(ValueError, match=r"pred\.json: video 'vid' has 1 frame entries, the ground truth 2"):
        evaluate_vipseg(gt_json, gt_dir, pred_json, pred_dir)


def test_pred_file_name_differing_from_the_gt_frame_names_both(tmp_path):
    gt_json, gt_dir, pred_json, pred_dir = write_case(tmp_path)
    edit_json(pred_json, lambda d: d["annotations"][0]["annotations"].reverse())  # paired by position
    with pytest.raises(ValueError, match=r"frame 0 is '00001\.png', but the ground-truth image there is '00000\.png'"):
        evaluate_vipseg(gt_json, gt_dir, pred_json, pred_dir)


def test_unknown_category_and_size_mismatch(tmp_path):
    files = write_case(tmp_path / "a", pred_segments=[{S: 0, 20: 9}, PRED_SEGMENTS[1]])
    with pytest.raises(ValueError, match=r"pred\.json: video 'vid' frame 0 \(00000\.png\): segment 20 has unknown category id 9"):
        evaluate_vipseg(*files)
    files = write_case(tmp_path / "b", pred_frames=[PRED_FRAMES[0], PRED_FRAMES[1][:3]])
    with pytest.raises(ValueError, match=r"pan_pred/vid/00001\.png: prediction is 4x3 \(WxH\), ground truth"):
        evaluate_vipseg(*files)


def test_a_segment_id_keeps_its_category_across_the_video(tmp_path):
    # Frame 1 reuses the sky id for the circle: one id, two tubes.
    frames = [PRED_FRAMES[0], np.where(PRED_FRAMES[1] == 21, S, PRED_FRAMES[1])]
    files = write_case(tmp_path, pred_frames=frames, pred_segments=[{S: 0, 20: 4}, {S: 4, 22: 4}])
    with pytest.raises(ValueError, match=rf"00001\.png: segment {S} has category 4 here but 0 in an earlier frame"):
        evaluate_vipseg(*files)


def test_cli_prints_one_json_line_and_fails_in_one_line(tmp_path, capsys):
    gt_json, gt_dir, pred_json, pred_dir = write_case(tmp_path)
    args = ["eval", "vipseg", "--gt-json", str(gt_json), "--gt-dir", str(gt_dir), "--pred-dir", str(pred_dir)]
    assert main([*args, "--pred-json", str(pred_json), "--out", str(tmp_path / "vpq.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["VPQ@1"] == pytest.approx(91.875) and result["VPQ@2"] == pytest.approx(46.875)
    assert json.loads((tmp_path / "vpq.json").read_text()) == result

    missing = tmp_path / "nowhere" / "pred.json"
    assert main([*args, "--pred-json", str(missing)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [f"omgseg eval: error: {missing} does not exist"]

    assert main(args) == 1  # no --pred-json at all
    assert capsys.readouterr().err.strip() == "omgseg eval: error: eval vipseg needs --pred-json"
