"""Training losses: matched object queries (class + mask) and prompt queries (mask only), on every prediction set.

Returned as a named dict of WEIGHTED losses; the training step sums them. Keys, for the last
prediction set and for each earlier set i (0 = the initial queries, before any layer):

    loss_ce, loss_mask, loss_dice, loss_prompt_mask, loss_prompt_dice
    loss_ce_aux{i}, loss_mask_aux{i}, ... (one of each per earlier set)
    loss_zero_anchor   (always exactly 0; see SetCriterion.__call__)

The same keys come out for every batch (prompt losses are 0 without prompts), so logged
losses line up across workers and steps.

Losses are computed in float32 even under autocast, and without the host waiting for the
device: the matcher's one transfer of all cost matrices is the only read-back (the Hungarian
algorithm runs on the host), and every prediction set's mask losses are computed in one batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from omgseg.model.matcher import HungarianMatcher, clip_generator
from omgseg.model.precision import full_precision
from omgseg.model.structures import MatchTargets, QueryOutputs


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms (docs/reference.md, 'Training')."""

    class_ce: float = 2.0
    mask_bce: float = 5.0
    mask_dice: float = 5.0
    prompt_bce: float = 5.0  # prompt masks are weighted as object masks
    prompt_dice: float = 5.0
    void_class: float = 0.1  # CE weight of the void target of unmatched queries: most queries are void


