"""From a data set's per-clip supervision to what the model's loss and prompt encoder take.

The data layer speaks in data set category ids and sampled `Prompts`; the model speaks in
vocabulary indices, `MatchTargets` and `PromptBatch`. This is the one place they meet.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from omgseg.datasets.prompts import PromptKind, Prompts
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
        masks=masks[keep],
        track_ids=targets.track_ids[keep],
        prompt_masks=prompt_masks,
        supervise_objects=objects,
    )


def prompt_batch(prompts: Sequence[Prompts], image_size: tuple[int, int]) -> PromptBatch:
    """Sampled prompts -> the model's PromptBatch (boxes as given; a click as its +-3 px box,
    negative clicks kept per prompt).

    The prompt encoder takes one positive click per prompt (as the reference model does):
    sample point prompts with `num_positive=1`.
    """
    height, width = image_size
    if not prompts:
        return PromptBatch(torch.zeros(0, 4), (), image_size)
    device = prompts[0].points.device
    boxes, kinds, negatives = [], [], []
    for p in prompts:
        if p.kind is PromptKind.BOX:
            boxes.append(p.boxes[0].float())
            negatives.append(torch.zeros(0, 2, device=device))
        else:
            positive = p.points[p.point_labels == 1]
            if positive.shape[0] != 1:
                raise ValueError(
                    f"prompt for segment {p.segment_index} has {positive.shape[0]} positive clicks; the model "
                    f"encodes exactly one per prompt (sample with num_positive=1)"
                )
            boxes.append(PromptBatch.from_points(positive.float(), image_size).boxes[0])
            negatives.append(p.points[p.point_labels == 0].float())
        kinds.append(p.kind)
    most = max(n.shape[0] for n in negatives)
    negative_points = negative_valid = None
    if most > 0:
        negative_points = torch.zeros(len(prompts), most, 2, device=device)
        negative_valid = torch.zeros(len(prompts), most, dtype=torch.bool, device=device)
        for k, n in enumerate(negatives):
            negative_points[k, : n.shape[0]] = n
            negative_valid[k, : n.shape[0]] = True
    return PromptBatch(
        boxes=torch.stack(boxes),
        kinds=tuple(kinds),
        image_size=(height, width),
        negative_points=negative_points,
        negative_valid=negative_valid,
    )
