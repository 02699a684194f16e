"""MLflow bookkeeping shared by training runs and studies: where runs go, the experiment, and
how evaluation results become metric names MLflow accepts."""

from __future__ import annotations

import os
import re
from pathlib import Path

from omgseg.platform.config import TrackingConfig


def resolve_tracking_uri(tracking: TrackingConfig, default_dir: Path) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else a SQLite file in `default_dir`."""
    if tracking.tracking_uri:
        return tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path(default_dir) / 'mlflow.db').resolve()}"


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


def metric_values(evaluation: dict[str, dict[str, dict]]) -> dict[str, float]:
    """{eval data set: {task: metrics}} -> {"<data set>/<task>/<metric>": value} of the scalars
    (per-class tables and other nested values are left to the eval.json artifact)."""
    return {
        mlflow_key(f"{name}/{task}/{key}"): float(value)
        for name, tasks in evaluation.items() for task, values in tasks.items()
        for key, value in values.items() if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
