"""Training transforms of decoded clips, and the per-segment targets the losses consume.

Every random choice (scale, crop offset, flip) is drawn once per clip and applied to every
frame, so frames stay aligned with each other and with their id maps. Id maps are resized by
nearest neighbour through integer index arithmetic: ids are labels, never interpolated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from omgseg.datasets.clip import Segment
from omgseg.datasets.stream import ClipSample


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    u = torch.rand((), generator=generator, device=generator.device).item()
    return low + (high - low) * u


def _randint(generator: torch.Generator, high: int) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(high, (), generator=generator, device=generator.device).item())


def nearest_index(in_size: int, out_size: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """The source index of output pixels start..stop-1 when in_size pixels are resized to
    out_size by nearest neighbour (the source pixel under each output pixel's centre)."""
    stop = out_size if stop is None else stop
    positions = torch.arange(start, stop, dtype=torch.float64) + 0.5
    return (positions * (in_size / out_size)).long().clamp_(max=in_size - 1)


def resize_ids_nearest(id_maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(T, H, W) integer ids -> (T, h, w), each output pixel taking the id under its centre.

    Pure indexing, so any id (up to 2**63) survives exactly, on any device.
    """
    _, h, w = id_maps.shape
    rows = nearest_index(h, size[0]).to(id_maps.device)
    cols = nearest_index(w, size[1]).to(id_maps.device)
    return id_maps.index_select(1, rows).index_select(2, cols)


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(T, 3, H, W) uint8 -> (T, 3, h, w) uint8, bilinear, with antialiasing when shrinking.

    torch's integer kernel for uint8 (fixed-point weights, as Pillow's): about ten times
    faster than interpolating in float, and within one grey level of it (tested).
    """
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shrink = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    channels_last = images.contiguous(memory_format=torch.channels_last)  # the kernel's fast layout
    return F.interpolate(channels_last, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def segment_areas(id_maps: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """Pixel count of each id in each frame: id_maps (T, H, W), segment_ids (N,) -> (N, T) int64."""
    t = id_maps.shape[0]
    if segment_ids.numel() == 0:
        return torch.zeros(0, t, dtype=torch.int64, device=id_maps.device)
    return segment_masks(id_maps, segment_ids).flatten(2).sum(2)


def any_along(masks: torch.Tensor, dim: int) -> torch.Tensor:
    """`masks.any(dim)` of a bool tensor, computed as the maximum of its bytes: torch's `any`
    over bool on the CPU runs element by element, `amax` over uint8 is vectorised (about 50
    times faster on a 736x1280 mask, measured), and a bool is stored as the byte 0 or 1."""
    return masks.view(torch.uint8).amax(dim) > 0


def segment_masks(id_maps: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """bool (N, T, H, W): where each of the N ids is, in each frame of id_maps (T, H, W)."""
    return id_maps.unsqueeze(0) == segment_ids.view(-1, 1, 1, 1)


def with_recomputed_areas(sample: ClipSample, images: torch.Tensor, id_maps: torch.Tensor) -> ClipSample:
    """`sample` with new pixels and segment areas that match them."""
    ids = torch.tensor([s.id for s in sample.segments], dtype=torch.int64, device=id_maps.device)
    areas = segment_areas(id_maps, ids).tolist()
    segments = tuple(dataclasses.replace(s, area=tuple(a)) for s, a in zip(sample.segments, areas))
    return dataclasses.replace(sample, images=images, id_maps=id_maps, segments=segments)


@dataclass(frozen=True)
class CropPlan:
    """The random choices of one clip's transform: the size the clip is resized to, the crop's
    top-left corner in the resized clip padded to at least the crop size, and the flip."""

    size: tuple[int, int]
    top: int
    left: int
    flip: bool


@dataclass(frozen=True)
class ClipTransform:
    """Scale jitter, random crop (padded where the clip is smaller) and horizontal flip.

    crop_size: (height, width) of every output clip.
    scale_range: the clip is first resized to fit in crop_size times s, s ~ U(scale_range)
        (large-scale jitter as in Mask2Former: s < 1 gives padding, s > 1 a crop of a part).
    hflip_prob: probability of flipping the whole clip left-right.
    Padding is 0 in the images and 0 (void) in the id maps, at the bottom and right (before
    the flip).

    `plan` draws the choices; `images` and `id_maps` apply them. Only the crop's part of the
    resized id maps is computed, and only its rows and columns of the frames are kept, so the
    cost follows the crop, not the resized frame (which is up to four times larger).
    """

    crop_size: tuple[int, int]
    scale_range: tuple[float, float] = (0.5, 2.0)
    hflip_prob: float = 0.5

    def __post_init__(self) -> None:
        if len(self.crop_size) != 2 or min(self.crop_size) < 1:
            raise ValueError(f"crop_size must be (height, width) >= 1, got {self.crop_size}")
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must be 0 < low <= high, got {self.scale_range}")
        if not 0 <= self.hflip_prob <= 1:
            raise ValueError(f"hflip_prob must be in [0, 1], got {self.hflip_prob}")

    def plan(self, height: int, width: int, generator: torch.Generator) -> CropPlan:
        """The choices for a clip of height x width, drawn in the order scale, top, left, flip."""
        crop_h, crop_w = self.crop_size
        scale = _uniform(generator, *self.scale_range) * min(crop_h / height, crop_w / width)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        top = _randint(generator, max(size[0], crop_h) - crop_h + 1)
        left = _randint(generator, max(size[1], crop_w) - crop_w + 1)
        return CropPlan(size=size, top=top, left=left, flip=_uniform(generator, 0.0, 1.0) < self.hflip_prob)

    def _place(self, part: torch.Tensor, flipped: bool) -> torch.Tensor:
        """The crop (..., crop_h, crop_w) from the part of the resized clip it covers (`flipped`
        already, or not to be flipped): padded with zeros below and right of that part, and on
        the left instead when flipped."""
        crop_h, crop_w = self.crop_size
        rows, cols = part.shape[-2:]
        if (rows, cols) == (crop_h, crop_w):
            return part.contiguous()
        out = torch.zeros((*part.shape[:-2], crop_h, crop_w), dtype=part.dtype, device=part.device)
        if flipped:
            out[..., :rows, crop_w - cols :] = part
        else:
            out[..., :rows, :cols] = part
        return out

    def _window(self, plan: CropPlan) -> tuple[slice, slice]:
        """The rows and columns of the resized clip the crop covers (the rest is padding)."""
        crop_h, crop_w = self.crop_size
        return (slice(plan.top, min(plan.top + crop_h, plan.size[0])),
                slice(plan.left, min(plan.left + crop_w, plan.size[1])))

    def images(self, images: torch.Tensor, plan: CropPlan) -> torch.Tensor:
        """(F, 3, H, W) uint8 frames -> (F, 3, crop_h, crop_w)."""
        rows, cols = self._window(plan)
        part = resize_images(images, plan.size)[:, :, rows, cols]
        return self._place(part.flip(-1) if plan.flip else part, plan.flip)

    def id_maps(self, id_maps: torch.Tensor, plan: CropPlan) -> torch.Tensor:
        """(F, H, W) integer ids -> (F, crop_h, crop_w): exactly the crop of `resize_ids_nearest`."""
        f, h, w = id_maps.shape
        rows, cols = self._window(plan)
        row_index = nearest_index(h, plan.size[0], rows.start, rows.stop).to(id_maps.device)
        col_index = nearest_index(w, plan.size[1], cols.start, cols.stop).to(id_maps.device)
        if plan.flip:
            col_index = col_index.flip(0)  # the flip folded into the gather
        # One gather by flat pixel index (frame, row, column): `index_select` along the columns
        # of int64 maps is several times slower on the CPU than `take`.
        frame_index = torch.arange(f, device=id_maps.device) * (h * w)
        flat = frame_index[:, None, None] + (row_index * w)[None, :, None] + col_index[None, None, :]
        return self._place(id_maps.take(flat), plan.flip)

    def __call__(self, sample: ClipSample, generator: torch.Generator) -> ClipSample:
        """A transformed copy of `sample`; segment areas are recomputed for the new pixels."""
        plan = self.plan(sample.height, sample.width, generator)
        return with_recomputed_areas(sample, self.images(sample.images, plan), self.id_maps(sample.id_maps, plan))


@dataclass
class Targets:
    """Per-segment supervision of one clip, N segments over T frames of H x W.

    masks: bool (N, T, H, W), segment n's pixels in frame t.
    labels: int64 (N,), the dataset's own category ids.
    track_ids: int64 (N,), stable across the clip's frames.
    segment_ids: int64 (N,), the values in the id maps.
    iscrowd: bool (N,).
    valid: bool (N, T), whether segment n has any pixel in frame t.
    Segments with no pixel in any frame (cropped away) are left out.
    """

    masks: torch.Tensor
    labels: torch.Tensor
    track_ids: torch.Tensor
    segment_ids: torch.Tensor
    iscrowd: torch.Tensor
    valid: torch.Tensor

    def __post_init__(self) -> None:
        if self.masks.dtype != torch.bool or self.masks.ndim != 4:
            raise ValueError(f"masks must be bool (N, T, H, W), got {self.masks.dtype} {tuple(self.masks.shape)}")
        n, t = self.masks.shape[:2]
        for name in ("labels", "track_ids", "segment_ids", "iscrowd"):
            value = getattr(self, name)
            if tuple(value.shape) != (n,):
                raise ValueError(f"{name} must have shape ({n},) like masks, got {tuple(value.shape)}")
        if tuple(self.valid.shape) != (n, t):
            raise ValueError(f"valid must have shape ({n}, {t}), got {tuple(self.valid.shape)}")

    @property
    def num_segments(self) -> int:
        return int(self.masks.shape[0])

    def to(self, device: torch.device | str) -> Targets:
        return Targets(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def build_targets(id_maps: torch.Tensor, segments: Sequence[Segment]) -> Targets:
    """Per-segment masks and attributes of a clip (after any transform): id_maps (T, H, W),
    the segments they refer to."""
    device = id_maps.device
    ids = torch.tensor([s.id for s in segments], dtype=torch.int64, device=device)
    masks = segment_masks(id_maps, ids)  # (N, T, H, W)
    # From the pixels, not `Segment.area`: a transform may have changed what is visible.
    valid = any_along(masks.flatten(2), 2)  # (N, T)
    keep = valid.any(dim=1)
    kept = [s for s, k in zip(segments, keep.tolist()) if k]
    if not bool(keep.all()):
        masks = masks[keep]
    return Targets(
        masks=masks,
        labels=torch.tensor([s.category_id for s in kept], dtype=torch.int64, device=device),
        track_ids=torch.tensor([s.track_id for s in kept], dtype=torch.int64, device=device),
        segment_ids=ids[keep],
        iscrowd=torch.tensor([s.iscrowd for s in kept], dtype=torch.bool, device=device),
        valid=valid[keep],
    )
