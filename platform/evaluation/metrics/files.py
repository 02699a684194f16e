"""Reading the result and ground-truth files the evaluators take, with errors naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from omgseg.datasets.clip import decode_id_map_rgb
from omgseg.datasets.formats._common import check_segmentation, field_errors

__all__ = ["check_segmentation", "field_errors", "read_id_png", "read_json", "read_label_png"]


def read_json(path: Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def _open_png(path: Path, what: str) -> Image.Image:
    """The decoded PNG; a missing, truncated or corrupt file raises naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} PNG {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{what} PNG {path}: cannot read it ({err})") from None


def read_id_png(path: Path, what: str) -> np.ndarray:
    """A PNG of RGB-encoded segment ids (COCO panoptic, VIPSeg) -> (H, W) uint32 ids.
    `what` names the file's role in the error (e.g. "gt.json: ground-truth")."""
    return decode_id_map_rgb(np.asarray(_open_png(Path(path), what).convert("RGB")))


def read_label_png(path: Path, what: str, modes: tuple[str, ...]) -> np.ndarray:
    """A single-channel PNG of labels (semantic classes, DAVIS object indices) -> (H, W),
    its mode one of `modes`."""
    image = _open_png(Path(path), what)
    if image.mode not in modes:
        raise ValueError(f"{what} PNG {path}: need a single-channel PNG ({', '.join(modes)}), got mode {image.mode}")
    return np.asarray(image)
