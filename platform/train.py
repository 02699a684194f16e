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
import random
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from omgseg.datasets.clip import Task
from omgseg.datasets.mixer import Mixer
from omgseg.datasets.shards import read_manifest, read_meta
from omgseg.datasets.stream import ShardStream, stream_seed
from omgseg.model.config import model_config
from omgseg.model.omgseg import OMGSeg, save_checkpoint
from omgseg.model.vocabulary import Vocabulary, merge_vocabularies
from omgseg.platform.affinity import AffinityAverage, lookahead_affinity
from omgseg.platform.batches import ClipMaker, collate
from omgseg.platform.cluster import connect
from omgseg.platform.config import DataConfig, TrainConfig
from omgseg.platform.evaluate import check_tasks, evaluate_shards
from omgseg.platform.tracking import experiment_id, metric_values, mlflow_key, resolve_tracking_uri

CHECKPOINT_FILE = "state.pt"
MODEL_FILE = "model.pt"
EVAL_FILE = "eval.json"
READS_FILE = "reads.json"  # per rank: its node, sample counts, and the shards each stream epoch read


# ---------------------------------------------------------------------------------------------
# Pieces shared by the driver and the workers


def dataset_vocabularies(data: DataConfig, names: list[str]) -> dict[str, Vocabulary]:
    """Each data set's vocabulary, from its train shards' meta.json."""
    return {name: Vocabulary.from_categories(read_meta(data.shard_dir(name, "train")).categories) for name in names}


def train_stream(config: TrainConfig, name: str, seed: int, step: int) -> ShardStream:
    """A data set's repeating train stream, its draws fixed by `seed` and the (resume) step."""
    stream = ShardStream(config.data.shard_dir(name, "train"), shuffle_buffer=config.batch.shuffle_buffer, seed=seed,
                         repeat=True)
    stream.set_epoch(step)
    return stream


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
    """What a checkpoint holds besides the model weights (per rank)."""

    step: int
    counts: dict[str, int]  # samples drawn per data set, all workers of this rank's history
    seconds: dict[str, float] = field(default_factory=lambda: {"train": 0.0, "affinity": 0.0, "eval": 0.0})
    affinity: dict | None = None  # AffinityAverage.state()
    # What this rank read, one entry per process life (a resume starts a new one):
    # {"node", "from_step", "shards": {data set: {stream epoch: [shard names]}}}
    reads: list[dict] = field(default_factory=list)


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
    node = ray.get_runtime_context().get_node_id()
    train_loop(config, rank, context.get_world_size(), ray.train.torch.get_device(), saved=saved,
               wrap=ray.train.torch.prepare_model, checkpoint=True, logger=logger, node=node)


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
    node: str | None = None,
) -> dict[str, float]:
    """The training loop itself, with or without Ray: `wrap` makes the model distributed
    (ray.train.torch.prepare_model), `saved` is a checkpoint's state to resume from, and with
    `checkpoint` every worker reports to Ray Train (the last report carries the evaluation
    of `eval_datasets`, done by rank 0). `node` names the machine in the read log (default:
    the host name). Returns the last logged metrics."""
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
        mine = saved["ranks"][rank] if rank < len(saved["ranks"]) else {}
        state = WorkerState(step=saved["step"], counts=mine.get("counts", state.counts),
                            seconds=mine.get("seconds", state.seconds), affinity=mine.get("affinity"),
                            reads=mine.get("reads", []))
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
    streams = {name: train_stream(config, name, config.seed, state.step) for name in names}
    state.reads.append({"node": node or socket.gethostname(), "from_step": state.step, "code": __file__,
                        "shards": {name: stream.reads for name, stream in streams.items()}})  # filled as they read
    mixer = Mixer({n: config.mix[n] for n in names}, streams, seed=stream_seed(config.seed, state.step, rank, 0))
    samples = iter(mixer)
    supervised = {n: {Task.parse(t) for t in config.data.datasets[n].supervised_tasks()} for n in names}
    maker = ClipMaker(config.batch, label_maps, supervised)
    generator = torch.Generator().manual_seed(stream_seed(config.seed, state.step, rank, 1))
    trainable = [p for p in model.parameters() if p.requires_grad]
    autocast = device.type == "cuda" and config.optimizer.amp
    probe = _AffinityProbe(config, names, maker, state, rank) if config.affinity.every and len(names) > 1 else None

    index = {n: i for i, n in enumerate(names)}
    metrics: dict[str, float] = {}
    window = torch.zeros(2 * len(names) + 1, dtype=torch.float64)  # per data set: loss sum, count; + samples
    window_start, window_steps = time.perf_counter(), 0
    term_sums: dict[str, float] = {}
    core.train()
    for step in range(state.step, config.steps):
        started = time.perf_counter()
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
        if not torch.isfinite(total):
            raise FloatingPointError(f"non-finite loss at step {step}: " + ", ".join(
                f"{k}={float(v.detach()):.4g}" for k, v in losses.items()))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.optimizer.grad_clip)
        optimizer.step()
        scheduler.step()
        state.seconds["train"] += time.perf_counter() - started

        for name in batch.datasets:
            window[2 * index[name]] += float(total.detach()) / len(batch.datasets)
            window[2 * index[name] + 1] += 1.0 / len(batch.datasets)
        window[-1] += len(batch.datasets)
        for key, value in losses.items():
            if "_aux" not in key and key != "loss_zero_anchor":
                term_sums[key] = term_sums.get(key, 0.0) + float(value.detach())
        done = step + 1
        window_steps += 1
        if probe is not None and done % config.affinity.every == 0:
            probe(core, vocabulary, device, done, scheduler.get_last_lr()[0], autocast)
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
        state.step = done
        if checkpoint and done % config.checkpoint_every == 0 and done < config.steps:
            _report_checkpoint(core, optimizer, state, rank, world, config, logger)
        if config.eval_every and config.eval_datasets and done % config.eval_every == 0 and done < config.steps:
            _evaluate_during_training(core, config, done, rank, logger)
    if checkpoint:
        # The last report: after the final evaluation (rank 0; the others wait), so its
        # checkpoint holds the weights and their metrics. A run resumed at its last step
        # only evaluates and reports again.
        evaluation = None
        if config.eval_datasets:
            started = time.perf_counter()
            evaluation = _evaluate_on_rank_0(core, config, rank)
            state.seconds["eval"] += time.perf_counter() - started
        _report_checkpoint(core, optimizer, state, rank, world, config, logger, evaluation=evaluation)
    return metrics


