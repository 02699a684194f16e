"""Hungarian matching of object-query tubes to ground-truth tubes (Mask2Former, on whole tubes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from omgseg.core.seeds import derive_seed
from omgseg.model.structures import MatchTargets


def clip_generator(target: MatchTargets, device: torch.device, *keys: int | str) -> torch.Generator | None:
    """A generator of the clip's own (`target.seed`, then `keys`) on `device`; None when the
    clip has no seed (the global generator is used then)."""
    if target.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(derive_seed(target.seed, *keys))


def point_sample(masks: Tensor, points: Tensor) -> Tensor:
    """Bilinear values of masks at points given in [0, 1]^2 (x, y), the same points for every mask.

    masks: (N, T, h, w) float; points: (K, 2). Returns (N, T, K). With align_corners=False,
    point (j + 0.5) / w reads exactly pixel column j, at any mask resolution. Border padding:
    a point within half a pixel of the image edge reads the edge pixel instead of a blend with
    zeros outside the image (which would halve a full mask's value along the border).
    """
    n, t, h, w = masks.shape
    grid = (2.0 * points - 1.0).to(masks.dtype).view(1, 1, -1, 2)  # (1, 1, K, 2) in [-1, 1]
    sampled = F.grid_sample(masks.reshape(1, n * t, h, w), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return sampled.view(n, t, -1)  # (N, T, K)


def pixel_centre_points(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """(H*W, 2) the centres of every pixel, in [0, 1]^2: sampling there reads the masks exactly."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.flatten(), grid_y.flatten()], dim=-1)


def batch_sigmoid_bce_cost(pred: Tensor, target: Tensor) -> Tensor:
    """Pairwise BCE: pred (Q, T, K) logits, target (N, T, K) in [0, 1] -> (Q, N).

    Mean over the K points of each frame, summed over the T frames.
    """
    k = pred.shape[-1]
    pos = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred), reduction="none")  # (Q, T, K)
    neg = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none")
    # sum_t sum_k [pos * y + neg * (1 - y)], as matrix products over the flattened (T*K) axis.
    cost = pos.flatten(1) @ target.flatten(1).t() + neg.flatten(1) @ (1 - target).flatten(1).t()
    return cost / k


def batch_dice_cost(pred: Tensor, target: Tensor) -> Tensor:
    """Pairwise dice loss: pred (Q, T, K) logits, target (N, T, K) in [0, 1] -> (Q, N).

    Per frame: 1 - (2 sum(p y) + 1) / (sum p + sum y + 1), summed over frames. The +1 makes a
    frame where the object is absent and nothing is predicted cost 0.
    """
    prob = pred.sigmoid()
    inter = torch.einsum("qtk,ntk->qnt", prob, target)  # (Q, N, T)
    denom = prob.sum(-1)[:, None, :] + target.sum(-1)[None, :, :]  # (Q, N, T)
    return (1 - (2 * inter + 1) / (denom + 1)).sum(-1)


class HungarianMatcher:
    """One-to-one assignment of object queries to targets minimising

    cost = cost_class * (-p(target class)) + cost_mask * BCE + cost_dice * dice,

    with the mask costs on the SAME K points for predictions and targets, sampled uniformly in
    [0, 1]^2 per clip; a video tube uses the same points in every frame and sums the per-frame
    costs. Predictions at H/4 and targets at input resolution are compared at the same
    normalised points, so nothing is resized.
    """

    def __init__(
        self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0, num_points: int = 12544
    ) -> None:
        if num_points < 1:
            raise ValueError(f"num_points must be >= 1, got {num_points}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def cost_matrix(
        self, class_logits: Tensor, mask_logits: Tensor, target: MatchTargets, points: Tensor
    ) -> Tensor:
        """Costs of one clip: class_logits (Q, C+1), mask_logits (Q, T, h, w), points (K, 2) -> (Q, N)."""
        if mask_logits.shape[1] != target.num_frames:
            raise ValueError(
                f"predictions have {mask_logits.shape[1]} frames, targets {target.num_frames} "
                f"(masks {tuple(target.masks.shape)})"
            )
        num_classes = class_logits.shape[-1] - 1
        if target.labels.numel() > 0 and int(target.labels.max()) >= num_classes:
            raise ValueError(
                f"target labels {target.labels.tolist()} out of range for {num_classes} classes"
            )
        prob = class_logits.float().softmax(-1)  # (Q, C+1)
        cost_class = -prob[:, target.labels]  # (Q, N)
        pred = point_sample(mask_logits.float(), points)  # (Q, T, K)
        tgt = point_sample(target.masks.float(), points)  # (N, T, K)
        cost_mask = batch_sigmoid_bce_cost(pred, tgt)
        cost_dice = batch_dice_cost(pred, tgt)
        return self.cost_class * cost_class + self.cost_mask * cost_mask + self.cost_dice * cost_dice

    @torch.no_grad()
    def __call__(
        self,
        class_logits: Tensor,
        mask_logits: Tensor,
        targets: list[MatchTargets],
        points: Tensor | None = None,
        stage: int = 0,
    ) -> list[tuple[Tensor, Tensor]]:
        """Match B clips.

        class_logits (B, Q, C+1) and mask_logits (B, Q, T, h, w) of the OBJECT queries only.
        points: (K, 2) fixed points in [0, 1]^2 for every clip (tests, or exact costs with
            pixel_centre_points); None samples num_points uniform points per clip, from the
            clip's own generator (its seed and `stage`, the prediction set) when it has a seed.
        Returns per clip (query_indices, target_indices), int64 on CPU, sorted by query, of
        length min(Q, N).
        """
        b, q = class_logits.shape[:2]
        if mask_logits.shape[:2] != (b, q) or len(targets) != b:
            raise ValueError(
                f"class_logits {tuple(class_logits.shape)}, mask_logits {tuple(mask_logits.shape)} "
                f"and {len(targets)} targets disagree on (B, Q)"
            )
        indices = []
        for i, target in enumerate(targets):
            if target.labels.numel() == 0:
                empty = torch.zeros(0, dtype=torch.long)
                indices.append((empty, empty.clone()))
                continue
            clip_points = points
            if clip_points is None:
                clip_points = torch.rand(
                    self.num_points, 2, device=mask_logits.device,
                    generator=clip_generator(target, mask_logits.device, "match", stage),
                )
            cost = self.cost_matrix(class_logits[i], mask_logits[i], target, clip_points.to(mask_logits.device))
            if not torch.isfinite(cost).all():
                raise ValueError(f"matching cost of clip {i} is not finite: {cost}")
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
        return indices
