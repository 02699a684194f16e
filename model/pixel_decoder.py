"""Mask2Former's multi-scale deformable-attention pixel decoder, in plain PyTorch.

Inputs are the backbone's res2..res5. The three coarsest levels (res5, res4, res3: strides 32,
16, 8) are projected to d channels and refined together by a Deformable-DETR encoder: every
location attends to a few sampled points around its own position on EVERY level, so the levels
exchange information at a cost linear in the number of locations. The stride-4 level then joins
FPN-style (lateral 1x1 conv + upsampled stride-8 output, then a 3x3 conv), and a 1x1 conv gives
the per-pixel mask features that query embeddings are dotted with.

Deformable attention's sampling is `torch.nn.functional.embedding_bag` over the values' rows at
inference and `torch.nn.functional.grid_sample` when gradients are needed (no custom CUDA
kernel), so the module runs unchanged on CPU and GPU.

Video: the pixel decoder is per frame. Fold the T frames of each clip into the batch (B*T,
frame-major within each clip) before the backbone; the transformer decoder unfolds them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omgseg.model.backbone import BackboneFeatures
from omgseg.model.sized_constants import sized_constant


@dataclass(frozen=True)
class PixelDecoderConfig:
    """Paper-size defaults (docs/reference.md, 'Pixel decoder'). No dropout: Mask2Former uses 0.0 here."""

    d_model: int = 256  # also the mask-feature width, which the transformer decoder expects
    num_layers: int = 6
    num_heads: int = 8
    num_points: int = 4  # sampling points per head and level
    ffn_dim: int = 1024
    num_groups: int = 32  # GroupNorm groups; d_model must be a multiple


def build_pixel_decoder(config: PixelDecoderConfig, in_channels: Sequence[int]) -> MSDeformAttnPixelDecoder:
    """in_channels: channels of res2..res5, e.g. `[s.channels for s in backbone.feature_specs]`."""
    return MSDeformAttnPixelDecoder(
        in_channels=in_channels,
        d_model=config.d_model,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        num_points=config.num_points,
        ffn_dim=config.ffn_dim,
        num_groups=config.num_groups,
    )


@dataclass(frozen=True)
class PixelDecoderOutput:
    """What the transformer decoder reads.

    mask_features: (B, d, H/4, W/4), the per-pixel embeddings masks are predicted from.
    multi_scale_memory: 3 tensors (B, d, h_l, w_l), coarse to fine (strides 32, 16, 8): the
        encoder's output, which the decoder's masked cross-attention cycles over.
    multi_scale_pos: the 2-D sine positional encodings of multi_scale_memory, same shapes.
    """

    mask_features: Tensor
    multi_scale_memory: list[Tensor]
    multi_scale_pos: list[Tensor]

    def __post_init__(self) -> None:
        if self.mask_features.dim() != 4:
            raise ValueError(f"mask_features must be (B, d, h, w), got {tuple(self.mask_features.shape)}")
        batch, d = self.mask_features.shape[:2]
        if len(self.multi_scale_memory) != len(self.multi_scale_pos):
            raise ValueError(
                f"{len(self.multi_scale_memory)} memory levels but {len(self.multi_scale_pos)} positional encodings"
            )
        for lvl, (memory, pos) in enumerate(zip(self.multi_scale_memory, self.multi_scale_pos)):
            if memory.dim() != 4 or memory.shape[:2] != (batch, d):
                raise ValueError(f"multi_scale_memory[{lvl}] must be ({batch}, {d}, h, w), got {tuple(memory.shape)}")
            if pos.shape != memory.shape:
                raise ValueError(f"multi_scale_pos[{lvl}] must be {tuple(memory.shape)}, got {tuple(pos.shape)}")


# --------------------------------------------------------------------------------------------
# Tensor functions


@sized_constant
def sine_position_encoding(height: int, width: int, num_channels: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """DETR's 2-D sine encoding of pixel centres normalised to (0, 2*pi]: (num_channels, H, W).

    The first half of the channels encodes y, the second half x; within each half, sin and cos
    of the same frequency alternate (frequencies 10000^(-2i/half)).
    """
    if num_channels % 4 != 0:
        raise ValueError(f"num_channels must be a multiple of 4 (y/x halves of sin/cos pairs), got {num_channels}")
    half = num_channels // 2
    eps = 1e-6
    # Cumulative pixel index 1..H (Mask2Former's cumsum over an all-valid mask), normalised so the
    # last row sits at 2*pi: the encoding depends on relative position, not on the image size.
    y = torch.arange(1, height + 1, device=device, dtype=torch.float32) / (height + eps) * 2 * math.pi
    x = torch.arange(1, width + 1, device=device, dtype=torch.float32) / (width + eps) * 2 * math.pi
    dim_t = torch.arange(half, device=device, dtype=torch.float32)
    dim_t = 10000.0 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / half)  # (half,)
    pos_y = y[:, None] / dim_t  # (H, half)
    pos_x = x[:, None] / dim_t  # (W, half)
    pos_y = torch.stack([pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()], dim=2).flatten(1)  # (H, half)
    pos_x = torch.stack([pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()], dim=2).flatten(1)  # (W, half)
    pos = torch.cat(
        [pos_y[:, None, :].expand(height, width, half), pos_x[None, :, :].expand(height, width, half)], dim=2
    )  # (H, W, C)
    return pos.permute(2, 0, 1).to(dtype)  # (C, H, W)


def multi_scale_deformable_attention(
    value: Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Weighted sum of bilinearly sampled values (the core of deformable attention).

    value: (B, S, nH, hd), the L levels' values flattened row-major and concatenated,
        S = sum(h_l * w_l).
    spatial_shapes: L pairs (h_l, w_l) as Python ints.
    sampling_locations: (B, Q, nH, L, P, 2), xy normalised to the level: (0, 0) is the top-left
        corner of the top-left pixel, (1, 1) the bottom-right corner of the bottom-right one.
        Points outside sample zeros (bilinear weights of outside pixels are dropped).
    attention_weights: (B, Q, nH, L, P), typically a softmax over L*P.
    Returns (B, Q, nH * hd) in value's dtype; the sampling runs in sampling_locations' dtype.
    """
    _check_sampling(value, spatial_shapes, sampling_locations, attention_weights)
    geometry = level_geometry(spatial_shapes, sampling_locations.device, sampling_locations.dtype)
    pixels = sampling_locations * geometry[:, None, :2] - 0.5
    return sample_pixels(value, spatial_shapes, pixels, attention_weights)


