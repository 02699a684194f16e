"""OMG-Seg: a frozen CLIP backbone, a pixel decoder and one shared query decoder.

    images (B, T, 3, H, W) --frozen CLIP trunk--> res2..res5 (per frame)
        --pixel decoder--> mask features (stride 4) + 3-level memory (strides 32, 16, 8)
        --decoder (object + prompt queries, masked attention over the clip's frames)-->
        per query: a tube of mask logits, class logits against CLIP text embeddings of the
        vocabulary, and an identity embedding.

Training calls `forward` then `loss`. Inference calls `predict`, which adds the FC-CLIP-style
ensemble with the frozen CLIP's own classification of each mask and returns one typed
`ClipPrediction` per clip; `omgseg.model.inference` turns those into per-task results.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omgseg.model.backbone import TowerMaps, build_backbone
from omgseg.model.config import ModelConfig
from omgseg.model.criterion import SetCriterion
from omgseg.model.decoder import build_decoder, mask_pool
from omgseg.model.inference import ensemble_probs, upsample_masks
from omgseg.model.matcher import HungarianMatcher
from omgseg.model.pixel_decoder import PixelDecoderOutput, build_pixel_decoder
from omgseg.model.structures import MatchTargets, PromptBatch, QueryOutputs
from omgseg.model.vocabulary import TextClassifier, Vocabulary

# State-dict prefix of the frozen CLIP model (its weights come from a file, a tag or the init seed).
FROZEN_CLIP = "backbone.clip."


@dataclass
class ModelOutputs:
    """One forward pass over B clips.

    queries: the decoder's predictions (last set, earlier sets in `.aux`), for the loss.
    clip_features: (B, C_clip, T, h, w) the frozen CLIP's dense features (`clip_dense`), for the ensemble.
    text_embeddings: (C, S, D) the vocabulary's CLIP text embeddings used for the logits.
    image_size: (H, W) of the input.
    """

    queries: QueryOutputs
    clip_features: Tensor
    text_embeddings: Tensor
    image_size: tuple[int, int]


@dataclass
class EncodedClips:
    """B clips through the frozen CLIP and the pixel decoder (`OMGSeg.encode`).

    pixels: the pixel decoder's mask features and multi-scale memory, frames folded into the batch.
    clip_features: (B, C_clip, T, h, w) the frozen CLIP's dense features (`clip_dense`), for the ensemble.
    frames: T; image_size: (H, W) of the input.
    """

    pixels: PixelDecoderOutput
    clip_features: Tensor
    frames: int
    image_size: tuple[int, int]


@dataclass(frozen=True)
class ClipPrediction:
    """Inference-ready predictions for one clip of T frames whose input was (H, W) = image_size.

    class_probs: (Qo, C + 1) object queries' class probabilities (last column: void).
    low_res_mask_logits: (Qo, T, h, w) object queries' tubes at the decoder's resolution (H/4).
    embeddings: (Qo, d) object queries' identity embeddings, to link tubes across clips.
    low_res_prompt_mask_logits: (K, T, h, w) one tube per prompt, in the prompts' order.
    padded_size: the input the tubes cover when the clip was padded into a larger batch and
        then cut to its own image_size (the top-left corner); None when they cover image_size.

    `mask_logits` and `prompt_mask_logits` are the tubes at input resolution, every one of
    them upsampled on each access. Post-processing that keeps a few (panoptic, instance) takes
    the low-resolution tubes with `size=image_size` and upsamples only those it keeps.
    """

    class_probs: Tensor
    low_res_mask_logits: Tensor
    embeddings: Tensor
    low_res_prompt_mask_logits: Tensor
    vocabulary: Vocabulary
    image_size: tuple[int, int]
    padded_size: tuple[int, int] | None = None

    @property
    def mask_logits(self) -> Tensor:
        """(Qo, T, H, W) every object query's tube at input resolution."""
        return upsample_masks(self.low_res_mask_logits, self.image_size, self.padded_size)

    @property
    def prompt_mask_logits(self) -> Tensor:
        """(K, T, H, W) every prompt's tube at input resolution."""
        return upsample_masks(self.low_res_prompt_mask_logits, self.image_size, self.padded_size)

    def cropped(self, height: int, width: int) -> ClipPrediction:
        """This prediction of a padded clip restricted to the clip's own (height, width), the
        top-left corner; the tubes stay at low resolution."""
        return replace(self, image_size=(height, width), padded_size=self.padded_size or self.image_size)


