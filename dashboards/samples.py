"""Per-sample pictures for the report: a trained trial's predictions on a few validation clips
per (data set, task), next to the ground truth.

Colours follow segment ids, so a track keeps its colour across the frames of a clip. Click
prompts are drawn as white dots and VOS box prompts as white rectangles on the frame they
were given on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from omgseg.core.structures import PromptKind, Task
from omgseg.datasets.stream import ClipSample, ShardStream
from omgseg.model.inference import instance_inference, panoptic_inference, prompt_inference, semantic_inference
from omgseg.model.omgseg import OMGSeg
from omgseg.model.structures import PromptBatch
from omgseg.model.vocabulary import Vocabulary
from omgseg.platform.metrics.interactive import interior_point
from omgseg.platform.writers import overlay

MAX_FRAMES = 4


@dataclass
class SamplePicture:
    dataset: str
    task: str
    key: str
    frames: list[tuple[np.ndarray, np.ndarray]]  # per frame: (ground truth overlay, prediction overlay) (H, W, 3)


def _rgb(sample: ClipSample, t: int) -> np.ndarray:
    return sample.images[t].permute(1, 2, 0).numpy()


def _draw(image: Image.Image, points=(), boxes=()) -> np.ndarray:
    draw = ImageDraw.Draw(image)
    for x, y in points:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(255, 255, 255), outline=(0, 0, 0))
    for box in boxes:
        draw.rectangle(list(box), outline=(255, 255, 255), width=2)
    return np.asarray(image)


def _stack(masks: np.ndarray) -> np.ndarray:
    """(K, T, H, W) bool -> (T, H, W) ids 1..K, the first mask winning where they overlap."""
    ids = np.zeros(masks.shape[1:], dtype=np.int64)
    for k in range(masks.shape[0] - 1, -1, -1):
        ids[masks[k]] = k + 1
    return ids


def predict_picture(model: OMGSeg, sample: ClipSample, task: Task, vocabulary: Vocabulary) -> SamplePicture:
    """The clip's frames (at most MAX_FRAMES) with ground truth and prediction overlays."""
    device = next(model.parameters()).device
    settings = model.config.inference
    frames = min(sample.num_frames, MAX_FRAMES) if task in (Task.VIDEO_PANOPTIC, Task.VIDEO_INSTANCE, Task.VOS) else 1
    images = sample.images[:frames]
    gt = sample.id_maps[:frames].numpy()
    objects = [s for s in sample.segments if not s.iscrowd and s.area[0] > 0]
    points: list[tuple[float, float]] = []
    boxes: list[tuple[float, float, float, float]] = []
    prompts = None
    if task is Task.INTERACTIVE:
        points = [interior_point(gt[0] == s.id) for s in objects]
        prompts = [PromptBatch.from_points(torch.tensor(points, dtype=torch.float32).reshape(-1, 2), (sample.height, sample.width))]
    elif task is Task.VOS:
        for s in objects:
            rows, cols = np.nonzero(gt[0] == s.id)
            boxes.append((float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)))
        prompts = [PromptBatch(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), (PromptKind.BOX,) * len(boxes),
                               (sample.height, sample.width))]
    (pred,) = model.predict(images[None].to(device), vocabulary, prompts)
    probs, logits = pred.class_probs.cpu(), pred.mask_logits.cpu()
    is_thing = torch.tensor(vocabulary.is_thing)
    if task in (Task.PANOPTIC, Task.VIDEO_PANOPTIC):
        ids = panoptic_inference(probs, logits, is_thing, object_mask_threshold=settings.object_mask_threshold,
                                 overlap_threshold=settings.overlap_threshold).id_map.numpy()
    elif task in (Task.INSTANCE, Task.VIDEO_INSTANCE):
        result = instance_inference(probs, logits, is_thing, top_k=settings.instance_top_k)
        keep = (result.scores >= 0.5).numpy()  # the confident instances only, best first
        ids = _stack(result.masks.numpy()[keep]) if keep.any() else np.zeros(gt.shape, dtype=np.int64)
    elif task is Task.SEMANTIC:
        ids = semantic_inference(probs, logits).labels.numpy() + 1
        index = vocabulary.label_map()
        gt = np.zeros_like(gt)
        for s in sample.segments:
            gt[sample.id_maps[:frames].numpy() == s.id] = index[s.category_id] + 1
    else:
        masks = prompt_inference(pred.prompt_mask_logits.cpu(), mask_threshold=settings.prompt_mask_threshold).masks.numpy()
        ids = _stack(masks) if masks.shape[0] else np.zeros(gt.shape, dtype=np.int64)
        gt = _stack(np.stack([sample.id_maps[:frames].numpy() == s.id for s in objects])) if objects else np.zeros_like(gt)
    out = []
    for t in range(frames):
        rgb = _rgb(sample, t)
        marks = {"points": points, "boxes": boxes} if t == 0 else {}
        out.append((_draw(overlay(rgb, gt[t]), **marks), _draw(overlay(rgb, ids[t]), **marks)))
    return SamplePicture(dataset=sample.dataset, task=task.value, key=sample.key, frames=out)


def sample_pictures(model: OMGSeg, shard_dirs: dict[str, Path], evaluation: dict[str, list[str]],
                    per_task: int = 2) -> list[SamplePicture]:
    """`per_task` val clips of every (data set, task) of `evaluation`, in its order."""
    model.eval()
    pictures = []
    with torch.no_grad():
        for name, tasks in evaluation.items():
            stream = ShardStream(shard_dirs[name])
            vocabulary = Vocabulary.from_categories(stream.meta.categories)
            samples = []
            for sample in stream:
                samples.append(sample)
                if len(samples) == per_task:
                    break
            for task in tasks:
                for sample in samples:
                    picture = predict_picture(model, sample, Task.parse(task), vocabulary)
                    picture.dataset = name
                    pictures.append(picture)
    return pictures


def picture_png(picture: SamplePicture, min_width: int = 256) -> bytes:
    """One PNG: a row of ground truth overlays above a row of prediction overlays, frames
    enlarged (nearest neighbour, so ids stay crisp) to at least `min_width` pixels each."""
    import io

    gts = np.concatenate([g for g, _ in picture.frames], axis=1)
    preds = np.concatenate([p for _, p in picture.frames], axis=1)
    gap = np.full((4, gts.shape[1], 3), 255, dtype=np.uint8)
    image = Image.fromarray(np.concatenate([gts, gap, preds], axis=0))
    scale = max(1, -(-min_width // picture.frames[0][0].shape[1]))
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
