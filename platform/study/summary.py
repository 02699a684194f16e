"""The end of a study: its result tables, summary.json (significance counts, the A/A check, the
planted check, the cheap estimate against the exhaustive one, timings) and the lines the
driver prints about them. Everything here runs after the last trial, in the driver, without Ray."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from omgseg.platform.config import StudyConfig
from omgseg.platform.console import say
from omgseg.platform.records import FailedTrial, Recommendation, RowCounts, StudySummary, SurrogateFit, TrialRecord
from omgseg.platform.study.design import KINDS, StudyDesign
from omgseg.platform.study.estimates import compare_estimates, planted_check
from omgseg.platform.study.plan import Target, targets
from omgseg.platform.study.results import TABLES, build_tables, null_check, target_cells, write_tables
from omgseg.platform.study.surrogate import predictive_fit
from omgseg.platform.tracking import close_study_run


def _say(text: str) -> None:
    say(text, prefix="[study]")


@dataclass
class StudyResult:
    out: Path
    parent_run_id: str
    tracking_uri: str
    tables: dict[str, Path]
    summary: StudySummary


def finish_study(config: StudyConfig, out: Path, uri: str, parent_run_id: str, records: list[TrialRecord],
                 seconds: dict[str, float], slots: int) -> StudyResult:
    """Writes the tables and summary.json (replaced whole, never half-written) and logs both to
    the MLflow parent run, which it closes."""
    started = time.perf_counter()
    goals = targets(config)
    design = StudyDesign.from_config(config)
    tables = build_tables(config.name, records, design, goals)
    paths = write_tables(tables, out)
    influence = tables["influence"]
    finished = [r for r in records if r.status == "finished"]
    primary_pairs = influence.filter((pl.col("kind") == "pair") & (pl.col("family") == "primary"))
    summary = StudySummary(
        study=config.name, commit=code_commit(), trials=len(records), finished=len(finished),
        failed=[FailedTrial(r.trial_id, r.error, r.log) for r in records if r.status != "finished"],
        seeds=len(config.seeds), budget=config.budget,
        significant={f"{family}/{kind}": RowCounts(
            rows=rows.height, tested=int(rows["p_value"].is_not_null().sum()),
            significant_after_correction=int(rows["significant"].sum()), median_mde=rows["mde"].median(),
            median_mde_adjusted=rows["mde_adjusted"].median()) for (family, kind), rows in _groups(influence)},
        null_check=null_check(influence),
        pairing_ratio_median=primary_pairs["pairing_ratio"].median() if primary_pairs.height else None,
        estimates=compare_estimates(records, tables["metrics"], goals, design, config.seeds),
        tables={k: str(v) for k, v in paths.items()}, tracking_uri=uri, parent_run_id=parent_run_id,
        driver_seconds=seconds, concurrent_trials=slots,
        planted=planted_check(influence, config.planted, design.checked_kind) if config.planted else None,
        surrogate=[_surrogate_fit(tables["metrics"], design, t) for t in goals if t.primary] if design.sampled else [],
        recommendations=_recommendations(config, out),
    )
    seconds["tables"] = time.perf_counter() - started
    summary_file = summary.write(out)
    estimates = summary.estimates
    values = {"trials_finished": summary.finished, "trials_failed": len(summary.failed),
              "exhaustive_trial_hours": estimates.exhaustive_trial_hours,
              "affinity_trial_hours": estimates.affinity_trial_hours}
    if estimates.spearman is not None:
        values["affinity_vs_influence_spearman"] = estimates.spearman
    close_study_run(uri, parent_run_id, [paths[name] for name in TABLES] + [summary_file], values,
                    failed=bool(summary.failed))
    return StudyResult(out=out, parent_run_id=parent_run_id, tracking_uri=uri, tables=paths, summary=summary)


def _recommendations(config: StudyConfig, out: Path) -> list[Recommendation]:
    """The config's `recommend` objectives, from the tables just written; one that cannot be made
    (no trial reports its targets) is said, not fatal."""
    from omgseg.platform.study.recommend import recommend

    found = []
    for objective in config.recommend.objectives if config.recommend else []:
        try:
            found.append(recommend(out, objective))
        except ValueError as err:
            _say(f"no recommendation: {err}")
    return found


def _surrogate_fit(metrics: pl.DataFrame, design: StudyDesign, target: Target) -> SurrogateFit:
    fit = predictive_fit(target_cells(metrics, target), design, target.dataset)
    return SurrogateFit(target.dataset, target.task, target.metric, fit.subsets, fit.parameters, fit.rmse, fit.r2)


def code_commit() -> str | None:
    """The git commit of the code that runs the study ('-dirty' appended when it has
    uncommitted changes), or None outside a git checkout (an installed wheel)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                               text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.strip() + ("-dirty" if dirty.strip() else "")


