"""Checking a shard folder against its manifest (`omgseg shards verify`) and counting what it
holds (`omgseg shards stats`)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from omgseg.datasets.location import ShardLocation
from omgseg.datasets.manifest import (
    MANIFEST,
    PARTIAL_MANIFEST,
    SHARD_PATTERN,
    Manifest,
    ShardReadError,
    checksum_problem,
    frame_field,
    read_manifest,
    read_meta,
    sha256_file,
)
from omgseg.datasets.shard_reader import read_shard_samples


def _sample_problems(sample: dict, where: str) -> tuple[list[str], dict | None]:
    """Missing or malformed fields of one raw sample; the parsed header when readable."""
    if "json" not in sample:
        return [f"{where}: no json header"], None
    try:
        header = json.loads(sample["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        return [f"{where}: json header is not valid JSON ({exn})"], None
    if not isinstance(header, dict) or "frames" not in header:
        return [f"{where}: json header has no 'frames' field"], None
    frames = header["frames"]
    if not isinstance(frames, int) or isinstance(frames, bool) or frames < 0:
        return [f"{where}: json header 'frames' must be an integer >= 0, got {frames!r}"], None
    segments = header.get("segments", [])
    if not isinstance(segments, list) or not all(
        isinstance(seg, dict) and isinstance(seg.get("category_id"), int) for seg in segments
    ):
        return [f"{where}: json header 'segments' must be a list of objects with an integer category_id"], None
    problems = []
    for t in range(frames):
        stem = frame_field(t)
        if f"{stem}.jpg" not in sample and f"{stem}.png" not in sample:
            problems.append(f"{where}: no image for frame {t} ({stem}.jpg or {stem}.png)")
        if f"{stem}.seg.png" not in sample:
            problems.append(f"{where}: no id map for frame {t} ({stem}.seg.png)")
    return problems, header


def verify_shards(shard_dir: Path) -> list[str]:
    """Every way `shard_dir` differs from its manifest (empty list: all good).

    Re-hashes each shard, compares sizes, counts samples by reading the tar members, checks
    each sample has its header and every frame's image and id map, checks the manifest's own
    checksum and meta.json's sha256, and reports shard files the manifest does not list,
    leftover `.tmp` files and an unfinished conversion.
    """
    shard_dir = Path(shard_dir)
    location = ShardLocation.parse(shard_dir)
    try:
        doc = location.read_json(MANIFEST, "manifest")
        manifest = Manifest.from_json(doc, location.url(MANIFEST))
    except (FileNotFoundError, ValueError) as exn:
        return [str(exn)]
    problems: list[str] = []
    checksum = checksum_problem(doc, location.url(MANIFEST))
    if checksum:
        problems.append(checksum)
    try:
        read_meta(shard_dir, manifest)
    except (FileNotFoundError, ValueError) as exn:
        problems.append(str(exn))
    listed = {s.name for s in manifest.shards}
    for path in sorted(shard_dir.iterdir()):
        if SHARD_PATTERN.match(path.name) and path.name not in listed:
            problems.append(f"{path.name}: shard file not listed in {MANIFEST}")
        elif path.name.endswith(".tmp"):
            problems.append(f"{path.name}: leftover temporary file of an interrupted write")
    if (shard_dir / PARTIAL_MANIFEST).exists():
        problems.append(f"{PARTIAL_MANIFEST}: present, a conversion was interrupted or is running")
    for info in manifest.shards:
        path = shard_dir / info.name
        if not path.is_file():
            problems.append(f"{info.name}: missing")
            continue
        size = path.stat().st_size
        if size != info.bytes:
            problems.append(f"{info.name}: {size} bytes, manifest says {info.bytes}")
        if sha256_file(path) != info.sha256:
            problems.append(f"{info.name}: sha256 differs from the manifest")
        count = 0
        try:
            for sample in read_shard_samples(path):
                count += 1
                problems.extend(_sample_problems(sample, f"{info.name} sample {sample['__key__']}")[0])
        except ShardReadError as exn:
            problems.append(str(exn))
        if count != info.samples:
            problems.append(f"{info.name}: {count} samples in the tar, manifest says {info.samples}")
    return problems


def shard_stats(shard_dir: Path) -> dict:
    """Counts over a shard folder: samples, frames, bytes, tasks and segments per category.

    {"dir", "dataset", "shards", "samples", "frames", "bytes", "tasks",
     "segments_per_category": [{"id", "name", "segments"}] (every category, by id)}
    """
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir, check_checksum=True)
    meta = read_meta(shard_dir, manifest)
    frames = 0
    samples = 0
    per_category: Counter[int] = Counter()
    for info in manifest.shards:
        for sample in read_shard_samples(shard_dir / info.name, expected=info):
            where = f"shard {shard_dir / info.name}, sample {sample['__key__']}"
            problems, header = _sample_problems(sample, where)
            if header is None:
                raise ShardReadError(problems[0])
            samples += 1
            frames += int(header["frames"])
            per_category.update(int(s["category_id"]) for s in header.get("segments", []))
    names = {c.id: c.name for c in meta.categories}
    categories = [{"id": i, "name": names.get(i, "?"), "segments": per_category.get(i, 0)}
                  for i in sorted(set(names) | set(per_category))]
    return {
        "dir": str(shard_dir),
        "dataset": manifest.dataset,
        "shards": len(manifest.shards),
        "samples": samples,
        "frames": frames,
        "bytes": sum(s.bytes for s in manifest.shards),
        "tasks": [t.value for t in meta.tasks],
        "segments_per_category": categories,
    }
