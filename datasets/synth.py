"""Seeded synthetic data sets, written in exactly the public layouts of docs/datasets.md.

`write_synthetic(out)` writes `coco/` (COCO panoptic and COCO instances for the same images),
`ade/`, `vipseg/`, `ytvis/` and `davis/`, each with a train and a val split, so the real
readers and converters can be exercised end to end without downloading anything.

What is drawn: things are filled shapes, each category its own shape and colour (plus
per-instance colour jitter and per-pixel noise), over 2-3 textured background bands ("stuff":
sky, grass, water, sand, road, wall, floor). A 1-pixel line between bands, and sometimes a
grey "unlabelled" patch, are void. Videos move the shapes smoothly with stable track ids;
objects are sometimes hidden for a few frames, enter from outside the frame, or are covered
by another object, and their annotations are then null (YouTube-VIS) or absent (the masks).

Designed relations between the data sets (names connect them; the ids in brackets are each
data set's own):

    shape (colour)    | COCO          | ADE                | VIPSeg           | YT-VIS       | DAVIS
    ------------------+---------------+--------------------+------------------+--------------+-------
    circle (red)      | circle [1]    | circle [6]         | circle [4]       | circle [1]   | object
    square (blue)     | square [2]    | square [7]         | -                | square [4]   | object
    triangle (yellow) | triangle [3]  | triangle [8]       | "square" [5] (!) | triangle [6] | object
    star (magenta)    | star [5]      | -                  | star [6]         | star [5]     | object
    ring (cyan)       | ring [7]      | ring [5] STUFF (!) | -                | ring [3]     | object
    cross (orange)    | cross [9]     | -                  | cross [7]        | cross [2]    | object
    hexagon (purple)  | -             | hexagon [9] (*)    | -                | -            | object
    diamond (pink)    | -             | diamond [10] (*)   | -                | -            | object
    stuff             | sky [92]      | wall [1] (*)       | sky [0]          | drawn only   | drawn only
                      | grass [93]    | floor [2] (*)      | water [1]        |              |
                      | water [95]    | sky [3]            | road [2] (*)     |              |
                      | sand [97]     | grass [4]          | grass [3]        |              |

- Positive transfer: COCO, YT-VIS and VIPSeg share circle, star and cross; COCO and YT-VIS
  share all six thing shapes, drawn alike; sky and grass are stuff in COCO, ADE and VIPSeg.
- Open vocabulary (*): hexagon and diamond are things only in ADE; wall and floor (ADE) and
  road (VIPSeg) are stuff nowhere else.
- Conflicts (!), for negative transfer: ADE labels rings as one stuff segment per image
  ("ring", isthing 0) where COCO and YT-VIS have ring instances; VIPSeg calls the triangle
  shape "square", so the name "square" means two different appearances.
- Domain shift: DAVIS frames are dark and blue-tinted ("night") and class-agnostic.
- Crowds: COCO has crowd regions (clusters of small shapes, iscrowd 1) in about a third of
  its images and in the first image of each split.

Determinism: every data set and split draws from its own generator seeded by (seed, data set,
split), so the same seed gives byte-identical files whichever formats are requested.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image
from tqdm import tqdm

from omgseg.datasets.clip import encode_id_map_rgb
from omgseg.datasets.synth_scenes import (
    ADE_LABELS,
    COCO_LABELS,
    DAVIS_BACKGROUNDS,
    DAVIS_SHAPES,
    VIPSEG_LABELS,
    YTVIS_BACKGROUNDS,
    YTVIS_LABELS,
    ImageScene,
    Label,
    VideoScene,
    image_scene,
    video_scene,
)

SYNTH_FORMATS: tuple[str, ...] = (
    "coco-panoptic",
    "coco-instances",
    "ade-panoptic",
    "vipseg",
    "ytvis",
    "davis",
)
SPLITS: tuple[str, ...] = ("train", "val")
# The sub-folder each format is written to (both COCO formats share one, as real COCO does).
SUBFOLDERS: dict[str, str] = {
    "coco-panoptic": "coco",
    "coco-instances": "coco",
    "ade-panoptic": "ade",
    "vipseg": "vipseg",
    "ytvis": "ytvis",
    "davis": "davis",
}
# Stable keys for seeding: adding a data set must not change the others' files.
_SEED_KEYS = {"coco": 1, "ade": 2, "vipseg": 3, "ytvis": 4, "davis": 5}
JPEG_QUALITY = 90
CROWD_PROBABILITY = 0.35
RLE_FRACTION = 0.15  # share of COCO things stored as compressed RLE instead of polygons
VIPSEG_BUGGY_VOID = 200
MAX_COCO_IMAGES = 100_000  # segment ids are image_id * 100 + k and must fit 24 bits


@dataclass(frozen=True)
class SynthSizes:
    """How much to generate. Images and video frames are height x width pixels."""

    height: int = 96
    width: int = 128
    coco_train: int = 48
    coco_val: int = 16
    ade_train: int = 32
    ade_val: int = 16
    video_train: int = 8  # per video data set (VIPSeg, YT-VIS, DAVIS)
    video_val: int = 4
    min_frames: int = 8
    max_frames: int = 12

    def __post_init__(self) -> None:
        if self.height < 48 or self.width < 48:
            raise ValueError(
                f"frames must be at least 48x48 to hold the shapes, got {self.height}x{self.width}"
            )
        counts = {k: getattr(self, k) for k in
                  ("coco_train", "coco_val", "ade_train", "ade_val", "video_train", "video_val")}
        bad = {k: v for k, v in counts.items() if v < 1}
        if bad:
            raise ValueError(f"every split needs at least one image or video, got {bad}")
        if self.coco_train + self.coco_val > MAX_COCO_IMAGES:
            raise ValueError(f"at most {MAX_COCO_IMAGES} COCO images (24-bit segment ids)")
        # 5 frames leave room for an object hidden mid-video that comes back before the end.
        if not 5 <= self.min_frames <= self.max_frames <= 99_999:
            raise ValueError(
                f"need 5 <= min_frames <= max_frames <= 99999, got {self.min_frames}, {self.max_frames}"
            )

    def count(self, dataset: str, split: str) -> int:
        kind = "video" if dataset in ("vipseg", "ytvis", "davis") else dataset
        return int(getattr(self, f"{kind}_{split}"))


def write_synthetic(
    out: Path,
    formats: Sequence[str] = SYNTH_FORMATS,
    seed: int = 0,
    sizes: SynthSizes = SynthSizes(),
    progress: bool = False,
) -> dict[str, Path]:
    """Writes each requested format; returns {format name: its source dir to pass to `omgseg convert --src`}."""
    if isinstance(formats, str):
        formats = [formats]
    unknown = [f for f in formats if f not in SYNTH_FORMATS]
    if unknown:
        raise ValueError(f"unknown synthetic format(s) {unknown}; known formats: {', '.join(SYNTH_FORMATS)}")
    requested = [f for f in SYNTH_FORMATS if f in formats]
    out = Path(out)
    datasets = list(dict.fromkeys(SUBFOLDERS[f] for f in requested))
    total = sum(sizes.count(d, s) for d in datasets for s in SPLITS)
    bar = tqdm(total=total, desc="synth", unit="item", disable=not progress)
    try:
        for dataset in datasets:
            root = out / dataset
            for split_index, split in enumerate(SPLITS):
                rng = np.random.default_rng(np.random.SeedSequence([seed, _SEED_KEYS[dataset], split_index]))
                bar.set_postfix_str(f"{dataset} {split}")
                if dataset == "coco":
                    write_coco_split(root, split, rng, sizes, requested, bar)
                elif dataset == "ade":
                    _write_ade(root, split, rng, sizes, bar)
                elif dataset == "vipseg":
                    _write_vipseg(root, split, rng, sizes, bar)
                elif dataset == "ytvis":
                    _write_ytvis(root, split, rng, sizes, bar)
                else:
                    _write_davis(root, split, rng, sizes, bar)
    finally:
        bar.close()
    return {f: out / SUBFOLDERS[f] for f in requested}


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, separators=(",", ":")) + "\n")


def _write_jpeg(path: Path, rgb: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    path.write_bytes(buffer.getvalue())


def _write_png(path: Path, image: Image.Image) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())


def _fresh_dir(path: Path) -> Path:
    """Create a frame folder, removing frames a previous, longer run left there: readers take
    every file of a sequence folder as a frame."""
    path.mkdir(parents=True, exist_ok=True)
    for old in path.iterdir():
        if old.is_file() and old.suffix in (".jpg", ".png"):
            old.unlink()
    return path


def _bbox(mask: np.ndarray) -> list[int]:
    """[x, y, w, h] of the mask's pixels (w, h count pixels)."""
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]


