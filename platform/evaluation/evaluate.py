"""Evaluation on validation shards: every task's metric and every query group's validation loss,
on one worker or shared out between the workers of a run.

    evaluate_run(model, config, share)        # the trial's final and periodic evaluations
    evaluate_shards(model, shard_dir, tasks)  # one data set's task metrics, in this process
    validation_examples(...)                  # the first val clips as loss examples (TAG's held-out batches)

(`omgseg eval interactive` runs the same click simulation on COCO panoptic files:
platform/evaluation/clicks.py.)

The one path all of them take:
- Shared out: the val clips of a data set are cut into batches of `eval_batch_size` clips,
  the same whatever the number of workers, and each worker (`Share`) takes a contiguous run of
  whole batches, reading only the shards that hold it. Evaluator states are sums or per-clip
  records that merge (platform/evaluation/metrics/), validation losses are exact sums, and the
  workers' states are merged once, on rank 0, at the end of the run's evaluation: the result
  equals one process evaluating everything.
- Streamed: clips are read, scored and dropped batch by batch; nothing grows with the number
  of val clips but the evaluators' own states.
- Batched: a batch's clips go through the model in one forward pass (`ClipBatch` in
  platform/tasks.py), under the run's bf16 autocast on CUDA.

Each task's rules (prompts, post-processing, evaluator, loss group) are its entry in
platform/tasks.py; predictions are scored with the data set's own vocabulary (so a co-trained
model is scored on each data set's classes). Panoptic and semantic also report the classes
seen and unseen in training apart (open vocabulary).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch
from tqdm import tqdm

from omgseg.core.seeds import derive_seed
from omgseg.core.structures import Task
from omgseg.datasets.stream import ClipSample, ShardStream, decode_sample
from omgseg.model.omgseg import ModelOutputs, OMGSeg
from omgseg.model.structures import QueryOutputs
from omgseg.model.vocabulary import Vocabulary
from omgseg.platform.config import BatchConfig, RunSpec, TrainConfig
from omgseg.platform.records import DatasetEvaluation, Evaluation
from omgseg.platform.tasks import (
    GROUP_LOSS_TERMS,
    TASKS,
    ClipBatch,
    Context,
    QueryGroup,
    TaskEvaluator,
    loss_groups,
)
from omgseg.platform.training.batches import ClipMaker, TrainExample, collate


@dataclass(frozen=True)
class Share:
    """The part of every val split one worker of `world` evaluates."""

    rank: int = 0
    world: int = 1

    def bounds(self, total: int, batch: int) -> tuple[int, int]:
        """[start, end) of the clips this worker evaluates out of `total`: a contiguous run of
        whole batches of `batch` clips (batch k holds clips kB..kB+B-1 for any number of
        workers), the runs as even as whole batches allow."""
        batches = -(-total // batch)
        first, last = self.rank * batches // self.world, (self.rank + 1) * batches // self.world
        return min(first * batch, total), min(last * batch, total)


@dataclass(frozen=True)
class EvalSettings:
    """How a data set is evaluated: batches, caps, and how val clips become loss examples."""

    batch_size: int = 4  # clips per forward pass
    task_samples: int | None = None  # the first N val clips score the task metrics (None: all)
    loss_samples: int | None = None  # the first N give the validation losses (None: all, 0: none)
    clips: BatchConfig = BatchConfig()  # frames, crop and prompts of the loss examples
    video_windows: Sequence[int] = (1, 2, 4)

    @classmethod
    def of(cls, config: RunSpec) -> EvalSettings:
        return cls(config.eval_batch_size, config.eval_samples, config.val_samples, config.batch)


def check_tasks(tasks: Sequence[str], where: str) -> list[Task]:
    """The tasks as Task members; an unknown name raises, naming `where` and the known tasks."""
    try:
        return [Task.parse(t) for t in tasks]
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


class ValClips:
    """A data set's val split as (index in the split, clip) pairs, in file order, streamed."""

    def __init__(self, shard_dir: Path | str) -> None:
        stream = ShardStream(shard_dir, split=False)  # reads and checks manifest.json and meta.json
        self.stream = stream
        self.location, self.shards, self.meta = stream.location, stream.shards, stream.meta
        self.total = sum(s.samples for s in self.shards)

    def read(self, start: int = 0, end: int | None = None,
             keep: Callable[[int], bool] | None = None) -> Iterator[tuple[int, ClipSample]]:
        """Clips start..end-1 (those `keep` accepts); only the shards holding them are read, and
        the clips passed over are not decoded."""
        end = self.total if end is None else min(end, self.total)
        offset = 0
        for info in self.shards:
            if offset >= end:
                return
            if offset + info.samples > start:
                raw = self.stream.shard_samples(info)  # transient read errors retried, as in training
                for index, sample in ((offset + i, sample) for i, sample in raw):
                    if index >= end:
                        raw.close()
                        return
                    if index >= start and (keep is None or keep(index)):
                        yield index, decode_sample(sample)
            offset += info.samples


