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

from omgseg.model.precision import full_precision
from omgseg.model.sized_constants import sized_constant
from omgseg.model.structures import KIND_INDEX, PromptBatch, PromptKind, QueryOutputs, point_boxes


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


@sized_constant
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


class Attention(nn.Module):
    """Multi-head attention through `F.scaled_dot_product_attention`, which picks the flash or
    memory-efficient kernels on CUDA. Parameters are named, shaped and initialised (in the same
    order) as `nn.MultiheadAttention`'s, so checkpoints and seeded initial weights carry over.
    Unlike it, the mask is one per clip, shared by the heads (broadcast, not repeated)."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"d_model {d_model} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, allowed: Tensor) -> Tensor:
        """query (B, Q, d), key and value (B, S, d); allowed: (B, Q, S) or (Q, S) bool, True where
        a query may attend (every row needs one True). Returns (B, Q, d)."""
        b, q, d = query.shape
        heads = self.num_heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)

        def split(x: Tensor) -> Tensor:  # (B, N, d) -> (B, heads, N, d / heads)
            return x.view(b, x.shape[1], heads, d // heads).transpose(1, 2)

        mask = allowed[:, None] if allowed.dim() == 3 else allowed  # (B, 1, Q, S): the same for every head
        out = F.scaled_dot_product_attention(
            split(F.linear(query, w_q, b_q)), split(F.linear(key, w_k, b_k)), split(F.linear(value, w_v, b_v)),
            attn_mask=mask)  # (B, heads, Q, d / heads)
        return self.out_proj(out.transpose(1, 2).reshape(b, q, d))


class CrossAttentionLayer(nn.Module):
    """Queries attend to the memory (post-norm, as Mask2Former)."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.attn = Attention(d_model, num_heads)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor, allowed: Tensor) -> Tensor:
        """tgt, query_pos (B, Q, d); memory, memory_pos (B, S, d); allowed (B, Q, S) True = may attend."""
        return self.norm(tgt + self.attn(tgt + query_pos, memory + memory_pos, memory, allowed))


