"""Reading the result and ground-truth files the evaluators take, with errors naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from omgseg.datasets.clip import decode_id_map_rgb


def read_json(path: Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def read_id_png(path: Path, what: str) -> np.ndarray:
    """A PNG of RGB-encoded segment ids (COCO panoptic, VIPSeg) -> (H, W) uint32 ids.
    `what` names the file's role in the error (e.g. "gt.json: ground-truth")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} PNG {path} does not exist")
    with Image.open(path) as image:
        return decode_id_map_rgb(np.asarray(image.convert("RGB")))