class _AffinityProbe:
    """Every `affinity.every` steps: one batch per data set from streams of its own (the mix is
    not drawn from), then TAG's look-ahead affinity (omgseg.platform.affinity) on the shared
    weights. Sums live in the worker state, so they survive a resume."""

    def __init__(self, config: TrainConfig, names: list[str], maker: ClipMaker, state: WorkerState, rank: int) -> None:
        self.config = config
        self.names = names
        self.maker = maker
        self.state = state
        self.average = AffinityAverage.from_state(state.affinity) if state.affinity else AffinityAverage(names)
        self.streams = {name: iter(train_stream(config, name, stream_seed(config.seed, state.step, rank, 100 + k), state.step))
                        for k, name in enumerate(names)}
        self.generator = torch.Generator().manual_seed(stream_seed(config.seed, state.step, rank, 2))

    def __call__(self, model: OMGSeg, vocabulary: Vocabulary, device: torch.device, step: int, lr: float,
                 autocast: bool) -> None:
        started = time.perf_counter()
        batches = {
            name: collate([self.maker(name, next(self.streams[name]), self.generator)
                           for _ in range(self.config.batch.batch_size)]).to(device)
            for name in self.names
        }
        size = self.config.affinity.lookahead_lr or lr
        self.average.add(lookahead_affinity(model, vocabulary, batches, size, seed=step, autocast=autocast))
        self.state.affinity = self.average.state()
        self.state.seconds["affinity"] += time.perf_counter() - started


def _evaluate_on_rank_0(model: OMGSeg, config: TrainConfig, rank: int) -> dict | None:
    """Rank 0 evaluates `eval_datasets`; the other ranks wait at a barrier."""
    results = None
    if rank == 0:
        results = evaluate_model(model, config, progress=True)
        model.train()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return results


def _evaluate_during_training(model: OMGSeg, config: TrainConfig, step: int, rank: int, logger) -> None:
    """Rank 0 evaluates the current weights and logs them at `step`; the others wait at a
    barrier so that no collective times out meanwhile."""
    results = _evaluate_on_rank_0(model, config, rank)
    if results is not None and logger is not None:
        logger.log(metric_values(results), step)


