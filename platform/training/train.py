"""Training runs: one MLflow run each, the loop (omgseg.platform.training.loop) on Ray Train workers or
in the calling process.

    run_training(config)                  # omgseg train: a Ray Train TorchTrainer (local or $RAY_ADDRESS)
    run_training(config, in_process=True) # a 1-worker study trial, in the trial's own process

On Ray Train every worker streams its share of every data set, trains under DDP and reports
a checkpoint every `checkpoint_every` steps; a dead worker makes Ray restart the group, which
resumes from the latest checkpoint into the same MLflow run. In process, the same checkpoints
are files in the run folder, and a retried trial resumes from them. Either way the run
folder ends with model.pt, eval.json, reads.json and report.json.

Console: workers write to `<run folder>/logs/`, rank 0's progress to progress.jsonl, which
the driver shows as one bar; a failure is one line with the path of its log.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from omgseg.datasets.manifest import read_manifest
from omgseg.model.checkpoint import save_checkpoint
from omgseg.model.vocabulary import merge_vocabularies
from omgseg.platform.config import TrainConfig
from omgseg.platform.console import ProgressFile, TrainingFailed, error_line, follow_progress, redirect_output, say
from omgseg.platform.evaluation.evaluate import Share, evaluate_run
from omgseg.platform.records import REPORT_FILE, Evaluation, RunReport, TrainResult
from omgseg.platform.tracking import (
    StepLogger,
    check_cluster_store,
    fail_run,
    finish_run,
    metric_values,
    open_run,
    resolve_tracking_uri,
)
from omgseg.platform.training.affinity import AffinityAverage, AffinityProbe
from omgseg.platform.training.loop import (
    StepLog,
    TrainParts,
    WorkerState,
    build_parts,
    dataset_vocabularies,
    mixed_datasets,
    train_loop,
)

CHECKPOINT_FILE = "state.pt"
RESUME_DIR = "checkpoint"  # an in-process run's resume point, removed when the run finishes
MODEL_FILE = "model.pt"
EVAL_FILE = "eval.json"
READS_FILE = "reads.json"  # per rank: its node, sample counts, and the shards each stream epoch read
PROGRESS_FILE = "progress.jsonl"


def run_dir(config: TrainConfig, run_id: str) -> Path:
    """Where a run's files go: <output_dir>/<name>/<MLflow run id>."""
    return config.output_dir / config.name / run_id


def vocabulary_record(config: TrainConfig) -> dict:
    """The merged training vocabulary, stored in checkpoints so `omgseg predict` needs no data."""
    merged, _ = merge_vocabularies(dataset_vocabularies(config.data, mixed_datasets(config)))
    return {"names": list(merged.names), "is_thing": list(merged.is_thing), "category_ids": list(merged.category_ids)}


def check_inputs(config: TrainConfig) -> None:
    """Every mixed data set has train shards (after preparation); raises naming what is missing."""
    for name in mixed_datasets(config):
        folder = config.data.shard_dir(name, "train")
        try:
            read_manifest(folder)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"data set {name!r}: no train shards at {folder} (run `omgseg prepare` or give data.datasets.{name}.src)"
            ) from None


# ---------------------------------------------------------------------------------------------
# Pieces both ways of running share


def _hooks(parts: TrainParts, state: WorkerState, logger, progress: ProgressFile | None, checkpoint) -> list:
    """The loop's hooks: step log (MLflow and progress on rank 0), TAG probe, checkpoints, and
    evaluation every `eval_every` steps."""
    config = parts.config
    sinks = [s for s in (logger, progress.step if progress else None) if s is not None]
    hooks = [StepLog(parts, sinks)]
    if config.affinity.enabled and len(parts.batches.counts) > 1:
        hooks.append(AffinityProbe(parts, state))

    def periodic(parts: TrainParts, state: WorkerState, batch, losses) -> None:
        last = state.step == config.steps
        if not last and state.step % config.checkpoint_every == 0:
            checkpoint(parts, state)
        if config.eval_every and config.evaluation and not last and state.step % config.eval_every == 0:
            evaluation = _evaluate(parts, progress)
            if evaluation is not None and logger is not None:
                logger(metric_values(evaluation), state.step)

    hooks.append(periodic)
    return hooks


