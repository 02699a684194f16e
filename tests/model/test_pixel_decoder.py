"""The deformable pixel decoder: the sampling op against a slow reference, shapes, gradients, sizes."""

import math

import pytest
import torch
from torch import nn

import omgseg.model.pixel_decoder as pixel_decoder_module
from omgseg.model.backbone import BackboneFeatures, ClipBackbone, build_backbone
from omgseg.model.clip_model import TINY_MODEL_NAME
from omgseg.model.pixel_decoder import (
    MSDeformAttnPixelDecoder,
    PixelDecoderConfig,
    PixelDecoderOutput,
    _softmax,
    build_pixel_decoder,
    multi_scale_deformable_attention,
    sine_position_encoding,
)

TINY = PixelDecoderConfig(d_model=64, num_layers=2, num_heads=8, num_points=4, ffn_dim=128, num_groups=32)


@pytest.fixture(scope="module")
def backbone() -> ClipBackbone:
    torch.manual_seed(0)
    return build_backbone(TINY_MODEL_NAME)


def _pixel_decoder(backbone: ClipBackbone, seed: int = 1) -> MSDeformAttnPixelDecoder:
    torch.manual_seed(seed)
    return build_pixel_decoder(TINY, [s.channels for s in backbone.feature_specs])


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=gen, dtype=torch.uint8)


# --------------------------------------------------------------------------------------------
# The sampling op


def _bilinear_at(image: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """image (C, H, W) read at normalised (x, y) in [0, 1] image units, pixel centres at
    ((j + 0.5) / W, (i + 0.5) / H); pixels outside the image count as zero."""
    _, height, width = image.shape
    px, py = x * width - 0.5, y * height - 0.5  # continuous pixel coordinates
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(image.shape[0], dtype=image.dtype)
    for xi in (x0, x0 + 1):
        for yi in (y0, y0 + 1):
            weight = (1 - abs(px - xi)) * (1 - abs(py - yi))
            if 0 <= xi < width and 0 <= yi < height:
                out += weight * image[:, yi, xi]
    return out


def _slow_deformable_attention(value, spatial_shapes, locations, weights):
    """Loop over batch, queries, heads, levels and points; same contract as the fast op."""
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, _, num_points, _ = locations.shape
    starts = [0]
    for h, w in spatial_shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(batch, num_queries, num_heads, head_dim, dtype=value.dtype)
    for b in range(batch):
        for q in range(num_queries):
            for head in range(num_heads):
                for lvl, (h, w) in enumerate(spatial_shapes):
                    image = value[b, starts[lvl] : starts[lvl + 1], head].t().reshape(head_dim, h, w)
                    for p in range(num_points):
                        x, y = locations[b, q, head, lvl, p].tolist()
                        out[b, q, head] += weights[b, q, head, lvl, p] * _bilinear_at(image, x, y)
    return out.reshape(batch, num_queries, num_heads * head_dim)


@pytest.mark.parametrize("int64_rows", [False, True], ids=["int32", "int64"])
@pytest.mark.parametrize("spread", [1.6, 6.0], ids=["near", "far"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_deformable_attention_matches_the_slow_reference(grad, spread, int64_rows, monkeypatch):
    """Both ways of sampling: embedding_bag without gradients (with int32 row indices, and
    int64 as for a table too large for int32), grid_sample with them."""
    if int64_rows:
        monkeypatch.setattr(pixel_decoder_module, "_INT32_ROWS", 0)
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (2, 5), (1, 1)]
    batch, queries, heads, head_dim, points = 2, 4, 2, 3, 3
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, head_dim, generator=gen, dtype=torch.float64)
    # Some points fall outside [0, 1], near the border or several levels' widths away: they
    # must read zero padding, like the reference.
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=gen, dtype=torch.float64)
    locations = locations * spread + (1 - spread) / 2
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=gen, dtype=torch.float64)
    fast = multi_scale_deformable_attention(value.requires_grad_(grad), shapes, locations, weights)
    slow = _slow_deformable_attention(value.detach(), shapes, locations, weights)
    assert fast.shape == (batch, queries, heads * head_dim)
    torch.testing.assert_close(fast, slow)


