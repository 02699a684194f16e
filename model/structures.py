"""Typed structures that cross module boundaries in the model: prompts, decoder outputs, targets.

Each is validated when built, so a wrong shape fails where it was made, with the shape that
was received, instead of deep inside the decoder or the loss. Values (label ranges, box
corners, click labels) are checked where the data is made, on the host: a copy moved to a
device is not read back, since that would make the host wait for the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from omgseg.core.structures import PromptKind

# A point prompt becomes a box of +-3 input pixels around the click (docs/reference.md), so points
# and boxes share one encoding and one code path.
POINT_BOX_HALF_SIZE = 3.0


# The row of each prompt kind's learned token in the prompt encoder.
KIND_INDEX = {PromptKind.POINT: 0, PromptKind.BOX: 1}


def _check_shape(name: str, tensor: Tensor, expected: tuple[int | None, ...]) -> None:
    """Raise if `tensor` does not have `expected` shape (None matches any size)."""
    ok = tensor.dim() == len(expected) and all(
        e is None or e == s for e, s in zip(expected, tensor.shape)
    )
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(tensor.shape)}")


def point_boxes(points: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Points (..., 2) xy in input pixels -> their +-3 px boxes (..., 4) xyxy, clipped to the image."""
    height, width = image_size
    x, y = points.float().unbind(-1)
    r = POINT_BOX_HALF_SIZE
    return torch.stack([(x - r).clamp(0, width), (y - r).clamp(0, height),
                        (x + r).clamp(0, width), (y + r).clamp(0, height)], dim=-1)


@dataclass(frozen=True)
class PromptBatch:
    """The prompts of one clip; each becomes one prompt query that predicts one tube.

    boxes: (K, 4) float, xyxy in input pixels (the frame size the model sees).
    kinds: K prompt kinds (a POINT is stored as its +-3 px box; the kind picks the token).
    image_size: (H, W) of the input, used to normalise the boxes.
    clicks: (K, N, 2) float xy in input pixels: further clicks on each prompt's object after
        the first (corrections, as a user adds them), or None for none.
    click_labels: (K, N) int64, 1 for a positive click (on the object), 0 for a negative one,
        -1 for padding (prompts have different numbers of clicks); given exactly with clicks.
    """

    boxes: Tensor
    kinds: tuple[PromptKind, ...]
    image_size: tuple[int, int]
    clicks: Tensor | None = None
    click_labels: Tensor | None = None

    def __post_init__(self) -> None:
        _check_shape("PromptBatch.boxes", self.boxes, (None, 4))
        if not self.boxes.is_floating_point():
            raise ValueError(f"PromptBatch.boxes must be floating point, got {self.boxes.dtype}")
        k = self.boxes.shape[0]
        if len(self.kinds) != k:
            raise ValueError(f"PromptBatch has {k} boxes but {len(self.kinds)} kinds")
        bad = [kind for kind in self.kinds if not isinstance(kind, PromptKind)]
        if bad:
            raise ValueError(f"PromptBatch.kinds must be PromptKind members, got {bad[:3]}")
        height, width = self.image_size
        if height <= 0 or width <= 0:
            raise ValueError(f"PromptBatch.image_size must be positive (H, W), got {self.image_size}")
        on_host = self.boxes.device.type == "cpu"
        if k > 0 and on_host:
            flipped = (self.boxes[:, 2] < self.boxes[:, 0]) | (self.boxes[:, 3] < self.boxes[:, 1])
            if bool(flipped.any()):
                raise ValueError(
                    f"PromptBatch.boxes must be xyxy with x1 <= x2 and y1 <= y2, got "
                    f"{self.boxes[flipped][:3].tolist()}"
                )
        if (self.clicks is None) != (self.click_labels is None):
            raise ValueError("PromptBatch.clicks and click_labels go together")
        if self.clicks is not None and self.click_labels is not None:
            _check_shape("PromptBatch.clicks", self.clicks, (k, None, 2))
            _check_shape("PromptBatch.click_labels", self.click_labels, (k, self.clicks.shape[1]))
            if self.click_labels.dtype != torch.long:
                raise ValueError(f"PromptBatch.click_labels must be int64, got {self.click_labels.dtype}")
            bad = set(self.click_labels.unique().tolist()) - {-1, 0, 1} if on_host else set()
            if bad:
                raise ValueError(f"PromptBatch.click_labels must be 1, 0 or -1 (padding), got {sorted(bad)}")

    @classmethod
    def from_points(
        cls,
        points: Tensor,
        image_size: tuple[int, int],
        clicks: Tensor | None = None,
        click_labels: Tensor | None = None,
    ) -> PromptBatch:
        """Point prompts: points (K, 2) xy in input pixels become +-3 px boxes, clipped to the image."""
        _check_shape("points", points, (None, 2))
        return cls(
            boxes=point_boxes(points, image_size),
            kinds=(PromptKind.POINT,) * points.shape[0],
            image_size=image_size,
            clicks=clicks,
            click_labels=click_labels,
        )

    @property
    def num_prompts(self) -> int:
        return self.boxes.shape[0]


