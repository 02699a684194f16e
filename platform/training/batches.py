"""Training batches from several data sets: every sample becomes a clip of the same T frames.

Images become T-frame pseudo-videos (the frame repeated), videos give T consecutive frames
from a random start; one random scale/crop/flip per clip keeps frames aligned. Data sets that
supervise interactive segmentation or VOS get prompts sampled from their first-frame masks;
VOS data sets supervise prompts only. Labels go through each data set's map into the merged
co-training vocabulary, so one model vocabulary serves every data set of the batch.

Common random numbers: every random choice about a sample (frames, augmentation, prompts, and
the loss's point sampling through `MatchTargets.seed`) comes from the sample's own key, a seed
derived from (run seed, data set, rank, index of the sample in its data set's stream). The k-th
COCO sample of a run is therefore treated identically whatever else the run mixes in, and a
study's comparison of two mixes sees the mix, not a different draw of augmentations.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from omgseg.core.seeds import derive_seed
from omgseg.core.structures import PromptKind, Task
from omgseg.datasets.mixer import Mixer
from omgseg.datasets.prompts import sample_prompts
from omgseg.datasets.stream import ClipSample, ShardStream, StreamPosition, decode_sample
from omgseg.datasets.transforms import ClipTransform, build_targets
from omgseg.model.structures import MatchTargets, PromptBatch
from omgseg.platform.config import BatchConfig
from omgseg.platform.tasks import QueryGroup, tasks_of
from omgseg.platform.training.targets import match_targets, prompt_batch

PROMPTED_TASKS = tasks_of(QueryGroup.PROMPT)  # trained through prompt queries (the task table says)
OBJECT_TASKS = tasks_of(QueryGroup.OBJECT)


@dataclass
class TrainExample:
    """One clip ready for the model: images (T, 3, H, W) uint8 and its supervision."""

    dataset: str
    images: Tensor
    targets: MatchTargets
    prompts: PromptBatch


@dataclass
class TrainBatch:
    images: Tensor  # (B, T, 3, H, W) uint8
    targets: list[MatchTargets]
    prompts: list[PromptBatch]
    datasets: tuple[str, ...]

    def to(self, device: torch.device) -> TrainBatch:
        """On `device`; copies from pinned memory (`pin_memory`) overlap with the host's work."""
        return TrainBatch(
            images=self.images.to(device, non_blocking=True),
            targets=[_targets_to(t, device) for t in self.targets],
            prompts=[_prompts_to(p, device) for p in self.prompts],
            datasets=self.datasets,
        )

    def pin_memory(self) -> TrainBatch:
        """In page-locked memory (what the DataLoader calls with pin_memory=True)."""
        return TrainBatch(
            images=self.images.pin_memory(),
            targets=[_targets_apply(t, _pinned) for t in self.targets],
            prompts=[_prompts_apply(p, _pinned) for p in self.prompts],
            datasets=self.datasets,
        )


def _pinned(x: Tensor) -> Tensor:
    """A page-locked copy, made dense first: an image clip's masks are one frame viewed T
    times (`_clip_frames`), and pinning keeps a tensor's strides, which for such a view do
    not hold T frames."""
    return x.contiguous().pin_memory()


def _targets_to(t: MatchTargets, device: torch.device) -> MatchTargets:
    return _targets_apply(t, lambda x: x.to(device, non_blocking=True))


def _prompts_to(p: PromptBatch, device: torch.device) -> PromptBatch:
    return _prompts_apply(p, lambda x: x.to(device, non_blocking=True))


def _targets_apply(t: MatchTargets, move: Callable[[Tensor], Tensor]) -> MatchTargets:
    return dataclasses.replace(
        t, labels=move(t.labels), masks=move(t.masks), track_ids=move(t.track_ids),
        prompt_masks=None if t.prompt_masks is None else move(t.prompt_masks),
    )


def _prompts_apply(p: PromptBatch, move: Callable[[Tensor], Tensor]) -> PromptBatch:
    return dataclasses.replace(
        p, boxes=move(p.boxes),
        clicks=None if p.clicks is None else move(p.clicks),
        click_labels=None if p.click_labels is None else move(p.click_labels),
    )