def test_deformable_attention_gradients_match_finite_differences():
    """The gradients reach the values, the locations (through the bilinear weights) and the
    attention weights, points outside the levels included."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(3, 4), (2, 2)]
    value = torch.randn(1, 16, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    locations = (torch.rand(1, 3, 2, 2, 2, 2, generator=gen, dtype=torch.float64) * 1.4 - 0.2).requires_grad_()
    weights = torch.rand(1, 3, 2, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v, loc, wt: multi_scale_deformable_attention(v, shapes, loc, wt), (value, locations, weights))


def test_sampling_at_a_pixel_centre_reads_that_pixel():
    h, w = 3, 5
    value = torch.arange(h * w, dtype=torch.float64).view(1, h * w, 1, 1)
    i, j = 2, 1
    location = torch.tensor([(j + 0.5) / w, (i + 0.5) / h], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    out = multi_scale_deformable_attention(value, [(h, w)], location, torch.ones(1, 1, 1, 1, 1, dtype=torch.float64))
    assert out.item() == i * w + j


def test_deformable_attention_rejects_mismatched_shapes():
    value = torch.zeros(1, 12, 2, 4)
    locations = torch.zeros(1, 3, 2, 1, 4, 2)
    with pytest.raises(ValueError, match=r"spatial_shapes \[\(3, 3\)\].*12"):
        multi_scale_deformable_attention(value, [(3, 3)], locations, torch.zeros(1, 3, 2, 1, 4))
    with pytest.raises(ValueError, match="attention_weights must be"):
        multi_scale_deformable_attention(value, [(3, 4)], locations, torch.zeros(1, 3, 2, 1, 3))


def test_written_out_softmax_matches_torch_in_value_and_gradient():
    torch.manual_seed(0)
    logits = (torch.randn(2, 50, 8, 12, dtype=torch.float64) * 30).requires_grad_()  # large, to test the shift
    logits.data[0, 0, 0] = 1e4  # would overflow exp without the shift
    upstream = torch.randn(2, 50, 8, 12, dtype=torch.float64)
    ours = _softmax(logits)
    (ours * upstream).sum().backward()
    ours_grad, logits.grad = logits.grad, None
    theirs = logits.softmax(dim=-1)
    (theirs * upstream).sum().backward()
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours_grad, logits.grad)


def test_sine_encoding_halves_encode_y_then_x():
    pos = sine_position_encoding(4, 6, 16, torch.device("cpu"), torch.float32)
    assert pos.shape == (16, 4, 6)
    y_half, x_half = pos[:8], pos[8:]
    assert torch.equal(y_half, y_half[:, :, :1].expand_as(y_half))  # constant along x
    assert torch.equal(x_half, x_half[:, :1, :].expand_as(x_half))  # constant along y
    # Channel 0 is sin of the normalised coordinate itself (frequency 1): last row at 2*pi.
    torch.testing.assert_close(y_half[0, :, 0], torch.sin(torch.arange(1, 5) / 4 * 2 * math.pi), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# The pixel decoder


@pytest.mark.parametrize("height, width", [(64, 96), (70, 100)])
def test_output_shapes(backbone, height, width):
    pixel_decoder = _pixel_decoder(backbone)
    features = backbone(_images(2, height, width))
    out = pixel_decoder(features)
    assert isinstance(out, PixelDecoderOutput)
    assert out.mask_features.shape == (2, TINY.d_model, *features.res2.shape[-2:])
    expected = [features.res5, features.res4, features.res3]  # coarse to fine
    assert [m.shape for m in out.multi_scale_memory] == [(2, TINY.d_model, *f.shape[-2:]) for f in expected]
    assert [p.shape for p in out.multi_scale_pos] == [m.shape for m in out.multi_scale_memory]
    if (height, width) == (70, 100):
        assert out.mask_features.shape[-2:] == (17, 25)
    assert torch.isfinite(out.mask_features).all()
    assert all(torch.isfinite(m).all() for m in out.multi_scale_memory)


def test_every_parameter_gets_a_finite_gradient(backbone):
    pixel_decoder = _pixel_decoder(backbone).train()
    features = backbone(_images(2, 64, 96))
    gen = torch.Generator().manual_seed(3)

    def backward() -> None:
        pixel_decoder.zero_grad()
        out = pixel_decoder(features)
        # Random projections of each output, so no gradient is zero by symmetry.
        loss = (out.mask_features * torch.randn(out.mask_features.shape, generator=gen)).sum()
        loss = loss + sum((m * torch.randn(m.shape, generator=gen)).sum() for m in out.multi_scale_memory)
        loss.backward()

    backward()
    for name, param in pixel_decoder.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
    # Deformable-DETR's init zeroes the weights of the offset and attention-weight layers, the
    # only layers that read the query (content + position), so on the very first step the
    # positional side, and with it the level embeddings, gets exactly zero gradient.
    assert torch.count_nonzero(pixel_decoder.level_embed.grad) == 0
    torch.optim.SGD(pixel_decoder.parameters(), lr=1e-2).step()
    backward()
    for name, param in pixel_decoder.named_parameters():
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient after one step"


def test_end_to_end_step_trains_the_pixel_decoder_and_not_the_backbone(backbone):
    pixel_decoder = _pixel_decoder(backbone)
    model = nn.ModuleDict({"backbone": backbone, "pixel_decoder": pixel_decoder}).train()
    assert not backbone.training and pixel_decoder.training
    backbone_before = {k: v.clone() for k, v in backbone.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in pixel_decoder.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    out = pixel_decoder(backbone(_images(2, 64, 96)))
    loss = out.mask_features.square().mean() + sum(m.square().mean() for m in out.multi_scale_memory)
    loss.backward()
    optimizer.step()
    assert all(torch.equal(v, backbone_before[k]) for k, v in backbone.state_dict().items())
    assert all(not torch.equal(v, decoder_before[k]) for k, v in pixel_decoder.state_dict().items())


def test_frames_folded_into_the_batch_are_decoded_independently():
    """Video runs the pixel decoder per frame: decoding (B*T) frames at once equals decoding
    each frame alone (GroupNorm and the encoder never mix batch entries)."""
    torch.manual_seed(0)
    channels = (8, 16, 24, 32)
    pixel_decoder = build_pixel_decoder(TINY, channels).eval()
    gen = torch.Generator().manual_seed(1)
    maps = [torch.randn(3, c, 32 // s, 48 // s, generator=gen) for c, s in zip(channels, (1, 2, 4, 8))]
    features = BackboneFeatures(res2=maps[0], res3=maps[1], res4=maps[2], res5=maps[3], clip_dense=maps[3])
    together = pixel_decoder(features)
    for i in range(3):
        alone_maps = [m[i : i + 1] for m in maps]
        alone = pixel_decoder(BackboneFeatures(*alone_maps, clip_dense=alone_maps[3]))
        torch.testing.assert_close(together.mask_features[i : i + 1], alone.mask_features, atol=1e-5, rtol=1e-5)


def test_wrong_channels_are_named():
    pixel_decoder = build_pixel_decoder(TINY, (8, 16, 24, 32))
    maps = [torch.zeros(1, c, 8 // s, 8 // s) for c, s in zip((8, 16, 25, 32), (1, 2, 4, 8))]
    with pytest.raises(ValueError, match=r"res4 must have 24 channels, got \(1, 25, 2, 2\)"):
        pixel_decoder(BackboneFeatures(*maps, clip_dense=maps[3]))
    with pytest.raises(ValueError, match="in_channels must give res2..res5"):
        build_pixel_decoder(TINY, (16, 24, 32))


def test_paper_size_parameter_count():
    """The reference sizes (docs/reference.md) on convnext_large_d_320 channels: 5,790,144, the reference's ~5.8M.

    input projections 690,432 (1x1 convs + GroupNorm for res5, res4, res3), 6 encoder layers x
    732,192 (deformable attention 205,600, FFN 525,568, LayerNorms 1,024), level embeddings 768,
    the stride-4 lateral 1x1 + output 3x3 convs 640,000 (bias-free convs + GroupNorm) and the
    1x1 mask-feature conv 65,792.
    """
    pixel_decoder = build_pixel_decoder(PixelDecoderConfig(), (192, 384, 768, 1536))
    def count(module):
        return sum(p.numel() for p in module.parameters())
    assert count(pixel_decoder.input_proj) == 690_432
    assert [count(layer) for layer in pixel_decoder.layers] == [732_192] * 6
    assert count(pixel_decoder.lateral_conv) + count(pixel_decoder.output_conv) == 640_000
    assert count(pixel_decoder) == 5_790_144
