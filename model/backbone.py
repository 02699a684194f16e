"""The frozen CLIP backbone of OMG-Seg: any open_clip model whose image tower is one of three
families, turned into the four multi-scale maps res2..res5 (strides 4, 8, 16, 32) that the
pixel decoder reads.

- convnext: a timm trunk with four stages at strides 4..32 (open_clip's ConvNeXt models, the
  paper's `convnext_large_d_320`). res2..res5 are its stages.
- modified_resnet: open_clip's ModifiedResNet (RN50, RN101, RN50x4, ...). res2..res5 are
  layer1..layer4 after the stride-4 stem.
- vit: open_clip's VisionTransformer (ViT-B-32, ViT-B-16, ...). A ViT has one resolution, its
  patch stride p; ViTDet's simple feature pyramid (`SimpleFeaturePyramid`) builds res2..res5
  from the last block's patch tokens by 2x deconvolutions (strides finer than p), the identity
  (stride p) and max pooling (strides coarser than p).

The rest of CLIP serves open-vocabulary classification: the text tower encodes class names
(`tokenize` + `encode_text`), and CLIP's own image head applied to mask-pooled dense features
(`visual_head`) gives the second opinion of the FC-CLIP-style inference ensemble.

Frozen (docs/reference.md, 'Backbone'): no parameter of the CLIP model requires grad, it stays in eval
mode whatever its parent asks, and it always runs under `torch.no_grad()`. The one exception is
the ViT's feature pyramid: it is new, randomly initialised and must be trained, so it lives in
this module as `pyramid`, outside `clip`, and is left out of the freezing on purpose.

Weights: `build_backbone` builds the open_clip model with its weights (model/clip_model.py:
a local file or an open_clip tag) and hands it to `ClipBackbone`, whose constructor never
touches a file or the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from omgseg.model.clip_model import check_model_name, create_clip

# The pixel decoder is built for these strides; a tower that cannot give them is refused when built.
EXPECTED_STRIDES = (4, 8, 16, 32)
TOWER_FAMILIES = ("convnext", "modified_resnet", "vit")
_SUPPORTED = (
    "timm ConvNeXt trunks (convnext_*), open_clip ModifiedResNet (RN50, RN101, ...) "
    "and open_clip VisionTransformer (ViT-B-32, ViT-B-16, ...)"
)
# Feature shapes are measured by running this many pixels square through the tower once.
_PROBE_SIZE = 64


@dataclass(frozen=True)
class FeatureSpec:
    """One feature map the backbone declares: its name, channel count and stride (input px)."""

    name: str
    channels: int
    stride: int


@dataclass(frozen=True)
class TowerMaps:
    """What the frozen CLIP tower gives for a batch of images, before anything trainable:
    `stages`, its four stage maps (a ViT: one map, its patch tokens, for the pyramid), and
    `dense`, which becomes `BackboneFeatures.clip_dense`. Fixed images give fixed maps."""

    stages: tuple[Tensor, ...]
    dense: Tensor


@dataclass(frozen=True)
class BackboneFeatures:
    """The backbone's four multi-scale maps for a batch of B images of size (H, W).

    res2..res5: (B, C_l, ~H / s, ~W / s) for strides s = 4, 8, 16, 32 (convolutional towers
        floor odd sizes stage by stage; a ViT's pyramid derives every level from its patch grid).
    clip_dense: (B, C_clip, h, w), the frozen CLIP's dense features as its image head sees them
        (ConvNeXt: the last stage after the trunk's pre-head norm; ModifiedResNet: layer4; ViT:
        the patch tokens after ln_post, at the patch stride). Mask-pool it and pass the pooled
        vectors to `ClipBackbone.visual_head`.
    """

    res2: Tensor
    res3: Tensor
    res4: Tensor
    res5: Tensor
    clip_dense: Tensor

    def __post_init__(self) -> None:
        maps = {"res2": self.res2, "res3": self.res3, "res4": self.res4, "res5": self.res5, "clip_dense": self.clip_dense}
        batch = self.res2.shape[0]
        for name, tensor in maps.items():
            if tensor.dim() != 4 or tensor.shape[0] != batch:
                raise ValueError(f"BackboneFeatures.{name} must be ({batch}, C, h, w), got {tuple(tensor.shape)}")

    def as_list(self) -> list[Tensor]:
        """[res2, res3, res4, res5], fine to coarse."""
        return [self.res2, self.res3, self.res4, self.res5]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (ViTDet's norm in the feature pyramid)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: one map at the ViT's patch stride p -> four maps at
    strides 4, 8, 16, 32, every one `out_channels` wide. Trainable.

    Level at stride s, scale p / s:
    - scale > 1 (s finer than p): log2(scale) stride-2 2x2 deconvolutions, each halving the
      channels, with LayerNorm + GELU between them (ViTDet's stride-4 branch for p = 16);
    - scale = 1: the identity;
    - scale < 1: max pooling with kernel and stride 1 / scale.
    Then a 1x1 and a 3x3 convolution, each followed by LayerNorm (no bias: the norm has one).
    For p = 16 the scales are 4, 2, 1, 1/2 (ViT-B-16); for p = 32 they are 8, 4, 2, 1 (ViT-B-32).
    """

    def __init__(self, in_channels: int, patch_stride: int, out_channels: int) -> None:
        super().__init__()
        if patch_stride < 1 or patch_stride & (patch_stride - 1):
            raise ValueError(
                f"ViT patch size {patch_stride} is not a power of two: the simple feature pyramid reaches "
                f"strides {EXPECTED_STRIDES} from it only by factors of 2 (e.g. patch 16 or 32)"
            )
        self.patch_stride = patch_stride
        self.scales = tuple(patch_stride / stride for stride in EXPECTED_STRIDES)
        levels = []
        for scale in self.scales:
            layers: list[nn.Module] = []
            dim = in_channels
            if scale > 1:
                steps = int(math.log2(scale))
                if in_channels % 2**steps:
                    raise ValueError(f"ViT width {in_channels} must be divisible by {2**steps} for a {scale:g}x deconvolution")
                for step in range(steps):
                    layers.append(nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2))
                    dim //= 2
                    if step < steps - 1:
                        layers += [LayerNorm2d(dim), nn.GELU()]
            elif scale < 1:
                kernel = int(round(1 / scale))
                layers.append(nn.MaxPool2d(kernel_size=kernel, stride=kernel))
            layers += [
                nn.Conv2d(dim, out_channels, kernel_size=1, bias=False),
                LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
                LayerNorm2d(out_channels),
            ]
            levels.append(nn.Sequential(*layers))
        self.levels = nn.ModuleList(levels)

    def forward(self, x: Tensor) -> list[Tensor]:
        """x: (B, C, h, w) at the patch stride -> [res2, res3, res4, res5], each (B, out, h * scale, w * scale)."""
        return [level(x) for level in self.levels]