def validation_examples(shard_dir: Path | str, name: str, tasks: Sequence[str], batch: BatchConfig,
                        limit: int | None = None) -> tuple[Vocabulary, list[TrainExample]]:
    """The first `limit` (None: all) val clips of a data set as loss examples, with its own
    vocabulary: no augmentation (the first T frames, resized to the crop), prompts drawn from
    keys of (data set, index) alone, so every run of every seed sees the very same examples.
    The validation losses stream the same examples (`evaluate_run`)."""
    clips = ValClips(shard_dir)
    vocabulary = Vocabulary.from_categories(clips.meta.categories)
    maker = _loss_maker(batch, name, vocabulary, check_tasks(tasks, str(shard_dir)))
    return vocabulary, [_loss_example(maker, name, i, s) for i, s in clips.read(0, limit)]


def _loss_maker(batch: BatchConfig, name: str, vocabulary: Vocabulary, tasks: Sequence[Task]) -> ClipMaker:
    return ClipMaker(batch, {name: vocabulary.label_map()}, {name: set(tasks)}, augment=False)


def _loss_example(maker: ClipMaker, name: str, index: int, sample: ClipSample) -> TrainExample:
    return maker(name, sample, derive_seed("validation", name, index))


# ---------------------------------------------------------------------------------------------
# Validation losses


class LossSums:
    """Per query group: the sum of the clips' validation losses (exact, so merged workers give
    the single-process sum whatever the order) and how many clips it holds."""

    def __init__(self, groups: Sequence[QueryGroup]) -> None:
        self.sums = {g: Fraction(0) for g in groups}
        self.counts = dict.fromkeys(groups, 0)

    def add(self, group: QueryGroup, value: float) -> None:
        self.sums[group] += Fraction(value)
        self.counts[group] += 1

    def merge(self, other: LossSums) -> None:
        for group, value in other.sums.items():
            self.sums[group] += value
            self.counts[group] += other.counts[group]

    def means(self) -> dict[str, float]:
        """{group name: mean loss} of the groups some clip counted in."""
        return {g.value: float(self.sums[g] / self.counts[g]) for g in self.sums if self.counts[g]}


def _clip_outputs(outputs: ModelOutputs, i: int) -> ModelOutputs:
    """Clip i of a batch's outputs, its last prediction set only (what the validation loss takes)."""
    q = outputs.queries
    one = slice(i, i + 1)
    queries = QueryOutputs(mask_logits=q.mask_logits[one], class_logits=q.class_logits[one],
                      id_embeddings=q.id_embeddings[one], num_object_queries=q.num_object_queries,
                      prompt_valid=q.prompt_valid[one], prompt_counts=q.prompt_counts[one])
    return ModelOutputs(queries=queries, clip_features=outputs.clip_features[one],
                        text_embeddings=outputs.text_embeddings, image_size=outputs.image_size)


