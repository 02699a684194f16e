"""`omgseg predict`: run a checkpoint on images or a video and write the public result formats.

Image tasks (panoptic, instance, semantic) take an image file or a folder of images; the
video instance task takes a folder of frames (one video), cut into clips whose tubes are
linked across clips by their query embeddings (MinVIS). Every frame also gets an overlay PNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from omgseg.datasets.clip import Category, Task
from omgseg.datasets.shards import read_meta
from omgseg.model.inference import TubeLinker, instance_inference, panoptic_inference, semantic_inference
from omgseg.model.omgseg import load_checkpoint
from omgseg.model.vocabulary import Vocabulary
from omgseg.platform.metrics.files import read_json
from omgseg.platform.writers import (
    CocoInstancesWriter,
    CocoPanopticWriter,
    SemanticWriter,
    YtvisWriter,
    save_overlay,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
PREDICT_TASKS = ("panoptic", "instance", "semantic", "video_instance")


@dataclass
class PredictSummary:
    task: str
    inputs: int  # images, or frames of the video
    outputs: list[str]


def load_vocabulary(spec: str | None, extra: dict) -> Vocabulary:
    """A shard folder (its meta.json), a COCO-style JSON with 'categories', or (None) the
    vocabulary the checkpoint was trained with."""
    if spec is None:
        saved = extra.get("vocabulary")
        if not saved:
            raise ValueError("the checkpoint holds no vocabulary: pass --vocabulary SHARD_DIR or a JSON with 'categories'")
        return Vocabulary(tuple(saved["names"]), tuple(saved["is_thing"]), tuple(saved["category_ids"]))
    path = Path(spec)
    if path.is_dir():
        return Vocabulary.from_categories(read_meta(path).categories)
    data = read_json(path)
    if not isinstance(data, dict) or "categories" not in data:
        raise ValueError(f"{path}: a vocabulary file needs a 'categories' list")
    return Vocabulary.from_categories([
        Category(int(c["id"]), str(c["name"]), bool(c.get("isthing", 1)), tuple(c.get("synonyms", ())))
        for c in data["categories"]
    ])


def _images(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"input {path} does not exist")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).copy()


def _image_ids(coco_json: Path | None) -> dict[str, object]:
    if coco_json is None:
        return {}
    data = read_json(coco_json)
    return {Path(i["file_name"]).name: i["id"] for i in data.get("images", [])}


def predict(
    checkpoint: Path,
    task: str,
    inputs: Path,
    out: Path,
    *,
    vocabulary: str | None = None,
    coco_json: Path | None = None,
    clip_length: int = 4,
    clip_checkpoint: str | None = None,
    progress: bool = True,
) -> PredictSummary:
    if task not in PREDICT_TASKS:
        raise ValueError(f"unknown predict task {task!r}; available: {', '.join(PREDICT_TASKS)}")
    model, extra = load_checkpoint(checkpoint, clip_checkpoint=clip_checkpoint)
    vocab = load_vocabulary(vocabulary, extra)
    model.eval()
    out = Path(out)
    files = _images(Path(inputs))
    if Task(task) is Task.VIDEO_INSTANCE:
        return _predict_video(model, vocab, files, out, clip_length, progress)
    ids = _image_ids(coco_json)
    is_thing = torch.tensor(vocab.is_thing)
    settings = model.config.inference
    writer = {"panoptic": CocoPanopticWriter, "instance": CocoInstancesWriter, "semantic": SemanticWriter}[task](out, vocab)
    for path in tqdm(files, desc=f"predict {task}", disable=not progress):
        rgb = _read_rgb(path)
        image = torch.from_numpy(rgb).permute(2, 0, 1)[None, None]
        (pred,) = model.predict(image, vocab)
        image_id = ids.get(path.name, path.stem)
        if task == "panoptic":
            result = panoptic_inference(pred.class_probs, pred.mask_logits, is_thing,
                                        object_mask_threshold=settings.object_mask_threshold,
                                        overlap_threshold=settings.overlap_threshold)
            writer.add(image_id, path.name, result)
            shown = result.id_map[0].numpy()
        elif task == "instance":
            result = instance_inference(pred.class_probs, pred.mask_logits, is_thing, top_k=settings.instance_top_k)
            writer.add(image_id, result)
            shown = np.zeros(rgb.shape[:2], dtype=np.int64)
            for k, (mask, score) in enumerate(zip(result.masks[:, 0].numpy(), result.scores.tolist())):
                if score >= 0.5:
                    shown[mask & (shown == 0)] = k + 1
        else:
            result = semantic_inference(pred.class_probs, pred.mask_logits)
            writer.add(path.name, result)
            shown = result.labels[0].numpy() + 1
        save_overlay(out / "overlays" / f"{path.stem}.png", rgb, shown)
    written = writer.close()
    return PredictSummary(task=task, inputs=len(files), outputs=[str(written), str(out / "overlays")])


def _predict_video(model, vocab: Vocabulary, frames: list[Path], out: Path, clip_length: int, progress: bool) -> PredictSummary:
    """Clips of clip_length frames; tubes linked across clips; one YouTube-VIS entry per track."""
    if clip_length < 1:
        raise ValueError(f"clip_length must be >= 1, got {clip_length}")
    linker = TubeLinker()
    tubes: dict[int, np.ndarray] = {}
    rgb0 = _read_rgb(frames[0])
    total = len(frames)
    for start in tqdm(range(0, total, clip_length), desc="predict video_instance", disable=not progress):
        clip = [_read_rgb(p) for p in frames[start:start + clip_length]]
        images = torch.from_numpy(np.stack(clip)).permute(0, 3, 1, 2)[None]
        (pred,) = model.predict(images, vocab)
        track_ids = linker.link(pred.embeddings)
        linker.add_scores(track_ids, pred.class_probs)
        masks = (pred.mask_logits.sigmoid() > 0.5).numpy()  # (Q, t, H, W)
        for q, track in enumerate(track_ids.tolist()):
            if track not in tubes:
                tubes[track] = np.zeros((total, *rgb0.shape[:2]), dtype=bool)
            tubes[track][start:start + len(clip)] = masks[q]
    tracks, scores = linker.video_scores()
    things = torch.tensor(vocab.is_thing)
    writer = YtvisWriter(out, vocab)
    labels, values = [], []
    for row in scores:
        thing_scores = torch.where(things, row[:-1], torch.zeros_like(row[:-1]))
        labels.append(int(thing_scores.argmax()))
        values.append(float(thing_scores.max()))
    kept = [i for i, track in enumerate(tracks.tolist()) if tubes[track].any() and values[i] > 0]
    writer.add(frames[0].parent.name, np.stack([tubes[tracks[i].item()] for i in kept]) if kept else
               np.zeros((0, total, *rgb0.shape[:2]), bool), [labels[i] for i in kept], [values[i] for i in kept])
    for t, path in enumerate(frames):
        shown = np.zeros(rgb0.shape[:2], dtype=np.int64)
        for rank, i in enumerate(sorted(kept, key=lambda i: -values[i])):
            if values[i] >= 0.5:
                shown[tubes[tracks[i].item()][t] & (shown == 0)] = rank + 1
        save_overlay(out / "overlays" / f"{path.stem}.png", _read_rgb(path), shown)
    written = writer.close()
    return PredictSummary(task="video_instance", inputs=total, outputs=[str(written), str(out / "overlays")])
