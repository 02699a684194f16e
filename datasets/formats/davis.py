"""DAVIS 2017 (`davis`): video object segmentation.

    DIR/ImageSets/2017/{train,val}.txt             one sequence name a line
    DIR/JPEGImages/480p/<sequence>/<frame>.jpg
    DIR/Annotations/480p/<sequence>/<frame>.png    palette PNG, index = object id, 0 = background

Index 255 is void. DAVIS has no classes: every object is category 1 ("object", a thing), and
its segment id and track id are its palette index. Sequences come in name order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from omgseg.core.structures import Category, Task
from omgseg.datasets.clip import Clip
from omgseg.datasets.formats._common import id_counts, mask_video_clips, read_name_list, video_folder_plan
from omgseg.datasets.formats.base import ClipRef, SourceFormat

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
    return sorted(read_name_list(_listing(src, split)))


def categories(src: Path, split: str) -> list[Category]:
    return [OBJECT]


def _listing(src: Path, split: str) -> Path:
    return Path(src) / "ImageSets" / "2017" / f"{split}.txt"


def plan(src: Path, split: str, clip_length: int | None = None) -> list[ClipRef]:
    return video_folder_plan(_sequences(src, split), Path(src) / "JPEGImages" / "480p", _listing(src, split), clip_length)


def read(src: Path, split: str, refs: Sequence[ClipRef], clip_length: int | None = None) -> Iterator[Clip]:
    return mask_video_clips(dataset=DATASET, tasks=TASKS, refs=refs, image_dir=Path(src) / "JPEGImages" / "480p",
                            mask_dir=Path(src) / "Annotations" / "480p", clip_length=clip_length,
                            decode=decode_davis_mask, listed_in=_listing(src, split))


FORMAT = SourceFormat(name="davis", dataset=DATASET, tasks=TASKS, categories=categories, plan=plan, read=read)
