"""The synthetic generator writes the public layouts of docs/datasets.md.

Checked against the formats themselves (JSON, PIL, pycocotools), not against this
repository's readers, so a reader bug and a generator bug cannot hide each other.
"""

import hashlib
import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from omgseg.datasets.synth import SYNTH_FORMATS, SynthSizes, write_synthetic

SMALL = SynthSizes(
    height=64, width=80, coco_train=6, coco_val=3, ade_train=4, ade_val=2,
    video_train=3, video_val=2, min_frames=6, max_frames=8,
)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> dict[str, Path]:
    return write_synthetic(tmp_path_factory.mktemp("synth"), seed=3, sizes=SMALL)


def load(path: Path) -> object:
    return json.loads(path.read_text())


def rgb_ids(path: Path) -> np.ndarray:
    image = Image.open(path)
    assert image.mode == "RGB", path
    rgb = np.asarray(image).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def pixel_bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def decode_segmentation(segm: object, height: int, width: int) -> np.ndarray:
    """COCO's own rule (COCO.annToRLE): polygons and list-counts RLE go through frPyObjects."""
    if isinstance(segm, list) or isinstance(segm["counts"], list):
        rles = mask_utils.frPyObjects(segm, height, width)
        rle = mask_utils.merge(rles) if isinstance(rles, list) else rles
    else:
        rle = {"size": segm["size"], "counts": segm["counts"].encode("ascii")}
    return mask_utils.decode(rle).astype(bool)


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_returns_each_format_source_dir(synth):
    assert set(synth) == set(SYNTH_FORMATS)
    assert synth["coco-panoptic"] == synth["coco-instances"]
    assert {p.name for p in synth.values()} == {"coco", "ade", "vipseg", "ytvis", "davis"}


def check_panoptic(json_path: Path, png_dir: Path, image_dir: Path, count: int) -> tuple[dict, dict]:
    """Every id in each PNG is in segments_info and back; areas and bboxes are pixel-exact.
    Returns ({image id: id map}, {image id: segments_info})."""
    data = load(json_path)
    categories = {c["id"]: c for c in data["categories"]}
    for c in data["categories"]:
        assert set(c) >= {"id", "name", "supercategory", "isthing", "color"}
    images = {im["id"]: im for im in data["images"]}
    assert len(images) == len(data["annotations"]) == count
    id_maps, infos = {}, {}
    for ann in data["annotations"]:
        image = images[ann["image_id"]]
        with Image.open(image_dir / image["file_name"]) as jpg:
            assert jpg.format == "JPEG" and jpg.size == (image["width"], image["height"])
        ids = rgb_ids(png_dir / ann["file_name"])
        assert ids.shape == (image["height"], image["width"])
        info = {s["id"]: s for s in ann["segments_info"]}
        assert len(info) == len(ann["segments_info"])
        assert set(np.unique(ids).tolist()) - {0} == set(info)
        for seg_id, seg in info.items():
            mask = ids == seg_id
            assert seg["category_id"] in categories
            assert seg["area"] == int(mask.sum())
            assert seg["bbox"] == pixel_bbox(mask)
            assert seg["iscrowd"] in (0, 1)
        id_maps[ann["image_id"]] = ids
        infos[ann["image_id"]] = info
    assert any((m == 0).any() for m in id_maps.values()), "no void pixels"
    return id_maps, infos


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_panoptic_pngs_agree_with_json(synth, split):
    root = synth["coco-panoptic"]
    _, infos = check_panoptic(
        root / "annotations" / f"panoptic_{split}2017.json",
        root / "annotations" / f"panoptic_{split}2017",
        root / f"{split}2017",
        SMALL.count("coco", split),
    )
    assert any(s["iscrowd"] for info in infos.values() for s in info.values())


