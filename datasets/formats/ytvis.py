"""YouTube-VIS 2019 / 2021 (`ytvis`), in the layout detectron2 and Mask2Former use.

    DIR/train.json, DIR/valid.json                       (`val` maps to `valid`)
    DIR/{train,valid}/JPEGImages/<video>/<frame>.jpg

JSON: `videos` (`id`, `width`, `height`, `length`, `file_names` relative to JPEGImages/),
`annotations` (`id`, `video_id`, `category_id`, `iscrowd`, `segmentations`: one entry per
frame, null where the object is absent, RLE or polygons), `categories` (`id`, `name`).
The test-server splits ship without `annotations`; their videos have no segments.

Videos come in video-id order, cut into clips of `clip_length` frames. Overlapping masks in
a frame are resolved as for COCO instances (`extra["overlap_pixels"]` sums the clip's frames).
Segment ids and track ids are the annotation ids; if one does not fit the 24-bit id map, the
video's annotations are renumbered 1..N for the map (track ids keep the annotation ids).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omgseg.core.structures import Category, Task
from omgseg.datasets.clip import Clip
from omgseg.datasets.formats._common import (
    assign_segment_ids,
    build_clip,
    cached_index,
    check_size,
    clip_ranges,
    clip_source_id,
    field_errors,
    load_json,
    read_frames,
    records_by_id,
    require,
    sort_key,
    thing_categories,
)
from omgseg.datasets.formats.base import SourceFormat
from omgseg.datasets.formats.coco_instances import decode_segmentation, resolve_overlaps

DATASET = "ytvis"
TASKS = (Task.VIDEO_INSTANCE,)
_SPLITS = {"train": "train", "val": "valid"}


@dataclass(frozen=True)
class _YtvisIndex:
    categories: list[Category]
    videos: list[dict]  # by video id
    annotations: dict[object, list[dict]]  # video id -> its annotations, by annotation id


def _parse_index(json_path: Path) -> _YtvisIndex:
    where = str(json_path)
    data = load_json(json_path)
    require(data, ("videos", "categories"), where)
    categories = thing_categories(data["categories"], where)
    videos = records_by_id(data["videos"], ("id", "width", "height", "file_names"), where, "video")
    for video in videos.values():
        if not video["file_names"]:
            raise ValueError(f"{where}: video {video['id']} has no frames")
        if "length" in video and int(video["length"]) != len(video["file_names"]):
            raise ValueError(
                f"{where}: video {video['id']} has length {video['length']} "
                f"but {len(video['file_names'])} file_names"
            )
    by_video: dict[object, list[dict]] = {v: [] for v in videos}
    seen: set[int] = set()
    for k, ann in enumerate(data.get("annotations") or []):
        require(ann, ("id", "video_id", "category_id", "segmentations"), f"{where}: annotations[{k}]")
        video = videos.get(ann["video_id"])
        if video is None:
            raise ValueError(f"{where}: annotation {ann['id']} refers to unknown video id {ann['video_id']}")
        if int(ann["category_id"]) not in categories:
            raise ValueError(
                f"{where}: video {video['id']} annotation {ann['id']} "
                f"has unknown category id {ann['category_id']}"
            )
        # The reference evaluation zips frame lists and so ignores a length mismatch; a
        # mismatch means the annotation and the video disagree, so it is an error here.
        if len(ann["segmentations"]) != len(video["file_names"]):
            raise ValueError(
                f"{where}: video {video['id']} annotation {ann['id']} has {len(ann['segmentations'])} "
                f"segmentations for {len(video['file_names'])} frames"
            )
        if int(ann["id"]) in seen:
            raise ValueError(f"{where}: annotation id {ann['id']} is listed twice")
        seen.add(int(ann["id"]))
        by_video[ann["video_id"]].append(ann)
    for anns in by_video.values():
        anns.sort(key=lambda a: int(a["id"]))
    return _YtvisIndex(
        categories=list(categories.values()),
        videos=[videos[v] for v in sorted(videos, key=sort_key)],
        annotations=by_video,
    )


def _paths(src: Path, split: str) -> tuple[Path, Path]:
    """(JSON file, JPEGImages folder) of a split."""
    if split not in _SPLITS:
        raise ValueError(f"YouTube-VIS split must be one of {sorted(_SPLITS)}, got {split!r}")
    folder = _SPLITS[split]
    return Path(src) / f"{folder}.json", Path(src) / folder / "JPEGImages"


_index = cached_index(_parse_index)


def load_index(src: Path, split: str) -> _YtvisIndex:
    """The split's JSON, parsed and checked once per file version."""
    return _index(_paths(src, split)[0])


def read_video(
    json_path: Path, image_dir: Path, video: dict, anns: list[dict], clip_length: int | None
) -> Iterator[Clip]:
    """The clips of one video, each with the annotations visible in its frames."""
    height, width = int(video["height"]), int(video["width"])
    names = list(video["file_names"])
    seg_ids = assign_segment_ids([int(a["id"]) for a in anns])
    info = {
        seg_ids[int(a["id"])]: (int(a["category_id"]), bool(a.get("iscrowd", 0)), int(a["id"])) for a in anns
    }
    for start, stop in clip_ranges(len(names), clip_length):
        where = f"{json_path.name}: video {video['id']} ({names[start]})"
        paths = [image_dir / n for n in names[start:stop]]
        images, sizes, ext = read_frames(paths, where)
        id_maps = np.zeros((stop - start, height, width), dtype=np.uint32)
        overlap = 0
        for t in range(start, stop):
            check_size(sizes[t - start], (height, width), paths[t - start], where)
            masks = []
            for ann in anns:
                segm = ann["segmentations"][t]
                if segm is None:
                    continue
                seg_id = seg_ids[int(ann["id"])]
                frame_where = (
                    f"{json_path.name}: video {video['id']} annotation {ann['id']} frame {t} ({names[t]})"
                )
                masks.append((seg_id, decode_segmentation(segm, height, width, frame_where), info[seg_id][1]))
            id_maps[t - start], pixels = resolve_overlaps(height, width, masks)
            overlap += pixels
        clip = build_clip(
            dataset=DATASET,
            source_id=clip_source_id(str(video["id"]), start, clip_length),
            frame_names=names[start:stop],
            images=images,
            ext=ext,
            id_maps=id_maps,
            info=info,
            tasks=TASKS,
            extra={"overlap_pixels": overlap},
        )
        renumbered = {str(s.id): s.track_id for s in clip.segments if s.id != s.track_id}
        if renumbered:
            clip.extra["annotation_ids"] = renumbered
        yield clip


def categories(src: Path, split: str) -> list[Category]:
    return list(load_index(src, split).categories)


def count(src: Path, split: str) -> int:
    return len(load_index(src, split).videos)


def clips(src: Path, split: str, clip_length: int | None = None) -> Iterator[Clip]:
    clip_ranges(1, clip_length)  # reject a bad clip_length before reading anything
    json_path, image_dir = _paths(src, split)
    index = load_index(src, split)
    for video in index.videos:
        # No exception from the consumer of these clips reaches this block: only read_video's.
        with field_errors(f"{json_path.name}: video {video['id']}"):
            yield from read_video(json_path, image_dir, video, index.annotations[video["id"]], clip_length)


FORMAT = SourceFormat(
    name="ytvis", dataset=DATASET, tasks=TASKS, categories=categories, clips=clips, count=count
)
