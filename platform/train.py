"""Co-training on Ray Train: the per-worker training loop and the driver that launches it.

The driver prepares the data (cached), opens ONE MLflow run, and starts a TorchTrainer; each
worker streams its share of every data set at the configured ratios, trains the shared model
under DDP, and reports a checkpoint every `checkpoint_every` steps. When a worker dies, Ray
restarts the group and every worker resumes from the latest checkpoint (model, optimizer,
schedule, step, mix counts, random state), logging into the same MLflow run.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from omgseg.datasets.mixer import Mixer
from omgseg.datasets.shards import read_meta
from omgseg.datasets.stream import ShardStream, stream_seed
from omgseg.model.config import model_config
from omgseg.model.omgseg import OMGSeg, load_checkpoint, save_checkpoint
from omgseg.model.vocabulary import Vocabulary, merge_vocabularies
from omgseg.platform.batches import ClipMaker, collate
from omgseg.platform.config import DataConfig, TrainConfig
from omgseg.platform.evaluate import check_tasks, evaluate_shards

CHECKPOINT_FILE = "state.pt"
MODEL_FILE = "model.pt"


# ---------------------------------------------------------------------------------------------
# Pieces shared by the driver and the workers


def dataset_vocabularies(data: DataConfig, names: list[str]) -> dict[str, Vocabulary]:
    """Each data set's vocabulary, from its train shards' meta.json."""
    return {name: Vocabulary.from_categories(read_meta(data.shard_dir(name, "train")).categories) for name in names}


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
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.optimizer.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.optimizer.lr,
    )


def vocabulary_record(config: TrainConfig) -> dict:
    """The merged training vocabulary, stored in checkpoints so `omgseg predict` needs no data."""
    names = [n for n, r in config.mix.items() if r > 0]
    merged, _ = merge_vocabularies(dataset_vocabularies(config.data, names))
    return {"names": list(merged.names), "is_thing": list(merged.is_thing), "category_ids": list(merged.category_ids)}


@dataclass
class WorkerState:
    """What a checkpoint holds besides the model weights."""

    step: int
    counts: dict[str, int]  # samples drawn per data set, all workers of this rank's history


# ---------------------------------------------------------------------------------------------
# The loop each Ray Train worker runs


def train_worker(loop_config: dict) -> None:
    """Ray Train's entry point on every worker: the loop with DDP, resume and checkpoints."""
    import ray.train
    import ray.train.torch

    config = TrainConfig.model_validate(loop_config["config"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    saved = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            saved = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
        if rank == 0:
            print(f"[omgseg] resuming at step {saved['step']} from {checkpoint.path}", file=sys.stderr, flush=True)
    logger = _MlflowStepLogger(loop_config.get("tracking_uri"), loop_config.get("run_id")) if rank == 0 else None
    train_loop(config, rank, context.get_world_size(), ray.train.torch.get_device(), saved=saved,
               wrap=ray.train.torch.prepare_model, checkpoint=True, logger=logger)


def train_loop(
    config: TrainConfig,
    rank: int,
    world: int,
    device: torch.device,
    *,
    saved: dict | None = None,
    wrap=lambda model: model,
    checkpoint: bool = False,
    logger: _MlflowStepLogger | None = None,
) -> dict[str, float]:
    """The training loop itself, with or without Ray: `wrap` makes the model distributed
    (ray.train.torch.prepare_model), `saved` is a checkpoint's state to resume from, and with
    `checkpoint` every worker reports to Ray Train. Returns the last logged metrics."""
    torch.manual_seed(config.seed * 1009 + rank)
    names = [n for n, r in config.mix.items() if r > 0]
    vocabularies = dataset_vocabularies(config.data, names)
    vocabulary, label_maps = merge_vocabularies(vocabularies)
    model = OMGSeg(model_config(config.model.preset, _str(config.model.clip_checkpoint)))
    model.seen_names = {s for i in range(len(vocabulary)) for s in vocabulary.synonyms(i)}
    optimizer = build_optimizer(model, config)

    state = WorkerState(step=0, counts={n: 0 for n in names})
    if saved is not None:
        model.load_state_dict(saved["model"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        state = WorkerState(step=saved["step"], counts=saved["counts"][rank] if rank < len(saved["counts"]) else state.counts)
        random.setstate(saved["python_random"])
        np.random.set_state(saved["numpy_random"])
        torch.set_rng_state(saved["torch_random"][rank % len(saved["torch_random"])])
    core = model
    model = wrap(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config), last_epoch=state.step - 1)
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr

    # Fresh, reproducible draws from the resume step on: the stream and mixer seeds depend on
    # (seed, resume step, rank), so a resumed run is as reproducible as an uninterrupted one.
    streams = {}
    for name in names:
        stream = ShardStream(config.data.shard_dir(name, "train"), shuffle_buffer=config.batch.shuffle_buffer,
                             seed=config.seed, resampled=True)
        stream.set_epoch(state.step)
        streams[name] = stream
    mixer = Mixer({n: config.mix[n] for n in names}, streams, seed=stream_seed(config.seed, state.step, rank, 0))
    samples = iter(mixer)
    maker = ClipMaker(config.batch, label_maps)
    generator = torch.Generator().manual_seed(stream_seed(config.seed, state.step, rank, 1))
    trainable = [p for p in model.parameters() if p.requires_grad]
    autocast = device.type == "cuda" and config.optimizer.amp

    index = {n: i for i, n in enumerate(names)}
    metrics: dict[str, float] = {}
    window = torch.zeros(2 * len(names) + 1, dtype=torch.float64)  # per data set: loss sum, count; + samples
    window_start, window_steps = time.perf_counter(), 0
    term_sums: dict[str, float] = {}
    core.train()
    for step in range(state.step, config.steps):
        examples = []
        for _ in range(config.batch.batch_size):
            name, sample = next(samples)
            state.counts[name] += 1
            examples.append(maker(name, sample, generator))
        batch = collate(examples).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            outputs = model(batch.images, vocabulary, batch.prompts)
            losses = core.loss(outputs, batch.targets)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.optimizer.grad_clip)
        optimizer.step()
        scheduler.step()

        for name in batch.datasets:
            window[2 * index[name]] += float(total.detach()) / len(batch.datasets)
            window[2 * index[name] + 1] += 1.0 / len(batch.datasets)
        window[-1] += len(batch.datasets)
        for key, value in losses.items():
            if "_aux" not in key and key != "loss_zero_anchor":
                term_sums[key] = term_sums.get(key, 0.0) + float(value.detach())
        done = step + 1
        window_steps += 1
        if done % config.log_every == 0 or done == config.steps:
            stats = _all_reduce(window)
            seconds = time.perf_counter() - window_start
            metrics = {f"loss/{n}": float(stats[2 * i] / stats[2 * i + 1]) for n, i in index.items() if stats[2 * i + 1] > 0}
            metrics.update({k: v / window_steps for k, v in term_sums.items()})  # rank 0's own steps
            metrics["lr"] = scheduler.get_last_lr()[0]
            metrics["samples_per_s"] = float(stats[-1]) / seconds
            if logger is not None:
                logger.log(metrics, done)
            if rank == 0:
                losses_text = " ".join(f"{k.split('/')[-1]}={v:.3f}" for k, v in metrics.items() if k.startswith("loss/"))
                print(f"[omgseg] step {done}/{config.steps} {losses_text} lr={metrics['lr']:.2e} "
                      f"{metrics['samples_per_s']:.1f} samples/s", file=sys.stderr, flush=True)
            window.zero_()
            term_sums = {}
            window_start, window_steps = time.perf_counter(), 0
        if checkpoint and (done % config.checkpoint_every == 0 or done == config.steps):
            _report_checkpoint(core, optimizer, done, state, rank, world, config)
        if config.eval_every and config.eval_datasets and done % config.eval_every == 0 and done < config.steps:
            _evaluate_during_training(core, config, done, rank, logger)
    return metrics


def _evaluate_during_training(model: OMGSeg, config: TrainConfig, step: int, rank: int, logger) -> None:
    """Rank 0 evaluates the current weights (the final evaluation runs in the driver); the
    others wait at a barrier so that no collective times out meanwhile."""
    if rank == 0:
        results = evaluate_model(model, config)
        model.train()
        if logger is not None:
            logger.log({mlflow_key(f"{name}/{task}/{key}"): float(value)
                        for name, tasks in results.items() for task, values in tasks.items()
                        for key, value in values.items() if isinstance(value, (int, float))}, step)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _all_reduce(values: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out = values.clone()
        torch.distributed.all_reduce(out)
        return out
    return values


def _report_checkpoint(model: OMGSeg, optimizer, step: int, state: WorkerState, rank: int, world: int,
                       config: TrainConfig) -> None:
    """Every worker reports (a barrier); rank 0 attaches the checkpoint with every rank's
    mix counts and random state."""
    import ray.train

    counts = [None] * world
    rng = [None] * world
    mine = (dict(state.counts), torch.get_rng_state())
    if world > 1 and torch.distributed.is_initialized():
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, mine)
        counts = [g[0] for g in gathered]
        rng = [g[1] for g in gathered]
    else:
        counts, rng = [mine[0]], [mine[1]]
    total = {n: sum(c[n] for c in counts) for n in counts[0]}
    metrics = {"step": step, **{f"samples/{n}": c for n, c in total.items()}}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save({
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "counts": counts,
            "python_random": random.getstate(),
            "numpy_random": np.random.get_state(),
            "torch_random": rng,
        }, Path(folder) / CHECKPOINT_FILE)
        save_checkpoint(model, Path(folder) / MODEL_FILE, extra={
            "step": step, "config": config.model_dump(mode="json"), "vocabulary": vocabulary_record(config),
        })
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


class _MlflowStepLogger:
    """Step metrics into an existing MLflow run (rank 0 only)."""

    def __init__(self, tracking_uri: str | None, run_id: str | None) -> None:
        self.client = None
        if tracking_uri and run_id:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri)
            self.run_id = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(key=k, value=float(v), timestamp=now, step=step) for k, v in metrics.items() if math.isfinite(v)
        ])