def _groups(influence: pl.DataFrame):
    """((family, kind), rows) of the influence table's non-empty groups."""
    for family in ("primary", "secondary"):
        for kind in KINDS:
            rows = influence.filter((pl.col("family") == family) & (pl.col("kind") == kind))
            if rows.height:
                yield (family, kind), rows


def print_summary(result: StudyResult) -> None:
    summary = result.summary
    estimates = summary.estimates
    _say(f"done: {summary.finished}/{summary.trials} trials finished"
         + (f", {len(summary.failed)} failed: {[f.trial_id for f in summary.failed]}" if summary.failed else ""))
    for key, counts in summary.significant.items():
        mde, adjusted = counts.median_mde, counts.median_mde_adjusted
        _say(f"influence {key}: {counts.significant_after_correction} of {counts.tested} tested rows significant "
             f"after correction (BH, q <= 0.05)" + (f"; median minimum detectable effect (80 % power) {mde:.3g} "
                                                     f"before correction, {adjusted:.3g} after" if mde is not None else ""))
    for family, check in summary.null_check.items():
        if check.tests:
            _say(f"A/A null check ({family}): {check.significant_after_correction} of {check.tests} rows' seed "
                 f"halves differ after correction: {'passed' if check.passed else 'FAILED'}")
    if summary.planted is not None:
        planted = summary.planted
        _say(f"planted effects: {planted.agree}/{planted.total} agree (recovered {planted.recovered}; "
             f"{planted.false_positives_on_none} false positives on 'none')")
        for miss in (m for m in planted.pairs if not m.agrees):
            low, high = miss.ci_low_adjusted, miss.ci_high_adjusted
            interval = "no interval" if low is None else f"adjusted CI [{low:+.3f}, {high:+.3f}]"
            mde = "" if miss.mde is None else f", MDE {miss.mde:.3f}"
            _say(f"  {miss.source} -> {miss.target} ({miss.task}): planted {miss.truth}, measured "
                 f"{miss.delta:+.3f} ({interval}{mde})")
    if summary.recommendations:
        from omgseg.platform.study.recommend import describe

        for rec in summary.recommendations:
            for line in describe(rec).splitlines():
                _say(line)
    for fit in summary.surrogate:
        quality = "too few subsets to hold one out" if fit.r2 is None else f"R^2 {fit.r2:.2f}, RMSE {fit.rmse:.3g}"
        _say(f"surrogate of {fit.dataset} {fit.task}: {fit.parameters} parameters over {fit.subsets} subsets; on "
             f"held-out subsets {quality}")
    if estimates.spearman is not None:
        _say(f"affinity vs influence: Spearman {estimates.spearman:.3f} over {estimates.n_pairs} pairs "
             f"(permutation p {estimates.permutation_p:.3g}); cost {estimates.affinity_trial_hours:.3f} vs "
             f"{estimates.exhaustive_trial_hours:.3f} trial-hours")
        controlled = estimates.against_controlled
        if controlled is not None and controlled.spearman is not None:
            _say(f"affinity vs controlled influence: Spearman {controlled.spearman:.3f} "
                 f"(permutation p {controlled.permutation_p:.3g}; the probe has no control)")
    _say(f"tables: {', '.join(str(result.tables[t]) for t in TABLES)}")
    _say(f"MLflow UI: mlflow ui --backend-store-uri {result.tracking_uri}  (then http://127.0.0.1:5000, "
         f"parent run {result.parent_run_id})")
    print(json.dumps({"out": str(result.out), "parent_run_id": result.parent_run_id, "tracking_uri": result.tracking_uri,
                      "finished": summary.finished, "failed": len(summary.failed),
                      "spearman_affinity_vs_influence": estimates.spearman}))
