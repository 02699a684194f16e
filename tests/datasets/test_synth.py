"""The synthetic generator writes the public layouts of docs/datasets.md.

Checked against the formats themselves (JSON, PIL, pycocotools), not against this
repository's readers, so a reader bug and a generator bug cannot hide each other.
"""

import hashlib
import itertools
import json
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


# sha256 of each data set's files (relative paths and bytes) at the default sizes and seed 0,
# recorded before the scene code was reorganised: every study's numbers were measured on these
# bytes, so a change of the generator may add data sets but must not change these. The JPEG
# bytes depend on Pillow's libjpeg too (recorded with Pillow 13.0): after a Pillow upgrade, check
# that the id maps and JSON still agree before recording new digests.
DEFAULT_DIGESTS = {
    "ade": "6b640fc0cdb26fe62a7c7f242e503cb58c2de75351ed737fb9205820633fe385",
    "coco": "ab3f8a715083c0236e98663c73d500a0ab31306a789d1f20e54d82287a4fb239",
    "davis": "92baef57d382f367e6f6f5c2d5d7928198fbb7d9c91a7482a79fa1b9c8691709",
    "vipseg": "eeaf9330d732aeccdd5b7485042d39ea65d4a57a8c64979db4182c08af349619",
    "ytvis": "72e654d2bda7031d6d71ae2ce06c3d0b6043db44e40684d663d8b3f974ebb21b",
}
PLANTED_V3_DIGESTS = {
    "base": "2f639311637cb3f17a7f3a841715e241e63be5beaf8426714f9a48ae41bc33ff",
    "anchor": "caf5226e237c560c25f51fce4c6e154cf7f7c06c8a0aa88739eea31ba034d41e",
    "twin": "c773a12fd6ddd43579f6f75dce6f256c6458012aedad528ca73699b145445dd9",
    "rival": "aca8ed237dba4c162a8df8c0b48a2048c16f907bab21bae8225b7952792a9147",
    "stranger": "e99d8bbe38294cc460d5be532651cba6356cc05be6684b0becd18e2d578ae27a",
    "placebo": "f50b3d1bc234988f7fc94548cdf5ba158ae2115f0895ffc710906c005bd9f7d0",
}


def test_existing_synthetic_data_sets_keep_their_bytes(tmp_path):
    from omgseg.datasets.planted import PLANTED, write_planted

    written = write_synthetic(tmp_path / "synth", seed=0)
    digests = {path.name: tree_digest(path) for path in written.values()}
    digests.update({v: tree_digest(path) for v, path in write_planted(tmp_path / "planted", PLANTED.variants).items()})
    changed = sorted(name for name, digest in {**DEFAULT_DIGESTS, **PLANTED_V3_DIGESTS}.items() if digests[name] != digest)
    assert not changed, f"these synthetic data sets changed their bytes: {changed}"
