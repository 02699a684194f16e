"""Evaluate a model on a data set's validation shards, for each requested task.

Each task's rules (prompts, post-processing, evaluator) are its object in platform/tasks.py;
predictions are scored with the data set's own vocabulary (so a co-trained model is scored on each data set's classes).
Tasks: panoptic (PQ), instance (mask AP), semantic (mIoU) on images; interactive (mIoU@1/3/5
and NoC@85/90 with simulated corrective clicks); video_panoptic (VPQ), video_instance
(YouTube-VIS AP) and vos (J&F, the objects prompted by first-frame boxes) on clips. Panoptic
and semantic also report the classes seen and unseen in training apart (open vocabulary).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from omgseg.core.seeds import derive_seed
from omgseg.core.structures import Category, Task
from omgseg.datasets.stream import ShardStream
from omgseg.model.omgseg import OMGSeg
from omgseg.model.vocabulary import Vocabulary
from omgseg.platform.config import BatchConfig, TrainConfig
from omgseg.platform.evaluation.metrics.interactive import InteractiveEvaluator
from omgseg.platform.study.plan import LOSS_GROUPS, VAL_LOSS
from omgseg.platform.tasks import TASKS, Context, click_curves
from omgseg.platform.training.batches import ClipMaker, TrainExample, collate


def validation_examples(shard_dir: Path | str, name: str, tasks: Sequence[str], batch: BatchConfig,
                        limit: int | None = None) -> tuple[Vocabulary, list[TrainExample]]:
    """The first `limit` (None: all) val clips of a data set as training examples, with its own
    vocabulary: no augmentation (the first T frames, resized to the crop), prompts sampled from
    keys of (data set, index) alone, so every run of every seed sees the very same examples."""
    stream = ShardStream(shard_dir, split=False)
    vocabulary = Vocabulary.from_categories(stream.meta.categories)
    maker = ClipMaker(batch, {name: vocabulary.label_map()}, {name: set(check_tasks(tasks, str(shard_dir)))},
                      augment=False)
    examples = []
    for index, sample in enumerate(stream):
        if limit is not None and index >= limit:
            break
        examples.append(maker(name, sample, derive_seed("validation", name, index)))
    return vocabulary, examples


@torch.no_grad()
def validation_losses(model: OMGSeg, vocabulary: Vocabulary, examples: Sequence[TrainExample],
                      tasks: Sequence[str]) -> dict[str, dict[str, float]]:
    """{group: {"val_loss": mean}} over `examples` (one forward pass each, the last prediction
    set's weighted terms), for the query groups that serve `tasks`. A clip without prompts
    does not count towards the prompt group's mean."""
    wanted = set(check_tasks(tasks, "validation"))
    groups = {g: terms for g, (served, terms) in LOSS_GROUPS.items() if served & wanted}
    device = next(model.parameters()).device
    sums = dict.fromkeys(groups, 0.0)
    counts = dict.fromkeys(groups, 0)
    was_training = model.training
    model.train()  # the loss as training computes it (the frozen CLIP stays in eval mode regardless)
    for example in examples:
        batch = collate([example]).to(device)
        losses = model.loss(model(batch.images, vocabulary, batch.prompts), batch.targets, across_workers=False,
                            final_only=True)
        for group, terms in groups.items():
            if group == "prompt_queries" and example.targets.num_prompts == 0:
                continue
            if group == "object_queries" and not example.targets.supervise_objects:
                continue
            sums[group] += float(sum(losses[t] for t in terms))
            counts[group] += 1
    model.train(was_training)
    return {g: {VAL_LOSS: sums[g] / counts[g]} for g in groups if counts[g]}


def check_tasks(tasks: Sequence[str], where: str) -> list[Task]:
    """The tasks as Task members; an unknown name raises, naming `where` and the known tasks."""
    try:
        return [Task.parse(t) for t in tasks]
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


@torch.no_grad()
def evaluate_shards(
    model: OMGSeg,
    shard_dir: Path | str,
    tasks: Sequence[str],
    *,
    max_samples: int | None = None,
    video_windows: Sequence[int] = (1, 2, 4),
    progress: bool = False,
) -> dict[str, dict]:
    """{task: metrics} of `model` on every sample of `shard_dir` (or the first max_samples)."""
    wanted = check_tasks(tasks, str(shard_dir))
    stream = ShardStream(shard_dir, split=False)  # one process evaluates: it reads every shard
    categories = list(stream.meta.categories)
    vocabulary = Vocabulary.from_categories(categories)
    context = Context(categories, vocabulary, open_vocabulary_split(model, vocabulary), video_windows)
    evaluators = {task: TASKS[task].evaluator(context) for task in wanted}
    device = next(model.parameters()).device
    model.eval()
    total = stream.manifest.total_samples if max_samples is None else min(max_samples, stream.manifest.total_samples)
    for index, sample in enumerate(tqdm(stream, total=total, desc=f"eval {stream.dataset}", disable=not progress)):
        if index >= total:
            break
        shared = None  # the prompt-free prediction, computed once for every task that takes it
        if any(not TASKS[task].prompted for task in evaluators):
            (shared,) = model.predict(sample.images[None].to(device), vocabulary)
        for task, evaluator in evaluators.items():
            evaluator.process(sample, TASKS[task].scored_result(model, sample, vocabulary, shared))
    return {task.value: evaluator.compute() for task, evaluator in evaluators.items()}


def open_vocabulary_split(model: OMGSeg, vocabulary: Vocabulary) -> dict[str, set[int]]:
    """{"seen": class indices, "unseen": class indices} of `vocabulary`: a class is seen when one
    of its synonyms was a class name of the model's training vocabulary (`model.seen_names`,
    stored in checkpoints). Empty when the model records no training names."""
    if not model.seen_names:
        return {}
    mask = vocabulary.seen_mask(model.seen_names).tolist()
    return {"seen": {i for i, m in enumerate(mask) if m}, "unseen": {i for i, m in enumerate(mask) if not m}}


def evaluate_interactive_files(checkpoint: Path, gt_json: Path, gt_dir: Path, image_dir: Path, *,
                               max_clicks: int = 20, clip_checkpoint: str | None = None,
                               max_images: int | None = None, progress: bool = True) -> dict:
    """Simulated clicks of a checkpoint on COCO panoptic ground truth (every non-crowd segment,
    stuff included, is an instance, as OMG-Seg's COCO-SAM protocol): mIoU@1/3/5, NoC@85/90, NoF.

    gt_json / gt_dir: the panoptic JSON and its PNG folder; image_dir: the images its
    `images[].file_name` name (e.g. val2017/)."""
    from PIL import Image

    from omgseg.model.checkpoint import load_checkpoint
    from omgseg.platform.evaluation.metrics.files import read_id_png
    from omgseg.platform.evaluation.metrics.panoptic import read_panoptic_json

    gt_json, gt_dir, image_dir = Path(gt_json), Path(gt_dir), Path(image_dir)
    gt = read_panoptic_json(gt_json)
    for key in ("images", "categories"):
        if key not in gt:
            raise ValueError(f"{gt_json}: needs an {key!r} list")
    images = {i["id"]: i["file_name"] for i in gt["images"]}
    categories = [Category.from_json(c, str(gt_json)) for c in gt["categories"]]
    model, _ = load_checkpoint(checkpoint, clip_checkpoint=clip_checkpoint)
    model.eval()
    device = next(model.parameters()).device
    vocabulary = Vocabulary.from_categories(categories)
    evaluator = InteractiveEvaluator(max_clicks=max_clicks)
    annotations = gt["annotations"][:max_images] if max_images is not None else gt["annotations"]
    for ann in tqdm(annotations, desc="eval interactive", disable=not progress):
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
        masks = [ids == int(s["id"]) for s in ann["segments_info"] if not s.get("iscrowd", 0)]
        masks = [m for m in masks if m.any()]
        for k, curve in enumerate(click_curves(model, rgb, masks, vocabulary, max_clicks, device)):
            evaluator.add(curve, f"{png} segment {k}")
    return {**evaluator.compute(), "images": len(annotations)}


def evaluate_run(model: OMGSeg, config: TrainConfig, progress: bool = False) -> dict[str, dict[str, dict]]:
    """{data set: {task: metrics, loss group: {"val_loss": ...}}} on the val split of every
    data set of `config.evaluation`: the task metrics on the first `eval_samples`, the
    validation losses on the first `val_samples` (default: all)."""
    out = {}
    for name, tasks in config.evaluation.items():
        shard_dir = config.data.shard_dir(name, "val")
        out[name] = evaluate_shards(model, shard_dir, tasks, max_samples=config.eval_samples, progress=progress)
        vocabulary, examples = validation_examples(shard_dir, name, tasks, config.batch, config.val_samples)
        out[name].update(validation_losses(model, vocabulary, examples, tasks))
    return out
