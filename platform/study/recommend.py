"""From measurement to decision: which data sets to co-train, at which ratios, for an objective,
predicted from a model fitted to the study's trials, with its uncertainty.

    omgseg recommend STUDY_DIR [--objective anchor] [--objective all] [--objective "anchor:2,twin:1"]

An objective is lower-is-better: a weighted mean of targets, a higher-is-better metric entering
negated; with several targets, each is first divided by its mean over the trials the fit uses,
so that each counts by its relative change. It is named by:
- `DATASET`: the data set's primary targets (its validation losses);
- `DATASET/TASK/METRIC`: one target;
- `all`: every train data set's primary targets;
- several of these joined by commas, each with an optional `:weight`.

The model (`source` in the record):
- a ratio sweep (`mixing.sampled`): the Scheffé quadratic mixture model over the swept trials'
  realised sample shares (omgseg.platform.study.mixtures): its best mixture on the simplex, the
  prediction's interval, and the shares' spread over bootstrap refits;
- else a sampled design: the first-order surrogate of the objective over every seed's sampled
  subsets (omgseg.platform.study.surrogate), with its delete-one-seed jackknife interval: the
  best subset the surrogate can predict, at equal ratios;
- else the trained combinations' measured objective: the best one's mean, at its own ratios.
A recommendation is a prediction from a fit, not a measurement: `omgseg study ... --verify`
trains it against baselines (omgseg.platform.study.verify).
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from omgseg.platform.config import StudyConfig
from omgseg.platform.records import ObjectiveTerm, Recommendation, StudyState, StudySummary
from omgseg.platform.study.design import StudyDesign
from omgseg.platform.study.mixtures import recommend_mixture
from omgseg.platform.study.plan import Target, targets


@dataclass(frozen=True)
class Objective:
    label: str
    terms: tuple[tuple[Target, float], ...]  # (target, weight)


def parse_objective(text: str, config: StudyConfig) -> Objective:
    """The objective `text` names (see the module docstring), over `config`'s targets."""
    goals = targets(config)
    terms: list[tuple[Target, float]] = []
    for item in (part.strip() for part in text.split(",")):
        name, _, weight = item.partition(":")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"objective {text!r}: weight {weight!r} of {name!r} is not a number") from None
        if name == "all":
            found = [t for t in goals if t.primary and t.dataset in config.trained()]
        elif name.count("/") == 2:
            found = [t for t in goals if f"{t.dataset}/{t.task}/{t.metric}" == name]
        else:
            found = [t for t in goals if t.primary and t.dataset == name]
        if not found:
            known = sorted({t.dataset for t in goals if t.primary}) + ["all"]
            raise ValueError(f"objective {text!r}: {name!r} names no target of the study (data sets {known}, or "
                             "DATASET/TASK/METRIC)")
        terms += [(t, w) for t in found]
    return Objective(label=text, terms=tuple(terms))


def objective_values(metrics: pl.DataFrame, objective: Objective, trial_ids: list[str],
                     scales: dict[str, float] | None = None, *, scoped: bool = True
                     ) -> tuple[dict[str, float], dict[str, float]]:
    """({trial id: objective}, {target: scale}) over the trials of `trial_ids` that report every
    term; the scales (each target's mean over those trials, 1 for a single target) are computed
    unless given (a verification uses its recommendation's). `scoped`: a term counts only in
    trials that trained its target (what a fit may learn from); a verification scores every arm
    on every term, so an arm that leaves a target's data set out is charged what it measures."""
    values: dict[str, dict[str, float]] = {}
    for target, _ in objective.terms:
        key = f"{target.dataset}/{target.task}/{target.metric}"
        rows = metrics.filter((pl.col("eval_dataset") == target.dataset) & (pl.col("task") == target.task)
                              & (pl.col("metric") == target.metric) & pl.col("trial_id").is_in(trial_ids))
        for trial, datasets, value in rows.select("trial_id", "train_datasets", "value").iter_rows():
            if not scoped or target.in_scope(tuple(datasets)):  # untrained: says nothing of it to a fit
                values.setdefault(trial, {})[key] = value
    keys = [f"{t.dataset}/{t.task}/{t.metric}" for t, _ in objective.terms]
    complete = {trial: v for trial, v in values.items() if all(k in v for k in keys)}
    if scales is None:
        scales = {k: (float(np.mean([abs(v[k]) for v in complete.values()])) or 1.0) if len(keys) > 1 else 1.0
                  for k in keys} if complete else {k: 1.0 for k in keys}
    total = sum(w for _, w in objective.terms)
    out = {}
    for trial, v in complete.items():
        out[trial] = sum(w * (1 if t.direction == "lower" else -1) * v[k] / scales[k]
                         for (t, w), k in zip(objective.terms, keys)) / total
    return out, scales


