"""Reading the result and ground-truth files the evaluators take, with errors naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from omgseg.datasets.clip import decode_id_map_rgb
from omgseg.datasets.formats._common import field_errors

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


def _compressed_counts(counts: str, where: str) -> list[int]:
    """The runs of a COCO compressed RLE string (pycocotools' rleFrString, which reads past the
    end of a malformed string instead of failing)."""
    runs: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts):
                raise ValueError(f"{where}: compressed RLE counts end in the middle of a run")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"{where}: compressed RLE counts hold an invalid character {counts[p]!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def check_segmentation(segm: object, height: int, width: int, where: str) -> None:
    """Raise naming `where` unless `segm` is polygons or an RLE of an (height, width) mask whose
    runs cover it exactly: pycocotools writes past the mask, or never returns, otherwise."""
    if isinstance(segm, list):
        if not all(isinstance(p, list) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in p)
                   for p in segm):
            raise ValueError(f"{where}: polygons must be lists of numbers")
        return
    if not isinstance(segm, dict) or "counts" not in segm or "size" not in segm:
        raise ValueError(f"{where}: a segmentation must be polygons or RLE with 'counts' and 'size'")
    if segm["size"] != [height, width]:
        raise ValueError(f"{where}: RLE size {segm['size']!r} differs from the image's [{height}, {width}]")
    counts = segm["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
            raise ValueError(f"{where}: uncompressed RLE counts must be integers")
        runs = counts
    elif isinstance(counts, str):
        runs = _compressed_counts(counts, where)
    else:
        raise ValueError(f"{where}: RLE counts must be a string or a list, got {type(counts).__name__}")
    if any(c < 0 for c in runs) or sum(runs) != height * width:
        raise ValueError(f"{where}: RLE runs sum to {sum(runs)}, the image has {height * width} pixels")
