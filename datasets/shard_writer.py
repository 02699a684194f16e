"""Writing clips as a WebDataset shard folder: atomic per shard, resumable after an
interruption, byte-identical for the same clips however it is written: in this process from
clips at hand (`write_shards`), or shard by shard in worker processes (`write_shard_jobs`,
what `omgseg convert --workers N` runs)."""

from __future__ import annotations

import datetime as _dt
import errno
import functools
import hashlib
import io
import itertools
import json
import multiprocessing
import multiprocessing.pool
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from omgseg.datasets.clip import Clip, encode_id_map_rgb
from omgseg.datasets.heldout import HeldOutSplit
from omgseg.datasets.manifest import (
    CONVERTER_VERSION,
    MANIFEST,
    META,
    PARTIAL_MANIFEST,
    SHARD_PATTERN,
    Manifest,
    ShardInfo,
    ShardMeta,
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


@dataclass(frozen=True)
class ShardJob:
    """One shard to write: its index in the folder, the key of its first sample, how many
    clips it holds, and the clips, read only when the shard is written (in a worker process
    when several write: then `clips` must pickle, e.g. a reference to its source's clips)."""

    index: int
    first_key: int
    samples: int
    clips: Iterable[Clip]


def write_job(out_dir: Path, job: ShardJob) -> ShardInfo:
    """Write one job's shard into `out_dir` via `<name>.tmp` + fsync + rename."""
    path = out_dir / shard_name(job.index)
    count = annotated = 0
    with _temporary(path) as tmp, open(tmp, "wb") as raw:
        hashing = _HashingFile(raw)
        with wds.TarWriter(hashing, mtime=_TAR_MTIME, encoder=False) as writer:
            for clip in job.clips:
                writer.write(encode_clip(clip, sample_key(job.first_key + count)))
                count += 1
                annotated += bool(clip.segments)
        if count != job.samples:
            raise ValueError(f"{path}: the source gave {count} clips for this shard, its plan {job.samples}")
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return ShardInfo(path.name, count, annotated, hashing.size, hashing.sha256.hexdigest())


def _jobs_of_clips(clips: Iterable[Clip], samples_per_shard: int) -> Iterator[ShardJob]:
    """Clips at hand cut into shard jobs of `samples_per_shard`, each read from `clips` as the
    job is reached (so an interrupted source leaves the shards before it written)."""
    iterator = iter(clips)
    for index in itertools.count():
        chunk = list(itertools.islice(iterator, samples_per_shard))
        if not chunk:
            return
        yield ShardJob(index, index * samples_per_shard, len(chunk), chunk)


# ---------------------------------------------------------------------------------------------
# The folder: reused when finished, resumed when interrupted, restarted otherwise


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
    """The manifest at `path`, or None when it is missing, unreadable, of another converter
    version or edited since written."""
    try:
        doc = json.loads(path.read_bytes())
        manifest = Manifest.from_json(doc, str(path))
    except (OSError, ValueError):
        return None
    return None if checksum_problem(doc, str(path)) else manifest


def _meta_matches(out_dir: Path, meta: ShardMeta) -> bool:
    try:
        return json.loads((out_dir / META).read_text()) == json.loads(json.dumps(meta.to_json()))
    except (OSError, ValueError):
        return False


def _intact(out_dir: Path, info: ShardInfo, *, rehash: bool) -> bool:
    path = out_dir / info.name
    if not path.is_file() or path.stat().st_size != info.bytes:
        return False
    return not rehash or sha256_file(path) == info.sha256


def _finished(out_dir: Path, wanted: Manifest, meta: ShardMeta) -> Manifest | None:
    """The folder's finished manifest when it is the conversion `wanted` describes, whole."""
    finished = _load_or_none(out_dir / MANIFEST)
    if (finished is None or finished.identity() != wanted.identity() or not _meta_matches(out_dir, meta)
            or not all(_intact(out_dir, s, rehash=False) for s in finished.shards)):
        return None
    (out_dir / PARTIAL_MANIFEST).unlink(missing_ok=True)
    return finished


def _resume_or_restart(out_dir: Path, wanted: Manifest, meta: ShardMeta) -> tuple[str, dict[str, ShardInfo]]:
    """Make the folder ready to write into: (the conversion's start time, the shards by name
    that an interrupted run of the same conversion finished and that still hash right). Any
    other content is removed, and meta.json written anew."""
    partial = _load_or_none(out_dir / PARTIAL_MANIFEST)
    if (out_dir / MANIFEST).exists() or partial is None or partial.identity() != wanted.identity() \
            or not _meta_matches(out_dir, meta):
        _remove_outputs(out_dir)
        _write_json_atomic(out_dir / META, meta.to_json())
        return wanted.created, {}
    kept = {s.name: s for s in partial.shards if _intact(out_dir, s, rehash=True)}
    for path in out_dir.iterdir():
        if path.name.endswith(".tmp") or (SHARD_PATTERN.match(path.name) and path.name not in kept):
            path.unlink()
    return partial.created, kept


class _Conversion:
    """The shards finished so far, recorded in manifest.partial.json after each one (in any
    order: parallel workers finish shards out of order), and the manifest at the end."""

    def __init__(self, out_dir: Path, wanted: Manifest, kept: dict[str, ShardInfo]) -> None:
        self.out_dir = out_dir
        self.wanted = wanted
        self.done = dict(kept)  # by shard name
        self._save(PARTIAL_MANIFEST)

    def record(self, info: ShardInfo) -> None:
        self.done[info.name] = info
        self._save(PARTIAL_MANIFEST)

    def finish(self, names: list[str]) -> Manifest:
        """The manifest of the shards `names`, written; the partial manifest removed."""
        stale = sorted(set(self.done) - set(names))
        if stale:
            raise ValueError(f"{self.out_dir}: resuming found {stale[0]} but the source now gives "
                             f"{len(names)} shards; the source changed: delete {self.out_dir} and convert again")
        if not names:
            raise ValueError(f"{self.out_dir}: the source yielded no clips for {self.wanted.source}")
        manifest = self._save(MANIFEST)
        (self.out_dir / PARTIAL_MANIFEST).unlink(missing_ok=True)
        return manifest

    def _save(self, name: str) -> Manifest:
        shards = tuple(self.done[i] for i in sorted(self.done))
        manifest = replace(self.wanted, shards=shards, total_samples=sum(s.samples for s in shards))
        _write_json_atomic(self.out_dir / name, manifest.to_json())
        return manifest


# ---------------------------------------------------------------------------------------------
# Writing


def _pool(workers: int) -> multiprocessing.pool.Pool:
    """Worker processes forked where the platform can (they share the parent's parsed source
    index instead of parsing it again), spawned elsewhere."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method).Pool(workers)


def _write_in_parallel(jobs: list[ShardJob], out_dir: Path, workers: int) -> Iterator[ShardInfo]:
    """The shard of every job, as worker processes finish them. On an error the other workers
    are stopped and their unfinished temporary files removed."""
    with _pool(workers) as pool:
        try:
            yield from pool.imap_unordered(functools.partial(write_job, out_dir), jobs)
        except BaseException:
            pool.terminate()
            pool.join()
            for tmp in out_dir.glob("*.tmp"):
                tmp.unlink(missing_ok=True)
            raise


def write_shard_jobs(
    jobs: Iterable[ShardJob],
    out_dir: Path,
    *,
    meta: ShardMeta,
    source: dict,
    samples_per_shard: int,
    heldout: HeldOutSplit | None = None,
    workers: int = 1,
    total: int | None = None,
    progress: bool = False,
) -> Manifest:
    """Write the shards `jobs` describe into `out_dir`, `workers` processes at a time.

    meta: the folder's meta.json.
    source: provenance recorded in the manifest ({"format", "src", "split", "clip_length"...});
        with the parameters and the held-out part it decides whether an existing folder can
        be reused.
    samples_per_shard: recorded in the manifest (every job but the last holds that many).
    total: the number of clips expected, for the progress bar only.

    Re-running is safe. Finished with the same source and parameters: nothing is done and the
    existing manifest is returned. Interrupted with the same source and parameters: shards
    recorded in `manifest.partial.json` whose sha256 still matches are kept and their jobs
    skipped. Anything else: the folder's shards and manifests are removed and written anew,
    never mixed with old ones. The shards are the same bytes for any number of workers.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = json.loads(json.dumps(source))  # compared like for like with what is read back from disk
    parameters = {"samples_per_shard": samples_per_shard}
    if "clip_length" in source:
        parameters["clip_length"] = source["clip_length"]
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    wanted = Manifest(meta.dataset, (), 0, CONVERTER_VERSION, source, parameters, now, "", heldout)
    finished = _finished(out_dir, wanted, meta)
    if finished is not None:
        return finished
    created, kept = _resume_or_restart(out_dir, wanted, meta)
    conversion = _Conversion(out_dir, replace(wanted, created=created, meta_sha256=sha256_file(out_dir / META)), kept)

    names: list[str] = []  # every shard the jobs describe, as they are reached

    def missing() -> Iterator[ShardJob]:
        for job in jobs:
            names.append(shard_name(job.index))
            held = kept.get(names[-1])
            if held is None or held.samples != job.samples:
                yield job

    with tqdm(total=total, initial=sum(s.samples for s in kept.values()), disable=not progress, unit="clip",
              desc=out_dir.name) as bar:
        todo = missing() if workers <= 1 else list(missing())
        written = (_write_in_parallel(todo, out_dir, min(workers, len(todo))) if workers > 1 and len(todo) > 1
                   else (write_job(out_dir, job) for job in todo))
        for info in written:
            conversion.record(info)
            bar.update(info.samples)
    return conversion.finish(names)


def write_shards(
    clips: Iterable[Clip],
    out_dir: Path,
    *,
    meta: ShardMeta,
    source: dict,
    samples_per_shard: int = 64,
    total: int | None = None,
    progress: bool = False,
) -> Manifest:
    """Write clips at hand as shards of `samples_per_shard` samples into `out_dir`, in this
    process (`write_shard_jobs` says what is reused, resumed or restarted). An interrupted
    resume reads the clips of the shards it keeps again, and skips them."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    return write_shard_jobs(_jobs_of_clips(clips, samples_per_shard), out_dir, meta=meta, source=source,
                            samples_per_shard=samples_per_shard, total=total, progress=progress)