def _terms(objective: Objective, scales: dict[str, float]) -> list[ObjectiveTerm]:
    return [ObjectiveTerm(t.dataset, t.task, t.metric, t.direction, w, scales[f"{t.dataset}/{t.task}/{t.metric}"])
            for t, w in objective.terms]


def from_sweep(runs: pl.DataFrame, metrics: pl.DataFrame, design: StudyDesign, objective: Objective) -> Recommendation | None:
    """The ratio sweep's recommendation (None without swept trials)."""
    swept = runs.filter(pl.col("mixture").is_not_null() & pl.col("mixture").str.starts_with("m")
                        & (pl.col("status") == "finished"))
    if swept.height == 0:
        return None
    values, scales = objective_values(metrics, objective, swept["trial_id"].to_list())
    rows = [r for r in swept.iter_rows(named=True) if r["trial_id"] in values]
    names = design.train
    shares = np.array([[dict(zip(r["train_datasets"], r["samples_per_dataset"])).get(n, 0) for n in names] for r in rows],
                      dtype=float)
    shares /= shares.sum(axis=1, keepdims=True)
    choice = recommend_mixture(names, shares, [r["seed"] for r in rows], np.array([values[r["trial_id"]] for r in rows]),
                               np.array([r["mixture"] for r in rows]))
    if choice is None:
        return None
    mixtures = len({r["mixture"] for r in rows})
    return Recommendation(
        objective=objective.label, terms=_terms(objective, scales),
        source=f"ratio sweep: Scheffé quadratic model over {mixtures} mixtures x {len({r['seed'] for r in rows})} seeds",
        shares=choice.shares, subset=list(choice.subset), predicted=choice.predicted,
        predicted_ci=list(choice.predicted_ci), share_intervals={k: list(v) for k, v in choice.share_intervals.items()},
        in_subset=choice.in_subset, bootstraps=choice.bootstraps)


