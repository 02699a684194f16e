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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from omgseg.core.seeds import derive_seed
from omgseg.core.structures import PromptKind, Task
from omgseg.datasets.mixer import Mixer
from omgseg.datasets.prompts import sample_prompts
from omgseg.datasets.stream import ClipSample
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
        return TrainBatch(
            images=self.images.to(device, non_blocking=True),
            targets=[_targets_to(t, device) for t in self.targets],
            prompts=[_prompts_to(p, device) for p in self.prompts],
            datasets=self.datasets,
        )


def _targets_to(t: MatchTargets, device: torch.device) -> MatchTargets:
    return dataclasses.replace(
        t, labels=t.labels.to(device), masks=t.masks.to(device), track_ids=t.track_ids.to(device),
        prompt_masks=None if t.prompt_masks is None else t.prompt_masks.to(device),
    )


def _prompts_to(p: PromptBatch, device: torch.device) -> PromptBatch:
    return dataclasses.replace(
        p, boxes=p.boxes.to(device),
        clicks=None if p.clicks is None else p.clicks.to(device),
        click_labels=None if p.click_labels is None else p.click_labels.to(device),
    )


class ClipMaker:
    """ClipSample of any data set -> TrainExample (see the module docstring).

    augment=False (validation): the first T frames, resized to fit the crop (no jitter, no
    flip) and padded; prompts are still sampled, from the sample's key.
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
        sample = self._frames(sample, generator)
        sample = self.transform(sample, generator)
        targets = build_targets(sample)
        tasks = set(sample.tasks)
        if name in self.supervised:
            tasks &= self.supervised[name]
        prompts = []
        if tasks & PROMPTED_TASKS and self.config.prompts_per_clip > 0:
            first = targets.masks[:, 0] & ~targets.iscrowd[:, None, None]  # prompts from frame 0
            kind = PromptKind.POINT if torch.rand((), generator=generator) < self.config.point_prob else PromptKind.BOX
            positives = 1 + int(torch.randint(self.config.positive_points, (), generator=generator))
            candidates = sample_prompts(first, kind, generator, num_positive=positives,
                                        num_negative=self.config.negative_points)
            if len(candidates) > self.config.prompts_per_clip:
                keep = torch.randperm(len(candidates), generator=generator)[: self.config.prompts_per_clip]
                candidates = [candidates[i] for i in sorted(keep.tolist())]
            prompts = candidates
        objects = bool(tasks & OBJECT_TASKS)
        supervision = match_targets(targets, self.label_maps[name], prompts, objects=objects)
        return TrainExample(
            dataset=name,
            images=sample.images,
            targets=dataclasses.replace(supervision, seed=derive_seed(key, "loss")),
            prompts=prompt_batch(prompts, self.config.crop),
        )

    def _frames(self, sample: ClipSample, generator: torch.Generator) -> ClipSample:
        """Exactly T frames: a random window of a longer clip, the frames repeated for a shorter one."""
        t, want = sample.num_frames, self.config.frames
        if t == want:
            return sample
        if t > want:
            start = int(torch.randint(t - want + 1, (), generator=generator)) if self.augment else 0
            index = torch.arange(start, start + want)
        else:
            index = torch.arange(want).clamp(max=t - 1)
        return dataclasses.replace(
            sample,
            images=sample.images[index],
            id_maps=sample.id_maps[index],
            frame_names=tuple(sample.frame_names[i] for i in index.tolist()),
            segments=tuple(dataclasses.replace(s, area=tuple(s.area[i] for i in index.tolist())) for s in sample.segments),
        )


def collate(examples: list[TrainExample]) -> TrainBatch:
    return TrainBatch(
        images=torch.stack([e.images for e in examples]),
        targets=[e.targets for e in examples],
        prompts=[e.prompts for e in examples],
        datasets=tuple(e.dataset for e in examples),
    )


class TrainBatches:
    """The training batches of one rank, without end: each data set's repeating stream,
    interleaved at `ratios` with exact exposure (omgseg.datasets.mixer), each sample made into
    an example from its own key (see the module docstring).

    streams: {data set: its repeating stream, already advanced past `counts[data set]` samples}.
    counts: samples this rank drew from each data set before (a resumed run); the schedule
        continues after their total and must agree with them.
    `counts` is updated as batches are drawn; `state()` is what a checkpoint keeps.
    """

    def __init__(self, streams: dict[str, Iterable[ClipSample]], ratios: dict[str, float], maker: ClipMaker,
                 batch_size: int, seed: int, rank: int = 0, counts: dict[str, int] | None = None) -> None:
        self.maker = maker
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.counts = {name: 0 for name in streams} | dict(counts or {})
        drawn = sum(self.counts.values())
        self.mixer = Mixer(ratios, streams, seed=derive_seed(seed, "interleave", rank), start=drawn)
        expected = self.mixer.counts_after(drawn)
        if drawn and expected != {n: self.counts[n] for n in expected}:
            raise ValueError(f"resumed sample counts {self.counts} do not follow the mix schedule ({expected} "
                             f"after {drawn} draws): the checkpoint belongs to another mix")
        self._samples = iter(self.mixer)

    def key(self, name: str, index: int) -> int:
        """The key of the index-th sample of data set `name` on this rank."""
        return derive_seed(self.seed, "sample", name, self.rank, index)

    def __iter__(self) -> Iterator[TrainBatch]:
        return self

    def __next__(self) -> TrainBatch:
        examples = []
        for _ in range(self.batch_size):
            name, sample = next(self._samples)
            examples.append(self.maker(name, sample, self.key(name, self.counts[name])))
            self.counts[name] += 1
        return collate(examples)
