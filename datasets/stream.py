"""Reading shard folders (local or remote, see omgseg.datasets.location) for training and
evaluation: decoded clips, split by rank and worker.

Training streams (`repeat=True`) run epoch after epoch; in each, the shards are split into
disjoint parts, one per rank and worker, so no two workers read the same data in an epoch.
With `epoch_samples` a rank stops after that many samples, so every rank yields the same
number whatever the shard counts (uneven counts make DDP hang at the next collective).
Evaluation streams (`repeat=False`) read each shard exactly once across all ranks and workers.
"""

from __future__ import annotations

import io
import itertools
import json
import random
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from omgseg.core.seeds import derive_seed
from omgseg.core.structures import Task
from omgseg.datasets.clip import Segment, decode_id_map_rgb
from omgseg.datasets.location import ShardLocation
from omgseg.datasets.manifest import Manifest, ShardInfo, ShardMeta, ShardReadError, frame_field, read_manifest, read_meta
from omgseg.datasets.shard_reader import TransientReadError, decode_png_rgb, read_shard_samples

_HEADER_FIELDS = ("dataset", "source_id", "frames", "frame_names", "height", "width", "tasks", "segments")


@dataclass
class ClipSample:
    """One decoded clip of T frames, as read from a shard.

    images: uint8 (T, 3, H, W), RGB.
    id_maps: int64 (T, H, W); 0 is void, other values are `Segment.id`.
    segments: the segments the id maps refer to (`area` as stored, i.e. before transforms
        unless a transform recomputed it).
    key / shard: the sample key and shard file it came from, for error messages.
    """

    dataset: str
    source_id: str
    frame_names: tuple[str, ...]
    tasks: tuple[Task, ...]
    images: torch.Tensor
    id_maps: torch.Tensor
    segments: tuple[Segment, ...]
    key: str
    shard: str
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"sample {self.key} of {self.shard}"
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"{where}: images must be uint8 (T, 3, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.id_maps.dtype != torch.int64 or self.id_maps.ndim != 3:
            raise ValueError(f"{where}: id_maps must be int64 (T, H, W), got {self.id_maps.dtype} {tuple(self.id_maps.shape)}")
        t, _, h, w = self.images.shape
        if tuple(self.id_maps.shape) != (t, h, w):
            raise ValueError(f"{where}: images {tuple(self.images.shape)} and id_maps {tuple(self.id_maps.shape)} disagree")
        if len(self.frame_names) != t:
            raise ValueError(f"{where}: {len(self.frame_names)} frame names for {t} frames")

    @property
    def num_frames(self) -> int:
        return int(self.images.shape[0])

    @property
    def height(self) -> int:
        return int(self.images.shape[2])

    @property
    def width(self) -> int:
        return int(self.images.shape[3])


