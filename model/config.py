"""The model's configuration: sizes of every part, loss weights and inference thresholds.

Two presets: `omgseg_convnext_large` (the paper's sizes, docs/reference.md) and `tiny` (a few
million parameters, for tests and the embedded default on 2 CPU cores). `with_overrides`
changes any field of a preset by its dotted name (`omgseg model-info tiny clip_model=RN50`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field

import open_clip

from omgseg.model.clip_model import TINY_MODEL_NAME
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

    clip_model: an open_clip model name whose image tower is a timm ConvNeXt, a ModifiedResNet
        (RN50, ...) or a ViT (model/backbone.py).
    clip_checkpoint: a local open_clip checkpoint file for the frozen backbone (never downloaded).
    clip_pretrained: an open_clip pretrained tag of clip_model (e.g. laion2b_s29b_b131k_ft_soup),
        which open_clip downloads once into its cache. At most one of the two; neither means
        random CLIP weights.
    pyramid_channels: ViT towers only: the width of each level of the trainable feature pyramid
        (ViTDet's 256); unused by convolutional towers.
    input_size: (height, width) of the training crop; inference takes any size >= 32.
    num_points / oversample_ratio / importance_sample_ratio: the loss's point sampling.
    """

    name: str
    clip_model: str
    clip_checkpoint: str | None = None
    clip_pretrained: str | None = None
    pyramid_channels: int = 256
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
        if self.clip_checkpoint is not None and self.clip_pretrained is not None:
            raise ValueError(
                f"model {self.name!r}: give clip_checkpoint (a local file) or clip_pretrained (an open_clip tag), "
                f"not both: got {self.clip_checkpoint!r} and {self.clip_pretrained!r}"
            )
        if self.pyramid_channels < 1:
            raise ValueError(f"model {self.name!r}: pyramid_channels must be positive, got {self.pyramid_channels}")

    @property
    def has_clip_weights(self) -> bool:
        """Whether the frozen CLIP gets real weights (a file or a tag) rather than random ones."""
        return self.clip_checkpoint is not None or self.clip_pretrained is not None

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


def omgseg_convnext_large(clip_checkpoint: str | None = None, clip_pretrained: str | None = None) -> ModelConfig:
    """The paper's model: ConvNeXt-Large CLIP, 6-layer deformable pixel decoder, 9-layer
    decoder with 300 queries, 768-d text space, 1280x736 crops (docs/reference.md). Its CLIP
    weights are the tag laion2b_s29b_b131k_ft_soup (pass clip_pretrained=that, or a file)."""
    return ModelConfig(
        name="omgseg_convnext_large",
        clip_model="convnext_large_d_320",
        clip_checkpoint=clip_checkpoint,
        clip_pretrained=clip_pretrained,
        decoder=DecoderConfig(text_dim=768),
    )


def tiny(clip_checkpoint: str | None = None, clip_pretrained: str | None = None) -> ModelConfig:
    """A model that trains on 2 CPU cores: the tiny CLIP (ConvNeXt-atto trunk, 2-layer text
    tower), a 2-layer 64-d pixel decoder, and a 6-layer 64-d decoder with 20 queries (64-d
    pyramid levels with a ViT tower, e.g. clip_model=tiny_clip_vit)."""
    return ModelConfig(
        name="tiny",
        clip_model=TINY_MODEL_NAME,
        clip_checkpoint=clip_checkpoint,
        clip_pretrained=clip_pretrained,
        pyramid_channels=64,
        pixel_decoder=PixelDecoderConfig(d_model=64, num_layers=2, num_heads=4, num_points=4, ffn_dim=128, num_groups=8),
        decoder=DecoderConfig(d_model=64, num_heads=4, ffn_dim=256, num_layers=6, num_object_queries=20, text_dim=128),
        matcher=MatcherCosts(num_points=1024),
        input_size=(96, 128),
        num_points=1024,
    )


PRESETS = {"omgseg_convnext_large": omgseg_convnext_large, "tiny": tiny}


def model_config(name: str, clip_checkpoint: str | None = None, clip_pretrained: str | None = None) -> ModelConfig:
    """A preset by name."""
    if name not in PRESETS:
        raise ValueError(f"unknown model config {name!r}; presets: {sorted(PRESETS)}")
    return PRESETS[name](clip_checkpoint, clip_pretrained)


def with_overrides(config: ModelConfig, overrides: Mapping[str, object]) -> ModelConfig:
    """`config` with fields changed by dotted name, e.g. {"clip_model": "RN50",
    "decoder.num_layers": 3}. Each value must have the field's type (an int may stand for a
    float, a list for a tuple, None for an optional field). Changing clip_model without
    decoder.text_dim sets text_dim to that CLIP's embedding width (from its open_clip config),
    since the decoder's class embeddings live in CLIP's text space."""
    data = config.to_dict()
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node, cls, prefix = data, ModelConfig, ""
        for part in parents:
            nested = {f.name: f for f in dataclasses.fields(cls)}
            if part not in nested or not dataclasses.is_dataclass(_field_type(cls, part)):
                raise ValueError(f"unknown model config key {key!r}: {part!r} is not a part; parts: {_parts(cls)}")
            node, cls, prefix = node[part], _field_type(cls, part), prefix + part + "."
        fields = {f.name for f in dataclasses.fields(cls)}
        if leaf not in fields or dataclasses.is_dataclass(_field_type(cls, leaf)):
            raise ValueError(f"unknown model config key {key!r}; known: {_keys(cls, prefix)}")
        node[leaf] = _checked(key, value, _field_type(cls, leaf))
    if "clip_model" in overrides and "decoder.text_dim" not in overrides:
        clip = open_clip.get_model_config(str(overrides["clip_model"]))
        if clip is not None:  # an unknown name fails where the backbone is built, listing models
            data["decoder"]["text_dim"] = int(clip["embed_dim"])
    return ModelConfig.from_dict(data)


def _field_type(cls: type, name: str) -> object:
    return typing.get_type_hints(cls)[name]


def _parts(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if dataclasses.is_dataclass(_field_type(cls, f.name))]


def _keys(cls: type, prefix: str = "") -> list[str]:
    """Every settable dotted key of a config dataclass."""
    keys = []
    for f in dataclasses.fields(cls):
        kind = _field_type(cls, f.name)
        keys += _keys(kind, f"{prefix}{f.name}.") if dataclasses.is_dataclass(kind) else [prefix + f.name]
    return keys


def _checked(key: str, value: object, kind: object) -> object:
    """`value` if it has type `kind` (int for float, list for tuple allowed), else a ValueError."""
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    for option in options:
        origin = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return None
        if origin is bool and isinstance(value, bool):
            return value
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is str and isinstance(value, str):
            return value
        if origin is tuple and isinstance(value, (list, tuple)):
            return tuple(value)
    expected = " or ".join("None" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)
    raise ValueError(f"model config key {key!r} must be {expected}, got {value!r}")
