"""Every open_clip tower family at tiny width (ConvNeXt, ModifiedResNet, ViT), the ViT's feature
pyramid, CLIP weights from files and pretrained tags, and `omgseg model-info` with overrides.

Nothing here touches the network: towers have random weights or weights a test saved itself,
and the pretrained-tag tests force the Hugging Face hub offline and use a cache in tmp_path.
"""

import json
import pickle

import huggingface_hub.constants
import open_clip
import open_clip.pretrained
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from omgseg.model.backbone import ClipBackbone, SimpleFeaturePyramid, build_backbone
from omgseg.model.checkpoint import load_checkpoint, save_checkpoint
from omgseg.model.clip_model import TINY_MODEL_NAME, TINY_RN_MODEL_NAME, TINY_VIT_MODEL_NAME
from omgseg.model.config import model_config, tiny, with_overrides
from omgseg.model.omgseg import OMGSeg, parameter_counts
from omgseg.model.structures import MatchTargets
from omgseg.model.vocabulary import Vocabulary
from omgseg.platform.cli import main

FAMILIES = {TINY_MODEL_NAME: "convnext", TINY_RN_MODEL_NAME: "modified_resnet", TINY_VIT_MODEL_NAME: "vit"}


@pytest.fixture(scope="module")
def backbones() -> dict[str, ClipBackbone]:
    torch.manual_seed(0)
    return {name: build_backbone(name, pyramid_channels=32) for name in FAMILIES}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Nothing is downloaded in these tests: the hub is offline, its cache is this test's own
    folder, and open_clip's URL downloads (the openai tags) fail."""

    def no_url_download(url, *args, **kwargs):
        raise OSError(f"tests never download ({url})")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_url", no_url_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=gen, dtype=torch.uint8)


def _normalised(backbone: ClipBackbone, images: torch.Tensor) -> torch.Tensor:
    return (images / 255.0 - backbone.pixel_mean) / backbone.pixel_std


