"""MLflow bookkeeping shared by training runs and studies: where runs go, the experiment, a
run's life (opened, step metrics, finished or failed), and how evaluation results become
metric names MLflow accepts. Only drivers and rank 0 write."""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from pathlib import Path

from omgseg.platform.config import TrackingConfig, TrainConfig, absolute_path, absolute_tracking_uri
from omgseg.platform.records import TRIAL_FILE, Evaluation, RunReport, TrialRecord


def resolve_tracking_uri(tracking: TrackingConfig, default_dir: Path) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else a SQLite file in `default_dir`;
    always absolute (a relative SQLite path would be resolved in every process's own folder)."""
    if tracking.tracking_uri:
        return tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return absolute_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    return f"sqlite:///{absolute_path(Path(default_dir)) / 'mlflow.db'}"


def experiment_id(client, name: str, uri: str) -> str:
    """The experiment's id, created if missing. For a SQLite store the artifacts go next to the
    database file (an absolute path): MLflow's default, ./mlruns, would be relative to whatever
    folder the creating process runs in, and Ray workers run in folders of their own. A
    tracking server decides its artifact store itself."""
    import mlflow

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        found = client.get_experiment_by_name(name)  # created meanwhile by another process
        if found is None:
            raise
        return found.experiment_id


def mlflow_key(name: str) -> str:
    """A metric name MLflow accepts: the reference names' '@' (VPQ@4) becomes '_' (VPQ_4)."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name)


def metric_values(evaluation: Evaluation) -> dict[str, float]:
    """{"<data set>/<task or query group>/<metric>": value} of an evaluation's scalars
    (per-class tables and other nested values are left to the eval.json artifact)."""
    return {mlflow_key(score.key): score.value for score in evaluation.scores()}


def cluster_store_error(uri: str, address: str | None, nodes: int, key: str) -> str | None:
    """Why a SQLite tracking store cannot serve a Ray cluster of `nodes` nodes at `address`, or
    None when it can (no cluster address, one node, or a store that is not SQLite)."""
    if not uri.startswith("sqlite:") or not address or nodes <= 1:
        return None
    path = uri.removeprefix("sqlite:///")
    return (f"{key}: a SQLite store ({uri}) cannot serve the {nodes}-node Ray cluster at {address}: other nodes see "
            f"another file or a shared one whose locking is not safe across machines. Start a tracking server on "
            f"the head node, e.g. `mlflow server --backend-store-uri sqlite:///{path} --host 0.0.0.0 --port 5000`, "
            f"and set {key}=http://<head node>:5000")


def check_cluster_store(uri: str, key: str) -> None:
    """Raise when $RAY_ADDRESS names a Ray cluster of more than one node and `uri` is a SQLite
    store (`cluster_store_error`); `key` names the setting in the message. Counts the cluster's
    nodes through a connection of its own (closed again: the run connects as it needs), or
    through the one this process has."""
    address = os.environ.get("RAY_ADDRESS")
    if not uri.startswith("sqlite:") or not address:
        return
    import logging

    import ray

    connected = ray.is_initialized()
    if not connected:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    finally:
        if not connected:
            ray.shutdown()
    error = cluster_store_error(uri, address, nodes, key)
    if error:
        raise ValueError(error)


class StepLogger:
    """Step metrics into an existing MLflow run (from rank 0 or the trial's own process)."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id

    def __call__(self, metrics: dict[str, float], step: int, steps: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(key=mlflow_key(k), value=float(v), timestamp=now, step=step) for k, v in metrics.items()
            if math.isfinite(v)
        ])


def open_run(config: TrainConfig, uri: str, *, parent_run_id: str | None = None, tags: dict[str, str] | None = None,
             run_id: str | None = None) -> str:
    """A new MLflow run for `config` (tags, every config key as a param, config.json), or the
    existing `run_id` marked RUNNING again (a retried or resumed trial continues its run)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        return run_id
    run_tags = {"omgseg.git_commit": git_commit(), **(tags or {})}
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id(client, config.tracking.experiment, uri), run_name=config.name, tags=run_tags)
    log_config(client, run.info.run_id, config)
    return run.info.run_id


def log_config(client, run_id: str, config) -> None:
    """Every key of a config as a param (dotted names) and the config itself as config.json."""
    import mlflow

    from omgseg.platform.config import flatten

    params = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in sorted(flatten(config).items())]
    for start in range(0, len(params), 100):  # log_batch takes at most 100 params a call
        client.log_batch(run_id, params=params[start:start + 100])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.json"
        path.write_text(config.model_dump_json(indent=2))
        client.log_artifact(run_id, str(path))


def finish_run(uri: str, run_id: str, report: RunReport, files: list[Path], checkpoint: Path) -> None:
    """The run's final metrics (realised mix, samples, seconds, evaluation, samples by node),
    its files as artifacts, the checkpoint's path as a tag; then FINISHED."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    values = {**{f"mix_realised/{k}": v for k, v in report.realised_mix.items()},
              **{f"samples/{k}": v for k, v in report.samples.items()},
              **{f"seconds/{k}": v for k, v in report.seconds.items()}, **metric_values(report.evaluation),
              **{f"samples_by_node/{node[:12]}/{k}": v for node, counts in samples_by_node(report.reads).items()
                 for k, v in counts.items()},
              **{f"affinity/{s}/{t}": z for s, row in report.affinity.items() for t, z in row.items()}}
    now = int(time.time() * 1000)
    metrics = [mlflow.entities.Metric(mlflow_key(k), float(v), now, report.steps) for k, v in values.items()]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start:start + 1000])
    for path in files:
        client.log_artifact(run_id, str(path))
    client.set_tag(run_id, "omgseg.checkpoint", str(checkpoint))
    client.set_terminated(run_id, "FINISHED")