def _compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, zeros first."""
    flat = mask.reshape(-1, order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0] == 1:
        runs.insert(0, 0)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(r) for r in runs]}


def _panoptic_categories(labels: tuple[Label, ...]) -> list[dict]:
    return [
        {"id": lab.id, "name": lab.name, "supercategory": lab.supercategory,
         "isthing": int(lab.isthing), "color": list(lab.colour)}
        for lab in labels
    ]


def _panoptic_record(scene: ImageScene, ids: list[int]) -> tuple[np.ndarray, list[dict]]:
    """The id map (H, W) and segments_info of a scene, segment i getting ids[i]."""
    id_map = np.zeros(scene.rgb.shape[:2], dtype=np.uint32)
    info = []
    for seg, seg_id in zip(scene.segments, ids):
        id_map[seg.mask] = seg_id
        info.append(
            {"id": seg_id, "category_id": seg.label.id, "iscrowd": int(seg.iscrowd),
             "area": int(seg.mask.sum()), "bbox": _bbox(seg.mask)}
        )
    return id_map, info


def _distinct_ids(rng: np.random.Generator, n: int) -> list[int]:
    """n distinct random segment ids in 1 .. 2^24 - 1."""
    ids: list[int] = []
    while len(ids) < n:
        value = int(rng.integers(1, 2**24))
        if value not in ids:
            ids.append(value)
    return ids


# ---------------------------------------------------------------------------------------------
# COCO (panoptic and instances for the same images) and ADE20K panoptic


def write_coco_split(
    root: Path, split: str, rng: np.random.Generator, sizes: SynthSizes, requested: list[str], bar: tqdm,
    labels: tuple[Label, ...] = COCO_LABELS, crowds: bool = True, weights: Mapping[str, float] | None = None,
) -> None:
    """One split of COCO's layout under root: images, and the panoptic and/or instances
    annotations `requested` names; `labels` and `weights` as synth_scenes.image_scene takes
    them (the planted data sets, omgseg.datasets.planted, pass their own)."""
    first_id = 1 if split == "train" else sizes.coco_train + 1  # image ids unique across splits
    image_dir = root / f"{split}2017"
    png_dir = root / "annotations" / f"panoptic_{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    want_panoptic = "coco-panoptic" in requested
    want_instances = "coco-instances" in requested
    if want_panoptic:
        png_dir.mkdir(parents=True, exist_ok=True)
    images, pan_anns, inst_anns = [], [], []
    for n in range(sizes.count("coco", split)):
        image_id = first_id + n
        name = f"{image_id:012d}"
        crowd = crowds and (n == 0 or bool(rng.random() < CROWD_PROBABILITY))
        scene = image_scene(rng, labels, sizes.height, sizes.width, crowd, RLE_FRACTION, weights)
        _write_jpeg(image_dir / f"{name}.jpg", scene.rgb)
        images.append({"id": image_id, "file_name": f"{name}.jpg",
                       "height": sizes.height, "width": sizes.width})
        # Segment ids double as instance annotation ids, so they are unique in the whole split.
        ids = [image_id * 100 + k + 1 for k in range(len(scene.segments))]
        id_map, info = _panoptic_record(scene, ids)
        if want_panoptic:
            _write_png(png_dir / f"{name}.png", Image.fromarray(encode_id_map_rgb(id_map)))
            pan_anns.append({"image_id": image_id, "file_name": f"{name}.png", "segments_info": info})
        for seg, seg_info in zip(scene.segments, info):
            if not seg.label.isthing:
                continue
            if seg.iscrowd:
                segmentation: object = _uncompressed_rle(seg.mask)
            elif seg.as_rle or seg.polygon is None:
                segmentation = _compressed_rle(seg.mask)
            else:
                segmentation = [seg.polygon]
            inst_anns.append(
                {"id": seg_info["id"], "image_id": image_id, "category_id": seg.label.id,
                 "segmentation": segmentation, "area": seg_info["area"],
                 "bbox": [float(v) for v in seg_info["bbox"]], "iscrowd": int(seg.iscrowd)}
            )
        bar.update(1)
    if want_panoptic:
        _write_json(
            root / "annotations" / f"panoptic_{split}2017.json",
            {"images": images, "annotations": pan_anns, "categories": _panoptic_categories(labels)},
        )
    if want_instances:
        categories = [{"id": lab.id, "name": lab.name, "supercategory": lab.supercategory}
                      for lab in labels if lab.isthing]
        _write_json(
            root / "annotations" / f"instances_{split}2017.json",
            {"images": images, "annotations": inst_anns, "categories": categories},
        )


def _write_ade(root: Path, split: str, rng: np.random.Generator, sizes: SynthSizes, bar: tqdm) -> None:
    base = root / "ADEChallengeData2016"
    image_dir = base / "images" / {"train": "training", "val": "validation"}[split]
    png_dir = base / f"ade20k_panoptic_{split}"
    image_dir.mkdir(parents=True, exist_ok=True)
    png_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for n in range(sizes.count("ade", split)):
        name = f"ADE_{split}_{n + 1:08d}"
        scene = image_scene(rng, ADE_LABELS, sizes.height, sizes.width, crowd=False, rle_fraction=0.0)
        _write_jpeg(image_dir / f"{name}.jpg", scene.rgb)
        # Arbitrary distinct 24-bit ids, so every byte of the RGB encoding is exercised.
        ids = _distinct_ids(rng, len(scene.segments))
        id_map, info = _panoptic_record(scene, ids)
        _write_png(png_dir / f"{name}.png", Image.fromarray(encode_id_map_rgb(id_map)))
        # detectron2's prepare_ade20k_pan_seg.py uses the file stem as a string image id.
        images.append({"id": name, "file_name": f"{name}.jpg", "height": sizes.height, "width": sizes.width})
        anns.append({"image_id": name, "file_name": f"{name}.png", "segments_info": info})
        bar.update(1)
    _write_json(
        base / f"ade20k_panoptic_{split}.json",
        {"images": images, "annotations": anns, "categories": _panoptic_categories(ADE_LABELS)},
    )


# ---------------------------------------------------------------------------------------------
# Videos


def _frame_count(rng: np.random.Generator, sizes: SynthSizes) -> int:
    return int(rng.integers(sizes.min_frames, sizes.max_frames + 1))


def _write_frames(folder: Path, scene: VideoScene) -> list[str]:
    _fresh_dir(folder)
    names = []
    for t, rgb in enumerate(scene.frames):
        _write_jpeg(folder / f"{t:05d}.jpg", rgb)
        names.append(f"{t:05d}")
    return names


def _write_vipseg(root: Path, split: str, rng: np.random.Generator, sizes: SynthSizes, bar: tqdm) -> None:
    """The release layout (raw 16-bit panomasks) plus the COCO-video ground truth VIPSeg's
    create_panoptic_video_labels.py derives from it (panomasksRGB/ and the split's JSON)."""
    base = root / "VIPSeg_720P"
    things = [(lab, lab.look) for lab in VIPSEG_LABELS if lab.isthing]
    stuff = {lab.look: lab for lab in VIPSEG_LABELS if not lab.isthing}
    videos, video_entries, video_annotations = [], [], []
    for n in range(sizes.count("vipseg", split)):
        video = f"{split}_{n:04d}_vip"
        scene = video_scene(rng, things, list(stuff), sizes.height, sizes.width,
                            _frame_count(rng, sizes), allow_late_entry=True, night=False)
        names = _write_frames(base / "images" / video, scene)
        # Stuff of category c is c + 1 (void lines stay 0); thing k of category c is (c+1)*100+k.
        stuff_values = np.array([stuff[kind].id + 1 for kind in scene.background.kinds] + [0])
        background = stuff_values[scene.background.region]  # region -1 indexes the trailing 0
        thing_values = np.zeros(len(scene.tracks) + 1, dtype=np.int64)
        value_category = {stuff[kind].id + 1: stuff[kind].id for kind in scene.background.kinds}
        for track in scene.tracks:
            thing_values[track.number] = (track.label.id + 1) * 100 + track.number
            value_category[int(thing_values[track.number])] = track.label.id
        mask_dir = _fresh_dir(base / "panomasks" / video)
        rgb_dir = _fresh_dir(base / "panomasksRGB" / video)
        images, annotations = [], []
        for t, name in enumerate(names):
            values = np.where(scene.track_maps[t] > 0, thing_values[scene.track_maps[t]], background)
            if n == 0 and t == 0:
                # The release's known bug: stray 200s, which readers must take as void.
                values[1:3, 1:3] = VIPSEG_BUGGY_VOID
            _write_png(mask_dir / f"{name}.png", Image.fromarray(values.astype(np.uint16)))
            # COCO-video ground truth: the raw value is the segment id (stable across the
            # video), RGB-encoded; 200 is void here as in our reader.
            ids = np.where(values == VIPSEG_BUGGY_VOID, 0, values)
            _write_png(rgb_dir / f"{name}.png", Image.fromarray(encode_id_map_rgb(ids)))
            labels, areas = np.unique(ids, return_counts=True)
            segments = [{"id": int(v), "category_id": value_category[int(v)], "iscrowd": 0, "area": int(a)}
                        for v, a in zip(labels.tolist(), areas.tolist()) if v != 0]
            images.append({"id": name, "width": sizes.width, "height": sizes.height, "file_name": f"{name}.png"})
            annotations.append({"image_id": name, "file_name": f"{name}.png", "segments_info": segments})
        videos.append(video)
        video_entries.append({"video_id": video, "images": images})
        video_annotations.append({"video_id": video, "annotations": annotations})
        bar.update(1)
    categories = [{"id": lab.id, "name": lab.name, "isthing": int(lab.isthing), "color": list(lab.colour)}
                  for lab in VIPSEG_LABELS]
    _write_json(base / "panoVIPSeg_categories.json", categories)
    _write_json(base / f"panoptic_gt_VIPSeg_{split}.json",
                {"videos": video_entries, "annotations": video_annotations, "categories": categories})
    (root / f"{split}.txt").write_text("".join(v + "\n" for v in videos))


def _write_ytvis(root: Path, split: str, rng: np.random.Generator, sizes: SynthSizes, bar: tqdm) -> None:
    folder = {"train": "train", "val": "valid"}[split]
    things = [(lab, lab.look) for lab in YTVIS_LABELS]
    videos, anns = [], []
    for n in range(sizes.count("ytvis", split)):
        video = f"{rng.integers(16**10):010x}"  # YouTube-VIS names videos by short hex hashes
        scene = video_scene(rng, things, list(YTVIS_BACKGROUNDS), sizes.height, sizes.width,
                            _frame_count(rng, sizes), allow_late_entry=True, night=False)
        names = _write_frames(root / folder / "JPEGImages" / video, scene)
        video_id = n + 1
        videos.append({"id": video_id, "width": sizes.width, "height": sizes.height,
                       "length": len(names), "file_names": [f"{video}/{x}.jpg" for x in names]})
        for track in scene.tracks:
            segmentations, areas, bboxes = [], [], []
            for t in range(len(names)):
                mask = scene.track_maps[t] == track.number
                if mask.any():
                    segmentations.append(_compressed_rle(mask))
                    areas.append(int(mask.sum()))
                    bboxes.append([float(v) for v in _bbox(mask)])
                else:
                    segmentations.append(None)
                    areas.append(None)
                    bboxes.append(None)
            if all(s is None for s in segmentations):
                continue  # covered by other objects throughout: nothing to annotate
            anns.append({"id": len(anns) + 1, "video_id": video_id, "category_id": track.label.id,
                         "iscrowd": 0, "segmentations": segmentations, "areas": areas, "bboxes": bboxes})
        bar.update(1)
    categories = [{"id": lab.id, "name": lab.name, "supercategory": lab.supercategory} for lab in YTVIS_LABELS]
    _write_json(root / f"{folder}.json", {"videos": videos, "annotations": anns, "categories": categories})


def davis_palette() -> list[int]:
    """The PASCAL VOC / DAVIS colour map: index bits spread over the high bits of R, G, B."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


def _write_davis(root: Path, split: str, rng: np.random.Generator, sizes: SynthSizes, bar: tqdm) -> None:
    shapes = [(None, shape) for shape in DAVIS_SHAPES]
    palette = davis_palette()
    sequences = []
    for n in range(sizes.count("davis", split)):
        sequence = f"{split}-seq{n:03d}"
        # No late entries: semi-supervised VOS needs every object in the first frame.
        scene = video_scene(rng, shapes, list(DAVIS_BACKGROUNDS), sizes.height, sizes.width,
                            _frame_count(rng, sizes), allow_late_entry=False, night=True)
        names = _write_frames(root / "JPEGImages" / "480p" / sequence, scene)
        mask_dir = _fresh_dir(root / "Annotations" / "480p" / sequence)
        for t, name in enumerate(names):
            indices = np.ascontiguousarray(scene.track_maps[t], dtype=np.uint8)
            image = Image.frombytes("P", (sizes.width, sizes.height), indices.tobytes())
            image.putpalette(palette)
            _write_png(mask_dir / f"{name}.png", image)
        sequences.append(sequence)
        bar.update(1)
    sets = root / "ImageSets" / "2017"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / f"{split}.txt").write_text("".join(s + "\n" for s in sequences))
