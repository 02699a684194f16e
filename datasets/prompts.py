"""Interactive prompts (points, boxes) sampled from ground-truth masks at load time.

Coordinates are continuous image coordinates: pixel (row r, column c) covers
[c, c + 1) x [r, r + 1), a point is at a pixel centre (c + 0.5, r + 0.5), and a box is
(x1, y1, x2, y2) over pixel edges, so a tight box of a one-pixel mask has width 1.
Every draw comes from the caller's seeded `torch.Generator`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from omgseg.core.structures import PromptKind
from omgseg.datasets.transforms import any_along


@dataclass
class Prompts:
    """The prompt for one target segment.

    kind: POINT (then K >= 1 points and no box) or BOX (one box and no points).
    segment_index: the index of the target segment in the masks the prompt came from
        (the row of `Targets.masks`).
    points: float32 (K, 2), xy pixel centres.
    point_labels: int64 (K,), 1 = positive (on the object), 0 = negative (background).
    boxes: float32 (B, 4), xyxy; B = 1 for BOX, 0 for POINT.
    """

    kind: PromptKind
    segment_index: int
    points: torch.Tensor
    point_labels: torch.Tensor
    boxes: torch.Tensor

    def __post_init__(self) -> None:
        k = self.points.shape[0]
        if self.points.ndim != 2 or self.points.shape[1] != 2:
            raise ValueError(f"points must be (K, 2), got {tuple(self.points.shape)}")
        if tuple(self.point_labels.shape) != (k,):
            raise ValueError(f"point_labels must be ({k},) like points, got {tuple(self.point_labels.shape)}")
        if self.boxes.ndim != 2 or self.boxes.shape[1] != 4:
            raise ValueError(f"boxes must be (B, 4), got {tuple(self.boxes.shape)}")
        if self.kind is PromptKind.POINT and (k == 0 or self.boxes.shape[0] != 0):
            raise ValueError(f"a POINT prompt needs points and no box, got {k} points, {self.boxes.shape[0]} boxes")
        if self.kind is PromptKind.BOX and (k != 0 or self.boxes.shape[0] != 1):
            raise ValueError(f"a BOX prompt needs one box and no points, got {k} points, {self.boxes.shape[0]} boxes")


def _pick(candidates: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k rows of `candidates` (M, 2) drawn uniformly with replacement."""
    index = torch.randint(candidates.shape[0], (k,), generator=generator, device=generator.device)
    return candidates[index.to(candidates.device)]


def _as_points(rc: torch.Tensor) -> torch.Tensor:
    """(K, 2) (row, col) indices -> (K, 2) float32 xy pixel centres."""
    return rc.flip(1).to(torch.float32) + 0.5


def _near(mask: torch.Tensor, band: int) -> torch.Tensor:
    """bool (H, W): pixels within `band` pixels (Chebyshev distance) of `mask`, as a
    (2 band + 1)^2 max-pool gives them. Written with prefix sums, a row pass then a column
    pass, because the max-pool costs (2 band + 1)^2 per pixel (0.27 s at 736x1280, band 10)."""
    near = mask
    for dim in (1, 0):
        size = near.shape[dim]
        counts = F.pad(near.to(torch.int32).cumsum(dim, dtype=torch.int32), (1, 0) if dim == 1 else (0, 0, 1, 0))
        position = torch.arange(size, device=mask.device)
        high = (position + band + 1).clamp_(max=size)  # the window [p - band, p + band], inside the frame
        low = (position - band).clamp_(min=0)
        near = counts.index_select(dim, high) > counts.index_select(dim, low)
    return near


def negative_band(mask: torch.Tensor, band: int) -> torch.Tensor:
    """bool (H, W): pixels outside `mask` within `band` pixels (Chebyshev distance) of it."""
    return _near(mask, band) & ~mask


def bounding_boxes(masks: torch.Tensor) -> torch.Tensor:
    """bool (N, H, W) -> int64 (N, 4): each mask's rows and columns (row0, col0, row1, col1),
    ends exclusive; (0, 0, 0, 0) for an empty mask. One pass over the masks for all of them."""
    n, h, w = masks.shape
    rows = any_along(masks, 2)  # (N, H)
    present = rows.any(dim=1)
    rows = rows.to(torch.uint8)
    cols = any_along(masks, 1).to(torch.uint8)  # (N, W)
    boxes = torch.stack([
        rows.argmax(dim=1), cols.argmax(dim=1), h - rows.flip(1).argmax(dim=1), w - cols.flip(1).argmax(dim=1),
    ], dim=1)  # argmax gives the first maximum: the first row or column with a pixel
    return torch.where(present[:, None], boxes, torch.zeros_like(boxes))


def tight_box(mask: torch.Tensor) -> torch.Tensor:
    """bool (H, W), non-empty -> float32 (4,) xyxy over pixel edges."""
    row0, col0, row1, col1 = bounding_boxes(mask[None])[0]
    return torch.stack([col0, row0, col1, row1]).to(torch.float32)


def _check_options(num_positive: int, num_negative: int, band: int, box_jitter: float) -> None:
    if num_positive < 1 or num_negative < 0 or band < 0 or box_jitter < 0:
        raise ValueError(
            f"need num_positive >= 1, num_negative >= 0, band >= 0, box_jitter >= 0; got "
            f"{num_positive}, {num_negative}, {band}, {box_jitter}"
        )


