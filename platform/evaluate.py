"""Evaluate a model on a data set's validation shards, for each requested task.

Predictions go through the model's per-task inference and into the task's evaluator, with
the data set's own vocabulary (so a co-trained model is scored on each data set's classes).
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
from omgseg.core.structures import Category, PromptKind, Task
from omgseg.datasets.stream import ClipSample, ShardStream
from omgseg.model.inference import instance_inference, panoptic_inference, prompt_inference, semantic_inference
from omgseg.model.omgseg import OMGSeg
from omgseg.model.structures import PromptBatch
from omgseg.model.vocabulary import Vocabulary
from omgseg.platform.batches import ClipMaker, TrainExample, collate
from omgseg.platform.config import BatchConfig, TrainConfig
from omgseg.platform.metrics.instance import InstanceEvaluator
from omgseg.platform.metrics.interactive import InteractiveEvaluator, interior_point, mask_iou, next_click
from omgseg.platform.metrics.panoptic import GtSegment, PanopticEvaluator
from omgseg.platform.metrics.semantic import SemanticEvaluator
from omgseg.platform.metrics.video_instance import VideoInstanceEvaluator
from omgseg.platform.metrics.video_panoptic import VideoPanopticEvaluator
from omgseg.platform.metrics.vos import VOSEvaluator
from omgseg.platform.plan import LOSS_GROUPS, VAL_LOSS

IGNORE = 255



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
    is_thing = torch.tensor(vocabulary.is_thing)
    settings = model.config.inference
    seen = open_vocabulary_split(model, vocabulary)
    evaluators = {}
    for task in wanted:
        if task is Task.PANOPTIC:
            groups = {name: {vocabulary.category_ids[i] for i in index} for name, index in seen.items()}
            evaluators[task] = PanopticEvaluator(categories, groups)
        elif task is Task.INSTANCE:
            evaluators[task] = InstanceEvaluator(categories)
        elif task is Task.SEMANTIC:
            evaluators[task] = SemanticEvaluator(len(categories), IGNORE, [c.name for c in categories], seen)
        elif task is Task.VIDEO_PANOPTIC:
            evaluators[task] = VideoPanopticEvaluator(categories, video_windows)
        elif task is Task.VIDEO_INSTANCE:
            evaluators[task] = VideoInstanceEvaluator(categories)
        elif task is Task.INTERACTIVE:
            evaluators[task] = InteractiveEvaluator()
        else:
            evaluators[task] = VOSEvaluator()
    device = next(model.parameters()).device
    model.eval()
    total = stream.manifest.total_samples if max_samples is None else min(max_samples, stream.manifest.total_samples)
    for index, sample in enumerate(tqdm(stream, total=total, desc=f"eval {stream.dataset}", disable=not progress)):
        if index >= total:
            break
        (pred,) = model.predict(sample.images[None].to(device), vocabulary)
        probs, masks = pred.class_probs.cpu(), pred.mask_logits.cpu()
        where = f"{shard_dir} sample {sample.key}"
        gt_ids = sample.id_maps.numpy()
        gt_info = {s.id: (s.category_id, s.iscrowd) for s in sample.segments}
        for task, evaluator in evaluators.items():
            if task in (Task.PANOPTIC, Task.VIDEO_PANOPTIC):
                result = panoptic_inference(probs, masks, is_thing, object_mask_threshold=settings.object_mask_threshold,
                                            overlap_threshold=settings.overlap_threshold)
                pred_ids = result.id_map.numpy()
                pred_segments = {s.id: vocabulary.category_ids[s.label] for s in result.segments}
                if task is Task.PANOPTIC:
                    gt_segments = {s.id: GtSegment(s.category_id, s.iscrowd, int(sum(s.area))) for s in sample.segments}
                    evaluator.add(gt_ids[0], gt_segments, pred_ids[0], pred_segments, where)
                else:
                    evaluator.add(gt_ids, gt_info, pred_ids, pred_segments, where)
            elif task is Task.INSTANCE:
                result = instance_inference(probs, masks, is_thing, top_k=settings.instance_top_k)
                gt_masks = np.stack([gt_ids[0] == s.id for s in sample.segments]) if sample.segments else \
                    np.zeros((0, *gt_ids.shape[1:]), dtype=bool)
                evaluator.add(index, gt_masks, [s.category_id for s in sample.segments], [s.iscrowd for s in sample.segments],
                              result.masks[:, 0].numpy(), [vocabulary.category_ids[i] for i in result.labels.tolist()],
                              result.scores.tolist(), where)
            elif task is Task.SEMANTIC:
                evaluator.add(_semantic_labels(sample, vocabulary), semantic_inference(probs, masks).labels[0].numpy(), where)
            elif task is Task.VIDEO_INSTANCE:
                result = instance_inference(probs, masks, is_thing, top_k=settings.instance_top_k)
                tubes = _tubes(gt_ids, sample.segments)
                evaluator.add(index, tubes, [s.category_id for s in sample.segments], [s.iscrowd for s in sample.segments],
                              result.masks.numpy(), [vocabulary.category_ids[i] for i in result.labels.tolist()],
                              result.scores.tolist(), where)
            elif task is Task.INTERACTIVE:
                _add_clicks(evaluator, model, sample, vocabulary, device, where)
            else:
                _add_vos(evaluator, model, sample, vocabulary, device, where)
    return {task.value: evaluator.compute() for task, evaluator in evaluators.items()}


def open_vocabulary_split(model: OMGSeg, vocabulary: Vocabulary) -> dict[str, set[int]]:
    """{"seen": class indices, "unseen": class indices} of `vocabulary`: a class is seen when one
    of its synonyms was a class name of the model's training vocabulary (`model.seen_names`,
    stored in checkpoints). Empty when the model records no training names."""
    if not model.seen_names:
        return {}
    mask = vocabulary.seen_mask(model.seen_names).tolist()
    return {"seen": {i for i, m in enumerate(mask) if m}, "unseen": {i for i, m in enumerate(mask) if not m}}


def _semantic_labels(sample: ClipSample, vocabulary: Vocabulary) -> np.ndarray:
    """Frame 0's class-index map (void -> IGNORE); crowd regions keep their class."""
    index = vocabulary.label_map()
    ids = sample.id_maps[0].numpy()
    out = np.full(ids.shape, IGNORE, dtype=np.int64)
    for s in sample.segments:
        out[ids == s.id] = index[s.category_id]
    return out


