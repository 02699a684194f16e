"""Losses: perfect vs wrong predictions, hand-computed dice, the void weight, non-finite totals."""

import pytest
import torch
import torch.nn.functional as F

from omgseg.model.criterion import (
    LossWeights,
    SetCriterion,
    dice_loss,
    loss_values,
    sample_uncertain_points,
)
from omgseg.model.matcher import HungarianMatcher
from omgseg.model.structures import MatchTargets, QueryOutputs

BIG = 30.0  # a logit whose sigmoid is 1 (or 0) to float precision


def _outputs(class_logits, mask_logits, num_object_queries, num_sets=1) -> QueryOutputs:
    """A hand-made prediction set (the decoder is not involved), with num_sets - 1 identical aux sets."""
    b, q = mask_logits.shape[:2]
    valid = torch.ones(b, q - num_object_queries, dtype=torch.bool)

    def one() -> QueryOutputs:
        return QueryOutputs(mask_logits, class_logits, torch.zeros(b, q, 4), num_object_queries, valid)

    out = one()
    out.aux = [one() for _ in range(num_sets - 1)]
    return out


def _boundary_free_targets() -> MatchTargets:
    """Two tubes of T = 2 frames, each whole-frame in one frame and absent in the other.

    No mask has a spatial edge, so bilinear point sampling reads exact 0/1 values and a
    perfect prediction has (near) zero mask loss.
    """
    masks = torch.zeros(2, 2, 16, 16, dtype=torch.bool)
    masks[0, 0] = True
    masks[1, 1] = True
    return MatchTargets(labels=torch.tensor([2, 0]), masks=masks, track_ids=torch.tensor([5, 6]),
                        prompt_masks=masks[[1]].clone())


def _criterion(**weights) -> SetCriterion:
    return SetCriterion(HungarianMatcher(num_points=64), LossWeights(**weights), num_points=64)


def _perfect_logits(target: MatchTargets, num_object_queries: int, num_classes: int):
    """Queries 0, 1 predict the two targets exactly (mask at 4x lower resolution); query 2 is void; then the prompt."""
    masks = torch.stack([target.masks[0], target.masks[1], torch.zeros_like(target.masks[0]), target.prompt_masks[0]])
    mask_logits = torch.where(masks[:, :, ::4, ::4], BIG, -BIG)[None]  # (1, 4, T, 4, 4)
    class_logits = torch.full((1, 4, num_classes + 1), -BIG)
    class_logits[0, 0, 2] = class_logits[0, 1, 0] = class_logits[0, 2, num_classes] = BIG
    return class_logits, mask_logits


def test_perfect_predictions_give_near_zero_loss_and_wrong_ones_do_not():
    torch.manual_seed(0)
    target = _boundary_free_targets()
    class_logits, mask_logits = _perfect_logits(target, 3, num_classes=3)
    losses = _criterion()(_outputs(class_logits, mask_logits, 3, num_sets=3), [target])
    assert set(losses) == {
        f"loss_{n}{s}" for n in ("ce", "mask", "dice", "prompt_mask", "prompt_dice") for s in ("", "_aux0", "_aux1")
    } | {"loss_zero_anchor"}
    for name, value in losses.items():
        assert value.item() == pytest.approx(0.0, abs=1e-4), name

    # Swap the two object masks (classes stay): the matcher must pick class or mask; either way it costs.
    wrong_masks = mask_logits.clone()
    wrong_masks[0, [0, 1]] = mask_logits[0, [1, 0]]
    wrong_masks[0, 3] = -mask_logits[0, 3]  # and invert the prompt's mask
    wrong = _criterion()(_outputs(class_logits, wrong_masks, 3), [target])
    assert wrong["loss_ce"] + wrong["loss_mask"] + wrong["loss_dice"] > 1.0
    assert wrong["loss_prompt_mask"] > 1.0 and wrong["loss_prompt_dice"] > 1.0


def test_dice_by_hand():
    # p = [0.5, 0.5, 1, 0], y = [1, 0, 1, 0]: inter 1.5, sum p 2, sum y 2 -> 1 - (3 + 1) / (4 + 1) = 0.2
    pred = torch.tensor([[[0.0, 0.0, BIG, -BIG]]])
    target = torch.tensor([[[1.0, 0.0, 1.0, 0.0]]])
    assert dice_loss(pred, target).item() == pytest.approx(0.2, abs=1e-6)
    # Two frames are averaged: the second frame is perfect (absent and predicted absent) -> 0.1.
    pred2 = torch.cat([pred, torch.full_like(pred, -BIG)], dim=1)
    target2 = torch.cat([target, torch.zeros_like(target)], dim=1)
    assert dice_loss(pred2, target2).item() == pytest.approx(0.1, abs=1e-6)