def sample_prompt(
    mask: torch.Tensor,
    kind: PromptKind,
    generator: torch.Generator,
    *,
    segment_index: int = 0,
    num_positive: int = 1,
    num_negative: int = 0,
    band: int = 10,
    box_jitter: float = 0.1,
) -> Prompts | None:
    """A prompt for the object in `mask` (bool (H, W)); None if the mask is empty.

    POINT: `num_positive` points uniform over the mask, then `num_negative` points uniform
        over the background within `band` pixels of the object (a user corrects near the
        boundary), or anywhere outside it when that band is empty; no negatives if the mask
        covers the whole image.
    BOX: the tight box with each edge moved by N(0, (box_jitter * box side)^2), kept inside
        the image and at least one pixel wide and high.
    """
    if mask.dtype != torch.bool or mask.ndim != 2:
        raise ValueError(f"mask must be bool (H, W), got {mask.dtype} {tuple(mask.shape)}")
    _check_options(num_positive, num_negative, band, box_jitter)
    return _prompt_in_box(mask, bounding_boxes(mask[None])[0].tolist(), kind, generator, segment_index,
                          num_positive, num_negative, band, box_jitter)


def _prompt_in_box(mask: torch.Tensor, box: list[int], kind: PromptKind, generator: torch.Generator,
                   segment_index: int, num_positive: int, num_negative: int, band: int,
                   box_jitter: float) -> Prompts | None:
    """`sample_prompt` for a mask whose pixels all lie in `box` (row0, col0, row1, col1).

    Every candidate pixel is looked for inside the box (or the box widened by `band` for the
    negatives), never in the whole frame. Candidates come in the frame's row-major order, as
    `torch.nonzero` of the whole frame gives them, so every draw picks the same pixel.
    """
    row0, col0, row1, col1 = box
    if row1 == 0:
        return None  # an empty mask
    device = mask.device
    no_points = torch.zeros(0, 2, dtype=torch.float32, device=device)
    no_labels = torch.zeros(0, dtype=torch.int64, device=device)
    h, w = mask.shape
    if kind is PromptKind.BOX:
        box_xyxy = torch.tensor([col0, row0, col1, row1], dtype=torch.float32, device=device)
        side = torch.stack([box_xyxy[2] - box_xyxy[0], box_xyxy[3] - box_xyxy[1]]).repeat(2)  # (w, h, w, h)
        noise = torch.randn(4, generator=generator, device=generator.device).to(device)
        x1, y1, x2, y2 = (box_xyxy + noise * box_jitter * side).unbind()
        x1 = x1.clamp(0, w - 1)
        y1 = y1.clamp(0, h - 1)
        x2 = torch.maximum(x2, x1 + 1).clamp(max=w)
        y2 = torch.maximum(y2, y1 + 1).clamp(max=h)
        return Prompts(kind, segment_index, no_points, no_labels, torch.stack([x1, y1, x2, y2])[None])
    origin = torch.tensor([row0, col0], device=device)
    inside = torch.nonzero(mask[row0:row1, col0:col1]) + origin
    positive = _as_points(_pick(inside, num_positive, generator))
    negative = no_points
    if num_negative > 0:
        # Pixels farther than `band` from the box are farther than `band` from the mask.
        top, left = max(row0 - band, 0), max(col0 - band, 0)
        window = mask[top : min(row1 + band, h), left : min(col1 + band, w)]
        near = torch.nonzero(negative_band(window, band)) + torch.tensor([top, left], device=device)
        if near.shape[0] == 0:
            near = torch.nonzero(~mask)  # no band: anywhere outside (rare, a mask filling its surroundings)
        if near.shape[0] > 0:
            negative = _as_points(_pick(near, num_negative, generator))
    points = torch.cat([positive, negative])
    labels = torch.cat([
        torch.ones(positive.shape[0], dtype=torch.int64, device=device),
        torch.zeros(negative.shape[0], dtype=torch.int64, device=device),
    ])
    return Prompts(kind, segment_index, points, labels, torch.zeros(0, 4, dtype=torch.float32, device=device))


def sample_prompts(
    masks: torch.Tensor,
    kind: PromptKind,
    generator: torch.Generator,
    *,
    rows: Sequence[int] | None = None,
    **options: int | float,
) -> list[Prompts]:
    """One prompt per non-empty mask of `masks` (bool (N, H, W)), in order; empty masks get
    none. For a clip, pass one frame of `Targets.masks`, e.g. `targets.masks[:, 0]`.
    rows: the masks to prompt (default: all); a prompt's `segment_index` is its row.
    `options` are `sample_prompt`'s keyword arguments (num_positive, num_negative, band,
    box_jitter); an unknown one is a TypeError. The masks' boxes are found in one pass."""
    if masks.dtype != torch.bool or masks.ndim != 3:
        raise ValueError(f"masks must be bool (N, H, W), got {masks.dtype} {tuple(masks.shape)}")
    settings = {"num_positive": 1, "num_negative": 0, "band": 10, "box_jitter": 0.1}
    unknown = sorted(set(options) - set(settings))
    if unknown:
        raise TypeError(f"sample_prompts() got unexpected keyword arguments {unknown} (known: {sorted(settings)})")
    settings.update(options)
    _check_options(**settings)
    boxes = bounding_boxes(masks).tolist()
    out = []
    for n in range(masks.shape[0]) if rows is None else rows:
        prompt = _prompt_in_box(masks[n], boxes[n], kind, generator, n, **settings)
        if prompt is not None:
            out.append(prompt)
    return out
