"""What every reader of a public dataset format provides."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from omgseg.core.structures import Category, Task
from omgseg.datasets.clip import Clip


class ClipReader(Protocol):
    def __call__(self, src: Path, split: str, clip_length: int | None) -> Iterator[Clip]: ...


@dataclass(frozen=True)
class SourceFormat:
    """A public dataset format: its command-line name, what it supervises, how to read it.

    name: the name `omgseg convert` and configs use ("coco-panoptic").
    dataset: the dataset name written into samples and meta.json ("coco_panoptic").
    tasks: the tasks its annotations supervise.
    categories: (src, split) -> the vocabulary, in the source's own ids.
    clips: (src, split, clip_length) -> clips in a deterministic order; videos are cut into
        consecutive clips of `clip_length` frames (the last one may be shorter; None keeps
        each video whole). Image formats ignore clip_length.
    count: (src, split) -> how many source items (images or videos) there are, for progress.
    """

    name: str
    dataset: str
    tasks: tuple[Task, ...]
    categories: Callable[[Path, str], list[Category]]
    clips: ClipReader
    count: Callable[[Path, str], int]
