"""A small study on a local Ray: every table with its schema and exact row counts, an
influence value recomputed by hand from the metrics table, MLflow parent and child runs, and
a driver killed mid-study that resumes without re-running or duplicating finished trials."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import polars as pl
import pytest
from studyfixture import SMALL, small_overrides

from omgseg.platform.records import STUDY_FILE, StudySummary
from omgseg.platform.study.results import SCHEMAS

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "studies" / "cotrain_matrix.py"


@pytest.fixture(scope="module")
def study(small_study):
    return small_study


def test_tables_have_their_schemas_and_exact_row_counts(study):
    config, result = study
    tables = {name: pl.read_parquet(path) for name, path in result.tables.items()}
    for name, frame in tables.items():
        assert dict(frame.schema) == SCHEMAS[name], name
    runs = tables["runs"]
    assert runs.height == 6 and runs["status"].to_list() == ["finished"] * 6
    assert sorted(runs["trial_id"].to_list()) == ["coco+davis-s0", "coco+davis-s1", "coco-s0", "coco-s1", "davis-s0", "davis-s1"]
    assert runs.filter(pl.col("measures_affinity"))["combination"].to_list() == ["coco+davis"] * 2
    assert (runs["train_seconds"] > 0).all() and (runs["wall_seconds"] > runs["train_seconds"]).all()
    # Equal exposure: every data set gives 4 steps x 2 clips in every combination.
    assert {r["trial_id"]: r["samples_per_dataset"] for r in runs.iter_rows(named=True)}["coco+davis-s0"] == [8, 8]
    assert all(v == [8] for v in runs.filter(pl.col("n_datasets") == 1)["samples_per_dataset"].to_list())
    metrics = tables["metrics"]
    assert set(metrics["trial_id"].unique().to_list()) == set(runs["trial_id"].to_list())
    # Targets: coco's object-query loss, davis's prompt-query loss (primary); coco PQ, coco mIoU,
    # davis J&F (secondary). pair: davis on coco x3, coco on davis x2; leave-one-out of
    # {coco, davis} is the same five.
    assert tables["influence"].height == 10
    assert set(tables["influence"].filter(pl.col("family") == "primary")["metric"].to_list()) == {"val_loss"}
    assert tables["correlation"].height == 25
    assert tables["affinity"].height == 2 * 4  # 2 trials x (2 sources x 2 targets)
    assert result.summary.estimates.n_pairs == 2
    assert {"primary/pair", "primary/leave_one_out"} <= set(result.summary.significant)
    assert StudySummary.read(result.out) == result.summary  # summary.json reads back into the same record


def test_an_influence_value_recomputed_from_the_metrics_table(study):
    _, result = study
    metrics = pl.read_parquet(result.tables["metrics"])
    influence = pl.read_parquet(result.tables["influence"])

    def value(trial: str, dataset: str, task: str, metric: str) -> float:
        return metrics.filter((pl.col("trial_id") == trial) & (pl.col("eval_dataset") == dataset) & (pl.col("task") == task)
                              & (pl.col("metric") == metric))["value"].item()

    loss = ("coco", "object_queries", "val_loss")
    deltas = [value(f"coco-s{s}", *loss) - value(f"coco+davis-s{s}", *loss) for s in (0, 1)]  # lower is better
    row = influence.filter((pl.col("kind") == "pair") & (pl.col("source_dataset") == "davis") & (pl.col("metric") == "val_loss"))
    assert row["delta"].item() == pytest.approx(sum(deltas) / 2) and row["n_seeds"].item() == 2
    baseline = (value("coco-s0", *loss) + value("coco-s1", *loss)) / 2
    assert row["relative_delta"].item() == pytest.approx(sum(deltas) / 2 / baseline)
    assert row["direction"].item() == "lower" and row["df"].item() == 1


def test_mlflow_holds_one_parent_and_a_child_per_trial(study):
    config, result = study
    client = mlflow.MlflowClient(result.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(children) == 6 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["omgseg.trial_id"] for c in children} == {f"{c}-s{s}" for c in ("coco", "davis", "coco+davis")
                                                                 for s in (0, 1)}
    tables = {a.path for a in client.list_artifacts(result.parent_run_id, "tables")}
    assert {f"tables/{t}.parquet" for t in SCHEMAS} | {"tables/summary.json"} <= tables
    child = next(c for c in children if c.data.tags["omgseg.trial_id"] == "coco+davis-s0")
    assert "affinity/coco/davis" in child.data.metrics and "coco/panoptic/PQ" in child.data.metrics


def test_a_second_run_without_resume_refuses_and_keeps_the_study(study, capsys):
    from omgseg.platform.study.driver import main

    _, result = study
    before = {p: p.stat().st_mtime_ns for p in result.tables.values()}
    assert main(["--out", str(result.out), *SMALL]) == 1
    assert "pass --resume" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in result.tables.values()} == before


def _children(uri: str, parent: str) -> list:
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("omgseg-studies")
    return client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")


def test_a_killed_driver_resumes_without_rerunning_finished_trials(study, tmp_path, study_data_root):
    _, reference = study
    out = tmp_path / "small"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    args = [sys.executable, str(SCRIPT), "--out", str(out), *small_overrides(study_data_root)]
    driver = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        finished = []
        while time.time() < deadline and driver.poll() is None:
            if (out / STUDY_FILE).is_file():
                state = json.loads((out / STUDY_FILE).read_text())
                finished = [c for c in _children(state["tracking_uri"], state["parent_run_id"]) if c.info.status == "FINISHED"]
                if finished:
                    break
            time.sleep(1)
        assert finished, "no trial finished before the deadline"
        os.kill(driver.pid, signal.SIGKILL)  # the driver dies mid-study
        driver.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)  # and its local Ray with it, as a lost machine would
    done_before = {c.data.tags["omgseg.trial_id"]: c.info.run_id for c in finished}
    records = {t: (out / "trials" / t / "trial.json").stat().st_mtime_ns for t in done_before
               if (out / "trials" / t / "trial.json").is_file()}

    resumed = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{len(done_before)} already finished" in resumed.stderr or "already finished" in resumed.stderr
    state = json.loads((out / STUDY_FILE).read_text())
    children = _children(state["tracking_uri"], state["parent_run_id"])
    assert len(children) == 6 and all(c.info.status == "FINISHED" for c in children)  # no duplicates
    after = {c.data.tags["omgseg.trial_id"]: c.info.run_id for c in children}
    assert all(after[t] == run for t, run in done_before.items())
    assert all((out / "trials" / t / "trial.json").stat().st_mtime_ns == m for t, m in records.items())  # not re-run
    for name in ("metrics", "influence", "correlation", "affinity"):
        mine = pl.read_parquet(out / f"{name}.parquet").drop("study")
        theirs = pl.read_parquet(reference.tables[name]).drop("study")
        assert mine.equals(theirs), name
    timing = ["wall_seconds", "train_seconds", "affinity_seconds", "eval_seconds", "fit_seconds", "mlflow_run_id", "log"]
    assert pl.read_parquet(out / "runs.parquet").drop(timing).equals(pl.read_parquet(reference.tables["runs"]).drop(timing))


def test_a_failing_trial_is_retried_and_reported(tmp_path, capfd):
    """One data set's train shard is damaged after conversion: its trials fail on every try and
    are 'failed' rows with the error and their log, one MLflow run each; the console names the
    error and the log; the other data set's trials finish."""
    import ray

    from omgseg.platform.config import StudyConfig, load_config
    from omgseg.platform.data import prepare_data
    from omgseg.platform.study.driver import run_study

    overrides = [f"data.root={tmp_path / 'data'}", "data.datasets={coco: {format: coco-panoptic}, broken: {format: davis, "
                 "clip_length: 4}}", "train_datasets=[coco, broken]", "metrics={panoptic: [PQ]}", "combinations=[singletons]",
                 "seeds=[0, 1]", "train.steps=2", "train.checkpoint_every=2", "train.eval_samples=1", "train.val_samples=2",
                 "evaluation={coco: [panoptic]}", "train.affinity.enabled=false", "scheduling.max_retries=1"]
    config = load_config(StudyConfig, ROOT / "studies" / "configs" / "default.yaml", overrides)
    shard = sorted(prepare_data(config.data)["broken"]["train"].glob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[:1024] = b"\xff" * 1024  # the first tar header: same size, so the cached conversion is kept
    shard.write_bytes(bytes(data))
    try:
        result = run_study(config, tmp_path / "study")
    finally:
        ray.shutdown()
    runs = pl.read_parquet(result.tables["runs"]).sort("trial_id")
    assert runs["trial_id"].to_list() == ["broken-s0", "broken-s1", "coco-s0", "coco-s1"]
    assert runs["status"].to_list() == ["failed", "failed", "finished", "finished"]
    assert "ShardReadError" in runs["error"][0] and runs["error"][2] is None
    log = Path(runs["log"][0])
    assert log.is_file() and "Traceback" in log.read_text()  # the whole story is in the trial's log
    assert {f.trial_id for f in result.summary.failed} == {"broken-s0", "broken-s1"}
    console = capfd.readouterr().err
    failures = [line for line in console.splitlines() if "FAILED broken-s0" in line]
    assert failures and "ShardReadError" in failures[0] and str(log) in failures[0]
    retries = [line for line in console.splitlines() if "retrying broken-s0" in line]
    assert retries and "ShardReadError" in retries[0]  # a retry names its cause too
    children = _children(result.tracking_uri, result.parent_run_id)
    by_trial = {}
    for child in children:
        by_trial.setdefault(child.data.tags["omgseg.trial_id"], []).append(child.info.status)
    assert by_trial == {"broken-s0": ["FAILED"], "broken-s1": ["FAILED"], "coco-s0": ["FINISHED"],
                        "coco-s1": ["FINISHED"]}  # the retry reused its run
    metrics = pl.read_parquet(result.tables["metrics"])
    assert set(metrics["trial_id"].unique().to_list()) == {"coco-s0", "coco-s1"}


def test_the_console_is_one_line_per_trial_and_a_short_frame_and_a_second_run_gives_the_same_tables(
        study, tmp_path, study_data_root):
    """Not a terminal (CI, a log file): the plan, one end line per trial, the summary; the
    libraries' logs are in the study's logs/ folder, named at the top. The run is the small
    study again, from scratch: every table equals the first run's but for timings and ids."""
    out = tmp_path / "console"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *small_overrides(study_data_root)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    console = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout[-3000:]
    trials = sorted(p.name for p in (out / "trials").iterdir() if (p / "trial.json").is_file())
    assert len(trials) == 6
    assert len(console) < 60 + len(trials), "\n".join(console)
    for trial in trials:
        assert sum(line.startswith(f"[study] finished {trial} in ") for line in console) == 1, trial
    assert str(out / "logs") in "\n".join(console[:5])  # where everything else went, said first
    assert json.loads(console[-1])["finished"] == 6  # stdout's one JSON line, for scripts
    assert all(line.startswith("[study] ") for line in console[:-1]), [x for x in console if not x.startswith("[study] ")]
    assert (out / "logs" / "driver.log").is_file() and len(list((out / "logs").glob("*.log"))) > len(trials)
    _, reference = study
    for name in ("metrics", "influence", "correlation", "affinity"):
        assert pl.read_parquet(out / f"{name}.parquet").equals(pl.read_parquet(reference.tables[name])), name
    timing = ["wall_seconds", "train_seconds", "affinity_seconds", "eval_seconds", "fit_seconds", "mlflow_run_id", "log"]
    assert pl.read_parquet(out / "runs.parquet").drop(timing).equals(pl.read_parquet(reference.tables["runs"]).drop(timing))
