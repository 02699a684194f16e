"""A study's result tables (Polars; written as Parquet), built from its trial records.

- runs: one row per trial, with the samples each data set really gave.
- metrics: one row per (trial, eval data set, task, metric); validation losses have the query
  group as task (object_queries, prompt_queries) and the metric val_loss.
- influence: one row per (kind, source, target data set, task, metric): what adding the
  source does to the target, signed so that positive always means "helps", estimated seed by
  seed (omgseg.platform.study.stats) with its interval, p- and q-value, FCR-adjusted interval
  and minimum detectable effects before and after correction. The kinds are the study
  design's comparisons (omgseg.platform.study.design): pair, controlled, leave_one_out, and
  for a sampled design the surrogate's rows. A target only counts trials in its scope
  (plan.Target.in_scope): those that trained it.
- correlation: for every two targets, Pearson and Spearman over the trials in both scopes.
- affinity: TAG's look-ahead affinity of source on target, per trial that measured it.

Column names are lower_snake_case, types are explicit, and rows are sorted, so the same
records always give the same tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from omgseg.platform.records import NullCheck, TrialRecord
from omgseg.platform.study import surrogate
from omgseg.platform.study.design import KINDS, Combination, Comparison, StudyDesign
from omgseg.platform.study.plan import Target
from omgseg.platform.study.stats import (
    ALPHA,
    Contrast,
    aa_check,
    adjusted_alpha,
    benjamini_hochberg,
    minimum_detectable_effect,
    pairing_ratio,
    seed_contrast,
)

TABLES = ("runs", "metrics", "influence", "correlation", "affinity")

RUNS_SCHEMA = {
    "study": pl.String, "trial_id": pl.String, "combination": pl.String, "mixture": pl.String,
    "train_datasets": pl.List(pl.String),
    "mixing_ratios": pl.List(pl.Float64), "samples_per_dataset": pl.List(pl.Int64), "n_datasets": pl.Int64,
    "seed": pl.Int64, "steps": pl.Int64, "status": pl.String, "error": pl.String, "log": pl.String,
    "measures_affinity": pl.Boolean, "wall_seconds": pl.Float64, "train_seconds": pl.Float64,
    "affinity_seconds": pl.Float64, "eval_seconds": pl.Float64, "fit_seconds": pl.Float64, "mlflow_run_id": pl.String,
}
METRICS_SCHEMA = {
    "study": pl.String, "trial_id": pl.String, "combination": pl.String, "mixture": pl.String,
    "train_datasets": pl.List(pl.String),
    "seed": pl.Int64,
    "eval_dataset": pl.String, "task": pl.String, "metric": pl.String, "value": pl.Float64,
}
INFLUENCE_SCHEMA = {
    "study": pl.String, "family": pl.String, "kind": pl.String, "source_dataset": pl.String, "target_dataset": pl.String,
    "task": pl.String, "metric": pl.String, "direction": pl.String, "with_datasets": pl.List(pl.String),
    "without_datasets": pl.List(pl.String), "with_source": pl.Float64, "without_source": pl.Float64,
    "delta": pl.Float64, "relative_delta": pl.Float64, "n_seeds": pl.Int64, "seeds": pl.List(pl.Int64),
    "seed_deltas": pl.List(pl.Float64), "df": pl.Int64, "se": pl.Float64, "ci_low": pl.Float64,
    "ci_high": pl.Float64, "p_value": pl.Float64, "q_value": pl.Float64, "significant": pl.Boolean,
    "ci_low_adjusted": pl.Float64, "ci_high_adjusted": pl.Float64, "mde": pl.Float64, "mde_adjusted": pl.Float64,
    "pairing_ratio": pl.Float64, "flag": pl.String,
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
        "study": study, "trial_id": r.trial_id, "combination": r.combination, "mixture": r.mixture,
        "train_datasets": r.datasets,
        "mixing_ratios": r.ratios, "samples_per_dataset": [r.samples.get(n, 0) for n in r.datasets] if r.samples else None,
        "n_datasets": len(r.datasets), "seed": r.seed, "steps": r.steps, "status": r.status, "error": r.error,
        "log": r.log, "measures_affinity": r.measures_affinity, "wall_seconds": r.wall_seconds,
        "train_seconds": r.seconds.get("train"), "affinity_seconds": r.seconds.get("affinity"),
        "eval_seconds": r.seconds.get("eval"), "fit_seconds": r.seconds.get("fit"), "mlflow_run_id": r.mlflow_run_id,
    } for r in records]
    return pl.DataFrame(rows, schema=RUNS_SCHEMA).sort("trial_id")


def metrics_table(study: str, records: list[TrialRecord]) -> pl.DataFrame:
    """Every scalar metric of every finished trial (per-class tables stay in eval.json)."""
    rows = [{"study": study, "trial_id": r.trial_id, "combination": r.combination, "mixture": r.mixture,
             "train_datasets": r.datasets, "seed": r.seed,
             "eval_dataset": s.dataset, "task": s.task, "metric": s.metric, "value": s.value}
            for r in records for s in r.metrics.scores()]
    return pl.DataFrame(rows, schema=METRICS_SCHEMA).sort("trial_id", "eval_dataset", "task", "metric")


Cells = dict[tuple[Combination, int], float]  # (combination, seed) -> value


def target_cells(metrics: pl.DataFrame, target: Target) -> Cells:
    """{(combination, seed): value} of every finished trial of the design's combinations (not a
    ratio sweep's mixture) in the target's scope that reports it."""
    rows = metrics.filter((pl.col("eval_dataset") == target.dataset) & (pl.col("task") == target.task)
                          & (pl.col("metric") == target.metric) & pl.col("mixture").is_null())
    cells = {}
    for r in rows.iter_rows(named=True):
        combo = tuple(r["train_datasets"])
        if target.in_scope(combo):
            cells[(combo, r["seed"])] = r["value"]
    return cells


def _bounds(metric: str) -> tuple[float | None, float | None]:
    """The values a metric cannot pass: percentages [0, 100], counts and losses >= 0 (NoC >= 1)."""
    if metric.startswith("NoC@"):
        return 1.0, None
    if metric in ("val_loss", "NoF"):
        return 0.0, None
    if metric.endswith("-Decay"):
        return None, None
    return 0.0, 100.0


def bound_flag(metric: str, values: list[float]) -> str | None:
    """'floor' / 'ceiling' when every value sits at the metric's bound: a censored
    measurement, which cannot show a change, not a precise value."""
    low, high = _bounds(metric)
    if low is not None and all(v <= low for v in values):
        return "floor"
    if high is not None and all(v >= high for v in values):
        return "ceiling"
    return None


@dataclass
class InfluenceRow:
    """One row of the influence table while the table is built: its per-seed values and contrast
    and, once its family is known, its BH q-value, adjusted interval and adjusted MDE."""

    kind: str
    source: str
    target: Target
    with_combo: Combination
    without_combo: Combination
    seeds: list[int]
    differences: list[float]  # value with - value without, per seed (a surrogate row: its pseudo-values)
    with_values: list[float] | None  # per seed; None when a surrogate cannot predict the levels, only the difference
    without_values: list[float] | None
    contrast: Contrast | None
    flag: str | None
    scale: float | None = None  # the target's mean over its subsets: relative_delta's base when there are no levels
    q_value: float | None = None
    significant: bool = False
    adjusted: tuple[float, float] | None = None
    mde_adjusted: float | None = None

    def record(self, study: str) -> dict:
        c, t = self.contrast, self.target
        sign = 1.0 if t.direction == "higher" else -1.0
        n = len(self.seeds)
        with_source = sum(self.with_values) / n if self.with_values is not None else None
        without_source = sum(self.without_values) / n if self.without_values is not None else None
        base = without_source if without_source is not None else self.scale
        delta = c.estimate if c else sign * sum(self.differences) / n
        paired = self.with_values is not None and self.without_values is not None
        return {
            "study": study, "family": t.family, "kind": self.kind, "source_dataset": self.source,
            "target_dataset": t.dataset, "task": t.task, "metric": t.metric, "direction": t.direction,
            "with_datasets": list(self.with_combo), "without_datasets": list(self.without_combo),
            "with_source": with_source, "without_source": without_source, "delta": delta,
            "relative_delta": delta / abs(base) if base else None, "n_seeds": n,
            "seeds": self.seeds, "seed_deltas": [sign * d for d in self.differences],
            "df": c.df if c else None, "se": c.se if c else None, "ci_low": c.ci_low if c else None,
            "ci_high": c.ci_high if c else None, "p_value": c.p_value if c else None, "q_value": self.q_value,
            "significant": self.significant, "ci_low_adjusted": self.adjusted[0] if self.adjusted else None,
            "ci_high_adjusted": self.adjusted[1] if self.adjusted else None, "mde": c.mde if c else None,
            "mde_adjusted": self.mde_adjusted,
            "pairing_ratio": pairing_ratio(self.with_values, self.without_values) if paired else None,
            "flag": self.flag,
        }


def _row(comparison: Comparison, target: Target, seeds: list[int], differences: list[float],
         with_values: list[float] | None, without_values: list[float] | None, scale: float | None = None
         ) -> InfluenceRow | None:
    """The row of `comparison`: measured values for two trained combinations, the surrogate's
    predictions for a surrogate row (flags for a metric's bounds apply to measured values only)."""
    if not seeds:
        return None
    sign = 1.0 if target.direction == "higher" else -1.0
    measured = not comparison.kind.startswith("surrogate")
    with_flag = bound_flag(target.metric, with_values) if measured else None
    without_flag = bound_flag(target.metric, without_values) if measured else None
    contrast = None
    if with_flag and without_flag:
        flag = with_flag  # both sides censored: nothing to test
    else:
        flag = f"{with_flag or without_flag}_one_side" if (with_flag or without_flag) else None
        contrast = seed_contrast({s: sign * d for s, d in zip(seeds, differences)})
        if contrast is None:
            flag = "one_seed" if len(seeds) < 2 else "no_variance"
    return InfluenceRow(comparison.kind, comparison.source, target, comparison.with_combo, comparison.without_combo,
                        seeds, differences, with_values, without_values, contrast, flag, scale)


def _measured_row(comparison: Comparison, target: Target, cells: Cells) -> InfluenceRow | None:
    seeds = sorted(s for c, s in cells if c == comparison.with_combo and (comparison.without_combo, s) in cells)
    with_values = [cells[(comparison.with_combo, s)] for s in seeds]
    without_values = [cells[(comparison.without_combo, s)] for s in seeds]
    return _row(comparison, target, seeds, [a - b for a, b in zip(with_values, without_values)], with_values,
                without_values)


def _surrogate_rows(cells: Cells, design: StudyDesign, target: Target) -> list[InfluenceRow | None]:
    fits = surrogate.jackknife(cells, design, (target.dataset,))
    sampled = [v for (c, _), v in cells.items() if c in design.sampled]
    scale = sum(sampled) / len(sampled) if sampled else None
    rows = []
    for comparison in surrogate.comparisons(design, target.dataset):
        found = surrogate.predicted_row(fits, comparison)
        rows.append(_row(comparison, target, found.seeds, found.differences, found.with_values, found.without_values,
                         scale))
    return rows


def influence_rows(metrics: pl.DataFrame, design: StudyDesign, targets: list[Target]) -> list[InfluenceRow]:
    """Every row of the design's comparisons (design.StudyDesign.comparisons) whose two
    combinations are in the target's scope, at the seeds both were trained; with a sampled
    design, the surrogate's rows (omgseg.platform.study.surrogate). BH q-values, adjusted
    intervals and adjusted MDEs per family (primary / secondary) and kind, over the rows that
    have a p-value."""
    rows = []
    for target in targets:
        cells = target_cells(metrics, target)
        for comparison in design.comparisons(target.dataset):
            if target.in_scope(comparison.with_combo) and target.in_scope(comparison.without_combo):
                rows.append(_measured_row(comparison, target, cells))
        if design.sampled:
            rows += _surrogate_rows(cells, design, target)
    rows = [r for r in rows if r is not None]
    for family in ("primary", "secondary"):
        for kind in KINDS:
            tested = [r for r in rows if r.target.family == family and r.kind == kind and r.contrast is not None]
            q_values = benjamini_hochberg([r.contrast.p_value for r in tested])
            level = adjusted_alpha(q_values)
            for row, q in zip(tested, q_values):
                row.q_value, row.significant = q, q <= ALPHA
                row.adjusted = row.contrast.interval(level)
                row.mde_adjusted = minimum_detectable_effect(row.contrast.se, row.contrast.df, level)
    return rows


def influence_table(study: str, metrics: pl.DataFrame, design: StudyDesign, targets: list[Target]) -> pl.DataFrame:
    """The influence rows (`influence_rows`) as a table."""
    rows = [r.record(study) for r in influence_rows(metrics, design, targets)]
    return pl.DataFrame(rows, schema=INFLUENCE_SCHEMA).sort("family", "kind", "target_dataset", "task", "metric",
                                                            "source_dataset")


def correlation_table(study: str, metrics: pl.DataFrame, targets: list[Target]) -> pl.DataFrame:
    """Every two targets' Pearson and Spearman correlation (the full matrix, diagonal
    included) over the trials in both targets' scopes; null where fewer than 3 trials have
    both or a target is constant there."""
    present = []
    for t in targets:
        values = metrics.filter((pl.col("eval_dataset") == t.dataset) & (pl.col("task") == t.task)
                                & (pl.col("metric") == t.metric))
        in_scope = [t.in_scope(tuple(d)) for d in values["train_datasets"].to_list()]
        values = values.filter(pl.Series(in_scope, dtype=pl.Boolean))
        if values.height:
            present.append((t, values.select("trial_id", "value")))
    rows = []
    for a, a_values in present:
        for b, b_values in present:
            both = a_values.join(b_values, on="trial_id", suffix="_b").select(pl.col("value").alias("a"),
                                                                                pl.col("value_b").alias("b"))
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


def null_check(influence: pl.DataFrame) -> dict[str, NullCheck]:
    """The A/A check (omgseg.platform.study.stats.aa_check) of every family of the influence
    table's tested rows: the same rows, trials and model the table reports."""
    tested = influence.filter(pl.col("p_value").is_not_null())
    checks = aa_check({family: tested.filter(pl.col("family") == family)["seed_deltas"].to_list()
                       for family in ("primary", "secondary")})
    return {family: NullCheck(**check) for family, check in checks.items()}


def build_tables(study: str, records: list[TrialRecord], design: StudyDesign, targets: list[Target]) -> dict[str, pl.DataFrame]:
    finished = [r for r in records if r.status == "finished"]
    metrics = metrics_table(study, finished)
    return {
        "runs": runs_table(study, records),
        "metrics": metrics,
        "influence": influence_table(study, metrics, design, targets),
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
