"""Per-task post-processing of one clip's query predictions, and tube linking across clips.

Every function takes one clip: `class_probs` (Q, C + 1) with void last, `mask_logits`
(Q, T, H, W) at output resolution, or (Q, T, h, w) at the decoder's resolution with
`size=(H, W)`: then only the tubes a function keeps are upsampled (the panoptic result keeps
the few confident queries, the instance result its top k), which at the paper's 300 queries
and 1280x736 input is most of the memory and time of post-processing. T = 1 for images; for
video a query's tube keeps one identity over the clip's frames, so the same code gives video
panoptic and video instance results. Rules follow Mask2Former's inference (docs/reference.md,
"Inference").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor


@dataclass(frozen=True)
class PredictedSegment:
    """One segment of a panoptic result."""

    id: int  # value in id_map, 1.., the same over the clip's frames
    label: int  # class index into the vocabulary
    score: float
    isthing: bool
    query: int  # the query it came from (the first one for merged stuff)


@dataclass(frozen=True)
class PanopticResult:
    id_map: Tensor  # (T, H, W) int64, 0 = void
    segments: tuple[PredictedSegment, ...]


@dataclass(frozen=True)
class InstanceResult:
    masks: Tensor  # (K, T, H, W) bool
    labels: Tensor  # (K,) int64
    scores: Tensor  # (K,) float, descending
    queries: Tensor  # (K,) int64


@dataclass(frozen=True)
class SemanticResult:
    labels: Tensor  # (T, H, W) int64 class index
    scores: Tensor  # (C, T, H, W) per-class score


@dataclass(frozen=True)
class PromptResult:
    """Interactive segmentation and VOS: one tube per prompt."""

    masks: Tensor  # (K, T, H, W) bool
    scores: Tensor  # (K,) mean mask probability inside the mask, 0 when empty


def _check(class_probs: Tensor, mask_logits: Tensor, is_thing: Tensor | None = None) -> None:
    if class_probs.dim() != 2 or class_probs.shape[1] < 2:
        raise ValueError(f"class_probs must be (Q, C + 1) with C >= 1, got {tuple(class_probs.shape)}")
    if mask_logits.dim() != 4:
        raise ValueError(f"mask_logits must be (Q, T, H, W), got {tuple(mask_logits.shape)}")
    if class_probs.shape[0] != mask_logits.shape[0]:
        raise ValueError(
            f"class_probs has {class_probs.shape[0]} queries, mask_logits {mask_logits.shape[0]}"
        )
    if is_thing is not None and tuple(is_thing.shape) != (class_probs.shape[1] - 1,):
        raise ValueError(
            f"is_thing must be ({class_probs.shape[1] - 1},) for {class_probs.shape[1] - 1} classes, "
            f"got {tuple(is_thing.shape)}"
        )


def upsample_masks(mask_logits: Tensor, size: tuple[int, int] | None,
                   padded_size: tuple[int, int] | None = None) -> Tensor:
    """(..., h, w) mask logits -> (..., H, W) = size, bilinear (unchanged when size is None or
    equal). padded_size: the input the logits cover when the clip was padded into a larger
    batch; they are upsampled to it and its top-left (H, W), the clip, is kept."""
    full = tuple(padded_size or size or mask_logits.shape[-2:])
    if tuple(mask_logits.shape[-2:]) != full:
        lead = mask_logits.shape[:-2]
        mask_logits = F.interpolate(mask_logits.reshape(-1, 1, *mask_logits.shape[-2:]), size=full, mode="bilinear",
                                    align_corners=False).view(*lead, *full)
    if size is None:
        return mask_logits
    return mask_logits[..., :size[0], :size[1]]


def _output_size(mask_logits: Tensor, size: tuple[int, int] | None) -> tuple[int, int]:
    return tuple(size) if size is not None else tuple(mask_logits.shape[-2:])


def _in_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def panoptic_inference(
    class_probs: Tensor,
    mask_logits: Tensor,
    is_thing: Tensor,
    *,
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
    size: tuple[int, int] | None = None,
    padded_size: tuple[int, int] | None = None,
) -> PanopticResult:
    """Non-overlapping segments: each pixel to the kept query maximising score x mask prob.

    Kept queries: argmax not void and best class score > object_mask_threshold. A query
    keeps its segment if what it wins is at least overlap_threshold of its own mask (prob >=
    0.5) over the whole tube; stuff queries of one class become one segment. size: the
    output size when mask_logits are at the decoder's resolution (only kept tubes are upsampled);
    padded_size as in `upsample_masks`.
    """
    _check(class_probs, mask_logits, is_thing)
    _in_unit("object_mask_threshold", object_mask_threshold)
    _in_unit("overlap_threshold", overlap_threshold)
    t = mask_logits.shape[1]
    h, w = _output_size(mask_logits, size)
    device = mask_logits.device
    id_map = torch.zeros(t, h, w, dtype=torch.int64, device=device)
    num_classes = class_probs.shape[1] - 1
    scores, labels = class_probs[:, :num_classes].max(dim=1)
    keep = (class_probs.argmax(dim=1) != num_classes) & (scores > object_mask_threshold)
    kept = keep.nonzero().squeeze(1)
    if kept.numel() == 0:
        return PanopticResult(id_map=id_map, segments=())
    probs = upsample_masks(mask_logits[kept.to(mask_logits.device)], size, padded_size).float().sigmoid()  # (K, T, H, W)
    winner = (scores[kept].float().view(-1, 1, 1, 1) * probs).argmax(dim=0)  # (T, H, W)

    segments: list[PredictedSegment] = []
    stuff_ids: dict[int, int] = {}
    for k, query in enumerate(kept.tolist()):
        label = int(labels[query])
        thing = bool(is_thing[label])
        won = winner == k
        mask_area = int((probs[k] >= 0.5).sum())
        won_area = int((won & (probs[k] >= 0.5)).sum())
        if mask_area == 0 or won_area == 0 or won_area < overlap_threshold * mask_area:
            continue
        won &= probs[k] >= 0.5
        if not thing and label in stuff_ids:
            id_map[won] = stuff_ids[label]
            continue
        segment_id = len(segments) + 1
        id_map[won] = segment_id
        if not thing:
            stuff_ids[label] = segment_id
        segments.append(PredictedSegment(segment_id, label, float(scores[query]), thing, query))
    return PanopticResult(id_map=id_map, segments=tuple(segments))


def instance_inference(class_probs: Tensor, mask_logits: Tensor, is_thing: Tensor, *, top_k: int = 100,
                       size: tuple[int, int] | None = None, padded_size: tuple[int, int] | None = None) -> InstanceResult:
    """The top_k (query, thing class) pairs; score = class prob x mean mask prob inside the mask.
    size: the output size when mask_logits are at the decoder's resolution (only the top_k
    pairs' tubes are upsampled); padded_size as in `upsample_masks`."""
    _check(class_probs, mask_logits, is_thing)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    num_classes = class_probs.shape[1] - 1
    thing_classes = is_thing.to(torch.bool).nonzero().squeeze(1).to(class_probs.device)
    t = mask_logits.shape[1]
    h, w = _output_size(mask_logits, size)
    if thing_classes.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=class_probs.device)
        return InstanceResult(torch.zeros(0, t, h, w, dtype=torch.bool, device=mask_logits.device),
                              empty, class_probs.new_zeros(0), empty)
    pair_scores = class_probs[:, :num_classes][:, thing_classes].flatten()  # (Q * C_thing,)
    k = min(top_k, pair_scores.numel())
    top, index = pair_scores.topk(k)
    queries = index // thing_classes.numel()
    labels = thing_classes[index % thing_classes.numel()]
    probs = upsample_masks(mask_logits[queries.to(mask_logits.device)], size, padded_size).float().sigmoid()  # (k, T, H, W)
    masks = probs > 0.5
    area = masks.flatten(1).sum(1)
    mask_score = (probs * masks).flatten(1).sum(1) / area.clamp(min=1)
    final = top.float() * mask_score.to(top.device)
    order = final.argsort(descending=True)
    return InstanceResult(masks=masks[order], labels=labels[order], scores=final[order], queries=queries[order])


