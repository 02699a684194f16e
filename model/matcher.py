"""Hungarian matching of object-query tubes to ground-truth tubes (Mask2Former, on whole tubes)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from omgseg.core.seeds import derive_seed
from omgseg.model.precision import full_precision
from omgseg.model.structures import MatchTargets


def clip_generator(target: MatchTargets, device: torch.device, *keys: int | str) -> torch.Generator | None:
    """A generator of the clip's own (`target.seed`, then `keys`) on `device`; None when the
    clip has no seed (the global generator is used then)."""
    if target.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(derive_seed(target.seed, *keys))


def point_sample(masks: Tensor, points: Tensor) -> Tensor:
    """Bilinear values of masks at points given in [0, 1]^2 (x, y), the same points for every mask.

    masks: (N, T, h, w) float, points: (K, 2) -> (N, T, K); or a batch of S such pairs,
    masks (S, N, T, h, w) and points (S, K, 2) -> (S, N, T, K), in one call. With
    align_corners=False, point (j + 0.5) / w reads exactly pixel column j, at any mask
    resolution. Border padding: a point within half a pixel of the image edge reads the edge
    pixel instead of a blend with zeros outside the image (which would halve a full mask's
    value along the border).
    """
    if masks.dim() == 4:
        return point_sample(masks[None], points[None])[0]
    s, n, t, h, w = masks.shape
    grid = (2.0 * points - 1.0).to(masks.dtype).view(s, 1, -1, 2)  # (S, 1, K, 2) in [-1, 1]
    sampled = F.grid_sample(masks.reshape(s, n * t, h, w), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return sampled.view(s, n, t, -1)  # (S, N, T, K)


def pixel_centre_points(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """(H*W, 2) the centres of every pixel, in [0, 1]^2: sampling there reads the masks exactly."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.flatten(), grid_y.flatten()], dim=-1)