class ClipMaker:
    """ClipSample of any data set -> TrainExample (see the module docstring).

    augment=False (validation): the first T frames, resized to fit the crop (no jitter, no
    flip) and padded; prompts are still sampled, from the sample's key.

    The work follows the crop, not the frame: a repeated image frame is transformed and
    compared with the segment ids once (the clip's frames are views of it), only the crop's
    part of the resized id maps is made,
    and prompts look for pixels in their mask's bounding box. The result equals the plain
    whole-frame computation (tests/clip_reference.py) except the image pixels, which are within
    one grey level of it (integer resizing instead of float; tests/platform/training/test_batches.py).
    """

    def __init__(self, config: BatchConfig, label_maps: dict[str, dict[int, int]],
                 supervised: dict[str, set[Task]] | None = None, *, augment: bool = True) -> None:
        """label_maps: per data set, {category id: merged class index}; supervised: per data
        set, the tasks to train (default: every task its samples carry)."""
        self.config = config
        self.label_maps = label_maps
        self.supervised = supervised or {}
        self.augment = augment
        self.transform = ClipTransform(crop_size=config.crop, scale_range=config.scale_range if augment else (1.0, 1.0),
                                       hflip_prob=config.hflip_prob if augment else 0.0)

    def __call__(self, name: str, sample: ClipSample, key: int) -> TrainExample:
        """The example of `sample` (from data set `name`), every random choice drawn from `key`."""
        if name not in self.label_maps:
            raise KeyError(f"no vocabulary map for data set {name!r} (known: {sorted(self.label_maps)})")
        generator = torch.Generator().manual_seed(derive_seed(key, "augment"))
        frames = self._frames(sample.num_frames, generator)
        plan = self.transform.plan(sample.height, sample.width, generator)
        # Everything is made for the distinct frames (an image's once), repeated at the end.
        distinct, position = torch.unique(frames, return_inverse=True)
        window = slice(int(distinct[0]), int(distinct[-1]) + 1)  # consecutive frames: a view, not a copy
        images = self.transform.images(sample.images[window], plan)
        targets = build_targets(self.transform.id_maps(sample.id_maps[window], plan), sample.segments)
        tasks = set(sample.tasks)
        if name in self.supervised:
            tasks &= self.supervised[name]
        prompts = []
        if tasks & PROMPTED_TASKS and self.config.prompts_per_clip > 0:
            kind = PromptKind.POINT if torch.rand((), generator=generator) < self.config.point_prob else PromptKind.BOX
            positives = 1 + int(torch.randint(self.config.positive_points, (), generator=generator))
            objects = [n for n, crowd in enumerate(targets.iscrowd.tolist()) if not crowd]  # a crowd is no object
            candidates = sample_prompts(targets.masks[:, 0], kind, generator, rows=objects,  # the clip's frame 0
                                        num_positive=positives, num_negative=self.config.negative_points)
            if len(candidates) > self.config.prompts_per_clip:
                keep = torch.randperm(len(candidates), generator=generator)[: self.config.prompts_per_clip]
                candidates = [candidates[i] for i in sorted(keep.tolist())]
            prompts = candidates
        objects = bool(tasks & OBJECT_TASKS)
        supervision = match_targets(targets, self.label_maps[name], prompts, objects=objects)
        prompt_masks = supervision.prompt_masks
        return TrainExample(
            dataset=name,
            images=_clip_frames(images, position, dim=0),
            targets=dataclasses.replace(
                supervision, masks=_clip_frames(supervision.masks, position, dim=1),
                prompt_masks=None if prompt_masks is None else _clip_frames(prompt_masks, position, dim=1),
                seed=derive_seed(key, "loss")),
            prompts=prompt_batch(prompts, self.config.crop),
        )

    def _frames(self, available: int, generator: torch.Generator) -> Tensor:
        """The clip's T frames, as indices into the sample's: a random window of a longer clip,
        the frames repeated for a shorter one."""
        want = self.config.frames
        if available > want:
            start = int(torch.randint(available - want + 1, (), generator=generator)) if self.augment else 0
            return torch.arange(start, start + want)
        return torch.arange(want).clamp(max=available - 1)


def _clip_frames(made: Tensor, position: Tensor, dim: int) -> Tensor:
    """The clip's T frames along `dim` from the frames `made` (its distinct ones): `position`
    (T,) gives each clip frame's index among them.

    An image's clip repeats one frame: a view of it T times (stride 0), not T copies, which
    would be most of the cost of a clip at 736x1280. Readers copy what they need (`collate`
    stacks the images, the loss indexes the masks); `TrainBatch.pin_memory` makes it dense.
    """
    if made.shape[dim] == len(position):
        return made  # every frame distinct, in order
    if made.shape[dim] == 1:
        return made.expand(*(len(position) if d == dim else -1 for d in range(made.ndim)))
    return made.index_select(dim, position)


def collate(examples: list[TrainExample]) -> TrainBatch:
    return TrainBatch(
        images=torch.stack([e.images for e in examples]),
        targets=[e.targets for e in examples],
        prompts=[e.prompts for e in examples],
        datasets=tuple(e.dataset for e in examples),
    )


@dataclass
class BatchPlan:
    """One batch as the training process hands it to a loader worker: per clip, its data set,
    its raw (undecoded) sample and its key."""

    samples: list[tuple[str, dict, int]]


