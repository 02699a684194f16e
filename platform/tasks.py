"""The task table: one object per task holding everything about it, read by every concern.

A task's entry (`TASKS[task]`, a `TaskSpec`) says which query group it trains and is validated
through (the training batches' prompts and object supervision, the validation losses and the
study's primary targets), its headline metrics and which way each of its metrics is better
(the study's secondary targets), its prompts (interior clicks, first-frame boxes), its
post-processing with the model's own inference settings (`model.config.inference`), its
evaluator, the id maps its overlays show, and how `omgseg predict` reads its input and writes
its public result format. Its name is its command-line name.

Adding a task: docs/architecture.md, "Adding a task".
"""

from __future__ import annotations

import enum
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from omgseg.core.structures import Category, PromptKind, Task
from omgseg.datasets.clip import Segment
from omgseg.datasets.prompts import tight_box
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
from omgseg.model.structures import PromptBatch
from omgseg.model.vocabulary import Vocabulary
from omgseg.platform.evaluation import predict as files
from omgseg.platform.evaluation.clicks import simulate_clicks
from omgseg.platform.evaluation.metrics.instance import InstanceEvaluator
from omgseg.platform.evaluation.metrics.interactive import InteractiveEvaluator, interior_point
from omgseg.platform.evaluation.metrics.panoptic import GtSegment, PanopticEvaluator
from omgseg.platform.evaluation.metrics.semantic import SemanticEvaluator
from omgseg.platform.evaluation.metrics.video_instance import VideoInstanceEvaluator
from omgseg.platform.evaluation.metrics.video_panoptic import VideoPanopticEvaluator
from omgseg.platform.evaluation.metrics.vos import VOSEvaluator
from omgseg.platform.evaluation.writers import CocoInstancesWriter, CocoPanopticWriter, SemanticWriter

if TYPE_CHECKING:
    from omgseg.model.omgseg import ClipPrediction, EncodedClips, OMGSeg

IGNORE = 255  # the semantic ignore label
SHOWN_SCORE = 0.5  # an instance is drawn in an overlay from this score on (the confident ones)
# RITM / SimpleClick binarise the predicted probability at 0.49 (docs/evaluation.md, interactive).
CLICK_THRESHOLD = 0.49
MAX_CLICKS = 20  # clicks per object in the evaluation protocol (RITM's)
# Padding of a batch's smaller frames: the ImageNet mean in uint8, which the model's input
# normalisation turns into about 0 (detectron2 pads normalised images with 0).
PAD_RGB = (124, 116, 104)


class QueryGroup(str, enum.Enum):
    """The model's two kinds of queries. A task is trained and validated through one of them."""

    OBJECT = "object_queries"  # learned queries, matched to the ground truth's segments
    PROMPT = "prompt_queries"  # one query per prompt, supervised by the prompted object


# The weighted loss terms (model/criterion.py, last prediction set) of each group's validation loss.
GROUP_LOSS_TERMS = {
    QueryGroup.OBJECT: ("loss_ce", "loss_mask", "loss_dice"),
    QueryGroup.PROMPT: ("loss_prompt_mask", "loss_prompt_dice"),
}


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
    """(x0, y0, x1, y1) of each object's frame-0 mask, in pixels (objects visible in frame 0)."""
    return tuple(tuple(tight_box(sample.id_maps[0] == s.id).tolist()) for s in objects)


