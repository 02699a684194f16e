"""The training loop: built parts in, a short step, hooks for everything else.

    parts, state = build_parts(config, rank, world, device, saved)
    train_loop(parts, state, hooks)      # train_step on every batch, then each hook

Nothing here knows about Ray or MLflow: the Ray Train worker (omgseg.platform.training.train) and the
in-process trial runner hand in the distributed wrapper, a checkpoint hook and a logger.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch

from omgseg.core.seeds import derive_seed
from omgseg.core.structures import Task
from omgseg.datasets.manifest import read_meta
from omgseg.datasets.stream import ShardStream, StreamPosition
from omgseg.model.checkpoint import load_weights
from omgseg.model.config import model_config
from omgseg.model.criterion import loss_values
from omgseg.model.omgseg import OMGSeg
from omgseg.model.vocabulary import Vocabulary, merge_vocabularies
from omgseg.platform.config import DataConfig, TrainConfig
from omgseg.platform.training.batches import ClipMaker, TrainBatch, TrainBatches


@dataclass
class WorkerState:
    """What a checkpoint holds for one rank besides the weights."""

    step: int
    counts: dict[str, int]  # samples this rank drew from each data set
    # Time inside training steps ("train", which includes "data": waiting for the next batch),
    # affinity probes and evaluation.
    seconds: dict[str, float] = field(
        default_factory=lambda: {"train": 0.0, "data": 0.0, "affinity": 0.0, "eval": 0.0})
    affinity: dict | None = None  # AffinityAverage.state()
    # What this rank read, one entry per process life (a resume starts a new one):
    # {"node", "from_step", "code" (the omgseg file that ran), "shards": {data set: {stream epoch: [shard names]}}}
    reads: list[dict] = field(default_factory=list)
    # Where each data set's training stream, and its affinity probe stream, is: a resume continues there.
    streams: dict[str, StreamPosition] = field(default_factory=dict)
    probe_streams: dict[str, StreamPosition] = field(default_factory=dict)
    schedule: dict[str, int] = field(default_factory=dict)  # the mix schedule's Mixer.block_counts

    def to_json(self) -> dict:
        return {"step": self.step, "counts": dict(self.counts), "seconds": dict(self.seconds), "affinity": self.affinity,
                "reads": self.reads, "streams": {n: p.to_json() for n, p in self.streams.items()},
                "probe_streams": {n: p.to_json() for n, p in self.probe_streams.items()},
                "schedule": dict(self.schedule)}

    @classmethod
    def from_json(cls, data: dict) -> WorkerState:
        return cls(step=int(data["step"]), counts=dict(data["counts"]), seconds=dict(data["seconds"]),
                   affinity=data.get("affinity"), reads=list(data.get("reads", [])),
                   streams={n: StreamPosition.from_json(p) for n, p in data.get("streams", {}).items()},
                   probe_streams={n: StreamPosition.from_json(p) for n, p in data.get("probe_streams", {}).items()},
                   schedule=dict(data.get("schedule", {})))


@dataclass
class TrainParts:
    """Everything a training step needs, built once per process."""

    config: TrainConfig
    model: OMGSeg  # the model itself (checkpoints, evaluation, probes)
    forward: torch.nn.Module  # what the step calls: the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    vocabulary: Vocabulary  # the merged training vocabulary
    batches: TrainBatches
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def autocast(self) -> bool:
        return self.device.type == "cuda" and self.config.optimizer.amp


class Hook(Protocol):
    """Called after every training step with the batch it trained on and its loss terms."""

    def __call__(self, parts: TrainParts, state: WorkerState, batch: TrainBatch, losses: dict[str, float]) -> None: ...


def mixed_datasets(config: TrainConfig) -> list[str]:
    """The data sets the run trains on (ratio > 0), in the order of `mix`."""
    return [n for n, r in config.mix.items() if r > 0]


def dataset_vocabularies(data: DataConfig, names: Sequence[str], split: str = "train") -> dict[str, Vocabulary]:
    """Each data set's own vocabulary, from its shards' meta.json."""
    return {name: Vocabulary.from_categories(read_meta(data.shard_dir(name, split)).categories) for name in names}


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up to 1, then x gamma at every milestone passed (fractions of the run)."""
    opt = config.optimizer
    warm = min(1.0, (step + 1) / opt.warmup_steps) if opt.warmup_steps else 1.0
    passed = sum(step >= m * config.steps for m in opt.milestones)
    return warm * opt.gamma**passed


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on embeddings, norms and biases (the reference's choice for
    embeddings; norms and biases as is common practice)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        embedding = any(key in name for key in ("query_feat", "query_pos", "level_embed", "kind_tokens", "click_tokens"))
        (no_decay if embedding or param.ndim <= 1 else decay).append(param)
    # fused: one kernel for every parameter (CPU and CUDA) instead of a dozen small ones per
    # parameter tensor; the same update up to rounding.
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.optimizer.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.optimizer.lr, fused=True,
    )


