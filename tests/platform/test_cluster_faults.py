"""Services failing under a running study, on the loopback setup of test_cluster.py (a two-node
Ray cluster, the shards on HTTP, `mlflow server`): the shard server cutting a transfer mid-epoch
(the trial's stream reads the shard again and goes on),
the tracking server stopped and started again while trials run, and the second Ray node killed
under a running trial. In each the study finishes, and MLflow holds one FINISHED child run per
trial: none lost, none duplicated.

Slow (about 2 minutes each, the shard cut about 4): `make test-cluster` runs them.
"""

import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from clusterservices import loopback_services

from omgseg.platform.config import DataConfig, DatasetSpec
from omgseg.platform.data import prepare_data

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

ROOT = Path(__file__).resolve().parents[2]
TRIALS = 4  # 2 data sets alone x 2 seeds


@pytest.fixture
def services(tmp_path):
    data = DataConfig(root=tmp_path / "data", datasets={
        "coco": DatasetSpec(format="coco-panoptic", samples_per_shard=2),
        "ade": DatasetSpec(format="ade-panoptic", samples_per_shard=2),
    })
    prepare_data(data)
    with loopback_services(tmp_path, tmp_path / "data" / "shards") as running:
        yield running


def _study_command(services, out: Path, *extra: str) -> list[str]:
    shards = services.shards.url
    return [sys.executable, str(ROOT / "studies" / "cotrain_matrix.py"), "--out", str(out),
            "data.datasets={coco: {format: coco-panoptic, shards: '" + shards + "/coco/{split}'}, "
            "ade: {format: ade-panoptic, shards: '" + shards + "/ade/{split}'}}",
            "train_datasets=[coco, ade]", "combinations=[singletons]", "seeds=[0, 1]", "train.steps=8",
            "train.log_every=2", "train.checkpoint_every=4", "train.eval_samples=1",
            "evaluation={coco: [panoptic], ade: [panoptic]}", "metrics={panoptic: [PQ]}",
            "train.affinity={enabled: false}", "train.resources={workers: 1, cpus_per_worker: 1}", *extra]


def _watch(study: subprocess.Popen) -> list[str]:
    """The study's stderr lines, collected as they come."""
    lines: list[str] = []

    def read() -> None:
        lines.extend(study.stderr)

    threading.Thread(target=read, daemon=True).start()
    return lines


def _wait_for(found, study: subprocess.Popen, lines: list[str]):
    """Poll `found()` until it returns something; fail with the study's last lines if the study
    ends or 15 minutes pass first."""
    deadline = time.monotonic() + 900
    while not (value := found()):
        assert time.monotonic() < deadline and study.poll() is None, "".join(lines[-40:])
        time.sleep(0.2)
    return value


def _children(services, out: Path) -> list:
    import json

    state = json.loads((out / "study.json").read_text())
    client = mlflow.MlflowClient(services.mlflow.url)
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED"
    return client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{state['parent_run_id']}'")


def _one_finished_run_per_trial(children) -> None:
    trials = [c.data.tags["omgseg.trial_id"] for c in children]
    assert len(trials) == TRIALS and len(set(trials)) == TRIALS, f"runs per trial: {sorted(trials)}"
    assert all(c.info.status == "FINISHED" for c in children)


def test_a_shard_transfer_cut_mid_epoch_is_read_again_and_no_trial_fails(services, tmp_path):
    services.shards.cut_next(3)  # the third shard any trial fetches ends halfway through
    out = tmp_path / "study"
    done = subprocess.run(_study_command(services, out, "scheduling.max_retries=1", "data.read_retry_backoff=0.5"),
                          env=services.study_env(), capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    assert services.shards.cuts, "the shard server cut no transfer"
    assert not [line for line in done.stderr.splitlines() if "retrying" in line], done.stderr[-4000:]  # no trial retried
    logs = "".join(path.read_text() for path in (out / "logs").glob("*.log"))
    read_again = [line for line in logs.splitlines() if "again from sample" in line]
    assert len(read_again) == 1 and services.shards.url in read_again[0] and ".tar" in read_again[0], logs[-4000:]
    _one_finished_run_per_trial(_children(services, out))


def test_the_tracking_server_stopped_and_started_again_mid_study_loses_and_duplicates_no_run(services, tmp_path):
    """MLflow goes away for 15 s while a trial logs its steps: the trial's MLflow client waits
    and retries, saying so in the trial's log, and nothing is lost or logged twice."""
    out = tmp_path / "study"
    study = subprocess.Popen(_study_command(services, out, "scheduling.max_retries=1", "train.steps=40"),
                             env=services.study_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = _watch(study)
    try:  # once a trial is in its loop, logging steps:
        _wait_for(lambda: any((out / "trials").glob("*/*/progress.jsonl")), study, lines)
        services.mlflow.stop()
        time.sleep(15)
        services.mlflow.start()
        assert study.wait(timeout=1200) == 0, "".join(lines[-60:])
    finally:
        if study.poll() is None:
            study.kill()
    logs = "".join(log.read_text() for log in (out / "logs").glob("*-s*.log"))
    assert "Retrying" in logs and "/api/2.0/mlflow/" in logs  # the wait is in the trials' logs, with the call
    children = _children(services, out)
    _one_finished_run_per_trial(children)
    client = mlflow.MlflowClient(services.mlflow.url)
    for child in children:  # every step logged once: none lost in the outage, none twice from a retry
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "samples_per_s")]
        assert sorted(steps) == list(range(2, 41, 2)), (child.data.tags["omgseg.trial_id"], steps)


def test_a_worker_node_killed_under_a_trial_reschedules_it_and_it_resumes_from_its_checkpoint(services, tmp_path):
    """The second node is lost once the trial it runs has saved a checkpoint; that trial is
    retried on the head, resumes from the checkpoint, and finishes in its own MLflow run."""
    out = tmp_path / "study"
    study = subprocess.Popen(_study_command(services, out, "scheduling.max_retries=1", "train.steps=40"),
                             env=services.study_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = _watch(study)
    try:
        victim = _wait_for(lambda: _checkpointed_trial_on_the_worker_node(services, out), study, lines)
        assert services.kill_worker_node() > 0
        assert study.wait(timeout=1200) == 0, "".join(lines[-60:])
    finally:
        if study.poll() is None:
            study.kill()
    retried = [line for line in lines if "retrying" in line]
    assert len(retried) == 1 and f"retrying {victim} " in retried[0], "".join(lines[-60:])
    assert "resuming at step" in (out / "logs" / f"{victim}.log").read_text()
    _one_finished_run_per_trial(_children(services, out))


def _checkpointed_trial_on_the_worker_node(services, out: Path) -> str | None:
    """The id of a trial that runs on the second node (its process writes to the trial's log)
    and has saved a checkpoint, if there is one."""
    for log in services.worker_node_outputs():
        if log.parent == out / "logs" and any((out / "trials" / log.stem).glob("*/checkpoint/state.pt")):
            return log.stem
    return None