def semantic_inference(class_probs: Tensor, mask_logits: Tensor, *, size: tuple[int, int] | None = None,
                       padded_size: tuple[int, int] | None = None) -> SemanticResult:
    """Per-class score = sum over queries of class prob x mask prob; label = best class. Every
    query counts, so with `size` every tube is upsampled (to the probabilities' definition);
    padded_size as in `upsample_masks`."""
    _check(class_probs, mask_logits)
    mask_logits = upsample_masks(mask_logits, size, padded_size)
    num_classes = class_probs.shape[1] - 1
    scores = torch.einsum("qc,qthw->cthw", class_probs[:, :num_classes].float(), mask_logits.float().sigmoid())
    return SemanticResult(labels=scores.argmax(dim=0), scores=scores)


def prompt_inference(mask_logits: Tensor, *, mask_threshold: float = 0.5, size: tuple[int, int] | None = None,
                     padded_size: tuple[int, int] | None = None) -> PromptResult:
    """One mask per prompt: probability > mask_threshold (every prompt's tube upsampled to
    `size`, if given; padded_size as in `upsample_masks`)."""
    if mask_logits.dim() != 4:
        raise ValueError(f"mask_logits must be (K, T, H, W), got {tuple(mask_logits.shape)}")
    _in_unit("mask_threshold", mask_threshold)
    probs = upsample_masks(mask_logits, size, padded_size).float().sigmoid()
    masks = probs > mask_threshold
    area = masks.flatten(1).sum(1)
    scores = (probs * masks).flatten(1).sum(1) / area.clamp(min=1)
    return PromptResult(masks=masks, scores=scores)


