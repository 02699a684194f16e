"""The cheap estimate (TAG affinity) against the exhaustive one (pair influence), and a
planted study's truth against what it measured. Written to summary.json.

- exhaustive I_ij: the pair influence of i on j's primary targets (mean relative delta,
  positive = helps), from the singleton and pair trials; with a study control C, also against
  {j, C} instead of {j} (the controlled influence), which the cheap estimate has no analogue of.
- cheap A_ij: the mean look-ahead affinity Z_ij of the trials that probed it.
- agreement: Spearman's rho over the ordered pairs, a one-sided permutation p-value (every
  permutation when there are few pairs), and a percentile bootstrap interval over pairs.
- reliability: each side measured twice on disjoint halves (seeds; or, for the cheap side
  from one seed, even and odd probes), the two halves' Spearman, Spearman-Brown corrected.
- grouping regret: the partition of the train data sets (into combinations the study trained)
  that the cheap estimate ranks best, scored by the exhaustive one, against the best there is.
- cost: trial-hours of each side.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable

import numpy as np
import polars as pl
from scipy import stats

from omgseg.platform.records import (
    Agreement,
    Estimates,
    Grouping,
    PairAgreement,
    PlantedCheck,
    PlantedPair,
    SplitHalf,
    TrialRecord,
)
from omgseg.platform.study.design import StudyDesign
from omgseg.platform.study.plan import Target
from omgseg.platform.study.results import target_cells

Pairs = dict[tuple[str, str], float]


def spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(stats.spearmanr(a, b).statistic)


def permutation_p(a: list[float], b: list[float], rho: float, samples: int = 20000, seed: int = 0) -> float:
    """P(rho of a permutation of b >= rho): exact over all permutations up to 8 pairs."""
    n = len(b)
    if n <= 8:
        perms: Iterable = itertools.permutations(b)
        total = math.factorial(n)
    else:
        rng = random.Random(seed)
        perms = (rng.sample(b, n) for _ in range(samples))
        total = samples
    hits = sum((spearman(a, list(p)) or 0.0) >= rho - 1e-12 for p in perms)
    return hits / total


def bootstrap_interval(a: list[float], b: list[float], samples: int = 5000, seed: int = 0) -> tuple[float, float] | None:
    """95 % percentile interval of rho, resampling the pairs with replacement."""
    rng = np.random.default_rng(seed)
    n = len(a)
    values = []
    for _ in range(samples):
        index = rng.integers(0, n, n)
        rho = spearman([a[i] for i in index], [b[i] for i in index])
        if rho is not None:
            values.append(rho)
    if len(values) < samples // 2:
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def agreement(cheap: Pairs, exhaustive: Pairs) -> Agreement:
    keys = sorted(set(cheap) & set(exhaustive))
    a, b = [cheap[k] for k in keys], [exhaustive[k] for k in keys]
    rho = spearman(a, b)
    interval = bootstrap_interval(a, b) if rho is not None else None
    return Agreement(
        n_pairs=len(keys), spearman=rho, permutation_p=permutation_p(a, b, rho) if rho is not None else None,
        bootstrap_95=list(interval) if interval is not None else None,
        pairs=[PairAgreement(s, t, cheap[(s, t)], exhaustive[(s, t)]) for s, t in keys])


def relative_effect(metrics: pl.DataFrame, targets: list[Target], dataset: str, combo: tuple[str, ...],
                    seeds: set[int] | None = None, base: tuple[str, ...] | None = None) -> float | None:
    """Mean over `dataset`'s primary targets of the relative, signed (positive = helps) change
    from training on `base` (default {dataset} alone) to training on `combo`, paired by seed."""
    base = base or (dataset,)
    effects = []
    for target in targets:
        if not target.primary or target.dataset != dataset:
            continue
        by = {(c, s): v for (c, s), v in target_cells(metrics, target).items() if seeds is None or s in seeds}
        shared = [s for c, s in by if c == combo and (base, s) in by]
        if not shared:
            continue
        reference = sum(by[(base, s)] for s in shared) / len(shared)
        change = sum(by[(combo, s)] - by[(base, s)] for s in shared) / len(shared)
        if reference:
            effects.append((1 if target.direction == "higher" else -1) * change / abs(reference))
    return sum(effects) / len(effects) if effects else None


def pair_influence(metrics: pl.DataFrame, targets: list[Target], design: StudyDesign, seeds: set[int] | None = None,
                   controlled: bool = False) -> Pairs:
    """I_ij over the ordered pairs of train data sets the design compares: its pair rows, {i, j}
    against {j}, or its controlled rows, against {j, control}."""
    out = {}
    for source, target in itertools.permutations(design.train, 2):
        comparison = design.pair_comparison(source, target, controlled)
        if comparison is None:
            continue
        effect = relative_effect(metrics, targets, target, comparison.with_combo, seeds, comparison.without_combo)
        if effect is not None:
            out[(source, target)] = effect
    return out


def mean_affinity(records: list[TrialRecord], seeds: set[int] | None = None, half: int | None = None) -> Pairs:
    """The mean Z over the probing trials (of `seeds`), or of one half of their probes."""
    sums: dict[tuple[str, str], list[float]] = {}
    for r in records:
        if r.status != "finished" or not r.affinity or (seeds is not None and r.seed not in seeds):
            continue
        table = r.affinity if half is None else (r.affinity_halves[half] if len(r.affinity_halves) > half else {})
        for s, row in table.items():
            for t, z in row.items():
                if s != t:
                    sums.setdefault((s, t), []).append(z)
    return {k: sum(v) / len(v) for k, v in sums.items()}


def _halves(seeds: list[int]) -> tuple[set[int], set[int]]:
    ordered = sorted(seeds)
    return set(ordered[: len(ordered) // 2]), set(ordered[len(ordered) // 2:])


def _split_half(a: Pairs, b: Pairs, split: str = "seeds") -> SplitHalf:
    keys = sorted(set(a) & set(b))
    rho = spearman([a[k] for k in keys], [b[k] for k in keys])
    corrected = 2 * rho / (1 + rho) if rho is not None and rho > -1 else None
    return SplitHalf(halves_spearman=rho, spearman_brown=corrected, split=split)


def partitions(items: list[str]) -> Iterable[list[tuple[str, ...]]]:
    """Every partition of `items` into groups (in the items' order)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in partitions(rest):
        yield [(first,), *part]
        for k in range(len(part)):
            yield [*part[:k], (first, *part[k]), *part[k + 1:]]


def grouping_regret(metrics: pl.DataFrame, targets: list[Target], design: StudyDesign, cheap: Pairs) -> Grouping | None:
    """Over the partitions of the train data sets whose groups the design trains: exhaustive
    score = sum over data sets of their relative improvement in their group over alone; cheap
    score = sum of A_ij within groups. Regret = best exhaustive score - exhaustive score of the
    cheap estimate's best."""
    scored = []
    for part in partitions(list(design.train)):
        groups = [design.order(g) for g in part]
        if any(not design.trains(g) for g in groups):
            continue
        exhaustive = cheap_score = 0.0
        complete = True
        for group in groups:
            for j in group:
                if len(group) > 1:
                    effect = relative_effect(metrics, targets, j, group)
                    if effect is None:
                        complete = False
                    exhaustive += effect or 0.0
                    cheap_score += sum(cheap.get((i, j), 0.0) for i in group if i != j)
        if complete:
            scored.append((groups, exhaustive, cheap_score))
    if len(scored) < 2:
        return None
    best = max(scored, key=lambda s: s[1])
    chosen = max(scored, key=lambda s: s[2])
    return Grouping(partitions=len(scored), best=[design.name(g) for g in best[0]], best_score=best[1],
                    chosen_by_affinity=[design.name(g) for g in chosen[0]], chosen_score=chosen[1],
                    regret=best[1] - chosen[1])


def compare_estimates(records: list[TrialRecord], metrics: pl.DataFrame, targets: list[Target], design: StudyDesign,
                      seeds: list[int]) -> Estimates:
    """The cheap estimate against the exhaustive one (see the module docstring)."""
    exhaustive = pair_influence(metrics, targets, design)
    cheap = mean_affinity(records)
    first, second = _halves(seeds)
    reliability = {"exhaustive": _split_half(pair_influence(metrics, targets, design, first),
                                             pair_influence(metrics, targets, design, second))}
    probing_seeds = sorted({r.seed for r in records if r.affinity})
    if len(probing_seeds) >= 2:
        a, b = _halves(probing_seeds)
        reliability["cheap"] = _split_half(mean_affinity(records, a), mean_affinity(records, b))
    else:
        reliability["cheap"] = _split_half(mean_affinity(records, half=0), mean_affinity(records, half=1),
                                           "probes (even, odd)")
    finished = [r for r in records if r.status == "finished"]
    hours = lambda rs: sum(r.wall_seconds for r in rs) / 3600  # noqa: E731
    # The singleton and pair trials; not a study control's trials, which this comparison does not use.
    pairs = {(n,) for n in design.train} | {design.order(p) for p in itertools.combinations(design.train, 2)}
    exhaustive_hours = hours([r for r in finished if tuple(r.datasets) in pairs])
    affinity_hours = hours([r for r in finished if r.measures_affinity])
    return Estimates(
        **vars(agreement(cheap, exhaustive)), reliability=reliability,
        grouping=grouping_regret(metrics, targets, design, cheap), exhaustive_trial_hours=exhaustive_hours,
        affinity_trial_hours=affinity_hours, all_trial_hours=hours(finished),
        cost_ratio=affinity_hours / exhaustive_hours if exhaustive_hours else None,
        against_controlled=agreement(cheap, pair_influence(metrics, targets, design, controlled=True))
        if "controlled" in design.kinds else None)


def planted_check(influence: pl.DataFrame, planted: list, kind: str = "pair") -> PlantedCheck:
    """For every planted (source, target, effect): the influence rows of `kind` (pair, or
    controlled for a study with a control) on the target's primary targets, their uncorrected
    and FCR-adjusted intervals, and whether they agree: helps/hurts, the adjusted interval on
    that side of zero (significant after correction, with that sign); none, the adjusted
    interval contains zero (no false positive after correction). Each pair carries its row's
    minimum detectable effect: a helps or hurts pair measured below it may be real and unresolved."""
    rows = influence.filter((pl.col("family") == "primary") & (pl.col("kind") == kind))
    out = []
    for item in planted:
        found = rows.filter((pl.col("source_dataset") == item.source) & (pl.col("target_dataset") == item.target))
        for r in found.iter_rows(named=True):
            low, high = r["ci_low_adjusted"], r["ci_high_adjusted"]
            if low is None:
                agrees = False
            elif item.effect == "helps":
                agrees = low > 0
            elif item.effect == "hurts":
                agrees = high < 0
            else:
                agrees = low <= 0 <= high
            out.append(PlantedPair(source=item.source, target=item.target, task=r["task"], truth=item.effect,
                                   delta=r["delta"], ci_low=r["ci_low"], ci_high=r["ci_high"], ci_low_adjusted=low,
                                   ci_high_adjusted=high, q_value=r["q_value"], mde=r["mde"], agrees=agrees))
    by_effect = {e: [o for o in out if o.truth == e] for e in ("helps", "hurts", "none")}
    return PlantedCheck(kind=kind, pairs=out, agree=sum(o.agrees for o in out), total=len(out),
                        recovered={e: f"{sum(o.agrees for o in rows)}/{len(rows)}" for e, rows in by_effect.items()},
                        false_positives_on_none=sum(not o.agrees for o in by_effect["none"]))