@torch.no_grad()
def add_losses(model: OMGSeg, vocabulary: Vocabulary, examples: Sequence[TrainExample], sums: LossSums,
               autocast: bool = False) -> None:
    """The validation loss of every example, each clip's own (one forward pass for all, the
    loss of each clip's outputs alone: the last prediction set's weighted terms of each group),
    added to `sums`. A clip without prompts does not count towards the prompt group, one that
    supervises no objects not towards the object group."""
    if not examples:
        return
    device = next(model.parameters()).device
    batch = collate(list(examples)).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        outputs = model(batch.images, vocabulary, batch.prompts)
        for i, example in enumerate(examples):
            losses = model.loss(_clip_outputs(outputs, i), [batch.targets[i]], across_workers=False, final_only=True)
            for group in sums.sums:
                if group is QueryGroup.PROMPT and example.targets.num_prompts == 0:
                    continue
                if group is QueryGroup.OBJECT and not example.targets.supervise_objects:
                    continue
                sums.add(group, float(sum(losses[t] for t in GROUP_LOSS_TERMS[group])))


# ---------------------------------------------------------------------------------------------
# One data set


@dataclass
class DatasetState:
    """One worker's evaluation of one data set so far: its task evaluators and loss sums."""

    evaluators: dict[Task, TaskEvaluator]
    losses: LossSums
    clips: int = 0  # clips this worker read

    def shareable(self) -> dict:
        """What another worker needs to merge this state: the metrics' states and the sums."""
        return {"metrics": {t: e.metric for t, e in self.evaluators.items()}, "losses": self.losses}

    def merge(self, shared: dict) -> None:
        for task, metric in shared["metrics"].items():
            self.evaluators[task].merge(metric)
        self.losses.merge(shared["losses"])

    def result(self) -> DatasetEvaluation:
        return DatasetEvaluation({t.value: e.compute() for t, e in self.evaluators.items()}, self.losses.means())


def _runs_of_equal_frames(items: list[tuple[int, ClipSample]]) -> Iterator[list[tuple[int, ClipSample]]]:
    """Consecutive clips with the same number of frames (one forward pass takes one T)."""
    for _, run in itertools.groupby(items, key=lambda item: item[1].num_frames):
        yield list(run)


@torch.no_grad()
def evaluate_dataset(model: OMGSeg, name: str, shard_dir: Path | str, tasks: Sequence[str], settings: EvalSettings,
                     share: Share = Share(), *, autocast: bool = False, progress: bool = False) -> DatasetState:
    """This worker's share of a data set's evaluation: its task metrics on the first
    `task_samples` val clips and its validation losses on the first `loss_samples`."""
    wanted = check_tasks(tasks, str(shard_dir))
    clips = ValClips(shard_dir)
    vocabulary = Vocabulary.from_categories(clips.meta.categories)
    context = Context(list(clips.meta.categories), vocabulary, open_vocabulary_split(model, vocabulary),
                      settings.video_windows)
    state = DatasetState({t: TASKS[t].evaluator(context) for t in wanted},
                         LossSums(loss_groups(wanted) if settings.loss_samples != 0 else []))
    scored = clips.total if settings.task_samples is None else min(settings.task_samples, clips.total)
    lossed = clips.total if settings.loss_samples is None else min(settings.loss_samples, clips.total)
    # The task metrics and the losses are shared out apart (their caps may differ), each in whole
    # batches; the clips of both are read once.
    to_score = range(*share.bounds(scored, settings.batch_size))
    to_lose = range(*share.bounds(lossed, settings.batch_size))
    ranges = [r for r in (to_score, to_lose) if r]
    start, end = (min(r.start for r in ranges), max(r.stop for r in ranges)) if ranges else (0, 0)
    maker = _loss_maker(settings.clips, name, vocabulary, wanted)
    was_training = model.training
    scoring: list[tuple[int, ClipSample]] = []
    losing: list[TrainExample] = []
    both = max(0, min(to_score.stop, to_lose.stop) - max(to_score.start, to_lose.start))
    bar = tqdm(total=len(to_score) + len(to_lose) - both, desc=f"eval {name}", unit="clip", disable=not progress)
    for index, sample in clips.read(start, end, keep=lambda i: i in to_score or i in to_lose):
        if index in to_score:
            scoring.append((index, sample))
            if len(scoring) == settings.batch_size or index == to_score.stop - 1:  # batches start at multiples of B
                model.eval()
                _score(model, vocabulary, scoring, state.evaluators, autocast)
                scoring = []
        if index in to_lose:
            losing.append(_loss_example(maker, name, index, sample))
            if len(losing) == settings.batch_size or index == to_lose.stop - 1:
                model.train()  # the loss as training computes it (the frozen CLIP stays in eval mode regardless)
                add_losses(model, vocabulary, losing, state.losses, autocast)
                losing = []
        state.clips += 1
        bar.update(1)
    bar.close()
    model.train(was_training)
    return state