def _check_sampling(value: Tensor, spatial_shapes: Sequence[tuple[int, int]], locations: Tensor, weights: Tensor) -> None:
    num_values, num_levels = value.shape[1], locations.shape[3]
    if sum(h * w for h, w in spatial_shapes) != num_values or len(spatial_shapes) != num_levels:
        raise ValueError(
            f"spatial_shapes {list(spatial_shapes)} do not match value length {num_values} "
            f"and {num_levels} sampling levels"
        )
    if weights.shape != locations.shape[:-1]:
        raise ValueError(f"attention_weights must be {tuple(locations.shape[:-1])}, got {tuple(weights.shape)}")


def level_geometry(spatial_shapes: Sequence[tuple[int, int]], device: torch.device, dtype: torch.dtype) -> Tensor:
    """(L, 3): each level's width, height and first row in the flattened values. Filled in on
    the device: a tensor copied from the host would make the host wait for the device."""
    geometry = torch.empty(len(spatial_shapes), 3, device=device, dtype=dtype)
    start = 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        geometry[lvl, 0], geometry[lvl, 1], geometry[lvl, 2] = w, h, start
        start += h * w
    return geometry


# Tables with fewer rows than this are indexed in int32.
_INT32_ROWS = 2**31


def sample_pixels(value: Tensor, spatial_shapes: Sequence[tuple[int, int]], pixels: Tensor,
                  attention_weights: Tensor) -> Tensor:
    """`multi_scale_deformable_attention` at `pixels` (B, Q, nH, L, P, 2), each level's xy pixel
    coordinates (pixel (i, j) centred at (j, i), as grid_sample's align_corners=False).

    Without gradients (inference), every output row is a weighted sum of 4 * L * P value rows
    (each point's four neighbouring pixels, weighted by its attention weight times its bilinear
    weight), which is exactly what `F.embedding_bag` computes, for all levels, heads and points
    in one call: it reads the rows where they lie and never materialises the sampled values.
    Each level is given a border of zero rows, so a neighbour outside the level is clamped onto
    the border instead of masked: the index and weight arithmetic is a few passes over the
    points, which at inference cost more than the gathering itself.
    With gradients, `grid_sample` per level: embedding_bag's backward sorts every row index
    (a million per layer at 256x256), which costs more than grid_sample's backward on CPU.
    """
    if torch.is_grad_enabled() and (value.requires_grad or pixels.requires_grad or attention_weights.requires_grad):
        return _grid_sample_levels(value, spatial_shapes, pixels, attention_weights)
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = pixels.shape
    table = _bordered_table(value.to(pixels.dtype), spatial_shapes)  # (B*nH*S', hd)
    index = torch.int32 if table.shape[0] < _INT32_ROWS else torch.long  # int32: half the memory traffic
    last_x, last_y, width, first_row = _bordered_point_table(
        tuple(map(tuple, spatial_shapes)), num_heads, num_points, pixels.device, index)  # each (nH, L, P)
    if batch > 1:
        rows_per_image = table.shape[0] // batch
        first_row = first_row + torch.arange(batch, device=pixels.device, dtype=index).view(batch, 1, 1, 1, 1) * rows_per_image
    coords = pixels + 1  # in the bordered level: its pixel 0 is bordered pixel 1
    corner = coords.floor()
    frac = coords - corner
    corner = corner.to(index)
    x0, y0 = corner[..., 0], corner[..., 1]  # (B, Q, nH, L, P)
    col0 = torch.minimum(x0.clamp(min=0), last_x)
    col1 = torch.minimum((x0 + 1).clamp_(min=0), last_x)
    row0 = torch.minimum(y0.clamp(min=0), last_y).mul_(width).add_(first_row)
    row1 = torch.minimum((y0 + 1).clamp_(min=0), last_y).mul_(width).add_(first_row)
    # A bag (B, Q, nH) holds its 4 * L * P entries corner by corner (their order in a bag does not
    # matter): stacked before (L, P), the writes are runs of L * P values, not single ones.
    rows = torch.stack([row0 + col0, row0 + col1, row1 + col0, row1 + col1], dim=3)  # (B, Q, nH, 4, L, P)
    fx, fy = frac[..., 0], frac[..., 1]
    below = attention_weights * fy  # the attention weight split between the two rows
    above = attention_weights - below
    left = 1 - fx
    weights = torch.stack([above * left, above * fx, below * left, below * fx], dim=3)
    per_query = num_levels * num_points * 4
    out = F.embedding_bag(rows.view(-1, per_query), table, per_sample_weights=weights.view(-1, per_query), mode="sum")
    return out.view(batch, num_queries, num_heads * head_dim).to(value.dtype)  # bags are (B, Q, nH)-ordered