def test_coco_instances_decode_to_the_panoptic_masks(synth):
    root = synth["coco-instances"]
    kinds = set()
    for split in ("train", "val"):
        pan = load(root / "annotations" / f"panoptic_{split}2017.json")
        inst = load(root / "annotations" / f"instances_{split}2017.json")
        things = {c["id"] for c in pan["categories"] if c["isthing"]}
        assert {c["id"] for c in inst["categories"]} == things
        assert inst["images"] == pan["images"]
        ids = {a["image_id"]: rgb_ids(root / "annotations" / f"panoptic_{split}2017" / a["file_name"])
               for a in pan["annotations"]}
        segments = {s["id"]: s for a in pan["annotations"] for s in a["segments_info"]}
        images = {im["id"]: im for im in inst["images"]}
        covered = {i: np.zeros(m.shape, dtype=np.int64) for i, m in ids.items()}
        for ann in inst["annotations"]:
            image = images[ann["image_id"]]
            mask = decode_segmentation(ann["segmentation"], image["height"], image["width"])
            # Same object, same id, same pixels as in the panoptic PNG.
            assert np.array_equal(mask, ids[ann["image_id"]] == ann["id"]), ann["id"]
            seg = segments[ann["id"]]
            assert (ann["category_id"], ann["iscrowd"]) == (seg["category_id"], seg["iscrowd"])
            assert ann["area"] == seg["area"] and ann["bbox"] == seg["bbox"]
            covered[ann["image_id"]] += mask
            if isinstance(ann["segmentation"], list):
                kinds.add("polygon")
            elif isinstance(ann["segmentation"]["counts"], list):
                assert ann["iscrowd"] == 1
                kinds.add("uncompressed")
            else:
                assert isinstance(ann["segmentation"]["counts"], str)
                kinds.add("compressed")
        # Every panoptic thing is an instance annotation, and instance masks never overlap.
        inst_ids = {a["id"] for a in inst["annotations"]}
        assert inst_ids == {i for i, s in segments.items() if s["category_id"] in things}
        assert all(c.max() <= 1 for c in covered.values())
    assert kinds == {"polygon", "compressed", "uncompressed"}


@pytest.mark.parametrize("split", ["train", "val"])
def test_ade_panoptic_layout(synth, split):
    root = synth["ade-panoptic"] / "ADEChallengeData2016"
    folder = {"train": "training", "val": "validation"}[split]
    id_maps, _ = check_panoptic(
        root / f"ade20k_panoptic_{split}.json",
        root / f"ade20k_panoptic_{split}",
        root / "images" / folder,
        SMALL.count("ade", split),
    )
    assert all(isinstance(i, str) and i.startswith(f"ADE_{split}_") for i in id_maps)


