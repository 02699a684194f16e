"""COCO panoptic (`coco-panoptic`), and the panoptic-JSON reader ADE20K panoptic shares.

Layout (docs/datasets.md):
    DIR/annotations/panoptic_{split}2017.json
    DIR/annotations/panoptic_{split}2017/<name>.png   RGB, id = R + 256 G + 256^2 B, 0 = void
    DIR/{split}2017/<name>.jpg

One clip (T = 1) per annotated image, in image-id order; a clip's item is its image id. Segment areas are counted from the
PNG; panopticapi evaluates against the JSON `area` instead, so JSON areas that differ from
the pixel count are kept in `extra["json_area"]` ({str(segment id): area}).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from omgseg.core.structures import Category, Task
from omgseg.datasets.clip import Clip, decode_id_map_rgb
from omgseg.datasets.formats._common import (
    MAX_SEGMENT_ID,
    build_clip,
    by_text_id,
    cached_index,
    check_size,
    field_errors,
    id_counts,
    image_ext,
    load_json,
    read_image,
    read_png,
    require,
)
from omgseg.datasets.formats.base import ClipRef, SourceFormat


@dataclass(frozen=True)
class PanopticLayout:
    """Where one split of a panoptic-JSON data set lives."""

    json_path: Path
    png_dir: Path
    image_dir: Path


@dataclass(frozen=True)
class _PanopticIndex:
    """The checked contents of a panoptic JSON: vocabulary and (image, annotation) pairs."""

    categories: list[Category]
    items: dict[str, tuple[dict, dict]]  # str(image id) -> (image record, annotation record), by image id


def _parse_index(json_path: Path) -> _PanopticIndex:
    where = str(json_path)
    data = load_json(json_path)
    require(data, ("images", "annotations", "categories"), where)
    categories = [Category.from_json(c, where) for c in data["categories"]]
    seen: set[int] = set()
    for c in categories:
        if c.id in seen:
            raise ValueError(f"{where}: category id {c.id} is listed twice")
        seen.add(c.id)
    images: dict[object, dict] = {}
    for k, image in enumerate(data["images"]):
        require(image, ("id", "file_name", "height", "width"), f"{where}: images[{k}]")
        if image["id"] in images:
            raise ValueError(f"{where}: image id {image['id']} is listed twice")
        images[image["id"]] = image
    items: dict[object, tuple[dict, dict]] = {}
    for k, ann in enumerate(data["annotations"]):
        require(ann, ("image_id", "file_name", "segments_info"), f"{where}: annotations[{k}]")
        image_id = ann["image_id"]
        if image_id not in images:
            raise ValueError(f"{where}: annotation {ann['file_name']} refers to unknown image id {image_id}")
        if image_id in items:
            raise ValueError(f"{where}: image {image_id} has two annotations")
        for j, seg in enumerate(ann["segments_info"]):
            require(
                seg,
                ("id", "category_id", "iscrowd"),
                f"{where}: image {image_id} ({ann['file_name']}) segments_info[{j}]",
            )
        items[image_id] = (images[image_id], ann)
    return _PanopticIndex(categories=categories, items=by_text_id(items, where, "image"))


load_index = cached_index(_parse_index)  # the panoptic JSON, parsed and checked once per file version


def read_panoptic_image(
    layout: PanopticLayout,
    image: dict,
    ann: dict,
    categories: dict[int, Category],
    dataset: str,
    tasks: tuple[Task, ...],
) -> Clip:
    """One image of a panoptic JSON as a T = 1 clip, cross-checked against its PNG."""
    png_path = layout.png_dir / ann["file_name"]
    where = f"{layout.json_path.name}: image {image['id']} ({png_path.name})"
    pixels, mode = read_png(png_path, where)
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(f"{where}: {png_path} must be an RGB id PNG, got mode {mode!r}")
    height, width = int(image["height"]), int(image["width"])
    check_size(pixels.shape[:2], (height, width), png_path, where)
    id_map = decode_id_map_rgb(pixels[..., :3])

    info: dict[int, tuple[int, bool, int]] = {}
    json_area: dict[int, int] = {}
    for seg in ann["segments_info"]:
        seg_id = int(seg["id"])
        if seg_id in info:
            raise ValueError(f"{where}: segment id {seg_id} is listed twice in segments_info")
        if not 0 < seg_id <= MAX_SEGMENT_ID:
            raise ValueError(f"{where}: segment id {seg_id} is not a valid RGB-encoded id")
        category_id = int(seg["category_id"])
        if category_id not in categories:
            raise ValueError(f"{where}: segment {seg_id} has unknown category id {category_id}")
        info[seg_id] = (category_id, bool(seg["iscrowd"]), seg_id)
        if "area" in seg:
            json_area[seg_id] = int(seg["area"])

    present = id_counts(id_map)
    not_listed = sorted(set(present) - set(info))
    if not_listed:
        raise ValueError(f"{where}: ids {not_listed} are in the PNG but not in segments_info")
    not_drawn = sorted(set(info) - set(present))
    if not_drawn:
        raise ValueError(f"{where}: segments_info ids {not_drawn} do not occur in the PNG")

    image_path = layout.image_dir / image["file_name"]
    data, size = read_image(image_path, where)
    check_size(size, (height, width), image_path, where)

    differing = {str(i): a for i, a in json_area.items() if a != present[i]}
    return build_clip(
        dataset=dataset,
        source_id=str(image["id"]),
        frame_names=(image["file_name"],),
        images=[data],
        ext=image_ext(image_path),
        id_maps=id_map[None],
        info=info,
        tasks=tasks,
        extra={"json_area": differing} if differing else None,
        areas={i: (a,) for i, a in present.items()},
    )


def panoptic_format(
    name: str, dataset: str, tasks: tuple[Task, ...], layout: Callable[[Path, str], PanopticLayout]
) -> SourceFormat:
    """A SourceFormat for any data set in the COCO panoptic JSON + PNG layout."""

    def categories(src: Path, split: str) -> list[Category]:
        return list(load_index(layout(src, split).json_path).categories)

    def plan(src: Path, split: str, clip_length: int | None = None) -> list[ClipRef]:
        return [ClipRef(item) for item in load_index(layout(src, split).json_path).items]

    def read(src: Path, split: str, refs: Sequence[ClipRef], clip_length: int | None = None) -> Iterator[Clip]:
        paths = layout(src, split)
        index = load_index(paths.json_path)
        by_id = {c.id: c for c in index.categories}
        for ref in refs:
            image, ann = index.items[ref.item]
            with field_errors(f"{paths.json_path.name}: image {image['id']}"):
                clip = read_panoptic_image(paths, image, ann, by_id, dataset, tasks)
            yield clip

    return SourceFormat(name=name, dataset=dataset, tasks=tasks, categories=categories, plan=plan, read=read)


def coco_layout(src: Path, split: str) -> PanopticLayout:
    src = Path(src)
    return PanopticLayout(
        json_path=src / "annotations" / f"panoptic_{split}2017.json",
        png_dir=src / "annotations" / f"panoptic_{split}2017",
        image_dir=src / f"{split}2017",
    )


FORMAT = panoptic_format(
    "coco-panoptic",
    "coco_panoptic",
    (Task.PANOPTIC, Task.INSTANCE, Task.SEMANTIC, Task.INTERACTIVE),
    coco_layout,
)