@sized_constant
def _bordered_point_table(spatial_shapes: tuple[tuple[int, int], ...], num_heads: int, num_points: int,
                          device: torch.device, dtype: torch.dtype) -> Tensor:
    """(4, nH, L, P): for every head, level and point, its bordered level's last column, last row
    and width, and the level's first row in that head's part of the table (batch element 0).
    Shaped like the points, these broadcast over (B, Q) only: a (L, 1) tensor broadcast over the
    innermost dimensions cost about five times as much per value (0.2 against 0.04 ms for one
    image's points at 256x256)."""
    bordered = [(h + 2, w + 2) for h, w in spatial_shapes]
    width, height, first_row = level_geometry(bordered, device, dtype).unbind(1)  # each (L,)
    rows_per_head = sum(h * w for h, w in bordered)
    head_first_row = first_row + torch.arange(num_heads, device=device, dtype=dtype)[:, None] * rows_per_head  # (nH, L)
    per_level = torch.stack([(width - 1).expand(num_heads, -1), (height - 1).expand(num_heads, -1),
                             width.expand(num_heads, -1), head_first_row])  # (4, nH, L)
    return per_level[..., None].expand(-1, -1, -1, num_points).contiguous()


@sized_constant
def _grid_affine(spatial_shapes: tuple[tuple[int, int], ...], num_heads: int, num_points: int,
                 device: torch.device, dtype: torch.dtype) -> Tensor:
    """(2, nH, L, P, 2): per point, the scale 2 / size and the shift 1 / size - 1 that take its
    level's pixel coordinates (x, y) to grid_sample's [-1, 1], shaped like the points for the
    same reason as _bordered_point_table (1.4 -> 0.03 ms for one image's points at 256x256)."""
    sizes = level_geometry(spatial_shapes, device, dtype)[:, :2]  # (L, 2): width, height
    sizes = sizes[None, :, None, :].expand(num_heads, -1, num_points, -1)  # (nH, L, P, 2)
    return torch.stack([2 / sizes, 1 / sizes - 1])