def build_model(config: TrainConfig) -> OMGSeg:
    """The model of the run, its initial weights a function of the run's seed only (not of the
    mix or the rank), so every trial of one seed starts from the same weights; or, with
    `model.init_checkpoint`, that checkpoint's weights (a warm start, the same for every seed)."""
    torch.manual_seed(derive_seed(config.seed, "init"))
    clip = None if config.model.clip_checkpoint is None else str(config.model.clip_checkpoint)
    model = OMGSeg(model_config(config.model.preset, clip, config.model.clip_pretrained))
    if config.model.init_checkpoint is not None:
        load_weights(model, config.model.init_checkpoint)
    return model


def train_stream(config: TrainConfig, name: str, seed: int) -> ShardStream:
    """A data set's repeating train stream, its order fixed by `seed`."""
    return ShardStream(config.data.shard_dir(name, "train"), shuffle_buffer=config.batch.shuffle_buffer, seed=seed,
                       repeat=True, retries=config.data.read_retries, retry_backoff=config.data.read_retry_backoff)


def loader_workers(config: TrainConfig) -> int:
    """The processes making one training worker's clips: `batch.loader_workers`, else one fewer
    than the CPUs the worker holds (its own process trains)."""
    if config.batch.loader_workers is not None:
        return config.batch.loader_workers
    return max(0, int(config.resources.cpus_per_worker) - 1)


def build_batches(config: TrainConfig, label_maps: dict[str, dict[int, int]], state: WorkerState, rank: int,
                  world: int, device: torch.device, *, node: str | None = None) -> TrainBatches:
    """The batches of one rank, from where `state` says its streams were (a resumed run), which
    then records their counts and positions as batches are drawn, and what they read."""
    names = mixed_datasets(config)
    # The stream of a data set depends on the run's seed and the data set only: the k-th COCO
    # sample is the same in every mix (a resumed run continues at the saved positions).
    streams = {name: train_stream(config, name, derive_seed(config.seed, "stream", name)) for name in names}
    state.reads.append({"node": node or socket.gethostname(), "from_step": state.step, "code": __file__,
                        "shards": {name: stream.reads for name, stream in streams.items()}})  # filled as they read
    supervised = {n: {Task.parse(t) for t in config.data.datasets[n].supervised_tasks()} for n in names}
    batches = TrainBatches(streams, {n: config.mix[n] for n in names}, ClipMaker(config.batch, label_maps, supervised),
                           config.batch.batch_size, config.seed, rank, world, counts=state.counts,
                           positions=state.streams, schedule=state.schedule, workers=loader_workers(config),
                           prefetch=config.batch.loader_prefetch, pin_memory=device.type == "cuda")
    state.counts = batches.counts  # one dict each: the batches count and place, the state records
    state.streams = batches.positions
    state.schedule = batches.schedule
    return batches


