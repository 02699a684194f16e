"""Clip making: the fast path (work on the crop and on each mask's box, a repeated frame made
once) against the plain whole-frame reference (tests/clip_reference.py), draw for draw."""

import dataclasses

import pytest
import torch
from clip_reference import make_example

from omgseg.core.structures import Task
from omgseg.datasets.clip import Segment
from omgseg.datasets.stream import ClipSample
from omgseg.platform.config import BatchConfig
from omgseg.platform.training.batches import ClipMaker, TrainExample

CATEGORIES = {1: 0, 2: 1, 3: 2, 4: 3}


def random_clip(seed: int, frames: int, height: int, width: int, tasks: tuple[Task, ...]) -> ClipSample:
    """Rectangles of random ids (some crowd, one filling most of the frame, some touching the
    borders) that move between frames, over a void background; random pixels."""
    g = torch.Generator().manual_seed(seed)
    id_maps = torch.zeros(frames, height, width, dtype=torch.int64)
    segments = []
    for k in range(int(torch.randint(3, 9, (), generator=g))):
        segment_id = int(torch.randint(1, 2**24, (), generator=g))
        big = k == 0
        h = height - 2 if big else int(torch.randint(1, height // 2, (), generator=g))
        w = width - 1 if big else int(torch.randint(1, width // 2, (), generator=g))
        for t in range(frames):
            if t > 0 and k == 1:
                continue  # a segment seen in the first frame only
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            id_maps[t, top : top + h, left : left + w] = segment_id
        segments.append(Segment(id=segment_id, category_id=1 + k % 4, iscrowd=k == 2, track_id=100 + k,
                                area=tuple(int((id_maps[t] == segment_id).sum()) for t in range(frames))))
    segments = [s for s in segments if sum(s.area) > 0]
    return ClipSample(
        dataset="toy", source_id=str(seed), frame_names=tuple(f"{t}.jpg" for t in range(frames)), tasks=tasks,
        images=torch.randint(0, 256, (frames, 3, height, width), dtype=torch.uint8, generator=g),
        id_maps=id_maps, segments=tuple(segments), key=f"{seed:09d}", shard="mem",
    )


def assert_same(fast: TrainExample, slow: TrainExample) -> None:
    """Everything identical, except image pixels within one grey level."""
    assert fast.images.shape == slow.images.shape and fast.images.dtype == slow.images.dtype
    assert int((fast.images.int() - slow.images.int()).abs().max()) <= 1
    for field in dataclasses.fields(fast.targets):
        a, b = getattr(fast.targets, field.name), getattr(slow.targets, field.name)
        same = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
        assert same, f"targets.{field.name} differs"
    for field in dataclasses.fields(fast.prompts):
        a, b = getattr(fast.prompts, field.name), getattr(slow.prompts, field.name)
        same = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
        assert same, f"prompts.{field.name} differs"


CASES = [  # (source frames, clip frames, source size, crop, scale range): images repeated, windows, shrink and grow
    (1, 2, (48, 64), (40, 56), (0.5, 2.0)),
    (1, 1, (30, 80), (64, 48), (0.8, 1.25)),
    (5, 2, (36, 50), (48, 48), (0.3, 3.0)),
    (2, 4, (64, 40), (32, 32), (1.0, 1.0)),
]


@pytest.mark.parametrize("case", CASES)
def test_fast_examples_equal_the_whole_frame_reference(case):
    source_frames, frames, (height, width), crop, scale_range = case
    config = BatchConfig(frames=frames, crop=crop, scale_range=scale_range, prompts_per_clip=3, negative_points=2,
                         positive_points=3)
    tasks = (Task.PANOPTIC, Task.INTERACTIVE)
    supervised = {"both": {Task.PANOPTIC, Task.INTERACTIVE}, "prompts": {Task.INTERACTIVE}, "objects": {Task.PANOPTIC}}
    label_maps = dict.fromkeys(supervised, CATEGORIES)
    for augment in (True, False):
        maker = ClipMaker(config, label_maps, supervised, augment=augment)
        for seed in range(12):
            sample = random_clip(seed, source_frames, height, width, tasks)
            for name in supervised:
                fast = maker(name, sample, key=seed)
                slow = make_example(config, label_maps, supervised, name, sample, key=seed, augment=augment)
                assert_same(fast, slow)


def test_point_and_box_prompts_and_crowds_are_all_exercised():
    """The cases above draw both prompt kinds, crowds and prompt masks (the comparison is not vacuous)."""
    config = BatchConfig(frames=2, crop=(40, 56), prompts_per_clip=3)
    maker = ClipMaker(config, {"toy": CATEGORIES}, {"toy": {Task.PANOPTIC, Task.INTERACTIVE}})
    kinds, prompts, crowds = set(), 0, 0
    for seed in range(12):
        sample = random_clip(seed, 1, 48, 64, (Task.PANOPTIC, Task.INTERACTIVE))
        example = maker("toy", sample, key=seed)
        kinds |= set(example.prompts.kinds)
        prompts += example.prompts.num_prompts
        crowds += sum(s.iscrowd for s in sample.segments)
    assert len(kinds) == 2 and prompts > 12 and crowds > 0