def _bordered_table(value: Tensor, spatial_shapes: Sequence[tuple[int, int]]) -> Tensor:
    """value (B, S, nH, hd) -> the embedding table (B*nH*S', hd): for each batch element and head,
    every level's (h + 2, w + 2) values with a border of zeros, row-major, levels concatenated."""
    batch, _, num_heads, head_dim = value.shape
    levels = value.transpose(1, 2).split([h * w for h, w in spatial_shapes], dim=2)  # (B, nH, h*w, hd)
    table = torch.cat([
        F.pad(level.reshape(batch, num_heads, h, w, head_dim), (0, 0, 1, 1, 1, 1)).flatten(2, 3)
        for level, (h, w) in zip(levels, spatial_shapes)], dim=2)  # (B, nH, S', hd)
    return table.reshape(-1, head_dim)


def _grid_sample_levels(value: Tensor, spatial_shapes: Sequence[tuple[int, int]], pixels: Tensor,
                        attention_weights: Tensor) -> Tensor:
    """`sample_pixels` by one grid_sample call per level, which samples every batch element,
    head, query and point of the level; each level's weighted sum is added up as it comes."""
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, _, num_points, _ = pixels.shape
    values = value.to(pixels.dtype).split([h * w for h, w in spatial_shapes], dim=1)
    # grid_sample's grid is in [-1, 1]; with align_corners=False its ends are the outer pixel
    # corners: x -> (2x + 1) / w - 1, as x * scale + shift with per-point factors.
    scale, shift = _grid_affine(tuple(map(tuple, spatial_shapes)), num_heads, num_points, pixels.device, pixels.dtype)
    grids = torch.addcmul(shift, pixels, scale)  # (B, Q, nH, L, P, 2)
    out = None
    for lvl, (h, w) in enumerate(spatial_shapes):
        value_l = values[lvl].permute(0, 2, 3, 1).reshape(batch * num_heads, head_dim, h, w)  # (B*nH, hd, h, w)
        grid_l = grids[:, :, :, lvl].transpose(1, 2).reshape(batch * num_heads, num_queries, num_points, 2)
        sampled = F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B*nH, hd, Q, P)
        weights = attention_weights[:, :, :, lvl].transpose(1, 2).reshape(batch * num_heads, 1, num_queries, num_points)
        level = (sampled * weights).sum(dim=-1)  # (B*nH, hd, Q)
        out = level if out is None else out + level
    return out.view(batch, num_heads * head_dim, num_queries).transpose(1, 2).to(value.dtype)  # (B, Q, nH*hd)


def _softmax(x: Tensor) -> Tensor:
    """`x.softmax(-1)`, written out: PyTorch's CPU kernel is slow on a short last dimension
    such as the levels x points of deformable attention (12: 1.2 ms against 0.4 for one image's
    (1, 1344, 8, 12) weights at 256x256; forward and backward of two images 3.3 -> 0.9 ms).
    The maximum is subtracted for range only, so it needs no gradient (softmax ignores shifts)."""
    exp = (x - x.detach().amax(dim=-1, keepdim=True)).exp()
    return exp * exp.sum(dim=-1, keepdim=True).reciprocal()


# --------------------------------------------------------------------------------------------
# Modules


