"""`omgseg convert`: read a data set in its public layout and write it as WebDataset shards,
shard by shard in parallel worker processes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from omgseg.datasets.clip import Clip
from omgseg.datasets.formats import get_format
from omgseg.datasets.formats.base import ClipRef
from omgseg.datasets.heldout import HeldOut, HeldOutSplit
from omgseg.datasets.manifest import Manifest, ShardMeta
from omgseg.datasets.shard_writer import ShardJob, write_shard_jobs


def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class SourceClips:
    """The clips `refs` names of one split of a source, read when iterated. It pickles as a few
    names, so a worker process reads its shard's clips itself."""

    format_name: str
    src: Path
    split: str
    clip_length: int | None
    refs: tuple[ClipRef, ...]

    def __iter__(self) -> Iterator[Clip]:
        return get_format(self.format_name).read(self.src, self.split, self.refs, self.clip_length)


def convert(
    format_name: str,
    src: Path,
    out: Path,
    split: str = "train",
    samples_per_shard: int = 64,
    clip_length: int | None = None,
    *,
    heldout: HeldOut | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> Manifest:
    """Convert `src` (laid out as docs/datasets.md says for `format_name`) into `out`.

    heldout: the source's val split is not read; `split` "val" converts this part of its
        train split instead, and "train" every other train image or video
        (datasets/heldout.py). The manifest records which.
    workers: processes writing shards at once (None: one per core); the shards are the same
        bytes for any number.

    Re-running with the same arguments is a no-op once finished and resumes an interrupted
    run; other arguments restart the folder cleanly (see `write_shard_jobs`).
    """
    fmt = get_format(format_name)
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"source folder {src} does not exist")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if clip_length is not None and clip_length < 1:
        raise ValueError(f"clip_length must be at least 1, got {clip_length}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    read_split = "train" if heldout is not None else split
    refs = fmt.plan(src, read_split, clip_length)
    record = None
    if heldout is not None:
        items = heldout.select([r.item for r in refs], f"{src} ({fmt.name} train split)")
        record = HeldOutSplit(heldout, split, items)
        chosen = set(items)
        refs = [r for r in refs if (r.item in chosen) == (split == "val")]
    meta = ShardMeta(fmt.dataset, fmt.name, split, fmt.tasks, tuple(fmt.categories(src, read_split)))
    source = {"format": fmt.name, "src": str(src.resolve()), "split": read_split, "clip_length": clip_length}
    jobs = []
    for index, start in enumerate(range(0, len(refs), samples_per_shard)):
        chunk = tuple(refs[start:start + samples_per_shard])
        jobs.append(ShardJob(index, start, len(chunk), SourceClips(fmt.name, src.resolve(), read_split, clip_length, chunk)))
    return write_shard_jobs(jobs, Path(out), meta=meta, source=source, samples_per_shard=samples_per_shard,
                            heldout=record, workers=workers or default_workers(), total=len(refs), progress=progress)
