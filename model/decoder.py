"""The one shared transformer decoder of OMG-Seg (Mask2Former-style, with prompt queries and tubes).

Object queries (learned) and prompt queries (encoded from boxes and clicks) go through the
SAME layers in ONE pass; a self-attention mask keeps the groups apart. Every query predicts a
tube of mask logits over the clip's T frames, class logits against text embeddings given as
an argument, and an identity embedding. T = 1 for images: same code path.

Inputs come from the pixel decoder with the frames of each clip folded into the batch
(B*T, frame-major within each clip); this module unfolds them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omgseg.model.structures import PromptBatch, PromptKind, QueryOutputs


@dataclass(frozen=True)
class DecoderConfig:
    """Paper-size defaults (docs/reference.md, 'Decoder')."""

    d_model: int = 256
    num_heads: int = 8
    ffn_dim: int = 2048  # Mask2Former's decoder FFN (the pixel decoder uses 1024)
    num_layers: int = 9  # 3 rounds over the 3 memory levels -> 10 prediction sets
    num_object_queries: int = 300
    num_levels: int = 3  # strides 32, 16, 8: the pixel decoder's multi_scale_memory
    text_dim: int = 768  # CLIP convnext_large text embedding width
    logit_scale: float = 100.0  # fixed, as CLIP's clamped maximum: cosines in [-1, 1] -> logits in [-100, 100]
    mask_threshold: float = 0.5  # masked attention keeps locations with sigmoid > 0.5


def build_decoder(config: DecoderConfig) -> OMGDecoder:
    return OMGDecoder(
        d_model=config.d_model,
        num_heads=config.num_heads,
        ffn_dim=config.ffn_dim,
        num_layers=config.num_layers,
        num_object_queries=config.num_object_queries,
        num_levels=config.num_levels,
        text_dim=config.text_dim,
        logit_scale=config.logit_scale,
        mask_threshold=config.mask_threshold,
    )


# --------------------------------------------------------------------------------------------
# Tensor functions


def sine_encoding(coords: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """Sine/cosine encoding of each coordinate, as in Transformer / DETR positional encodings.

    coords: (..., n) values (already scaled: the caller picks 2*pi*[0, 1] or raw indices).
    Returns (..., n * num_feats): for each coordinate, num_feats/2 sines then num_feats/2 cosines.
    """
    if num_feats % 2 != 0:
        raise ValueError(f"num_feats must be even, got {num_feats}")
    half = num_feats // 2
    exponent = torch.arange(half, device=coords.device, dtype=torch.float32) / half
    freqs = temperature ** exponent  # (half,)
    angles = coords.float().unsqueeze(-1) / freqs  # (..., n, half)
    enc = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (..., n, num_feats)
    return enc.flatten(-2)  # float32


def video_position_encoding(
    num_frames: int, height: int, width: int, d_model: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """3-D (x, y, t) positional encoding of a clip's memory, flattened frame-major.

    x and y are pixel centres normalised to [0, 1] (times 2*pi) and get d/2 channels each,
    concatenated; t is the RAW frame index and gets d channels, added. Raw indices (rather
    than t / T) give frame 0 of any clip, and every image (T = 1), the same encoding, so
    tubes of different lengths at inference see the positions they saw in training.
    Returns (T * h * w, d).
    """
    if d_model % 4 != 0:
        raise ValueError(f"d_model must be divisible by 4 for the x/y/t encoding, got {d_model}")
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height * 2 * math.pi
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width * 2 * math.pi
    ts = torch.arange(num_frames, device=device, dtype=torch.float32)
    pos_y = sine_encoding(ys[:, None], d_model // 2)  # (h, d/2)
    pos_x = sine_encoding(xs[:, None], d_model // 2)  # (w, d/2)
    pos_t = sine_encoding(ts[:, None], d_model)  # (T, d)
    pos_xy = torch.cat(
        [pos_y[:, None, :].expand(height, width, -1), pos_x[None, :, :].expand(height, width, -1)],
        dim=-1,
    )  # (h, w, d)
    pos = pos_xy[None] + pos_t[:, None, None, :]  # (T, h, w, d)
    return pos.reshape(num_frames * height * width, d_model).to(dtype)


def mask_pool(features: Tensor, mask_logits: Tensor, eps: float = 1e-6) -> Tensor:
    """Average features inside each query's soft mask.

    features: (B, C, T, h, w) or (B, C, h, w).
    mask_logits: (B, Q, T, h, w) or (B, Q, h, w) (same layout as features; resized bilinearly
        to the features' (h, w) if they differ).
    Returns (B, Q, C): sum_p sigmoid(m_p) * f_p / (sum_p sigmoid(m_p) + eps) over all pixels p
    of all frames, so a video query is pooled over its whole tube. A soft (sigmoid) weight
    rather than the reference's hard (logit > 0) mask keeps every query's pool defined (an
    all-negative mask still gives a weighted average) and is differentiable; callers that do
    not want gradients into the masks detach the logits.
    """
    if features.dim() == 4:
        features = features.unsqueeze(2)  # (B, C, 1, h, w)
    if mask_logits.dim() == 4:
        mask_logits = mask_logits.unsqueeze(2)  # (B, Q, 1, h, w)
    if features.dim() != 5 or mask_logits.dim() != 5:
        raise ValueError(
            f"mask_pool expects features (B, C, [T,] h, w) and mask_logits (B, Q, [T,] h, w), "
            f"got {tuple(features.shape)} and {tuple(mask_logits.shape)}"
        )
    b, _, t, h, w = features.shape
    if mask_logits.shape[0] != b or mask_logits.shape[2] != t:
        raise ValueError(
            f"mask_pool: batch and frames differ: features {tuple(features.shape)}, "
            f"mask_logits {tuple(mask_logits.shape)}"
        )
    q = mask_logits.shape[1]
    if mask_logits.shape[-2:] != (h, w):
        mask_logits = F.interpolate(
            mask_logits.flatten(1, 2), size=(h, w), mode="bilinear", align_corners=False
        ).view(b, q, t, h, w)
    weights = mask_logits.sigmoid()  # (B, Q, T, h, w)
    total = torch.einsum("bqthw,bcthw->bqc", weights, features)  # (B, Q, C)
    return total / (weights.sum(dim=(2, 3, 4))[..., None] + eps)


# --------------------------------------------------------------------------------------------
# Modules


class MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class CrossAttentionLayer(nn.Module):
    """Queries attend to the memory (post-norm, as Mask2Former)."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self, tgt: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor, attn_mask: Tensor
    ) -> Tensor:
        """tgt, query_pos (B, Q, d); memory, memory_pos (B, S, d); attn_mask (B*heads, Q, S) True = blocked."""
        out = self.attn(tgt + query_pos, memory + memory_pos, memory, attn_mask=attn_mask, need_weights=False)[0]
        return self.norm(tgt + out)