class MultiScaleDeformableAttention(nn.Module):
    """Each query predicts, per head and level, P offsets around its reference point and P
    attention weights (softmax over all L*P points of the head), and reads the values there."""

    def __init__(self, d_model: int, num_heads: int, num_levels: int, num_points: int) -> None:
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"d_model {d_model} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(d_model, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(d_model, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Start every head looking in its own direction (evenly spread angles), point p at
        # distance p + 1 pixels: a dilated star around the reference point that training bends.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)  # (nH, 2)
        directions = directions / directions.abs().amax(dim=-1, keepdim=True)  # onto the unit square
        distance = torch.arange(1, self.num_points + 1, dtype=torch.float32)  # (P,)
        bias = directions[:, None, None, :] * distance[None, None, :, None]  # (nH, 1, P, 2)
        bias = bias.expand(self.num_heads, self.num_levels, self.num_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        # Uniform attention over the points at the start.
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference: Tensor,
        value_input: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> Tensor:
        """query: (B, Q, d) (content + position); reference: (B or 1, Q, 1, L, P, 2) float32, each
        query's reference point in every level's pixel coordinates, repeated for the P points
        (`reference_pixels`); value_input: (B, S, d), the levels flattened and concatenated.
        Returns (B, Q, d)."""
        batch, num_queries, d_model = query.shape
        nh, nl, npt = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value_input).view(batch, value_input.shape[1], nh, d_model // nh)  # (B, S, nH, hd)
        offsets = self.sampling_offsets(query).view(batch, num_queries, nh, nl, npt, 2)
        weights = _softmax(self.attention_weights(query).view(batch, num_queries, nh, nl * npt).float())
        weights = weights.view(batch, num_queries, nh, nl, npt)
        # Offsets are in pixels of each level, added to the reference point there. Locations are
        # float32 whatever autocast does: in bfloat16 a location is off by up to 1/256 of the
        # level, 2 pixels of a 512-wide one.
        pixels = offsets.float() + reference  # (B, Q, nH, L, P, 2)
        out = sample_pixels(value, spatial_shapes, pixels, weights)  # (B, Q, d)
        return self.output_proj(out)


class DeformableEncoderLayer(nn.Module):
    """Post-norm transformer layer: deformable self-attention over all levels, then an FFN."""

    def __init__(self, d_model: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int) -> None:
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(d_model, num_heads, num_levels, num_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self, src: Tensor, pos: Tensor, reference: Tensor, spatial_shapes: Sequence[tuple[int, int]]
    ) -> Tensor:
        """src, pos: (B, S, d); reference: (1, S, 1, L, P, 2), `reference_pixels`. Returns (B, S, d)."""
        src = self.norm1(src + self.self_attn(src + pos, reference, src, spatial_shapes))
        hidden = self.linear1(src)
        # In place only without autograd: on the linear's (viewed) output it makes autograd copy it.
        return self.norm2(src + self.linear2(F.relu(hidden, inplace=not hidden.requires_grad)))


def _conv_norm(in_channels: int, out_channels: int, kernel_size: int, num_groups: int) -> nn.Sequential:
    """Conv (no bias: the norm has one) + GroupNorm, Kaiming-uniform(a=1) like Detectron2's FPN."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    return nn.Sequential(conv, nn.GroupNorm(num_groups, out_channels))


class MSDeformAttnPixelDecoder(nn.Module):
    """Backbone res2..res5 -> mask features at stride 4 + a refined 3-level memory (32, 16, 8).

    Args:
        in_channels: channels of res2, res3, res4, res5 (strides 4, 8, 16, 32), as the backbone
            declares them.
        d_model: width of the encoder, the memory and the mask features.
        num_layers, num_heads, num_points, ffn_dim: the deformable encoder's size.
        num_groups: GroupNorm groups after every projection and conv.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        d_model: int,
        num_layers: int,
        num_heads: int,
        num_points: int,
        ffn_dim: int,
        num_groups: int,
    ) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"in_channels must give res2..res5 (4 levels), got {list(in_channels)}")
        if d_model % num_groups != 0 or d_model % 4 != 0:
            raise ValueError(f"d_model {d_model} must be a multiple of num_groups {num_groups} and of 4")
        self.in_channels = tuple(in_channels)
        self.d_model = d_model
        self.num_levels = 3  # res5, res4, res3 go through the encoder; res2 only joins at the end
        self.num_points = num_points

        # Encoder inputs, coarse to fine (res5, res4, res3): 1x1 conv + GroupNorm to d.
        self.input_proj = nn.ModuleList()
        for channels in reversed(self.in_channels[1:]):
            conv = nn.Conv2d(channels, d_model, kernel_size=1)
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
            self.input_proj.append(nn.Sequential(conv, nn.GroupNorm(num_groups, d_model)))
        # Which level a location belongs to: added to the (level-agnostic) sine encoding.
        self.level_embed = nn.Parameter(torch.empty(self.num_levels, d_model))
        nn.init.normal_(self.level_embed)
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(d_model, num_heads, self.num_levels, num_points, ffn_dim)
            for _ in range(num_layers)
        )

        # The stride-4 level: lateral 1x1 conv, add the upsampled stride-8 output, 3x3 conv.
        self.lateral_conv = _conv_norm(self.in_channels[0], d_model, 1, num_groups)
        self.output_conv = nn.Sequential(_conv_norm(d_model, d_model, 3, num_groups), nn.ReLU())
        self.mask_features = nn.Conv2d(d_model, d_model, kernel_size=1)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)
        nn.init.zeros_(self.mask_features.bias)

    def forward(self, features: BackboneFeatures) -> PixelDecoderOutput:
        """features: res2..res5 of B images (or B*T frames) -> PixelDecoderOutput."""
        maps = features.as_list()
        for name, tensor, channels in zip(("res2", "res3", "res4", "res5"), maps, self.in_channels):
            if tensor.shape[1] != channels:
                raise ValueError(f"{name} must have {channels} channels, got {tuple(tensor.shape)}")
        batch = maps[0].shape[0]
        coarse_to_fine = maps[:0:-1]  # [res5, res4, res3]

        srcs, pos_list, spatial_shapes = [], [], []
        for lvl, x in enumerate(coarse_to_fine):
            src = self.input_proj[lvl](x)  # (B, d, h, w)
            h, w = src.shape[-2:]
            pos = sine_position_encoding(h, w, self.d_model, src.device, src.dtype)  # (d, h, w)
            spatial_shapes.append((h, w))
            pos_list.append(pos)
            srcs.append(src.flatten(2).transpose(1, 2))  # (B, h*w, d)
        src_flat = torch.cat(srcs, dim=1)  # (B, S, d)
        pos_flat = torch.cat(
            [pos.flatten(1).t() + self.level_embed[lvl] for lvl, pos in enumerate(pos_list)], dim=0
        )[None]  # (1, S, d)
        reference = reference_pixels(tuple(spatial_shapes), self.num_points, src_flat.device)  # (1, S, 1, L, P, 2)

        memory = src_flat
        for layer in self.layers:
            memory = layer(memory, pos_flat, reference, spatial_shapes)  # (B, S, d)

        multi_scale_memory = [
            level.transpose(1, 2).reshape(batch, self.d_model, h, w)
            for level, (h, w) in zip(memory.split([h * w for h, w in spatial_shapes], dim=1), spatial_shapes)
        ]  # coarse to fine: (B, d, h_l, w_l)

        res2 = maps[0]
        finest = multi_scale_memory[-1]  # stride 8
        y = self.lateral_conv(res2) + F.interpolate(
            finest, size=res2.shape[-2:], mode="bilinear", align_corners=False
        )  # (B, d, H/4, W/4)
        y = self.output_conv(y)
        return PixelDecoderOutput(
            mask_features=self.mask_features(y),
            multi_scale_memory=multi_scale_memory,
            multi_scale_pos=[pos[None].expand(batch, -1, -1, -1) for pos in pos_list],
        )


@sized_constant
def reference_pixels(spatial_shapes: tuple[tuple[int, int], ...], num_points: int, device: torch.device) -> Tensor:
    """Every location's own pixel centre, on every level, in that level's pixel coordinates (as
    `sample_pixels` takes them), repeated for the P points: (1, S, 1, L, P, 2) xy, float32.

    No padding masks are used (all locations valid), so a point at the same normalised place
    lands on the same place of the image on every level. Repeated over the points, the offsets
    add to it broadcasting over the heads only (0.8 -> 0.04 ms for one image at 256x256).
    """
    points = []
    for h, w in spatial_shapes:
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (h, w)
        points.append(torch.stack([grid_x, grid_y], dim=-1).reshape(h * w, 2))
    normalised = torch.cat(points, dim=0)  # (S, 2), in [0, 1] on every level
    sizes = level_geometry(spatial_shapes, device, torch.float32)[:, :2]  # (L, 2): width, height
    pixels = normalised[:, None, :] * sizes - 0.5  # (S, L, 2)
    return pixels[None, :, None, :, None, :].expand(1, -1, 1, -1, num_points, -1).contiguous()
