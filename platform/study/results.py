"""A study's result tables (Polars; written as Parquet), built from its trial records.

- runs: one row per trial, with the samples each data set really gave.
- metrics: one row per (trial, eval data set, task, metric); validation losses have the query
  group as task (object_queries, prompt_queries) and the metric val_loss.
- influence: one row per (kind, source, target data set, task, metric): what adding the
  source does to the target, signed so that positive always means "helps", with the seed-
  blocked model's interval, p- and q-value, FCR-adjusted interval and minimum detectable
  effect (omgseg.platform.study.stats). kind "pair": {source, target} against {target}; kind
  "controlled" (a study with a `control`): {source, target} against {target, control}, so
  what any added data set does cancels; kind "leave_one_out": every train data set against
  all but the source (targets may be evaluation-only data sets there).
- correlation: for every two targets, Pearson and Spearman over trials.
- affinity: TAG's look-ahead affinity of source on target, per trial that measured it.

Column names are lower_snake_case, types are explicit, and rows are sorted, so the same
records always give the same tables.
"""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl

from omgseg.platform.records import TrialRecord
from omgseg.platform.study.plan import Target, combination_name, with_control
from omgseg.platform.study.stats import ALPHA, BlockedFit, aa_check, adjusted_alpha, benjamini_hochberg, pairing_ratio

TABLES = ("runs", "metrics", "influence", "correlation", "affinity")
KINDS = ("pair", "controlled", "leave_one_out")  # the influence table's row kinds

RUNS_SCHEMA = {
    "study": pl.String, "trial_id": pl.String, "combination": pl.String, "train_datasets": pl.List(pl.String),
    "mixing_ratios": pl.List(pl.Float64), "samples_per_dataset": pl.List(pl.Int64), "n_datasets": pl.Int64,
    "seed": pl.Int64, "steps": pl.Int64, "status": pl.String, "error": pl.String, "log": pl.String,
    "measures_affinity": pl.Boolean, "wall_seconds": pl.Float64, "train_seconds": pl.Float64,
    "affinity_seconds": pl.Float64, "eval_seconds": pl.Float64, "fit_seconds": pl.Float64, "mlflow_run_id": pl.String,
}
METRICS_SCHEMA = {
    "study": pl.String, "trial_id": pl.String, "combination": pl.String, "seed": pl.Int64,
    "eval_dataset": pl.String, "task": pl.String, "metric": pl.String, "value": pl.Float64,
}
INFLUENCE_SCHEMA = {
    "study": pl.String, "family": pl.String, "kind": pl.String, "source_dataset": pl.String, "target_dataset": pl.String,
    "task": pl.String, "metric": pl.String, "direction": pl.String, "with_source": pl.Float64,
    "without_source": pl.Float64, "delta": pl.Float64, "relative_delta": pl.Float64, "n_seeds": pl.Int64,
    "df": pl.Int64, "se": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64, "p_value": pl.Float64,
    "q_value": pl.Float64, "significant": pl.Boolean, "ci_low_adjusted": pl.Float64, "ci_high_adjusted": pl.Float64,
    "mde": pl.Float64, "pairing_ratio": pl.Float64, "flag": pl.String,
}
CORRELATION_SCHEMA = {
    "study": pl.String, "dataset_a": pl.String, "task_a": pl.String, "metric_a": pl.String,
    "dataset_b": pl.String, "task_b": pl.String, "metric_b": pl.String, "pearson": pl.Float64,
    "spearman": pl.Float64, "n_trials": pl.Int64,
}
AFFINITY_SCHEMA = {
    "study": pl.String, "trial_id": pl.String, "seed": pl.Int64, "source_dataset": pl.String,
    "target_dataset": pl.String, "affinity": pl.Float64, "affinity_se": pl.Float64,
}
SCHEMAS = {"runs": RUNS_SCHEMA, "metrics": METRICS_SCHEMA, "influence": INFLUENCE_SCHEMA,
           "correlation": CORRELATION_SCHEMA, "affinity": AFFINITY_SCHEMA}


def runs_table(study: str, records: list[TrialRecord]) -> pl.DataFrame:
    rows = [{
        "study": study, "trial_id": r.trial_id, "combination": r.combination, "train_datasets": r.datasets,
        "mixing_ratios": r.ratios, "samples_per_dataset": [r.samples[n] for n in r.datasets] if r.samples else None,
        "n_datasets": len(r.datasets), "seed": r.seed, "steps": r.steps, "status": r.status, "error": r.error,
        "log": r.log, "measures_affinity": r.measures_affinity, "wall_seconds": r.wall_seconds,
        "train_seconds": r.seconds.get("train"), "affinity_seconds": r.seconds.get("affinity"),
        "eval_seconds": r.seconds.get("eval"), "fit_seconds": r.seconds.get("fit"), "mlflow_run_id": r.mlflow_run_id,
    } for r in records]
    return pl.DataFrame(rows, schema=RUNS_SCHEMA).sort("trial_id")


