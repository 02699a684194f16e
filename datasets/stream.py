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
from collections.abc import Iterable, Iterator
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
from omgseg.datasets.shard_reader import decode_png_rgb, read_shard_samples

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
    repeat=False (evaluation): shards are split between ranks (`wds.split_by_node`, which
        reads RANK/WORLD_SIZE as Ray Train sets them, else torch.distributed) and workers
        (`wds.split_by_worker`); each shard is read exactly once over all of them. Ranks may
        then get different counts; evaluation must not run a collective per sample.
    shuffle_buffer: samples held for shuffling (0: file order); with repeat=False the shard
        order is shuffled as well, identically on every rank so the split stays a partition.
    seed: with the epoch (`set_epoch`), rank and worker it fixes every random choice.
    skip: samples of this rank and worker to pass over (read but not decoded) before the first
        one yielded: a resumed run's stream continues exactly where the interrupted one was.
    split=False (repeat=False only): every shard in this process, whatever its rank: for an
        evaluation that one rank does alone.
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
        skip: int = 0,
        split: bool = True,
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
        if skip < 0:
            raise ValueError(f"skip must be >= 0, got {skip}")
        if not split and repeat:
            raise ValueError("split=False is for evaluation streams (repeat=False): training streams are always split")
        self.skip = skip
        self.split = split
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.repeat = repeat
        self.epoch_samples = epoch_samples
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

    def _epoch_parts(self, part: int, parts: int) -> Iterator[dict]:
        """Raw samples of this part, epoch after epoch (repeat=True)."""
        for e in itertools.count():
            order = list(self.shards)
            # No rank or worker in this seed: every part shuffles alike, so the parts stay disjoint.
            random.Random(derive_seed(self.seed, "shard-order", self.epoch, e)).shuffle(order)
            if len(order) >= parts:
                mine = order[part::parts]
                if e < self.MAX_LOGGED_EPOCHS:
                    self.reads[e] = [s.name for s in mine]
                yield from self._raw_samples(mine)
            else:  # fewer shards than parts: split the epoch's samples instead
                if e < self.MAX_LOGGED_EPOCHS:
                    self.reads[e] = [s.name for s in order]
                for i, raw in enumerate(self._raw_samples(order)):
                    if i % parts == part:
                        yield raw

    def _shards(self) -> Iterator[ShardInfo]:
        shards = list(self.shards)
        if self.shuffle_buffer > 0:
            # Same order on every rank and worker (no rank/worker in this seed): the split
            # below must stay a partition of the shards.
            random.Random(derive_seed(self.seed, "shard-order", self.epoch)).shuffle(shards)
        yield from wds.split_by_worker(wds.split_by_node(shards)) if self.split else shards

    def _raw_samples(self, shards: Iterable[ShardInfo]) -> Iterator[dict]:
        for info in shards:
            yield from read_shard_samples(self.location.url(info.name), expected=info)

    def __iter__(self) -> Iterator[ClipSample]:
        rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
        if self.repeat:
            samples: Iterable[dict] = self._epoch_parts(rank * num_workers + worker, world_size * num_workers)
        else:
            samples = self._raw_samples(self._shards())
        if self.shuffle_buffer > 0:
            rng = random.Random(derive_seed(self.seed, "shuffle", self.epoch, rank, worker))
            initial = max(1, min(self.shuffle_buffer, 100))
            samples = wds.shuffle(self.shuffle_buffer, initial=initial, rng=rng)(samples)
        if self.epoch_samples is not None:
            # Like wds `with_epoch`, which counts per worker, but sharing the rank's total out
            # between its workers so that the rank's count does not depend on num_workers.
            share = self.epoch_samples // num_workers + (worker < self.epoch_samples % num_workers)
            samples = _take(samples, share)
        for raw in itertools.islice(samples, self.skip, None):
            yield decode_sample(raw)


def _take(samples: Iterable[dict], n: int) -> Iterator[dict]:
    if n <= 0:
        return
    for i, sample in enumerate(samples, start=1):
        yield sample
        if i >= n:
            return
