"""Interactive prompts (points, boxes) sampled from ground-truth masks at load time.

Coordinates are continuous image coordinates: pixel (row r, column c) covers
[c, c + 1) x [r, r + 1), a point is at a pixel centre (c + 0.5, r + 0.5), and a box is
(x1, y1, x2, y2) over pixel edges, so a tight box of a one-pixel mask has width 1.
Every draw comes from the caller's seeded `torch.Generator`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from omgseg.core.structures import PromptKind


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


def negative_band(mask: torch.Tensor, band: int) -> torch.Tensor:
    """bool (H, W): pixels outside `mask` within `band` pixels (Chebyshev distance) of it."""
    dilated = F.max_pool2d(mask[None, None].float(), kernel_size=2 * band + 1, stride=1, padding=band)[0, 0] > 0
    return dilated & ~mask


def tight_box(mask: torch.Tensor) -> torch.Tensor:
    """bool (H, W), non-empty -> float32 (4,) xyxy over pixel edges."""
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    return torch.stack([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]).to(torch.float32)


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
    if num_positive < 1 or num_negative < 0 or band < 0 or box_jitter < 0:
        raise ValueError(
            f"need num_positive >= 1, num_negative >= 0, band >= 0, box_jitter >= 0; got "
            f"{num_positive}, {num_negative}, {band}, {box_jitter}"
        )
    if not mask.any():
        return None
    device = mask.device
    no_points = torch.zeros(0, 2, dtype=torch.float32, device=device)
    no_labels = torch.zeros(0, dtype=torch.int64, device=device)
    if kind is PromptKind.BOX:
        h, w = mask.shape
        box = tight_box(mask)
        side = torch.stack([box[2] - box[0], box[3] - box[1]]).repeat(2)  # (w, h, w, h)
        noise = torch.randn(4, generator=generator, device=generator.device).to(device)
        x1, y1, x2, y2 = (box + noise * box_jitter * side).unbind()
        x1 = x1.clamp(0, w - 1)
        y1 = y1.clamp(0, h - 1)
        x2 = torch.maximum(x2, x1 + 1).clamp(max=w)
        y2 = torch.maximum(y2, y1 + 1).clamp(max=h)
        return Prompts(kind, segment_index, no_points, no_labels, torch.stack([x1, y1, x2, y2])[None])
    positive = _as_points(_pick(torch.nonzero(mask), num_positive, generator))
    negative = no_points
    if num_negative > 0:
        region = negative_band(mask, band)
        if not region.any():
            region = ~mask
        if region.any():
            negative = _as_points(_pick(torch.nonzero(region), num_negative, generator))
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
    **options: int | float,
) -> list[Prompts]:
    """One prompt per non-empty mask of `masks` (bool (N, H, W)), in order; empty masks get
    none. For a clip, pass one frame of `Targets.masks`, e.g. `targets.masks[:, 0]`.
    `options` are `sample_prompt`'s keyword arguments (num_positive, num_negative, band,
    box_jitter); an unknown one is a TypeError there."""
    if masks.dtype != torch.bool or masks.ndim != 3:
        raise ValueError(f"masks must be bool (N, H, W), got {masks.dtype} {tuple(masks.shape)}")
    out = []
    for n in range(masks.shape[0]):
        prompt = sample_prompt(masks[n], kind, generator, segment_index=n, **options)
        if prompt is not None:
            out.append(prompt)
    return out
