"""A recommendation checked by its own trials: the recommended mixture, the uniform mixture of all
train data sets, the target alone and any baseline the config names, each trained at every seed,
and compared on the objective with the study's statistics.

    omgseg study --config FILE --out STUDY_DIR --verify [--objective anchor]

The verification is a study of its own in STUDY_DIR/verify/<objective>/, whose config is the
study's with `arms` (the mixtures above, by label) instead of its combinations. For each
baseline b, at each seed s: d_s = objective(b, s) - objective(recommended, s) (lower is better,
so positive means the recommendation did better), with the recommendation's normalisation;
the per-seed contrast's interval, BH over the baselines, the adjusted interval and the MDEs
(omgseg.platform.study.stats). The recommendation is confirmed only when every baseline's
adjusted interval is above zero; otherwise the result names the baselines it did not beat.

What it proves: at these seeds, on these data, the recommended mixture beat those baselines
by at least the adjusted interval's lower end. What it does not: that no other mixture is
better (the recommendation is the fit's argmin, not a search), or that the ranking holds at
another scale or budget.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from omgseg.platform.config import StudyConfig
from omgseg.platform.records import BaselineComparison, Recommendation, StudySummary, Verification
from omgseg.platform.study.plan import targets
from omgseg.platform.study.recommend import Objective, _slug, objective_values
from omgseg.platform.study.stats import ALPHA, adjusted_alpha, benjamini_hochberg, minimum_detectable_effect, seed_contrast

RECOMMENDED = "recommended"


def arms(config: StudyConfig, recommendation: Recommendation) -> dict[str, dict[str, float]]:
    """{label: ratios}: the recommendation, the uniform mixture of all train data sets, the
    target alone (when the objective's targets are one train data set's), and the config's
    baselines."""
    out = {RECOMMENDED: {n: v for n, v in recommendation.shares.items() if v > 0},
           "uniform": {n: 1.0 for n in config.trained()}}
    datasets = {t.dataset for t in recommendation.terms}
    if len(datasets) == 1 and next(iter(datasets)) in config.trained():
        out["alone"] = {next(iter(datasets)): 1.0}
    out.update(config.verify.baselines if config.verify else {})
    return out


def verification_config(config: StudyConfig, recommendation: Recommendation) -> StudyConfig:
    """The verification study's config: the study's, training the arms instead of its
    combinations, without a sweep, probes, recommendations or a planted check."""
    data = config.model_dump()
    data.update(name=f"{config.name}-verify-{_slug(recommendation.objective)}", arms=arms(config, recommendation),
                recommend=None, planted=None, mixing={"policy": "equal"})
    data["train"]["affinity"]["enabled"] = False
    return StudyConfig.model_validate(data)


def objective_of(recommendation: Recommendation, config: StudyConfig) -> tuple[Objective, dict[str, float]]:
    """The recommendation's objective over `config`'s targets, and its scales."""
    goals = {f"{t.dataset}/{t.task}/{t.metric}": t for t in targets(config)}
    terms = tuple((goals[f"{t.dataset}/{t.task}/{t.metric}"], t.weight) for t in recommendation.terms)
    return Objective(recommendation.objective, terms), {f"{t.dataset}/{t.task}/{t.metric}": t.scale
                                                        for t in recommendation.terms}


def compare_arms(runs: pl.DataFrame, metrics: pl.DataFrame, config: StudyConfig, recommendation: Recommendation,
                 folder: Path) -> Verification:
    """Every baseline against the recommended arm, seed by seed (see the module docstring)."""
    objective, scales = objective_of(recommendation, config)
    finished = runs.filter(pl.col("status") == "finished")
    values, _ = objective_values(metrics, objective, finished["trial_id"].to_list(), scales, scoped=False)
    by_arm: dict[str, dict[int, float]] = {}
    for r in finished.iter_rows(named=True):
        if r["trial_id"] in values:
            by_arm.setdefault(r["mixture"], {})[r["seed"]] = values[r["trial_id"]]
    mine = by_arm.get(RECOMMENDED, {})
    found = []
    for label, ratios in (config.arms or {}).items():
        if label == RECOMMENDED:
            continue
        theirs = by_arm.get(label, {})
        per_seed = {s: theirs[s] - mine[s] for s in sorted(set(mine) & set(theirs))}
        found.append((label, ratios, per_seed, seed_contrast(per_seed) if per_seed else None))
    tested = [f for f in found if f[3] is not None]
    q_values = dict(zip([f[0] for f in tested], benjamini_hochberg([f[3].p_value for f in tested])))
    level = adjusted_alpha(list(q_values.values()), ALPHA)
    comparisons = []
    for label, ratios, per_seed, contrast in found:
        total = sum(ratios.values())
        adjusted = contrast.interval(level) if contrast else (None, None)
        comparisons.append(BaselineComparison(
            baseline=label, shares={n: v / total for n, v in ratios.items()},
            delta=sum(per_seed.values()) / len(per_seed) if per_seed else float("nan"), n_seeds=len(per_seed),
            ci_low=contrast.ci_low if contrast else None, ci_high=contrast.ci_high if contrast else None,
            ci_low_adjusted=adjusted[0], ci_high_adjusted=adjusted[1], p_value=contrast.p_value if contrast else None,
            q_value=q_values.get(label), mde=contrast.mde if contrast else None,
            mde_adjusted=minimum_detectable_effect(contrast.se, contrast.df, level) if contrast else None,
            beaten=bool(contrast) and adjusted[0] > 0))
    not_beaten = [c.baseline for c in comparisons if not c.beaten]
    return Verification(objective=recommendation.objective, folder=str(folder),
                        recommended=(config.arms or {}).get(RECOMMENDED, {}), comparisons=comparisons,
                        confirmed=bool(comparisons) and not not_beaten, not_beaten=not_beaten)


def verify_study(config: StudyConfig, out: Path, objective: str | None = None, *, verbose: bool = False) -> Verification:
    """Trains the verification of the recommendation for `objective` (default: the study's
    first) of the study in `out`, and records the result in both studies' summary.json."""
    from omgseg.platform.study.driver import run_study

    summary = StudySummary.read(out)
    if not summary.recommendations:
        raise ValueError(f"{out}: the study has no recommendation yet: run `omgseg recommend {out}` first")
    recommendation = next((r for r in summary.recommendations if objective in (None, r.objective)), None)
    if recommendation is None:
        raise ValueError(f"{out}: no recommendation for the objective {objective!r} "
                         f"(there are: {[r.objective for r in summary.recommendations]})")
    vconfig = verification_config(config, recommendation)
    folder = Path(out) / "verify" / _slug(recommendation.objective)
    result = run_study(vconfig, folder, resume=True, source=f"--verify of {out}", verbose=verbose)
    tables = {name: pl.read_parquet(result.tables[name]) for name in ("runs", "metrics")}
    verification = compare_arms(tables["runs"], tables["metrics"], vconfig, recommendation, folder)
    result.summary.verification = verification
    result.summary.write(folder)
    recommendation.verification = verification
    summary.write(out)
    return verification


def describe(verification: Verification) -> list[str]:
    lines = [f"verification of {verification.objective!r} (lower is better; delta = baseline - recommended):"]
    for c in verification.comparisons:
        interval = "no interval" if c.ci_low_adjusted is None else \
            f"adjusted CI [{c.ci_low_adjusted:+.4g}, {c.ci_high_adjusted:+.4g}]"
        lines.append(f"  vs {c.baseline}: {c.delta:+.4g} ({interval}, q {c.q_value if c.q_value is None else f'{c.q_value:.3g}'}, "
                     f"MDE {c.mde if c.mde is None else f'{c.mde:.3g}'}): {'beaten' if c.beaten else 'NOT beaten'}")
    lines.append("  confirmed: the recommendation beats every baseline" if verification.confirmed else
                 f"  not confirmed: it did not beat {', '.join(verification.not_beaten) or 'any baseline'}")
    return lines