def _str(path: Path | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


# ---------------------------------------------------------------------------------------------
# The driver


@dataclass
class TrainResult:
    run_id: str
    checkpoint: Path  # the final model checkpoint (load with omgseg.model.omgseg.load_checkpoint)
    steps: int
    samples: dict[str, int]  # samples drawn per data set over all workers
    realised_mix: dict[str, float]
    metrics: dict[str, dict[str, dict]]  # {eval data set: {task: metrics}}


def tracking_uri(config: TrainConfig) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else a SQLite file in the output folder."""
    if config.tracking.tracking_uri:
        return config.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(config.output_dir / 'mlflow.db').resolve()}"


def check_inputs(config: TrainConfig) -> dict[str, Path]:
    """Every mixed data set has train shards (after preparation); raises naming what is missing."""
    dirs = {}
    for name, ratio in config.mix.items():
        if ratio <= 0:
            continue
        folder = config.data.shard_dir(name, "train")
        if not (folder / "manifest.json").is_file():
            raise FileNotFoundError(
                f"data set {name!r}: no train shards at {folder} (run `omgseg prepare` or give data.datasets.{name}.src)"
            )
        dirs[name] = folder
    return dirs


def run_training(config: TrainConfig, *, parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> TrainResult:
    """Prepare data, open the MLflow run, train on Ray, and record the result."""
    import mlflow
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from omgseg.platform.config import flatten
    from omgseg.platform.data import prepare_data

    for name, tasks in config.eval_datasets.items():
        check_tasks(tasks, f"eval_datasets.{name}")
    if config.eval_datasets and "val" not in config.data.splits:
        raise ValueError(f"eval_datasets needs the val split, but data.splits is {list(config.data.splits)}")
    prepare_data(config.data, progress=True)
    check_inputs(config)
    uri = tracking_uri(config)
    config.output_dir.mkdir(parents=True, exist_ok=True)
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(config.tracking.experiment)
    run_tags = {"omgseg.git_commit": _git_commit(), **(tags or {})}
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=config.name, tags=run_tags)
    run_id = run.info.run_id
    params = flatten(config)
    client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in sorted(params.items())])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.json"
        path.write_text(config.model_dump_json(indent=2))
        client.log_artifact(run_id, str(path))

    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS selects a cluster; otherwise a local instance
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "run_id": run_id, "tracking_uri": uri},
        scaling_config=ScalingConfig(
            num_workers=config.scaling.workers, use_gpu=config.scaling.use_gpu,
            resources_per_worker={"CPU": config.scaling.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=f"{config.name}-{run_id[:8]}",
            storage_path=str((config.output_dir / "ray").resolve()),
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
        ),
    )
    try:
        result = trainer.fit()
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    if result.error is not None or result.checkpoint is None:
        client.set_terminated(run_id, "FAILED")
        raise RuntimeError(f"training run {config.name!r} failed: {result.error}")

    out = (config.output_dir / config.name / run_id).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as folder:
        final = out / MODEL_FILE
        final.write_bytes((Path(folder) / MODEL_FILE).read_bytes())
    samples = {k.split("/", 1)[1]: int(v) for k, v in result.metrics.items() if k.startswith("samples/")}
    total = sum(samples.values())
    realised = {k: v / total for k, v in samples.items()} if total else {}
    now, step = int(time.time() * 1000), int(result.metrics["step"])
    client.log_batch(run_id, metrics=[
        *(mlflow.entities.Metric(f"mix_realised/{k}", v, now, step) for k, v in realised.items()),
        *(mlflow.entities.Metric(f"samples/{k}", v, now, step) for k, v in samples.items()),
    ])
    client.log_artifact(run_id, str(final))
    client.set_tag(run_id, "omgseg.checkpoint", str(final))

    try:
        evaluation = evaluate_checkpoint(config, final)
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[
            mlflow.entities.Metric(mlflow_key(f"{name}/{task}/{key}"), float(value), now, int(result.metrics["step"]))
            for name, tasks in evaluation.items() for task, values in tasks.items()
            for key, value in values.items() if isinstance(value, (int, float))
        ])
        eval_file = out / "eval.json"
        eval_file.write_text(json.dumps(evaluation, indent=2, sort_keys=True))
        client.log_artifact(run_id, str(eval_file))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return TrainResult(run_id=run_id, checkpoint=final, steps=int(result.metrics["step"]), samples=samples,
                       realised_mix=realised, metrics=evaluation)


def mlflow_key(name: str) -> str:
    """A metric name MLflow accepts: the reference names' '@' (VPQ@4) becomes '_' (VPQ_4)."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name)


def evaluate_checkpoint(config: TrainConfig, checkpoint: Path) -> dict[str, dict[str, dict]]:
    """The config's eval_datasets x tasks on their val shards, with the saved model."""
    if not config.eval_datasets:
        return {}
    model, _ = load_checkpoint(checkpoint, clip_checkpoint=_str(config.model.clip_checkpoint))
    return evaluate_model(model, config, progress=True)


def evaluate_model(model: OMGSeg, config: TrainConfig, progress: bool = False) -> dict[str, dict[str, dict]]:
    return {
        name: evaluate_shards(model, config.data.shard_dir(name, "val"), tasks, max_samples=config.eval_samples,
                              progress=progress)
        for name, tasks in config.eval_datasets.items()
    }


def _git_commit() -> str:
    import subprocess

    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent)
        return done.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
