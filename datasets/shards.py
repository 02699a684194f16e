"""Writing, reading back and checking WebDataset shard folders (schema: docs/datasets.md).

A shard folder holds `shard-000000.tar`, ... (one sample per clip), `meta.json` (the
dataset's vocabulary) and `manifest.json` (what was written, from what, with which
parameters, and a sha256 per shard). Shards are written atomically and a conversion that
was interrupted resumes where it stopped; see `write_shards`.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import io
import itertools
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from omgseg.core.structures import Category, Task
from omgseg.datasets.clip import Clip, encode_id_map_rgb
from omgseg.datasets.location import ShardLocation

# Bump when the bytes written for the same clips change, so old folders are rebuilt.
CONVERTER_VERSION = "1"

MANIFEST = "manifest.json"
PARTIAL_MANIFEST = "manifest.partial.json"
META = "meta.json"
SHARD_PATTERN = re.compile(r"^shard-\d{6}\.tar$")
KEY_DIGITS = 9
# Fixed tar member metadata so that the same clips always give byte-identical shards (and so
# the same sha256): a resumed conversion must end with the manifest of an uninterrupted one.
_TAR_MTIME = 0.0


class ShardReadError(RuntimeError):
    """A shard that cannot be read as the manifest describes; the message names the shard
    file and, where one was reached, the sample key."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        # webdataset appends context to `args` of exceptions passing through its stages;
        # the message stays the one written here.
        return self.message


@dataclass(frozen=True)
class ShardInfo:
    """One finished shard: file name in the folder, samples, size in bytes, sha256 (hex)."""

    name: str
    samples: int
    bytes: int
    sha256: str

    def to_json(self) -> dict:
        return {"name": self.name, "samples": self.samples, "bytes": self.bytes, "sha256": self.sha256}

    @classmethod
    def from_json(cls, obj: object, where: str) -> ShardInfo:
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected an object, got {obj!r}")
        for key in ("name", "samples", "bytes", "sha256"):
            if key not in obj:
                raise ValueError(f"{where}: no {key!r} field in {obj!r}")
        for key in ("samples", "bytes"):
            if not isinstance(obj[key], int) or isinstance(obj[key], bool) or obj[key] < 0:
                raise ValueError(f"{where}: {key!r} must be a count (an integer >= 0), got {obj[key]!r}")
        return cls(str(obj["name"]), obj["samples"], obj["bytes"], str(obj["sha256"]))


@dataclass(frozen=True)
class Manifest:
    """What a shard folder holds and how it was made.

    source: where the clips came from ({"format", "src", "split", ...} as the caller gave it).
    parameters: conversion parameters that change the shards ({"samples_per_shard", ...}).
    created: ISO 8601 UTC time the conversion started (kept across a resume).
    meta_sha256: sha256 of the folder's meta.json as written (None in folders converted
        before it was recorded), so an edited vocabulary is detected.

    On disk the manifest also carries `checksum`, the sha256 of its own canonical JSON
    without that field (`manifest_checksum`): an edit or corruption of the manifest itself
    is detected too.
    """

    dataset: str
    shards: tuple[ShardInfo, ...]
    total_samples: int
    converter_version: str
    source: dict
    parameters: dict
    created: str
    meta_sha256: str | None = None

    def to_json(self) -> dict:
        doc = {
            "dataset": self.dataset,
            "converter_version": self.converter_version,
            "created": self.created,
            "source": self.source,
            "parameters": self.parameters,
            "total_samples": self.total_samples,
            "shards": [s.to_json() for s in self.shards],
        }
        if self.meta_sha256 is not None:
            doc["meta_sha256"] = self.meta_sha256
        doc["checksum"] = manifest_checksum(doc)
        return doc

    @classmethod
    def from_json(cls, obj: object, where: str) -> Manifest:
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        fields = ("dataset", "converter_version", "created", "source", "parameters", "total_samples", "shards")
        for key in fields:
            if key not in obj:
                raise ValueError(f"{where}: no {key!r} field (fields present: {sorted(obj)})")
        if not isinstance(obj["shards"], list):
            raise ValueError(f"{where}: 'shards' must be a list, got {type(obj['shards']).__name__}")
        shards = tuple(ShardInfo.from_json(s, f"{where}: shards[{i}]") for i, s in enumerate(obj["shards"]))
        for key in ("source", "parameters"):
            if not isinstance(obj[key], dict):
                raise ValueError(f"{where}: {key!r} must be an object, got {type(obj[key]).__name__}")
        total = obj["total_samples"]
        if not isinstance(total, int) or isinstance(total, bool):
            raise ValueError(f"{where}: 'total_samples' must be an integer, got {total!r}")
        manifest = cls(
            dataset=str(obj["dataset"]),
            shards=shards,
            total_samples=total,
            converter_version=str(obj["converter_version"]),
            source=dict(obj["source"]),
            parameters=dict(obj["parameters"]),
            created=str(obj["created"]),
            meta_sha256=str(obj["meta_sha256"]) if obj.get("meta_sha256") is not None else None,
        )
        counted = sum(s.samples for s in shards)
        if counted != manifest.total_samples:
            raise ValueError(
                f"{where}: total_samples is {manifest.total_samples} but the shards hold {counted}"
            )
        return manifest

    def identity(self) -> dict:
        """What must match for two conversions to give the same shards."""
        return {
            "dataset": self.dataset,
            "converter_version": self.converter_version,
            "source": self.source,
            "parameters": self.parameters,
        }


