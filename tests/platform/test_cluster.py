"""Scale-out, with real components on loopback: a two-node Ray cluster (`ray start --head` and
`ray start --address`, 1 CPU each), the synthetic shards served over HTTP, `mlflow server` on
SQLite, and a two-trial study driven through RAY_ADDRESS. Both nodes train, the shards they
read in an epoch are disjoint, the tracking server holds the parent and child runs, and the
workers ran the wheel the driver shipped. Everything is stopped afterwards, pass or fail.

Slow (about 2 minutes): `make test-cluster` runs it, and `.ci/run` calls that.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from localserver import free_port, wait_for_http

from omgseg.platform.config import DataConfig, DatasetSpec
from omgseg.platform.data import prepare_data

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _ray(*args: str, env: dict) -> None:
    done = subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"ray {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


@pytest.fixture
def services(tmp_path):
    """Shards on HTTP, an MLflow server and a two-node Ray cluster, all on 127.0.0.1."""
    data = DataConfig(root=tmp_path / "data", datasets={
        "coco": DatasetSpec(format="coco-panoptic", samples_per_shard=2),
        "davis": DatasetSpec(format="davis", clip_length=4, samples_per_shard=1),
    })
    prepare_data(data)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    started: list[subprocess.Popen] = []
    ray_started = False
    try:
        http_port = free_port()
        started.append(subprocess.Popen([sys.executable, "-m", "http.server", str(http_port), "--bind", "127.0.0.1",
                                         "--directory", str(tmp_path / "data" / "shards")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        mlflow_port = free_port()
        started.append(subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri",
                                         f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
                                         str(tmp_path / "server-artifacts"), "--host", "127.0.0.1", "--port",
                                         str(mlflow_port), "--workers", "1"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        ray_port = free_port()
        ray_started = True
        _ray("start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(ray_port), "--num-cpus", "1",
             "--resources", json.dumps({"trial_slot": 1}), "--disable-usage-stats", env=env)
        _ray("start", "--address", f"127.0.0.1:{ray_port}", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
             "--disable-usage-stats", env=env)
        wait_for_http(f"http://127.0.0.1:{http_port}/coco/train/manifest.json", "the shard server")
        wait_for_http(f"http://127.0.0.1:{mlflow_port}/health", "the MLflow server")
        yield {"ray": f"127.0.0.1:{ray_port}", "shards": f"http://127.0.0.1:{http_port}",
               "mlflow": f"http://127.0.0.1:{mlflow_port}", "env": env}
    finally:
        if ray_started:
            subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=300)
        for process in started:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(process.pid, signal.SIGKILL)


def test_a_two_trial_study_on_a_two_node_cluster(services, tmp_path):
    shards = services["shards"]
    overrides = [
        "data.datasets={coco: {format: coco-panoptic, shards: '" + shards + "/coco/{split}'}, "
        "davis: {format: davis, shards: '" + shards + "/davis/{split}'}}",
        "train_datasets=[coco, davis]", "combinations=[all]", "seeds=[0, 1]", "train.steps=6", "train.log_every=2",
        "train.checkpoint_every=3", "train.eval_samples=1", "evaluation={coco: [panoptic], davis: [vos]}",
        "metrics={panoptic: [PQ], vos: [J&F]}", "train.affinity={enabled: true, every: 3}",
        "train.resources={workers: 2, cpus_per_worker: 1}", "scheduling.max_retries=0",
    ]
    env = {**services["env"], "RAY_ADDRESS": services["ray"], "MLFLOW_TRACKING_URI": services["mlflow"]}
    out = tmp_path / "study"
    done = subprocess.run([sys.executable, str(ROOT / "studies" / "cotrain_matrix.py"), "--out", str(out), *overrides],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "shipping omgseg-" in done.stderr  # the driver built the wheel and sent it

    state = json.loads((out / "study.json").read_text())
    assert state["tracking_uri"] == services["mlflow"]
    client = mlflow.MlflowClient(services["mlflow"])
    parent = client.get_run(state["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{state['parent_run_id']}'")
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert all(c.info.status == "FINISHED" for c in children)
    assert "tables/runs.parquet" in {a.path for a in client.list_artifacts(state["parent_run_id"], "tables")}

    for child in children:
        trial = child.data.tags["omgseg.trial_id"]
        record = json.loads((out / "trials" / trial / "trial.json").read_text())
        reads = record["reads"]
        assert sorted(r["rank"] for r in reads) == [0, 1]
        nodes = {r["reads"][-1]["node"] for r in reads}
        assert len(nodes) == 2, f"{trial}: both workers ran on one node ({nodes})"
        for rank in reads:
            assert sum(rank["counts"].values()) > 0  # every node trained
            code = rank["reads"][-1]["code"]
            assert not code.startswith(str(ROOT)), f"{trial}: rank {rank['rank']} ran {code}, not the shipped wheel"
        for name in ("coco", "davis"):
            epochs = [r["reads"][-1]["shards"][name] for r in sorted(reads, key=lambda r: r["rank"])]
            assert epochs[0] and epochs[1], f"{trial}: a rank read no {name} shards"
            for epoch in set(epochs[0]) & set(epochs[1]):
                assert not set(epochs[0][epoch]) & set(epochs[1][epoch]), f"{trial} {name} epoch {epoch}: shards overlap"
        by_node = {k for k in child.data.metrics if k.startswith("samples_by_node/")}
        assert len({k.split("/")[1] for k in by_node}) == 2  # logged per node
