"""From a data set's per-clip supervision to what the model's loss and prompt encoder take.

The data layer speaks in data set category ids and sampled `Prompts`; the model speaks in
vocabulary indices, `MatchTargets` and `PromptBatch`. This is the one place they meet.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from omgseg.core.structures import PromptKind
from omgseg.datasets.prompts import Prompts
from omgseg.datasets.transforms import Targets
from omgseg.model.structures import MatchTargets, PromptBatch


def match_targets(
    targets: Targets, label_map: dict[int, int], prompts: Sequence[Prompts] = (), *, objects: bool = True
) -> MatchTargets:
    """The clip's object targets (crowd regions left out) and the mask each prompt must predict.

    label_map: {data set category id: class index of the vocabulary the model is given}
    (`Vocabulary.label_map()`, or a data set's map from `merge_vocabularies`).

    Crowd regions are not matched and not penalised, as in Mask2Former: a crowd is not one
    object, and calling it void would teach the model to ignore people in crowds.
    A prompt's mask is its segment's whole tube (for video, a first-frame prompt asks for the
    object in every frame). objects=False: the data set supervises prompts only (VOS), so
    object queries get no targets and no loss.
    """
    keep = ~targets.iscrowd if objects else torch.zeros_like(targets.iscrowd)
    masks = targets.masks
    prompt_masks = None
    if prompts:
        index = torch.tensor([p.segment_index for p in prompts], dtype=torch.int64, device=masks.device)
        if int(index.max()) >= masks.shape[0] or int(index.min()) < 0:
            raise ValueError(f"prompt segment indices {index.tolist()} out of range for {masks.shape[0]} segments")
        prompt_masks = masks[index]
    category_ids = targets.labels[keep].tolist()
    unknown = sorted(set(category_ids) - label_map.keys())
    if unknown:
        raise KeyError(f"category ids {unknown} are not in the vocabulary (known: {sorted(label_map)})")
    return MatchTargets(
        labels=torch.tensor([label_map[c] for c in category_ids], dtype=torch.int64, device=masks.device),
        masks=masks if bool(keep.all()) else masks[keep],  # no copy when nothing is left out
        track_ids=targets.track_ids[keep],
        prompt_masks=prompt_masks,
        supervise_objects=objects,
    )


def prompt_batch(prompts: Sequence[Prompts], image_size: tuple[int, int]) -> PromptBatch:
    """Sampled prompts -> the model's PromptBatch: a box as given; clicks as the first positive
    click's +-3 px box, every further click (positive or negative) kept as a click."""
    if not prompts:
        return PromptBatch(torch.zeros(0, 4), (), image_size)
    device = prompts[0].points.device
    boxes, kinds, clicks, labels = [], [], [], []
    for p in prompts:
        if p.kind is PromptKind.BOX:
            boxes.append(p.boxes[0].float())
            clicks.append(p.points.float())
            labels.append(p.point_labels.long())
        else:
            positive = (p.point_labels == 1).nonzero().squeeze(1)
            if positive.numel() == 0:
                raise ValueError(f"point prompt for segment {p.segment_index} has no positive click")
            first = int(positive[0])
            boxes.append(PromptBatch.from_points(p.points[first:first + 1].float(), image_size).boxes[0])
            rest = torch.ones(p.points.shape[0], dtype=torch.bool, device=device)
            rest[first] = False
            clicks.append(p.points[rest].float())
            labels.append(p.point_labels[rest].long())
        kinds.append(p.kind)
    most = max(c.shape[0] for c in clicks)
    click_points = click_labels = None
    if most > 0:
        click_points = torch.zeros(len(prompts), most, 2, device=device)
        click_labels = torch.full((len(prompts), most), -1, dtype=torch.long, device=device)
        for k, (c, lab) in enumerate(zip(clicks, labels)):
            click_points[k, : c.shape[0]] = c
            click_labels[k, : c.shape[0]] = lab
    return PromptBatch(
        boxes=torch.stack(boxes), kinds=tuple(kinds), image_size=image_size,
        clicks=click_points, click_labels=click_labels,
    )
