"""open_clip models for the backbone: built, then given their weights.

`create_clip(model_name, checkpoint, pretrained)` builds an open_clip model with random weights
and loads its weights from a local file (`checkpoint`) or from one of open_clip's pretrained
tags (`pretrained`), which open_clip downloads once into the Hugging Face hub cache and reads
from there afterwards. As timm does, the model is built first and the weights are loaded by
this builder, so the backbone's constructor takes a built model and never touches a file or
the network.

Besides open_clip's own configs, this module registers three random-weight CLIPs for tests and
smoke runs (configs/*.json), each with a 2-layer, 128-wide text tower with CLIP's vocabulary and
context length, so the real tokenizer works with them unchanged:
- `tiny_clip`: a timm `convnext_atto` trunk (channels 40 / 80 / 160 / 320) with the paper
  model's MLP head;
- `tiny_clip_rn`: a ModifiedResNet of one block per stage, width 8 (channels 32 / 64 / 128 / 256);
- `tiny_clip_vit`: a 2-block, 64-wide ViT with 16-pixel patches.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import open_clip
from open_clip.pretrained import download_pretrained
from torch import nn

TINY_MODEL_NAME = "tiny_clip"
TINY_RN_MODEL_NAME = "tiny_clip_rn"
TINY_VIT_MODEL_NAME = "tiny_clip_vit"
for _name in (TINY_MODEL_NAME, TINY_RN_MODEL_NAME, TINY_VIT_MODEL_NAME):
    _path = Path(__file__).parent / "configs" / f"{_name}.json"
    # open_clip silently skips a missing config path; an install without the package data would
    # then fail later with a confusing "unknown model". Fail here, naming the file.
    if not _path.is_file():
        raise FileNotFoundError(f"{_path} is missing: install omgseg with its package data (configs/*.json)")
    open_clip.add_model_config(_path)


def check_model_name(model_name: str) -> None:
    """Raise, listing examples, if open_clip has no model of this name."""
    available = open_clip.list_models()
    if model_name not in available:
        raise ValueError(
            f"unknown open_clip model {model_name!r}; for example: {_examples(available)} "
            f"(and {TINY_MODEL_NAME!r}, {TINY_RN_MODEL_NAME!r}, {TINY_VIT_MODEL_NAME!r} for tests)"
        )


def create_clip(
    model_name: str,
    checkpoint: str | Path | None = None,
    pretrained: str | None = None,
    cache_dir: str | Path | None = None,
) -> nn.Module:
    """An open_clip model with its weights.

    model_name: an open_clip model name, e.g. "convnext_large_d_320" (the paper's), "RN50",
        "ViT-B-16", or one of the tiny test models registered above.
    checkpoint: a LOCAL open_clip checkpoint file (a CLIP state dict; .safetensors, .bin or .pt,
        read with weights_only=True), never downloaded.
    pretrained: one of open_clip's pretrained tags for `model_name`, e.g.
        "laion2b_s29b_b131k_ft_soup"; open_clip downloads it into its cache (the Hugging Face hub
        cache, or `cache_dir`) the first time and reads it from there after. Offline without the
        file cached, one line names the tag, the cache and the local alternative.
    At most one of checkpoint and pretrained; neither means random weights.
    """
    check_model_name(model_name)
    if checkpoint is not None and pretrained is not None:
        raise ValueError(
            f"give the CLIP weights of {model_name!r} either as a local file (clip_checkpoint={checkpoint}) "
            f"or as a pretrained tag (clip_pretrained={pretrained}), not both"
        )
    quick_gelu = False
    weights: Path | None = None
    if checkpoint is not None:
        weights = _local_checkpoint(model_name, checkpoint)
    elif pretrained is not None:
        weights, quick_gelu = _download_tag(model_name, pretrained, cache_dir)
    # A tag trained with QuickGELU needs it in the model too (open_clip's "-quickgelu" names).
    # The weights are loaded below, so open_clip's "initialized randomly" warning would be
    # wrong; it stays for a model that really keeps random weights.
    quiet = _DropRandomInitWarning() if weights is not None else None
    root = logging.getLogger()
    if quiet is not None:
        root.addFilter(quiet)
    try:
        clip = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=quick_gelu)
    finally:
        if quiet is not None:
            root.removeFilter(quiet)
    if weights is not None:
        _load_weights(clip, weights, model_name)
    return clip


class _DropRandomInitWarning(logging.Filter):
    """Drops open_clip's "Model initialized randomly" warning (for a model whose weights follow)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def _examples(available: list[str]) -> list[str]:
    """A few models of each family, for error messages (the full list has hundreds of names)."""
    wanted = ("convnext_base", "convnext_large_d_320", "RN50", "RN101", "ViT-B-32", "ViT-B-16", "ViT-L-14")
    return [name for name in wanted if name in available]


def _local_checkpoint(model_name: str, checkpoint: str | Path) -> Path:
    path = Path(checkpoint).expanduser()
    if path.is_file():
        return path.resolve()
    hint = ""
    if str(checkpoint) in open_clip.list_pretrained_tags_by_model(model_name):
        hint = f" ({str(checkpoint)!r} is a pretrained tag of {model_name!r}: pass it as clip_pretrained={checkpoint})"
    raise FileNotFoundError(
        f"CLIP checkpoint {str(path)!r} for {model_name!r} does not exist; clip_checkpoint is a local file "
        f"and is never downloaded{hint}"
    )


def _download_tag(model_name: str, tag: str, cache_dir: str | Path | None) -> tuple[Path, bool]:
    """open_clip's file for (model, tag), downloaded into its cache unless already there, and
    whether the tag was trained with QuickGELU."""
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if tag not in tags:
        elsewhere = open_clip.list_pretrained_models_by_tag(tag)
        hint = f" ({tag!r} is a tag of {elsewhere[:6]})" if elsewhere else ""
        raise ValueError(
            f"unknown pretrained tag {tag!r} for open_clip model {model_name!r}; its tags: {tags or 'none'}{hint}"
        )
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if cfg.get("hf_hub"):
        from huggingface_hub import constants

        where = f"the Hugging Face hub cache {cache_dir or constants.HF_HUB_CACHE} (repo {cfg['hf_hub'].rstrip('/')})"
    else:
        where = f"the folder {cache_dir or Path('~/.cache/clip').expanduser()}"
    try:
        path = download_pretrained(cfg, cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as err:  # offline, no such file, HTTP errors: all mean "not available here"
        # open_clip wraps the hub's error as "Failed to download ... Last error: <the hub's>".
        reason = str(err).rpartition("Last error: ")[2].strip() or type(err).__name__
        raise FileNotFoundError(
            f"open_clip weights {tag!r} for {model_name!r} are not in {where} and could not be downloaded "
            f"({reason.splitlines()[0]}); pass a local file with "
            f"clip_checkpoint=/path/to/open_clip_model.safetensors instead"
        ) from None
    if not path:
        raise FileNotFoundError(f"open_clip gives no download for tag {tag!r} of {model_name!r}; pass clip_checkpoint= instead")
    return Path(path), bool(cfg.get("quick_gelu", False))


def _load_weights(clip: nn.Module, path: Path, model_name: str) -> None:
    """Load an open_clip checkpoint into `clip` (weights only), or one line saying why it does not fit."""
    try:
        missing, unexpected = open_clip.load_checkpoint(clip, str(path), strict=False, weights_only=True)
    except RuntimeError as err:
        wrong = re.findall(r"size mismatch for ([\w.]+)", str(err))
        if wrong:
            raise ValueError(
                f"CLIP checkpoint {path} does not fit open_clip model {model_name!r}: shapes differ for "
                f"{len(wrong)} keys, e.g. {wrong[:4]} (was it saved from another model?)"
            ) from None
        raise ValueError(f"CLIP checkpoint {path} could not be read: {str(err).splitlines()[0]}") from None
    except Exception as err:  # not a weights-only pickle, not a state dict, a truncated file, ...
        first = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(f"CLIP checkpoint {path} is not an open_clip state dict ({type(err).__name__}: {first[:200]})") from None
    if missing or unexpected:
        raise ValueError(
            f"CLIP checkpoint {path} does not fit open_clip model {model_name!r}: {len(missing)} keys missing, "
            f"e.g. {list(missing)[:4]}, and {len(unexpected)} unexpected, e.g. {list(unexpected)[:4]} "
            f"(was it saved from another model?)"
        )