def stack_masks(masks: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(K, T, H, W) bool masks as one (T, H, W) id map, mask k -> id k + 1, earlier masks on top."""
    ids = np.zeros(shape, dtype=np.int64)
    for k in range(len(masks) - 1, -1, -1):
        ids[masks[k]] = k + 1
    return ids


def class_map(sample: ClipSample, vocabulary: Vocabulary, frames: int, void: int) -> np.ndarray:
    """(frames, H, W) class indices of the vocabulary (void pixels -> `void`); crowds keep their class."""
    index = vocabulary.label_map()
    ids = sample.id_maps[:frames].numpy()
    out = np.full(ids.shape, void, dtype=np.int64)
    for s in sample.segments:
        out[ids == s.id] = index[s.category_id]
    return out


# ---------------------------------------------------------------------------------------------
# Clips evaluated together


class ClipBatch:
    """Clips of one data set evaluated together: one forward pass over their frames, padded to
    the largest height and width (bottom and right, as Mask2Former batches images) and cropped
    back to each clip's own size in every prediction. The encoding and the prompt-free
    predictions are computed once for every task that takes them. A task that reads images
    (`video=False`) sees each clip's first frame. `autocast`: bf16 forward passes (CUDA runs)."""

    def __init__(self, model: OMGSeg, samples: Sequence[ClipSample], vocabulary: Vocabulary,
                 autocast: bool = False) -> None:
        frames = sorted({s.num_frames for s in samples})
        if len(frames) != 1:
            raise ValueError(f"the clips of a batch need one number of frames, got {frames}")
        self.model = model
        self.samples = list(samples)
        self.vocabulary = vocabulary
        self.autocast = autocast
        self.size = (max(s.height for s in samples), max(s.width for s in samples))
        self._encoded: dict[bool, EncodedClips] = {}
        self._shared: dict[bool, list[ClipPrediction]] = {}

    def _view(self, video: bool) -> bool:
        """The cache key: whole clips, or first frames (the same thing for images)."""
        return video or self.samples[0].num_frames == 1

    def _autocast(self):
        device = next(self.model.parameters()).device
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def encoded(self, video: bool) -> EncodedClips:
        """The clips (or their first frames) through the frozen CLIP and the pixel decoder."""
        key = self._view(video)
        if key not in self._encoded:
            device = next(self.model.parameters()).device
            frames = self.samples[0].num_frames if key else 1
            images = torch.tensor(PAD_RGB, dtype=torch.uint8).view(1, 1, 3, 1, 1).repeat(
                len(self.samples), frames, 1, *self.size)  # (B, T, 3, H, W)
            for i, s in enumerate(self.samples):
                images[i, :, :, :s.height, :s.width] = s.images[:frames]
            with torch.no_grad(), self._autocast():
                self._encoded[key] = self.model.encode(images.to(device))
        return self._encoded[key]

    def predict(self, video: bool, prompts: Sequence[PromptBatch] | None = None) -> list[ClipPrediction]:
        """One prediction per clip, cropped to its size; prompts at the batch's size (`self.size`)."""
        with self._autocast():
            predictions = self.model.predict(None, self.vocabulary, None if prompts is None else list(prompts),
                                             encoded=self.encoded(video))
        return [p.cropped(s.height, s.width) for p, s in zip(predictions, self.samples)]

    def prompt_logits(self, video: bool, prompts: Sequence[PromptBatch]) -> list[torch.Tensor]:
        """Each clip's prompt queries' mask logits (K, T, H, W) at its own size, in prompt order:
        what `predict` gives as `prompt_mask_logits`, without upsampling the object queries'
        masks and classifying them (the click rounds need neither)."""
        with torch.no_grad(), self._autocast():
            queries = self.model(None, self.vocabulary, list(prompts), encoded=self.encoded(video)).queries
        out = []
        for i, sample in enumerate(self.samples):
            logits = queries.mask_logits[i, queries.num_object_queries:][queries.prompt_valid[i]]  # (K, T, h, w)
            if logits.shape[0]:  # bilinear, as the model upsamples its predictions
                logits = F.interpolate(logits.flatten(0, 1)[:, None], size=self.size, mode="bilinear",
                                       align_corners=False).view(*logits.shape[:2], *self.size)
            out.append(logits[..., :sample.height, :sample.width])
        return out

    def shared(self, video: bool) -> list[ClipPrediction]:
        """The prompt-free predictions, computed once for every task that takes them."""
        key = self._view(video)
        if key not in self._shared:
            self._shared[key] = self.predict(video)
        return self._shared[key]


def empty_prompts(size: tuple[int, int]) -> PromptBatch:
    """No prompt for a clip of a prompted batch (the decoder pads it)."""
    return PromptBatch(torch.zeros(0, 4), (), size)


# ---------------------------------------------------------------------------------------------
# The task entries


class TaskEvaluator:
    """A task's metric over one data set: `process` each clip with its index in the val split,
    `merge` another worker's metric, then `compute`."""

    def __init__(self, spec: TaskSpec, metric, context: Context) -> None:
        self.spec = spec
        self.metric = metric  # the metric module's evaluator: a picklable state that merges
        self.context = context

    def process(self, index: int, sample: ClipSample, result: object) -> None:
        self.spec.score(self.metric, self.context, index, sample, result, f"{sample.shard} sample {sample.key}")

    def merge(self, metric) -> None:
        self.metric.merge(metric)

    def compute(self) -> dict:
        return self.metric.compute()


class TaskSpec(ABC):
    """The rules of one task. Subclasses override what differs from a prompt-free image task."""

    task: Task
    queries = QueryGroup.OBJECT  # the query group that trains it and carries its validation loss
    video = False  # whether the task reads whole clips (else frame 0)
    headline: tuple[str, ...] = ()  # the metrics a study measures unless it names others
    higher = ""  # the names (a regex) of its metrics where higher is better
    lower = ""  # ... and where lower is better
    forwards_per_clip = 1  # the model's forward passes to score one val clip (a dry run's evaluation cost)

    @property
    def name(self) -> str:
        """Its name on the command line and in configs."""
        return self.task.value

    @property
    def prompted(self) -> bool:
        return self.queries is QueryGroup.PROMPT

    def direction(self, metric: str) -> str | None:
        """"higher" or "lower" (which is better) for one of its metrics; None for a name it does not report."""
        for way, pattern in (("higher", self.higher), ("lower", self.lower)):
            if pattern and re.fullmatch(pattern, metric):
                return way
        return None

    def prompts(self, sample: ClipSample, size: tuple[int, int] | None = None) -> Prompts:
        """The prompts of one clip, for an input of `size` (default: the clip's own)."""
        return Prompts()

    def results(self, batch: ClipBatch) -> list[object]:
        """The task's result for every clip of `batch`, with the model's inference settings."""
        return [self.postprocess(batch.model, p, batch.vocabulary) for p in batch.shared(self.video)]

    def scored(self, batch: ClipBatch) -> list[object]:
        """What the evaluator scores for every clip: `results`, unless the protocol asks for more."""
        return self.results(batch)

    def run(self, model: OMGSeg, sample: ClipSample, vocabulary: Vocabulary) -> object:
        """The task's result on one clip (the report's pictures)."""
        return self.results(ClipBatch(model, [sample], vocabulary))[0]

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
    def metric(self, context: Context):
        """A fresh evaluator of this task's metric over one data set (platform/evaluation/metrics/)."""

    @abstractmethod
    def score(self, metric, context: Context, index: int, sample: ClipSample, result: object, where: str) -> None:
        """Hand one clip's ground truth and scored result to `metric`; `index`: the clip's
        position in the val split (an id that is the same on every worker)."""

    def evaluator(self, context: Context) -> TaskEvaluator:
        return TaskEvaluator(self, self.metric(context), context)

    @abstractmethod
    def predict_files(self, model: OMGSeg, vocabulary: Vocabulary, request: files.PredictRequest) -> files.PredictSummary:
        """`omgseg predict`: the task on the request's input files, written in its result format."""


def _labels(vocabulary: Vocabulary, indices: torch.Tensor) -> list[int]:
    return [vocabulary.category_ids[i] for i in indices.tolist()]


class Panoptic(TaskSpec):
    task = Task.PANOPTIC
    headline = ("PQ",)
    higher = r"(PQ|SQ|RQ)(_th|_st|_seen|_unseen)?"
    writer = CocoPanopticWriter

    def postprocess(self, model, pred, vocabulary) -> PanopticResult:
        settings = model.config.inference
        return panoptic_inference(pred.class_probs.cpu(), pred.low_res_mask_logits.cpu(), torch.tensor(vocabulary.is_thing),
                                  object_mask_threshold=settings.object_mask_threshold,
                                  overlap_threshold=settings.overlap_threshold, size=pred.image_size,
                                  padded_size=pred.padded_size)

    def id_maps(self, result: PanopticResult, shape) -> np.ndarray:
        return result.id_map.numpy()

    def metric(self, context: Context) -> PanopticEvaluator:
        groups = {name: {context.vocabulary.category_ids[i] for i in index} for name, index in context.seen.items()}
        return PanopticEvaluator(context.categories, groups)

    def score(self, metric, context, index, sample, result: PanopticResult, where) -> None:
        gt = {s.id: GtSegment(s.category_id, s.iscrowd, int(sum(s.area))) for s in sample.segments}
        predicted = {s.id: context.vocabulary.category_ids[s.label] for s in result.segments}
        metric.add(sample.id_maps[0].numpy(), gt, result.id_map[0].numpy(), predicted, where)

    def predict_files(self, model, vocabulary, request):
        return files.predict_images(self, model, vocabulary, request)


class VideoPanoptic(Panoptic):
    task = Task.VIDEO_PANOPTIC
    video = True
    headline = ("VPQ",)
    higher = r"VPQ(@\d+)?(_th|_st)?"

    def metric(self, context: Context) -> VideoPanopticEvaluator:
        return VideoPanopticEvaluator(context.categories, context.video_windows)

    def score(self, metric, context, index, sample, result: PanopticResult, where) -> None:
        gt = {s.id: (s.category_id, s.iscrowd) for s in sample.segments}
        predicted = {s.id: context.vocabulary.category_ids[s.label] for s in result.segments}
        metric.add(sample.id_maps.numpy(), gt, result.id_map.numpy(), predicted, where)

    def predict_files(self, model, vocabulary, request):
        return files.predict_video_panoptic(self, model, vocabulary, request)


class Instance(TaskSpec):
    task = Task.INSTANCE
    headline = ("AP",)
    higher = r"AP(50|75|s|m|l)?"
    writer = CocoInstancesWriter

    def postprocess(self, model, pred, vocabulary) -> InstanceResult:
        return instance_inference(pred.class_probs.cpu(), pred.low_res_mask_logits.cpu(), torch.tensor(vocabulary.is_thing),
                                  top_k=model.config.inference.instance_top_k, size=pred.image_size,
                                  padded_size=pred.padded_size)

    def id_maps(self, result: InstanceResult, shape) -> np.ndarray:
        keep = (result.scores >= SHOWN_SCORE).numpy()  # best first
        return stack_masks(result.masks.numpy()[keep], shape)

    def metric(self, context: Context) -> InstanceEvaluator:
        return InstanceEvaluator(context.categories)

    def score(self, metric, context, index, sample, result: InstanceResult, where) -> None:
        ids = sample.id_maps.numpy() if self.video else sample.id_maps[0].numpy()
        gt = np.stack([ids == s.id for s in sample.segments]) if sample.segments else np.zeros((0, *ids.shape), bool)
        masks = result.masks.numpy() if self.video else result.masks[:, 0].numpy()
        metric.add(index, gt, [s.category_id for s in sample.segments], [s.iscrowd for s in sample.segments],
                   masks, _labels(context.vocabulary, result.labels), result.scores.tolist(), where)

    def predict_files(self, model, vocabulary, request):
        return files.predict_images(self, model, vocabulary, request)


class VideoInstance(Instance):
    task = Task.VIDEO_INSTANCE
    video = True
    higher = r"AP(50|75|s|m|l)?|AR(1|10)"

    def metric(self, context: Context) -> VideoInstanceEvaluator:
        return VideoInstanceEvaluator(context.categories)

    def predict_files(self, model, vocabulary, request):
        return files.predict_video_instances(self, model, vocabulary, request)


class Semantic(TaskSpec):
    task = Task.SEMANTIC
    headline = ("mIoU",)
    higher = r"mIoU(_seen|_unseen)?|fwIoU|pACC|mACC|IoU-.+"
    writer = SemanticWriter

    def postprocess(self, model, pred, vocabulary) -> SemanticResult:
        return semantic_inference(pred.class_probs.cpu(), pred.low_res_mask_logits.cpu(), size=pred.image_size,
                                  padded_size=pred.padded_size)

    def id_maps(self, result: SemanticResult, shape) -> np.ndarray:
        return result.labels.numpy() + 1  # class index + 1, so class 0 is coloured too

    def ground_truth_maps(self, sample, vocabulary, frames) -> np.ndarray:
        return class_map(sample, vocabulary, frames, void=-1) + 1

    def metric(self, context: Context) -> SemanticEvaluator:
        names = [c.name for c in context.categories]
        return SemanticEvaluator(len(context.categories), IGNORE, names, context.seen)

    def score(self, metric, context, index, sample, result: SemanticResult, where) -> None:
        metric.add(class_map(sample, context.vocabulary, 1, void=IGNORE)[0], result.labels[0].numpy(), where)

    def predict_files(self, model, vocabulary, request):
        return files.predict_images(self, model, vocabulary, request)


class _Prompted(TaskSpec):
    """A task whose queries are prompted by the ground truth's frame-0 objects."""

    queries = QueryGroup.PROMPT

    def results(self, batch: ClipBatch) -> list[object]:
        prompts = [self.prompts(s, batch.size).batch or empty_prompts(batch.size) for s in batch.samples]
        return [self.postprocess(batch.model, p, batch.vocabulary) for p in batch.predict(self.video, prompts)]

    def postprocess(self, model, pred, vocabulary) -> PromptResult:
        return prompt_inference(pred.low_res_prompt_mask_logits.cpu(), mask_threshold=model.config.inference.prompt_mask_threshold,
                                size=pred.image_size, padded_size=pred.padded_size)

    def id_maps(self, result: PromptResult, shape) -> np.ndarray:
        return stack_masks(result.masks.numpy(), shape)

    def ground_truth_maps(self, sample, vocabulary, frames) -> np.ndarray:
        ids = sample.id_maps[:frames].numpy()
        objects = prompted_objects(sample)
        return stack_masks(np.stack([ids == s.id for s in objects]), ids.shape) if objects else np.zeros_like(ids)


class VOS(_Prompted):
    """Semi-supervised VOS: every object visible in frame 0 is prompted with its frame-0 box;
    its prompt query's tube is the prediction for the whole clip."""

    task = Task.VOS
    video = True
    headline = ("J&F",)
    higher = r"J&F|[JF]-(Mean|Recall)"
    lower = r"[JF]-Decay"

    def prompts(self, sample: ClipSample, size: tuple[int, int] | None = None) -> Prompts:
        objects = prompted_objects(sample)
        if not objects:
            return Prompts()
        boxes = first_frame_boxes(sample, objects)
        batch = PromptBatch(torch.tensor(boxes, dtype=torch.float32), (PromptKind.BOX,) * len(boxes),
                            size or (sample.height, sample.width))
        return Prompts(batch, objects, boxes=boxes)

    def metric(self, context: Context) -> VOSEvaluator:
        return VOSEvaluator()

    def score(self, metric, context, index, sample, result: PromptResult, where) -> None:
        objects = prompted_objects(sample)
        if not objects:
            return  # nothing to track in this clip
        ids = sample.id_maps.numpy()
        metric.add(where, np.stack([ids == s.id for s in objects]), result.masks.numpy())

    def predict_files(self, model, vocabulary, request):
        return files.predict_vos(self, model, vocabulary, request)


class Interactive(_Prompted):
    """One click at the interior-most point of every frame-0 object. Evaluated with simulated
    corrective clicks (platform/evaluation/clicks.py); drawn after the first click."""

    task = Task.INTERACTIVE
    headline = ("mIoU@1",)
    higher = r"mIoU@\d+"
    lower = r"NoC@\d+|NoF@\d+"
    forwards_per_clip = MAX_CLICKS  # at most one forward per simulated click

    def prompts(self, sample: ClipSample, size: tuple[int, int] | None = None) -> Prompts:
        objects = prompted_objects(sample)
        ids = sample.id_maps[0].numpy()
        points = tuple(interior_point(ids == s.id) for s in objects)
        batch = PromptBatch.from_points(torch.tensor(points, dtype=torch.float32).reshape(-1, 2),
                                        size or (sample.height, sample.width))
        return Prompts(batch, objects, points=points)

    def protocol(self) -> InteractiveEvaluator:
        """The click protocol's settings (RITM's 20 clicks), which the simulation follows and the metric counts."""
        return InteractiveEvaluator(max_clicks=MAX_CLICKS)

    def scored(self, batch: ClipBatch) -> list[list[list[float]]]:
        """The IoU curve of every object of every clip over simulated corrective clicks."""
        objects = []
        for sample in batch.samples:
            ids = sample.id_maps[0].numpy()
            objects.append([ids == s.id for s in prompted_objects(sample)])
        return simulate_clicks(batch, objects, self.protocol(), CLICK_THRESHOLD)

    def metric(self, context: Context) -> InteractiveEvaluator:
        return self.protocol()

    def score(self, metric, context, index, sample, curves: list[list[float]], where) -> None:
        for k, curve in enumerate(curves):
            metric.add(curve, f"{where} segment {k}")

    def predict_files(self, model, vocabulary, request):
        return files.predict_clicks(self, model, vocabulary, request)


TASKS: dict[Task, TaskSpec] = {spec.task: spec for spec in (
    Panoptic(), Instance(), Semantic(), Interactive(), VideoPanoptic(), VideoInstance(), VOS())}


def loss_groups(tasks: Iterable[Task | str]) -> list[QueryGroup]:
    """The query groups whose validation losses serve `tasks`, in QueryGroup order."""
    served = {TASKS[Task.parse(t) if isinstance(t, str) else t].queries for t in tasks}
    return [g for g in QueryGroup if g in served]


def tasks_of(group: QueryGroup) -> set[Task]:
    """The tasks trained through `group`'s queries."""
    return {task for task, spec in TASKS.items() if spec.queries is group}
