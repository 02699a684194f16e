"""Scale-out, with real components on loopback: a two-node Ray cluster (`ray start --head` and
`ray start --address`, 1 CPU each), the synthetic shards served over HTTP, `mlflow server` on
SQLite, and a two-trial study driven through RAY_ADDRESS. Both nodes train, the shards they
read in an epoch are disjoint, the tracking server holds the parent and child runs, and the
workers ran the wheel the driver shipped; the same study on a SQLite store is refused there.
Everything is stopped afterwards, pass or fail.

Slow (about 2 minutes): `make test-cluster` runs it, and `.ci/run` calls that.
"""

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from clusterservices import loopback_services

from omgseg.platform.config import DataConfig, DatasetSpec
from omgseg.platform.data import prepare_data

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def services(tmp_path):
    """Shards on HTTP, an MLflow server and a two-node Ray cluster, all on 127.0.0.1."""
    data = DataConfig(root=tmp_path / "data", datasets={
        "coco": DatasetSpec(format="coco-panoptic", samples_per_shard=2),
        "davis": DatasetSpec(format="davis", clip_length=4, samples_per_shard=1),
    })
    prepare_data(data)
    with loopback_services(tmp_path, tmp_path / "data" / "shards") as running:
        yield running


def test_a_two_trial_study_on_a_two_node_cluster(services, tmp_path):
    shards = services.shards.url
    overrides = [
        "data.datasets={coco: {format: coco-panoptic, shards: '" + shards + "/coco/{split}'}, "
        "davis: {format: davis, shards: '" + shards + "/davis/{split}'}}",
        "train_datasets=[coco, davis]", "combinations=[all]", "seeds=[0, 1]", "train.steps=6", "train.log_every=2",
        "train.checkpoint_every=3", "train.eval_samples=1", "evaluation={coco: [panoptic], davis: [vos]}",
        "metrics={panoptic: [PQ], vos: [J&F]}", "train.affinity={enabled: true, every: 3}",
        "train.resources={workers: 2, cpus_per_worker: 1}", "scheduling.max_retries=0",
    ]
    env = services.study_env()
    out = tmp_path / "study"
    done = subprocess.run([sys.executable, str(ROOT / "studies" / "cotrain_matrix.py"), "--out", str(out), *overrides],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "shipping omgseg-" in done.stderr  # the driver built the wheel and sent it

    state = json.loads((out / "study.json").read_text())
    assert state["tracking_uri"] == services.mlflow.url
    client = mlflow.MlflowClient(services.mlflow.url)
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

    # The same study with MLflow's default, a SQLite file, is refused on this two-node cluster
    # before anything is written to it.
    sqlite_env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}
    refused = tmp_path / "sqlite_study"
    done = subprocess.run([sys.executable, str(ROOT / "studies" / "cotrain_matrix.py"), "--out", str(refused), *overrides],
                          env=sqlite_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1 and "tracking.tracking_uri: a SQLite store" in done.stderr, done.stderr[-4000:]
    assert "the 2-node Ray cluster" in done.stderr and not (refused / "mlflow.db").exists()
