"""Per-sample pictures for the report: a trained trial's predictions on a few validation clips
per (data set, task), next to the ground truth.

Colours follow segment ids, so a track keeps its colour across the frames of a clip. Click
prompts are drawn as white dots and VOS box prompts as white rectangles on the frame they
were given on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from omgseg.core.structures import Task
from omgseg.datasets.stream import ClipSample, ShardStream
from omgseg.model.omgseg import OMGSeg
from omgseg.model.vocabulary import Vocabulary
from omgseg.platform.evaluation.writers import overlay
from omgseg.platform.tasks import TASKS

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


def predict_picture(model: OMGSeg, sample: ClipSample, task: Task, vocabulary: Vocabulary) -> SamplePicture:
    """The clip's frames (at most MAX_FRAMES) with ground truth and prediction overlays."""
    spec = TASKS[task]
    frames = min(sample.num_frames, MAX_FRAMES) if spec.video else 1
    clip = dataclasses.replace(sample, images=sample.images[:frames], id_maps=sample.id_maps[:frames],
                               frame_names=sample.frame_names[:frames])
    prompts = spec.prompts(clip)
    predicted = spec.id_maps(spec.run(model, clip, vocabulary), tuple(clip.id_maps.shape))
    truth = spec.ground_truth_maps(clip, vocabulary, frames)
    out = []
    for t in range(frames):
        rgb = _rgb(clip, t)
        marks = {"points": prompts.points, "boxes": prompts.boxes} if t == 0 else {}
        out.append((_draw(overlay(rgb, truth[t]), **marks), _draw(overlay(rgb, predicted[t]), **marks)))
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
