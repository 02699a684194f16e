"""Training losses: matched object queries (class + mask) and prompt queries (mask only), on every prediction set.

Returned as a named dict of WEIGHTED losses; the training step sums them. Keys, for the last
prediction set and for each earlier set i (0 = the initial queries, before any layer):

    loss_ce, loss_mask, loss_dice, loss_prompt_mask, loss_prompt_dice
    loss_ce_aux{i}, loss_mask_aux{i}, ... (one of each per earlier set)
    loss_zero_anchor   (always exactly 0; see SetCriterion.__call__)

The same keys come out for every batch (prompt losses are 0 without prompts), so logged
losses line up across workers and steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from omgseg.model.matcher import HungarianMatcher, clip_generator
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
    n = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    coords = torch.rand(n, num_sampled, 2, device=logits.device, generator=generator)
    uncertainty = -_sample(logits, coords).abs()  # (N, 1, num_sampled)
    num_uncertain = int(importance_sample_ratio * num_points)
    top = uncertainty[:, 0].topk(num_uncertain, dim=1).indices  # (N, num_uncertain)
    uncertain = torch.gather(coords, 1, top[..., None].expand(-1, -1, 2))
    uniform = torch.rand(n, num_points - num_uncertain, 2, device=logits.device, generator=generator)
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


def _global_mean_count(count: int, device: torch.device, across_workers: bool = True) -> float:
    """The per-worker average of a count across DDP workers (>= 1), as Mask2Former normalises;
    this worker's own count when not `across_workers`."""
    total = torch.tensor(float(count), device=device)
    if across_workers and dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        total = total / dist.get_world_size()
    return max(float(total), 1.0)


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
                 final_only: bool = False) -> dict[str, Tensor]:
        """Weighted losses of all prediction sets; raises FloatingPointError if their sum is not finite.
        across_workers=False: no collective (a loss that one worker computes alone, such as a
        validation loss on rank 0, must not wait for the others). final_only=True: only the last
        set's terms (what inference uses), with the same values: each set draws its own points,
        so skipping the earlier sets changes nothing in the last one, and saves their matching."""
        b = outputs.mask_logits.shape[0]
        if len(targets) != b:
            raise ValueError(f"got {len(targets)} targets for {b} clips")
        for i, tgt in enumerate(targets):
            if tgt.num_frames != outputs.num_frames:
                raise ValueError(
                    f"clip {i}: targets have {tgt.num_frames} frames, predictions {outputs.num_frames}"
                )
            num_valid = int(outputs.prompt_valid[i].sum())
            if tgt.num_prompts != num_valid:
                raise ValueError(
                    f"clip {i}: {num_valid} prompt queries but {tgt.num_prompts} prompt masks"
                )
        device = outputs.mask_logits.device
        num_masks = _global_mean_count(sum(t.labels.numel() for t in targets), device, across_workers)
        num_prompts = _global_mean_count(sum(t.num_prompts for t in targets), device, across_workers)

        losses: dict[str, Tensor] = {}
        sets = [(f"_aux{i}", aux) for i, aux in enumerate(outputs.aux)] + [("", outputs)]
        for stage, (suffix, pred) in enumerate(sets):
            if final_only and suffix:
                continue
            for name, value in self._set_losses(pred, targets, num_masks, num_prompts, stage).items():
                losses[name + suffix] = value
        # Zero-weighted term: outputs.unused_parameter_sum depends on the decoder parameters
        # no loss reaches in this pass (the prompt encoder in a batch without prompts). Under
        # DDP every worker must produce a gradient for every parameter or the all-reduce waits
        # forever; co-training workers see different tasks in the same step. Adding it at
        # weight 0 gives those parameters zero gradients.
        anchor = outputs.unused_parameter_sum
        losses["loss_zero_anchor"] = 0.0 * anchor if anchor is not None else outputs.mask_logits.new_zeros(())

        total = sum(losses.values())
        if not torch.isfinite(total):
            shown = {k: float(v.detach()) for k, v in losses.items()}
            raise FloatingPointError(f"non-finite total loss {float(total.detach())}; losses: {shown}")
        return losses

    def _set_losses(
        self, pred: QueryOutputs, targets: list[MatchTargets], num_masks: float, num_prompts: float, stage: int
    ) -> dict[str, Tensor]:
        """Weighted losses of one prediction set (keys without suffix); `stage` numbers the set
        in the clips' own random draws."""
        w = self.weights
        no = pred.num_object_queries
        class_logits = pred.class_logits[:, :no]  # (B, No, C+1)
        obj_masks = pred.mask_logits[:, :no]  # (B, No, T, h, w)
        indices = self.matcher(class_logits, obj_masks, targets, stage=stage)

        # Classification: matched queries take their target's class, all others void.
        num_classes = class_logits.shape[-1] - 1
        target_classes = torch.full(class_logits.shape[:2], num_classes, dtype=torch.long, device=class_logits.device)
        for i, ((rows, cols), tgt) in enumerate(zip(indices, targets)):
            target_classes[i, rows.to(class_logits.device)] = tgt.labels[cols].to(class_logits.device)
            if not tgt.supervise_objects:
                target_classes[i] = -100  # cross_entropy's ignore_index: no class loss at all
        class_weight = torch.ones(num_classes + 1, device=class_logits.device, dtype=class_logits.dtype)
        class_weight[-1] = w.void_class
        if bool((target_classes != -100).any()):
            loss_ce = F.cross_entropy(class_logits.transpose(1, 2), target_classes, weight=class_weight)
        else:
            loss_ce = class_logits.sum() * 0.0  # no clip supervises objects: keep the graph connected

        # Masks of matched pairs, clip by clip (each clip samples its points from its own generator).
        device = obj_masks.device
        matched = [(obj_masks[i, rows.to(device)], t.masks[cols.to(t.masks.device)].to(device),
                    clip_generator(t, device, "mask", stage)) for i, ((rows, cols), t) in enumerate(zip(indices, targets))]
        loss_mask, loss_dice = self._mask_losses(matched, num_masks)

        # Prompt queries: query k is trained on prompt mask k, no matching, no class.
        prompted = []
        for i, t in enumerate(targets):
            if t.prompt_masks is not None and t.num_prompts > 0:
                valid = pred.prompt_valid[i].nonzero().squeeze(1)  # (K_i,) padded prompts are last
                prompted.append((pred.mask_logits[i, no + valid], t.prompt_masks.to(device),
                                 clip_generator(t, device, "prompt", stage)))
        if prompted:
            loss_prompt_mask, loss_prompt_dice = self._mask_losses(prompted, num_prompts)
        else:
            loss_prompt_mask = loss_prompt_dice = pred.mask_logits.new_zeros(())

        return {
            "loss_ce": w.class_ce * loss_ce,
            "loss_mask": w.mask_bce * loss_mask,
            "loss_dice": w.mask_dice * loss_dice,
            "loss_prompt_mask": w.prompt_bce * loss_prompt_mask,
            "loss_prompt_dice": w.prompt_dice * loss_prompt_dice,
        }

    def _mask_losses(
        self, pairs: list[tuple[Tensor, Tensor, torch.Generator | None]], normaliser: float
    ) -> tuple[Tensor, Tensor]:
        """Per clip (src (M, T, h, w) logits, tgt (M, T, H, W) bool, its generator) -> (BCE,
        dice) summed over all M / normaliser."""
        bce = dice = pairs[0][0].sum() * 0.0  # keeps the graph connected when no clip has targets
        for src, tgt, generator in pairs:
            if src.shape[0] == 0:
                continue
            m, t, h, w = src.shape
            src_frames = src.reshape(m * t, 1, h, w)
            tgt_frames = tgt.reshape(m * t, 1, *tgt.shape[-2:]).to(src.dtype)
            with torch.no_grad():
                coords = sample_uncertain_points(
                    src_frames.detach(), self.num_points, self.oversample_ratio, self.importance_sample_ratio, generator
                )  # (M*T, K, 2)
                tgt_points = _sample(tgt_frames, coords).view(m, t, -1)  # (M, T, K)
            src_points = _sample(src_frames, coords).view(m, t, -1)  # (M, T, K)
            bce = bce + sigmoid_bce_loss(src_points, tgt_points).sum() / normaliser
            dice = dice + dice_loss(src_points, tgt_points).sum() / normaliser
        return bce, dice
