"""`omgseg train` and `omgseg study` as a user runs them: from a working directory that is not
the repository, with a config whose paths are relative; and a failing worker reported as one
line with the path of its log."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import yaml

ROOT = Path(__file__).resolve().parents[2]
OMGSEG = [sys.executable, "-m", "omgseg.platform.cli"]
SMALL_TRAIN = ["steps=4", "log_every=2", "checkpoint_every=2", "evaluation={coco: [panoptic]}", "eval_samples=1",
               "val_samples=2", "mix={coco: 1, davis: 1}"]


def _env() -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled"}


def _relative_config(folder: Path, name: str, **changes) -> Path:
    """A copy of a shipped config in `folder`, its data and outputs under relative paths."""
    config = yaml.safe_load((ROOT / "studies" / "configs" / name).read_text())
    config["data"]["root"] = "data"
    config.update(changes)
    path = folder / "configs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return Path("configs") / name  # relative to `folder`, as a user would type it


def test_train_with_relative_paths_from_another_folder(tmp_path, study_data_root):
    config = _relative_config(tmp_path, "train_tiny.yaml", output_dir="runs")
    (tmp_path / "data").symlink_to(study_data_root)  # the prepared shards, found through the relative root
    done = subprocess.run([*OMGSEG, "train", "--config", str(config), *SMALL_TRAIN], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    checkpoint = Path(result["checkpoint"])
    assert checkpoint.is_file() and checkpoint.is_relative_to(tmp_path / "runs")
    assert (tmp_path / "runs" / "train_tiny" / "latest" / "model.pt").is_file()
    assert f"model: {checkpoint}" in done.stderr and "mlflow ui --backend-store-uri sqlite:///" in done.stderr
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("omgseg").experiment_id])
    assert len(runs) == 1 and runs[0].data.params["data.root"] == str(tmp_path / "data")  # MLflow records it resolved
    assert len(done.stderr.splitlines()) < 30, done.stderr  # progress and results, not the workers' logs


def test_study_with_relative_paths_from_another_folder(tmp_path, study_data_root):
    config = _relative_config(tmp_path, "default.yaml")
    (tmp_path / "data").symlink_to(study_data_root)
    overrides = ["train_datasets=[coco, davis]", "seeds=[0, 1]", "combinations=[singletons]", "train.steps=2",
                 "train.eval_samples=1", "train.val_samples=2", "evaluation={coco: [panoptic]}",
                 "train.affinity.enabled=false"]
    done = subprocess.run([sys.executable, str(ROOT / "studies" / "cotrain_matrix.py"), "--config", str(config),
                           "--out", "study", *overrides], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "study" / "influence.parquet").is_file() and (tmp_path / "study" / "mlflow.db").is_file()
    state = json.loads((tmp_path / "study" / "study.json").read_text())
    assert state["config"]["data"]["root"] == str(tmp_path / "data")


def test_a_failing_worker_is_one_line_with_its_log(tmp_path, study_data_root):
    """A damaged train shard: every worker fails; the driver prints one line with the error and
    the log's path, and exits 1."""
    data = tmp_path / "data"
    shards = data / "shards" / "davis" / "train"
    shards.mkdir(parents=True)
    for item in (study_data_root / "shards" / "davis" / "train").iterdir():
        (shards / item.name).write_bytes(item.read_bytes())
    for name in ("coco", "ade", "vipseg", "ytvis"):
        (data / "shards" / name).symlink_to(study_data_root / "shards" / name)
    (data / "synth").symlink_to(study_data_root / "synth")
    shard = sorted(shards.glob("*.tar"))[0]
    broken = bytearray(shard.read_bytes())
    broken[:1024] = b"\xff" * 1024  # the first tar header: same size, so the cached conversion is kept
    shard.write_bytes(bytes(broken))
    config = _relative_config(tmp_path, "train_tiny.yaml", output_dir="runs", max_failures=0)
    done = subprocess.run([*OMGSEG, "train", "--config", str(config), *SMALL_TRAIN], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("omgseg train: error:")]
    assert len(errors) == 1 and "failed:" in errors[0] and "full log:" in errors[0], done.stderr[-3000:]
    log = Path(errors[0].split("full log: ")[1].split(";")[0])
    assert log.is_file() and "Traceback" in log.read_text()
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) < 15, done.stderr