class MakeBatches(torch.utils.data.Dataset):
    """What a loader worker does with a `BatchPlan`: decode, make the examples, collate.

    An error is returned, not raised: the DataLoader would re-raise it in the training process
    with the worker's traceback inside the message, and the run's one-line error would be lost.
    """

    def __init__(self, maker: ClipMaker) -> None:
        self.maker = maker

    def __getitem__(self, plan: BatchPlan) -> TrainBatch | Exception:
        try:
            return collate([self.maker(name, decode_sample(raw), key) for name, raw, key in plan.samples])
        except Exception as err:  # noqa: BLE001 - raised again by TrainBatches, in the training process
            return err


def _as_is(batch: TrainBatch | Exception) -> TrainBatch | Exception:
    return batch


@dataclass(frozen=True)
class Drawn:
    """Where the batches are after one: samples drawn from each data set, each stream's
    position, and the mix schedule's `Mixer.block_counts`."""

    counts: dict[str, int]
    positions: dict[str, StreamPosition]
    schedule: dict[str, int]


class TrainBatches:
    """The training batches of one rank, without end: each data set's repeating stream,
    interleaved at `ratios` with exact exposure (omgseg.datasets.mixer), each sample made into
    an example from its own key (see the module docstring).

    This process reads the shards and decides every batch (which samples, which keys); `workers`
    DataLoader processes decode and make the clips, `prefetch` batches ahead each, and the
    batches come back in order. What a batch holds therefore does not depend on the number of
    workers (0: made here, when asked for).

    streams: {data set: its training stream (repeat=True)}.
    counts, positions, schedule: samples this rank drew from each data set before, where each
        stream was then, and the mix schedule's block counts (a resumed run); the schedule
        continues after the counts' total and must agree with them.
    `counts`, `positions` and `schedule` describe the batches handed out so far (not those being
    made ahead): what a checkpoint keeps.
    """

    def __init__(self, streams: dict[str, ShardStream], ratios: dict[str, float], maker: ClipMaker,
                 batch_size: int, seed: int, rank: int = 0, world_size: int = 1, *,
                 counts: dict[str, int] | None = None, positions: dict[str, StreamPosition] | None = None,
                 schedule: dict[str, int] | None = None, workers: int = 0, prefetch: int = 2, pin_memory: bool = False) -> None:
        self.maker = maker
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.counts = {name: 0 for name in streams} | dict(counts or {})
        self.positions = dict(positions or {})
        unplaced = [n for n, c in self.counts.items() if c and n not in self.positions]
        if unplaced:
            raise ValueError(f"resumed sample counts {self.counts} come without the positions of the streams of "
                             f"{unplaced}: the checkpoint was written before streams recorded them; start the run afresh")
        self.raw = {name: stream.raw_samples(rank, world_size, start=self.positions.get(name))
                    for name, stream in streams.items()}
        drawn = sum(self.counts.values())
        self.schedule = dict(schedule or {})
        self.mixer = Mixer(ratios, self.raw, seed=derive_seed(seed, "interleave", rank), start=drawn,
                           block_counts=self.schedule or None)
        expected = self.mixer.counts_after(drawn)
        if drawn and expected != {n: self.counts[n] for n in expected}:
            raise ValueError(f"resumed sample counts {self.counts} do not follow the mix schedule ({expected} "
                             f"after {drawn} draws): the checkpoint belongs to another mix")
        self._drawn: deque[Drawn] = deque()  # of the batches planned and not yet handed out, in order
        self.loader = torch.utils.data.DataLoader(
            MakeBatches(maker), batch_size=None, sampler=self._plans(), num_workers=workers, collate_fn=_as_is,
            pin_memory=pin_memory, prefetch_factor=prefetch if workers else None)
        self._batches: Iterator[TrainBatch | Exception] | None = None
        self._closed = False

    def key(self, name: str, index: int) -> int:
        """The key of the index-th sample of data set `name` on this rank."""
        return derive_seed(self.seed, "sample", name, self.rank, index)

    def _plans(self) -> Iterator[BatchPlan]:
        """Every batch's samples and keys, in order (read here, in the training process)."""
        samples = iter(self.mixer)
        counts = dict(self.counts)
        while True:
            plan = []
            for _ in range(self.batch_size):
                name, raw = next(samples)
                plan.append((name, raw, self.key(name, counts[name])))
                counts[name] += 1
            self._drawn.append(Drawn(dict(counts), {n: s.position for n, s in self.raw.items()},
                                     dict(self.mixer.block_counts)))
            yield BatchPlan(plan)

    def __iter__(self) -> Iterator[TrainBatch]:
        return self

    def __next__(self) -> TrainBatch:
        if self._closed:
            raise RuntimeError("the training batches were closed")
        if self._batches is None:
            self._batches = iter(self.loader)
        batch = next(self._batches)
        if isinstance(batch, Exception):
            raise batch
        drawn = self._drawn.popleft()
        self.counts.update(drawn.counts)
        self.positions.update(drawn.positions)
        self.schedule.update(drawn.schedule)
        return batch

    def close(self) -> None:
        """Stop the loader workers and the batches (the workers also stop when this object is
        collected)."""
        self._batches = None
        self._closed = True
