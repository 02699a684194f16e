"""Writing clips as a WebDataset shard folder: atomic per shard, resumable after an
interruption, byte-identical for the same clips (`write_shards`)."""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import io
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from omgseg.datasets.clip import Clip, encode_id_map_rgb
from omgseg.datasets.manifest import (
    CONVERTER_VERSION,
    MANIFEST,
    META,
    PARTIAL_MANIFEST,
    SHARD_PATTERN,
    Manifest,
    ShardInfo,
    checksum_problem,
    frame_field,
    sample_key,
    sha256_file,
    shard_name,
)

# Fixed tar member metadata so that the same clips always give byte-identical shards (and so
# the same sha256): a resumed conversion must end with the manifest of an uninterrupted one.
_TAR_MTIME = 0.0


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