def _tubes(gt_ids: np.ndarray, segments) -> np.ndarray:
    """(N, T, H, W) bool tubes of the clip's segments."""
    if not segments:
        return np.zeros((0, *gt_ids.shape), dtype=bool)
    return np.stack([gt_ids == s.id for s in segments])


def _add_vos(evaluator: VOSEvaluator, model: OMGSeg, sample: ClipSample, vocabulary: Vocabulary,
             device: torch.device, where: str) -> None:
    """Semi-supervised VOS: every non-crowd object visible in frame 0 is prompted with its
    first-frame box; its prompt query's tube is the prediction for the whole clip."""
    objects = [s for s in sample.segments if not s.iscrowd and s.area[0] > 0]
    if not objects:
        return
    gt = np.stack([sample.id_maps.numpy() == s.id for s in objects])  # (N, T, H, W)
    boxes = []
    for tube in gt:
        rows, cols = np.nonzero(tube[0])
        boxes.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
    prompts = PromptBatch(torch.tensor(boxes, dtype=torch.float32), (PromptKind.BOX,) * len(boxes),
                          (sample.height, sample.width))
    (pred,) = model.predict(sample.images[None].to(device), vocabulary, [prompts])
    masks = prompt_inference(pred.prompt_mask_logits.cpu(), mask_threshold=model.config.inference.prompt_mask_threshold).masks
    evaluator.add(where, gt, masks.numpy())


def _add_clicks(evaluator: InteractiveEvaluator, model: OMGSeg, sample: ClipSample, vocabulary: Vocabulary,
                device: torch.device, where: str) -> None:
    """Every non-crowd segment of frame 0 is one instance of the click protocol."""
    ids = sample.id_maps[0].numpy()
    masks = [ids == s.id for s in sample.segments if not s.iscrowd and s.area[0] > 0]
    for k, curve in enumerate(click_curves(model, sample.images[0], masks, vocabulary, evaluator.max_clicks, device)):
        evaluator.add(curve, f"{where} segment {k}")


# RITM / SimpleClick binarise the predicted probability at 0.49 (docs/reference.md, Metrics).
CLICK_THRESHOLD = 0.49


@torch.no_grad()
def click_curves(model: OMGSeg, image: torch.Tensor, masks: Sequence[np.ndarray], vocabulary: Vocabulary,
                 max_clicks: int, device: torch.device) -> list[list[float]]:
    """Simulated clicks on each object of one image: the IoU after click 1, 2, ... per object.

    image: (3, H, W) uint8; masks: one (H, W) bool mask per object. The first click is at the
    interior-most point of the mask, each next one at `next_click` of the current error; all
    objects go through the decoder together in each round and the image is encoded once. An
    object stops once its prediction is exact (the evaluator carries its last IoU forward).
    """
    if not masks:
        return []
    size = tuple(image.shape[-2:])
    encoded = model.encode(image[None, None].to(device))
    first = torch.tensor([interior_point(m) for m in masks], dtype=torch.float32)
    extra: list[list[tuple[float, float, int]]] = [[] for _ in masks]  # further clicks per object
    curves: list[list[float]] = [[] for _ in masks]
    active = list(range(len(masks)))
    for _ in range(max_clicks):
        most = max(len(extra[k]) for k in active)
        clicks = labels = None
        if most:
            clicks = torch.zeros(len(active), most, 2)
            labels = torch.full((len(active), most), -1, dtype=torch.long)
            for row, k in enumerate(active):
                for j, (x, y, positive) in enumerate(extra[k]):
                    clicks[row, j] = torch.tensor([x, y])
                    labels[row, j] = positive
        prompts = PromptBatch.from_points(first[active], size, clicks, labels)
        (pred,) = model.predict(None, vocabulary, [prompts], encoded=encoded)
        predicted = prompt_inference(pred.prompt_mask_logits.cpu(), mask_threshold=CLICK_THRESHOLD).masks[:, 0].numpy()
        still = []
        for row, k in enumerate(active):
            curves[k].append(mask_iou(predicted[row], masks[k]))
            click = next_click(predicted[row], masks[k])
            if click is not None:
                extra[k].append((click[0], click[1], int(click[2])))
                still.append(k)
        active = still
        if not active:
            break
    return curves


def evaluate_interactive_files(checkpoint: Path, gt_json: Path, gt_dir: Path, image_dir: Path, *,
                               max_clicks: int = 20, clip_checkpoint: str | None = None,
                               max_images: int | None = None, progress: bool = True) -> dict:
    """Simulated clicks of a checkpoint on COCO panoptic ground truth (every non-crowd segment,
    stuff included, is an instance, as OMG-Seg's COCO-SAM protocol): mIoU@1/3/5, NoC@85/90, NoF.

    gt_json / gt_dir: the panoptic JSON and its PNG folder; image_dir: the images its
    `images[].file_name` name (e.g. val2017/)."""
    from PIL import Image

    from omgseg.model.omgseg import load_checkpoint
    from omgseg.platform.metrics.files import read_id_png
    from omgseg.platform.metrics.panoptic import read_panoptic_json

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