def batch_mask_costs(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise mask costs of pred (..., Q, T, K) logits against target (..., N, T, K) in [0, 1]
    at the same K points: (sigmoid BCE, dice), each (..., Q, N).

    BCE: the mean over the K points of each frame, summed over the T frames.
    Dice, per frame: 1 - (2 sum(p y) + 1) / (sum p + sum y + 1), summed over frames. The +1
    makes a frame where the object is absent and nothing is predicted cost 0.
    """
    k = pred.shape[-1]
    prob = pred.sigmoid()
    inter = torch.einsum("...qtk,...ntk->...qnt", prob, target)  # (..., Q, N, T)
    denom = prob.sum(-1)[..., :, None, :] + target.sum(-1)[..., None, :, :]  # (..., Q, N, T)
    dice = (1 - (2 * inter + 1) / (denom + 1)).sum(-1)

    # BCE summed over frames and points: sum [pos y + neg (1 - y)] with neg = BCE(x, 0) =
    # softplus(x) and pos = BCE(x, 1) = softplus(-x) = neg - x, so it is sum(neg) - x . y: one
    # product, and no negated copy of the logits.
    # softplus(x) = relu(x) - log sigmoid(|x|), and sigmoid(|x|) = 1/2 + |sigmoid(x) - 1/2|, from
    # the sigmoid above, in its own memory (a fresh 50 MB tensor costs as much as the arithmetic):
    # PyTorch's CPU softplus is not vectorised (75 ms for the 12.5M logits of a 256x256 clip's
    # ten prediction sets, 40 this way). relu sums as (x + |x|) / 2; the L1 norm sums |x| in place.
    x = pred.flatten(-2)  # (..., Q, T*K)
    log_sigmoid_abs = prob.flatten(-2).sub_(0.5).abs_().add_(0.5).log_()
    neg = (x.sum(-1) + torch.linalg.vector_norm(x, ord=1, dim=-1)) / 2 - log_sigmoid_abs.sum(-1)  # (..., Q)
    bce = (neg[..., :, None] - x @ target.flatten(-2).transpose(-1, -2)) / k  # (..., Q, N)
    return bce, dice


# At most this many sampled mask logits (float32) at once when costing prediction sets together: 64 MB.
_SAMPLED_ELEMENTS = 2**24


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
    def cost_matrix(self, class_logits: Tensor, mask_logits: Tensor, target: MatchTargets, points: Tensor) -> Tensor:
        """Costs of one clip: class_logits (Q, C+1), mask_logits (Q, T, h, w), points (K, 2) -> (Q, N),
        in float32. Labels out of the vocabulary are clamped here (an index out of range would
        abort a CUDA kernel); `match_sets` reports them once the costs are on the host."""
        self._check_frames(mask_logits.shape[1], target)
        pred = point_sample(mask_logits.float(), points)  # (Q, T, K)
        tgt = point_sample(target.masks.to(torch.float32), points)  # (N, T, K)
        return self._costs(class_logits, pred, target.labels, tgt)

    def _costs(self, class_logits: Tensor, pred: Tensor, labels: Tensor, tgt: Tensor) -> Tensor:
        """class_logits (..., Q, C+1), predicted mask logits (..., Q, T, K) and target masks
        (..., N, T, K) at the same points -> costs (..., Q, N)."""
        num_classes = class_logits.shape[-1] - 1
        prob = class_logits.float().softmax(-1)  # (..., Q, C+1)
        cost_class = -prob[..., labels.clamp(max=num_classes)]  # (..., Q, N)
        cost_mask, cost_dice = batch_mask_costs(pred, tgt)
        return self.cost_class * cost_class + self.cost_mask * cost_mask + self.cost_dice * cost_dice

    def _clip_costs(self, sets: Sequence[tuple[Tensor, Tensor]], i: int, target: MatchTargets,
                    points: Tensor | None, first_stage: int) -> list[tuple[int, Tensor]]:
        """Clip i's cost matrices of every set, as (first set, costs (S, Q, N)) of S sets costed
        together: as many at a time as keep their sampled logits under _SAMPLED_ELEMENTS (all
        ten sets of the bench's mid size, two of the paper's model)."""
        device = sets[0][1].device
        q, frames = sets[0][1].shape[1:3]
        per_batch = max(1, _SAMPLED_ELEMENTS // (q * frames * self.num_points))
        masks = target.masks.to(torch.float32)  # once per clip, not per set
        out = []
        for first in range(0, len(sets), per_batch):
            batch = range(first, min(first + per_batch, len(sets)))
            if points is None:
                clip_points = torch.stack([
                    torch.rand(self.num_points, 2, device=device,
                               generator=clip_generator(target, device, "match", first_stage + s))
                    for s in batch])  # (S, K, 2)
            else:
                clip_points = points.to(device).expand(len(batch), *points.shape)
            pred = point_sample(torch.stack([sets[s][1][i] for s in batch]).float(), clip_points)  # (S, Q, T, K)
            tgt = point_sample(masks.expand(len(batch), *masks.shape), clip_points)  # (S, N, T, K)
            out.append((first, self._costs(torch.stack([sets[s][0][i] for s in batch]), pred, target.labels, tgt)))
        return out

    @staticmethod
    def _check_frames(num_frames: int, target: MatchTargets) -> None:
        if num_frames != target.num_frames:
            raise ValueError(
                f"predictions have {num_frames} frames, targets {target.num_frames} (masks {tuple(target.masks.shape)})"
            )

    @torch.no_grad()
    def __call__(
        self,
        class_logits: Tensor,
        mask_logits: Tensor,
        targets: list[MatchTargets],
        points: Tensor | None = None,
        stage: int = 0,
    ) -> list[tuple[Tensor, Tensor]]:
        """Match B clips of one prediction set (`match_sets` with one set).

        class_logits (B, Q, C+1) and mask_logits (B, Q, T, h, w) of the OBJECT queries only.
        points: (K, 2) fixed points in [0, 1]^2 for every clip (tests, or exact costs with
            pixel_centre_points); None samples num_points uniform points per clip, from the
            clip's own generator (its seed and `stage`, the prediction set) when it has a seed.
        Returns per clip (query_indices, target_indices), int64 on CPU, sorted by query, of
        length min(Q, N).
        """
        return self.match_sets([(class_logits, mask_logits)], targets, points, first_stage=stage)[0]

    @torch.no_grad()
    def match_sets(
        self,
        sets: Sequence[tuple[Tensor, Tensor]],
        targets: list[MatchTargets],
        points: Tensor | None = None,
        first_stage: int = 0,
    ) -> list[list[tuple[Tensor, Tensor]]]:
        """Match every prediction set of B clips: sets[s] = (class_logits (B, Q, C+1),
        mask_logits (B, Q, T, h, w)), the object queries only; set s draws its points as stage
        first_stage + s. All cost matrices reach the host in ONE transfer, where the Hungarian
        algorithm runs: a transfer per set and clip would make the host wait for the device as
        often. Returns [set][clip] (query_indices, target_indices) as `__call__` does."""
        b, q = sets[0][0].shape[:2]
        for class_logits, mask_logits in sets:
            if mask_logits.shape[:2] != (b, q) or class_logits.shape[:2] != (b, q) or len(targets) != b:
                raise ValueError(
                    f"class_logits {tuple(class_logits.shape)}, mask_logits {tuple(mask_logits.shape)} "
                    f"and {len(targets)} targets disagree on (B, Q)"
                )
        num_classes = sets[0][0].shape[-1] - 1
        on_device, shapes = [], []
        with full_precision(sets[0][1].device):  # model/precision.py
            for i, target in enumerate(targets):
                self._check_frames(sets[0][1].shape[2], target)
                if target.labels.numel() == 0:
                    continue
                for first, cost in self._clip_costs(sets, i, target, points, first_stage):
                    on_device.append(cost.flatten())
                    shapes += [(first + s, i, cost.shape[1:]) for s in range(cost.shape[0])]
                on_device.append(target.labels.max().to(torch.float32).view(1))
                shapes.append((None, i, None))
        sizes = [1 if shape is None else shape.numel() for _, _, shape in shapes]
        host = iter(torch.cat(on_device).cpu().split(sizes) if on_device else ())

        empty = torch.zeros(0, dtype=torch.long)
        matches = [[(empty, empty) for _ in targets] for _ in sets]
        for s, i, shape in shapes:
            value = next(host)
            if shape is None:  # the clip's largest label, after its costs
                if int(value) >= num_classes:
                    raise ValueError(
                        f"clip {i}: target labels {targets[i].labels.tolist()} out of range for {num_classes} classes")
                continue
            cost = value.view(shape)
            if not torch.isfinite(cost).all():
                raise ValueError(f"matching cost of clip {i} is not finite: {cost}")
            rows, cols = linear_sum_assignment(cost.numpy())
            matches[s][i] = (torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long))
        return matches
