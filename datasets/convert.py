"""`omgseg convert`: read a data set in its public layout and write it as WebDataset shards."""

from __future__ import annotations

from pathlib import Path

from omgseg.datasets.formats import get_format
from omgseg.datasets.manifest import Manifest
from omgseg.datasets.shard_writer import write_shards


def convert(
    format_name: str,
    src: Path,
    out: Path,
    split: str = "train",
    samples_per_shard: int = 64,
    clip_length: int | None = None,
    progress: bool = False,
) -> Manifest:
    """Convert `src` (laid out as docs/datasets.md says for `format_name`) into `out`.

    Re-running with the same arguments is a no-op once finished and resumes an interrupted
    run; other arguments restart the folder cleanly (see `write_shards`).
    """
    fmt = get_format(format_name)
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"source folder {src} does not exist")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if clip_length is not None and clip_length < 1:
        raise ValueError(f"clip_length must be at least 1, got {clip_length}")
    categories = fmt.categories(src, split)
    meta = {
        "dataset": fmt.dataset,
        "format": fmt.name,
        "split": split,
        "tasks": [t.value for t in fmt.tasks],
        "categories": [c.to_json() for c in categories],
    }
    source = {"format": fmt.name, "src": str(src.resolve()), "split": split, "clip_length": clip_length}
    # Progress counts clips; only image formats (or whole videos) have one clip per source item.
    total = fmt.count(src, split) if clip_length is None else None
    return write_shards(
        fmt.clips(src, split, clip_length),
        Path(out),
        meta=meta,
        source=source,
        samples_per_shard=samples_per_shard,
        total=total,
        progress=progress,
    )