def _score(model: OMGSeg, vocabulary: Vocabulary, clips: list[tuple[int, ClipSample]],
           evaluators: dict[Task, TaskEvaluator], autocast: bool) -> None:
    """Every task's result on a batch of (index, clip), handed to its evaluator."""
    for run in _runs_of_equal_frames(clips):
        batch = ClipBatch(model, [s for _, s in run], vocabulary, autocast)
        for task, evaluator in evaluators.items():
            for (index, sample), result in zip(run, TASKS[task].scored(batch)):
                evaluator.process(index, sample, result)


def open_vocabulary_split(model: OMGSeg, vocabulary: Vocabulary) -> dict[str, set[int]]:
    """{"seen": class indices, "unseen": class indices} of `vocabulary`: a class is seen when one
    of its synonyms was a class name of the model's training vocabulary (`model.seen_names`,
    stored in checkpoints). Empty when the model records no training names."""
    if not model.seen_names:
        return {}
    mask = vocabulary.seen_mask(model.seen_names).tolist()
    return {"seen": {i for i, m in enumerate(mask) if m}, "unseen": {i for i, m in enumerate(mask) if not m}}


# ---------------------------------------------------------------------------------------------
# A run, on one worker or all of them


def _merged_on_rank_0(states: dict[str, DatasetState]) -> dict[str, DatasetState] | None:
    """Every worker's states merged on rank 0 (one collective for all data sets); None on the
    other ranks. Without a process group, the states themselves."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return states
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if world == 1:
        return states
    mine = {name: state.shareable() for name, state in states.items()}
    gathered = [None] * world if rank == 0 else None
    torch.distributed.gather_object(mine, gathered, dst=0)
    if rank != 0:
        return None
    for other in gathered[1:]:  # rank order: per-clip records stay in val-split order
        for name, shared in other.items():
            states[name].merge(shared)
    return states


def evaluate_run(model: OMGSeg, config: TrainConfig, share: Share = Share(), *, autocast: bool = False,
                 progress: bool = False) -> Evaluation | None:
    """The evaluation of every data set of `config.evaluation` on its val split: this worker
    evaluates its share, and rank 0 returns the merged result of all (None elsewhere)."""
    settings = EvalSettings.of(config)
    states = {name: evaluate_dataset(model, name, config.data.shard_dir(name, "val"), tasks, settings, share,
                                     autocast=autocast, progress=progress)
              for name, tasks in config.evaluation.items()}
    merged = _merged_on_rank_0(states)
    if merged is None:
        return None
    return Evaluation({name: state.result() for name, state in merged.items()})


@torch.no_grad()
def evaluate_shards(model: OMGSeg, shard_dir: Path | str, tasks: Sequence[str], *, max_samples: int | None = None,
                    video_windows: Sequence[int] = (1, 2, 4), batch_size: int = 4,
                    progress: bool = False) -> dict[str, dict]:
    """{task: metrics} of `model` on the first `max_samples` (None: all) clips of `shard_dir`, in this process."""
    settings = EvalSettings(batch_size=batch_size, task_samples=max_samples, loss_samples=0, video_windows=video_windows)
    state = evaluate_dataset(model, Path(str(shard_dir)).name, shard_dir, tasks, settings, progress=progress)
    return state.result().tasks