@dataclass(frozen=True)
class ShardMeta:
    """The content of `meta.json`: the dataset, where it came from, its tasks and vocabulary."""

    dataset: str
    format: str
    split: str
    tasks: tuple[Task, ...]
    categories: tuple[Category, ...]


def manifest_checksum(doc: dict) -> str:
    """sha256 of a manifest's JSON without its `checksum` field (sorted keys, compact)."""
    body = {k: v for k, v in doc.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def checksum_problem(doc: object, where: str) -> str | None:
    """Why a manifest's `checksum` is missing or does not match its content (None: it matches)."""
    if not isinstance(doc, dict):
        return None
    if "checksum" not in doc:
        return f"{where}: no checksum field, so edits cannot be detected (written before omgseg recorded one, or removed)"
    try:
        if doc["checksum"] == manifest_checksum(doc):
            return None
    except (TypeError, ValueError):  # values json cannot write back, e.g. lone surrogates
        pass
    return f"{where}: content does not match its checksum field: the manifest was edited or corrupted after conversion"


def read_manifest(shard_dir: Path | str | ShardLocation, *, check_checksum: bool = False) -> Manifest:
    """The finished manifest of a shard folder (a path or URL, docs/datasets.md "Shard
    locations"); errors name the file and the missing field. `check_checksum`: a manifest
    whose checksum does not match (edited or corrupted) is an error too; training relies on
    the per-shard sha256 instead."""
    location = ShardLocation.parse(shard_dir)
    doc = location.read_json(MANIFEST, "manifest")
    manifest = Manifest.from_json(doc, location.url(MANIFEST))
    # A manifest from before checksums were recorded is read as it is.
    problem = checksum_problem(doc, location.url(MANIFEST)) if check_checksum and "checksum" in doc else None
    if problem:
        raise ValueError(problem)
    return manifest


def read_meta(shard_dir: Path | str | ShardLocation, manifest: Manifest | None = None) -> ShardMeta:
    """`meta.json` of a shard folder (a path or URL) as a typed record; errors name the file
    and the field. With the folder's `manifest`, a meta.json whose sha256 differs from the
    one recorded at conversion is an error (an edited vocabulary)."""
    location = ShardLocation.parse(shard_dir)
    path = location.url(META)
    if manifest is not None and manifest.meta_sha256 is not None:
        try:
            with location.open(META) as stream:
                data = stream.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no meta.json (is {location} a shard folder written by omgseg convert?)") from None
        if hashlib.sha256(data).hexdigest() != manifest.meta_sha256:
            raise ValueError(f"{path}: sha256 differs from meta_sha256 in {MANIFEST}: meta.json was edited or "
                             "corrupted after conversion")
    obj = location.read_json(META, "meta.json")
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    for key in ("dataset", "format", "split", "tasks", "categories"):
        if key not in obj:
            raise ValueError(f"{path}: no {key!r} field (fields present: {sorted(obj)})")
    for key in ("tasks", "categories"):
        if not isinstance(obj[key], list):
            raise ValueError(f"{path}: {key!r} must be a list, got {type(obj[key]).__name__}")
    try:
        tasks = tuple(Task.parse(t) for t in obj["tasks"])
        categories = tuple(Category.from_json(c, str(path)) for c in obj["categories"])
    except (TypeError, ValueError) as exn:  # a mistyped value: say where
        message = str(exn) if str(exn).startswith(str(path)) else f"{path}: {exn}"
        raise ValueError(message) from None
    return ShardMeta(str(obj["dataset"]), str(obj["format"]), str(obj["split"]), tasks, categories)


# ---------------------------------------------------------------------------------------
# Writing


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sample_key(index: int) -> str:
    """Running sample index, zero-padded; no dots (webdataset splits key and field there)."""
    return f"{index:0{KEY_DIGITS}d}"


def frame_field(t: int) -> str:
    return f"f{t:03d}"


def encode_clip(clip: Clip, key: str) -> dict:
    """A clip as a webdataset sample: `json`, `fNNN.<jpg|png>` (source bytes), `fNNN.seg.png`."""
    sample: dict = {"__key__": key, "json": json.dumps(clip.header(), sort_keys=True).encode("utf-8")}
    for t in range(clip.num_frames):
        sample[f"{frame_field(t)}.{clip.image_ext}"] = bytes(clip.images[t])
        buffer = io.BytesIO()
        # PNG is lossless: the 24-bit ids survive exactly. Fixed options keep bytes reproducible.
        Image.fromarray(encode_id_map_rgb(clip.id_maps[t]), mode="RGB").save(buffer, format="PNG", compress_level=6)
        sample[f"{frame_field(t)}.seg.png"] = buffer.getvalue()
    return sample


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes and counts what goes through it."""

    def __init__(self, raw: io.BufferedWriter) -> None:
        super().__init__()
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # noqa: ANN001 - bytes-like, as io.RawIOBase.write
        view = memoryview(data)
        self.raw.write(view)
        self.sha256.update(view)
        self.size += view.nbytes
        return view.nbytes


def _fsync_dir(path: Path) -> None:
    # Make the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _named(exn: OSError, path: Path) -> OSError:
    """A full disk's error with `path` as its file name (a failed write() names no file)."""
    if exn.filename is not None or exn.errno not in DISK_FULL:
        return exn
    return type(exn)(exn.errno, exn.strerror or str(exn), str(path))


@contextmanager
def _temporary(path: Path) -> Iterator[Path]:
    """`path.tmp` to write before it is renamed to `path`; removed if writing fails, so an
    interrupted file never survives under a name that looks complete (a full disk's error
    names `path`)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
    except OSError as exn:
        tmp.unlink(missing_ok=True)
        named = _named(exn, path)
        if named is exn:
            raise
        raise named from exn
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json_atomic(path: Path, obj: object) -> None:
    with _temporary(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_shard(path: Path, clips: Iterable[Clip], first_key: int, on_clip: Callable[[], None]) -> ShardInfo | None:
    """Write `clips` into `path` via `path.tmp` + fsync + rename; None if `clips` is empty."""
    count = 0
    with _temporary(path) as tmp, open(tmp, "wb") as raw:
        hashing = _HashingFile(raw)
        with wds.TarWriter(hashing, mtime=_TAR_MTIME, encoder=False) as writer:
            for clip in clips:
                writer.write(encode_clip(clip, sample_key(first_key + count)))
                count += 1
                on_clip()
        raw.flush()
        os.fsync(raw.fileno())
    if count == 0:
        tmp.unlink()
        return None
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return ShardInfo(path.name, count, hashing.size, hashing.sha256.hexdigest())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove_outputs(out_dir: Path) -> None:
    """Remove everything a conversion writes, finished manifest first, so that an
    interruption during the cleanup never leaves a manifest pointing at deleted shards."""
    for name in (MANIFEST, PARTIAL_MANIFEST):
        (out_dir / name).unlink(missing_ok=True)
    for path in out_dir.iterdir():
        if SHARD_PATTERN.match(path.name) or path.name.endswith(".tmp"):
            path.unlink()
    (out_dir / META).unlink(missing_ok=True)


def _load_or_none(path: Path) -> Manifest | None:
    """The manifest at `path`, or None when it is missing, unreadable or edited since written."""
    try:
        doc = json.loads(path.read_bytes())
        manifest = Manifest.from_json(doc, str(path))
    except (OSError, ValueError):
        return None
    # An edited manifest is not trusted; one from before checksums were recorded still is.
    return None if "checksum" in doc and checksum_problem(doc, str(path)) else manifest


def _shards_present(out_dir: Path, shards: Iterable[ShardInfo]) -> bool:
    for s in shards:
        path = out_dir / s.name
        if not path.is_file() or path.stat().st_size != s.bytes:
            return False
    return True


def _meta_matches(out_dir: Path, meta: dict) -> bool:
    try:
        return json.loads((out_dir / META).read_text()) == json.loads(json.dumps(meta))
    except (OSError, ValueError):
        return False


def write_shards(
    clips: Iterable[Clip],
    out_dir: Path,
    *,
    meta: dict,
    source: dict,
    samples_per_shard: int = 64,
    total: int | None = None,
    progress: bool = False,
) -> Manifest:
    """Write `clips` as shards of `samples_per_shard` samples into `out_dir`.

    meta: the `meta.json` content ({"dataset", "format", "split", "tasks", "categories"}).
    source: provenance recorded in the manifest ({"format", "src", "split", "clip_length"...});
        together with the parameters it decides whether an existing folder can be reused.
    total: the number of clips expected, for the progress bar only.

    Re-running is safe. Finished with the same source and parameters: nothing is done and the
    existing manifest is returned. Interrupted with the same source and parameters: shards
    recorded in `manifest.partial.json` whose sha256 still matches are kept and their clips
    skipped. Anything else: the folder's shards and manifests are removed and written anew,
    never mixed with old ones.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    if "dataset" not in meta:
        raise ValueError(f"meta must have a 'dataset' field, got fields {sorted(meta)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # JSON round trip so comparisons with what was read back from disk are like for like.
    source = json.loads(json.dumps(source))
    parameters = {"samples_per_shard": samples_per_shard}
    if "clip_length" in source:
        parameters["clip_length"] = source["clip_length"]
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    wanted = Manifest(str(meta["dataset"]), (), 0, CONVERTER_VERSION, source, parameters, now)

    finished = _load_or_none(out_dir / MANIFEST)
    if (
        finished is not None
        and finished.identity() == wanted.identity()
        and _meta_matches(out_dir, meta)
        and _shards_present(out_dir, finished.shards)
    ):
        (out_dir / PARTIAL_MANIFEST).unlink(missing_ok=True)
        return finished

    kept: list[ShardInfo] = []
    partial = _load_or_none(out_dir / PARTIAL_MANIFEST)
    if finished is None and partial is not None and partial.identity() == wanted.identity() and _meta_matches(out_dir, meta):
        wanted = Manifest(wanted.dataset, (), 0, CONVERTER_VERSION, source, parameters, partial.created)
        for s in partial.shards:
            path = out_dir / s.name
            if not (path.is_file() and path.stat().st_size == s.bytes and sha256_file(path) == s.sha256):
                break
            kept.append(s)
        keep_names = {s.name for s in kept}
        for path in out_dir.iterdir():
            if path.name.endswith(".tmp") or (SHARD_PATTERN.match(path.name) and path.name not in keep_names):
                path.unlink()
    else:
        _remove_outputs(out_dir)
        _write_json_atomic(out_dir / META, meta)

    meta_sha256 = sha256_file(out_dir / META)

    def save_partial() -> None:
        done = sum(s.samples for s in kept)
        record = Manifest(wanted.dataset, tuple(kept), done, CONVERTER_VERSION, source, parameters, wanted.created,
                          meta_sha256)
        _write_json_atomic(out_dir / PARTIAL_MANIFEST, record.to_json())

    save_partial()
    skip = sum(s.samples for s in kept)
    iterator = iter(clips)
    skipped = sum(1 for _ in itertools.islice(iterator, skip))
    if skipped < skip:
        raise ValueError(
            f"{out_dir}: resuming needs {skip} clips already written, but the source now yields "
            f"only {skipped}; the source changed: delete {out_dir} and convert again"
        )
    with tqdm(total=total, initial=skip, disable=not progress, unit="clip", desc=out_dir.name) as bar:
        while True:
            chunk = itertools.islice(iterator, samples_per_shard)
            info = _write_shard(out_dir / shard_name(len(kept)), chunk, skip, lambda: bar.update(1))
            if info is None:
                break
            kept.append(info)
            skip += info.samples
            save_partial()
            if info.samples < samples_per_shard:
                break
    if not kept:
        raise ValueError(f"{out_dir}: the source yielded no clips for {source}")
    manifest = Manifest(wanted.dataset, tuple(kept), skip, CONVERTER_VERSION, source, parameters, wanted.created,
                        meta_sha256)
    _write_json_atomic(out_dir / MANIFEST, manifest.to_json())
    (out_dir / PARTIAL_MANIFEST).unlink(missing_ok=True)
    return manifest


# ---------------------------------------------------------------------------------------
# Reading raw samples back


class _TarContext:
    """The shard being read and its last member, for error messages. webdataset's handler
    receives only the exception, so the context is kept here as reading proceeds."""

    def __init__(self, shard: str) -> None:
        self.shard = shard
        self.last_member: str | None = None

    def note_member(self, fname: str) -> str:
        self.last_member = fname
        return fname

    def where(self) -> str:
        if self.last_member is None:
            return f"shard {self.shard} (before its first sample)"
        return f"shard {self.shard}, sample {self.last_member.split('.', 1)[0]} (member {self.last_member})"

    def handler(self, exn: Exception) -> bool:
        # Re-raise with the shard and sample named, never warn-and-continue: a skipped sample
        # would silently change what a study trains or evaluates on.
        if isinstance(exn, ShardReadError):
            raise exn
        first = exn.args[0] if exn.args else ""
        raise ShardReadError(f"{self.where()}: cannot read tar ({type(exn).__name__}: {first})") from exn


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes and counts what is read through it."""

    def __init__(self, raw) -> None:  # noqa: ANN001 - any binary stream
        super().__init__()
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # noqa: ANN001 - a writable buffer, as io.RawIOBase.readinto
        data = self.raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.sha256.update(data)
        self.size += n
        return n

    def drain(self) -> None:
        """Read (and hash) what the tar reader left: the end-of-archive blocks and padding."""
        for block in iter(lambda: self.raw.read(1 << 20), b""):
            self.sha256.update(block)
            self.size += len(block)

    def close(self) -> None:
        self.raw.close()
        super().close()


def read_shard_samples(
    path: Path | str, *, expected: ShardInfo | None = None
) -> Iterator[dict]:
    """Raw samples of one shard (a local path, or a URL fsspec opens, read as a stream):
    {"__key__", "__url__", field: bytes}, in file order.

    With `expected`, a sample count, size or sha256 different from the manifest's raises once
    the shard has been read to its end (tarfile reads a corrupt header in mid-archive as the
    end of the archive, so only counting and hashing tell; the samples before were yielded
    already). Errors are `ShardReadError` naming the shard and the sample reached.
    """
    location = ShardLocation.parse(path)
    name = str(path)
    context = _TarContext(name)
    try:
        if location.remote:
            folder, _, file_name = name.rpartition("/")
            raw = ShardLocation(folder).open(file_name)
        else:
            raw = open(name, "rb")  # noqa: SIM115 - closed below, after the generator finishes
    except (FileNotFoundError, IsADirectoryError):
        raise ShardReadError(f"shard {name} does not exist") from None
    except OSError as exn:
        raise ShardReadError(f"shard {name}: cannot open ({exn})") from None
    stream = _HashingReader(raw)
    buffered = io.BufferedReader(stream)  # held here: when collected it would close the file
    try:
        files = wds.tariterators.tar_file_expander([{"stream": buffered, "url": name}],
                                                   handler=context.handler, rename_files=context.note_member)
        count = 0
        last_key = None
        for sample in wds.tariterators.group_by_keys(files, handler=context.handler):
            count += 1
            last_key = sample["__key__"]
            yield sample
        if expected is None:
            return
        try:
            stream.drain()
        except OSError as exn:
            raise ShardReadError(f"shard {name}: read failed after sample {last_key} ({exn})") from None
        if count != expected.samples or stream.size != expected.bytes:
            raise ShardReadError(
                f"shard {name}: read {count} samples ({stream.size} bytes) but the manifest says "
                f"{expected.samples} ({expected.bytes} bytes); last sample read: {last_key}; "
                f"the shard is truncated or corrupt"
            )
        if stream.sha256.hexdigest() != expected.sha256:
            raise ShardReadError(f"shard {name}: sha256 differs from the manifest: the shard is corrupt "
                                 f"(its {count} samples were read)")
    finally:
        buffered.close()


# ---------------------------------------------------------------------------------------
# Checking and describing


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


def decode_png_rgb(data: bytes) -> np.ndarray:
    """PNG bytes -> (H, W, 3) uint8; an id map that is not RGB is an error, not converted."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode != "RGB":
            raise ValueError(f"id map PNG must be RGB, got mode {image.mode}")
        return np.asarray(image, dtype=np.uint8).copy()
