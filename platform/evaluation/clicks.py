"""Simulated clicks with a model: RITM's interactive protocol on a batch of images.

Each image is encoded once; in each round every object still being clicked goes through the
decoder with its clicks so far (the first as the prompt's point, the others as its positive
and negative clicks), all objects of all images in one pass; its prediction (probability >
the threshold) gives its IoU, and its `Clicker` (platform/evaluation/metrics/interactive.py)
the next click. An object is clicked until the protocol has what it reports
(`InteractiveEvaluator.wants_more`) or no error pixel is left to click.

`omgseg eval interactive` runs the same simulation on COCO panoptic files
(`evaluate_interactive_files`), each image a clip of one frame.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from omgseg.core.structures import Category, Task
from omgseg.datasets.clip import Segment
from omgseg.datasets.stream import ClipSample
from omgseg.model.inference import prompt_inference
from omgseg.model.structures import PromptBatch
from omgseg.model.vocabulary import Vocabulary
from omgseg.platform.evaluation.metrics.interactive import Clicker, InteractiveEvaluator, mask_iou

if TYPE_CHECKING:
    from omgseg.platform.tasks import ClipBatch


def _prompts(clickers: Sequence[Clicker], size: tuple[int, int]) -> PromptBatch:
    """One image's prompts: per object its first click as the point, the later ones as clicks."""
    if not clickers:
        return PromptBatch(torch.zeros(0, 4), (), size)
    first = torch.tensor([[c.clicks[0].x, c.clicks[0].y] for c in clickers], dtype=torch.float32)
    most = max(len(c.clicks) for c in clickers) - 1
    if not most:
        return PromptBatch.from_points(first, size)
    clicks = torch.zeros(len(clickers), most, 2)
    labels = torch.full((len(clickers), most), -1, dtype=torch.long)  # -1: padding
    for row, clicker in enumerate(clickers):
        for j, click in enumerate(clicker.clicks[1:]):
            clicks[row, j] = torch.tensor([click.x, click.y])
            labels[row, j] = int(click.positive)
    return PromptBatch.from_points(first, size, clicks, labels)


@torch.no_grad()
def simulate_clicks(batch: ClipBatch, objects: Sequence[Sequence[np.ndarray]], protocol: InteractiveEvaluator,
                    threshold: float) -> list[list[list[float]]]:
    """The IoU after click 1, 2, ... of every object of every image of `batch` (its first frames).

    objects: per image, one (H, W) bool mask per object, at the image's own size."""
    clickers = [[Clicker(mask) for mask in masks] for masks in objects]
    curves = [[[] for _ in masks] for masks in objects]
    active = [list(range(len(masks))) for masks in objects]  # per image: the objects still being clicked
    for image in clickers:
        for clicker in image:
            clicker.first()
    while any(active):
        prompts = [_prompts([clickers[i][k] for k in ks], batch.size) for i, ks in enumerate(active)]
        logits = batch.prompt_logits(False, prompts)
        for i, ks in enumerate(active):
            masks = prompt_inference(logits[i].cpu(), mask_threshold=threshold).masks[:, 0]
            still = []
            for row, k in enumerate(ks):
                predicted = masks[row].numpy()
                curves[i][k].append(mask_iou(predicted, objects[i][k]))
                if protocol.wants_more(curves[i][k]) and clickers[i][k].next(predicted) is not None:
                    still.append(k)
            active[i] = still
    return curves


# ---------------------------------------------------------------------------------------------
# omgseg eval interactive: the simulation on COCO panoptic files


def _file_clips(gt: dict, gt_json: Path, gt_dir: Path, image_dir: Path, max_images: int | None) -> Iterator[ClipSample]:
    """Each annotated image of a COCO panoptic JSON as a clip of one frame (read as it is needed)."""
    from PIL import Image

    from omgseg.platform.evaluation.metrics.files import read_id_png

    images = {i["id"]: i["file_name"] for i in gt["images"]}
    for ann in gt["annotations"][:max_images]:
        if ann["image_id"] not in images:
            raise ValueError(f"{gt_json}: annotation of image {ann['image_id']!r} has no entry in 'images'")
        image_path = image_dir / images[ann["image_id"]]
        if not image_path.is_file():
            raise FileNotFoundError(f"{gt_json}: image {image_path} does not exist")
        with Image.open(image_path) as im:
            rgb = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
        png = gt_dir / ann["file_name"]
        ids = read_id_png(png, f"{gt_json}: ground-truth")
        if ids.shape != tuple(rgb.shape[1:]):
            raise ValueError(f"{png}: ground truth is {ids.shape}, image {image_path} is {tuple(rgb.shape[1:])}")
        segments = tuple(Segment(int(s["id"]), int(s["category_id"]), bool(s.get("iscrowd", 0)), int(s["id"]),
                                 (int((ids == int(s["id"])).sum()),)) for s in ann["segments_info"])
        yield ClipSample(dataset=gt_json.stem, source_id=str(ann["image_id"]), frame_names=(images[ann["image_id"]],),
                         tasks=(Task.INTERACTIVE,), images=rgb[None], id_maps=torch.from_numpy(ids.astype(np.int64))[None],
                         segments=segments, key=ann["file_name"], shard=str(png))


@torch.no_grad()
def evaluate_interactive_files(checkpoint: Path, gt_json: Path, gt_dir: Path, image_dir: Path, *,
                               max_clicks: int = 20, clip_checkpoint: str | None = None,
                               max_images: int | None = None, batch_size: int = 4, progress: bool = True) -> dict:
    """Simulated clicks of a checkpoint on COCO panoptic ground truth (every non-crowd segment,
    stuff included, is an object, as OMG-Seg's COCO-SAM protocol): mIoU@1/3/5, NoC@85/90, NoF.
    The simulation of the shard evaluation, `batch_size` images a forward pass.

    gt_json / gt_dir: the panoptic JSON and its PNG folder; image_dir: the images its
    `images[].file_name` name (e.g. val2017/)."""
    from omgseg.model.checkpoint import load_checkpoint
    from omgseg.platform.evaluation.metrics.panoptic import read_panoptic_json
    from omgseg.platform.tasks import CLICK_THRESHOLD, ClipBatch, prompted_objects

    gt_json, gt_dir, image_dir = Path(gt_json), Path(gt_dir), Path(image_dir)
    protocol = InteractiveEvaluator(max_clicks=max_clicks)  # checks max_clicks before the model is loaded
    gt = read_panoptic_json(gt_json)
    for key in ("images", "categories"):
        if key not in gt:
            raise ValueError(f"{gt_json}: needs an {key!r} list")
    categories = [Category.from_json(c, str(gt_json)) for c in gt["categories"]]
    model, _ = load_checkpoint(checkpoint, clip_checkpoint=clip_checkpoint)
    model.eval()
    vocabulary = Vocabulary.from_categories(categories)
    evaluator, images = InteractiveEvaluator(max_clicks=max_clicks), 0
    clips = _file_clips(gt, gt_json, gt_dir, image_dir, max_images)
    bar = tqdm(desc="eval interactive", unit="image", disable=not progress)
    while chunk := list(itertools.islice(clips, batch_size)):
        objects = [[s.id_maps[0].numpy() == o.id for o in prompted_objects(s)] for s in chunk]
        for sample, curves in zip(chunk, simulate_clicks(ClipBatch(model, chunk, vocabulary), objects, protocol,
                                                         CLICK_THRESHOLD)):
            for k, curve in enumerate(curves):
                evaluator.add(curve, f"{sample.shard} segment {k}")
        images += len(chunk)
        bar.update(len(chunk))
    bar.close()
    return {**evaluator.compute(), "images": images}
