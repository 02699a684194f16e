"""YouTube-VIS 2019 / 2021 (`ytvis`), in the layout detectron2 and Mask2Former use.

    DIR/train.json, DIR/valid.json                       (`val` maps to `valid`)
    DIR/{train,valid}/JPEGImages/<video>/<frame>.jpg

JSON: `videos` (`id`, `width`, `height`, `length`, `file_names` relative to JPEGImages/),
`annotations` (`id`, `video_id`, `category_id`, `iscrowd`, `segmentations`: one entry per
frame, null where the object is absent, RLE or polygons), `categories` (`id`, `name`).
The test-server splits ship without `annotations`; their videos have no segments (a data set
that needs a labelled val split holds out part of train instead: datasets/heldout.py).

Videos come in video-id order, cut into clips of `clip_length` frames; a clip's item is its
video id. Overlapping masks in
a frame are resolved as for COCO instances (`extra["overlap_pixels"]` sums the clip's frames).
Segment ids and track ids are the annotation ids; if one does not fit the 24-bit id map, the
video's annotations are renumbered 1..N for the map (track ids keep the annotation ids).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omgseg.core.structures import Category, Task
from omgseg.datasets.clip import Clip
from omgseg.datasets.formats._common import (
    annotations_by_record,
    assign_segment_ids,
    build_clip,
    by_text_id,
    cached_index,
    check_size,
    clip_ranges,
    clip_source_id,
    field_errors,
    load_json,
    read_frames,
    records_by_id,
    require,
    thing_categories,
)
from omgseg.datasets.formats.base import ClipRef, SourceFormat
from omgseg.datasets.formats.coco_instances import decode_segmentation, resolve_overlaps

DATASET = "ytvis"
TASKS = (Task.VIDEO_INSTANCE,)
_SPLITS = {"train": "train", "val": "valid"}


@dataclass(frozen=True)
class _YtvisIndex:
    categories: list[Category]
    videos: dict[str, dict]  # str(video id) -> video record, by video id
    annotations: dict[str, list[dict]]  # str(video id) -> its annotations, by annotation id


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
    by_video = annotations_by_record(data.get("annotations") or [], videos, categories, record_field="video_id",
                                     mask_field="segmentations", kind="video", where=where)
    for video_id, anns in by_video.items():
        frames = len(videos[video_id]["file_names"])
        for ann in anns:
            # The reference evaluation zips frame lists and so ignores a length mismatch; a
            # mismatch means the annotation and the video disagree, so it is an error here.
            if len(ann["segmentations"]) != frames:
                raise ValueError(f"{where}: video {video_id} annotation {ann['id']} has {len(ann['segmentations'])} "
                                 f"segmentations for {frames} frames")
    return _YtvisIndex(
        categories=list(categories.values()),
        videos=by_text_id(videos, where, "video"),
        annotations=by_text_id(by_video, where, "video"),
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
    json_path: Path, image_dir: Path, video: dict, anns: list[dict], refs: Sequence[ClipRef], clip_length: int | None
) -> Iterator[Clip]:
    """The clips `refs` name of one video, each with the annotations visible in its frames."""
    height, width = int(video["height"]), int(video["width"])
    names = list(video["file_names"])
    seg_ids = assign_segment_ids([int(a["id"]) for a in anns])
    info = {
        seg_ids[int(a["id"])]: (int(a["category_id"]), bool(a.get("iscrowd", 0)), int(a["id"])) for a in anns
    }
    for ref in refs:
        start, stop = ref.start, ref.stop
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


def plan(src: Path, split: str, clip_length: int | None = None) -> list[ClipRef]:
    clip_ranges(1, clip_length)  # reject a bad clip_length before reading anything
    return [ClipRef(item, start, stop) for item, video in load_index(src, split).videos.items()
            for start, stop in clip_ranges(len(video["file_names"]), clip_length)]


def read(src: Path, split: str, refs: Sequence[ClipRef], clip_length: int | None = None) -> Iterator[Clip]:
    json_path, image_dir = _paths(src, split)
    index = load_index(src, split)
    for item, video_refs in itertools.groupby(refs, key=lambda r: r.item):
        video = index.videos[item]
        # No exception from the consumer of these clips reaches this block: only read_video's.
        with field_errors(f"{json_path.name}: video {video['id']}"):
            yield from read_video(json_path, image_dir, video, index.annotations[item], list(video_refs), clip_length)


def annotated(src: Path, split: str) -> bool:
    json_path = _paths(src, split)[0]
    if not json_path.is_file():
        return split == "train"  # the public release withholds the val split's annotations
    return any(load_index(src, split).annotations.values())


FORMAT = SourceFormat(name="ytvis", dataset=DATASET, tasks=TASKS, categories=categories, plan=plan, read=read,
                      annotated=annotated)
