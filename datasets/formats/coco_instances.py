"""COCO instances (`coco-instances`), and the mask decoding and overlap rule YouTube-VIS shares.

Layout (docs/datasets.md):
    DIR/annotations/instances_{split}2017.json
    DIR/{split}2017/<name>.jpg

One clip (T = 1) per image listed in the JSON (images without annotations too), in image-id
order; a clip's item is its image id. Masks (polygons, compressed or uncompressed RLE) are decoded with pycocotools and
painted into one id map; where they overlap, `resolve_overlaps` decides. Every category is a
thing. Segment ids are the annotation ids, unless one of them does not fit the 24-bit id map
(COCO's crowd annotations have ids near 9e11): then the image's ids are renumbered 1..N and
`extra["annotation_ids"]` maps {str(segment id): annotation id}.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils

from omgseg.core.structures import Category, Task
from omgseg.datasets.clip import Clip
from omgseg.datasets.formats._common import (
    annotations_by_record,
    assign_segment_ids,
    build_clip,
    by_text_id,
    cached_index,
    check_segmentation,
    check_size,
    field_errors,
    image_ext,
    load_json,
    read_image,
    records_by_id,
    require,
    thing_categories,
)
from omgseg.datasets.formats.base import ClipRef, SourceFormat

DATASET = "coco_instances"
TASKS = (Task.INSTANCE, Task.INTERACTIVE)


def _decode_rle(rle: dict) -> np.ndarray:
    """pycocotools RLE -> bool mask (H, W)."""
    with warnings.catch_warnings():
        # pycocotools' compiled decoder trips numpy 2's __array__(copy=...) deprecation on
        # every call; the result is correct, the warning is noise for its callers.
        warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


def decode_segmentation(segm: object, height: int, width: int, where: str) -> np.ndarray:
    """A COCO-style segmentation -> bool mask (H, W).

    Accepts polygons ([[x0, y0, x1, y1, ...], ...]), compressed RLE ({"size": [H, W],
    "counts": str}) and uncompressed RLE ({"size": [H, W], "counts": [int, ...]}).
    """
    check_segmentation(segm, height, width, where)  # what would crash or hang pycocotools
    if isinstance(segm, list):
        polygons = []
        for poly in segm:
            if not isinstance(poly, list) or len(poly) % 2:
                raise ValueError(f"{where}: a polygon must be a flat list of x, y pairs")
            # Fewer than 3 points enclose nothing; pycocotools would also read a 4-number
            # polygon as a box, so they are dropped here (as detectron2 does).
            if len(poly) >= 6:
                polygons.append([float(v) for v in poly])
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        return _decode_rle(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width)))
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        size = [int(v) for v in segm["size"]]
        if size != [height, width]:
            raise ValueError(f"{where}: RLE size {size} differs from the image's [{height}, {width}]")
        counts = segm["counts"]
        if isinstance(counts, list):
            # pycocotools writes past the mask if the runs overrun it: check them first.
            if sum(counts) != height * width or any(c < 0 for c in counts):
                raise ValueError(
                    f"{where}: uncompressed RLE runs sum to {sum(counts)}, expected {height * width}"
                )
            rle = mask_utils.frPyObjects({"size": size, "counts": counts}, height, width)
        elif isinstance(counts, str | bytes):
            rle = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        else:
            raise ValueError(f"{where}: RLE counts must be a string or a list, got {type(counts).__name__}")
        return _decode_rle(rle)
    raise ValueError(f"{where}: segmentation must be polygons or an RLE dict, got {type(segm).__name__}")


def resolve_overlaps(
    height: int, width: int, masks: Sequence[tuple[int, np.ndarray, bool]]
) -> tuple[np.ndarray, int]:
    """Paint possibly overlapping masks into one uint32 id map (H, W).

    masks: (segment id, bool mask (H, W), iscrowd). A pixel several masks claim goes to a
    non-crowd mask before a crowd one, then to the mask with the fewest pixels (so small
    objects stay visible), then to the lowest id. Returns the map and the number of pixels
    claimed by more than one mask (each counted once).
    """
    id_map = np.zeros((height, width), dtype=np.uint32)
    if not masks:
        return id_map, 0
    coverage = np.zeros((height, width), dtype=np.uint16)
    ranked = sorted(masks, key=lambda m: (m[2], int(m[1].sum()), m[0]))
    # Paint the least preferred first so the preferred ones overwrite it.
    for seg_id, mask, _ in reversed(ranked):
        id_map[mask] = seg_id
        coverage += mask
    return id_map, int(np.count_nonzero(coverage > 1))


@dataclass(frozen=True)
class _InstancesIndex:
    categories: list[Category]
    images: dict[str, dict]  # str(image id) -> image record, by image id
    annotations: dict[str, list[dict]]  # str(image id) -> its annotations, by annotation id


def _parse_index(json_path: Path) -> _InstancesIndex:
    where = str(json_path)
    data = load_json(json_path)
    require(data, ("images", "annotations", "categories"), where)
    categories = thing_categories(data["categories"], where)
    images = records_by_id(data["images"], ("id", "file_name", "height", "width"), where, "image")
    annotations = annotations_by_record(data["annotations"], images, categories, record_field="image_id",
                                        mask_field="segmentation", kind="image", where=where)
    return _InstancesIndex(
        categories=list(categories.values()),
        images=by_text_id(images, where, "image"),
        annotations=by_text_id(annotations, where, "image"),
    )


load_index = cached_index(_parse_index)  # the instances JSON, parsed and checked once per file version


def _json_path(src: Path, split: str) -> Path:
    return Path(src) / "annotations" / f"instances_{split}2017.json"


def read_instances_image(json_path: Path, image_dir: Path, image: dict, anns: list[dict]) -> Clip:
    """One image and its annotations as a T = 1 clip."""
    height, width = int(image["height"]), int(image["width"])
    where = f"{json_path.name}: image {image['id']} ({image['file_name']})"
    image_path = image_dir / image["file_name"]
    data, size = read_image(image_path, where)
    check_size(size, (height, width), image_path, where)

    seg_ids = assign_segment_ids([int(a["id"]) for a in anns])
    masks = []
    info: dict[int, tuple[int, bool, int]] = {}
    for ann in anns:
        seg_id = seg_ids[int(ann["id"])]
        iscrowd = bool(ann.get("iscrowd", 0))
        mask = decode_segmentation(ann["segmentation"], height, width, f"{where} annotation {ann['id']}")
        masks.append((seg_id, mask, iscrowd))
        info[seg_id] = (int(ann["category_id"]), iscrowd, seg_id)
    id_map, overlap = resolve_overlaps(height, width, masks)

    extra: dict = {"overlap_pixels": overlap}
    renumbered = {str(s): a for a, s in seg_ids.items() if a != s}
    if renumbered:
        extra["annotation_ids"] = renumbered
    clip = build_clip(
        dataset=DATASET,
        source_id=str(image["id"]),
        frame_names=(image["file_name"],),
        images=[data],
        ext=image_ext(image_path),
        id_maps=id_map[None],
        info=info,
        tasks=TASKS,
        extra=extra,
    )
    visible = {s.id for s in clip.segments}
    hidden = sorted(int(a["id"]) for a in anns if seg_ids[int(a["id"])] not in visible)
    if hidden:
        # Annotations with no pixel left (empty masks, or covered by preferred ones).
        clip.extra["hidden_annotations"] = hidden
    return clip


def categories(src: Path, split: str) -> list[Category]:
    return list(load_index(_json_path(src, split)).categories)


def plan(src: Path, split: str, clip_length: int | None = None) -> list[ClipRef]:
    return [ClipRef(item) for item in load_index(_json_path(src, split)).images]


def read(src: Path, split: str, refs: Sequence[ClipRef], clip_length: int | None = None) -> Iterator[Clip]:
    json_path = _json_path(src, split)
    index = load_index(json_path)
    image_dir = Path(src) / f"{split}2017"
    for ref in refs:
        image = index.images[ref.item]
        with field_errors(f"{json_path.name}: image {image['id']}"):
            clip = read_instances_image(json_path, image_dir, image, index.annotations[ref.item])
        yield clip


FORMAT = SourceFormat(name="coco-instances", dataset=DATASET, tasks=TASKS, categories=categories, plan=plan, read=read)