class SelfAttentionLayer(nn.Module):
    """Queries attend to each other, within their group (post-norm)."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.attn = Attention(d_model, num_heads)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, allowed: Tensor) -> Tensor:
        """tgt, query_pos (B, Q, d); allowed (Q, Q) True = may attend."""
        qk = tgt + query_pos
        return self.norm(tgt + self.attn(qk, qk, tgt, allowed))


class FFNLayer(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor) -> Tensor:
        hidden = self.linear1(tgt)
        # In place only without autograd: on the linear's (viewed) output it makes autograd copy it.
        return self.norm(tgt + self.linear2(F.relu(hidden, inplace=not hidden.requires_grad)))


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
        """Pad the clips' prompts to the largest K; returns content, position (B, K, d), valid (B, K).
        Nothing is read back from the device, and what comes from the host (the kinds) is one
        copy that does not wait."""
        b = len(prompts)
        k = max(p.num_prompts for p in prompts)
        n_max = max((p.clicks.shape[1] for p in prompts if p.clicks is not None), default=0)
        boxes = torch.zeros(b, k, 4, device=device)  # normalised cx, cy, w, h
        kinds = torch.zeros(b, k, dtype=torch.long)  # on the host: the kinds are Python values
        valid = torch.zeros(b, k, dtype=torch.bool, device=device)
        click_boxes = torch.zeros(b, k, n_max, 4, device=device)
        click_labels = torch.full((b, k, n_max), -1, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            n = p.num_prompts
            boxes[i, :n] = _normalised_cxcywh(p.boxes.to(device).float(), p.image_size)
            kinds[i, :n] = torch.tensor([KIND_INDEX[kind] for kind in p.kinds], dtype=torch.long)
            valid[i, :n] = True
            if p.clicks is not None and p.click_labels is not None:
                m = p.clicks.shape[1]
                click_boxes[i, :n, :m] = _normalised_cxcywh(point_boxes(p.clicks.to(device), p.image_size), p.image_size)
                click_labels[i, :n, :m] = p.click_labels.to(device)
        kinds = kinds.to(device, non_blocking=True)
        position = self.encode_boxes(boxes)  # (B, K, d)
        clicks = self.encode_boxes(click_boxes) + self.click_tokens[click_labels.clamp(min=0)]  # (B, K, N, d)
        weights = (click_labels >= 0).float()
        # Mean over real clicks; 0 where a prompt has none (the tensors stay in the graph).
        click_mean = (clicks * weights[..., None]).sum(2) / weights.sum(2).clamp(min=1.0)[..., None]
        content = self.kind_tokens[kinds] + click_mean  # (B, K, d)
        return content, position, valid


def _normalised_cxcywh(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """(..., 4) xyxy in input pixels -> (..., 4) cx, cy, w, h as fractions of the image."""
    height, width = image_size
    x1, y1, x2, y2 = boxes.unbind(-1)
    return _xyxy_to_cxcywh(torch.stack([x1 / width, y1 / height, x2 / width, y2 / height], dim=-1))


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
        if not 0.0 < mask_threshold < 1.0:
            raise ValueError(f"mask_threshold must be in (0, 1), got {mask_threshold}")
        # sigmoid(x) >= t exactly when x >= log(t / (1 - t)): masked attention compares the
        # logits with that, without a sigmoid over every query's mask at every layer.
        self.mask_logit_threshold = math.log(mask_threshold) - math.log1p(-mask_threshold)

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
        *,
        aux: bool = True,
    ) -> QueryOutputs:
        """Decode queries for B clips of T = num_frames frames.

        mask_features: (B*T, d, H/4, W/4), frame-major within each clip.
        multi_scale_memory: num_levels tensors (B*T, d, h_l, w_l), coarse to fine (strides 32, 16, 8).
        text_embeddings: (C, D) one embedding per class of the vocabulary, or (C, S, D) with S
            synonyms per class (a class's logit is its best synonym's); normalised here.
        prompts: None, or one PromptBatch per clip (possibly with 0 prompts).
        aux: also return the earlier prediction sets (initial queries, layers 1..L-1) in `.aux`,
            for deep supervision. Without them (inference) the earlier layers run only what the
            next layer's attention mask needs.
        Returns the last prediction set.
        """
        self._check_inputs(mask_features, multi_scale_memory, num_frames, text_embeddings, prompts)
        b, t = mask_features.shape[0] // num_frames, num_frames
        mask_feats = mask_features.view(b, t, *mask_features.shape[1:])  # (B, T, d, H, W)
        memories, memory_pos, level_sizes = self._memory(multi_scale_memory, b, t)
        # Masked attention thresholds each query's mask logits at the level it attends to. Mask
        # logits are linear in the mask features and so is bilinear resizing: the features
        # brought to each level once give the same logits as resizing every full-size mask.
        with torch.no_grad():
            level_feats = [
                F.interpolate(mask_features, size=size, mode="bilinear", align_corners=False).view(b, t, -1, *size)
                for size in level_sizes
            ]  # (B, T, d, h_l, w_l)
        tgt, query_pos, prompt_valid = self._queries(b, prompts, mask_features.device)
        counts = tuple(p.num_prompts for p in prompts) if prompt_valid.shape[1] else (0,) * b
        allowed_self = self._group_attention_mask(self.num_object_queries, tgt.shape[1], tgt.device)  # (Q, Q)
        text = F.normalize(text_embeddings.float(), dim=-1)  # (C, D) or (C, S, D)

        # The read-outs of every prediction set, kept for the heads: no layer needs a set's
        # full-size masks or classes, so all sets' heads run together after the last layer.
        outs, mask_embs = [], []
        out = self.decoder_norm(tgt)  # (B, Q, d)
        mask_emb = self.mask_embed(out)  # (B, Q, d)
        for i in range(self.num_layers):
            if aux:
                outs.append(out)
                mask_embs.append(mask_emb)
            lvl = i % self.num_levels
            allowed = self._attention_mask(mask_emb, level_feats[lvl])  # from the previous read-out
            tgt = self.cross_layers[i](tgt, query_pos, memories[lvl], memory_pos[lvl], allowed)
            tgt = self.self_layers[i](tgt, query_pos, allowed_self)
            tgt = self.ffn_layers[i](tgt)
            out = self.decoder_norm(tgt)
            mask_emb = self.mask_embed(out)
        outs.append(out)
        mask_embs.append(mask_emb)
        predictions = self._heads(torch.stack(outs, 1), torch.stack(mask_embs, 1), mask_feats, text, prompt_valid, counts)

        out = predictions[-1]
        out.aux = predictions[:-1]
        # Parameters no loss reaches in this pass: in batches without prompts, the prompt
        # encoder. DDP without find_unused_parameters waits forever for their gradients, and
        # workers of a co-training run see different tasks; the criterion adds this sum with
        # weight 0 so they get (zero) gradients on every worker.
        if prompt_valid.shape[1] == 0:
            out.unused_parameter_sum = sum(p.sum() for p in self.prompt_encoder.parameters())
        return out

    def _check_inputs(self, mask_features: Tensor, multi_scale_memory: list[Tensor], num_frames: int,
                      text_embeddings: Tensor, prompts: list[PromptBatch] | None) -> None:
        bt, d = mask_features.shape[:2]
        if num_frames < 1 or bt % num_frames != 0:
            raise ValueError(f"mask_features batch {bt} is not a multiple of num_frames={num_frames}")
        if mask_features.dim() != 4 or d != self.d_model:
            raise ValueError(f"mask_features must be (B*T, d, h, w) with {self.d_model} channels, got {tuple(mask_features.shape)}")
        if len(multi_scale_memory) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} memory levels, got {len(multi_scale_memory)}")
        for lvl, mem in enumerate(multi_scale_memory):
            if mem.dim() != 4 or mem.shape[:2] != (bt, d):
                raise ValueError(f"multi_scale_memory[{lvl}] must be ({bt}, {d}, h, w), got {tuple(mem.shape)}")
        text_dim = self.class_embed.out_features
        if text_embeddings.dim() not in (2, 3) or text_embeddings.shape[-1] != text_dim:
            raise ValueError(
                f"text_embeddings must be (C, {text_dim}) or (C, S, {text_dim}), got {tuple(text_embeddings.shape)}")
        if prompts is not None and len(prompts) != bt // num_frames:
            raise ValueError(f"got {len(prompts)} PromptBatches for {bt // num_frames} clips")

    def _memory(self, multi_scale_memory: list[Tensor], b: int, t: int) -> tuple[list[Tensor], list[Tensor], list[tuple[int, int]]]:
        """Each level's frames unfolded into one sequence per clip: memory (B, T*h*w, d) with its
        level embedding, its (x, y, t) position encoding (1, T*h*w, d), and its (h, w)."""
        memories, positions, sizes = [], [], []
        for lvl, mem in enumerate(multi_scale_memory):
            d, h, w = mem.shape[1:]
            mem = mem.view(b, t, d, h, w).permute(0, 1, 3, 4, 2).reshape(b, t * h * w, d)
            memories.append(mem + self.level_embed.weight[lvl])
            positions.append(video_position_encoding(t, h, w, d, mem.device, mem.dtype)[None])
            sizes.append((h, w))
        return memories, positions, sizes

    def _queries(self, b: int, prompts: list[PromptBatch] | None, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """The object queries, then the (padded) prompt queries: content and position (B, Q, d),
        and prompt_valid (B, K), False for padding (K = 0 without prompts)."""
        tgt = self.query_feat.weight[None].expand(b, -1, -1)  # (B, No, d)
        query_pos = self.query_pos.weight[None].expand(b, -1, -1)
        if prompts is None or not any(p.num_prompts > 0 for p in prompts):
            return tgt, query_pos, torch.zeros(b, 0, dtype=torch.bool, device=device)
        prompt_feat, prompt_pos, prompt_valid = self.prompt_encoder(prompts, device)
        tgt = torch.cat([tgt, prompt_feat.to(tgt.dtype)], dim=1)  # (B, Q, d)
        query_pos = torch.cat([query_pos, prompt_pos.to(tgt.dtype)], dim=1)
        return tgt, query_pos, prompt_valid

    @staticmethod
    def _group_attention_mask(num_obj: int, num_queries: int, device: torch.device) -> Tensor:
        """(Q, Q) bool, True = may attend: object queries see object queries; a prompt only itself."""
        allowed = torch.eye(num_queries, dtype=torch.bool, device=device)
        allowed[:num_obj, :num_obj] = True
        return allowed

    @torch.no_grad()
    def _attention_mask(self, mask_emb: Tensor, level_feats: Tensor) -> Tensor:
        """(B, Q, T*h*w) bool, True where a query attends in the next layer: its mask logits at
        that level (mask_emb (B, Q, d) against level_feats (B, T, d, h, w)) above the threshold."""
        logits = torch.einsum("bqc,btchw->bqthw", mask_emb, level_feats).flatten(2)  # (B, Q, T*h*w)
        allowed = logits >= self.mask_logit_threshold
        # Mask2Former's fallback: a query whose mask is empty attends everywhere (an empty row
        # would give a NaN softmax). No indexing by the empty rows: that would wait for the device.
        return allowed | ~allowed.any(dim=-1, keepdim=True)

    def _heads(self, outs: Tensor, mask_embs: Tensor, mask_feats: Tensor, text: Tensor, prompt_valid: Tensor,
               prompt_counts: tuple[int, ...]) -> list[QueryOutputs]:
        """The prediction sets from the normed queries outs (B, S, Q, d) of S sets and their mask
        embeddings (B, S, Q, d); mask_feats (B, T, d, H, W); text (C, D) or (C, S, D), normalised,
        float32. The S sets go through each head together: one matrix product for every set's
        mask logits (and one for their gradient) instead of S small ones."""
        b, num_sets, q, d = outs.shape
        t, h, w = mask_feats.shape[1], mask_feats.shape[3], mask_feats.shape[4]
        feats = mask_feats.transpose(1, 2).reshape(b, d, t * h * w)  # (B, d, T*H*W)
        mask_logits = (mask_embs.reshape(b, num_sets * q, d) @ feats).view(b, num_sets * q, t, h, w)

        # Classification: cosine of a projection of (query + mask-pooled features) with the text.
        # The mask is detached: masks are trained by the mask losses, not reshaped to please
        # the classifier. The cosines are taken in float32 even under autocast: x logit_scale,
        # bfloat16's rounding of a cosine (about 0.004) would move a logit by 0.4.
        pooled = mask_pool(feats.view(b, d, t, h, w), mask_logits.detach())  # (B, S*Q, d)
        out = outs.reshape(b, num_sets * q, d)
        cls_emb = F.normalize(self.class_embed(out + self.pool_proj(pooled)).float(), dim=-1)  # (B, S*Q, D)
        with full_precision(out.device):
            cosine = cls_emb @ text.flatten(0, -2).t()  # (B, S*Q, C) or (B, S*Q, C * S')
        if text.dim() == 3:  # synonyms: a class scores as its best synonym
            cosine = cosine.view(b, num_sets * q, *text.shape[:2]).amax(-1)
        # Void logit: a learned per-query logit (the objectness logit, sign flipped), not the
        # reference's constant 0 from a zero background vector. With a constant 0 the void
        # probability depends only on how low the query scores against EVERY class, so it
        # changes with the vocabulary's size and content; a learned logit decouples "is there
        # an object" from "which class", and CE over C + 1 trains it (void weight 0.1).
        void_logit = self.void_embed(out).float()  # (B, S*Q, 1)
        class_logits = torch.cat([self.logit_scale * cosine, void_logit], dim=-1)  # (B, S*Q, C + 1)
        # Identity: the normalised query itself, as MinVIS associates tubes across clips. A
        # separate head would need an identity loss over pairs of clips of one video, which
        # the tube formulation does not give within a clip.
        # unbind: the sets' gradients come back as one stacked tensor, not one full-size zero
        # tensor per set.
        return [
            QueryOutputs(mask_logits=m, class_logits=c, id_embeddings=e, num_object_queries=self.num_object_queries,
                         prompt_valid=prompt_valid, prompt_counts=prompt_counts)
            for m, c, e in zip(mask_logits.unflatten(1, (num_sets, q)).unbind(1),
                               class_logits.unflatten(1, (num_sets, q)).unbind(1), outs.unbind(1))
        ]