def metrics_table(study: str, records: list[TrialRecord]) -> pl.DataFrame:
    """Every scalar metric of every finished trial (per-class tables stay in eval.json)."""
    rows = [{"study": study, "trial_id": r.trial_id, "combination": r.combination, "seed": r.seed,
             "eval_dataset": s.dataset, "task": s.task, "metric": s.metric, "value": s.value}
            for r in records for s in r.metrics.scores()]
    return pl.DataFrame(rows, schema=METRICS_SCHEMA).sort("trial_id", "eval_dataset", "task", "metric")


def target_cells(metrics: pl.DataFrame, target: Target) -> list[tuple[str, int, float]]:
    """(combination, seed, value) of every finished trial that reports `target`."""
    rows = metrics.filter((pl.col("eval_dataset") == target.dataset) & (pl.col("task") == target.task)
                          & (pl.col("metric") == target.metric))
    return [(r["combination"], r["seed"], r["value"]) for r in rows.sort("combination", "seed").iter_rows(named=True)]


def _bounds(metric: str) -> tuple[float | None, float | None]:
    """The values a metric cannot pass: percentages [0, 100], counts and losses >= 0 (NoC >= 1)."""
    if metric.startswith("NoC@"):
        return 1.0, None
    if metric in ("val_loss", "NoF"):
        return 0.0, None
    if metric.endswith("-Decay"):
        return None, None
    return 0.0, 100.0


def _flag(metric: str, with_values: list[float], without_values: list[float]) -> str | None:
    """'floor' / 'ceiling' when every value of one side sits at the metric's bound: the metric
    cannot show a change there (a censored measurement, not a precise zero)."""
    low, high = _bounds(metric)
    for values in (with_values, without_values):
        if low is not None and all(v <= low for v in values):
            return "floor"
        if high is not None and all(v >= high for v in values):
            return "ceiling"
    return None


def _influence_row(study: str, kind: str, source: str, target: Target, fit: BlockedFit,
                   cells: list[tuple[str, int, float]], with_combo: str, without_combo: str) -> dict | None:
    by_seed = {(c, s): v for c, s, v in cells}
    seeds = sorted(s for c, s in by_seed if c == with_combo and (without_combo, s) in by_seed)
    if not seeds:
        return None
    with_values = [by_seed[(with_combo, s)] for s in seeds]
    without_values = [by_seed[(without_combo, s)] for s in seeds]
    sign = 1.0 if target.direction == "higher" else -1.0
    baseline = sum(without_values) / len(seeds)
    paired = sign * sum(a - b for a, b in zip(with_values, without_values)) / len(seeds)
    flag = _flag(target.metric, with_values, without_values)
    contrast = None if flag else fit.contrast({with_combo: sign, without_combo: -sign})
    if contrast is None and flag is None:
        flag = "one_seed" if len(seeds) < 2 else "no_variance"
    delta = contrast.estimate if contrast is not None else paired
    return {
        "study": study, "family": target.family, "kind": kind, "source_dataset": source, "target_dataset": target.dataset,
        "task": target.task, "metric": target.metric, "direction": target.direction,
        "with_source": sum(with_values) / len(seeds), "without_source": baseline, "delta": delta,
        "relative_delta": delta / abs(baseline) if baseline != 0 else None, "n_seeds": len(seeds),
        "df": contrast.df if contrast else None, "se": contrast.se if contrast else None,
        "ci_low": contrast.ci_low if contrast else None, "ci_high": contrast.ci_high if contrast else None,
        "p_value": contrast.p_value if contrast else None, "q_value": None, "significant": False,
        "ci_low_adjusted": None, "ci_high_adjusted": None, "mde": contrast.mde if contrast else None,
        "pairing_ratio": pairing_ratio(with_values, without_values), "flag": flag, "_contrast": contrast,
    }


