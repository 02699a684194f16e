"""The shared decoder at tiny size: shapes, attention isolation, tubes, mask pooling, gradients."""

import math

import pytest
import torch

from omgseg.model.criterion import LossWeights, SetCriterion
from omgseg.model.decoder import (
    DecoderConfig,
    OMGDecoder,
    build_decoder,
    mask_pool,
    video_position_encoding,
)
from omgseg.model.matcher import HungarianMatcher
from omgseg.model.structures import MatchTargets, PromptBatch, PromptKind

D, HEADS, LAYERS, QUERIES, TEXT, CLASSES, SIZE = 32, 4, 3, 8, 16, 5, 32


def _decoder(seed: int = 0) -> OMGDecoder:
    torch.manual_seed(seed)
    return OMGDecoder(
        d_model=D, num_heads=HEADS, ffn_dim=64, num_layers=LAYERS, num_object_queries=QUERIES,
        num_levels=3, text_dim=TEXT, logit_scale=100.0, mask_threshold=0.5,
    ).eval()


def _inputs(b: int, t: int, seed: int = 1):
    """Pixel-decoder outputs for 32x32 inputs: mask features at stride 4, memory at 32, 16, 8."""
    gen = torch.Generator().manual_seed(seed)
    mask_features = torch.randn(b * t, D, SIZE // 4, SIZE // 4, generator=gen)
    memory = [torch.randn(b * t, D, SIZE // s, SIZE // s, generator=gen) for s in (32, 16, 8)]
    text = torch.randn(CLASSES, TEXT, generator=gen)
    return mask_features, memory, text


def _points(xy: list[list[float]], negatives: bool = False) -> PromptBatch:
    """Clicks; with negatives=True each prompt also gets a negative click and, for every
    other prompt, a second positive one (padding where absent)."""
    k = len(xy)
    if not negatives:
        return PromptBatch.from_points(torch.tensor(xy), (SIZE, SIZE))
    clicks = torch.tensor([[[2.0, 2.0], [30.0, 3.0]]] * k)  # (K, 2, 2)
    labels = torch.tensor([[0, 1 if i % 2 == 0 else -1] for i in range(k)])
    return PromptBatch.from_points(torch.tensor(xy), (SIZE, SIZE), clicks, labels)


def _box(xyxy: list[list[float]]) -> PromptBatch:
    return PromptBatch(torch.tensor(xyxy), (PromptKind.BOX,) * len(xyxy), (SIZE, SIZE))


@pytest.mark.parametrize("num_frames", [1, 2])
@pytest.mark.parametrize("with_prompts", [False, True])
def test_output_shapes(num_frames, with_prompts):
    dec = _decoder()
    mf, mem, text = _inputs(2, num_frames)
    prompts = [_points([[4.0, 5.0], [20.0, 9.0]], negatives=True), _box([[1.0, 2.0, 12.0, 30.0]])] if with_prompts else None
    out = dec(mf, mem, num_frames, text, prompts)
    q = QUERIES + (2 if with_prompts else 0)
    assert len(out.aux) == LAYERS  # initial queries + layers 1..L-1; the last layer is `out`
    for o in [out, *out.aux]:
        assert o.mask_logits.shape == (2, q, num_frames, SIZE // 4, SIZE // 4)
        assert o.class_logits.shape == (2, q, CLASSES + 1)
        assert o.id_embeddings.shape == (2, q, D)
        assert o.num_object_queries == QUERIES
        assert o.mask_logits.dtype == o.class_logits.dtype == torch.float32
        assert all(torch.isfinite(x).all() for x in (o.mask_logits, o.class_logits, o.id_embeddings))
    expected_valid = [[True, True], [True, False]] if with_prompts else [[], []]
    assert out.prompt_valid.tolist() == expected_valid
    # Cosine logits are bounded by the scale; the void column is free.
    assert out.class_logits[..., :CLASSES].abs().max() <= 100.0 + 1e-3


def test_adding_prompts_does_not_change_object_queries():
    dec = _decoder()
    mf, mem, text = _inputs(2, 2)
    alone = dec(mf, mem, 2, text, None)
    prompts = [_points([[4.0, 5.0], [20.0, 9.0], [7.0, 7.0]], negatives=True), _box([[1.0, 2.0, 12.0, 30.0]])]
    mixed = dec(mf, mem, 2, text, prompts)
    for a, m in zip([alone, *alone.aux], [mixed, *mixed.aux]):
        torch.testing.assert_close(m.mask_logits[:, :QUERIES], a.mask_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(m.class_logits[:, :QUERIES], a.class_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(m.id_embeddings[:, :QUERIES], a.id_embeddings, rtol=1e-4, atol=1e-4)


def test_a_prompt_does_not_depend_on_other_prompts():
    dec = _decoder()
    mf, mem, text = _inputs(1, 2)
    target = [20.0, 9.0]
    crowd = dec(mf, mem, 2, text, [_points([[4.0, 5.0], target, [30.0, 30.0]])])
    alone = dec(mf, mem, 2, text, [_points([target])])
    for c, a in zip([crowd, *crowd.aux], [alone, *alone.aux]):
        torch.testing.assert_close(c.mask_logits[:, QUERIES + 1], a.mask_logits[:, QUERIES], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(c.class_logits[:, QUERIES + 1], a.class_logits[:, QUERIES], rtol=1e-4, atol=1e-4)
    # ... and different prompts do give different outputs.
    assert not torch.allclose(crowd.mask_logits[:, QUERIES], crowd.mask_logits[:, QUERIES + 1])


def test_frames_are_unfolded_frame_major():
    dec = _decoder()
    mf, mem, text = _inputs(2, 2)
    base = dec(mf, mem, 2, text).aux[0]  # the initial queries' prediction: no attention yet
    mf2 = mf.clone()
    mf2[3] += 1.0  # clip 1, frame 1
    moved = dec(mf2, mem, 2, text).aux[0]
    torch.testing.assert_close(moved.mask_logits[0], base.mask_logits[0])
    torch.testing.assert_close(moved.mask_logits[1, :, 0], base.mask_logits[1, :, 0])
    assert not torch.allclose(moved.mask_logits[1, :, 1], base.mask_logits[1, :, 1])


def test_empty_attention_mask_falls_back_to_attending_everywhere():
    mf, mem, text = _inputs(1, 2)
    dec = _decoder()
    dec.mask_logit_threshold = math.inf  # no logit is above: every row is empty -> fallback
    everything_blocked = dec(mf, mem, 2, text, [_points([[4.0, 5.0]])])
    dec.mask_logit_threshold = -math.inf  # nothing is ever blocked
    nothing_blocked = dec(mf, mem, 2, text, [_points([[4.0, 5.0]])])
    assert torch.isfinite(everything_blocked.mask_logits).all()
    torch.testing.assert_close(everything_blocked.mask_logits, nothing_blocked.mask_logits)
    dec.mask_logit_threshold = 0.0  # sigmoid 0.5, the default
    masked = dec(mf, mem, 2, text, [_points([[4.0, 5.0]])])
    assert not torch.allclose(masked.mask_logits, nothing_blocked.mask_logits)


def test_image_position_encoding_is_frame_zero_of_a_video():
    image = video_position_encoding(1, 3, 4, D, torch.device("cpu"), torch.float32)
    video = video_position_encoding(2, 3, 4, D, torch.device("cpu"), torch.float32)
    assert video.shape == (2 * 3 * 4, D)
    torch.testing.assert_close(video[: 3 * 4], image)
    assert not torch.allclose(video[3 * 4 :], image)


def _slow_mask_pool(features, mask_logits):
    b, c, t, h, w = features.shape
    q = mask_logits.shape[1]
    out = torch.zeros(b, q, c, dtype=torch.float64)
    for i in range(b):
        for j in range(q):
            num, den = torch.zeros(c, dtype=torch.float64), 0.0
            for f in range(t):
                for y in range(h):
                    for x in range(w):
                        weight = torch.sigmoid(mask_logits[i, j, f, y, x].double())
                        num += weight * features[i, :, f, y, x].double()
                        den += weight.item()
            out[i, j] = num / (den + 1e-6)
    return out


def test_mask_pool_matches_slow_loop():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 3, 2, 4, 5, generator=gen)
    logits = 3 * torch.randn(2, 4, 2, 4, 5, generator=gen)
    torch.testing.assert_close(mask_pool(feats, logits).double(), _slow_mask_pool(feats, logits), rtol=1e-5, atol=1e-5)
    # Images: (B, C, h, w) is the T = 1 case.
    torch.testing.assert_close(mask_pool(feats[:, :, 0], logits[:, :, 0]), mask_pool(feats[:, :, :1], logits[:, :, :1]))
    # Logits at another resolution are resized to the features'.
    assert mask_pool(feats, torch.randn(2, 4, 2, 8, 10)).shape == (2, 4, 3)


def test_wrong_inputs_name_the_shape():
    dec = _decoder()
    mf, mem, text = _inputs(1, 2)
    with pytest.raises(ValueError, match=r"32 channels, got \(2, 16, 8, 8\)"):
        dec(mf[:, :16], mem, 2, text)
    with pytest.raises(ValueError, match="not a multiple of num_frames=3"):
        dec(mf, mem, 3, text)
    with pytest.raises(ValueError, match=r"text_embeddings must be \(C, 16\) or \(C, S, 16\), got \(5, 7\)"):
        dec(mf, mem, 2, text[:, :7])
    with pytest.raises(ValueError, match=r"boxes must have shape \(\*, 4\), got \(2, 3\)"):
        PromptBatch(torch.zeros(2, 3), (PromptKind.BOX,) * 2, (SIZE, SIZE))


def _clip_targets(t: int, num_prompts: int, seed: int) -> MatchTargets:
    gen = torch.Generator().manual_seed(seed)
    n = 3
    return MatchTargets(
        labels=torch.randint(0, CLASSES, (n,), generator=gen),
        masks=torch.rand(n, t, SIZE, SIZE, generator=gen) > 0.5,
        track_ids=torch.arange(n),
        prompt_masks=torch.rand(num_prompts, t, SIZE, SIZE, generator=gen) > 0.5 if num_prompts else None,
    )


@pytest.mark.parametrize("with_prompts", [True, False])
def test_every_parameter_gets_a_gradient_and_no_nan(with_prompts):
    dec = _decoder().train()
    mf, mem, text = _inputs(2, 2)
    mf.requires_grad_(True)
    prompts = [_points([[4.0, 5.0], [20.0, 9.0]], negatives=True), _box([[1.0, 2.0, 12.0, 30.0]])]
    criterion = SetCriterion(HungarianMatcher(num_points=64), LossWeights(), num_points=64)
    if with_prompts:
        out = dec(mf, mem, 2, text, prompts)
        targets = [_clip_targets(2, 2, 0), _clip_targets(2, 1, 1)]
    else:
        out = dec(mf, mem, 2, text)
        targets = [_clip_targets(2, 0, 0), _clip_targets(2, 0, 1)]
    losses = criterion(out, targets)
    sum(losses.values()).backward()
    missing = [n for n, p in dec.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in dec.parameters())
    # Parameters that losses really train have nonzero gradients; only the prompt encoder,
    # in a batch without prompts, is kept in the graph at weight 0.
    zero_ok = () if with_prompts else ("prompt_encoder.",)
    dead = [n for n, p in dec.named_parameters() if not n.startswith(zero_ok) and p.grad.abs().sum() == 0]
    assert not dead, f"zero gradient for {dead}"


def test_paper_size_parameter_count():
    dec = build_decoder(DecoderConfig())
    layers = sum(p.numel() for m in (dec.cross_layers, dec.self_layers, dec.ffn_layers) for p in m.parameters())
    rest = sum(p.numel() for p in dec.parameters()) - layers
    assert 14.1e6 < layers < 14.3e6, layers  # docs/reference.md: decoder 14.2M
    # docs/reference.md: queries and heads about 1M. Ours: 0.81M, no identity head (the query
    # itself is the identity embedding, as in MinVIS), prompt encoder 0.2M included.
    assert 0.78e6 < rest < 0.85e6, rest


def test_attention_equals_torch_multihead_attention_with_the_same_weights():
    """The SDPA-based layer against nn.MultiheadAttention (its per-head repeated mask, True =
    blocked): same parameter names and shapes, same outputs; and the same initial weights for
    the same seed."""
    from omgseg.model.decoder import Attention

    torch.manual_seed(5)
    ours = Attention(D, HEADS)
    torch.manual_seed(5)
    theirs = torch.nn.MultiheadAttention(D, HEADS, batch_first=True)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0, msg=key)
    gen = torch.Generator().manual_seed(6)
    q, k = torch.randn(2, 7, D, generator=gen), torch.randn(2, 11, D, generator=gen)
    allowed = torch.rand(2, 7, 11, generator=gen) > 0.5
    allowed[:, :, 0] = True  # every query attends somewhere
    want = theirs(q, k, k, attn_mask=(~allowed).repeat_interleave(HEADS, dim=0), need_weights=False)[0]
    torch.testing.assert_close(ours(q, k, k, allowed), want, rtol=1e-5, atol=1e-6)


def test_attention_masks_from_resized_features_equal_resized_mask_logits():
    """Masked attention thresholds mask logits at the memory level. The decoder resizes the
    mask features once per level instead of every full-size mask: the slow reference resizes
    the full-size logits, as Mask2Former does."""
    dec = _decoder()
    gen = torch.Generator().manual_seed(7)
    b, t, q, h, w = 2, 2, QUERIES, SIZE // 4, SIZE // 4
    mask_feats = torch.randn(b, t, D, h, w, generator=gen)
    mask_emb = torch.randn(b, q, D, generator=gen)
    for size in ((1, 1), (2, 2), (4, 4)):
        logits = torch.einsum("bqc,btchw->bqthw", mask_emb, mask_feats)
        small = torch.nn.functional.interpolate(logits.flatten(1, 2), size=size, mode="bilinear", align_corners=False)
        want = small.view(b, q, -1).sigmoid() >= 0.5
        want = want | ~want.any(-1, keepdim=True)
        level = torch.nn.functional.interpolate(mask_feats.flatten(0, 1), size=size, mode="bilinear", align_corners=False)
        got = dec._attention_mask(mask_emb, level.view(b, t, D, *size))
        assert torch.equal(got, want), size


def test_inference_without_earlier_sets_gives_the_same_last_set():
    dec = _decoder()
    mf, mem, text = _inputs(2, 2)
    prompts = [_points([[4.0, 5.0]], negatives=True), _box([[1.0, 2.0, 12.0, 30.0]])]
    full = dec(mf, mem, 2, text, prompts)
    last = dec(mf, mem, 2, text, prompts, aux=False)
    assert last.aux == [] and len(full.aux) == LAYERS
    # The same numbers up to rounding: with the earlier sets, the heads' matrix products are
    # taken over all sets at once, and summed in another order.
    for name in ("mask_logits", "class_logits", "id_embeddings", "prompt_valid"):
        torch.testing.assert_close(getattr(last, name), getattr(full, name), rtol=1e-5, atol=1e-5, msg=name)
    assert last.prompt_counts == full.prompt_counts == (1, 1)


@pytest.mark.parametrize("threshold", [0.0, 1.0, 1.5])
def test_mask_threshold_outside_the_unit_interval_is_refused(threshold):
    with pytest.raises(ValueError, match="mask_threshold"):
        build_decoder(DecoderConfig(mask_threshold=threshold))


def test_masked_attention_thresholds_logits_as_the_sigmoid_would():
    dec = build_decoder(DecoderConfig(d_model=D, num_heads=4, ffn_dim=32, num_layers=1, num_object_queries=3,
                                      text_dim=D, mask_threshold=0.7))
    logits = torch.linspace(-3, 3, 601)
    allowed = logits >= dec.mask_logit_threshold
    assert torch.equal(allowed, logits.sigmoid() >= 0.7)