class OMGSeg(nn.Module):
    """The unified model. `config` fixes every size; the vocabulary is an input."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config.clip_model, config.clip_checkpoint, config.clip_pretrained,
                                       pyramid_channels=config.pyramid_channels)
        if config.decoder.text_dim != self.backbone.embed_dim:
            raise ValueError(
                f"model {config.name!r}: decoder.text_dim {config.decoder.text_dim} must equal the CLIP "
                f"embedding width of {config.clip_model!r} ({self.backbone.embed_dim})"
            )
        channels = [spec.channels for spec in self.backbone.feature_specs]
        self.pixel_decoder = build_pixel_decoder(config.pixel_decoder, channels)
        self.decoder = build_decoder(config.decoder)
        self.text = TextClassifier(self.backbone.tokenize, self.backbone.encode_text)
        costs = config.matcher
        self.criterion = SetCriterion(
            HungarianMatcher(costs.cost_class, costs.cost_mask, costs.cost_dice, costs.num_points),
            config.loss,
            num_points=config.num_points,
            oversample_ratio=config.oversample_ratio,
            importance_sample_ratio=config.importance_sample_ratio,
        )
        # Class names seen in training: the ensemble trusts the trained head more on these.
        # Saved in checkpoints (get_extra_state).
        self.seen_names: set[str] = set()

    # ----------------------------------------------------------------------------------------
    # Training

    def encode(self, images: Tensor, tower: TowerMaps | None = None) -> EncodedClips:
        """images: (B, T, 3, H, W) uint8 or float in [0, 1] -> the frozen CLIP's and the pixel
        decoder's features. Separate from `forward` so that interactive segmentation, where
        only the clicks change between rounds, runs the backbone once per image. `tower`:
        `self.tower(images)` computed before, for images that are encoded again and again."""
        _check_clips(images)
        b, t, _, h, w = images.shape
        features = self.backbone(images.flatten(0, 1), tower)  # frames folded into the batch, clip-major
        pixels = self.pixel_decoder(features)
        clip = features.clip_dense
        clip = clip.view(b, t, *clip.shape[1:]).transpose(1, 2)  # (B, C_clip, T, h, w)
        return EncodedClips(pixels=pixels, clip_features=clip, frames=t, image_size=(h, w))

    def tower(self, images: Tensor) -> TowerMaps:
        """images: (B, T, 3, H, W) -> the frozen CLIP tower's maps (frames folded into the
        batch), to hand to `encode` or `forward` whenever these images come again: nothing
        trainable has run yet, so they stay valid while the model trains."""
        _check_clips(images)
        return self.backbone.tower(images.flatten(0, 1))

    def forward(
        self,
        images: Tensor | None,
        vocabulary: Vocabulary,
        prompts: list[PromptBatch] | None = None,
        encoded: EncodedClips | None = None,
        tower: TowerMaps | None = None,
        *,
        aux: bool = True,
    ) -> ModelOutputs:
        """images: (B, T, 3, H, W) uint8 or float in [0, 1], or None with `encoded` (from
        `encode`); `tower`: the images' frozen maps from `self.tower`, if computed before;
        prompts: None or one PromptBatch per clip. aux=False leaves out the earlier prediction
        sets (deep supervision): for inference, or a loss with final_only=True."""
        if encoded is None:
            if images is None:
                raise ValueError("forward needs images or encoded features")
            encoded = self.encode(images, tower)
        text = self.text_embeddings(vocabulary)
        pixels = encoded.pixels
        queries = self.decoder(pixels.mask_features, pixels.multi_scale_memory, encoded.frames, text, prompts, aux=aux)
        return ModelOutputs(queries=queries, clip_features=encoded.clip_features, text_embeddings=text,
                            image_size=encoded.image_size)

    def loss(self, outputs: ModelOutputs, targets: list[MatchTargets], across_workers: bool = True, *,
             final_only: bool = False, check_finite: bool = True) -> dict[str, Tensor]:
        """Weighted loss terms of every prediction set (see SetCriterion); sum them to train.
        across_workers=False for a loss one worker computes alone (no collective);
        final_only=True for the last set's terms alone (validation and look-ahead targets);
        check_finite=False leaves the check for non-finite terms to the caller, which then
        reads them from the device when it chooses (`criterion.loss_values`)."""
        return self.criterion(outputs.queries, targets, across_workers, final_only=final_only, check_finite=check_finite)

    def compile_parts(self, **options) -> None:
        """`torch.compile` (with `options`, e.g. backend or mode) the parts that are plain tensor
        programs: the backbone, the pixel decoder and the decoder. The rest stays eager: the
        text classifier's cache, and the losses, whose matching runs on the host. A batch of
        another shape or prompt layout compiles once more (torch.compile marks the changing
        sizes dynamic after the first such recompile)."""
        for part in (self.backbone, self.pixel_decoder, self.decoder):
            part.compile(**options)

    def text_embeddings(self, vocabulary: Vocabulary) -> Tensor:
        """(C, S, D) CLIP text embeddings of the vocabulary (cached), on the model's device."""
        return self.text.embeddings(vocabulary).to(self.backbone.device)

    # ----------------------------------------------------------------------------------------
    # Inference

    @torch.inference_mode()
    def predict(
        self,
        images: Tensor | None,
        vocabulary: Vocabulary,
        prompts: list[PromptBatch] | None = None,
        encoded: EncodedClips | None = None,
    ) -> list[ClipPrediction]:
        """Predictions of B clips, with the CLIP ensemble applied; pass `encoded` (from
        `encode`) instead of images to reuse the features. Only the last prediction set is
        computed, and the tubes stay at the decoder's resolution until post-processing asks.
        Runs in inference mode: its tensors cannot be changed in place or enter autograd
        outside it (clone them first)."""
        outputs = self(images, vocabulary, prompts, encoded, aux=False)
        queries = outputs.queries
        num_obj = queries.num_object_queries
        query_logits = queries.class_logits[:, :num_obj]  # (B, Qo, C + 1)
        settings = self.config.inference
        # With random CLIP weights (no checkpoint or tag) CLIP's own classification is noise: no ensemble.
        if settings.use_clip_ensemble and self.config.has_clip_weights:
            clip_logits = self.clip_logits(outputs)  # (B, Qo, C)
            seen = vocabulary.seen_mask(self.seen_names) if self.seen_names else torch.ones(len(vocabulary), dtype=torch.bool)
            seen = seen.to(query_logits.device)
            probs = torch.stack([
                ensemble_probs(q, c, seen, alpha=settings.ensemble_alpha, beta=settings.ensemble_beta)
                for q, c in zip(query_logits.float(), clip_logits.float())
            ])
        else:
            probs = query_logits.float().softmax(-1)
        return [
            ClipPrediction(
                class_probs=probs[i],
                low_res_mask_logits=queries.mask_logits[i, :num_obj],
                embeddings=queries.id_embeddings[i, :num_obj],
                low_res_prompt_mask_logits=queries.mask_logits[i, num_obj:num_obj + queries.prompt_counts[i]],
                vocabulary=vocabulary,
                image_size=outputs.image_size,
            )
            for i in range(queries.mask_logits.shape[0])
        ]

    def clip_logits(self, outputs: ModelOutputs) -> Tensor:
        """(B, Qo, C) the frozen CLIP's own class logits for each object query's mask: its dense
        features mask-pooled over the tube, through CLIP's image head, against the text."""
        queries = outputs.queries
        num_obj = queries.num_object_queries
        pooled = mask_pool(outputs.clip_features, queries.mask_logits[:, :num_obj].detach())  # (B, Qo, C_clip)
        b, q, c_clip = pooled.shape
        image_emb = F.normalize(self.backbone.visual_head(pooled.reshape(b * q, c_clip)), dim=-1)  # (B*Qo, D)
        text = outputs.text_embeddings  # (C, S, D), unit norm
        c, s, d = text.shape
        cosine = (image_emb @ text.reshape(c * s, d).t()).view(b, q, c, s).amax(-1)
        return self.backbone.logit_scale * cosine

    # ----------------------------------------------------------------------------------------
    # Parameters and checkpoints

    def checkpoint_state_dict(self, clip_held_elsewhere: bool = False) -> dict[str, Tensor]:
        """What a checkpoint must hold to rebuild this model: everything but the frozen CLIP
        when that comes from its own file or tag, or when another checkpoint holds it
        (`clip_held_elsewhere`: the one a warm start read it from); everything when CLIP has
        random weights that nothing else holds. A ViT's feature pyramid is trained, so it is
        always saved."""
        state = self.state_dict()
        if not (self.config.has_clip_weights or clip_held_elsewhere):
            return state
        return {k: v for k, v in state.items() if not k.startswith(FROZEN_CLIP)}

    def get_extra_state(self) -> dict:
        return {"seen_names": sorted(self.seen_names)}

    def set_extra_state(self, state: dict) -> None:
        self.seen_names = set(state.get("seen_names", ()))


def _check_clips(images: Tensor) -> None:
    if images.dim() != 5 or images.shape[2] != 3:
        raise ValueError(f"images must be (B, T, 3, H, W), got {tuple(images.shape)}")


def parameter_counts(model: OMGSeg) -> dict[str, int]:
    """Total, trainable and per-part parameter counts."""

    def count(module: nn.Module, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

    decoder = model.decoder
    layers = sum(count(m) for m in (decoder.cross_layers, decoder.self_layers, decoder.ffn_layers))
    clip = model.backbone.clip
    pyramid = model.backbone.pyramid
    return {
        "total": count(model),
        "trainable": count(model, trainable_only=True),
        "backbone_visual": count(clip.visual),
        "backbone_text": count(clip) - count(clip.visual),
        "backbone_pyramid": 0 if pyramid is None else count(pyramid),  # trainable (ViT towers only)
        "pixel_decoder": count(model.pixel_decoder),
        "decoder_layers": layers,
        "queries_and_heads": count(decoder) - layers - count(decoder.prompt_encoder),
        "prompt_encoder": count(decoder.prompt_encoder),
    }