def influence_table(study: str, metrics: pl.DataFrame, train_datasets: list[str], targets: list[Target],
                    control: str | None = None) -> pl.DataFrame:
    """Pair rows need runs on {target} and {source, target}; controlled rows on {target,
    control} and {source, target}; leave-one-out rows need runs on every train data set and on
    all but the source. Each target's rows come from one blocked
    fit over all the combinations that contain it (every combination, for an evaluation-only
    target); q-values and adjusted intervals are per
    family (primary / secondary) and kind, over the rows that have a p-value."""
    rows = []
    combos = set(metrics["combination"].unique().to_list()) if metrics.height else set()
    everything = combination_name(train_datasets)
    for target in targets:
        cells = target_cells(metrics, target)
        if target.dataset in train_datasets:  # the combinations that contain it (all of them for an eval-only target)
            cells = [cell for cell in cells if target.dataset in cell[0].split("+")]
        if not cells:
            continue
        fit = BlockedFit(cells)
        for source in train_datasets:
            if source == target.dataset:
                continue
            if target.dataset in train_datasets:
                pair = combination_name(n for n in train_datasets if n in (source, target.dataset))
                if pair in combos and target.dataset in combos:
                    rows.append(_influence_row(study, "pair", source, target, fit, cells, pair, target.dataset))
                controlled = combination_name(with_control(target.dataset, control)) if control else None
                if pair in combos and controlled in combos:
                    rows.append(_influence_row(study, "controlled", source, target, fit, cells, pair, controlled))
            rest = combination_name(n for n in train_datasets if n != source)
            if len(train_datasets) > 1 and everything in combos and rest in combos:
                rows.append(_influence_row(study, "leave_one_out", source, target, fit, cells, everything, rest))
    rows = [r for r in rows if r is not None]
    for family in ("primary", "secondary"):
        for kind in KINDS:
            tested = [r for r in rows if r["family"] == family and r["kind"] == kind and r["_contrast"] is not None]
            q_values = benjamini_hochberg([r["p_value"] for r in tested])
            level = adjusted_alpha(q_values)
            for row, q in zip(tested, q_values):
                row["q_value"], row["significant"] = q, q <= ALPHA
                row["ci_low_adjusted"], row["ci_high_adjusted"] = row["_contrast"].interval(level)
    for row in rows:
        del row["_contrast"]
    return pl.DataFrame(rows, schema=INFLUENCE_SCHEMA).sort("family", "kind", "target_dataset", "task", "metric",
                                                            "source_dataset")


def correlation_table(study: str, metrics: pl.DataFrame, targets: list[Target]) -> pl.DataFrame:
    """Across trials, every two targets' Pearson and Spearman correlation (the full matrix,
    diagonal included); null where fewer than 3 trials have both or a target is constant."""
    present = []
    wide = metrics.select("trial_id").unique()
    for t in targets:
        values = metrics.filter((pl.col("eval_dataset") == t.dataset) & (pl.col("task") == t.task)
                                & (pl.col("metric") == t.metric))
        if values.height:
            column = f"{t.dataset}/{t.task}/{t.metric}"
            wide = wide.join(values.select("trial_id", pl.col("value").alias(column)), on="trial_id", how="left")
            present.append((t, column))
    rows = []
    for a, a_column in present:
        for b, b_column in present:
            both = wide.select(pl.col(a_column).alias("a"), pl.col(b_column).alias("b")).drop_nulls()
            pearson = spearman = None
            if both.height >= 3:
                out = both.select(pl.corr("a", "b", method="pearson"), pl.corr("a", "b", method="spearman").alias("s"))
                pearson, spearman = _finite(out[0, 0]), _finite(out[0, 1])
            rows.append({"study": study, "dataset_a": a.dataset, "task_a": a.task, "metric_a": a.metric,
                         "dataset_b": b.dataset, "task_b": b.task, "metric_b": b.metric, "pearson": pearson,
                         "spearman": spearman, "n_trials": both.height})
    return pl.DataFrame(rows, schema=CORRELATION_SCHEMA).sort("dataset_a", "task_a", "metric_a", "dataset_b", "task_b", "metric_b")


def _finite(value) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def affinity_table(study: str, records: list[TrialRecord]) -> pl.DataFrame:
    rows = [{"study": study, "trial_id": r.trial_id, "seed": r.seed, "source_dataset": s, "target_dataset": t,
             "affinity": z, "affinity_se": r.affinity_se.get(s, {}).get(t)}
            for r in records if r.status == "finished" for s, row in r.affinity.items() for t, z in row.items()]
    return pl.DataFrame(rows, schema=AFFINITY_SCHEMA).sort("trial_id", "source_dataset", "target_dataset")


def null_check(metrics: pl.DataFrame, targets: list[Target]) -> dict:
    """The A/A check of every family of targets (omgseg.platform.study.stats.aa_check), without the
    combinations where a target sits at its floor or ceiling in every seed (nothing to split)."""
    families: dict[str, list] = {"primary": [], "secondary": []}
    for target in targets:
        cells = target_cells(metrics, target)
        censored = {c for c in {c for c, _, _ in cells}
                    if _flag(target.metric, [v for k, _, v in cells if k == c], [v for k, _, v in cells if k == c])}
        kept = [cell for cell in cells if cell[0] not in censored]
        if kept:
            families[target.family].append(kept)
    return aa_check(families)


def build_tables(study: str, records: list[TrialRecord], train_datasets: list[str],
                 targets: list[Target], control: str | None = None) -> dict[str, pl.DataFrame]:
    finished = [r for r in records if r.status == "finished"]
    metrics = metrics_table(study, finished)
    return {
        "runs": runs_table(study, records),
        "metrics": metrics,
        "influence": influence_table(study, metrics, train_datasets, targets, control),
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