def build_parts(config: TrainConfig, rank: int, world: int, device: torch.device, *, saved: dict | None = None,
                wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
                node: str | None = None) -> tuple[TrainParts, WorkerState]:
    """The model, optimizer, schedule and batches of one rank, resumed from `saved` (a
    checkpoint's payload) when given. `node` names the machine in the read log."""
    names = mixed_datasets(config)
    vocabulary, label_maps = merge_vocabularies(dataset_vocabularies(config.data, names))
    model = build_model(config).to(device)  # before the optimizer: its state follows the parameters' device
    if config.optimizer.compile:
        model.compile_parts()
    model.seen_names = {s for i in range(len(vocabulary)) for s in vocabulary.synonyms(i)}
    optimizer = build_optimizer(model, config)
    state = WorkerState(step=0, counts=dict.fromkeys(names, 0))
    if saved is not None:
        model.load_state_dict(saved["model"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        if rank < len(saved["ranks"]):
            state = WorkerState.from_json(saved["ranks"][rank])
    forward = wrap(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config), last_epoch=state.step - 1)
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr

    batches = build_batches(config, label_maps, state, rank, world, device, node=node)
    parts = TrainParts(config=config, model=model, forward=forward, optimizer=optimizer, scheduler=scheduler,
                       vocabulary=vocabulary, batches=batches, device=device, rank=rank, world=world)
    return parts, state


def train_step(parts: TrainParts, batch: TrainBatch) -> dict[str, float]:
    """One optimizer step on `batch`; returns the loss terms. Forward, backward and the update
    are queued without the host waiting for the device (bfloat16 autocast on CUDA, the losses
    in float32); the terms are read back once, after the update, and a non-finite one raises
    naming every term (the update it made is never saved: the run stops there)."""
    batch = batch.to(parts.device)
    with torch.autocast(parts.device.type, dtype=torch.bfloat16) if parts.autocast else nullcontext():
        outputs = parts.forward(batch.images, parts.vocabulary, batch.prompts)
        losses = parts.model.loss(outputs, batch.targets, check_finite=False)
    parts.optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    torch.nn.utils.clip_grad_norm_([p for p in parts.model.parameters() if p.requires_grad], parts.config.optimizer.grad_clip)
    parts.optimizer.step()
    parts.scheduler.step()
    return loss_values(losses)


def train_loop(parts: TrainParts, state: WorkerState, hooks: Sequence[Hook] = ()) -> None:
    """From `state.step` to the configured number of steps, calling every hook after each step."""
    parts.model.train()
    try:
        for step in range(state.step, parts.config.steps):
            started = time.perf_counter()
            batch = next(parts.batches)
            state.seconds["data"] = state.seconds.get("data", 0.0) + time.perf_counter() - started
            try:
                losses = train_step(parts, batch)
            except FloatingPointError as err:
                raise FloatingPointError(f"step {step}: {err}") from None
            state.seconds["train"] += time.perf_counter() - started
            state.step = step + 1
            for hook in hooks:
                hook(parts, state, batch, losses)
    finally:
        parts.batches.close()


def all_reduce(values: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (the tensor itself without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out = values.clone()
        torch.distributed.all_reduce(out)
        return out
    return values


class StepLog:
    """Every `log_every` steps (and at the last): each data set's mean loss over all ranks, the
    loss terms and learning rate, samples per second; handed to every sink as
    (metrics, step, steps). Ranks take part alike (the reduction is a collective)."""

    def __init__(self, parts: TrainParts, sinks: Sequence[Callable[[dict[str, float], int, int], None]]) -> None:
        self.names = list(parts.batches.counts)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.sinks = sinks
        self._reset()

    def _reset(self) -> None:
        self.window = torch.zeros(2 * len(self.names) + 1, dtype=torch.float64)  # per data set: loss sum, count; samples
        self.terms: dict[str, float] = {}
        self.steps = 0
        self.started = time.perf_counter()

    def __call__(self, parts: TrainParts, state: WorkerState, batch: TrainBatch, losses: dict[str, float]) -> None:
        total = sum(losses.values())
        for name in batch.datasets:
            self.window[2 * self.index[name]] += total / len(batch.datasets)
            self.window[2 * self.index[name] + 1] += 1.0 / len(batch.datasets)
        self.window[-1] += len(batch.datasets)
        for key, value in losses.items():
            if "_aux" not in key and key != "loss_zero_anchor":
                self.terms[key] = self.terms.get(key, 0.0) + value
        self.steps += 1
        steps = parts.config.steps
        if state.step % parts.config.log_every and state.step != steps:
            return
        stats = all_reduce(self.window)
        metrics = {f"loss/{n}": float(stats[2 * i] / stats[2 * i + 1]) for n, i in self.index.items() if stats[2 * i + 1] > 0}
        metrics.update({k: v / self.steps for k, v in self.terms.items()})  # this rank's own steps
        metrics["lr"] = parts.scheduler.get_last_lr()[0]
        metrics["samples_per_s"] = float(stats[-1]) / (time.perf_counter() - self.started)
        for sink in self.sinks:
            sink(metrics, state.step, steps)
        self._reset()