def ensemble_probs(query_logits: Tensor, clip_logits: Tensor, seen: Tensor, *, alpha: float = 0.4, beta: float = 0.8) -> Tensor:
    """FC-CLIP's geometric ensemble of the trained head and the frozen CLIP: (Q, C + 1).

    The trained head is biased towards the classes it was trained on; frozen CLIP, which
    classifies the same masks with its own image features, generalises to unseen names. Seen
    classes take p_head^(1-alpha) p_clip^alpha, unseen ones p_head^(1-beta) p_clip^beta; the
    class distribution is renormalised and scaled by (1 - p_void) of the head, void appended.
    """
    if query_logits.dim() != 2 or clip_logits.dim() != 2:
        raise ValueError(
            f"query_logits must be (Q, C + 1) and clip_logits (Q, C), got {tuple(query_logits.shape)} "
            f"and {tuple(clip_logits.shape)}"
        )
    q, c = clip_logits.shape
    if tuple(query_logits.shape) != (q, c + 1):
        raise ValueError(f"query_logits must be ({q}, {c + 1}) to match clip_logits {tuple(clip_logits.shape)}")
    if tuple(seen.shape) != (c,):
        raise ValueError(f"seen must be ({c},), got {tuple(seen.shape)}")
    _in_unit("alpha", alpha)
    _in_unit("beta", beta)
    head = query_logits.float().softmax(dim=-1)
    p_void = head[:, c:]
    log_head = query_logits[:, :c].float().log_softmax(dim=-1)  # renormalised over the C classes
    log_clip = clip_logits.float().log_softmax(dim=-1)
    weight = torch.where(seen.to(query_logits.device), alpha, beta).to(log_head.dtype)  # (C,)
    combined = ((1 - weight) * log_head + weight * log_clip).softmax(dim=-1)
    return torch.cat([combined * (1 - p_void), p_void], dim=-1)


class TubeLinker:
    """Links the tubes of consecutive clips of one long video (MinVIS-style).

    `link` matches the new clip's query embeddings to the tracks' latest embeddings by
    Hungarian matching on cosine distance; a matched query continues its track, an unmatched
    one (more queries than tracks) starts a new track. `momentum` blends a track's stored
    embedding with the new one (0: replace, as MinVIS does). `add_scores` / `video_scores`
    average class probabilities over the clips a track appears in (video-level classes).
    """

    def __init__(self, momentum: float = 0.0) -> None:
        _in_unit("momentum", momentum)
        self.momentum = momentum
        self.embeddings: Tensor | None = None  # (N, D), row = track id
        self._score_sum: dict[int, Tensor] = {}
        self._score_count: dict[int, int] = {}

    def link(self, embeddings: Tensor) -> Tensor:
        """(Q, D) query embeddings of a clip -> (Q,) int64 track ids."""
        if embeddings.dim() != 2:
            raise ValueError(f"embeddings must be (Q, D), got {tuple(embeddings.shape)}")
        new = torch.nn.functional.normalize(embeddings.detach().float(), dim=-1)
        if self.embeddings is None:
            self.embeddings = new.clone()
            return torch.arange(new.shape[0], dtype=torch.int64, device=new.device)
        if new.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"embeddings have {new.shape[1]} dims, earlier clips had {self.embeddings.shape[1]}")
        cost = (1 - new @ self.embeddings.t()).cpu().numpy()  # (Q, N) cosine distance
        rows, cols = linear_sum_assignment(cost)
        ids = torch.full((new.shape[0],), -1, dtype=torch.int64)
        ids[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.int64)
        unmatched = (ids < 0).nonzero().squeeze(1)
        first_new = self.embeddings.shape[0]
        ids[unmatched] = torch.arange(first_new, first_new + unmatched.numel())
        ids = ids.to(new.device)
        store = torch.cat([self.embeddings, new.new_zeros(unmatched.numel(), new.shape[1])])
        matched = torch.as_tensor(np.asarray(rows), dtype=torch.int64, device=new.device)
        store[ids[matched]] = torch.nn.functional.normalize(
            self.momentum * store[ids[matched]] + (1 - self.momentum) * new[matched], dim=-1
        )
        store[ids[unmatched.to(new.device)]] = new[unmatched.to(new.device)]
        self.embeddings = store
        return ids

    def add_scores(self, track_ids: Tensor, class_probs: Tensor) -> None:
        """Record one clip's class probabilities (Q, C + 1) for its tracks."""
        if class_probs.dim() != 2 or class_probs.shape[0] != track_ids.shape[0]:
            raise ValueError(
                f"class_probs must be ({track_ids.shape[0]}, C + 1) for {track_ids.shape[0]} tracks, "
                f"got {tuple(class_probs.shape)}"
            )
        for track, probs in zip(track_ids.tolist(), class_probs.detach().float()):
            self._score_sum[track] = self._score_sum.get(track, 0) + probs
            self._score_count[track] = self._score_count.get(track, 0) + 1

    def video_scores(self) -> tuple[Tensor, Tensor]:
        """(track ids (N,), mean class probabilities (N, C + 1)) over the clips seen so far."""
        if not self._score_sum:
            raise ValueError("no scores recorded: call add_scores first")
        tracks = sorted(self._score_sum)
        means = torch.stack([self._score_sum[k] / self._score_count[k] for k in tracks])
        return torch.tensor(tracks, dtype=torch.int64), means
