"""Prompt sampling: points on and near the object, boxes around it, seeded and uniform."""

import pytest
import torch
from scipy.stats import chisquare

from omgseg.core.structures import PromptKind
from omgseg.datasets.prompts import (
    Prompts,
    negative_band,
    sample_prompt,
    sample_prompts,
    tight_box,
)


def square_mask(h=20, w=30, top=5, left=8, size=6):
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[top : top + size, left : left + size] = True
    return mask


def pixel_of(points):
    """xy pixel centres -> (row, col) long indices."""
    return points.flip(1).floor().long()


def test_points_fall_on_the_object_and_negatives_in_the_band():
    mask = square_mask()
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        p = sample_prompt(mask, PromptKind.POINT, g, num_positive=3, num_negative=4, band=2)
        assert p.kind is PromptKind.POINT and p.boxes.shape == (0, 4)
        assert p.point_labels.tolist() == [1, 1, 1, 0, 0, 0, 0]
        rc = pixel_of(p.points)
        assert torch.all(mask[rc[:3, 0], rc[:3, 1]])
        ring = negative_band(mask, 2)
        assert torch.all(ring[rc[3:, 0], rc[3:, 1]])
    assert int(negative_band(mask, 2).sum()) == 10 * 10 - 36


def test_negatives_fall_back_to_anywhere_outside_then_to_none():
    full = torch.ones(4, 4, dtype=torch.bool)
    g = torch.Generator().manual_seed(1)
    p = sample_prompt(full, PromptKind.POINT, g, num_negative=2, band=0)
    assert p.point_labels.tolist() == [1]  # nothing outside the object
    almost = full.clone()
    almost[0, 0] = False
    p = sample_prompt(almost, PromptKind.POINT, g, num_negative=2, band=0)  # empty band
    assert p.point_labels.tolist() == [1, 0, 0] and p.points[1:].tolist() == [[0.5, 0.5], [0.5, 0.5]]


def test_positive_points_are_uniform_over_the_mask():
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[1, 1] = mask[1, 4] = mask[4, 2] = mask[3, 3] = mask[5, 5] = True
    g = torch.Generator().manual_seed(2)
    p = sample_prompt(mask, PromptKind.POINT, g, num_positive=3000)
    rc = pixel_of(p.points)
    counts = torch.bincount(rc[:, 0] * 6 + rc[:, 1], minlength=36)[mask.flatten()]
    assert int(counts.sum()) == 3000
    assert chisquare(counts.tolist()).pvalue > 0.001


def test_boxes_are_tight_without_jitter_and_stay_valid_with_it():
    mask = square_mask()
    assert tight_box(mask).tolist() == [8.0, 5.0, 14.0, 11.0]
    g = torch.Generator().manual_seed(3)
    p = sample_prompt(mask, PromptKind.BOX, g, box_jitter=0.0)
    assert p.boxes.tolist() == [[8.0, 5.0, 14.0, 11.0]] and p.points.shape == (0, 2)
    edge = torch.zeros(5, 5, dtype=torch.bool)
    edge[4, 4] = True
    for _ in range(50):
        for m in (mask, edge):
            x1, y1, x2, y2 = sample_prompt(m, PromptKind.BOX, g, box_jitter=0.5).boxes[0].tolist()
            assert 0 <= x1 < x2 <= m.shape[1] and 0 <= y1 < y2 <= m.shape[0]
    moved = [sample_prompt(mask, PromptKind.BOX, g).boxes[0] for _ in range(200)]
    mean = torch.stack(moved).mean(0)
    assert torch.allclose(mean, torch.tensor([8.0, 5.0, 14.0, 11.0]), atol=0.3)


def test_seeded_and_empty_masks_get_no_prompt():
    masks = torch.stack([square_mask(), torch.zeros(20, 30, dtype=torch.bool), square_mask(top=0, left=0, size=3)])

    def draw(seed):
        return sample_prompts(masks, PromptKind.POINT, torch.Generator().manual_seed(seed), num_negative=1)

    a, b, c = draw(4), draw(4), draw(5)
    assert [p.segment_index for p in a] == [0, 2]
    assert all(torch.equal(x.points, y.points) for x, y in zip(a, b))
    assert not all(torch.equal(x.points, y.points) for x, y in zip(a, c))
    assert sample_prompt(masks[1], PromptKind.BOX, torch.Generator()) is None


def test_errors():
    g = torch.Generator()
    with pytest.raises(ValueError, match="mask must be bool"):
        sample_prompt(torch.ones(3, 3), PromptKind.POINT, g)
    with pytest.raises(ValueError, match="num_positive"):
        sample_prompt(square_mask(), PromptKind.POINT, g, num_positive=0)
    with pytest.raises(ValueError, match="BOX prompt needs one box"):
        Prompts(PromptKind.BOX, 0, torch.zeros(1, 2), torch.ones(1, dtype=torch.int64), torch.zeros(0, 4))
    with pytest.raises(TypeError):
        sample_prompts(square_mask()[None], PromptKind.POINT, g, num_clicks=2)
