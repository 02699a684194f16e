"""Training transforms of decoded clips, and the per-segment targets the losses consume.

Every random choice (scale, crop offset, flip) is drawn once per clip and applied to every
frame, so frames stay aligned with each other and with their id maps. Id maps are resized by
nearest neighbour through integer index arithmetic: ids are labels, never interpolated.
"""

from __future__ import annotations

import dataclasses
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


def resize_ids_nearest(id_maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(T, H, W) integer ids -> (T, h, w), each output pixel taking the id under its centre.

    Pure indexing, so any id (up to 2**63) survives exactly, on any device.
    """
    t, h, w = id_maps.shape
    out_h, out_w = size
    device = id_maps.device
    rows = ((torch.arange(out_h, device=device, dtype=torch.float64) + 0.5) * (h / out_h)).long().clamp_(max=h - 1)
    cols = ((torch.arange(out_w, device=device, dtype=torch.float64) + 0.5) * (w / out_w)).long().clamp_(max=w - 1)
    return id_maps.index_select(1, rows).index_select(2, cols)


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(T, 3, H, W) uint8 -> (T, 3, h, w) uint8, bilinear with antialiasing when shrinking."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shrink = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    resized = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def segment_areas(id_maps: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """Pixel count of each id in each frame: id_maps (T, H, W), segment_ids (N,) -> (N, T) int64.

    One bincount over all frames instead of N comparisons of the whole clip.
    """
    t = id_maps.shape[0]
    n = segment_ids.numel()
    if n == 0:
        return torch.zeros(0, t, dtype=torch.int64, device=id_maps.device)
    sorted_ids, order = torch.sort(segment_ids)
    index = torch.searchsorted(sorted_ids, id_maps).clamp_(max=n - 1)
    bins = torch.where(sorted_ids[index] == id_maps, index + 1, torch.zeros_like(index))  # 0: not a segment
    bins = bins + (torch.arange(t, device=id_maps.device) * (n + 1)).view(t, 1, 1)
    counts = torch.bincount(bins.flatten(), minlength=t * (n + 1)).view(t, n + 1)[:, 1:]
    areas = torch.empty_like(counts)
    areas[:, order] = counts
    return areas.T.contiguous()


def with_recomputed_areas(sample: ClipSample, images: torch.Tensor, id_maps: torch.Tensor) -> ClipSample:
    """`sample` with new pixels and segment areas that match them."""
    ids = torch.tensor([s.id for s in sample.segments], dtype=torch.int64, device=id_maps.device)
    areas = segment_areas(id_maps, ids).tolist()
    segments = tuple(dataclasses.replace(s, area=tuple(a)) for s, a in zip(sample.segments, areas))
    return dataclasses.replace(sample, images=images, id_maps=id_maps, segments=segments)


@dataclass(frozen=True)
class ClipTransform:
    """Scale jitter, random crop (padded where the clip is smaller) and horizontal flip.

    crop_size: (height, width) of every output clip.
    scale_range: the clip is first resized to fit in crop_size times s, s ~ U(scale_range)
        (large-scale jitter as in Mask2Former: s < 1 gives padding, s > 1 a crop of a part).
    hflip_prob: probability of flipping the whole clip left-right.
    Padding is 0 in the images and 0 (void) in the id maps, at the bottom and right.
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

    def __call__(self, sample: ClipSample, generator: torch.Generator) -> ClipSample:
        """A transformed copy of `sample`; segment areas are recomputed for the new pixels."""
        crop_h, crop_w = self.crop_size
        scale = _uniform(generator, *self.scale_range) * min(crop_h / sample.height, crop_w / sample.width)
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
        top = _randint(generator, canvas_h - crop_h + 1)
        left = _randint(generator, canvas_w - crop_w + 1)
        images = images[:, :, top : top + crop_h, left : left + crop_w]
        id_maps = id_maps[:, top : top + crop_h, left : left + crop_w]
        if _uniform(generator, 0.0, 1.0) < self.hflip_prob:
            images = images.flip(-1)
            id_maps = id_maps.flip(-1)
        return with_recomputed_areas(sample, images.contiguous(), id_maps.contiguous())


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


def build_targets(sample: ClipSample) -> Targets:
    """Per-segment masks and attributes of `sample` (after any transform)."""
    device = sample.id_maps.device
    segments: list[Segment] = list(sample.segments)
    ids = torch.tensor([s.id for s in segments], dtype=torch.int64, device=device)
    # From the pixels, not `Segment.area`: a transform may have changed what is visible.
    valid = segment_areas(sample.id_maps, ids) > 0  # (N, T)
    keep = valid.any(dim=1)
    kept = [s for s, k in zip(segments, keep.tolist()) if k]
    ids = ids[keep]
    masks = sample.id_maps.unsqueeze(0) == ids.view(-1, 1, 1, 1)  # (N, T, H, W)
    return Targets(
        masks=masks,
        labels=torch.tensor([s.category_id for s in kept], dtype=torch.int64, device=device),
        track_ids=torch.tensor([s.track_id for s in kept], dtype=torch.int64, device=device),
        segment_ids=ids,
        iscrowd=torch.tensor([s.iscrowd for s in kept], dtype=torch.bool, device=device),
        valid=valid[keep],
    )