# ------------------------------------------------------------------------------------------------
# Each family: declared features, frozen CLIP, CLIP's own head


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_gives_the_declared_four_levels(backbones, name):
    backbone = backbones[name]
    assert backbone.family == FAMILIES[name]
    assert [s.stride for s in backbone.feature_specs] == [4, 8, 16, 32]
    features = backbone(_images(2, 64, 96))
    for spec, tensor in zip(backbone.feature_specs, features.as_list()):
        assert tensor.shape == (2, spec.channels, 64 // spec.stride, 96 // spec.stride), (spec, tensor.shape)
        assert torch.isfinite(tensor).all()
    dense = backbone.clip_dense_spec
    assert features.clip_dense.shape == (2, dense.channels, 64 // dense.stride, 96 // dense.stride)


def test_channels_and_strides_are_read_from_each_tower(backbones):
    # ModifiedResNet width 8: layer l has 8 * 2**l * 4 channels (bottleneck expansion 4).
    assert [s.channels for s in backbones[TINY_RN_MODEL_NAME].feature_specs] == [32, 64, 128, 256]
    assert backbones[TINY_RN_MODEL_NAME].clip_dense_spec.stride == 32
    # ViT: every pyramid level has pyramid_channels; CLIP's dense tokens keep the ViT's width at
    # its patch stride.
    vit = backbones[TINY_VIT_MODEL_NAME]
    assert [s.channels for s in vit.feature_specs] == [32, 32, 32, 32]
    assert (vit.clip_dense_spec.channels, vit.clip_dense_spec.stride) == (64, 16)


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_and_backward_train_only_what_is_not_clip(backbones, name):
    """The tiny OMG-Seg on each tower: one loss, one backward and one optimizer step. CLIP gets
    no gradient and does not change; every other part, the ViT's pyramid included, is trained."""
    torch.manual_seed(0)
    model = OMGSeg(with_overrides(tiny(), {"clip_model": name})).train()
    backbone = model.backbone
    assert not any(m.training for m in backbone.clip.modules())
    if backbone.pyramid is not None:
        assert backbone.pyramid.training
    vocabulary = Vocabulary.from_names(["person", "car", "sky"], [1, 1, 0])
    h, w = 64, 96
    masks = torch.zeros(2, 2, h, w, dtype=torch.bool)
    masks[0, :, 5:30, 10:40] = True
    masks[1, :, 35:60, 50:90] = True
    targets = MatchTargets(labels=torch.tensor([0, 2]), masks=masks, track_ids=torch.tensor([1, 2]))
    clips = _images(2, h, w).view(1, 2, 3, h, w)  # one clip of 2 frames
    outputs = model(clips, vocabulary)
    assert outputs.queries.mask_logits.shape[-2:] == (h // 4, w // 4)
    loss = sum(model.loss(outputs, [targets], across_workers=False).values())
    loss.backward()
    clip_before = {k: v.clone() for k, v in backbone.clip.state_dict().items()}
    trained = {k: p.clone() for k, p in model.named_parameters() if p.requires_grad}
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()

    assert all(p.grad is None and not p.requires_grad for p in backbone.clip.parameters())
    assert all(torch.equal(v, clip_before[k]) for k, v in backbone.clip.state_dict().items())
    for key, param in model.pixel_decoder.named_parameters():
        # (Deformable attention starts with zero offset and weight projections, so a few
        # pixel-decoder gradients are exactly zero at init; they must exist all the same.)
        assert param.grad is not None and torch.isfinite(param.grad).all(), key
    if backbone.pyramid is not None:
        for key, param in backbone.pyramid.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, f"pyramid {key} got no gradient"
    changed = [k for k, p in model.named_parameters() if k in trained and not torch.equal(p, trained[k])]
    assert any(k.startswith("backbone.pyramid.") for k in changed) == (name == TINY_VIT_MODEL_NAME)
    counts = parameter_counts(model)
    assert counts["total"] == counts["trainable"] + counts["backbone_visual"] + counts["backbone_text"]
    assert (counts["backbone_pyramid"] > 0) == (name == TINY_VIT_MODEL_NAME)


@pytest.mark.parametrize("name", FAMILIES)
def test_tower_maps_computed_once_give_the_same_outputs_after_training_steps(name):
    """`OMGSeg.tower` holds only the frozen part: the same images' maps, computed before two
    optimizer steps, give the outputs and gradients of a full forward after them (the ViT's
    pyramid, which the steps change, runs on the cached maps)."""
    torch.manual_seed(0)
    model = OMGSeg(with_overrides(tiny(), {"clip_model": name})).train()
    vocabulary = Vocabulary.from_names(["person", "sky"], [1, 0])
    clips = _images(2, 64, 64, seed=3).view(2, 1, 3, 64, 64)
    tower = model.tower(clips)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model(clips, vocabulary).queries.mask_logits.square().mean().backward()
        optimizer.step()
    full, cached = model(clips, vocabulary), model(clips, vocabulary, tower=tower)
    assert torch.equal(full.queries.mask_logits, cached.queries.mask_logits)
    assert torch.equal(full.queries.class_logits, cached.queries.class_logits)
    assert torch.equal(full.clip_features, cached.clip_features)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.autograd.grad(o.queries.mask_logits.square().mean(), trainable, allow_unused=True) for o in (full, cached)]
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(*grads))
    with pytest.raises(ValueError, match="images or their tower maps"):
        model.backbone()


def test_resnet_stages_are_what_clip_pools(backbones):
    """At CLIP's own input size, CLIP's attention pool on res5 reproduces its image embedding:
    layer1..layer4 are the tower's own stages, not a copy."""
    backbone = backbones[TINY_RN_MODEL_NAME]
    images = _images(2, 64, 64)
    res5 = backbone(images).res5
    with torch.no_grad():
        expected = backbone.clip.encode_image(_normalised(backbone, images))
        pooled = backbone.clip.visual.attnpool(res5)
    torch.testing.assert_close(pooled, expected)


def test_resnet_visual_head_is_attention_over_a_single_token(backbones):
    """Slow, obviously right reference: CLIP's attention pool (its own weights) with the pooled
    vector as the only query, key and value. Softmax over one key is 1, whatever q and k are."""
    backbone = backbones[TINY_RN_MODEL_NAME]
    pool = backbone.clip.visual.attnpool
    pooled = torch.randn(5, backbone.clip_dense_spec.channels, generator=torch.Generator().manual_seed(3))
    token = pooled[None]  # (1, N, C): one token per region
    with torch.no_grad():
        reference, _ = nn.functional.multi_head_attention_forward(
            query=token,
            key=token,
            value=token,
            embed_dim_to_check=token.shape[-1],
            num_heads=pool.num_heads,
            q_proj_weight=pool.q_proj.weight,
            k_proj_weight=pool.k_proj.weight,
            v_proj_weight=pool.v_proj.weight,
            in_proj_weight=None,
            in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None,
            bias_v=None,
            add_zero_attn=False,
            dropout_p=0.0,
            out_proj_weight=pool.c_proj.weight,
            out_proj_bias=pool.c_proj.bias,
            use_separate_proj_weight=True,
            training=False,
            need_weights=False,
        )
    embedding = backbone.visual_head(pooled)
    assert embedding.shape == (5, backbone.embed_dim)
    torch.testing.assert_close(embedding, reference[0])


def test_vit_tokens_match_open_clip_at_its_own_size(backbones):
    """At the ViT's training size the resized positional embedding is the original one, so our
    token pass must give CLIP's own image embedding from the class token."""
    backbone = backbones[TINY_VIT_MODEL_NAME]
    visual = backbone.clip.visual
    x = _normalised(backbone, _images(2, 64, 64))
    with torch.no_grad():
        tokens, grid = backbone.vit_tokens(x)
        expected = backbone.clip.encode_image(x)
    assert grid == (4, 4) and tokens.shape == (2, 17, 64)
    torch.testing.assert_close(visual.ln_post(tokens[:, 0]) @ visual.proj, expected)


def test_vit_runs_at_other_sizes_and_its_head_is_linear(backbones):
    backbone = backbones[TINY_VIT_MODEL_NAME]
    features = backbone(_images(1, 96, 128))
    assert features.clip_dense.shape == (1, 64, 6, 8)
    assert [tuple(t.shape[-2:]) for t in features.as_list()] == [(24, 32), (12, 16), (6, 8), (3, 4)]
    dense = features.clip_dense.flatten(2).transpose(1, 2)[0]  # (48, 64)
    # Projection is linear: the head of the mean token is the mean of the projected tokens.
    torch.testing.assert_close(backbone.visual_head(dense.mean(0, keepdim=True))[0], (dense @ backbone.clip.visual.proj).mean(0))
    with pytest.raises(ValueError, match=r"\(N, 64\).*\(2, 32\)"):
        backbone.visual_head(torch.zeros(2, 32))


@pytest.mark.parametrize(("patch", "scales"), [(8, (2, 1, 0.5, 0.25)), (16, (4, 2, 1, 0.5)), (32, (8, 4, 2, 1))])
def test_feature_pyramid_scales_follow_the_patch_stride(patch, scales):
    pyramid = SimpleFeaturePyramid(in_channels=64, patch_stride=patch, out_channels=16)
    assert pyramid.scales == scales
    grid = (128 // patch, 256 // patch)
    levels = pyramid(torch.randn(2, 64, *grid))
    assert [tuple(t.shape) for t in levels] == [(2, 16, 128 // s, 256 // s) for s in (4, 8, 16, 32)]
    # Deconvolutions for each 2x up, max pooling for each 2x down, nothing extra at scale 1.
    for scale, level in zip(scales, pyramid.levels):
        deconvs = sum(isinstance(m, nn.ConvTranspose2d) for m in level)
        pools = [m.kernel_size for m in level if isinstance(m, nn.MaxPool2d)]
        assert deconvs == (int(scale).bit_length() - 1 if scale > 1 else 0)
        assert pools == ([int(1 / scale)] if scale < 1 else [])


def test_feature_pyramid_refuses_a_patch_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="patch size 14 is not a power of two"):
        SimpleFeaturePyramid(in_channels=64, patch_stride=14, out_channels=16)


def test_unknown_tower_family_is_one_clear_line(tmp_path):
    """A timm ViT trunk (as SigLIP models have) has no stride-4..32 stages."""
    config = {
        "embed_dim": 128,
        "vision_cfg": {
            "timm_model_name": "vit_tiny_patch16_224",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 64,
        },
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
    }
    path = tmp_path / "tiny_timm_vit.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    with pytest.raises(ValueError, match=r"'tiny_timm_vit': its timm trunk VisionTransformer has stage strides \(16, .*supported towers"):
        build_backbone("tiny_timm_vit")


# ------------------------------------------------------------------------------------------------
# Weights: local files and pretrained tags


def test_a_checkpoint_of_another_model_names_the_keys(tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "tiny_clip.pt"
    torch.save(open_clip.create_model(TINY_MODEL_NAME).state_dict(), path)
    with pytest.raises(
        ValueError, match=r"tiny_clip.pt does not fit open_clip model 'tiny_clip_rn': \d+ keys missing, e\.g\. \['visual\..*unexpected"
    ):
        build_backbone(TINY_RN_MODEL_NAME, checkpoint=path)


def test_a_checkpoint_with_other_shapes_names_the_keys(tmp_path):
    state = open_clip.create_model(TINY_VIT_MODEL_NAME).state_dict()
    state["visual.proj"] = torch.zeros(64, 32)
    path = tmp_path / "wrong.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"wrong.pt does not fit .*'tiny_clip_vit': shapes differ for 1 keys, e\.g\. \['visual.proj'\]"):
        build_backbone(TINY_VIT_MODEL_NAME, checkpoint=path)


def test_a_checkpoint_holding_objects_is_refused_unread(tmp_path):
    """weights_only: a pickle that would run code is not loaded."""
    path = tmp_path / "objects.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": pickle.PickleError("an object")}, path)
    with pytest.raises(ValueError, match="objects.pt is not an open_clip state dict"):
        build_backbone(TINY_MODEL_NAME, checkpoint=path)


def test_vit_and_resnet_checkpoints_round_trip_as_safetensors(tmp_path):
    for name in (TINY_RN_MODEL_NAME, TINY_VIT_MODEL_NAME):
        torch.manual_seed(7)
        source = open_clip.create_model(name)
        path = tmp_path / f"{name}.safetensors"
        save_file(source.state_dict(), str(path))
        torch.manual_seed(8)
        loaded = build_backbone(name, checkpoint=path)
        for key, value in source.state_dict().items():
            assert torch.equal(loaded.clip.state_dict()[key], value), (name, key)


def test_unknown_tag_lists_the_models_tags():
    with pytest.raises(ValueError, match=r"unknown pretrained tag 'nope' for open_clip model 'RN50'; its tags: \['openai'"):
        build_backbone("RN50", pretrained="nope")
    with pytest.raises(
        ValueError, match=r"tag 'laion2b_s34b_b79k' for open_clip model 'tiny_clip'; its tags: none .*a tag of \[.*'ViT-B-32'"
    ):
        build_backbone(TINY_MODEL_NAME, pretrained="laion2b_s34b_b79k")
    with pytest.raises(ValueError, match="either as a local file .* or as a pretrained tag"):
        build_backbone(TINY_MODEL_NAME, checkpoint="x.pt", pretrained="openai")


def test_offline_tag_names_the_tag_the_cache_and_the_local_alternative(tmp_path):
    cache = tmp_path / "my_cache"
    with pytest.raises(FileNotFoundError) as caught:
        build_backbone("convnext_large_d_320", pretrained="laion2b_s29b_b131k_ft_soup", cache_dir=cache)
    message = str(caught.value)
    assert "\n" not in message
    assert "'laion2b_s29b_b131k_ft_soup' for 'convnext_large_d_320'" in message
    assert f"Hugging Face hub cache {cache} (repo laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup)" in message
    assert message.endswith("pass a local file with clip_checkpoint=/path/to/open_clip_model.safetensors instead")


def _cache_a_tag(monkeypatch, cache, model_name: str, tag: str, state: dict, quick_gelu: bool = False) -> None:
    """Register `tag` for `model_name` in open_clip's table and put its file into a hub cache laid
    out as huggingface_hub writes it, as if open_clip had downloaded it before."""
    repo = f"omgseg-test/{model_name}-{tag}"
    table = {
        **open_clip.pretrained._PRETRAINED.get(model_name, {}),
        tag: open_clip.pretrained._pcfg(hf_hub=f"{repo}/", quick_gelu=quick_gelu),
    }
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, model_name, table)
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file(state, str(snapshot / "open_clip_model.safetensors"))


def test_a_cached_tag_loads_offline(monkeypatch, tmp_path):
    """The tag path end to end: tag check, open_clip's hub lookup, the cached file, the weights."""
    torch.manual_seed(11)
    source = open_clip.create_model(TINY_VIT_MODEL_NAME)
    cache = tmp_path / "hub"
    _cache_a_tag(monkeypatch, cache, TINY_VIT_MODEL_NAME, "test_tag", source.state_dict())
    torch.manual_seed(12)
    backbone = build_backbone(TINY_VIT_MODEL_NAME, pretrained="test_tag", cache_dir=cache)
    for key, value in source.state_dict().items():
        assert torch.equal(backbone.clip.state_dict()[key], value), key


def test_model_with_a_tag_saves_only_its_trained_weights(monkeypatch, tmp_path):
    """With CLIP from a tag, a checkpoint leaves the frozen CLIP out but keeps the ViT pyramid,
    and loading rebuilds CLIP from the (cached) tag."""
    torch.manual_seed(13)
    _cache_a_tag(monkeypatch, tmp_path / "hub", TINY_VIT_MODEL_NAME, "test_tag", open_clip.create_model(TINY_VIT_MODEL_NAME).state_dict())
    config = with_overrides(tiny(), {"clip_model": TINY_VIT_MODEL_NAME, "clip_pretrained": "test_tag"})
    model = OMGSeg(config)
    state = model.checkpoint_state_dict()
    assert not any(k.startswith("backbone.clip.") for k in state)
    assert any(k.startswith("backbone.pyramid.") for k in state)
    path = save_checkpoint(model, tmp_path / "model.pt")
    loaded, _ = load_checkpoint(path)
    tensors = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    assert any(k.startswith("backbone.clip.") for k in tensors)
    for key, value in tensors.items():
        assert torch.equal(loaded.state_dict()[key], value), key


# ------------------------------------------------------------------------------------------------
# Config overrides and the model-info command


def test_overrides_follow_the_clip_embedding_width_and_check_types():
    config = with_overrides(tiny(), {"clip_model": "RN50", "decoder.num_layers": 3, "inference.ensemble_alpha": 1})
    assert (config.clip_model, config.decoder.text_dim, config.decoder.num_layers) == ("RN50", 1024, 3)
    assert config.inference.ensemble_alpha == 1.0
    assert with_overrides(tiny(), {"clip_model": "RN50", "decoder.text_dim": 64}).decoder.text_dim == 64
    with pytest.raises(ValueError, match=r"unknown model config key 'decoder.depth'; known: \['decoder.d_model'"):
        with_overrides(tiny(), {"decoder.depth": 3})
    with pytest.raises(ValueError, match="'decoder.num_layers' must be int, got 'three'"):
        with_overrides(tiny(), {"decoder.num_layers": "three"})
    with pytest.raises(ValueError, match="clip_checkpoint .* or clip_pretrained .*not both"):
        model_config("tiny", clip_checkpoint="a.pt", clip_pretrained="openai")


def test_model_info_takes_overrides_and_names_the_tower(capsys):
    assert main(["model-info", "tiny", f"clip_model={TINY_VIT_MODEL_NAME}", "pyramid_channels=32"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (info["clip_model"], info["clip_tower"], info["clip_weights"]) == (TINY_VIT_MODEL_NAME, "vit", "random")
    counts = info["parameters"]
    assert 0 < counts["backbone_pyramid"] < counts["trainable"]


def test_model_info_bad_input_is_one_line(capsys, tmp_path):
    cases = {
        ("model-info", "tiny", "clip_model=ViT-L-14"): "patch size 14 is not a power of two",
        ("model-info", "tiny", "decoder.depth=3"): "unknown model config key 'decoder.depth'",
        ("model-info", "tiny", "clip_model=RN50", "clip_pretrained=nope"): "unknown pretrained tag 'nope' for open_clip model 'RN50'",
        ("model-info", "tiny", "clip_model=ViT-B-32", "clip_pretrained=laion2b_s34b_b79k"): (
            f"not in the Hugging Face hub cache {tmp_path / 'hub'} (repo laion/CLIP-ViT-B-32-laion2B-s34B-b79K)"
        ),
    }
    for argv, expected in cases.items():
        assert main(list(argv)) == 1, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("omgseg model-info: error: ") and expected in err, err
        assert "\n" not in err


def test_a_train_config_names_a_pretrained_tag(monkeypatch, tmp_path):
    """`omgseg train`'s model block takes clip_pretrained and the run's model loads that tag's
    CLIP; naming a file and a tag at once is one clear error."""
    from omgseg.platform.config import ModelSpec, TrainConfig
    from omgseg.platform.training.loop import build_model

    torch.manual_seed(21)
    source = open_clip.create_model(TINY_MODEL_NAME)
    _cache_a_tag(monkeypatch, tmp_path / "hub", TINY_MODEL_NAME, "test_tag", source.state_dict())
    config = TrainConfig.model_validate({
        "data": {"root": str(tmp_path / "data"), "datasets": {"a": {"format": "coco-panoptic", "src": str(tmp_path)}}},
        "name": "tagged", "mix": {"a": 1.0}, "model": {"preset": "tiny", "clip_pretrained": "test_tag"}})
    model = build_model(config)
    assert model.config.clip_pretrained == "test_tag"
    for key, value in source.state_dict().items():
        assert torch.equal(model.backbone.clip.state_dict()[key], value), key
    with pytest.raises(ValueError, match="give clip_checkpoint .* or clip_pretrained .*, not both"):
        ModelSpec(clip_checkpoint=tmp_path / "x.pt", clip_pretrained="test_tag")
