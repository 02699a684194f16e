"""Clip transforms keep frames aligned and ids exact; targets match the id maps."""

import pytest
import torch
import torch.nn.functional as F

from omgseg.core.structures import Task
from omgseg.datasets.clip import Segment
from omgseg.datasets.stream import ClipSample
from omgseg.datasets.transforms import (
    ClipTransform,
    Targets,
    any_along,
    build_targets,
    resize_ids_nearest,
    segment_areas,
)

H, W, T = 20, 24, 3
FRAME_STEP = 100_000


def coordinate_clip() -> ClipSample:
    """Frame t: image channels (x, y, 7 t); id of pixel (y, x) = y W + x + 1 + t FRAME_STEP.

    Every pixel has its own id, so any misalignment between frames or between an image and
    its id map shows up.
    """
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    base = ys * W + xs + 1
    images = torch.stack([torch.stack([xs, ys, torch.full_like(xs, 7 * t)]) for t in range(T)]).to(torch.uint8)
    id_maps = torch.stack([base + t * FRAME_STEP for t in range(T)]).to(torch.int64)
    segments = tuple(
        Segment(id=int(i), category_id=int(i) % 5, iscrowd=False, track_id=int(i), area=(1,) * T)
        for i in id_maps.unique().tolist()
    )
    # Each segment lives in one frame only: areas as Clip would compute them.
    segments = tuple(
        Segment(s.id, s.category_id, s.iscrowd, s.track_id, tuple(int(t == s.id // FRAME_STEP) for t in range(T)))
        for s in segments
    )
    return ClipSample(
        dataset="toy", source_id="v", frame_names=tuple(f"{t}.jpg" for t in range(T)), tasks=(Task.VOS,),
        images=images, id_maps=id_maps, segments=segments, key="000000000", shard="mem",
    )


def test_crop_and_flip_are_identical_on_every_frame_and_keep_images_on_their_ids():
    sample = coordinate_clip()
    # 1.5 * min(16/20, 16/24) = 1: the resize is the identity, leaving crop and flip.
    transform = ClipTransform(crop_size=(16, 16), scale_range=(1.5, 1.5), hflip_prob=0.5)
    flips = 0
    for seed in range(12):
        out = transform(sample, torch.Generator().manual_seed(seed))
        assert out.images.shape == (T, 3, 16, 16) and out.id_maps.shape == (T, 16, 16)
        first = out.id_maps[0]
        for t in range(T):
            assert torch.equal(out.id_maps[t] - t * FRAME_STEP, first)
            assert torch.equal(out.images[t, :2], out.images[0, :2])
            assert torch.all(out.images[t, 2] == 7 * t)
        x = (first - 1) % W
        y = (first - 1) // W
        assert torch.equal(out.images[0, 0].long(), x) and torch.equal(out.images[0, 1].long(), y)
        flips += int(x[0, 0] > x[0, -1])
    assert 0 < flips < 12  # both flipped and unflipped clips were drawn


def test_scale_jitter_keeps_ids_exact_and_pads_with_void():
    sample = coordinate_clip()
    ids_before = set(sample.id_maps.unique().tolist())
    transform = ClipTransform(crop_size=(32, 32), scale_range=(0.3, 2.5))
    padded = 0
    for seed in range(10):
        out = transform(sample, torch.Generator().manual_seed(seed))
        assert set(out.id_maps.unique().tolist()) <= ids_before | {0}
        # Padding: void ids exactly where the image is zero padding, same on every frame.
        void = out.id_maps == 0
        assert torch.equal(void, void[:1].expand_as(void))
        assert torch.all(out.images[:, :2][void.unsqueeze(1).expand(-1, 2, -1, -1)] == 0)
        padded += int(void.any())
        for s in out.segments:  # areas describe the new pixels
            assert list(s.area) == [int((out.id_maps[t] == s.id).sum()) for t in range(T)]
    assert padded > 0


def test_resize_ids_nearest_matches_a_reference():
    ids = torch.randint(0, 2**24, (2, 7, 9))
    for size in [(7, 9), (3, 4), (14, 18), (10, 5), (1, 1)]:
        # Reference: torch's nearest-exact on floats (exact for ids below 2**24).
        expected = F.interpolate(ids[:, None].double(), size=size, mode="nearest-exact")[:, 0].long()
        assert torch.equal(resize_ids_nearest(ids, size), expected), size
    big = torch.full((1, 3, 3), 2**40 + 3)
    assert torch.equal(resize_ids_nearest(big, (5, 5)), torch.full((1, 5, 5), 2**40 + 3))


def test_segment_areas_matches_a_slow_reference():
    ids = torch.randint(0, 6, (3, 5, 5)) * 1000
    segs = torch.tensor([5000, 1000, 3000, 77])
    expected = torch.tensor([[int((ids[t] == s).sum()) for t in range(3)] for s in segs.tolist()])
    assert torch.equal(segment_areas(ids, segs), expected)
    assert segment_areas(ids, torch.zeros(0, dtype=torch.int64)).shape == (0, 3)


def test_build_targets():
    id_maps = torch.zeros(2, 4, 4, dtype=torch.int64)
    id_maps[0, :2, :2] = 9
    id_maps[1, 2:, 2:] = 9
    id_maps[1, 0, :] = 4
    segments = (
        Segment(id=4, category_id=2, iscrowd=True, track_id=40, area=(0, 4)),
        Segment(id=6, category_id=3, iscrowd=False, track_id=60, area=(0, 0)),  # cropped away
        Segment(id=9, category_id=1, iscrowd=False, track_id=90, area=(4, 4)),
    )
    sample = ClipSample(
        dataset="toy", source_id="v", frame_names=("a", "b"), tasks=(Task.VIDEO_INSTANCE,),
        images=torch.zeros(2, 3, 4, 4, dtype=torch.uint8), id_maps=id_maps, segments=segments,
        key="k", shard="s",
    )
    targets = build_targets(sample.id_maps, sample.segments)
    assert targets.num_segments == 2
    assert targets.segment_ids.tolist() == [4, 9]
    assert targets.labels.tolist() == [2, 1] and targets.track_ids.tolist() == [40, 90]
    assert targets.iscrowd.tolist() == [True, False]
    assert targets.valid.tolist() == [[False, True], [True, True]]
    assert targets.masks.shape == (2, 2, 4, 4) and targets.masks.dtype == torch.bool
    assert torch.equal(targets.masks[1], id_maps == 9)
    with pytest.raises(ValueError, match="labels must have shape"):
        Targets(targets.masks, targets.labels[:1], targets.track_ids, targets.segment_ids,
                targets.iscrowd, targets.valid)


def test_any_along_is_any():
    masks = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0)) > 0.9
    masks[1] = False
    for dim in (0, 1, 2):
        assert torch.equal(any_along(masks, dim), masks.any(dim))


def test_bad_transform_arguments():
    with pytest.raises(ValueError, match="scale_range"):
        ClipTransform(crop_size=(8, 8), scale_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="hflip_prob"):
        ClipTransform(crop_size=(8, 8), hflip_prob=1.5)
