"""The frozen CLIP backbone at tiny size: declared features, freezing, text and visual heads, checkpoints."""

import pytest
import torch
from torch import nn

from omgseg.model.backbone import BackboneFeatures, ClipBackbone, build_backbone
from omgseg.model.clip_model import TINY_MODEL_NAME


@pytest.fixture(scope="module")
def backbone() -> ClipBackbone:
    torch.manual_seed(0)
    return build_backbone(TINY_MODEL_NAME)


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=gen, dtype=torch.uint8)


def test_features_have_the_declared_names_channels_and_strides(backbone):
    specs = backbone.feature_specs
    assert [s.name for s in specs] == ["res2", "res3", "res4", "res5"]
    assert [s.stride for s in specs] == [4, 8, 16, 32]
    # Read from timm's convnext_atto, the tiny config's trunk.
    assert [s.channels for s in specs] == [40, 80, 160, 320]
    features = backbone(_images(2, 64, 96))
    assert isinstance(features, BackboneFeatures)
    for spec, tensor in zip(specs, features.as_list()):
        assert tensor.shape == (2, spec.channels, 64 // spec.stride, 96 // spec.stride), (spec, tensor.shape)
        assert torch.isfinite(tensor).all()
    assert features.clip_dense.shape == features.res5.shape


def test_odd_sizes_floor_each_stride(backbone):
    features = backbone(_images(1, 70, 100))
    assert [tuple(t.shape[-2:]) for t in features.as_list()] == [(17, 25), (8, 12), (4, 6), (2, 3)]


def test_uint8_and_unit_float_inputs_agree(backbone):
    images = _images(1, 64, 64)
    from_uint8 = backbone(images).res5
    from_float = backbone(images.float() / 255.0).res5
    torch.testing.assert_close(from_uint8, from_float)


def test_bad_inputs_name_what_was_received(backbone):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(1, 1, 64, 64\)"):
        backbone(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="in \\[0, 1\\].*255"):
        backbone(torch.full((1, 3, 64, 64), 255.0))
    with pytest.raises(ValueError, match="at least 32x32.*16x64"):
        backbone(torch.zeros(1, 3, 16, 64))


def test_no_parameter_requires_grad_and_eval_mode_survives_train(backbone):
    assert all(not p.requires_grad for p in backbone.parameters())
    parent = nn.ModuleDict({"backbone": backbone, "head": nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training
    assert not any(m.training for m in backbone.modules()), [n for n, m in backbone.named_modules() if m.training]
    # The tiny config has drop-path 0.1: in train mode two passes would differ.
    images = _images(1, 64, 64)
    torch.testing.assert_close(backbone(images).res5, backbone(images).res5, rtol=0, atol=0)
    assert not backbone(images).res5.requires_grad


def test_optimizer_step_leaves_the_backbone_unchanged(backbone):
    """A trainable head reads every level; the end-to-end version (with the pixel decoder) is in
    test_pixel_decoder.py."""
    torch.manual_seed(1)
    heads = nn.ModuleList(nn.Conv2d(s.channels, 1, kernel_size=1) for s in backbone.feature_specs)
    model = nn.ModuleDict({"backbone": backbone, "heads": heads}).train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    heads_before = [h.weight.clone() for h in heads]
    # Every parameter goes to the optimizer on purpose, with weight decay: frozen ones must
    # survive because they never get a gradient.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    features = backbone(_images(2, 64, 96))
    loss = sum(head(x).square().mean() for head, x in zip(heads, features.as_list()))
    loss.backward()
    optimizer.step()
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, before[key]), f"backbone {key} changed"
    assert all(p.grad is None for p in backbone.parameters())
    assert all(not torch.equal(h.weight, w) for h, w in zip(heads, heads_before)), "the step did not happen"


def test_text_embeddings_are_unit_vectors_of_the_embedding_dim(backbone):
    tokens = backbone.tokenize(["a photo of a cat.", "a photo of a dog.", "sky"])
    assert tokens.shape == (3, backbone.context_length) == (3, 77)
    embeddings = backbone.encode_text(tokens)
    assert embeddings.shape == (3, backbone.embed_dim) == (3, 128)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(embeddings[0], embeddings[1])
    with pytest.raises(TypeError, match="single string"):
        backbone.tokenize("a cat")
    with pytest.raises(ValueError, match=r"\(N, 77\).*\(3, 10\)"):
        backbone.encode_text(tokens[:, :10])


def test_visual_head_on_global_average_equals_clip_image_embedding(backbone):
    """Mask pooling with a full mask is global average pooling: the head must then reproduce
    CLIP's own image embedding, which shows it is the same head (norm + projection)."""
    images = _images(2, 64, 96)
    pooled = backbone(images).clip_dense.mean(dim=(2, 3))  # (2, C5)
    embedding = backbone.visual_head(pooled)
    assert embedding.shape == (2, backbone.embed_dim)
    normalised = (images / 255.0 - backbone.pixel_mean) / backbone.pixel_std
    with torch.no_grad():
        expected = backbone.clip.encode_image(normalised)
    torch.testing.assert_close(embedding, expected)
    with pytest.raises(ValueError, match=r"\(N, 320\).*\(2, 40\)"):
        backbone.visual_head(torch.zeros(2, 40))


def test_local_checkpoint_round_trip(tmp_path):
    import open_clip

    torch.manual_seed(123)
    source = open_clip.create_model(TINY_MODEL_NAME, pretrained=None)
    path = tmp_path / "tiny_clip.pt"
    torch.save(source.state_dict(), path)

    torch.manual_seed(999)  # a different random init, which the checkpoint must overwrite
    loaded = build_backbone(TINY_MODEL_NAME, checkpoint=path)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.clip.state_dict()[key], value), key
    torch.manual_seed(999)
    random = build_backbone(TINY_MODEL_NAME)
    images = _images(1, 64, 64)
    source.eval()
    normalised = (images / 255.0 - loaded.pixel_mean) / loaded.pixel_std
    with torch.no_grad():
        expected = source.visual.trunk.forward_intermediates(normalised, intermediates_only=True)
    torch.testing.assert_close(loaded(images).as_list(), expected, rtol=0, atol=0)
    assert not torch.equal(random(images).res5, expected[-1])


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere" / "open_clip_pytorch_model.bin"
    with pytest.raises(FileNotFoundError, match="nowhere/open_clip_pytorch_model.bin.*never downloaded"):
        build_backbone(TINY_MODEL_NAME, checkpoint=missing)
    # A pretrained tag is not a local file: it must not trigger a download, and the error says
    # where tags go instead.
    with pytest.raises(FileNotFoundError, match="laion2b_s29b_b131k_ft_soup.*clip_pretrained=laion2b_s29b_b131k_ft_soup"):
        build_backbone("convnext_large_d_320", checkpoint="laion2b_s29b_b131k_ft_soup")


def test_unknown_model_lists_examples_of_each_family():
    with pytest.raises(ValueError, match="unknown open_clip model 'convnext_nope'.*convnext_large_d_320.*RN50.*ViT-B-16"):
        build_backbone("convnext_nope")


@pytest.mark.slow
def test_paper_backbone_channels_read_from_the_model():
    """convnext_large_d_320 (random weights): the reference's channels and embedding width."""
    backbone = build_backbone("convnext_large_d_320")
    assert [s.channels for s in backbone.feature_specs] == [192, 384, 768, 1536]
    assert [s.stride for s in backbone.feature_specs] == [4, 8, 16, 32]
    assert backbone.embed_dim == 768
    features = backbone(_images(1, 64, 96))
    assert features.res5.shape == (1, 1536, 2, 3)