class SelfAttentionLayer(nn.Module):
    """Queries attend to each other, within their group (post-norm)."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, attn_mask: Tensor) -> Tensor:
        """tgt, query_pos (B, Q, d); attn_mask (Q, Q) True = blocked."""
        qk = tgt + query_pos
        out = self.attn(qk, qk, tgt, attn_mask=attn_mask, need_weights=False)[0]
        return self.norm(tgt + out)


class FFNLayer(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor) -> Tensor:
        return self.norm(tgt + self.linear2(F.relu(self.linear1(tgt))))


class PromptEncoder(nn.Module):
    """Turns boxes and clicks into prompt queries: content (B, K, d) and position (B, K, d).

    - position: sine encoding of the box (cx, cy, w, h) / input size, through an MLP.
    - content: a learned token per prompt kind, plus the MEAN over the prompt's further
      clicks of (a learned positive or negative click token + the same box MLP applied to the
      click's +-3 px box). Further clicks go into the content, not the position, because the
      position is added to the attention query and should keep pointing at the first click
      or box; the mean keeps the scale independent of the number of clicks.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.kind_tokens = nn.Parameter(torch.zeros(len(PromptKind), d_model))
        self.click_tokens = nn.Parameter(torch.zeros(2, d_model))  # row 0: negative click, 1: positive
        # d/2 channels per box coordinate (as DAB-DETR) -> 2d in, d out.
        self.box_mlp = MLP(2 * d_model, d_model, d_model, num_layers=2)
        nn.init.normal_(self.kind_tokens, std=0.02)
        nn.init.normal_(self.click_tokens, std=0.02)

    def encode_boxes(self, boxes_cxcywh: Tensor) -> Tensor:
        """(..., 4) normalised cx, cy, w, h -> (..., d)."""
        return self.box_mlp(sine_encoding(boxes_cxcywh * 2 * math.pi, self.d_model // 2))

    def forward(self, prompts: list[PromptBatch], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Pad the clips' prompts to the largest K; returns content, position (B, K, d), valid (B, K)."""
        b = len(prompts)
        k = max(p.num_prompts for p in prompts)
        n_max = max((p.clicks.shape[1] for p in prompts if p.clicks is not None), default=0)
        boxes = torch.zeros(b, k, 4, device=device)  # normalised cx, cy, w, h
        kinds = torch.zeros(b, k, dtype=torch.long, device=device)
        valid = torch.zeros(b, k, dtype=torch.bool, device=device)
        click_boxes = torch.zeros(b, k, n_max, 4, device=device)
        click_labels = torch.full((b, k, n_max), -1, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            n = p.num_prompts
            height, width = p.image_size
            scale = torch.tensor([width, height, width, height], device=device, dtype=torch.float32)
            boxes[i, :n] = _xyxy_to_cxcywh(p.boxes.to(device).float() / scale)
            kinds[i, :n] = p.kind_indices().to(device)
            valid[i, :n] = True
            if p.clicks is not None and p.click_labels is not None:
                m = p.clicks.shape[1]
                pts = PromptBatch.from_points(p.clicks.reshape(-1, 2), p.image_size).boxes
                click_boxes[i, :n, :m] = _xyxy_to_cxcywh(pts.to(device) / scale).view(n, m, 4)
                click_labels[i, :n, :m] = p.click_labels.to(device)
        position = self.encode_boxes(boxes)  # (B, K, d)
        clicks = self.encode_boxes(click_boxes) + self.click_tokens[click_labels.clamp(min=0)]  # (B, K, N, d)
        weights = (click_labels >= 0).float()
        # Mean over real clicks; 0 where a prompt has none (the tensors stay in the graph).
        click_mean = (clicks * weights[..., None]).sum(2) / weights.sum(2).clamp(min=1.0)[..., None]
        content = self.kind_tokens[kinds] + click_mean  # (B, K, d)
        return content, position, valid


def _xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


class OMGDecoder(nn.Module):
    """Masked-attention transformer decoder with object and prompt queries and shared heads."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        ffn_dim: int,
        num_layers: int,
        num_object_queries: int,
        num_levels: int,
        text_dim: int,
        logit_scale: float,
        mask_threshold: float,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.num_object_queries = num_object_queries
        self.num_levels = num_levels
        self.logit_scale = logit_scale
        self.mask_threshold = mask_threshold

        self.cross_layers = nn.ModuleList(CrossAttentionLayer(d_model, num_heads) for _ in range(num_layers))
        self.self_layers = nn.ModuleList(SelfAttentionLayer(d_model, num_heads) for _ in range(num_layers))
        self.ffn_layers = nn.ModuleList(FFNLayer(d_model, ffn_dim) for _ in range(num_layers))
        self.decoder_norm = nn.LayerNorm(d_model)

        self.query_feat = nn.Embedding(num_object_queries, d_model)  # content
        self.query_pos = nn.Embedding(num_object_queries, d_model)  # position
        self.level_embed = nn.Embedding(num_levels, d_model)  # tells the levels apart in attention
        self.prompt_encoder = PromptEncoder(d_model)

        # Heads, shared by object and prompt queries.
        self.mask_embed = MLP(d_model, d_model, d_model, num_layers=3)
        self.pool_proj = nn.Linear(d_model, d_model)
        self.class_embed = nn.Linear(d_model, text_dim)
        self.void_embed = nn.Linear(d_model, 1)

    # ----------------------------------------------------------------------------------------

    def forward(
        self,
        mask_features: Tensor,
        multi_scale_memory: list[Tensor],
        num_frames: int,
        text_embeddings: Tensor,
        prompts: list[PromptBatch] | None = None,
    ) -> QueryOutputs:
        """Decode queries for B clips of T = num_frames frames.

        mask_features: (B*T, d, H/4, W/4), frame-major within each clip.
        multi_scale_memory: num_levels tensors (B*T, d, h_l, w_l), coarse to fine (strides 32, 16, 8).
        text_embeddings: (C, D) one embedding per class of the vocabulary, or (C, S, D) with S
            synonyms per class (a class's logit is its best synonym's); normalised here.
        prompts: None, or one PromptBatch per clip (possibly with 0 prompts).
        Returns the last prediction set; earlier sets (initial queries, layers 1..L-1) in `.aux`.
        """
        bt, d, mh, mw = mask_features.shape
        if num_frames < 1 or bt % num_frames != 0:
            raise ValueError(f"mask_features batch {bt} is not a multiple of num_frames={num_frames}")
        if d != self.d_model:
            raise ValueError(f"mask_features must have {self.d_model} channels, got {tuple(mask_features.shape)}")
        if len(multi_scale_memory) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} memory levels, got {len(multi_scale_memory)}")
        for lvl, mem in enumerate(multi_scale_memory):
            if mem.dim() != 4 or mem.shape[:2] != (bt, d):
                raise ValueError(
                    f"multi_scale_memory[{lvl}] must be ({bt}, {d}, h, w), got {tuple(mem.shape)}"
                )
        if text_embeddings.dim() not in (2, 3) or text_embeddings.shape[-1] != self.class_embed.out_features:
            raise ValueError(
                f"text_embeddings must be (C, {self.class_embed.out_features}) or (C, S, "
                f"{self.class_embed.out_features}), got {tuple(text_embeddings.shape)}"
            )
        b, t = bt // num_frames, num_frames
        if prompts is not None and len(prompts) != b:
            raise ValueError(f"got {len(prompts)} PromptBatches for {b} clips")

        # Unfold the frames: (B*T, d, H, W) -> (B, T, d, H, W).
        mask_feats = mask_features.view(b, t, d, mh, mw)
        memories, memory_pos, level_sizes = [], [], []
        for lvl, mem in enumerate(multi_scale_memory):
            h, w = mem.shape[-2:]
            mem = mem.view(b, t, d, h, w).permute(0, 1, 3, 4, 2).reshape(b, t * h * w, d)  # (B, T*h*w, d)
            memories.append(mem + self.level_embed.weight[lvl])
            memory_pos.append(video_position_encoding(t, h, w, d, mem.device, mem.dtype)[None])  # (1, T*h*w, d)
            level_sizes.append((h, w))

        # Queries: object queries, then (padded) prompt queries.
        num_obj = self.num_object_queries
        tgt = self.query_feat.weight[None].expand(b, -1, -1)  # (B, No, d)
        query_pos = self.query_pos.weight[None].expand(b, -1, -1)  # (B, No, d)
        has_prompts = prompts is not None and any(p.num_prompts > 0 for p in prompts)
        if has_prompts:
            prompt_feat, prompt_pos, prompt_valid = self.prompt_encoder(prompts, mask_features.device)
            tgt = torch.cat([tgt, prompt_feat.to(tgt.dtype)], dim=1)  # (B, Q, d)
            query_pos = torch.cat([query_pos, prompt_pos.to(tgt.dtype)], dim=1)
        else:
            prompt_valid = torch.zeros(b, 0, dtype=torch.bool, device=mask_features.device)
        q = tgt.shape[1]
        self_mask = self._group_attention_mask(num_obj, q, tgt.device)  # (Q, Q)

        text = F.normalize(text_embeddings.to(tgt.dtype), dim=-1)  # (C, D)
        predictions = []
        pred, attn_mask = self._predict(tgt, mask_feats, text, level_sizes[0], num_obj, prompt_valid)
        predictions.append(pred)
        for i in range(self.num_layers):
            lvl = i % self.num_levels
            tgt = self.cross_layers[i](tgt, query_pos, memories[lvl], memory_pos[lvl], attn_mask)
            tgt = self.self_layers[i](tgt, query_pos, self_mask)
            tgt = self.ffn_layers[i](tgt)
            next_size = level_sizes[(i + 1) % self.num_levels]
            pred, attn_mask = self._predict(tgt, mask_feats, text, next_size, num_obj, prompt_valid)
            predictions.append(pred)

        # Deep-supervision sets carry no anchor; the last set carries it (see below).
        out = predictions[-1]
        out.aux = predictions[:-1]
        # Parameters no loss reaches in this pass: in batches without prompts, the prompt
        # encoder. DDP without find_unused_parameters waits forever for their gradients, and
        # workers of a co-training run see different tasks; the criterion adds this sum with
        # weight 0 so they get (zero) gradients on every worker.
        unused = [] if has_prompts else list(self.prompt_encoder.parameters())
        out.unused_parameter_sum = sum(p.sum() for p in unused) if unused else None
        return out

    def _group_attention_mask(self, num_obj: int, num_queries: int, device: torch.device) -> Tensor:
        """(Q, Q) bool, True = blocked: object queries see only object queries; a prompt only itself."""
        blocked = torch.ones(num_queries, num_queries, dtype=torch.bool, device=device)
        blocked[:num_obj, :num_obj] = False
        idx = torch.arange(num_obj, num_queries, device=device)
        blocked[idx, idx] = False
        return blocked

    def _predict(
        self,
        tgt: Tensor,
        mask_feats: Tensor,
        text: Tensor,
        attn_size: tuple[int, int],
        num_obj: int,
        prompt_valid: Tensor,
    ) -> tuple[QueryOutputs, Tensor]:
        """Heads on the current queries, and the attention mask for the next layer.

        tgt (B, Q, d); mask_feats (B, T, d, H, W); text (C, D) or (C, S, D), normalised.
        Returns the predictions and a (B*heads, Q, T*h*w) bool mask (True = blocked) at attn_size.
        """
        b, q, _ = tgt.shape
        t = mask_feats.shape[1]
        out = self.decoder_norm(tgt)  # (B, Q, d)
        mask_emb = self.mask_embed(out)  # (B, Q, d)
        mask_logits = torch.einsum("bqc,btchw->bqthw", mask_emb, mask_feats)  # (B, Q, T, H, W)

        # Classification: cosine of a projection of (query + mask-pooled features) with the text.
        # The mask is detached: masks are trained by the mask losses, not reshaped to please
        # the classifier.
        pooled = mask_pool(mask_feats.transpose(1, 2), mask_logits.detach())  # (B, Q, d)
        cls_emb = F.normalize(self.class_embed(out + self.pool_proj(pooled)), dim=-1)  # (B, Q, D)
        if text.dim() == 2:
            class_logits = self.logit_scale * cls_emb @ text.t()  # (B, Q, C)
        else:  # synonyms: a class scores as its best synonym
            c, syn = text.shape[:2]
            class_logits = (self.logit_scale * cls_emb @ text.flatten(0, 1).t()).view(b, q, c, syn).amax(-1)
        # Void logit: a learned per-query logit (the objectness logit, sign flipped), not the
        # reference's constant 0 from a zero background vector. With a constant 0 the void
        # probability depends only on how low the query scores against EVERY class, so it
        # changes with the vocabulary's size and content; a learned logit decouples "is there
        # an object" from "which class", and CE over C + 1 trains it (void weight 0.1).
        void_logit = self.void_embed(out)  # (B, Q, 1)
        class_logits = torch.cat([class_logits, void_logit], dim=-1)  # (B, Q, C + 1)
        # Identity: the normalised query itself, as MinVIS associates tubes across clips. A
        # separate head would need an identity loss over pairs of clips of one video, which
        # the tube formulation does not give within a clip.
        id_embeddings = out  # (B, Q, d)

        # Masked attention for the next layer: attend where sigmoid > threshold at that level.
        h, w = attn_size
        small = F.interpolate(
            mask_logits.detach().flatten(1, 2), size=(h, w), mode="bilinear", align_corners=False
        ).view(b, q, t * h * w)  # (B, Q, T*h*w)
        blocked = small.sigmoid() < self.mask_threshold
        # Mask2Former's fallback: a query whose mask is empty attends everywhere (an all-blocked
        # row would give a NaN softmax).
        blocked[blocked.all(dim=-1)] = False
        blocked = blocked.repeat_interleave(self.num_heads, dim=0)  # (B*heads, Q, T*h*w)

        pred = QueryOutputs(
            mask_logits=mask_logits,
            class_logits=class_logits,
            id_embeddings=id_embeddings,
            num_object_queries=num_obj,
            prompt_valid=prompt_valid,
        )
        return pred, blocked
