"""VIPSeg (`vipseg`), the release layout after its `change2_720p.py`.

    DIR/train.txt, DIR/val.txt                         one video name a line
    DIR/VIPSeg_720P/panoVIPSeg_categories.json         [{"id", "name", "isthing", "color"}], ids 0..123
    DIR/VIPSeg_720P/images/<video>/<frame>.jpg
    DIR/VIPSeg_720P/panomasks/<video>/<frame>.png      single channel, 16-bit

Mask values: 0 void; stuff of category c is c + 1; thing instance k of category c is
(c + 1) * 100 + k, so values above 124 are things. 200 is a known annotation bug of the
release and is read as void. The raw value is the segment id and the track id: it is stable
across a video's frames and fits the 24-bit id map.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from omgseg.core.structures import Category, Task
from omgseg.datasets.clip import Clip
from omgseg.datasets.formats._common import (
    field_errors,
    id_counts,
    load_json,
    mask_video_clips,
    read_name_list,
    video_folder_plan,
)
from omgseg.datasets.formats.base import ClipRef, SourceFormat

DATASET = "vipseg"
TASKS = (Task.VIDEO_PANOPTIC, Task.VIDEO_INSTANCE)
BUGGY_VOID = 200
THING_DIVISOR = 100
MAX_STUFF_VALUE = 124


def value_category(value: int, categories: dict[int, Category], path: Path, where: str) -> int | None:
    """The category id a raw VIPSeg mask value encodes, or None for void."""
    if value in (0, BUGGY_VOID):
        return None
    thing = value > MAX_STUFF_VALUE
    category_id = (value // THING_DIVISOR if thing else value) - 1
    category = categories.get(category_id)
    if category is None:
        raise ValueError(f"{where}: {path} has value {value} of unknown category {category_id}")
    # A stuff-range value of a thing category is accepted, as VIPSeg's own
    # create_panoptic_video_labels.py does (a thing region without instance number).
    if thing and not category.isthing:
        raise ValueError(
            f"{where}: {path} has thing value {value} for stuff category {category_id} ({category.name})"
        )
    return category_id


def decode_vipseg_mask(
    pixels: np.ndarray, mode: str, path: Path, where: str, categories: dict[int, Category]
) -> tuple[np.ndarray, dict]:
    """Raw 16-bit values (H, W) -> uint32 id map (200 -> void) and the info of its segments."""
    if pixels.ndim != 2 or not np.issubdtype(pixels.dtype, np.integer):
        raise ValueError(f"{where}: {path} must be a single-channel integer PNG, got mode {mode!r}")
    if pixels.min(initial=0) < 0:
        raise ValueError(f"{where}: {path} has negative value {int(pixels.min())}")
    id_map = pixels.astype(np.uint32)
    id_map[id_map == BUGGY_VOID] = 0
    info = {}
    for value in id_counts(id_map):
        category_id = value_category(value, categories, path, where)
        if category_id is not None:
            info[value] = (category_id, False, value)
    return id_map, info


def _root(src: Path) -> Path:
    return Path(src) / "VIPSeg_720P"


def categories(src: Path, split: str) -> list[Category]:
    path = _root(src) / "panoVIPSeg_categories.json"
    data = load_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of categories, got {type(data).__name__}")
    with field_errors(str(path)):
        out = [Category.from_json(c, str(path)) for c in data]
    if len({c.id for c in out}) != len(out):
        raise ValueError(f"{path}: category ids are not unique")
    return out


def _videos(src: Path, split: str) -> list[str]:
    return sorted(read_name_list(Path(src) / f"{split}.txt"))


def plan(src: Path, split: str, clip_length: int | None = None) -> list[ClipRef]:
    return video_folder_plan(_videos(src, split), _root(src) / "images", Path(src) / f"{split}.txt", clip_length)


def read(src: Path, split: str, refs: Sequence[ClipRef], clip_length: int | None = None) -> Iterator[Clip]:
    decode = functools.partial(decode_vipseg_mask, categories={c.id: c for c in categories(src, split)})
    return mask_video_clips(dataset=DATASET, tasks=TASKS, refs=refs, image_dir=_root(src) / "images",
                            mask_dir=_root(src) / "panomasks", clip_length=clip_length, decode=decode,
                            listed_in=Path(src) / f"{split}.txt")


FORMAT = SourceFormat(name="vipseg", dataset=DATASET, tasks=TASKS, categories=categories, plan=plan, read=read)
