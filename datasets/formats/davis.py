"""DAVIS 2017 (`davis`): video object segmentation.

    DIR/ImageSets/2017/{train,val}.txt             one sequence name a line
    DIR/JPEGImages/480p/<sequence>/<frame>.jpg
    DIR/Annotations/480p/<sequence>/<frame>.png    palette PNG, index = object id, 0 = background

Index 255 is void. DAVIS has no classes: every object is category 1 ("object", a thing), and
its segment id and track id are its palette index. Sequences come in name order.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from omgseg.core.structures import Category, Task
from omgseg.datasets.clip import Clip
from omgseg.datasets.formats._common import clip_ranges, id_counts, mask_video_clips, read_name_list
from omgseg.datasets.formats.base import SourceFormat

DATASET = "davis"
TASKS = (Task.VOS,)
OBJECT = Category(id=1, name="object", isthing=True)
VOID_INDEX = 255


def decode_davis_mask(pixels: np.ndarray, mode: str, path: Path, where: str) -> tuple[np.ndarray, dict]:
    """Palette (or grey) PNG indices (H, W) -> uint32 id map with 255 as void, and its objects."""
    if pixels.ndim != 2 or mode not in ("P", "L"):
        raise ValueError(f"{where}: {path} must be a palette PNG of object indices, got mode {mode!r}")
    id_map = pixels.astype(np.uint32)
    id_map[id_map == VOID_INDEX] = 0
    return id_map, {i: (OBJECT.id, False, i) for i in id_counts(id_map)}


def _sequences(src: Path, split: str) -> list[str]:
    return sorted(read_name_list(Path(src) / "ImageSets" / "2017" / f"{split}.txt"))


def categories(src: Path, split: str) -> list[Category]:
    return [OBJECT]


def count(src: Path, split: str) -> int:
    return len(_sequences(src, split))


def clips(src: Path, split: str, clip_length: int | None = None) -> Iterator[Clip]:
    clip_ranges(1, clip_length)  # reject a bad clip_length before reading anything
    for sequence in _sequences(src, split):
        yield from mask_video_clips(
            dataset=DATASET,
            tasks=TASKS,
            video=sequence,
            image_dir=Path(src) / "JPEGImages" / "480p",
            listed_in=Path(src) / "ImageSets" / "2017" / f"{split}.txt",
            mask_dir=Path(src) / "Annotations" / "480p",
            clip_length=clip_length,
            decode=decode_davis_mask,
        )


FORMAT = SourceFormat(
    name="davis", dataset=DATASET, tasks=TASKS, categories=categories, clips=clips, count=count
)