def sample_uncertain_points(
    logits: Tensor, num_points: int, oversample_ratio: float, importance_sample_ratio: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """PointRend's training points: mostly where the prediction is uncertain, the rest uniform.

    logits: (N, 1, h, w). Draws num_points * oversample_ratio uniform points, keeps the
    importance_sample_ratio * num_points with the highest uncertainty -|logit|, and adds
    uniform points up to num_points. Returns (N, num_points, 2) in [0, 1]^2 (x, y).
    generator: where the uniform draws come from (None: the global generator).
    """
    num_uncertain = int(importance_sample_ratio * num_points)
    candidates, uniform = _draw_points(logits.shape[0], num_points, oversample_ratio, num_uncertain, logits.device, generator)
    return _most_uncertain(logits, candidates, uniform, num_uncertain)


def _draw_points(n: int, num_points: int, oversample_ratio: float, num_uncertain: int, device: torch.device,
                 generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """`sample_uncertain_points`' random draws for n masks, in its order: the candidates
    (n, num_points * oversample_ratio, 2), then the uniform rest (n, num_points - num_uncertain, 2)."""
    candidates = torch.rand(n, int(num_points * oversample_ratio), 2, device=device, generator=generator)
    uniform = torch.rand(n, num_points - num_uncertain, 2, device=device, generator=generator)
    return candidates, uniform


def _most_uncertain(logits: Tensor, candidates: Tensor, uniform: Tensor, num_uncertain: int) -> Tensor:
    """logits (N, 1, h, w) -> per mask its num_uncertain most uncertain candidates, then the
    uniform points: (N, num_uncertain + uniform points, 2)."""
    uncertainty = -_sample(logits, candidates).abs()  # (N, 1, num_candidates)
    # Unsorted: which points are kept matters, not their order (the losses average over them).
    top = uncertainty[:, 0].topk(num_uncertain, dim=1, sorted=False).indices  # (N, num_uncertain)
    uncertain = torch.gather(candidates, 1, top[..., None].expand(-1, -1, 2))
    return torch.cat([uncertain, uniform], dim=1)


def _sample(masks: Tensor, coords: Tensor) -> Tensor:
    """Bilinear values of masks (N, C, h, w) at per-mask points (N, K, 2) in [0, 1]^2 -> (N, C, K).

    Border padding, as matcher.point_sample: no made-up zeros outside the image.
    """
    grid = (2.0 * coords - 1.0).to(masks.dtype)[:, None]  # (N, 1, K, 2)
    return F.grid_sample(masks, grid, mode="bilinear", padding_mode="border", align_corners=False)[:, :, 0]


def sigmoid_bce_loss(pred: Tensor, target: Tensor) -> Tensor:
    """pred (M, T, K) logits, target (M, T, K) in [0, 1] -> (M,): mean over points, then over frames."""
    return F.binary_cross_entropy_with_logits(pred, target, reduction="none").mean(dim=(1, 2))


def dice_loss(pred: Tensor, target: Tensor) -> Tensor:
    """pred (M, T, K) logits, target (M, T, K) in [0, 1] -> (M,).

    Per frame 1 - (2 sum(p y) + 1) / (sum p + sum y + 1), averaged over frames; the +1 makes
    an absent object predicted absent cost 0.
    """
    prob = pred.sigmoid()
    inter = (prob * target).sum(-1)  # (M, T)
    return (1 - (2 * inter + 1) / (prob.sum(-1) + target.sum(-1) + 1)).mean(-1)


def loss_values(losses: Mapping[str, Tensor]) -> dict[str, float]:
    """The loss terms as floats, read from the device in one transfer; a FloatingPointError
    naming every term when one is not finite."""
    values = torch.stack([v.detach().float() for v in losses.values()]).cpu().tolist() if losses else []
    terms = dict(zip(losses, values))
    if not all(math.isfinite(v) for v in values):
        raise FloatingPointError("non-finite loss: " + ", ".join(f"{k}={v:.4g}" for k, v in terms.items()))
    return terms


def _mean_count(count: int, device: torch.device, across_workers: bool = True) -> float | Tensor:
    """The per-worker average of a count across DDP workers (at least 1), as Mask2Former
    normalises; this worker's own count when not `across_workers` or not distributed. The
    distributed average stays on the device: reading it would make the host wait."""
    if across_workers and dist.is_available() and dist.is_initialized():
        total = torch.full((), float(count), device=device)  # filled on the device, not copied from the host
        dist.all_reduce(total)
        return (total / dist.get_world_size()).clamp(min=1.0)
    return max(float(count), 1.0)


@dataclass(frozen=True)
class _MaskPairs:
    """Predicted tubes and the tubes they are trained on, for the batched mask losses: src
    (M, T, h, w) logits, tgt (M, T, H, W) bool, the clip's generator for its points."""

    src: Tensor
    tgt: Tensor
    generator: torch.Generator | None


class SetCriterion:
    """Mask2Former's set losses on object queries plus unmatched mask losses on prompt queries.

    Object queries: Hungarian matching (per prediction set) to the targets; CE over C + 1
    classes for all object queries (unmatched -> void, weighted void_class); BCE and dice on
    matched pairs at num_points importance-sampled points per frame. Prompt query k of a clip
    is supervised by that clip's prompt_masks[k], class-agnostic (mask losses only). Mask
    losses average over frames (so image-tuned weights hold for any T) and are divided by the
    number of targets (prompts), averaged over workers.
    """

    def __init__(
        self,
        matcher: HungarianMatcher,
        weights: LossWeights,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ) -> None:
        if not 0.0 <= importance_sample_ratio <= 1.0 or oversample_ratio < 1.0:
            raise ValueError(
                f"need 0 <= importance_sample_ratio <= 1 and oversample_ratio >= 1, got "
                f"{importance_sample_ratio} and {oversample_ratio}"
            )
        self.matcher = matcher
        self.weights = weights
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio

    def __call__(self, outputs: QueryOutputs, targets: list[MatchTargets], across_workers: bool = True, *,
                 final_only: bool = False, check_finite: bool = True) -> dict[str, Tensor]:
        """Weighted losses of all prediction sets, in float32.

        across_workers=False: no collective (a loss that one worker computes alone, such as a
        validation loss on rank 0, must not wait for the others). final_only=True: only the last
        set's terms (what inference uses), with the same values: each set draws its own points,
        so skipping the earlier sets changes nothing in the last one, and saves their matching.
        check_finite: raise FloatingPointError naming every term if one is not finite. That
        reads the terms back from the device; the training step passes False and checks once
        its update is queued (`loss_values`)."""
        self._check(outputs, targets)
        device = outputs.mask_logits.device
        num_masks = _mean_count(sum(t.labels.numel() for t in targets), device, across_workers)
        num_prompts = _mean_count(sum(t.num_prompts for t in targets), device, across_workers)
        sets = [*outputs.aux, outputs]
        first = len(sets) - 1 if final_only else 0  # set s draws its points as stage s
        suffixes = [f"_aux{i}" for i in range(len(outputs.aux))] + [""]
        no = outputs.num_object_queries

        losses: dict[str, Tensor] = {}
        with full_precision(device):  # model/precision.py
            matches = self.matcher.match_sets(
                [(p.class_logits[:, :no], p.mask_logits[:, :no]) for p in sets[first:]], targets, first_stage=first)
            masks = self._mask_losses(sets[first:], matches, targets, first)
            w = self.weights
            for k, (pred, match) in enumerate(zip(sets[first:], matches)):
                suffix = suffixes[first + k]
                (bce, dice), (prompt_bce, prompt_dice) = masks[k]
                losses["loss_ce" + suffix] = w.class_ce * self._class_loss(pred.class_logits[:, :no], match, targets)
                losses["loss_mask" + suffix] = w.mask_bce * bce / num_masks
                losses["loss_dice" + suffix] = w.mask_dice * dice / num_masks
                losses["loss_prompt_mask" + suffix] = w.prompt_bce * prompt_bce / num_prompts
                losses["loss_prompt_dice" + suffix] = w.prompt_dice * prompt_dice / num_prompts
        # Zero-weighted term: outputs.unused_parameter_sum depends on the decoder parameters
        # no loss reaches in this pass (the prompt encoder in a batch without prompts). Under
        # DDP every worker must produce a gradient for every parameter or the all-reduce waits
        # forever; co-training workers see different tasks in the same step. Adding it at
        # weight 0 gives those parameters zero gradients.
        anchor = outputs.unused_parameter_sum
        losses["loss_zero_anchor"] = 0.0 * anchor if anchor is not None else outputs.mask_logits.new_zeros((), dtype=torch.float32)
        if check_finite:
            loss_values(losses)
        return losses

    @staticmethod
    def _check(outputs: QueryOutputs, targets: list[MatchTargets]) -> None:
        b = outputs.mask_logits.shape[0]
        if len(targets) != b:
            raise ValueError(f"got {len(targets)} targets for {b} clips")
        for i, (tgt, num_valid) in enumerate(zip(targets, outputs.prompt_counts)):
            if tgt.num_frames != outputs.num_frames:
                raise ValueError(f"clip {i}: targets have {tgt.num_frames} frames, predictions {outputs.num_frames}")
            if tgt.num_prompts != num_valid:
                raise ValueError(f"clip {i}: {num_valid} prompt queries but {tgt.num_prompts} prompt masks")

    def _class_loss(self, class_logits: Tensor, match: list[tuple[Tensor, Tensor]], targets: list[MatchTargets]) -> Tensor:
        """CE over C + 1 classes of one set's object queries (B, No, C + 1): matched queries take
        their target's class, all others void; no loss for clips that do not supervise objects."""
        device = class_logits.device
        num_classes = class_logits.shape[-1] - 1
        if not any(t.supervise_objects for t in targets):
            return class_logits.sum() * 0.0  # keeps the graph connected
        target_classes = torch.full(class_logits.shape[:2], num_classes, dtype=torch.long, device=device)
        for i, ((rows, cols), tgt) in enumerate(zip(match, targets)):
            if not tgt.supervise_objects:
                target_classes[i] = -100  # cross_entropy's ignore_index: no class loss at all
            elif rows.numel():
                cols = cols.to(tgt.labels.device, non_blocking=True)
                target_classes[i, rows.to(device, non_blocking=True)] = tgt.labels[cols].to(device, non_blocking=True)
        class_weight = torch.ones(num_classes + 1, device=device)
        class_weight[-1] = self.weights.void_class
        return F.cross_entropy(class_logits.float().transpose(1, 2), target_classes, weight=class_weight)

    def _mask_losses(self, sets: list[QueryOutputs], matches: list[list[tuple[Tensor, Tensor]]],
                     targets: list[MatchTargets], first: int) -> list[tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]]:
        """Per set ((BCE, dice) summed over matched object pairs, (BCE, dice) summed over
        prompts), not yet normalised. Every set's and clip's pairs are sampled and scored in
        one batch; each clip still draws its points from its own generator (its seed, "mask"
        or "prompt", the set), so a clip's losses do not depend on what else is in the batch."""
        groups: list[tuple[int, str, _MaskPairs]] = []
        for k, (pred, match) in enumerate(zip(sets, matches)):
            no = pred.num_object_queries
            device = pred.mask_logits.device
            for i, ((rows, cols), t) in enumerate(zip(match, targets)):
                if rows.numel():
                    src = pred.mask_logits[i, rows.to(device, non_blocking=True)]
                    tgt = t.masks[cols.to(t.masks.device, non_blocking=True)]
                    groups.append((k, "mask", _MaskPairs(src, tgt, clip_generator(t, device, "mask", first + k))))
            for i, t in enumerate(targets):
                if t.num_prompts:
                    src = pred.mask_logits[i, no:no + t.num_prompts]  # padded prompts come last
                    groups.append((k, "prompt", _MaskPairs(src, t.prompt_masks, clip_generator(t, device, "prompt", first + k))))

        sums: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}
        for (k, kind, _), (bce, dice) in zip(groups, self._score_pairs([g for *_, g in groups]) if groups else []):
            before = sums.get((k, kind))
            sums[(k, kind)] = (bce, dice) if before is None else (before[0] + bce, before[1] + dice)
        out = []
        for k, pred in enumerate(sets):
            no_pairs = pred.mask_logits[:, :0].float().sum()  # a zero that keeps the graph connected
            no_prompts = pred.mask_logits.new_zeros((), dtype=torch.float32)
            out.append((sums.get((k, "mask"), (no_pairs, no_pairs)), sums.get((k, "prompt"), (no_prompts, no_prompts))))
        return out

    def _score_pairs(self, groups: list[_MaskPairs]) -> list[tuple[Tensor, Tensor]]:
        """Each group's (BCE, dice) summed over its tubes (each averaged over its frames), all
        groups' tubes sampled and scored together."""
        num_uncertain = int(self.importance_sample_ratio * self.num_points)
        frames = [g.src.shape[0] * g.src.shape[1] for g in groups]  # tube frames per group
        src = torch.cat([g.src.flatten(0, 1) for g in groups])[:, None].float()  # (R, 1, h, w)
        draws = [_draw_points(n, self.num_points, self.oversample_ratio, num_uncertain, src.device, g.generator)
                 for n, g in zip(frames, groups)]
        with torch.no_grad():
            coords = _most_uncertain(src.detach(), torch.cat([c for c, _ in draws]), torch.cat([u for _, u in draws]),
                                     num_uncertain)  # (R, K, 2)
            # Targets stay at input resolution, one group at a time.
            tgt = torch.cat([_sample(g.tgt.flatten(0, 1)[:, None].to(torch.float32), c)
                             for g, c in zip(groups, coords.split(frames))])  # (R, 1, K)
        pred = _sample(src, coords)  # (R, 1, K): every tube frame as a one-frame tube
        bce, dice = sigmoid_bce_loss(pred, tgt), dice_loss(pred, tgt)  # (R,)
        # A tube's loss is the mean over its T frames: the group's sum over its frames / T.
        return [(b.sum() / g.src.shape[1], d.sum() / g.src.shape[1])
                for g, b, d in zip(groups, bce.split(frames), dice.split(frames))]
