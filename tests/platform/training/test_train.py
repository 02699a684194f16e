"""Training on a local Ray cluster: a tiny 2-worker run, MLflow records, checkpoints, a killed worker."""

import os
import signal
import threading
import time
from pathlib import Path

import mlflow
import pytest
import ray
import torch

from omgseg.model.checkpoint import load_checkpoint
from omgseg.model.omgseg import OMGSeg
from omgseg.model.vocabulary import Vocabulary
from omgseg.platform.config import ConfigError, TrainConfig, load_config
from omgseg.platform.training.loop import lr_factor
from omgseg.platform.training.train import CHECKPOINT_FILE, run_training

CONFIG = Path(__file__).resolve().parents[3] / "studies" / "configs" / "train_tiny.yaml"


def _config(tmp_path: Path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, CONFIG, [
        f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'runs'}", "steps=30", "log_every=5",
        "checkpoint_every=10", "optimizer.warmup_steps=5", *overrides,
    ])


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def test_bad_configs_fail_before_any_worker_starts(tmp_path):
    with pytest.raises(ConfigError, match=r"mix names datasets \['kitti'\]"):
        _config(tmp_path, "mix.kitti=1")
    with pytest.raises(ConfigError, match=r"mix ratios must be >= 0, got \{'coco': -0.5\}"):
        _config(tmp_path, "mix.coco=-0.5")
    config = _config(tmp_path, f"data.datasets.coco.src={tmp_path / 'no_coco_here'}")
    with pytest.raises(FileNotFoundError, match="no_coco_here"):
        run_training(config)
    assert not ray.is_initialized()


def test_learning_rate_schedule():
    config = _config(Path("/tmp"), "steps=120", "optimizer.warmup_steps=10")
    assert lr_factor(0, config) == pytest.approx(0.1)
    assert lr_factor(9, config) == pytest.approx(1.0)
    assert lr_factor(79, config) == pytest.approx(1.0)
    assert lr_factor(80, config) == pytest.approx(0.1)  # 8/12 of the run
    assert lr_factor(110, config) == pytest.approx(0.01)  # 11/12


def _runs(config: TrainConfig):
    client = mlflow.MlflowClient(f"sqlite:///{config.output_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    return client, client.search_runs([experiment.experiment_id])


def test_tiny_two_worker_run_is_tracked_and_reloads(tmp_path, local_ray):
    config = _config(tmp_path, "eval_every=15", "eval_samples=2", "evaluation={coco: [panoptic], vipseg: [video_panoptic]}")
    result = run_training(config)
    report = result.report
    assert report.steps == 30
    assert set(report.samples) == {"coco", "ade", "vipseg", "ytvis", "davis"}
    assert sum(report.samples.values()) == 30 * 2 * 2  # steps x workers x batch
    assert set(report.samples.values()) == {24}  # exact exposure: 120 samples in fifths
    assert report.evaluation.datasets["coco"].losses["object_queries"] > 0
    assert (result.run_dir / "logs" / "rank0.log").is_file() and (result.run_dir / "logs" / "rank1.log").is_file()

    client, runs = _runs(config)
    assert len(runs) == 1 and runs[0].info.run_id == result.run_id and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["steps"] == "30" and run.data.params["mix.coco"] == "1.0"
    assert run.data.tags["omgseg.checkpoint"] == str(result.checkpoint)
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.json", "model.pt"} <= artifacts
    assert {f"mix_realised/{n}" for n in report.samples} <= set(run.data.metrics)
    # Loss goes down: the mean over data sets of the first logged window against the last.
    history = {n: [m.value for m in client.get_metric_history(result.run_id, f"loss/{n}")] for n in report.samples}
    first = sum(h[0] for h in history.values()) / len(history)
    last = sum(h[-1] for h in history.values()) / len(history)
    assert last < 0.8 * first, history
    assert len(client.get_metric_history(result.run_id, "lr")) == 6
    # Evaluated at step 15 and at the end, by rank 0.
    assert [m.step for m in client.get_metric_history(result.run_id, "coco/panoptic/PQ")] == [15, 30]
    assert "vipseg/video_panoptic/VPQ_1" in run.data.metrics

    assert run.data.metrics["samples/coco"] == report.samples["coco"]
    assert "coco/object_queries/val_loss" in run.data.metrics
    # The exported model predicts exactly as the weights of the run's last Ray checkpoint.
    model, extra = load_checkpoint(result.checkpoint)
    assert extra["step"] == 30 and extra["vocabulary"]["names"]
    (state_file,) = sorted((tmp_path / "runs" / "ray").glob(f"*/checkpoint_*/{CHECKPOINT_FILE}"))[-1:]
    trained = OMGSeg(model.config)
    trained.load_state_dict(torch.load(state_file, weights_only=True)["model"])
    vocab = Vocabulary.from_names(["triangle", "sky"], [True, False])
    images = torch.randint(0, 256, (1, 2, 3, 96, 128), dtype=torch.uint8)
    assert torch.equal(model.predict(images, vocab)[0].mask_logits, trained.predict(images, vocab)[0].mask_logits)
    assert model.seen_names


def _train_workers() -> list[int]:
    """Pids of Ray Train worker processes (Linux /proc; Ray sets their title)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"RayTrainWorker" in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


def test_a_killed_worker_resumes_to_the_same_step_count_in_one_mlflow_run(tmp_path, local_ray):
    config = _config(tmp_path, "steps=40")
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", run_training(config)))
    thread.start()
    storage = tmp_path / "runs" / "ray"
    deadline = time.time() + 300
    while time.time() < deadline and not list(storage.glob("*/checkpoint_*/" + CHECKPOINT_FILE)):
        time.sleep(0.5)
    workers = _train_workers()
    assert workers, "no training worker process found"
    os.kill(workers[-1], signal.SIGKILL)
    restarted = False
    while thread.is_alive() and not restarted:  # Ray must start a new worker group
        restarted = bool(set(_train_workers()) - set(workers))
        time.sleep(0.2)
    thread.join(timeout=600)
    assert restarted, "no new training worker appeared after the kill"
    result = outcome["result"]
    assert result.report.steps == 40
    assert sum(result.report.samples.values()) == 40 * 2 * 2
    _, runs = _runs(config)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    _, extra = load_checkpoint(result.checkpoint)
    assert extra["step"] == 40


def test_every_task_has_an_evaluation():
    from omgseg.core.structures import Task
    from omgseg.platform.evaluation.evaluate import check_tasks

    assert [t.value for t in check_tasks([t.value for t in Task], "x")] == [t.value for t in Task]
    with pytest.raises(ValueError, match="unknown task 'panoptik'"):
        check_tasks(["panoptik"], "x")