def from_subsets(runs: pl.DataFrame, metrics: pl.DataFrame, design: StudyDesign, objective: Objective) -> Recommendation | None:
    """The best subset: by the surrogate over a sampled design's subsets, else by the measured
    objective of the trained combinations; equal ratios."""
    from omgseg.platform.study.surrogate import jackknife

    trials = runs.filter(pl.col("mixture").is_null() & (pl.col("status") == "finished"))
    values, scales = objective_values(metrics, objective, trials["trial_id"].to_list())
    cells = {(tuple(r["train_datasets"]), r["seed"]): values[r["trial_id"]] for r in trials.iter_rows(named=True)
             if r["trial_id"] in values}
    if not cells:
        return None
    needed = {t.dataset for t, _ in objective.terms if t.dataset in design.train}
    if design.sampled:
        source = ("sampled design: first-order surrogate of the objective over the sampled subsets of every seed, "
                  "with its delete-one-seed jackknife interval")
        fits = jackknife(cells, design, tuple(n for n in design.train if n in needed))
        candidates = [c for k in range(1, len(design.train) + 1) for c in itertools.combinations(design.train, k)
                      if needed <= set(c)]
        predicted = {}
        for c in candidates:
            per_seed = fits.values(lambda f, c=c: f.level(c)) if fits else None
            if per_seed is not None:
                predicted[c] = (float(np.mean(per_seed)), float(np.std(per_seed, ddof=1) / np.sqrt(len(per_seed)))
                                if len(per_seed) > 1 else float("nan"))
    else:
        source = "trained combinations: the measured objective's mean over seeds"
        predicted = {}
        for combo in {c for c, _ in cells}:
            v = [value for (c, _), value in cells.items() if c == combo]
            predicted[combo] = (float(np.mean(v)), float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan"))
    if not predicted:
        return None
    best = min(predicted, key=lambda c: predicted[c][0])
    mean, se = predicted[best]
    shares = {n: (1 / len(best) if n in best else 0.0) for n in design.train}
    return Recommendation(
        objective=objective.label, terms=_terms(objective, scales), source=source, shares=shares, subset=list(best),
        predicted=mean, predicted_ci=[mean - 1.96 * se, mean + 1.96 * se], share_intervals={}, in_subset={},
        bootstraps=0)


def recommend(folder: Path, objective_text: str) -> Recommendation:
    """The recommendation for `objective_text` from the study in `folder`."""
    state = StudyState.read(folder)
    config = StudyConfig.model_validate(state.config)
    tables = {name: pl.read_parquet(Path(folder) / f"{name}.parquet") for name in ("runs", "metrics")}
    objective = parse_objective(objective_text, config)
    design = StudyDesign.from_config(config)
    found = from_sweep(tables["runs"], tables["metrics"], design, objective) if config.mixing.sampled else None
    found = found or from_subsets(tables["runs"], tables["metrics"], design, objective)
    if found is None:
        raise ValueError(f"{folder}: no finished trial reports every target of the objective {objective_text!r}")
    return found


def record(folder: Path, recommendations: list[Recommendation]) -> StudySummary:
    """summary.json with these recommendations (replacing those of the same objectives)."""
    summary = StudySummary.read(folder)
    kept = [r for r in summary.recommendations if r.objective not in {n.objective for n in recommendations}]
    summary.recommendations = kept + recommendations
    summary.write(folder)
    return summary


def describe(rec: Recommendation) -> str:
    shares = ", ".join(f"{n} {v:.2f}" for n, v in rec.shares.items() if v > 0)
    low, high = rec.predicted_ci
    lines = [f"objective {rec.objective!r}: train {' + '.join(rec.subset)} at {shares}",
             f"  predicted objective {rec.predicted:.4g} (95 % interval [{low:.4g}, {high:.4g}]); {rec.source}"]
    if rec.in_subset:
        lines.append("  over " + str(rec.bootstraps) + " bootstrap refits: " + ", ".join(
            f"{n} in {rec.in_subset[n]:.0%} (share {rec.share_intervals[n][0]:.2f}-{rec.share_intervals[n][1]:.2f})"
            for n in rec.shares))
    if rec.verification is not None:
        v = rec.verification
        lines.append("  verification: confirmed, beats " + ", ".join(c.baseline for c in v.comparisons) if v.confirmed
                     else f"  verification: not confirmed, did not beat {', '.join(v.not_beaten)}")
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-") or "objective"


def build_parser(prog: str = "omgseg recommend") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Recommend which data sets to co-train and at which ratios for an objective, from a "
        "model fitted to a study's trials (a ratio sweep's mixture model, a sampled design's surrogate, or the "
        "trained combinations), with its uncertainty; written to the study's summary.json.",
        epilog="examples:\n  omgseg recommend outputs/studies/planted --objective anchor\n"
        "  omgseg recommend outputs/studies/planted --objective all --objective 'anchor:2,twin:1'\n"
        "then: omgseg study --config ... --out STUDY_DIR --verify --objective anchor",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study_dir", help="the study folder")
    parser.add_argument("--objective", action="append", help="DATASET, DATASET/TASK/METRIC, all, or a weighted list "
                        "'a:2,b:1' (repeatable; default: the config's recommend.objectives, else all)")
    return parser


def main(argv: list[str] | None = None, prog: str = "omgseg recommend") -> int:
    args = build_parser(prog).parse_args(argv)
    folder = Path(args.study_dir)
    try:
        config = StudyConfig.model_validate(StudyState.read(folder).config)
        objectives = args.objective or (config.recommend.objectives if config.recommend else ["all"])
        found = [recommend(folder, text) for text in objectives]
        record(folder, found)
    except (FileNotFoundError, ValueError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    for rec in found:
        print(describe(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
