"""What every reader of a public dataset format provides."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from omgseg.core.structures import Category, Task
from omgseg.datasets.clip import Clip


@dataclass(frozen=True)
class ClipRef:
    """One clip a split yields, named without reading it: the image or video it comes from
    (`item`, its id as text: what a held-out split selects by) and its frames [start, stop)."""

    item: str
    start: int = 0
    stop: int = 1


class ClipPlanner(Protocol):
    def __call__(self, src: Path, split: str, clip_length: int | None) -> list[ClipRef]: ...


class ClipReader(Protocol):
    def __call__(self, src: Path, split: str, refs: Sequence[ClipRef], clip_length: int | None) -> Iterator[Clip]: ...


def always_annotated(src: Path, split: str) -> bool:
    """For layouts that cannot hold an image or video without its annotation files."""
    return True


@dataclass(frozen=True)
class SourceFormat:
    """A public dataset format: its command-line name, what it supervises, how to read it.

    name: the name `omgseg convert` and configs use ("coco-panoptic").
    dataset: the dataset name written into samples and meta.json ("coco_panoptic").
    tasks: the tasks its annotations supervise.
    categories: (src, split) -> the vocabulary, in the source's own ids.
    plan: (src, split, clip_length) -> every clip of the split, in a deterministic order,
        from the index files and folder listings alone (no image is decoded). Videos are cut
        into consecutive clips of `clip_length` frames (the last one may be shorter; None
        keeps each video whole); an image is one clip.
    read: (src, split, refs, clip_length) -> the clips `refs` name, in that order. A clip is
        the same whichever other clips are read with it, so a split can be read in parts (in
        parallel) and give the clips one pass over `plan` gives.
    annotated: (src, split) -> whether the split carries annotations (YouTube-VIS's public
        val split does not); when the source is not there to look at, what the public
        release has.
    """

    name: str
    dataset: str
    tasks: tuple[Task, ...]
    categories: Callable[[Path, str], list[Category]]
    plan: ClipPlanner
    read: ClipReader
    annotated: Callable[[Path, str], bool] = always_annotated

    def clips(self, src: Path, split: str, clip_length: int | None = None) -> Iterator[Clip]:
        """Every clip of the split, in plan order."""
        return self.read(src, split, self.plan(src, split, clip_length), clip_length)

    def count(self, src: Path, split: str) -> int:
        """How many images or videos the split has."""
        return len(self.plan(src, split, None))

