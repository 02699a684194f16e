"""One object per task: what it prompts, how the model's output becomes its result, how that
result is scored, and how it is drawn.

Evaluation (platform/evaluation/evaluate.py), the report's sample pictures (dashboards/samples.py) and
`omgseg predict` on images (platform/evaluation/predict.py) all go through `TASKS`, so a task's rules
live in one place: its first-frame prompts (interior clicks, boxes), its post-processing with
the model's own inference settings (`model.config.inference`), its evaluator behind one
`process(sample, result)` signature, and the id maps its overlays show.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from omgseg.core.structures import Category, PromptKind, Task
from omgseg.datasets.clip import Segment
from omgseg.datasets.stream import ClipSample
from omgseg.model.inference import (
    InstanceResult,
    PanopticResult,
    PromptResult,
    SemanticResult,
    instance_inference,
    panoptic_inference,
    prompt_inference,
    semantic_inference,
)
from omgseg.model.omgseg import ClipPrediction, OMGSeg
from omgseg.model.structures import PromptBatch
from omgseg.model.vocabulary import Vocabulary
from omgseg.platform.evaluation.metrics.instance import InstanceEvaluator
from omgseg.platform.evaluation.metrics.interactive import InteractiveEvaluator, interior_point, mask_iou, next_click
from omgseg.platform.evaluation.metrics.panoptic import GtSegment, PanopticEvaluator
from omgseg.platform.evaluation.metrics.semantic import SemanticEvaluator
from omgseg.platform.evaluation.metrics.video_instance import VideoInstanceEvaluator
from omgseg.platform.evaluation.metrics.video_panoptic import VideoPanopticEvaluator
from omgseg.platform.evaluation.metrics.vos import VOSEvaluator

IGNORE = 255  # the semantic ignore label
SHOWN_SCORE = 0.5  # an instance is drawn in an overlay from this score on (the confident ones)
# RITM / SimpleClick binarise the predicted probability at 0.49 (docs/reference.md, Metrics).
CLICK_THRESHOLD = 0.49
MAX_CLICKS = 20  # clicks per object in the evaluation protocol (RITM's)


@dataclass(frozen=True)
class Prompts:
    """A task's prompts for one clip: the batch for the model, and what to draw of them."""

    batch: PromptBatch | None = None
    objects: tuple[Segment, ...] = ()  # the prompted ground-truth objects, in prompt order
    points: tuple[tuple[float, float], ...] = ()
    boxes: tuple[tuple[float, float, float, float], ...] = ()


@dataclass(frozen=True)
class Context:
    """What every task's evaluator of one data set needs: its classes and the open-vocabulary split."""

    categories: Sequence[Category]
    vocabulary: Vocabulary
    seen: Mapping[str, set[int]] = field(default_factory=dict)  # {"seen"/"unseen": class indices}
    video_windows: Sequence[int] = (1, 2, 4)


def prompted_objects(sample: ClipSample) -> tuple[Segment, ...]:
    """The objects a prompted task asks for: non-crowd segments visible in frame 0."""
    return tuple(s for s in sample.segments if not s.iscrowd and s.area[0] > 0)


def first_frame_boxes(sample: ClipSample, objects: Sequence[Segment]) -> tuple[tuple[float, float, float, float], ...]:
    """(x0, y0, x1, y1) of each object's frame-0 mask, in pixels."""
    ids = sample.id_maps[0].numpy()
    boxes = []
    for s in objects:
        rows, cols = np.nonzero(ids == s.id)
        boxes.append((float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)))
    return tuple(boxes)