def _decode_image(data: bytes) -> np.ndarray:
    """JPEG or PNG bytes -> (H, W, 3) uint8. Grey or palette frames (COCO has some) become RGB."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def _decode(raw: dict) -> ClipSample:
    try:
        header = json.loads(raw["json"])
    except KeyError:
        raise ValueError("no json header") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise ValueError(f"json header is not valid JSON ({exn})") from None
    if not isinstance(header, dict):
        raise ValueError(f"json header must be an object, got {type(header).__name__}")
    for name in _HEADER_FIELDS:
        if name not in header:
            raise ValueError(f"json header has no {name!r} field (fields present: {sorted(header)})")
    frames, height, width = int(header["frames"]), int(header["height"]), int(header["width"])
    images, id_maps = [], []
    for t in range(frames):
        stem = frame_field(t)
        image_bytes = raw.get(f"{stem}.jpg", raw.get(f"{stem}.png"))
        if image_bytes is None:
            raise ValueError(f"no image for frame {t} ({stem}.jpg or {stem}.png)")
        if f"{stem}.seg.png" not in raw:
            raise ValueError(f"no id map for frame {t} ({stem}.seg.png)")
        image = _decode_image(image_bytes)
        ids = decode_id_map_rgb(decode_png_rgb(raw[f"{stem}.seg.png"]))
        for what, shape in (("image", image.shape[:2]), ("id map", ids.shape)):
            if tuple(shape) != (height, width):
                raise ValueError(f"frame {t} {what} is {shape[0]}x{shape[1]}, header says {height}x{width}")
        images.append(torch.from_numpy(image).permute(2, 0, 1))
        id_maps.append(torch.from_numpy(ids.astype(np.int64)))
    where = f"sample {raw['__key__']}"
    segments = tuple(Segment.from_json(s, where) for s in header["segments"])
    return ClipSample(
        dataset=str(header["dataset"]),
        source_id=str(header["source_id"]),
        frame_names=tuple(header["frame_names"]),
        tasks=tuple(Task.parse(t) for t in header["tasks"]),
        images=torch.stack(images) if images else torch.zeros(0, 3, height, width, dtype=torch.uint8),
        id_maps=torch.stack(id_maps) if id_maps else torch.zeros(0, height, width, dtype=torch.int64),
        segments=segments,
        key=str(raw["__key__"]),
        shard=str(raw.get("__url__", "?")),
        extra=dict(header.get("extra", {})),
    )


def decode_sample(raw: dict) -> ClipSample:
    """A raw webdataset sample ({"__key__", "__url__", "json", "fNNN.jpg", "fNNN.seg.png"...})
    -> ClipSample. Any problem raises `ShardReadError` naming the shard and the key."""
    try:
        return _decode(raw)
    except ShardReadError:
        raise
    except Exception as exn:  # noqa: BLE001 - re-raised with the shard and key named
        raise ShardReadError(
            f"shard {raw.get('__url__', '?')}, sample {raw.get('__key__', '?')}: {exn}"
        ) from exn


@dataclass(frozen=True)
class SamplePosition:
    """Where a raw sample is in a training stream: in stream epoch `epoch`, the `shard`-th shard
    of the part's list for that epoch, sample `offset` of that shard's file."""

    epoch: int
    shard: int
    offset: int

    def to_json(self) -> list[int]:
        return [self.epoch, self.shard, self.offset]

    @classmethod
    def from_json(cls, data: list[int]) -> SamplePosition:
        epoch, shard, offset = (int(v) for v in data)
        return cls(epoch, shard, offset)


@dataclass(frozen=True)
class StreamPosition:
    """Where a training stream (`ShardStream(repeat=True)`) is, so that it can be resumed
    there: the next sample its shards give, the samples its shuffle buffer holds (in buffer
    order) and the shuffle generator's state. Resuming reads the shard of `next` from its start
    to `offset` and the few shards the buffered samples are in: a cost that does not grow with
    the samples read before. `part` of `parts` is the rank and worker split it belongs to.
    """

    part: int
    parts: int
    next: SamplePosition
    buffer: tuple[SamplePosition, ...] = ()
    rng: tuple | None = None  # random.Random.getstate()

    def to_json(self) -> dict:
        return {"part": self.part, "parts": self.parts, "next": self.next.to_json(),
                "buffer": [p.to_json() for p in self.buffer],
                "rng": None if self.rng is None else [self.rng[0], list(self.rng[1]), self.rng[2]]}

    @classmethod
    def from_json(cls, data: dict) -> StreamPosition:
        rng = data.get("rng")
        return cls(part=int(data["part"]), parts=int(data["parts"]), next=SamplePosition.from_json(data["next"]),
                   buffer=tuple(SamplePosition.from_json(p) for p in data["buffer"]),
                   rng=None if rng is None else (rng[0], tuple(rng[1]), rng[2]))


class ShardStream(torch.utils.data.IterableDataset):
    """Decoded `ClipSample`s of one shard folder, split across ranks and DataLoader workers.

    shard_dir: a local folder or a URL, optionally ending in a brace pattern of shard names
        (omgseg.datasets.location); its manifest.json and meta.json are read first.
    repeat=True (training): epoch after epoch, without end. In epoch e the shards are shuffled
        with a seed of (seed, set_epoch, e) only, so every rank and worker has the same order,
        and part k of P = ranks x workers takes shards k, k + P, ...: disjoint parts. With
        fewer shards than parts, every part reads all shards and keeps every P-th sample
        instead, still disjoint. `epoch_samples` = n: a rank yields exactly n samples (shared
        out between its DataLoader workers), so all ranks take the same number of steps.
        `reads` records which shards each epoch read (the first MAX_LOGGED_EPOCHS epochs).
        `raw_samples` gives the undecoded samples of one part with their `StreamPosition`,
        from which a stream resumes (`start`).
    repeat=False (evaluation): shards are split between ranks (`wds.split_by_node`, which
        reads RANK/WORLD_SIZE as Ray Train sets them, else torch.distributed) and workers
        (`wds.split_by_worker`); each shard is read exactly once over all of them. Ranks may
        then get different counts; evaluation must not run a collective per sample.
    shuffle_buffer: samples held for shuffling (0: file order); with repeat=False the shard
        order is shuffled as well, identically on every rank so the split stays a partition.
    seed: with the epoch (`set_epoch`), rank and worker it fixes every random choice.
    start (repeat=True only): where a resumed run's stream continues, exactly where the
        interrupted one was (`RawSamples.position`).
    split=False (repeat=False only): every shard in this process, whatever its rank: for an
        evaluation that one rank does alone.
    retries, retry_backoff: a remote shard whose read stops early (a dropped connection, a
        server restarting) is read again from its start, up to `retries` times, after
        retry_backoff x 1, 2, 4, ... seconds, and the stream goes on with the sample after the
        last one it gave; local shards and shards whose sha256 differs are not retried.
    """

    MAX_LOGGED_EPOCHS = 4  # enough to show the split; a long run's full log would be large

    def __init__(
        self,
        shard_dir: Path | str | ShardLocation,
        *,
        shuffle_buffer: int = 0,
        seed: int = 0,
        repeat: bool = False,
        epoch_samples: int | None = None,
        start: StreamPosition | None = None,
        split: bool = True,
        retries: int = 5,
        retry_backoff: float = 1.0,
    ) -> None:
        super().__init__()
        self.location = ShardLocation.parse(shard_dir)
        # The manifest first: a folder without one is not (or not yet) a finished conversion.
        self.manifest: Manifest = read_manifest(self.location)
        self.meta: ShardMeta = read_meta(self.location, self.manifest)  # checked against the manifest
        if not self.manifest.shards:
            raise ValueError(f"{self.location.url('manifest.json')}: lists no shards")
        self.shards = self._selected_shards()
        if not self.location.remote:
            missing = [s.name for s in self.shards if not self.location.exists(s.name)]
            if missing:
                raise FileNotFoundError(f"{self.location}: shards listed in manifest.json are missing: {missing}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if epoch_samples is not None and not repeat:
            raise ValueError(
                "epoch_samples needs repeat=True: without repeating a rank cannot yield more "
                "than its own shards hold, so per-rank counts would differ again"
            )
        if epoch_samples is not None and epoch_samples < 1:
            raise ValueError(f"epoch_samples must be at least 1, got {epoch_samples}")
        if start is not None and (not repeat or epoch_samples is not None):
            raise ValueError("start is for training streams (repeat=True, no epoch_samples)")
        if not split and repeat:
            raise ValueError("split=False is for evaluation streams (repeat=False): training streams are always split")
        if retries < 0 or retry_backoff < 0:
            raise ValueError(f"retries and retry_backoff must be >= 0, got {retries} and {retry_backoff}")
        self.start = start
        self.split = split
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.repeat = repeat
        self.epoch_samples = epoch_samples
        self.retries = retries
        self.retry_backoff = retry_backoff
        self.epoch = 0
        self.reads: dict[int, list[str]] = {}

    def _selected_shards(self) -> list[ShardInfo]:
        """The manifest's shards, or those a brace pattern names (each must be in the manifest)."""
        wanted = self.location.names()
        if wanted is None:
            return list(self.manifest.shards)
        by_name = {s.name: s for s in self.manifest.shards}
        unknown = [n for n in wanted if n not in by_name]
        if unknown:
            raise ValueError(f"{self.location}: the pattern names shards that manifest.json does not list: {unknown[:5]}")
        return [by_name[n] for n in wanted]

    @property
    def dataset(self) -> str:
        return self.meta.dataset

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch's random draws (DataLoader workers get a fresh copy each epoch,
        so an internal counter would repeat epoch 0 forever)."""
        self.epoch = epoch

    def part_shards(self, epoch: int, part: int, parts: int) -> list[ShardInfo]:
        """The shards part `part` of `parts` reads in stream epoch `epoch` (repeat=True), in
        order; with fewer shards than parts, all of them (the part keeps every parts-th sample)."""
        order = list(self.shards)
        # No rank or worker in this seed: every part shuffles alike, so the parts stay disjoint.
        random.Random(derive_seed(self.seed, "shard-order", self.epoch, epoch)).shuffle(order)
        return order[part::parts] if len(order) >= parts else order

    def shard_samples(self, info: ShardInfo, skip: int = 0) -> Iterator[tuple[int, dict]]:
        """(offset, raw sample) of one shard, from sample `skip` on (the ones before are read,
        not decoded); a transient error of a remote read is retried (see the class docstring)."""
        url = self.location.url(info.name)
        offset = skip  # the next sample to give
        attempt = 0
        while True:
            try:
                for index, raw in enumerate(read_shard_samples(url, expected=info)):
                    if index >= offset:
                        yield index, raw
                        offset = index + 1
                return
            except TransientReadError as err:
                if not self.location.remote or attempt >= self.retries:
                    # Not transient after all (a local file, or retries spent): the one line a
                    # damaged shard always had.
                    spent = f" (after {attempt} retries)" if self.location.remote else ""
                    raise ShardReadError(f"{err}{spent}") from None
                attempt += 1
                delay = self.retry_backoff * 2 ** (attempt - 1)
                print(f"[omgseg] reading {url} again from sample {offset} in {delay:g} s (retry {attempt} of "
                      f"{self.retries}) after: {err}", file=sys.stderr, flush=True)
                time.sleep(delay)

    def _shards(self) -> Iterator[ShardInfo]:
        shards = list(self.shards)
        if self.shuffle_buffer > 0:
            # Same order on every rank and worker (no rank/worker in this seed): the split
            # below must stay a partition of the shards.
            random.Random(derive_seed(self.seed, "shard-order", self.epoch)).shuffle(shards)
        yield from wds.split_by_worker(wds.split_by_node(shards)) if self.split else shards

    def raw_samples(self, rank: int = 0, world_size: int = 1, worker: int = 0, num_workers: int = 1,
                    start: StreamPosition | None = None) -> RawSamples:
        """The raw (undecoded) samples of one rank's (and DataLoader worker's) part, without end
        (repeat=True), from `start` (default: the stream's own `start`, else the beginning)."""
        if not self.repeat:
            raise ValueError("raw_samples is for training streams (repeat=True)")
        return RawSamples(self, rank, world_size, worker, num_workers, start if start is not None else self.start)

    def __iter__(self) -> Iterator[ClipSample]:
        rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
        if self.repeat:
            samples: Iterable[dict] = self.raw_samples(rank, world_size, worker, num_workers)
        else:
            raw = (sample for info in self._shards() for _, sample in self.shard_samples(info))
            if self.shuffle_buffer > 0:
                rng = random.Random(derive_seed(self.seed, "shuffle", self.epoch, rank, worker))
                samples = wds.shuffle(self.shuffle_buffer, initial=_initial(self.shuffle_buffer), rng=rng)(raw)
            else:
                samples = raw
        if self.epoch_samples is not None:
            # Like wds `with_epoch`, which counts per worker, but sharing the rank's total out
            # between its workers so that the rank's count does not depend on num_workers.
            share = self.epoch_samples // num_workers + (worker < self.epoch_samples % num_workers)
            samples = itertools.islice(samples, share)
        for raw in samples:
            yield decode_sample(raw)


def _initial(shuffle_buffer: int) -> int:
    """Samples the shuffle buffer holds before it gives the first one."""
    return max(1, min(shuffle_buffer, 100))


class RawSamples(Iterator[dict]):
    """One part's raw samples of a training stream, shuffled through its buffer, with the
    `position` to resume from after the last one given.

    The shuffle is webdataset's `shuffle` (the same buffer moves and the same draws: a test
    compares them), written out here because a resumable position needs the buffer's contents,
    which webdataset keeps private.
    """

    def __init__(self, stream: ShardStream, rank: int, world_size: int, worker: int, num_workers: int,
                 start: StreamPosition | None) -> None:
        part, parts = rank * num_workers + worker, world_size * num_workers
        if start is not None and (start.part, start.parts) != (part, parts):
            raise ValueError(f"{stream.location}: the saved position is part {start.part} of {start.parts}, this "
                             f"stream reads part {part} of {parts} (resume with the same number of ranks)")
        self.stream = stream
        self.part, self.parts = part, parts
        self.size = stream.shuffle_buffer
        self.initial = _initial(self.size)
        self.rng = random.Random(derive_seed(stream.seed, "shuffle", stream.epoch, rank, worker))
        self.buffer: list[tuple[SamplePosition, dict]] = []
        self._epoch_shards: tuple[int, list[ShardInfo]] = (-1, [])
        self._next = SamplePosition(0, 0, 0)
        if start is not None:
            self._next = start.next
            if start.rng is not None:
                self.rng.setstate(start.rng)
            self.buffer = list(zip(start.buffer, self._fetch(start.buffer)))
        self._upstream = self._positioned(self._next)

    @property
    def position(self) -> StreamPosition:
        return StreamPosition(part=self.part, parts=self.parts, next=self._next,
                              buffer=tuple(p for p, _ in self.buffer), rng=self.rng.getstate() if self.size else None)

    def _shards(self, epoch: int) -> list[ShardInfo]:
        """This part's shards in stream epoch `epoch` (the last epoch's list kept)."""
        if self._epoch_shards[0] != epoch:
            self._epoch_shards = (epoch, self.stream.part_shards(epoch, self.part, self.parts))
        return self._epoch_shards[1]

    def _positioned(self, start: SamplePosition) -> Iterator[tuple[SamplePosition, dict]]:
        """(position, raw sample) of this part from `start` on, epoch after epoch."""
        stream = self.stream
        for epoch in itertools.count(start.epoch):
            mine = self._shards(epoch)
            if epoch < stream.MAX_LOGGED_EPOCHS:
                stream.reads[epoch] = [s.name for s in mine]
            split_samples = len(stream.shards) < self.parts  # every part reads every shard
            first = start.shard if epoch == start.epoch else 0
            index = sum(s.samples for s in mine[:first])  # of the sample in the epoch, to split samples
            for shard in range(first, len(mine)):
                skip = start.offset if (epoch, shard) == (start.epoch, start.shard) else 0
                for offset, raw in stream.shard_samples(mine[shard], skip):
                    if not split_samples or (index + offset) % self.parts == self.part:
                        yield SamplePosition(epoch, shard, offset), raw
                index += mine[shard].samples

    def _after(self, position: SamplePosition) -> SamplePosition:
        """The position of the sample after `position` in this part's shards."""
        mine = self._shards(position.epoch)
        if position.offset + 1 < mine[position.shard].samples:
            return SamplePosition(position.epoch, position.shard, position.offset + 1)
        if position.shard + 1 < len(mine):
            return SamplePosition(position.epoch, position.shard + 1, 0)
        return SamplePosition(position.epoch + 1, 0, 0)

    def _fetch(self, positions: Sequence[SamplePosition]) -> list[dict]:
        """The raw samples at `positions` (a resumed shuffle buffer), each of their shards read once."""
        found: dict[SamplePosition, dict] = {}
        for epoch, shard in sorted({(p.epoch, p.shard) for p in positions}):
            wanted = {p.offset for p in positions if (p.epoch, p.shard) == (epoch, shard)}
            info = self._shards(epoch)[shard]
            for offset, raw in self.stream.shard_samples(info):
                if offset in wanted:
                    found[SamplePosition(epoch, shard, offset)] = raw
                    if offset == max(wanted):
                        break
        return [found[p] for p in positions]

    def _pull(self) -> None:
        position, raw = next(self._upstream)
        self.buffer.append((position, raw))
        self._next = self._after(position)

    def __next__(self) -> dict:
        if self.size == 0:
            position, raw = next(self._upstream)
            self._next = self._after(position)
            return raw
        # webdataset's _shuffle, one output per call: take one sample (two while the buffer is
        # not full), and once it holds `initial`, give one picked at random.
        while True:
            self._pull()
            if len(self.buffer) < self.size:
                self._pull()
            if len(self.buffer) >= self.initial:
                k = self.rng.randint(0, len(self.buffer) - 1)
                chosen = self.buffer[k]
                self.buffer[k] = self.buffer[-1]
                self.buffer.pop()
                return chosen[1]
