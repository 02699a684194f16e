"""The model's configuration: sizes of every part, loss weights and inference thresholds.

Two presets: `omgseg_convnext_large` (the paper's sizes, MODEL-NOTES) and `tiny` (a few
million parameters, for tests and the embedded default on 2 CPU cores).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from omgseg.model.backbone import TINY_MODEL_NAME
from omgseg.model.criterion import LossWeights
from omgseg.model.decoder import DecoderConfig
from omgseg.model.pixel_decoder import PixelDecoderConfig


@dataclass(frozen=True)
class MatcherCosts:
    """Weights of the Hungarian matching cost terms and the points they are computed on."""

    cost_class: float = 2.0
    cost_mask: float = 5.0
    cost_dice: float = 5.0
    num_points: int = 12544


@dataclass(frozen=True)
class InferenceConfig:
    """Post-processing thresholds (Mask2Former's panoptic and instance defaults) and the
    FC-CLIP-style ensemble with frozen CLIP (alpha: classes seen in training, beta: unseen),
    used only when the CLIP weights come from a checkpoint (random CLIP weights classify noise)."""

    object_mask_threshold: float = 0.8
    overlap_threshold: float = 0.8
    instance_top_k: int = 100
    prompt_mask_threshold: float = 0.5
    ensemble_alpha: float = 0.4
    ensemble_beta: float = 0.8
    use_clip_ensemble: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build an OMGSeg model (weights aside).

    clip_model: an open_clip model name with a ConvNeXt (timm) trunk.
    clip_checkpoint: a local open_clip checkpoint file for the frozen backbone, or None
        (random weights; nothing is ever downloaded).
    input_size: (height, width) of the training crop; inference takes any size >= 32.
    num_points / oversample_ratio / importance_sample_ratio: the loss's point sampling.
    """

    name: str
    clip_model: str
    clip_checkpoint: str | None = None
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    matcher: MatcherCosts = field(default_factory=MatcherCosts)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    input_size: tuple[int, int] = (736, 1280)
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75

    def __post_init__(self) -> None:
        if self.pixel_decoder.d_model != self.decoder.d_model:
            raise ValueError(
                f"model {self.name!r}: pixel_decoder.d_model {self.pixel_decoder.d_model} must equal "
                f"decoder.d_model {self.decoder.d_model} (the decoder reads the mask features)"
            )
        if min(self.input_size) < 32:
            raise ValueError(f"model {self.name!r}: input_size must be at least 32x32, got {self.input_size}")

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """The inverse of `to_dict` (checkpoints store the config this way)."""
        parts = {
            "pixel_decoder": PixelDecoderConfig, "decoder": DecoderConfig, "loss": LossWeights,
            "matcher": MatcherCosts, "inference": InferenceConfig,
        }
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known: {sorted(known)}")
        values = dict(data)
        for key, part in parts.items():
            if key in values and isinstance(values[key], dict):
                fields = {f.name for f in dataclasses.fields(part)}
                bad = sorted(set(values[key]) - fields)
                if bad:
                    raise ValueError(f"unknown keys {bad} in model config {key!r}; known: {sorted(fields)}")
                values[key] = part(**values[key])
        if "input_size" in values:
            values["input_size"] = tuple(values["input_size"])
        return cls(**values)


def omgseg_convnext_large(clip_checkpoint: str | None = None) -> ModelConfig:
    """The paper's model: ConvNeXt-Large CLIP, 6-layer deformable pixel decoder, 9-layer
    decoder with 300 queries, 768-d text space, 1280x736 crops (MODEL-NOTES)."""
    return ModelConfig(
        name="omgseg_convnext_large",
        clip_model="convnext_large_d_320",
        clip_checkpoint=clip_checkpoint,
        decoder=DecoderConfig(text_dim=768),
    )


def tiny(clip_checkpoint: str | None = None) -> ModelConfig:
    """A model that trains on 2 CPU cores: the tiny CLIP (ConvNeXt-atto trunk, 2-layer text
    tower), a 2-layer 64-d pixel decoder, and a 6-layer 64-d decoder with 20 queries."""
    return ModelConfig(
        name="tiny",
        clip_model=TINY_MODEL_NAME,
        clip_checkpoint=clip_checkpoint,
        pixel_decoder=PixelDecoderConfig(d_model=64, num_layers=2, num_heads=4, num_points=4, ffn_dim=128, num_groups=8),
        decoder=DecoderConfig(d_model=64, num_heads=4, ffn_dim=256, num_layers=6, num_object_queries=20, text_dim=128),
        matcher=MatcherCosts(num_points=1024),
        input_size=(96, 128),
        num_points=1024,
    )


PRESETS = {"omgseg_convnext_large": omgseg_convnext_large, "tiny": tiny}


def model_config(name: str, clip_checkpoint: str | None = None) -> ModelConfig:
    """A preset by name."""
    if name not in PRESETS:
        raise ValueError(f"unknown model config {name!r}; presets: {sorted(PRESETS)}")
    return PRESETS[name](clip_checkpoint)
