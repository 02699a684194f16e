"""The Hungarian matcher against slow, obviously-right references."""

import dataclasses
import itertools
import math

import pytest
import torch

from omgseg.model.matcher import HungarianMatcher, pixel_centre_points, point_sample
from omgseg.model.structures import MatchTargets


def _targets(n: int, t: int, h: int, w: int, num_classes: int, gen: torch.Generator) -> MatchTargets:
    return MatchTargets(
        labels=torch.randint(0, num_classes, (n,), generator=gen),
        masks=torch.rand(n, t, h, w, generator=gen) > 0.6,
        track_ids=torch.arange(n),
    )


def _slow_cost(class_logits, mask_logits, target, weights=(2.0, 5.0, 5.0)) -> torch.Tensor:
    """Pair by pair, frame by frame, pixel by pixel, straight from the definitions."""
    q, t = mask_logits.shape[:2]
    n = target.labels.shape[0]
    prob = class_logits.softmax(-1)
    cost = torch.zeros(q, n, dtype=torch.float64)
    for i in range(q):
        for j in range(n):
            c_class = -prob[i, target.labels[j]].item()
            c_bce, c_dice = 0.0, 0.0
            for f in range(t):
                x = mask_logits[i, f].flatten().double()
                y = target.masks[j, f].flatten().double()
                p = torch.sigmoid(x)
                bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p))
                c_bce += bce.mean().item()
                c_dice += 1 - (2 * (p * y).sum().item() + 1) / (p.sum().item() + y.sum().item() + 1)
            cost[i, j] = weights[0] * c_class + weights[1] * c_bce + weights[2] * c_dice
    return cost


def test_point_sample_reads_pixels_exactly_at_centres():
    masks = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    got = point_sample(masks, pixel_centre_points(4, 5))
    assert torch.equal(got, masks.flatten(2))


@pytest.mark.parametrize("num_frames,scale", [(1, 2.0), (2, 2.0), (1, 8.0)])
def test_cost_matrix_matches_slow_reference(num_frames, scale):
    """scale 8: confident logits (up to about 30), where the BCE's softplus comes from a sigmoid near 0 or 1."""
    gen = torch.Generator().manual_seed(num_frames)
    q, n, c, h, w = 5, 3, 4, 6, 7
    class_logits = torch.randn(q, c + 1, generator=gen)
    mask_logits = scale * torch.randn(q, num_frames, h, w, generator=gen)
    target = _targets(n, num_frames, h, w, c, gen)
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0)
    got = matcher.cost_matrix(class_logits, mask_logits, target, pixel_centre_points(h, w))
    torch.testing.assert_close(got.double(), _slow_cost(class_logits, mask_logits, target), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed,q,n,t", [(0, 6, 4, 1), (1, 4, 4, 2), (2, 5, 2, 2), (3, 3, 1, 1), (4, 6, 3, 2)])
def test_assignment_matches_brute_force(seed, q, n, t):
    gen = torch.Generator().manual_seed(seed)
    c, h, w = 3, 5, 5
    class_logits = torch.randn(2, q, c + 1, generator=gen)
    mask_logits = 3 * torch.randn(2, q, t, h, w, generator=gen)
    targets = [_targets(n, t, h, w, c, gen) for _ in range(2)]
    matcher = HungarianMatcher()
    got = matcher(class_logits, mask_logits, targets, points=pixel_centre_points(h, w))
    for b, (rows, cols) in enumerate(got):
        slow = _slow_cost(class_logits[b], mask_logits[b], targets[b])
        best, best_rows = math.inf, None
        for perm in itertools.permutations(range(q), n):  # query perm[j] takes target j
            total = sum(slow[perm[j], j].item() for j in range(n))
            if total < best:
                best, best_rows = total, perm
        assert len(rows) == len(cols) == n
        assert torch.all(rows[1:] > rows[:-1]), "query indices must be sorted"
        total = sum(slow[r, c].item() for r, c in zip(rows.tolist(), cols.tolist()))
        assert total == pytest.approx(best, abs=1e-5)
        assert {int(r): int(c) for r, c in zip(rows, cols)} == {best_rows[j]: j for j in range(n)}


def test_empty_targets_and_random_points():
    gen = torch.Generator().manual_seed(0)
    matcher = HungarianMatcher(num_points=50)
    class_logits = torch.randn(2, 4, 3)
    mask_logits = torch.randn(2, 4, 2, 8, 8)
    empty = MatchTargets(
        labels=torch.zeros(0, dtype=torch.long),
        masks=torch.zeros(0, 2, 32, 32, dtype=torch.bool),
        track_ids=torch.zeros(0, dtype=torch.long),
    )
    full = _targets(6, 2, 32, 32, 2, gen)  # more targets than queries: every query is used
    (r0, c0), (r1, c1) = matcher(class_logits, mask_logits, [empty, full])
    assert r0.numel() == c0.numel() == 0
    assert sorted(r1.tolist()) == [0, 1, 2, 3] and len(set(c1.tolist())) == 4


def test_a_seeded_clip_samples_the_same_points_in_any_batch():
    """With a seed, a clip's match does not depend on the other clips or the global generator."""
    gen = torch.Generator().manual_seed(1)
    matcher = HungarianMatcher(num_points=30)
    seeded = dataclasses.replace(_targets(3, 2, 16, 16, 4, gen), seed=42)
    other = _targets(2, 2, 16, 16, 4, gen)
    logits, masks = torch.randn(2, 5, 5, generator=gen), 0.3 * torch.randn(2, 5, 2, 4, 4, generator=gen)
    torch.manual_seed(0)
    alone = matcher(logits[1:], masks[1:], [seeded])[0]
    torch.manual_seed(1)
    together = matcher(logits, masks, [other, seeded])[1]
    assert all(torch.equal(a, b) for a, b in zip(alone, together))


def test_label_out_of_vocabulary_is_reported():
    matcher = HungarianMatcher(num_points=10)
    bad = MatchTargets(labels=torch.tensor([7]), masks=torch.ones(1, 1, 4, 4, dtype=torch.bool), track_ids=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"\[7\] out of range for 2 classes"):
        matcher(torch.randn(1, 3, 3), torch.randn(1, 3, 1, 4, 4), [bad])


def test_prediction_sets_costed_together_or_one_at_a_time_match_alike(monkeypatch):
    """match_sets costs as many prediction sets at once as fit a memory budget; with a budget
    of one set at a time, every set and clip is matched the same."""
    import omgseg.model.matcher as matcher_module

    gen = torch.Generator().manual_seed(3)
    matcher = HungarianMatcher(num_points=40)
    targets = [dataclasses.replace(_targets(3, 2, 16, 16, 4, gen), seed=7 + i) for i in range(2)]
    sets = [(torch.randn(2, 5, 5, generator=gen), torch.randn(2, 5, 2, 8, 8, generator=gen)) for _ in range(4)]
    together = matcher.match_sets(sets, targets)
    monkeypatch.setattr(matcher_module, "_SAMPLED_ELEMENTS", 1)
    alone = matcher.match_sets(sets, targets)
    for s in range(len(sets)):
        for i in range(len(targets)):
            assert all(torch.equal(a, b) for a, b in zip(together[s][i], alone[s][i])), (s, i)