def test_void_weight_scales_unmatched_queries():
    torch.manual_seed(0)
    target = _boundary_free_targets()
    class_logits, mask_logits = _perfect_logits(target, 3, num_classes=3)
    class_logits = torch.randn(1, 4, 4)  # classes are now uncertain; masks still decide the matching
    for void in (0.1, 1.0):
        losses = _criterion(void_class=void, class_ce=1.0)(_outputs(class_logits, mask_logits, 3), [target])
        ce = F.cross_entropy(class_logits[0, :3], torch.tensor([2, 0, 3]), reduction="none")
        expected = (ce[0] + ce[1] + void * ce[2]) / (2 + void)
        assert losses["loss_ce"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_importance_sampling_prefers_uncertain_points():
    torch.manual_seed(0)
    ramp = (torch.arange(16) + 0.5) / 16 - 0.5
    logits = (40 * ramp).expand(1, 1, 16, 16)  # uncertainty grows towards the edge at x = 0.5
    coords = sample_uncertain_points(logits, num_points=100, oversample_ratio=3.0, importance_sample_ratio=0.75)
    assert coords.shape == (1, 100, 2)
    # 75 of 300 uniform candidates are kept: those within about 0.125 of the edge.
    near_edge = ((coords[0, :, 0] - 0.5).abs() < 0.15).float()
    assert near_edge[:75].mean() > 0.95  # the importance-sampled 75 %
    assert near_edge[75:].mean() < 0.6  # the uniform rest (expected 0.3)


def test_non_finite_total_raises_with_the_loss_dict():
    target = _boundary_free_targets()
    class_logits, mask_logits = _perfect_logits(target, 3, num_classes=3)
    mask_logits = mask_logits.clone()
    mask_logits[0, 3] = float("nan")  # the prompt query: not matched, so only the loss sees it
    with pytest.raises(FloatingPointError, match=r"^non-finite loss: loss_ce=0, .*loss_prompt_mask=nan, .*loss_zero_anchor=0$"):
        _criterion()(_outputs(class_logits, mask_logits, 3), [target])
    # check_finite=False leaves the check (and the read from the device) to the caller.
    losses = _criterion()(_outputs(class_logits, mask_logits, 3), [target], check_finite=False)
    with pytest.raises(FloatingPointError, match=r"loss_prompt_dice=nan"):
        loss_values(losses)


def test_prompt_count_must_match_prompt_masks():
    target = _boundary_free_targets()
    class_logits, mask_logits = _perfect_logits(target, 3, num_classes=3)
    with pytest.raises(ValueError, match="2 prompt queries but 1 prompt masks"):
        _criterion()(_outputs(class_logits, mask_logits[:, [0, 1, 3, 3]], 2), [target])


def test_clips_without_object_supervision_get_no_class_loss():
    """A VOS clip (prompted objects only) must not push its object queries towards void."""
    torch.manual_seed(0)
    criterion = SetCriterion(HungarianMatcher(num_points=16), LossWeights(), num_points=16)
    b, q, t, c = 1, 4, 1, 3
    masks = torch.zeros(1, t, 8, 8, dtype=torch.bool)
    masks[0, :, 2:6, 2:6] = True
    targets = [MatchTargets(labels=torch.zeros(0, dtype=torch.long), masks=masks[:0],
                            track_ids=torch.zeros(0, dtype=torch.long), supervise_objects=False)]
    outputs = QueryOutputs(
        mask_logits=torch.randn(b, q, t, 8, 8, requires_grad=True),
        class_logits=torch.randn(b, q, c + 1, requires_grad=True),
        id_embeddings=torch.randn(b, q, 8),
        num_object_queries=q,
        prompt_valid=torch.zeros(b, 0, dtype=torch.bool),
    )
    losses = criterion(outputs, targets)
    assert float(losses["loss_ce"].detach()) == 0.0
    sum(losses.values()).backward()
    assert float(outputs.class_logits.grad.abs().sum()) == 0.0
    with pytest.raises(ValueError, match="supervise_objects=False must have no object targets, got 1"):
        MatchTargets(labels=torch.zeros(1, dtype=torch.long), masks=masks, track_ids=torch.zeros(1, dtype=torch.long),
                     supervise_objects=False)


def test_a_seeded_clip_draws_its_points_from_its_own_generator():
    """Common random numbers: with `seed` set, the losses of a clip do not depend on the global
    generator (what else ran before), and they change with the seed."""
    import dataclasses

    gen = torch.Generator().manual_seed(3)
    target = dataclasses.replace(_boundary_free_targets(), seed=11)
    class_logits = torch.randn(1, 4, 4, generator=gen)
    mask_logits = torch.randn(1, 4, 2, 4, 4, generator=gen)
    outputs = _outputs(class_logits, mask_logits, num_object_queries=3, num_sets=2)

    def losses(target, global_seed):
        torch.manual_seed(global_seed)
        return {k: float(v) for k, v in _criterion()(outputs, [target]).items()}

    assert losses(target, 0) == losses(target, 1)
    assert losses(target, 0) != losses(dataclasses.replace(target, seed=12), 0)
    unseeded = dataclasses.replace(target, seed=None)
    assert losses(unseeded, 0) != losses(unseeded, 1)


def test_the_last_set_alone_has_the_same_terms_as_in_the_full_loss():
    """final_only skips the earlier sets' matching; each set draws its own points, so the last
    set's terms are bit-identical to the full loss's unsuffixed terms."""
    import dataclasses

    gen = torch.Generator().manual_seed(4)
    target = dataclasses.replace(_boundary_free_targets(), seed=7)
    outputs = _outputs(torch.randn(1, 4, 4, generator=gen), torch.randn(1, 4, 2, 4, 4, generator=gen), 3)
    outputs.aux = [_outputs(torch.randn(1, 4, 4, generator=gen), torch.randn(1, 4, 2, 4, 4, generator=gen), 3)
                   for _ in range(2)]
    full = _criterion()(outputs, [target])
    last = _criterion()(outputs, [target], final_only=True)
    assert set(last) == {k for k in full if "_aux" not in k} and len(full) > len(last)
    for key, value in last.items():
        assert torch.equal(value, full[key]), key
