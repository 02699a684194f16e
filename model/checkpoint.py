"""Checkpoint files of the model: written atomically, read as weights only.

    save_checkpoint(model, path, extra)   # config, trainable weights, seen class names
    load_checkpoint(path) -> (model, extra)
    load_weights(model, path) -> extra    # a warm start into a model built already

A warm-started model with a random frozen CLIP refers to its start's file for that CLIP
instead of copying it (`save_checkpoint`'s frozen_clip_from).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch import Tensor

from omgseg.model.config import ModelConfig
from omgseg.model.omgseg import FROZEN_CLIP, OMGSeg

CHECKPOINT_FORMAT = 1
_CLIP_REFERENCE = "frozen_clip_from"  # a checkpoint's pointer to the one holding its frozen CLIP


def save_checkpoint(model: OMGSeg, path: str | Path, extra: dict | None = None,
                    frozen_clip_from: str | Path | None = None) -> Path:
    """Write the config, the trainable weights and the seen class names to `path` (atomically:
    a crash mid-write never leaves a truncated file under the final name).

    frozen_clip_from: the checkpoint this model was warm-started from. A random-weight frozen
    CLIP is then not copied but referred to: every trial of a pretrained study shares its
    pretrained model's CLIP, which is 95 % of the tiny model's bytes. The reference is kept
    relative to `path` (a moved study folder still loads) and absolute (a copy elsewhere, e.g.
    MLflow's artifact, still loads on this machine)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    refer = frozen_clip_from is not None and not model.config.has_clip_weights
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": model.config.to_dict(),
        "model": model.checkpoint_state_dict(clip_held_elsewhere=refer),
        "extra": extra or {},
    }
    if refer:
        source = Path(frozen_clip_from).resolve()
        payload[_CLIP_REFERENCE] = {"relative": os.path.relpath(source, path.parent.resolve()), "absolute": str(source)}
    partial = path.with_name(path.name + ".partial")
    torch.save(payload, partial)
    partial.replace(path)
    return path


def _read_payload(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint file's payload, read as weights only: a file from elsewhere cannot run code."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: not an omgseg checkpoint (it holds objects other than weights: "
                         f"{str(err).splitlines()[0]})") from None
    except (RuntimeError, EOFError) as err:  # a truncated or overwritten file
        raise ValueError(f"{path}: not a readable checkpoint ({str(err).splitlines()[0]})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an omgseg checkpoint (format {CHECKPOINT_FORMAT} expected)")
    return payload


def _referred_clip(payload: dict, path: Path) -> dict[str, Tensor]:
    """The frozen CLIP weights a checkpoint refers to instead of holding (`save_checkpoint`'s
    frozen_clip_from), read from the checkpoint that holds them; {} when it holds its own."""
    seen = [path]
    while _CLIP_REFERENCE in payload:
        reference = payload[_CLIP_REFERENCE]
        candidates = [path.parent / reference["relative"], Path(reference["absolute"])]
        source = next((c for c in candidates if c.is_file()), None)
        if source is None:
            raise FileNotFoundError(
                f"{seen[0]}: its frozen CLIP weights are in {reference['absolute']} (the checkpoint it was "
                f"warm-started from), which does not exist here; put that file back or pass clip_checkpoint=")
        if len(seen) > 8 or source.resolve() in {p.resolve() for p in seen}:
            raise ValueError(f"{seen[0]}: its frozen CLIP reference goes round in circles: {[str(p) for p in seen]}")
        path, payload = source, _read_payload(source)
        seen.append(path)
        held = {k: v for k, v in payload["model"].items() if k.startswith(FROZEN_CLIP)}
        if held:
            return held
    return {}


def _load_fitting(model: OMGSeg, weights: dict, path: Path) -> None:
    """Load `weights` into `model`, or raise one line naming the keys that do not fit (tensors
    of another shape are named instead of torch's multi-line size-mismatch report). A frozen
    CLIP left out of the file keeps the model's own weights."""
    state = model.state_dict()
    wrong = sorted(k for k, v in weights.items()
                   if isinstance(v, torch.Tensor) and k in state and tuple(state[k].shape) != tuple(v.shape))
    missing, unexpected = model.load_state_dict({k: v for k, v in weights.items() if k not in wrong}, strict=False)
    clip_left_out = [k for k in missing if k.startswith(FROZEN_CLIP)]
    missing = [k for k in missing if not k.startswith(FROZEN_CLIP)]
    if clip_left_out and not model.config.has_clip_weights:
        missing += clip_left_out  # a random-weight CLIP is saved with the model, so it must be there
    if wrong or missing or unexpected:
        hint = (" (a checkpoint saved with a CLIP checkpoint file needs clip_checkpoint=...)"
                if any(k.startswith(FROZEN_CLIP) for k in missing) else "")
        raise ValueError(f"{path}: weights do not fit model {model.config.name!r}: shapes differ for {wrong[:5]}, "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}{hint}")


def load_checkpoint(
    path: str | Path, clip_checkpoint: str | None = None, map_location: str | torch.device = "cpu"
) -> tuple[OMGSeg, dict]:
    """An OMGSeg from `save_checkpoint`'s file, and the checkpoint's `extra`.

    clip_checkpoint: where the frozen CLIP weights are on THIS machine (overrides the path or
    pretrained tag recorded at training time, which may not be available here).
    """
    path = Path(path)
    payload = _read_payload(path, map_location)
    try:
        config = ModelConfig.from_dict(payload["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: its model config is unreadable ({err})") from None
    if clip_checkpoint is not None:
        config = config.replace(clip_checkpoint=clip_checkpoint, clip_pretrained=None)
    model = OMGSeg(config)
    weights = payload["model"] if clip_checkpoint is not None else {**_referred_clip(payload, path), **payload["model"]}
    _load_fitting(model, weights, path)
    return model, payload["extra"]


def load_weights(model: OMGSeg, path: str | Path) -> dict:
    """Load a `save_checkpoint` file's weights into `model` (a warm start) and return its
    `extra`; raises naming the file and the keys that do not fit. The frozen CLIP keeps the
    model's own weights when the checkpoint does not hold them."""
    path = Path(path)
    payload = _read_payload(path)
    state = model.state_dict()
    weights = {**_referred_clip(payload, path), **payload["model"]}
    # A warm start from a checkpoint made with a CLIP file or tag: the CLIP is the model's own.
    for key in state:
        if key.startswith(FROZEN_CLIP) and key not in weights:
            weights[key] = state[key]
    _load_fitting(model, weights, path)
    return payload["extra"]
