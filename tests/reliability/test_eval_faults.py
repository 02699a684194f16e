"""`omgseg eval` (every file metric) on damaged ground truth and predictions: one line naming
the file and exit 1 with no --out file, or exit 0 with the result written whole."""

import json
import shutil
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image
from reliability.faults import assert_one_line_error, budget_params, damaged_copy, fault_names, faults, files_under, fuzz, run_cli


def _rle(segm, height: int, width: int) -> dict:
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm["counts"], list):
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = segm
    counts = rle["counts"]
    return {"size": [height, width], "counts": counts.decode() if isinstance(counts, bytes) else counts}


def _coco_panoptic(src: Path, case: Path) -> list[str]:
    ann = src / "annotations"
    shutil.copy(ann / "panoptic_val2017.json", case / "gt.json")
    shutil.copytree(ann / "panoptic_val2017", case / "gt")
    shutil.copy(ann / "panoptic_val2017.json", case / "pred.json")
    shutil.copytree(ann / "panoptic_val2017", case / "pred")
    return ["--gt-json", "gt.json", "--gt-dir", "gt", "--pred-json", "pred.json", "--pred-dir", "pred"]


def _coco_instances(src: Path, case: Path) -> list[str]:
    gt = json.loads((src / "annotations" / "instances_val2017.json").read_text())
    sizes = {i["id"]: (i["height"], i["width"]) for i in gt["images"]}
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.9,
                "segmentation": _rle(a["segmentation"], *sizes[a["image_id"]])} for a in gt["annotations"]]
    (case / "gt.json").write_text(json.dumps(gt))
    (case / "pred.json").write_text(json.dumps(results))
    return ["--gt-json", "gt.json", "--pred-json", "pred.json"]


def _semantic(src: Path, case: Path) -> list[str]:
    panoptic = json.loads((src / "annotations" / "panoptic_val2017.json").read_text())
    for name in ("gt", "pred"):
        (case / name).mkdir()
    for ann in panoptic["annotations"]:
        with Image.open(src / "annotations" / "panoptic_val2017" / ann["file_name"]) as png:
            rgb = np.asarray(png).astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]
        labels = np.full(ids.shape, 255, np.uint8)
        for seg in ann["segments_info"]:
            labels[ids == seg["id"]] = seg["category_id"]
        for name in ("gt", "pred"):
            Image.fromarray(labels, mode="L").save(case / name / ann["file_name"])
    return ["--gt-dir", "gt", "--pred-dir", "pred", "--num-classes", "100"]


def _vipseg(src: Path, case: Path) -> list[str]:
    base = src / "VIPSeg_720P"
    gt = json.loads((base / "panoptic_gt_VIPSeg_val.json").read_text())
    pred = {"annotations": [
        {"video_id": v["video_id"], "annotations": [
            {"file_name": f["file_name"], "segments_info": [{"id": s["id"], "category_id": s["category_id"]}
                                                            for s in f["segments_info"]]}
            for f in v["annotations"]]}
        for v in gt["annotations"]]}
    (case / "gt.json").write_text(json.dumps(gt))
    (case / "pred.json").write_text(json.dumps(pred))
    videos = {v["video_id"] for v in gt["videos"]}
    for name in ("gt", "pred"):
        for video in videos:
            shutil.copytree(base / "panomasksRGB" / video, case / name / video)
    return ["--gt-json", "gt.json", "--gt-dir", "gt", "--pred-json", "pred.json", "--pred-dir", "pred"]


def _ytvis(src: Path, case: Path) -> list[str]:
    gt = json.loads((src / "valid.json").read_text())
    sizes = {v["id"]: (v["height"], v["width"]) for v in gt["videos"]}
    results = [{"video_id": a["video_id"], "category_id": a["category_id"], "score": 0.9,
                "segmentations": [None if s is None else _rle(s, *sizes[a["video_id"]]) for s in a["segmentations"]]}
               for a in gt["annotations"]]
    (case / "gt.json").write_text(json.dumps(gt))
    (case / "pred.json").write_text(json.dumps(results))
    return ["--gt-json", "gt.json", "--pred-json", "pred.json"]


def _davis(src: Path, case: Path) -> list[str]:
    for name in ("gt", "pred"):
        shutil.copytree(src / "Annotations" / "480p" / "val-seq000", case / name / "val-seq000")
    return ["--gt-dir", "gt", "--pred-dir", "pred"]


METRICS = {"coco-panoptic": ("coco-panoptic", _coco_panoptic), "coco-instances": ("coco-instances", _coco_instances),
           "semantic": ("coco-panoptic", _semantic), "vipseg": ("vipseg", _vipseg), "ytvis": ("ytvis", _ytvis),
           "davis": ("davis", _davis)}


@pytest.fixture(scope="module")
def eval_cases(sources, tmp_path_factory):
    """{metric: (folder of ground truth + a perfect prediction, eval arguments relative to it)}."""
    out = {}
    for metric, (fmt, build) in METRICS.items():
        case = tmp_path_factory.mktemp(f"eval-{metric}")
        out[metric] = (case, build(sources[fmt], case))
    return out


def _absolute(args: list[str], folder: Path) -> list[str]:
    return [a if a.startswith("--") or a.isdigit() else str(folder / a) for a in args]


@pytest.mark.parametrize("examples", budget_params(10, 200))
@pytest.mark.parametrize("metric", sorted(METRICS))
def test_eval_damaged_inputs(metric, examples, eval_cases, tmp_path):
    clean, args = eval_cases[metric]
    perfect = run_cli(["eval", metric, *_absolute(args, clean)])
    assert perfect.code == 0, perfect.err

    def check(fault) -> None:
        with damaged_copy(clean, fault, tmp_path) as folder:
            out = folder.parent / "result.json"
            outcome = run_cli(["eval", metric, *_absolute(args, folder), "--out", out])
            if outcome.code == 0:
                line = outcome.out.strip().splitlines()[-1]
                json.loads(line)
                assert out.read_text() == line + "\n", fault
            else:
                assert_one_line_error(outcome, "eval", fault_names(fault), fault)
                leftovers = list(folder.parent.glob("result.json*"))
                assert not leftovers, f"{fault}: a failed eval left {leftovers}"

    fuzz(faults(clean, files_under(clean)), check, examples)