def test_vipseg_values_follow_the_scheme(synth):
    root = synth["vipseg"]
    categories = {c["id"]: c for c in load(root / "VIPSeg_720P" / "panoVIPSeg_categories.json")}
    assert sorted(categories) == list(range(len(categories)))
    assert not categories[1]["isthing"], "200 must never be a legitimate thing value"
    seen_200 = False
    for split in ("train", "val"):
        videos = (root / f"{split}.txt").read_text().split()
        assert len(videos) == SMALL.count("vipseg", split)
        for video in videos:
            frames = sorted(p.stem for p in (root / "VIPSeg_720P" / "images" / video).glob("*.jpg"))
            masks = sorted(p.stem for p in (root / "VIPSeg_720P" / "panomasks" / video).glob("*.png"))
            assert frames == masks == [f"{t:05d}" for t in range(len(frames))]
            assert SMALL.min_frames <= len(frames) <= SMALL.max_frames
            per_frame = []
            for name in masks:
                with Image.open(root / "VIPSeg_720P" / "panomasks" / video / f"{name}.png") as png:
                    assert png.mode in ("I;16", "I") and png.size == (SMALL.width, SMALL.height)
                    values = np.asarray(png).astype(np.int64)
                per_frame.append(set(np.unique(values).tolist()))
                for v in per_frame[-1]:
                    if v == 200:
                        seen_200 = True
                    elif v > 124:
                        assert categories[v // 100 - 1]["isthing"], v
                    elif v > 0:
                        assert not categories[v - 1]["isthing"], v
            # Track values are stable: some thing value appears in more than one frame.
            things = [{v for v in f if v > 124 and v != 200} for f in per_frame]
            assert set.union(*things) and any(a & b for a, b in itertools.pairwise(things))
    assert seen_200


def test_ytvis_tracks_with_null_frames(synth):
    root = synth["ytvis"]
    nulls = 0
    for split, folder in (("train", "train"), ("val", "valid")):
        data = load(root / f"{folder}.json")
        categories = {c["id"] for c in data["categories"]}
        videos = {v["id"]: v for v in data["videos"]}
        assert len(videos) == SMALL.count("ytvis", split)
        for v in videos.values():
            assert v["length"] == len(v["file_names"])
            for t, name in enumerate(v["file_names"]):
                assert name.endswith(f"/{t:05d}.jpg")
                with Image.open(root / folder / "JPEGImages" / name) as jpg:
                    assert jpg.format == "JPEG" and jpg.size == (v["width"], v["height"])
        covered = {vid: np.zeros((v["length"], v["height"], v["width"]), np.int64) for vid, v in videos.items()}
        for ann in data["annotations"]:
            v = videos[ann["video_id"]]
            assert ann["category_id"] in categories and ann["iscrowd"] == 0
            assert len(ann["segmentations"]) == len(ann["areas"]) == len(ann["bboxes"]) == v["length"]
            for t, (segm, area, bbox) in enumerate(zip(ann["segmentations"], ann["areas"], ann["bboxes"])):
                if segm is None:
                    assert area is None and bbox is None
                    nulls += 1
                    continue
                assert isinstance(segm["counts"], str)
                mask = decode_segmentation(segm, v["height"], v["width"])
                assert area == int(mask.sum()) > 0 and bbox == pixel_bbox(mask)
                covered[ann["video_id"]][t] += mask
        assert all(c.max() <= 1 for c in covered.values())
    assert nulls > 0


def test_davis_palette_masks(synth):
    root = synth["davis"]
    for split in ("train", "val"):
        sequences = (root / "ImageSets" / "2017" / f"{split}.txt").read_text().split()
        assert len(sequences) == SMALL.count("davis", split)
        for seq in sequences:
            frames = sorted(p.name for p in (root / "JPEGImages" / "480p" / seq).iterdir())
            masks = sorted(p.name for p in (root / "Annotations" / "480p" / seq).iterdir())
            assert [f[:-4] for f in frames] == [m[:-4] for m in masks]
            assert frames[0] == "00000.jpg" and masks[0] == "00000.png"
            objects = []
            for name in masks:
                with Image.open(root / "Annotations" / "480p" / seq / name) as png:
                    assert png.mode == "P" and png.getpalette() is not None
                    objects.append(set(np.unique(np.asarray(png)).tolist()) - {0})
            # Semi-supervised VOS: every object of the sequence is given in the first frame.
            assert objects[0] and set.union(*objects) == objects[0]


def test_designed_relations(synth):
    coco = {c["name"]: c for c in load(synth["coco-panoptic"] / "annotations" / "panoptic_train2017.json")["categories"]}
    ade = {c["name"]: c for c in load(
        synth["ade-panoptic"] / "ADEChallengeData2016" / "ade20k_panoptic_train.json")["categories"]}
    vip = {c["name"]: c for c in load(synth["vipseg"] / "VIPSeg_720P" / "panoVIPSeg_categories.json")}
    ytvis = {c["name"]: c for c in load(synth["ytvis"] / "train.json")["categories"]}
    coco_things = {n for n, c in coco.items() if c["isthing"]}
    assert len(coco_things & set(ytvis)) >= 5 and len(coco_things & set(vip)) >= 3  # shared things
    assert {n for n, c in ade.items() if c["isthing"]} - set(coco)  # ADE-only things
    assert coco["ring"]["isthing"] and not ade["ring"]["isthing"]  # thing/stuff conflict
    assert any(coco[n]["id"] != vip[n]["id"] for n in set(coco) & set(vip))  # own ids


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    sizes = SynthSizes(height=48, width=64, coco_train=2, coco_val=1, ade_train=1, ade_val=1,
                       video_train=1, video_val=1, min_frames=5, max_frames=6)
    a = write_synthetic(tmp_path / "a", seed=7, sizes=sizes)
    write_synthetic(tmp_path / "b", seed=7, sizes=sizes)
    c = write_synthetic(tmp_path / "c", seed=8, sizes=sizes)
    d = write_synthetic(tmp_path / "d", formats=["davis"], seed=7, sizes=sizes)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")
    for fmt in a:
        assert tree_digest(a[fmt]) != tree_digest(c[fmt]), fmt
    # One format alone gives the same files as when written with all the others.
    assert tree_digest(d["davis"]) == tree_digest(a["davis"])


def test_unknown_format_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="coco-panoptic.*davis"):
        write_synthetic(tmp_path, formats=["coco-panoptic", "kitti"])
    assert not any(tmp_path.iterdir())


