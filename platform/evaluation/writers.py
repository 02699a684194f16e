"""Writers of predictions in the public result formats that `omgseg eval` (and the reference
tools) read, plus overlay images for a person to look at.

Every writer collects results with `add(...)` (the image writers: `add(image_id, file_name,
result)`) and writes its JSON with `close()`; files are
written to a temporary name and renamed, so an interrupted run never leaves a truncated file
under the final name.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from omgseg.datasets.clip import encode_id_map_rgb
from omgseg.model.inference import InstanceResult, PanopticResult, SemanticResult
from omgseg.model.vocabulary import Vocabulary
from omgseg.platform.evaluation.metrics.instance import encode


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)


def _save_png(path: Path, image: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.png")
    image.save(partial)
    partial.replace(path)


class CocoPanopticWriter:
    """`panoptic.json` + `panoptic/<stem>.png` (RGB-encoded ids), COCO panoptic results."""

    def __init__(self, out: Path, vocabulary: Vocabulary) -> None:
        self.out = Path(out)
        self.vocabulary = vocabulary
        self.annotations: list[dict] = []

    def add(self, image_id: int | str, file_name: str, result: PanopticResult) -> None:
        png = Path(file_name).with_suffix(".png").name
        _save_png(self.out / "panoptic" / png, Image.fromarray(encode_id_map_rgb(result.id_map[0].cpu().numpy().astype(np.uint32))))
        ids = result.id_map[0]
        self.annotations.append({
            "image_id": image_id, "file_name": png,
            "segments_info": [{"id": s.id, "category_id": self.vocabulary.category_ids[s.label], "iscrowd": 0,
                               "area": int((ids == s.id).sum()), "score": s.score} for s in result.segments],
        })

    def close(self) -> Path:
        path = self.out / "panoptic.json"
        write_atomic(path, json.dumps({"annotations": self.annotations}).encode())
        return path


class CocoInstancesWriter:
    """`instances_results.json`: COCO results (RLE + score), no bbox (as detectron2 writes)."""

    def __init__(self, out: Path, vocabulary: Vocabulary) -> None:
        self.out = Path(out)
        self.vocabulary = vocabulary
        self.results: list[dict] = []

    def add(self, image_id: int | str, file_name: str, result: InstanceResult) -> None:
        for mask, label, score in zip(result.masks[:, 0].cpu().numpy(), result.labels.tolist(), result.scores.tolist()):
            self.results.append({"image_id": image_id, "category_id": self.vocabulary.category_ids[label],
                                 "segmentation": encode(mask), "score": float(score)})

    def close(self) -> Path:
        path = self.out / "instances_results.json"
        write_atomic(path, json.dumps(self.results).encode())
        return path


class SemanticWriter:
    """`semantic/<stem>.png`: single-channel class indices of the vocabulary."""

    def __init__(self, out: Path, vocabulary: Vocabulary) -> None:
        if len(vocabulary) > 255:
            raise ValueError(f"semantic PNGs hold at most 255 classes (255 = ignore), got {len(vocabulary)}")
        self.out = Path(out)

    def add(self, image_id: int | str, file_name: str, result: SemanticResult) -> None:
        labels = result.labels[0].cpu().numpy().astype(np.uint8)
        _save_png(self.out / "semantic" / Path(file_name).with_suffix(".png").name, Image.fromarray(labels))

    def close(self) -> Path:
        return self.out / "semantic"


class YtvisWriter:
    """`ytvis_results.json`: one entry per track with a segmentation per frame (null where empty)."""

    def __init__(self, out: Path, vocabulary: Vocabulary) -> None:
        self.out = Path(out)
        self.vocabulary = vocabulary
        self.results: list[dict] = []

    def add(self, video_id: int | str, masks: np.ndarray, labels: list[int], scores: list[float]) -> None:
        """masks (K, T, H, W) bool over the whole video."""
        for tube, label, score in zip(masks, labels, scores):
            self.results.append({
                "video_id": video_id, "category_id": self.vocabulary.category_ids[label], "score": float(score),
                "segmentations": [encode(frame) if frame.any() else None for frame in tube],
            })

    def close(self) -> Path:
        path = self.out / "ytvis_results.json"
        write_atomic(path, json.dumps(self.results).encode())
        return path


def overlay(image: np.ndarray, id_map: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The image (H, W, 3) uint8 with each segment id tinted in its own colour, 0 left as is."""
    colours = np.random.default_rng(0).integers(40, 255, size=(int(id_map.max()) + 1, 3)).astype(np.float32)
    tinted = image.astype(np.float32)
    labelled = id_map > 0
    tinted[labelled] = (1 - alpha) * tinted[labelled] + alpha * colours[id_map[labelled]]
    return Image.fromarray(tinted.round().clip(0, 255).astype(np.uint8))


def save_overlay(path: Path, image: np.ndarray, id_map: np.ndarray) -> None:
    _save_png(Path(path), overlay(image, id_map))