def _evaluate(parts: TrainParts, progress: ProgressFile | None) -> Evaluation | None:
    """Every rank evaluates its share of `config.evaluation`'s val clips (the same path for the
    periodic and the final evaluation); the shares merge on rank 0, which gets the result (the
    others None)."""
    if progress is not None:
        progress.write(event="note", message=f"evaluating {', '.join(parts.config.evaluation)} on their val splits")
    evaluation = evaluate_run(parts.model, parts.config, Share(parts.rank, parts.world), autocast=parts.autocast)
    parts.model.train()
    return evaluation


def _final_evaluation(parts: TrainParts, state: WorkerState, progress: ProgressFile | None) -> Evaluation:
    started = time.perf_counter()
    evaluation = _evaluate(parts, progress) if parts.config.evaluation else None
    state.seconds["eval"] += time.perf_counter() - started
    return evaluation or Evaluation()


def _payload(parts: TrainParts, states: list[WorkerState]) -> dict:
    """A resumable checkpoint: weights, optimizer, and every rank's state. No random state:
    every draw of a run is a function of its seed and the sample counts."""
    # A warm start's frozen CLIP is rebuilt from its init checkpoint on resume, so it is not copied.
    weights = parts.model.checkpoint_state_dict(clip_held_elsewhere=parts.config.model.init_checkpoint is not None)
    return {"model": weights, "optimizer": parts.optimizer.state_dict(), "step": states[0].step,
            "ranks": [s.to_json() for s in states]}


def _report(states: list[WorkerState]) -> RunReport:
    """The run's report from every rank's state (sums of counts and affinity; rank 0's seconds)."""
    samples = {n: sum(s.counts.get(n, 0) for s in states) for n in states[0].counts}
    averages = [AffinityAverage.from_state(s.affinity) for s in states if s.affinity]
    affinity, se, halves, probes = {}, {}, [], 0
    if averages:
        merged = averages[0]
        for other in averages[1:]:
            merged.merge(other)
        affinity, se, probes = merged.means(), merged.standard_errors(), merged.probes
        halves = [merged.means(slice(0, None, 2)), merged.means(slice(1, None, 2))]
    reads = [{"rank": r, "counts": dict(s.counts), "reads": s.reads} for r, s in enumerate(states)]
    return RunReport(steps=states[0].step, samples=samples, seconds=dict(states[0].seconds), affinity=affinity,
                     affinity_se=se, affinity_probes=probes, affinity_halves=halves, reads=reads)


def _write_final_files(folder: Path, parts: TrainParts, report: RunReport, evaluation: Evaluation) -> None:
    """model.pt, eval.json, reads.json and report.json in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(parts.model, folder / MODEL_FILE, extra={
        "step": report.steps, "config": parts.config.model_dump(mode="json"), "vocabulary": vocabulary_record(parts.config),
    }, frozen_clip_from=parts.config.model.init_checkpoint)
    report.evaluation = evaluation
    (folder / EVAL_FILE).write_text(json.dumps(evaluation.to_json(), indent=2, sort_keys=True))
    (folder / READS_FILE).write_text(json.dumps(report.reads, indent=1))
    (folder / REPORT_FILE).write_text(json.dumps(report.to_json(), indent=1))


def _gather(state: WorkerState, world: int) -> list[WorkerState]:
    """Every rank's state, on every rank."""
    if world > 1 and torch.distributed.is_initialized():
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, state.to_json())
        return [WorkerState.from_json(g) for g in gathered]
    return [state]


# ---------------------------------------------------------------------------------------------
# On Ray Train workers


def train_worker(loop_config: dict) -> None:
    """Ray Train's entry point on every worker: its output to the run's log folder, then the
    loop with DDP, resume and checkpoints."""
    import ray.train

    folder = Path(loop_config["run_dir"])
    rank = ray.train.get_context().get_world_rank()
    with redirect_output(folder / "logs" / f"rank{rank}.log"):
        _train_worker(loop_config, folder)