def stack_masks(masks: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(K, T, H, W) bool masks as one (T, H, W) id map, mask k -> id k + 1, earlier masks on top."""
    ids = np.zeros(shape, dtype=np.int64)
    for k in range(len(masks) - 1, -1, -1):
        ids[masks[k]] = k + 1
    return ids


class TaskSpec(ABC):
    """The rules of one task. Subclasses override what differs from a prompt-free image task."""

    task: Task
    video = False  # whether the task reads whole clips (else frame 0)
    prompted = False  # whether its queries are prompted (so it cannot reuse a prompt-free prediction)

    def prompts(self, sample: ClipSample) -> Prompts:
        return Prompts()

    def run(self, model: OMGSeg, sample: ClipSample, vocabulary: Vocabulary,
            shared: ClipPrediction | None = None) -> object:
        """The task's result on one clip. `shared`: the prompt-free prediction of these frames,
        if another task computed it already (prompt-free tasks reuse it)."""
        frames = sample.images if self.video else sample.images[:1]
        prompts = self.prompts(sample)
        if prompts.batch is None and shared is not None and (self.video or sample.num_frames == 1):
            pred = shared
        else:
            device = next(model.parameters()).device
            (pred,) = model.predict(frames[None].to(device), vocabulary, None if prompts.batch is None else [prompts.batch])
        return self.postprocess(model, pred, vocabulary)

    def scored_result(self, model: OMGSeg, sample: ClipSample, vocabulary: Vocabulary,
                      shared: ClipPrediction | None = None) -> object:
        """What the evaluator scores: `run`'s result, unless the protocol asks for more."""
        return self.run(model, sample, vocabulary, shared)

    @abstractmethod
    def postprocess(self, model: OMGSeg, pred: ClipPrediction, vocabulary: Vocabulary) -> object:
        """The model's prediction as the task's result, with the model's inference settings."""

    @abstractmethod
    def id_maps(self, result: object, shape: tuple[int, ...]) -> np.ndarray:
        """(T, H, W) int64 ids to colour in an overlay (0 = nothing)."""

    def ground_truth_maps(self, sample: ClipSample, vocabulary: Vocabulary, frames: int) -> np.ndarray:
        """(frames, H, W) ground-truth ids in the same id space as `id_maps`."""
        return sample.id_maps[:frames].numpy()

    @abstractmethod
    def evaluator(self, context: Context) -> TaskEvaluator:
        """A fresh evaluator of this task over one data set."""


class TaskEvaluator:
    """A task's metric over a data set: `process` one clip's ground truth and result, then `compute`."""

    def __init__(self, metric, process) -> None:
        self.metric = metric
        self._process = process
        self.clips = 0

    def process(self, sample: ClipSample, result: object) -> None:
        self._process(self.metric, sample, result, f"{sample.shard} sample {sample.key}", self.clips)
        self.clips += 1

    def compute(self) -> dict:
        return self.metric.compute()


def _labels(vocabulary: Vocabulary, indices: torch.Tensor) -> list[int]:
    return [vocabulary.category_ids[i] for i in indices.tolist()]


class Panoptic(TaskSpec):
    task = Task.PANOPTIC

    def postprocess(self, model, pred, vocabulary) -> PanopticResult:
        settings = model.config.inference
        return panoptic_inference(pred.class_probs.cpu(), pred.low_res_mask_logits.cpu(), torch.tensor(vocabulary.is_thing),
                                  object_mask_threshold=settings.object_mask_threshold,
                                  overlap_threshold=settings.overlap_threshold, size=pred.image_size)

    def id_maps(self, result: PanopticResult, shape) -> np.ndarray:
        return result.id_map.numpy()

    def evaluator(self, context: Context) -> TaskEvaluator:
        groups = {name: {context.vocabulary.category_ids[i] for i in index} for name, index in context.seen.items()}
        vocabulary = context.vocabulary

        def process(metric, sample, result: PanopticResult, where, _):
            gt = {s.id: GtSegment(s.category_id, s.iscrowd, int(sum(s.area))) for s in sample.segments}
            predicted = {s.id: vocabulary.category_ids[s.label] for s in result.segments}
            metric.add(sample.id_maps[0].numpy(), gt, result.id_map[0].numpy(), predicted, where)

        return TaskEvaluator(PanopticEvaluator(context.categories, groups), process)


class VideoPanoptic(Panoptic):
    task = Task.VIDEO_PANOPTIC
    video = True

    def evaluator(self, context: Context) -> TaskEvaluator:
        vocabulary = context.vocabulary

        def process(metric, sample, result: PanopticResult, where, _):
            gt = {s.id: (s.category_id, s.iscrowd) for s in sample.segments}
            predicted = {s.id: vocabulary.category_ids[s.label] for s in result.segments}
            metric.add(sample.id_maps.numpy(), gt, result.id_map.numpy(), predicted, where)

        return TaskEvaluator(VideoPanopticEvaluator(context.categories, context.video_windows), process)


class Instance(TaskSpec):
    task = Task.INSTANCE

    def postprocess(self, model, pred, vocabulary) -> InstanceResult:
        return instance_inference(pred.class_probs.cpu(), pred.low_res_mask_logits.cpu(), torch.tensor(vocabulary.is_thing),
                                  top_k=model.config.inference.instance_top_k, size=pred.image_size)

    def id_maps(self, result: InstanceResult, shape) -> np.ndarray:
        keep = (result.scores >= SHOWN_SCORE).numpy()  # best first
        return stack_masks(result.masks.numpy()[keep], shape)

    def _tubes(self, sample: ClipSample) -> np.ndarray:
        """(N, T', H, W) ground-truth masks of the clip's segments (T' = 1 for an image task)."""
        ids = sample.id_maps.numpy() if self.video else sample.id_maps[:1].numpy()
        if not sample.segments:
            return np.zeros((0, *ids.shape), dtype=bool)
        return np.stack([ids == s.id for s in sample.segments])

    def evaluator(self, context: Context) -> TaskEvaluator:
        vocabulary = context.vocabulary
        metric = VideoInstanceEvaluator(context.categories) if self.video else InstanceEvaluator(context.categories)

        def process(metric, sample, result: InstanceResult, where, index):
            gt = self._tubes(sample) if self.video else self._tubes(sample)[:, 0]  # images: (N, H, W)
            masks = result.masks.numpy() if self.video else result.masks[:, 0].numpy()
            metric.add(index, gt, [s.category_id for s in sample.segments], [s.iscrowd for s in sample.segments],
                       masks, _labels(vocabulary, result.labels), result.scores.tolist(), where)

        return TaskEvaluator(metric, process)


class VideoInstance(Instance):
    task = Task.VIDEO_INSTANCE
    video = True


class Semantic(TaskSpec):
    task = Task.SEMANTIC

    def postprocess(self, model, pred, vocabulary) -> SemanticResult:
        return semantic_inference(pred.class_probs.cpu(), pred.low_res_mask_logits.cpu(), size=pred.image_size)

    def id_maps(self, result: SemanticResult, shape) -> np.ndarray:
        return result.labels.numpy() + 1  # class index + 1, so class 0 is coloured too

    def ground_truth_maps(self, sample, vocabulary, frames) -> np.ndarray:
        return class_map(sample, vocabulary, frames, void=-1) + 1

    def evaluator(self, context: Context) -> TaskEvaluator:
        vocabulary = context.vocabulary

        def process(metric, sample, result: SemanticResult, where, _):
            metric.add(class_map(sample, vocabulary, 1, void=IGNORE)[0], result.labels[0].numpy(), where)

        names = [c.name for c in context.categories]
        return TaskEvaluator(SemanticEvaluator(len(context.categories), IGNORE, names, context.seen), process)


def class_map(sample: ClipSample, vocabulary: Vocabulary, frames: int, void: int) -> np.ndarray:
    """(frames, H, W) class indices of the vocabulary (void pixels -> `void`); crowds keep their class."""
    index = vocabulary.label_map()
    ids = sample.id_maps[:frames].numpy()
    out = np.full(ids.shape, void, dtype=np.int64)
    for s in sample.segments:
        out[ids == s.id] = index[s.category_id]
    return out


class _Prompted(TaskSpec):
    """A task whose queries are prompted by the ground truth's frame-0 objects."""

    prompted = True

    def postprocess(self, model, pred, vocabulary) -> PromptResult:
        return prompt_inference(pred.low_res_prompt_mask_logits.cpu(), mask_threshold=model.config.inference.prompt_mask_threshold,
                                size=pred.image_size)

    def id_maps(self, result: PromptResult | None, shape) -> np.ndarray:
        return stack_masks(result.masks.numpy(), shape) if result is not None else np.zeros(shape, dtype=np.int64)

    def ground_truth_maps(self, sample, vocabulary, frames) -> np.ndarray:
        ids = sample.id_maps[:frames].numpy()
        objects = prompted_objects(sample)
        return stack_masks(np.stack([ids == s.id for s in objects]), ids.shape) if objects else np.zeros_like(ids)


class VOS(_Prompted):
    """Semi-supervised VOS: every object visible in frame 0 is prompted with its frame-0 box;
    its prompt query's tube is the prediction for the whole clip."""

    task = Task.VOS
    video = True

    def prompts(self, sample: ClipSample) -> Prompts:
        objects = prompted_objects(sample)
        if not objects:
            return Prompts()
        boxes = first_frame_boxes(sample, objects)
        batch = PromptBatch(torch.tensor(boxes, dtype=torch.float32), (PromptKind.BOX,) * len(boxes),
                            (sample.height, sample.width))
        return Prompts(batch, objects, boxes=boxes)

    def run(self, model, sample, vocabulary, shared=None) -> PromptResult | None:
        return super().run(model, sample, vocabulary) if prompted_objects(sample) else None

    def evaluator(self, context: Context) -> TaskEvaluator:
        def process(metric, sample, result: PromptResult | None, where, _):
            if result is None:
                return  # nothing to track in this clip
            ids = sample.id_maps.numpy()
            gt = np.stack([ids == s.id for s in prompted_objects(sample)])  # (N, T, H, W)
            metric.add(where, gt, result.masks.numpy())

        return TaskEvaluator(VOSEvaluator(), process)


class Interactive(_Prompted):
    """One click at the interior-most point of every frame-0 object. Evaluated with simulated
    corrective clicks (`click_curves`); drawn after the first click."""

    task = Task.INTERACTIVE

    def prompts(self, sample: ClipSample) -> Prompts:
        objects = prompted_objects(sample)
        ids = sample.id_maps[0].numpy()
        points = tuple(interior_point(ids == s.id) for s in objects)
        batch = PromptBatch.from_points(torch.tensor(points, dtype=torch.float32).reshape(-1, 2),
                                        (sample.height, sample.width))
        return Prompts(batch, objects, points=points)

    def scored_result(self, model, sample, vocabulary, shared=None) -> list[list[float]]:
        """The IoU curve of every object over simulated corrective clicks."""
        ids = sample.id_maps[0].numpy()
        masks = [ids == s.id for s in prompted_objects(sample)]
        return click_curves(model, sample.images[0], masks, vocabulary, MAX_CLICKS,
                            next(model.parameters()).device)

    def evaluator(self, context: Context) -> TaskEvaluator:
        def process(metric, sample, curves: list[list[float]], where, _):
            for k, curve in enumerate(curves):
                metric.add(curve, f"{where} segment {k}")

        return TaskEvaluator(InteractiveEvaluator(max_clicks=MAX_CLICKS), process)


TASKS: dict[Task, TaskSpec] = {spec.task: spec for spec in (
    Panoptic(), Instance(), Semantic(), Interactive(), VideoPanoptic(), VideoInstance(), VOS())}


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
