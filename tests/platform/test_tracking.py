"""A SQLite tracking store is refused when RAY_ADDRESS names a cluster of more than one node,
by a study and by `omgseg train`, before anything is written to it."""

import pytest
import ray
from studyfixture import CONFIG, ROOT

from omgseg.platform.config import StudyConfig, TrainConfig, load_config
from omgseg.platform.tracking import check_cluster_store, cluster_store_error

ADDRESS = "ray://head:10001"


def test_the_refusal_names_the_key_and_the_server_command():
    error = cluster_store_error("sqlite:////shared/study/mlflow.db", ADDRESS, 3, "tracking.tracking_uri")
    assert error.startswith("tracking.tracking_uri: a SQLite store") and "3-node Ray cluster at ray://head:10001" in error
    assert "mlflow server --backend-store-uri sqlite:////shared/study/mlflow.db" in error
    assert cluster_store_error("sqlite:////x.db", ADDRESS, 1, "k") is None  # one node: one machine's file is fine
    assert cluster_store_error("sqlite:////x.db", None, 3, "k") is None  # a local Ray
    assert cluster_store_error("http://head:5000", ADDRESS, 3, "k") is None


@pytest.fixture
def two_node_cluster(monkeypatch):
    """RAY_ADDRESS set and Ray answering with two live nodes (no cluster is started)."""
    monkeypatch.setenv("RAY_ADDRESS", ADDRESS)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}, {"Alive": False}])


def test_check_counts_the_live_nodes(two_node_cluster):
    with pytest.raises(ValueError, match="the 2-node Ray cluster"):
        check_cluster_store("sqlite:////x.db", "tracking.tracking_uri")
    check_cluster_store("http://head:5000", "tracking.tracking_uri")


def test_a_study_and_a_training_run_refuse_before_writing(two_node_cluster, tmp_path, monkeypatch):
    from omgseg.platform.study.driver import run_study
    from omgseg.platform.training.train import run_training

    monkeypatch.setattr("omgseg.platform.data.prepare_data", lambda data, splits=None, progress=True: {})
    study = load_config(StudyConfig, CONFIG, [f"data.root={tmp_path / 'data'}"])
    with pytest.raises(ValueError, match="tracking.tracking_uri: a SQLite store"):
        run_study(study, tmp_path / "study")
    assert not (tmp_path / "study" / "mlflow.db").exists() and not (tmp_path / "study" / "study.json").exists()

    monkeypatch.setattr("omgseg.platform.training.train.check_inputs", lambda config: None)
    run = load_config(TrainConfig, ROOT / "studies" / "configs" / "train_tiny.yaml",
                      [f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'runs'}"])
    with pytest.raises(ValueError, match="tracking.tracking_uri: a SQLite store"):
        run_training(run, prepare=False)
    assert not (tmp_path / "runs" / "mlflow.db").exists()