def fail_run(uri: str, run_id: str) -> None:
    import mlflow

    mlflow.MlflowClient(uri).set_terminated(run_id, "FAILED")


def open_study_run(config, uri: str, parent_run_id: str | None = None) -> str:
    """A study's parent run (tagged with the study's name, its config logged), or the existing
    `parent_run_id` marked RUNNING again for a resumed study."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    if parent_run_id is not None:
        client.update_run(parent_run_id, status="RUNNING")
        return parent_run_id
    parent = client.create_run(experiment_id(client, config.tracking.experiment, uri), run_name=config.name,
                               tags={"omgseg.study": config.name, "omgseg.kind": "study"})
    log_config(client, parent.info.run_id, config)
    return parent.info.run_id


def close_study_run(uri: str, parent_run_id: str, files: list[Path], values: dict[str, float], failed: bool) -> None:
    """The study's tables and summary as artifacts (under tables/), its headline numbers as
    metrics; then FINISHED, or FAILED when a trial failed."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    for path in files:
        client.log_artifact(parent_run_id, str(path), artifact_path="tables")
    now = int(time.time() * 1000)
    client.log_batch(parent_run_id, metrics=[mlflow.entities.Metric(k, float(v), now, 0) for k, v in values.items()])
    client.set_terminated(parent_run_id, "FAILED" if failed else "FINISHED")


def samples_by_node(reads: list[dict]) -> dict[str, dict[str, int]]:
    """{node: {data set: samples}} summed over the ranks that ran there (their last node)."""
    out: dict[str, dict[str, int]] = {}
    for rank in reads:
        node = rank["reads"][-1]["node"] if rank["reads"] else "unknown"
        for name, count in rank["counts"].items():
            out.setdefault(node, {})[name] = out.get(node, {}).get(name, 0) + count
    return out


def git_commit() -> str:
    import subprocess

    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent)
        return done.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------
# A study's ledger: its trials are the child runs of its parent run


def child_runs(uri: str, parent_run_id: str) -> dict[str, tuple[str, str]]:
    """{trial id: (run id, status)} of the parent's child runs (the newest per trial)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=10000, order_by=["attributes.start_time ASC"])
    return {r.data.tags["omgseg.trial_id"]: (r.info.run_id, r.info.status) for r in runs if "omgseg.trial_id" in r.data.tags}


def finished_records(uri: str, parent_run_id: str) -> dict[str, TrialRecord]:
    """The records of FINISHED child runs that hold trial.json (MLflow is the study's ledger)."""
    import json

    import mlflow

    client = mlflow.MlflowClient(uri)
    out = {}
    for trial_id, (run_id, status) in child_runs(uri, parent_run_id).items():
        if status != "FINISHED":
            continue
        with tempfile.TemporaryDirectory() as folder:
            try:
                path = client.download_artifacts(run_id, TRIAL_FILE, folder)
            except (OSError, mlflow.exceptions.MlflowException):
                continue  # finished training but stopped before its record was logged: run it again
            out[trial_id] = TrialRecord.from_json(json.loads(Path(path).read_text()))
    return out


def log_record(uri: str, record: TrialRecord, folder: Path) -> Path:
    """trial.json next to the trial's outputs and as an artifact of its MLflow run."""
    import json

    import mlflow

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / TRIAL_FILE
    partial = folder / (TRIAL_FILE + ".partial")
    partial.write_text(json.dumps(record.to_json(), indent=1, sort_keys=True))
    partial.replace(path)
    mlflow.MlflowClient(uri).log_artifact(record.mlflow_run_id, str(path))
    return path