def build_backbone(
    model_name: str,
    checkpoint: str | Path | None = None,
    pretrained: str | None = None,
    pyramid_channels: int = 256,
    cache_dir: str | Path | None = None,
) -> ClipBackbone:
    """The frozen backbone of open_clip's `model_name` with its weights: a local `checkpoint`
    file, a `pretrained` tag (downloaded once into `cache_dir` or the hub cache), or neither for
    random weights (`omgseg.model.clip_model.create_clip`). pyramid_channels: the width of a ViT
    tower's feature pyramid levels."""
    check_model_name(model_name)
    _check_vit_patch(model_name)  # before building: a ViT-L can take a while to refuse
    clip = create_clip(model_name, checkpoint, pretrained, cache_dir)
    return ClipBackbone(clip, model_name, pyramid_channels)


class ClipBackbone(nn.Module):
    """A frozen open_clip model of any supported tower family, giving res2..res5.

    Args:
        clip: a built open_clip model (weights loaded already: `build_backbone`).
        model_name: its open_clip name (for its tokenizer and embedding width).
        pyramid_channels: ViT towers only: the width of each level of the feature pyramid.

    Attributes (read from the built model, never guessed from its name):
        family: one of TOWER_FAMILIES.
        feature_specs: res2..res5 with their channels and strides.
        clip_dense_spec: the channels and stride of `BackboneFeatures.clip_dense`.
        embed_dim: the width D of CLIP's joint image-text embedding.
        context_length: the number of tokens per text.
        pyramid: the trainable SimpleFeaturePyramid of a ViT tower, else None.
    """

    def __init__(self, clip: nn.Module, model_name: str, pyramid_channels: int = 256) -> None:
        super().__init__()
        self.model_name = model_name
        self.family = _tower_family(clip.visual, model_name)
        self.clip = clip
        self.pyramid: SimpleFeaturePyramid | None = None
        if self.family == "vit":
            visual = clip.visual
            self.pyramid = SimpleFeaturePyramid(visual.conv1.out_channels, visual.patch_size[0], pyramid_channels)
        self.embed_dim: int = int(open_clip.get_model_config(model_name)["embed_dim"])
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.context_length: int = int(self.tokenizer.context_length)

        # ImageNet statistics, not CLIP's (docs/reference.md): the reference normalises this way.
        # Not persistent: they are constants, not state to checkpoint.
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

        # Only the CLIP model is frozen: the ViT pyramid (outside `clip`) is trained.
        for param in self.clip.parameters():
            param.requires_grad = False
        self.train(False)
        self.feature_specs, self.clip_dense_spec = self._measure_features()

    def _measure_features(self) -> tuple[tuple[FeatureSpec, ...], FeatureSpec]:
        """res2..res5's and clip_dense's channels and strides, measured by running the tower on a
        probe image rather than trusted from the model's name; a tower whose strides are not
        EXPECTED_STRIDES is refused."""
        with torch.no_grad():
            probe = self(torch.zeros(1, 3, _PROBE_SIZE, _PROBE_SIZE, device=self.device))
        specs = []
        for tensor in probe.as_list():
            stride = _PROBE_SIZE // tensor.shape[-1]
            specs.append(FeatureSpec(name=f"res{int(math.log2(stride))}", channels=int(tensor.shape[1]), stride=stride))
        strides = tuple(spec.stride for spec in specs)
        if strides != EXPECTED_STRIDES:
            raise ValueError(f"{self.model_name!r} gives stage strides {strides}, expected {EXPECTED_STRIDES}")
        dense = probe.clip_dense
        return tuple(specs), FeatureSpec("clip_dense", int(dense.shape[1]), _PROBE_SIZE // dense.shape[-1])

    def train(self, mode: bool = True) -> ClipBackbone:
        """The CLIP model stays in eval mode whatever `mode` is: frozen means no dropout, no
        drop-path, and normalisation layers that never update statistics, even inside a parent in
        train mode. The ViT pyramid follows `mode` like any trainable module; the backbone
        itself reports training only when it has such a part."""
        super().train(mode)
        self.clip.train(False)
        self.training = mode and self.pyramid is not None
        return self

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def logit_scale(self) -> float:
        """CLIP's learned temperature (exp of its logit_scale): multiplies image-text cosines."""
        return float(self.clip.logit_scale.exp())

    def forward(self, images: Tensor | None = None, tower: TowerMaps | None = None) -> BackboneFeatures:
        """images: (B, 3, H, W) RGB, either uint8 in [0, 255] or float in [0, 1]; H, W >= 32.
        `tower`: what `self.tower(images)` gave for them before (the frozen part, computed
        once); when given, the tower does not run again and `images` may be None.

        The CLIP tower runs under no_grad; only a ViT's pyramid builds a graph (when the caller
        has gradients enabled). Video: fold the frames into the batch (B*T, 3, H, W) first.
        """
        if tower is None:
            if images is None:
                raise ValueError("the backbone needs images or their tower maps")
            tower = self.tower(images)
        stages = tower.stages if self.pyramid is None else self.pyramid(tower.stages[0])
        res2, res3, res4, res5 = stages
        return BackboneFeatures(res2=res2, res3=res3, res4=res4, res5=res5, clip_dense=tower.dense)

    @torch.no_grad()
    def tower(self, images: Tensor) -> TowerMaps:
        """The frozen CLIP tower's maps for `images` (as `forward` takes them): a function of the
        images alone, so a caller that runs the same images many times (the TAG look-ahead's
        held-out batches) computes them once."""
        stages, dense = self._tower(self._normalise(images))
        return TowerMaps(stages=tuple(stages), dense=dense)

    def _normalise(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) RGB, got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height < EXPECTED_STRIDES[-1] or width < EXPECTED_STRIDES[-1]:
            raise ValueError(f"images must be at least 32x32 (res5 has stride 32), got {height}x{width}")
        if images.dtype == torch.uint8:
            x = images.to(self.pixel_mean.dtype) / 255.0
        elif images.is_floating_point():
            # The classic mistake is float images still in [0, 255]; bicubic resizing may overshoot 1
            # a little, hence the margin.
            peak = float(images.abs().amax()) if images.numel() else 0.0
            if peak > 1.5:
                raise ValueError(f"float images must be in [0, 1], got values up to {peak:.1f}; pass uint8 for [0, 255]")
            x = images.to(self.pixel_mean.dtype)
        else:
            raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")
        return (x - self.pixel_mean) / self.pixel_std

    def _tower(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """Normalised images -> (the tower's maps, clip_dense). ConvNeXt and ModifiedResNet give
        their four stages; a ViT gives one map, its last block's patch tokens, for the pyramid."""
        visual = self.clip.visual
        if self.family == "convnext":
            last, stages = visual.trunk.forward_intermediates(x, intermediates_only=False)
            return list(stages), last
        if self.family == "modified_resnet":
            stages = []
            y = visual.stem(x)  # stride 4
            for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
                y = layer(y)
                stages.append(y)
            return stages, stages[-1]
        tokens, (h, w) = self.vit_tokens(x)
        patches = tokens[:, 1:]  # (B, h*w, width), the class token dropped
        dense = patches if visual.final_ln_after_pool else visual.ln_post(patches)
        return [_to_map(patches, h, w)], _to_map(dense, h, w)

    def vit_tokens(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """ViT only: normalised images (B, 3, H, W) -> the last block's tokens (B, 1 + h*w, width),
        class token first, and the patch grid (h, w) = (H // p, W // p).

        open_clip's own forward adds a positional embedding of the training grid only; here it
        is resized (bicubic) to the input's grid, so any image size >= 32 works.
        """
        visual = self.clip.visual
        patches = visual.conv1(x)  # (B, width, h, w)
        b, _, h, w = patches.shape
        tokens = patches.flatten(2).transpose(1, 2)  # (B, h*w, width)
        cls = visual.class_embedding.to(tokens.dtype).expand(b, 1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self._vit_position_embedding(h, w).to(tokens.dtype)
        tokens = visual.ln_pre(visual.patch_dropout(tokens))
        return visual.transformer(tokens), (h, w)

    def _vit_position_embedding(self, h: int, w: int) -> Tensor:
        """(1 + h*w, width): the class token's embedding and the patch grid's, resized to (h, w)."""
        visual = self.clip.visual
        pos = visual.positional_embedding
        grid_h, grid_w = visual.grid_size
        if (h, w) == (grid_h, grid_w):
            return pos
        grid = pos[1:].reshape(1, grid_h, grid_w, -1).permute(0, 3, 1, 2)  # (1, width, gh, gw)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([pos[:1], grid.flatten(2)[0].t()], dim=0)

    def tokenize(self, texts: list[str]) -> Tensor:
        """N texts -> (N, context_length) int64 token ids on the backbone's device."""
        if isinstance(texts, str):
            raise TypeError(f"tokenize takes a list of texts, got the single string {texts!r}")
        return self.tokenizer(texts).to(self.device)

    @torch.no_grad()
    def encode_text(self, token_ids: Tensor) -> Tensor:
        """(N, context_length) token ids from `tokenize` -> (N, D) unit-norm text embeddings."""
        if token_ids.dim() != 2 or token_ids.shape[1] != self.context_length or token_ids.is_floating_point():
            raise ValueError(
                f"token_ids must be integer (N, {self.context_length}), got {token_ids.dtype} {tuple(token_ids.shape)}"
            )
        return self.clip.encode_text(token_ids, normalize=True)

    @torch.no_grad()
    def visual_head(self, pooled: Tensor) -> Tensor:
        """CLIP's own image head on pooled dense features: (N, C_clip) -> (N, D), NOT normalised.

        `pooled` are vectors of `BackboneFeatures.clip_dense` averaged over regions (e.g. masks).
        - convnext: the trunk's head on 1x1 maps, so its global pooling is the identity and only
          its norm acts, then open_clip's projection: exactly what CLIP does to its globally
          pooled image feature.
        - modified_resnet: CLIP's attention pool sees one token, the region's vector. Softmax over
          a single key is 1, so attention reduces to its value and output projections,
          c_proj(v_proj(x)), whatever the query and key weights are. The positional embedding is
          left out: a region-pooled vector has no single position (MaskCLIP does the same).
        - vit: the projection (and ln_post, for towers that norm after pooling). ln_post acts per
          token, so it was already applied to clip_dense; the projection is linear, so
          projecting the pooled tokens equals pooling the projected ones. CLIP aligned the class
          token, not the patch tokens, with text: this second opinion is weaker for a ViT.
        """
        channels = self.clip_dense_spec.channels
        if pooled.dim() != 2 or pooled.shape[1] != channels:
            raise ValueError(f"pooled must be (N, {channels}), got {tuple(pooled.shape)}")
        visual = self.clip.visual
        if self.family == "convnext":
            x = visual.trunk.head(pooled[:, :, None, None])  # (N, C5): pool 1x1, norm, flatten
            return visual.head(x)  # (N, D)
        if self.family == "modified_resnet":
            return visual.attnpool.c_proj(visual.attnpool.v_proj(pooled))
        x = visual.ln_post(pooled) if visual.final_ln_after_pool else pooled
        return x @ visual.proj


def _to_map(tokens: Tensor, h: int, w: int) -> Tensor:
    """(B, h*w, C) row-major patch tokens -> (B, C, h, w)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


def _check_vit_patch(model_name: str) -> None:
    """Refuse, from its open_clip config alone, a ViT whose patch the pyramid cannot use."""
    vision = open_clip.get_model_config(model_name).get("vision_cfg", {})
    if "timm_model_name" in vision or isinstance(vision.get("layers"), (list, tuple)):
        return  # not open_clip's ViT
    patch = vision.get("patch_size", 16)
    if isinstance(patch, int) and (patch < 1 or patch & (patch - 1)):
        raise ValueError(
            f"{model_name!r}: ViT patch size {patch} is not a power of two: the simple feature pyramid reaches "
            f"strides {EXPECTED_STRIDES} from it only by factors of 2 (e.g. patch 16 or 32)"
        )


def _tower_family(visual: nn.Module, model_name: str) -> str:
    """The family of an open_clip image tower, or a ValueError saying why it is not supported."""
    if isinstance(visual, TimmModel):
        info = getattr(visual.trunk, "feature_info", None)
        strides = tuple(int(i["reduction"]) for i in info) if info is not None else ()
        if strides != EXPECTED_STRIDES:
            raise ValueError(
                f"{model_name!r}: its timm trunk {type(visual.trunk).__name__} has stage strides {strides}, "
                f"the pixel decoder needs four stages at {EXPECTED_STRIDES}; supported towers: {_SUPPORTED}"
            )
        return "convnext"
    if isinstance(visual, ModifiedResNet):
        return "modified_resnet"
    if isinstance(visual, VisionTransformer):
        if visual.attn_pool is not None:
            raise ValueError(f"{model_name!r}: a ViT with attentional pooling (CoCa) is not supported; supported towers: {_SUPPORTED}")
        if visual.patch_size[0] != visual.patch_size[1]:
            raise ValueError(f"{model_name!r}: non-square ViT patches {visual.patch_size} are not supported")
        return "vit"
    raise ValueError(f"{model_name!r} has a {type(visual).__name__} image tower, an unknown family; supported towers: {_SUPPORTED}")
