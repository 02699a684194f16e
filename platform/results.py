"""A study's result tables (Polars; written as Parquet), built from its trial records.

- runs: one row per trial.
- metrics: one row per (trial, eval data set, task, metric).
- influence: one row per (kind, source data set, target data set, task, metric): what adding
  the source does to the target's metric, paired by seed. kind "pair": the run on {source,
  target} minus the run on {target}; kind "leave_one_out": the run on every train data set
  minus the run without the source (targets may be evaluation-only data sets there).
- correlation: for every two (data set, task, metric) targets, Pearson and Spearman over trials.
- affinity: TAG's look-ahead affinity of source on target, per trial that measured it.

Column names are lower_snake_case, types are explicit, and rows are sorted, so the same
records always give the same tables.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import polars as pl
from scipy import stats

TABLES = ("runs", "metrics", "influence", "correlation", "affinity")


@dataclass
class TrialRecord:
    """What a finished (or failed) trial leaves behind; stored as trial.json with its MLflow run."""

    trial_id: str
    combination: str  # "coco+vipseg"
    datasets: list[str]
    ratios: list[float]  # normalised, in the order of `datasets`
    seed: int
    steps: int
    status: str  # "finished" or "failed"
    mlflow_run_id: str | None = None
    error: str | None = None
    measures_affinity: bool = False
    wall_seconds: float = 0.0  # the trial function, start to end (Ray start-up of the trial included)
    seconds: dict[str, float] = field(default_factory=dict)  # "train" (inside steps), "affinity", "eval", "fit"
    metrics: dict[str, dict[str, dict]] = field(default_factory=dict)  # {data set: {task: {metric: value}}}
    affinity: dict[str, dict[str, float]] = field(default_factory=dict)  # {source: {target: mean Z}}
    reads: list[dict] = field(default_factory=list)  # per rank: node, sample counts, shards read (train.READS_FILE)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> TrialRecord:
        return cls(**data)


RUNS_SCHEMA = {
    "study": pl.String, "trial_id": pl.String, "combination": pl.String, "train_datasets": pl.List(pl.String),
    "mixing_ratios": pl.List(pl.Float64), "n_datasets": pl.Int64, "seed": pl.Int64, "steps": pl.Int64,
    "status": pl.String, "error": pl.String, "measures_affinity": pl.Boolean, "wall_seconds": pl.Float64,
    "train_seconds": pl.Float64, "affinity_seconds": pl.Float64, "eval_seconds": pl.Float64,
    "fit_seconds": pl.Float64, "mlflow_run_id": pl.String,
}
METRICS_SCHEMA = {
    "study": pl.String, "trial_id": pl.String, "combination": pl.String, "seed": pl.Int64,
    "eval_dataset": pl.String, "task": pl.String, "metric": pl.String, "value": pl.Float64,
}
INFLUENCE_SCHEMA = {
    "study": pl.String, "kind": pl.String, "source_dataset": pl.String, "target_dataset": pl.String,
    "task": pl.String, "metric": pl.String, "with_source": pl.Float64, "without_source": pl.Float64,
    "delta": pl.Float64, "relative_delta": pl.Float64, "n_seeds": pl.Int64, "ci_low": pl.Float64,
    "ci_high": pl.Float64,
}
CORRELATION_SCHEMA = {
    "study": pl.String, "dataset_a": pl.String, "task_a": pl.String, "metric_a": pl.String,
    "dataset_b": pl.String, "task_b": pl.String, "metric_b": pl.String, "pearson": pl.Float64,
    "spearman": pl.Float64, "n_trials": pl.Int64,
}
AFFINITY_SCHEMA = {
    "study": pl.String, "trial_id": pl.String, "seed": pl.Int64, "source_dataset": pl.String,
    "target_dataset": pl.String, "affinity": pl.Float64,
}
SCHEMAS = {"runs": RUNS_SCHEMA, "metrics": METRICS_SCHEMA, "influence": INFLUENCE_SCHEMA,
           "correlation": CORRELATION_SCHEMA, "affinity": AFFINITY_SCHEMA}


def runs_table(study: str, records: list[TrialRecord]) -> pl.DataFrame:
    rows = [{
        "study": study, "trial_id": r.trial_id, "combination": r.combination, "train_datasets": r.datasets,
        "mixing_ratios": r.ratios, "n_datasets": len(r.datasets), "seed": r.seed, "steps": r.steps,
        "status": r.status, "error": r.error, "measures_affinity": r.measures_affinity,
        "wall_seconds": r.wall_seconds, "train_seconds": r.seconds.get("train"),
        "affinity_seconds": r.seconds.get("affinity"), "eval_seconds": r.seconds.get("eval"),
        "fit_seconds": r.seconds.get("fit"), "mlflow_run_id": r.mlflow_run_id,
    } for r in records]
    return pl.DataFrame(rows, schema=RUNS_SCHEMA).sort("trial_id")


def metrics_table(study: str, records: list[TrialRecord]) -> pl.DataFrame:
    """Every scalar metric of every finished trial (per-class tables stay in eval.json)."""
    rows = []
    for r in records:
        for dataset, tasks in r.metrics.items():
            for task, values in tasks.items():
                for metric, value in values.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        rows.append({"study": study, "trial_id": r.trial_id, "combination": r.combination, "seed": r.seed,
                                     "eval_dataset": dataset, "task": task, "metric": metric, "value": float(value)})
    return pl.DataFrame(rows, schema=METRICS_SCHEMA).sort("trial_id", "eval_dataset", "task", "metric")


def _combination(names) -> str:
    return "+".join(names)


def _paired(metrics: pl.DataFrame, with_combo: str, without_combo: str, dataset: str, task: str,
            metric: str) -> tuple[list[float], list[float]]:
    """Values of the two combinations on one target, for the seeds both have."""
    target = metrics.filter((pl.col("eval_dataset") == dataset) & (pl.col("task") == task) & (pl.col("metric") == metric))
    a = target.filter(pl.col("combination") == with_combo).select("seed", "value")
    b = target.filter(pl.col("combination") == without_combo).select("seed", "value")
    both = a.join(b, on="seed", suffix="_without").sort("seed")
    return both["value"].to_list(), both["value_without"].to_list()


def _influence_row(study, kind, source, dataset, task, metric, with_values, without_values) -> dict | None:
    n = len(with_values)
    if n == 0:
        return None
    deltas = [a - b for a, b in zip(with_values, without_values)]
    mean = sum(deltas) / n
    baseline = sum(without_values) / n
    low = high = None
    if n >= 2:
        sd = math.sqrt(sum((d - mean) ** 2 for d in deltas) / (n - 1))
        half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)  # 95 % t interval over seeds
        low, high = mean - half, mean + half
    return {
        "study": study, "kind": kind, "source_dataset": source, "target_dataset": dataset, "task": task,
        "metric": metric, "with_source": sum(with_values) / n, "without_source": baseline, "delta": mean,
        "relative_delta": mean / abs(baseline) if baseline != 0 else None, "n_seeds": n, "ci_low": low, "ci_high": high,
    }


def influence_table(study: str, metrics: pl.DataFrame, train_datasets: list[str],
                    targets: list[tuple[str, str, str]]) -> pl.DataFrame:
    """targets: (eval data set, task, metric). Pair rows need runs on {target} and {source,
    target}; leave-one-out rows need runs on every train data set and on all but the source."""
    rows = []
    combos = set(metrics["combination"].unique().to_list()) if metrics.height else set()
    everything = _combination(train_datasets)
    for dataset, task, metric in targets:
        for source in train_datasets:
            if source == dataset:
                continue
            if dataset in train_datasets:
                pair = _combination(n for n in train_datasets if n in (source, dataset))
                if pair in combos and dataset in combos:
                    row = _influence_row(study, "pair", source, dataset, task, metric,
                                         *_paired(metrics, pair, dataset, dataset, task, metric))
                    rows.append(row)
            rest = _combination(n for n in train_datasets if n != source)
            if len(train_datasets) > 1 and everything in combos and rest in combos:
                rows.append(_influence_row(study, "leave_one_out", source, dataset, task, metric,
                                           *_paired(metrics, everything, rest, dataset, task, metric)))
    rows = [r for r in rows if r is not None]
    return pl.DataFrame(rows, schema=INFLUENCE_SCHEMA).sort("kind", "target_dataset", "task", "metric", "source_dataset")


def correlation_table(study: str, metrics: pl.DataFrame, targets: list[tuple[str, str, str]]) -> pl.DataFrame:
    """Across trials, every two targets' Pearson and Spearman correlation (the full matrix,
    diagonal included); null where fewer than 3 trials have both or a target is constant."""
    present = []
    wide = metrics.select("trial_id").unique()
    for dataset, task, metric in targets:
        values = metrics.filter((pl.col("eval_dataset") == dataset) & (pl.col("task") == task) & (pl.col("metric") == metric))
        if values.height:
            column = f"{dataset}/{task}/{metric}"
            wide = wide.join(values.select("trial_id", pl.col("value").alias(column)), on="trial_id", how="left")
            present.append((dataset, task, metric, column))
    rows = []
    for a_dataset, a_task, a_metric, a in present:
        for b_dataset, b_task, b_metric, b in present:
            both = wide.select(pl.col(a).alias("a"), pl.col(b).alias("b")).drop_nulls()
            pearson = spearman = None
            if both.height >= 3:
                out = both.select(pl.corr("a", "b", method="pearson"), pl.corr("a", "b", method="spearman").alias("s"))
                pearson, spearman = _finite(out[0, 0]), _finite(out[0, 1])
            rows.append({"study": study, "dataset_a": a_dataset, "task_a": a_task, "metric_a": a_metric,
                         "dataset_b": b_dataset, "task_b": b_task, "metric_b": b_metric, "pearson": pearson,
                         "spearman": spearman, "n_trials": both.height})
    return pl.DataFrame(rows, schema=CORRELATION_SCHEMA).sort("dataset_a", "task_a", "metric_a", "dataset_b", "task_b", "metric_b")


def _finite(value) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def affinity_table(study: str, records: list[TrialRecord]) -> pl.DataFrame:
    rows = [{"study": study, "trial_id": r.trial_id, "seed": r.seed, "source_dataset": s, "target_dataset": t, "affinity": z}
            for r in records if r.status == "finished" for s, row in r.affinity.items() for t, z in row.items()]
    return pl.DataFrame(rows, schema=AFFINITY_SCHEMA).sort("trial_id", "source_dataset", "target_dataset")


def compare_estimates(influence: pl.DataFrame, affinity: pl.DataFrame, runs: pl.DataFrame) -> dict:
    """The cheap estimate against the exhaustive one: Spearman rank correlation over ordered
    (source, target) pairs of data sets, between the mean look-ahead affinity and the pair
    influence (mean relative delta over the target's metrics); and the cost of each in
    trial-hours (exhaustive: the singleton and pair trials; cheap: the trials that measured
    affinity)."""
    pairs = influence.filter((pl.col("kind") == "pair") & pl.col("relative_delta").is_not_null())
    exhaustive = pairs.group_by("source_dataset", "target_dataset").agg(pl.col("relative_delta").mean().alias("influence"))
    cheap = (affinity.filter(pl.col("source_dataset") != pl.col("target_dataset"))
             .group_by("source_dataset", "target_dataset").agg(pl.col("affinity").mean()))
    both = exhaustive.join(cheap, on=["source_dataset", "target_dataset"]).sort("source_dataset", "target_dataset")
    rho = None
    if both.height >= 3:
        rho = _finite(both.select(pl.corr("influence", "affinity", method="spearman"))[0, 0])
    finished = runs.filter(pl.col("status") == "finished")
    hours = lambda frame: float(frame["wall_seconds"].sum()) / 3600  # noqa: E731
    return {
        "spearman": rho,
        "n_pairs": both.height,
        "pairs": both.to_dicts(),
        "exhaustive_trial_hours": hours(finished.filter(pl.col("n_datasets") <= 2)),
        "affinity_trial_hours": hours(finished.filter(pl.col("measures_affinity"))),
        "all_trial_hours": hours(finished),
    }


def build_tables(study: str, records: list[TrialRecord], train_datasets: list[str],
                 targets: list[tuple[str, str, str]]) -> dict[str, pl.DataFrame]:
    finished = [r for r in records if r.status == "finished"]
    metrics = metrics_table(study, finished)
    return {
        "runs": runs_table(study, records),
        "metrics": metrics,
        "influence": influence_table(study, metrics, train_datasets, targets),
        "correlation": correlation_table(study, metrics, targets),
        "affinity": affinity_table(study, finished),
    }


def write_tables(tables: dict[str, pl.DataFrame], folder: Path) -> dict[str, Path]:
    """<folder>/<name>.parquet for each table, each written to a temporary name and renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, frame in tables.items():
        path = folder / f"{name}.parquet"
        partial = folder / f".{name}.parquet.partial"
        frame.write_parquet(partial)
        partial.replace(path)
        paths[name] = path
    return paths