def _all_reduce(values: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out = values.clone()
        torch.distributed.all_reduce(out)
        return out
    return values


def _report_checkpoint(model: OMGSeg, optimizer, state: WorkerState, rank: int, world: int, config: TrainConfig,
                       logger: _MlflowStepLogger | None, evaluation: dict | None = None) -> None:
    """Every worker reports (a barrier); rank 0 attaches the checkpoint with every rank's
    state (mix counts, seconds, affinity sums) and random state, and `evaluation` as eval.json."""
    import ray.train

    mine = ({"counts": dict(state.counts), "seconds": dict(state.seconds), "affinity": state.affinity,
             "reads": json.loads(json.dumps(state.reads))}, torch.get_rng_state())
    if world > 1 and torch.distributed.is_initialized():
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    ranks = [g[0] for g in gathered]
    rng = [g[1] for g in gathered]
    metrics = {"step": state.step, **{f"samples/{n}": sum(r["counts"][n] for r in ranks) for n in ranks[0]["counts"]},
               **{f"seconds/{k}": v for k, v in ranks[0]["seconds"].items()}}  # rank 0's time
    affinity = _merged_affinity(ranks)
    if affinity is not None:
        for source, row in affinity.means().items():
            metrics.update({f"affinity/{source}/{target}": value for target, value in row.items()})
        metrics["affinity_probes"] = affinity.probes
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    if logger is not None and affinity is not None:
        logger.log({mlflow_key(k): v for k, v in metrics.items() if k.startswith("affinity")}, state.step)
    with tempfile.TemporaryDirectory() as folder:
        torch.save({
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": state.step,
            "ranks": ranks,
            "python_random": random.getstate(),
            "numpy_random": np.random.get_state(),
            "torch_random": rng,
        }, Path(folder) / CHECKPOINT_FILE)
        save_checkpoint(model, Path(folder) / MODEL_FILE, extra={
            "step": state.step, "config": config.model_dump(mode="json"), "vocabulary": vocabulary_record(config),
        })
        if evaluation is not None:
            (Path(folder) / EVAL_FILE).write_text(json.dumps(evaluation, indent=2, sort_keys=True))
        reads = [{"rank": r, "counts": ranks[r]["counts"], "reads": ranks[r]["reads"]} for r in range(len(ranks))]
        (Path(folder) / READS_FILE).write_text(json.dumps(reads, indent=1))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _merged_affinity(ranks: list[dict]) -> AffinityAverage | None:
    """Every rank's affinity sums together; None when no rank probed."""
    states = [AffinityAverage.from_state(r["affinity"]) for r in ranks if r["affinity"]]
    if not states:
        return None
    for other in states[1:]:
        states[0].merge(other)
    return states[0]


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
    seconds: dict[str, float]  # rank 0's time in training steps, affinity probes, evaluation; "fit": Ray's whole run
    affinity: dict[str, dict[str, float]]  # {source: {target: mean look-ahead affinity}}, if measured
    reads: list[dict]  # per rank: {"rank", "counts", "reads"} (WorkerState.reads): which node read which shards


def tracking_uri(config: TrainConfig) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else a SQLite file in the output folder."""
    return resolve_tracking_uri(config.tracking, config.output_dir)


def check_inputs(config: TrainConfig) -> dict[str, Path | str]:
    """Every mixed data set has train shards (after preparation); raises naming what is missing."""
    dirs = {}
    for name, ratio in config.mix.items():
        if ratio <= 0:
            continue
        folder = config.data.shard_dir(name, "train")
        try:
            read_manifest(folder)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"data set {name!r}: no train shards at {folder} (run `omgseg prepare` or give data.datasets.{name}.src)"
            ) from None
        dirs[name] = folder
    return dirs


def run_training(config: TrainConfig, *, parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 run_id: str | None = None, prepare: bool = True) -> TrainResult:
    """Prepare data (unless `prepare` is False: the caller did), open the MLflow run, train on
    Ray, and record the result. `run_id` continues an existing MLflow run (a study resuming a
    trial): its Ray Train run has the same name, so Ray resumes it from its last checkpoint."""
    import mlflow
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from omgseg.platform.config import flatten
    from omgseg.platform.data import prepare_data

    for name, tasks in config.eval_datasets.items():
        check_tasks(tasks, f"eval_datasets.{name}")
    if config.eval_datasets and "val" not in config.data.splits:
        raise ValueError(f"eval_datasets needs the val split, but data.splits is {list(config.data.splits)}")
    if prepare:
        prepare_data(config.data, progress=True)
    check_inputs(config)
    uri = tracking_uri(config)
    config.output_dir.mkdir(parents=True, exist_ok=True)
    client = mlflow.MlflowClient(uri)
    if run_id is None:
        run_tags = {"omgseg.git_commit": _git_commit(), **(tags or {})}
        if parent_run_id:
            run_tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(experiment_id(client, config.tracking.experiment, uri), run_name=config.name, tags=run_tags)
        run_id = run.info.run_id
        params = flatten(config)
        client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in sorted(params.items())])
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "config.json"
            path.write_text(config.model_dump_json(indent=2))
            client.log_artifact(run_id, str(path))
    else:
        client.update_run(run_id, status="RUNNING")

    connect()  # RAY_ADDRESS selects a cluster (the project shipped as a wheel); otherwise a local instance
    resources = {"CPU": config.scaling.cpus_per_worker}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "run_id": run_id, "tracking_uri": uri},
        scaling_config=ScalingConfig(num_workers=config.scaling.workers, use_gpu=config.scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=f"{config.name}-{run_id[:8]}",
            storage_path=str((config.output_dir / "ray").resolve()),
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
        ),
    )
    started = time.perf_counter()
    try:
        result = trainer.fit()
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    fit_seconds = time.perf_counter() - started
    if result.error is not None or result.checkpoint is None:
        client.set_terminated(run_id, "FAILED")
        raise RuntimeError(f"training run {config.name!r} failed: {result.error}")

    try:
        out = (config.output_dir / config.name / run_id).resolve()
        out.mkdir(parents=True, exist_ok=True)
        final = out / MODEL_FILE
        evaluation, reads = {}, []
        with result.checkpoint.as_directory() as folder:
            final.write_bytes((Path(folder) / MODEL_FILE).read_bytes())
            if (Path(folder) / EVAL_FILE).is_file():
                evaluation = json.loads((Path(folder) / EVAL_FILE).read_text())
            if (Path(folder) / READS_FILE).is_file():
                reads = json.loads((Path(folder) / READS_FILE).read_text())
        metrics = result.metrics
        samples = {k.split("/", 1)[1]: int(v) for k, v in metrics.items() if k.startswith("samples/")}
        total = sum(samples.values())
        realised = {k: v / total for k, v in samples.items()} if total else {}
        seconds = {k.split("/", 1)[1]: float(v) for k, v in metrics.items() if k.startswith("seconds/")}
        seconds["fit"] = fit_seconds
        affinity: dict[str, dict[str, float]] = {}
        for key, value in metrics.items():
            if key.startswith("affinity/"):
                _, source, target = key.split("/")
                affinity.setdefault(source, {})[target] = float(value)
        now, step = int(time.time() * 1000), int(metrics["step"])
        values = {**{f"mix_realised/{k}": v for k, v in realised.items()}, **{f"samples/{k}": v for k, v in samples.items()},
                  **{f"seconds/{k}": v for k, v in seconds.items()}, **metric_values(evaluation),
                  **{f"samples_by_node/{node[:12]}/{k}": v for node, counts in samples_by_node(reads).items()
                     for k, v in counts.items()}}
        client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), now, step) for k, v in values.items()])
        client.log_artifact(run_id, str(final))
        client.set_tag(run_id, "omgseg.checkpoint", str(final))
        if evaluation:
            eval_file = out / EVAL_FILE
            eval_file.write_text(json.dumps(evaluation, indent=2, sort_keys=True))
            client.log_artifact(run_id, str(eval_file))
        if reads:
            reads_file = out / READS_FILE
            reads_file.write_text(json.dumps(reads, indent=1))
            client.log_artifact(run_id, str(reads_file))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return TrainResult(run_id=run_id, checkpoint=final, steps=step, samples=samples, realised_mix=realised,
                       metrics=evaluation, seconds=seconds, affinity=affinity, reads=reads)


def samples_by_node(reads: list[dict]) -> dict[str, dict[str, int]]:
    """{node: {data set: samples}} summed over the ranks that ran there (their last node)."""
    out: dict[str, dict[str, int]] = {}
    for rank in reads:
        node = rank["reads"][-1]["node"] if rank["reads"] else "unknown"
        for name, count in rank["counts"].items():
            out.setdefault(node, {})[name] = out.get(node, {}).get(name, 0) + count
    return out


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
