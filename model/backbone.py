"""The frozen CLIP backbone of OMG-Seg: an open_clip model with a ConvNeXt (timm) visual trunk.

The visual trunk gives the four multi-scale feature maps res2..res5 (strides 4, 8, 16, 32) that
the pixel decoder reads. The rest of CLIP serves open-vocabulary classification:
- the text tower encodes class names (`tokenize` + `encode_text`);
- CLIP's own visual head, applied to mask-pooled last-stage features (`visual_head`), gives
  the second opinion of the FC-CLIP-style inference ensemble.

Everything is frozen (MODEL-NOTES, 'Backbone'): no parameter requires grad, the module stays in
eval mode whatever its parent asks, and every entry point runs under `torch.no_grad()`.

Besides open_clip's own configs, this module registers `tiny_clip` (configs/tiny_clip.json), a
random-weight CLIP for tests and smoke runs: a timm `convnext_atto` trunk (channels 40 / 80 /
160 / 320) with the paper model's MLP head, and a 2-layer, 128-wide text tower with CLIP's
vocabulary and context length, so the real tokenizer works with it unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD
from open_clip.timm_model import TimmModel
from torch import Tensor, nn

TINY_MODEL_NAME = "tiny_clip"
_TINY_CONFIG_PATH = Path(__file__).parent / "configs" / f"{TINY_MODEL_NAME}.json"
# open_clip silently skips a missing config path; an install without the package data would
# then fail later with a confusing "unknown model". Fail here, naming the file.
if not _TINY_CONFIG_PATH.is_file():
    raise FileNotFoundError(f"{_TINY_CONFIG_PATH} is missing: install omgseg with its package data (configs/*.json)")
open_clip.add_model_config(_TINY_CONFIG_PATH)

# The pixel decoder is built for these strides; a trunk with others is refused when built.
EXPECTED_STRIDES = (4, 8, 16, 32)


@dataclass(frozen=True)
class FeatureSpec:
    """One feature map the backbone declares: its name, channel count and stride (input px)."""

    name: str
    channels: int
    stride: int


@dataclass(frozen=True)
class BackboneFeatures:
    """The visual trunk's four stage outputs for a batch of B images of size (H, W).

    res2..res5: (B, C_l, H // s, W // s) for strides s = 4, 8, 16, 32 (ConvNeXt floors odd sizes).
    clip_dense: (B, C5, H // 32, W // 32), the last stage as CLIP's head sees it (after the
        trunk's pre-head norm, an identity for open_clip's ConvNeXt models). Mask-pool it and
        pass the pooled vectors to `ClipBackbone.visual_head`.
    """

    res2: Tensor
    res3: Tensor
    res4: Tensor
    res5: Tensor
    clip_dense: Tensor

    def __post_init__(self) -> None:
        maps = {"res2": self.res2, "res3": self.res3, "res4": self.res4, "res5": self.res5}
        batch = self.res2.shape[0]
        for name, tensor in maps.items():
            if tensor.dim() != 4 or tensor.shape[0] != batch:
                raise ValueError(f"BackboneFeatures.{name} must be ({batch}, C, h, w), got {tuple(tensor.shape)}")
        if self.clip_dense.shape != self.res5.shape:
            raise ValueError(
                f"BackboneFeatures.clip_dense must match res5 {tuple(self.res5.shape)}, "
                f"got {tuple(self.clip_dense.shape)}"
            )

    def as_list(self) -> list[Tensor]:
        """[res2, res3, res4, res5], fine to coarse."""
        return [self.res2, self.res3, self.res4, self.res5]


class ClipBackbone(nn.Module):
    """A frozen open_clip model whose visual tower is a timm ConvNeXt trunk.

    Args:
        model_name: an open_clip model name with a timm trunk, e.g. "convnext_large_d_320"
            (the paper's), "convnext_base", or "tiny_clip" (registered by this module).
        checkpoint: a LOCAL open_clip checkpoint file (a CLIP state dict), or None for random
            weights. Nothing is ever downloaded: a pretrained tag such as
            "laion2b_s29b_b131k_ft_soup" is not accepted, only a path to an existing file.

    Attributes (read from the built model, never guessed from its name):
        feature_specs: res2..res5 with their channels and strides.
        embed_dim: the width D of CLIP's joint image-text embedding.
        context_length: the number of tokens per text.
    """

    def __init__(self, model_name: str, checkpoint: str | Path | None = None) -> None:
        super().__init__()
        available = open_clip.list_models()
        if model_name not in available:
            convnexts = [name for name in available if "convnext" in name.lower()]
            raise ValueError(
                f"unknown open_clip model {model_name!r}; ConvNeXt ones: {convnexts} "
                f"(and {TINY_MODEL_NAME!r} for tests)"
            )
        pretrained = None
        if checkpoint is not None:
            path = Path(checkpoint).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"CLIP checkpoint {str(path)!r} for {model_name!r} does not exist; ClipBackbone "
                    f"never downloads: pass the path of a local checkpoint file, or None for random weights"
                )
            # An absolute path can never be mistaken by open_clip for a pretrained tag to download.
            pretrained = str(path.resolve())
        clip = open_clip.create_model(model_name, pretrained=pretrained)
        if not isinstance(clip.visual, TimmModel) or not hasattr(clip.visual.trunk, "feature_info"):
            raise ValueError(
                f"ClipBackbone needs a timm-trunk (ConvNeXt) CLIP model; {model_name!r} has a "
                f"{type(clip.visual).__name__} visual tower"
            )
        self.model_name = model_name
        self.clip = clip

        specs = []
        for info in clip.visual.trunk.feature_info:
            stride = int(info["reduction"])
            specs.append(FeatureSpec(name=f"res{int(math.log2(stride))}", channels=int(info["num_chs"]), stride=stride))
        strides = tuple(spec.stride for spec in specs)
        if strides != EXPECTED_STRIDES:
            raise ValueError(f"{model_name!r} trunk has stage strides {strides}, expected {EXPECTED_STRIDES}")
        self.feature_specs: tuple[FeatureSpec, ...] = tuple(specs)
        self.embed_dim: int = int(open_clip.get_model_config(model_name)["embed_dim"])
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.context_length: int = int(self.tokenizer.context_length)

        # ImageNet statistics, not CLIP's (MODEL-NOTES): the reference normalises this way.
        # Not persistent: they are constants, not state to checkpoint.
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

        for param in self.parameters():
            param.requires_grad = False
        self.train(False)

    def train(self, mode: bool = True) -> ClipBackbone:
        """Stay in eval mode whatever `mode` is: frozen means no dropout, no drop-path, and
        normalisation layers that never update statistics, even inside a parent in train mode."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def logit_scale(self) -> float:
        """CLIP's learned temperature (exp of its logit_scale): multiplies image-text cosines."""
        return float(self.clip.logit_scale.exp())

    @torch.no_grad()
    def forward(self, images: Tensor) -> BackboneFeatures:
        """images: (B, 3, H, W) RGB, either uint8 in [0, 255] or float in [0, 1]; H, W >= 32.

        Video: fold the frames into the batch (B*T, 3, H, W) before calling.
        """
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
        x = (x - self.pixel_mean) / self.pixel_std  # (B, 3, H, W)

        trunk = self.clip.visual.trunk
        last, stages = trunk.forward_intermediates(x, intermediates_only=False)
        if len(stages) != len(self.feature_specs):
            raise RuntimeError(f"trunk returned {len(stages)} stages, declared {len(self.feature_specs)}")
        res2, res3, res4, res5 = stages
        return BackboneFeatures(res2=res2, res3=res3, res4=res4, res5=res5, clip_dense=last)

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
        """CLIP's own image head on pooled last-stage features: (N, C5) -> (N, D), NOT normalised.

        `pooled` are vectors of `BackboneFeatures.clip_dense` averaged over regions (e.g. masks).
        They go through the trunk's head as 1x1 maps, so its global pooling is the identity and
        only its norm (LayerNorm for ConvNeXt) acts, then through open_clip's projection (a
        linear layer or an MLP): exactly what CLIP does to its globally pooled image feature.
        """
        c5 = self.feature_specs[-1].channels
        if pooled.dim() != 2 or pooled.shape[1] != c5:
            raise ValueError(f"pooled must be (N, {c5}), got {tuple(pooled.shape)}")
        x = self.clip.visual.trunk.head(pooled[:, :, None, None])  # (N, C5): pool 1x1, norm, flatten
        return self.clip.visual.head(x)  # (N, D)