def test_sizes_are_validated():
    with pytest.raises(ValueError, match="min_frames"):
        SynthSizes(min_frames=9, max_frames=8)
    with pytest.raises(ValueError, match="at least one"):
        SynthSizes(coco_val=0)


def _thing_counts(panoptic_json):
    data = json.loads(panoptic_json.read_text())
    things = {c["id"]: c["name"] for c in data["categories"] if c["isthing"]}
    return Counter(things[s["category_id"]] for a in data["annotations"] for s in a["segments_info"]
                   if s["category_id"] in things)


def test_planted_data_sets_share_and_conflict_as_documented(tmp_path):
    import json

    from omgseg.datasets.planted import PLANTED, write_planted
    from omgseg.datasets.synth_scenes import image_scene

    PLANTED_LABELS, PLANTED_VARIANTS = PLANTED.labels, PLANTED.variants
    written = write_planted(tmp_path, PLANTED_VARIANTS)
    names = {v: {c["name"] for c in json.loads((written[v] / "annotations/panoptic_val2017.json").read_text())["categories"]}
             for v in PLANTED_VARIANTS}
    looks = {v: {(lab.name, lab.look) for lab in PLANTED_LABELS[v]} for v in PLANTED_VARIANTS}
    assert looks["twin"] == looks["anchor"]  # the same looks under the same names
    assert names["rival"] == names["anchor"] and not looks["rival"] & looks["anchor"]  # same names, permuted looks
    assert {lab.look for lab in PLANTED_LABELS["rival"]} == {lab.look for lab in PLANTED_LABELS["anchor"]}
    for alone, others in (("stranger", ("anchor", "twin", "rival")), ("placebo", ("anchor", "twin", "rival", "stranger"))):
        for other in others:  # the stranger and the placebo (the study's control) share no name and no look
            assert not names[alone] & names[other]
            assert not {lab.look for lab in PLANTED_LABELS[alone]} & {lab.look for lab in PLANTED_LABELS[other]}
    base_looks = {lab.look for lab in PLANTED_LABELS["base"]}
    assert all({lab.look for lab in PLANTED_LABELS[v]} <= base_looks for v in PLANTED_VARIANTS)  # every look pretrained
    twin = json.loads((written["twin"] / "annotations/panoptic_train2017.json").read_text())
    anchor = json.loads((written["anchor"] / "annotations/panoptic_train2017.json").read_text())
    assert twin["annotations"] != anchor["annotations"] and len(twin["images"]) == 48  # new images, not copies
    # Each one's train split holds rarely the class the other's holds often; val splits hold all alike.
    for variant, rare in (("anchor", "triangle"), ("twin", "circle")):
        counts = {split: _thing_counts(written[variant] / f"annotations/panoptic_{split}2017.json")
                  for split in ("train", "val")}
        assert counts["train"][rare] * 4 < min(n for name, n in counts["train"].items() if name != rare)
        assert counts["val"][rare] * 2 > max(counts["val"].values())
    with pytest.raises(ValueError, match=r"draw weights name \['triangel'\], which are not shape labels here"):
        image_scene(np.random.default_rng(0), PLANTED_LABELS["anchor"], 96, 128, False, 0.0, {"triangel": 0.1})
    again = write_planted(tmp_path / "again", ["rival"])
    assert (again["rival"] / "annotations/panoptic_val2017.json").read_bytes() == \
        (written["rival"] / "annotations/panoptic_val2017.json").read_bytes()