@dataclass
class QueryOutputs:
    """What the decoder predicts for every query of every clip, for one prediction set.

    Queries [0, num_object_queries) are the learned object queries; the rest are prompt
    queries, one per (padded) prompt, in the order of each clip's PromptBatch.

    mask_logits: (B, Q, T, h, w) a tube of mask logits per query (h, w = input / 4).
    class_logits: (B, Q, C + 1) logits over the given vocabulary; the last column is void.
    id_embeddings: (B, Q, E) embeddings for associating tubes across clips.
    num_object_queries: how many of the Q queries are object queries.
    prompt_valid: (B, Q - num_object_queries) bool, False for padding (clips of a batch can
        have different numbers of prompts).
    aux: earlier prediction sets (initial queries, then layers 1 .. L-1) for deep supervision;
        each has an empty aux list.
    unused_parameter_sum: () scalar, the sum of the decoder parameters that no loss reaches
        in this pass (see OMGDecoder.forward and SetCriterion), or None.
    prompt_counts: each clip's number of real prompts (prompt_valid's row sums), known on the
        host so that the loss never reads them back from the device; counted from
        prompt_valid when not given.
    """

    mask_logits: Tensor
    class_logits: Tensor
    id_embeddings: Tensor
    num_object_queries: int
    prompt_valid: Tensor
    aux: list[QueryOutputs] = field(default_factory=list)
    unused_parameter_sum: Tensor | None = None
    prompt_counts: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.mask_logits.dim() != 5:
            raise ValueError(
                f"QueryOutputs.mask_logits must be (B, Q, T, h, w), got {tuple(self.mask_logits.shape)}"
            )
        b, q = self.mask_logits.shape[:2]
        _check_shape("QueryOutputs.class_logits", self.class_logits, (b, q, None))
        _check_shape("QueryOutputs.id_embeddings", self.id_embeddings, (b, q, None))
        if not 0 <= self.num_object_queries <= q:
            raise ValueError(
                f"QueryOutputs.num_object_queries must be in [0, {q}], got {self.num_object_queries}"
            )
        _check_shape("QueryOutputs.prompt_valid", self.prompt_valid, (b, q - self.num_object_queries))
        if self.prompt_valid.dtype != torch.bool:
            raise ValueError(f"QueryOutputs.prompt_valid must be bool, got {self.prompt_valid.dtype}")
        for i, a in enumerate(self.aux):
            if a.aux:
                raise ValueError(f"QueryOutputs.aux[{i}] must not have its own aux sets")
        if self.prompt_counts is None:
            self.prompt_counts = tuple(int(n) for n in self.prompt_valid.sum(dim=1))
        if len(self.prompt_counts) != b:
            raise ValueError(f"QueryOutputs.prompt_counts must have {b} entries, got {self.prompt_counts}")

    @property
    def num_prompt_queries(self) -> int:
        return self.mask_logits.shape[1] - self.num_object_queries

    @property
    def num_frames(self) -> int:
        return self.mask_logits.shape[2]


@dataclass(frozen=True)
class MatchTargets:
    """Ground truth of one clip, at input resolution.

    labels: (N,) int64 class indices into the vocabulary given to the decoder.
    masks: (N, T, H, W) bool, one tube per segment (all False in frames where it is absent).
    track_ids: (N,) int64 identities, stable across the clip and across clips of a video.
    prompt_masks: (K, T, H, W) bool, the mask prompt k must predict (no matching), or None
        when the clip has no prompts; K must equal that clip's PromptBatch.num_prompts.
    supervise_objects: False for clips whose data set labels only prompted objects (video
        object segmentation): their object queries get no loss at all, since calling every
        unprompted object "void" would teach the model to miss objects.
    seed: the clip's own seed for the loss's random point sampling (matcher and criterion), so
        that a sample is treated the same whatever else is in its batch; None: the global
        torch generator.
    """

    labels: Tensor
    masks: Tensor
    track_ids: Tensor
    prompt_masks: Tensor | None = None
    supervise_objects: bool = True
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_shape("MatchTargets.labels", self.labels, (None,))
        n = self.labels.shape[0]
        _check_shape("MatchTargets.masks", self.masks, (n, None, None, None))
        _check_shape("MatchTargets.track_ids", self.track_ids, (n,))
        if self.labels.dtype != torch.long:
            raise ValueError(f"MatchTargets.labels must be int64, got {self.labels.dtype}")
        if self.masks.dtype != torch.bool:
            raise ValueError(f"MatchTargets.masks must be bool, got {self.masks.dtype}")
        if n > 0 and self.labels.device.type == "cpu" and int(self.labels.min()) < 0:
            raise ValueError(f"MatchTargets.labels must be >= 0, got {self.labels.tolist()}")
        if not self.supervise_objects and n > 0:
            raise ValueError(f"MatchTargets with supervise_objects=False must have no object targets, got {n}")
        if self.prompt_masks is not None:
            _check_shape("MatchTargets.prompt_masks", self.prompt_masks, (None, *self.masks.shape[1:]))
            if self.prompt_masks.dtype != torch.bool:
                raise ValueError(
                    f"MatchTargets.prompt_masks must be bool, got {self.prompt_masks.dtype}"
                )

    @property
    def num_frames(self) -> int:
        return self.masks.shape[1]

    @property
    def num_prompts(self) -> int:
        return 0 if self.prompt_masks is None else self.prompt_masks.shape[0]