def _train_worker(loop_config: dict, folder: Path) -> None:
    import ray.train
    import ray.train.torch

    config = TrainConfig.model_validate(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    saved = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as where:
            saved = torch.load(Path(where) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        print(f"[omgseg] resuming at step {saved['step']} from {checkpoint.path}", flush=True)
    node = ray.get_runtime_context().get_node_id()
    parts, state = build_parts(config, rank, world, ray.train.torch.get_device(), saved=saved,
                               wrap=ray.train.torch.prepare_model, node=node)
    logger = StepLogger(loop_config["tracking_uri"], loop_config["run_id"]) if rank == 0 else None
    progress = ProgressFile(folder / PROGRESS_FILE) if rank == 0 else None
    train_loop(parts, state, _hooks(parts, state, logger, progress, _ray_checkpoint))
    # The last report: after the final evaluation (every rank its share, merged on rank 0), so
    # its checkpoint holds the weights, their metrics and the run's report.
    evaluation = _final_evaluation(parts, state, progress)
    _ray_checkpoint(parts, state, final=evaluation)


def _ray_checkpoint(parts: TrainParts, state: WorkerState, final: Evaluation | None = None) -> None:
    """Every worker reports (a barrier); rank 0 attaches the checkpoint with every rank's
    state, and with `final` (the evaluation) the run's final files too."""
    import ray.train

    states = _gather(state, parts.world)
    if parts.rank != 0:
        ray.train.report({"step": state.step}, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save(_payload(parts, states), Path(folder) / CHECKPOINT_FILE)
        if final is not None:
            _write_final_files(Path(folder), parts, _report(states), final)
        ray.train.report({"step": state.step}, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _fit_on_ray(config: TrainConfig, uri: str, run_id: str, folder: Path) -> None:
    """A TorchTrainer run of `train_worker`; its final checkpoint's files are copied to `folder`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from omgseg.platform.cluster import connect

    connect()  # RAY_ADDRESS selects a cluster (the project shipped as a wheel); otherwise a local instance
    resources = config.resources
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "run_id": run_id, "tracking_uri": uri,
                           "run_dir": str(folder)},
        # Set, not left at Ray's 30 minutes: a worker waits in a collective for the slowest one
        # (at the merge of an evaluation, say), and a timeout there fails the run.
        torch_config=TorchConfig(timeout_s=config.collective_timeout_s),
        scaling_config=ScalingConfig(num_workers=resources.workers, use_gpu=resources.use_gpu,
                                     resources_per_worker={"CPU": resources.cpus_per_worker}),
        run_config=RunConfig(
            name=f"{config.name}-{run_id[:8]}", storage_path=str(config.output_dir / "ray"),
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
        ),
    )
    try:
        with follow_progress(folder / PROGRESS_FILE, config.steps):
            result = trainer.fit()
        error = result.error
    except Exception as err:  # noqa: BLE001 - Ray wraps the workers' errors; reported below as one line
        error, result = err, None
    if error is not None or result is None or result.checkpoint is None:
        raise _failure(config, folder, error or "no checkpoint was reported")
    with result.checkpoint.as_directory() as where:
        for name in (MODEL_FILE, EVAL_FILE, READS_FILE, REPORT_FILE):
            (folder / name).write_bytes((Path(where) / name).read_bytes())


def _failure(config: TrainConfig, folder: Path, error: BaseException | str) -> TrainingFailed:
    """The one-line error of a failed run; its full text goes to <run folder>/logs/error.log."""
    import traceback

    log = folder / "logs" / "error.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(traceback.format_exception(error)) if isinstance(error, BaseException) else str(error)
    log.write_text(text)
    return TrainingFailed(f"training run {config.name!r} failed: {error_line(text)} (full log: {log}; "
                          f"worker logs: {folder / 'logs'})")


# ---------------------------------------------------------------------------------------------
# In the calling process (a study trial of one worker)


def _fit_in_process(config: TrainConfig, uri: str, run_id: str, folder: Path) -> None:
    """The loop in this process on its device, with checkpoint files in `folder/checkpoint`."""
    device = torch.device("cuda" if config.resources.use_gpu and torch.cuda.is_available() else "cpu")
    saved_file = folder / RESUME_DIR / CHECKPOINT_FILE
    saved = torch.load(saved_file, map_location="cpu", weights_only=True) if saved_file.is_file() else None
    if saved is not None:
        print(f"[omgseg] resuming at step {saved['step']} from {saved_file}", flush=True)
    parts, state = build_parts(config, 0, 1, device, saved=saved)

    def checkpoint(parts: TrainParts, state: WorkerState) -> None:
        saved_file.parent.mkdir(parents=True, exist_ok=True)
        partial = saved_file.with_name(saved_file.name + ".partial")
        torch.save(_payload(parts, [state]), partial)
        partial.replace(saved_file)  # atomic: a crash mid-write keeps the previous checkpoint

    progress = ProgressFile(folder / PROGRESS_FILE)
    train_loop(parts, state, _hooks(parts, state, StepLogger(uri, run_id), progress, checkpoint))
    evaluation = _final_evaluation(parts, state, progress)
    _write_final_files(folder, parts, _report([state]), evaluation)


# ---------------------------------------------------------------------------------------------
# The driver


def _point_latest(folder: Path) -> None:
    """<output_dir>/<name>/latest -> the run folder just finished (replaced atomically)."""
    link = folder.parent / "latest"
    partial = folder.parent / ".latest.partial"
    partial.unlink(missing_ok=True)
    partial.symlink_to(folder.name, target_is_directory=True)
    partial.replace(link)


def run_training(config: TrainConfig, *, parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 run_id: str | None = None, prepare: bool = True, in_process: bool = False,
                 quiet: bool = False) -> TrainResult:
    """Prepare data (unless `prepare` is False: the caller did), open the MLflow run (or
    continue `run_id`: a retried trial), train, and record the result. Raises TrainingFailed
    with one line when the training fails."""
    from omgseg.platform.data import prepare_data

    if in_process and config.resources.workers != 1:
        raise ValueError(f"in-process training runs one worker, the config asks for {config.resources.workers}")
    if prepare:
        prepare_data(config.data, config.splits_read(), progress=not quiet)
    check_inputs(config)
    uri = resolve_tracking_uri(config.tracking, config.output_dir)  # a study's trial: the study's URI, as given
    check_cluster_store(uri, "tracking.tracking_uri")
    config.output_dir.mkdir(parents=True, exist_ok=True)
    run_id = open_run(config, uri, parent_run_id=parent_run_id, tags=tags, run_id=run_id)
    folder = run_dir(config, run_id)
    folder.mkdir(parents=True, exist_ok=True)
    if not quiet:
        say(f"run {config.name} ({run_id}): {config.steps} steps on {', '.join(mixed_datasets(config))}; "
            f"files and logs in {folder}")
    started = time.perf_counter()
    try:
        if in_process:
            _fit_in_process(config, uri, run_id, folder)
        else:
            _fit_on_ray(config, uri, run_id, folder)
        report = RunReport.from_json(json.loads((folder / REPORT_FILE).read_text()))
        report.seconds["fit"] = time.perf_counter() - started
        (folder / REPORT_FILE).write_text(json.dumps(report.to_json(), indent=1))
        finish_run(uri, run_id, report, [folder / n for n in (MODEL_FILE, EVAL_FILE, READS_FILE, REPORT_FILE)],
                   folder / MODEL_FILE)
    except BaseException:
        fail_run(uri, run_id)
        raise
    # A finished run is never resumed: its resume point (weights and Adam's moments) is dead weight.
    shutil.rmtree(folder / RESUME_DIR, ignore_errors=True)
    _point_latest(folder)
    return TrainResult(run_id=run_id, run_dir=folder, checkpoint=folder / MODEL_FILE, report=report, tracking_uri=uri)
