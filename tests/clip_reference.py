"""The previous, straightforward way of making a training example, kept as the slow,
obviously-right reference the fast path (omgseg.platform.training.batches.ClipMaker) is checked
against, and measured against in tests/benchmarks/bench_data.py.

It works on whole frames: the clip's T frames resized in float and then cropped, per-segment
masks of every frame compared in full, areas by a sorted search, and each prompt's negative
band a (2 band + 1)^2 max-pool over the whole frame. The random draws are the fast path's, in
the same order.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from omgseg.core.seeds import derive_seed
from omgseg.core.structures import PromptKind, Task
from omgseg.datasets.prompts import Prompts
from omgseg.datasets.stream import ClipSample
from omgseg.datasets.transforms import Targets
from omgseg.platform.config import BatchConfig
from omgseg.platform.training.batches import OBJECT_TASKS, PROMPTED_TASKS, TrainExample
from omgseg.platform.training.targets import match_targets, prompt_batch


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shrink = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    resized = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def resize_ids_nearest(id_maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    _, h, w = id_maps.shape
    out_h, out_w = size
    rows = ((torch.arange(out_h, dtype=torch.float64) + 0.5) * (h / out_h)).long().clamp_(max=h - 1)
    cols = ((torch.arange(out_w, dtype=torch.float64) + 0.5) * (w / out_w)).long().clamp_(max=w - 1)
    return id_maps.index_select(1, rows).index_select(2, cols)


def segment_areas(id_maps: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    t = id_maps.shape[0]
    n = segment_ids.numel()
    if n == 0:
        return torch.zeros(0, t, dtype=torch.int64)
    sorted_ids, order = torch.sort(segment_ids)
    index = torch.searchsorted(sorted_ids, id_maps).clamp_(max=n - 1)
    bins = torch.where(sorted_ids[index] == id_maps, index + 1, torch.zeros_like(index))
    bins = bins + (torch.arange(t) * (n + 1)).view(t, 1, 1)
    counts = torch.bincount(bins.flatten(), minlength=t * (n + 1)).view(t, n + 1)[:, 1:]
    areas = torch.empty_like(counts)
    areas[:, order] = counts
    return areas.T.contiguous()


def transform(sample: ClipSample, crop_size, scale_range, hflip_prob, generator) -> ClipSample:
    """Resize the whole clip, pad, crop, flip; areas recomputed."""
    crop_h, crop_w = crop_size
    u = torch.rand((), generator=generator).item()
    scale = (scale_range[0] + (scale_range[1] - scale_range[0]) * u) * min(crop_h / sample.height, crop_w / sample.width)
    size = (max(1, round(sample.height * scale)), max(1, round(sample.width * scale)))
    images = resize_images(sample.images, size)
    id_maps = resize_ids_nearest(sample.id_maps, size)
    t = sample.num_frames
    canvas_h, canvas_w = max(size[0], crop_h), max(size[1], crop_w)
    if (canvas_h, canvas_w) != size:
        padded_images = images.new_zeros(t, 3, canvas_h, canvas_w)
        padded_images[:, :, : size[0], : size[1]] = images
        padded_ids = id_maps.new_zeros(t, canvas_h, canvas_w)
        padded_ids[:, : size[0], : size[1]] = id_maps
        images, id_maps = padded_images, padded_ids
    top = int(torch.randint(canvas_h - crop_h + 1, (), generator=generator))
    left = int(torch.randint(canvas_w - crop_w + 1, (), generator=generator))
    images = images[:, :, top : top + crop_h, left : left + crop_w]
    id_maps = id_maps[:, top : top + crop_h, left : left + crop_w]
    if torch.rand((), generator=generator).item() < hflip_prob:
        images = images.flip(-1)
        id_maps = id_maps.flip(-1)
    images, id_maps = images.contiguous(), id_maps.contiguous()
    ids = torch.tensor([s.id for s in sample.segments], dtype=torch.int64)
    areas = segment_areas(id_maps, ids).tolist()
    segments = tuple(dataclasses.replace(s, area=tuple(a)) for s, a in zip(sample.segments, areas))
    return dataclasses.replace(sample, images=images, id_maps=id_maps, segments=segments)


def build_targets(sample: ClipSample) -> Targets:
    segments = list(sample.segments)
    ids = torch.tensor([s.id for s in segments], dtype=torch.int64)
    valid = segment_areas(sample.id_maps, ids) > 0
    keep = valid.any(dim=1)
    kept = [s for s, k in zip(segments, keep.tolist()) if k]
    ids = ids[keep]
    return Targets(
        masks=sample.id_maps.unsqueeze(0) == ids.view(-1, 1, 1, 1),
        labels=torch.tensor([s.category_id for s in kept], dtype=torch.int64),
        track_ids=torch.tensor([s.track_id for s in kept], dtype=torch.int64),
        segment_ids=ids,
        iscrowd=torch.tensor([s.iscrowd for s in kept], dtype=torch.bool),
        valid=valid[keep],
    )


def sample_prompt(mask, kind, generator, *, segment_index=0, num_positive=1, num_negative=0, band=10, box_jitter=0.1):
    if not mask.any():
        return None
    no_points = torch.zeros(0, 2, dtype=torch.float32)
    no_labels = torch.zeros(0, dtype=torch.int64)
    if kind is PromptKind.BOX:
        h, w = mask.shape
        rows = torch.nonzero(mask.any(dim=1)).flatten()
        cols = torch.nonzero(mask.any(dim=0)).flatten()
        box = torch.stack([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]).to(torch.float32)
        side = torch.stack([box[2] - box[0], box[3] - box[1]]).repeat(2)
        noise = torch.randn(4, generator=generator)
        x1, y1, x2, y2 = (box + noise * box_jitter * side).unbind()
        x1 = x1.clamp(0, w - 1)
        y1 = y1.clamp(0, h - 1)
        x2 = torch.maximum(x2, x1 + 1).clamp(max=w)
        y2 = torch.maximum(y2, y1 + 1).clamp(max=h)
        return Prompts(kind, segment_index, no_points, no_labels, torch.stack([x1, y1, x2, y2])[None])

    def pick(candidates, k):
        return candidates[torch.randint(candidates.shape[0], (k,), generator=generator)].flip(1).to(torch.float32) + 0.5

    positive = pick(torch.nonzero(mask), num_positive)
    negative = no_points
    if num_negative > 0:
        dilated = F.max_pool2d(mask[None, None].float(), kernel_size=2 * band + 1, stride=1, padding=band)[0, 0] > 0
        region = dilated & ~mask
        if not region.any():
            region = ~mask
        if region.any():
            negative = pick(torch.nonzero(region), num_negative)
    points = torch.cat([positive, negative])
    labels = torch.cat([torch.ones(positive.shape[0], dtype=torch.int64), torch.zeros(negative.shape[0], dtype=torch.int64)])
    return Prompts(kind, segment_index, points, labels, torch.zeros(0, 4, dtype=torch.float32))


def make_example(config: BatchConfig, label_maps: dict[str, dict[int, int]], supervised: dict[str, set[Task]],
                 name: str, sample: ClipSample, key: int, *, augment: bool = True) -> TrainExample:
    """The example the previous ClipMaker made of `sample`."""
    generator = torch.Generator().manual_seed(derive_seed(key, "augment"))
    t, want = sample.num_frames, config.frames
    if t != want:
        if t > want:
            start = int(torch.randint(t - want + 1, (), generator=generator)) if augment else 0
            index = torch.arange(start, start + want)
        else:
            index = torch.arange(want).clamp(max=t - 1)
        sample = dataclasses.replace(
            sample, images=sample.images[index], id_maps=sample.id_maps[index],
            frame_names=tuple(sample.frame_names[i] for i in index.tolist()),
            segments=tuple(dataclasses.replace(s, area=tuple(s.area[i] for i in index.tolist())) for s in sample.segments),
        )
    sample = transform(sample, config.crop, config.scale_range if augment else (1.0, 1.0),
                       config.hflip_prob if augment else 0.0, generator)
    targets = build_targets(sample)
    tasks = set(sample.tasks)
    if name in supervised:
        tasks &= supervised[name]
    prompts = []
    if tasks & PROMPTED_TASKS and config.prompts_per_clip > 0:
        first = targets.masks[:, 0] & ~targets.iscrowd[:, None, None]
        kind = PromptKind.POINT if torch.rand((), generator=generator) < config.point_prob else PromptKind.BOX
        positives = 1 + int(torch.randint(config.positive_points, (), generator=generator))
        candidates = []
        for n in range(first.shape[0]):
            prompt = sample_prompt(first[n], kind, generator, segment_index=n, num_positive=positives,
                                   num_negative=config.negative_points)
            if prompt is not None:
                candidates.append(prompt)
        if len(candidates) > config.prompts_per_clip:
            keep = torch.randperm(len(candidates), generator=generator)[: config.prompts_per_clip]
            candidates = [candidates[i] for i in sorted(keep.tolist())]
        prompts = candidates
    supervision = match_targets(targets, label_maps[name], prompts, objects=bool(tasks & OBJECT_TASKS))
    return TrainExample(
        dataset=name,
        images=sample.images,
        targets=dataclasses.replace(supervision, seed=derive_seed(key, "loss")),
        prompts=prompt_batch(prompts, config.crop),
    )
