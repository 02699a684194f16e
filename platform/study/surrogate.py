"""The surrogate of a sampled design: per target, its value as a function of which data sets
trained with it, fitted over the sampled subsets of every seed, and its influence rows.

For a target t, over every sampled trial in its scope (subset S, seed s):

    y[S, s] = a + sum over data sets i in S, i != t, of b_i          (least squares)

b_i is what adding i does to t, averaged over the subsets the design drew (a first-order
surrogate, as in Li et al. 2023, "Identification of negative transfers in multitask learning
using surrogate models"). The seeds draw different subsets, so the fit over all of them
separates sources that no one seed's few subsets can.

The seed stays the unit of replication, as in every other row of the study: a row's per-seed
values are the delete-one-seed jackknife's pseudo-values, n b - (n - 1) b(-s), where b(-s) is
the fit without seed s's trials. Their mean is the jackknife estimate and their spread gives
the jackknife's standard error, so a `surrogate` row goes through the study's statistics like
any other (omgseg.platform.study.stats: t interval on n - 1 df, BH, MDE, A/A) and its interval
holds whatever the seeds' noise does to the fit, not only under the model's own residuals.
With the control among the subsets, a `surrogate_controlled` row is b_i - b_control, what i
does beyond what an unrelated data set does.

A row is made where the fit and every delete-one-seed fit determine its difference (a linear
function of the observations, estimable): a source never apart from another data set, or
fewer trials with t than parameters, give none, and with subsets of a single size the
coefficients themselves are not estimable (every subset holds t and k - 1 others, so the
intercept and their sum cannot be told apart) while their differences, the controlled rows,
are; the design cannot see what it cannot estimate. Where a row's two levels are not
estimable, its with_source and without_source are left empty and its relative delta is taken
against the target's mean over its subsets.

The surrogate's predictive fit is measured on held-out subsets: each subset's mean over the
seeds it was trained at, predicted by the surrogate fitted without it (leave one subset out).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from omgseg.platform.study.design import Combination, Comparison, StudyDesign

Cells = dict[tuple[Combination, int], float]  # (combination, seed) -> value


@dataclass(frozen=True)
class Fit:
    """A surrogate of one target: the least-squares coefficients over its trials' subsets, with
    the data sets every subset has (`fixed`, a train target's own) in the intercept. A value is
    returned only where the subsets determine it (it is estimable): with subsets of one size,
    say, the differences between coefficients are, the coefficients themselves are not."""

    sources: tuple[str, ...]
    beta: np.ndarray  # intercept, then one coefficient per source
    basis: np.ndarray  # pinv(X) X: a linear function w of beta is estimable when w basis = w
    fixed: tuple[str, ...] = ()

    def _vector(self, datasets: Combination, intercept: float) -> np.ndarray | None:
        unknown = [n for n in datasets if n not in self.fixed and n not in self.sources]
        if unknown:
            return None  # a data set none of the seed's subsets had
        w = np.zeros(len(self.beta))
        w[0] = intercept
        for n in datasets:
            if n not in self.fixed:
                w[1 + self.sources.index(n)] += 1.0
        return w

    def _estimate(self, w: np.ndarray | None) -> float | None:
        if w is None or not np.allclose(w @ self.basis, w, atol=1e-8):
            return None
        return float(w @ self.beta)

    def level(self, datasets: Combination) -> float | None:
        """The predicted value of the target when training on `datasets`."""
        return self._estimate(self._vector(datasets, 1.0))

    def difference(self, with_combo: Combination, without_combo: Combination) -> float | None:
        """level(with_combo) - level(without_combo), which may be estimable when neither is."""
        a, b = self._vector(with_combo, 1.0), self._vector(without_combo, 1.0)
        return None if a is None or b is None else self._estimate(a - b)

    @property
    def coefficients(self) -> dict[str, float]:
        """The estimable coefficients by data set."""
        found = {n: self._estimate(np.eye(len(self.beta))[1 + k]) for k, n in enumerate(self.sources)}
        return {n: v for n, v in found.items() if v is not None}


def fit(rows: list[tuple[Combination, float]], fixed: tuple[str, ...]) -> Fit | None:
    """The first-order surrogate over `rows` (a subset and the target's value there; a subset
    may come more than once), each subset holding the `fixed` data sets; None without rows."""
    if not rows:
        return None
    sources = tuple(sorted({n for s, _ in rows for n in s if n not in fixed}))
    x = np.zeros((len(rows), 1 + len(sources)))
    x[:, 0] = 1.0
    for row, (subset, _) in enumerate(rows):
        for k, name in enumerate(sources):
            x[row, 1 + k] = name in subset
    pinv = np.linalg.pinv(x)
    return Fit(sources=sources, beta=pinv @ np.array([v for _, v in rows]), basis=pinv @ x, fixed=fixed)


@dataclass(frozen=True)
class Jackknife:
    """A target's surrogate fitted over every seed's sampled trials, and again without each
    seed's: what a row's per-seed values are made from."""

    full: Fit
    without: dict[int, Fit | None]  # seed -> the fit without that seed's trials

    @property
    def seeds(self) -> list[int]:
        return sorted(self.without)

    def values(self, estimate: Callable[[Fit], float | None]) -> list[float] | None:
        """The per-seed pseudo-values of `estimate` (n theta - (n - 1) theta(-s), in seed order),
        or None when the full fit or one without a seed does not determine it. With one seed,
        the estimate itself (a row with no interval)."""
        theta = estimate(self.full)
        n = len(self.without)
        if theta is None:
            return None
        if n == 1:
            return [theta]
        left = [estimate(f) if f is not None else None for _, f in sorted(self.without.items())]
        if any(v is None for v in left):
            return None
        return [n * theta - (n - 1) * v for v in left]


def jackknife(cells: Cells, design: StudyDesign, fixed: tuple[str, ...]) -> Jackknife | None:
    """The surrogate over the design's sampled subsets among `cells` (a target's cells in its
    scope, or an objective's), each holding `fixed`, with its delete-one-seed fits."""
    rows = sorted((key, v) for key, v in cells.items() if key[0] in design.sampled)
    full = fit([(c, v) for (c, _), v in rows], fixed)
    if full is None:
        return None
    seeds = sorted({s for (_, s), _ in rows})
    without = {seed: fit([(c, v) for (c, s), v in rows if s != seed], fixed) for seed in seeds}
    return Jackknife(full, without if len(seeds) > 1 else {seeds[0]: None})


def comparisons(design: StudyDesign, target: str) -> list[Comparison]:
    """The surrogate rows a target can have: every train data set but itself, against the
    target alone (surrogate) and against the target with the control (surrogate_controlled)."""
    out = []
    for source in design.train:
        if source == target:
            continue
        alone = (target,) if target in design.train or target == design.control else ()
        out.append(Comparison("surrogate", source, target, design.order((*alone, source)), alone))
        if design.control and design.control != target:
            out.append(Comparison("surrogate_controlled", source, target, design.order((*alone, source)),
                                  design.order((*alone, design.control))))
    return out


@dataclass(frozen=True)
class PredictedRow:
    """A surrogate row's per-seed values: the pseudo-values of its predicted difference and, where
    those are estimable too, of the two sides' predicted levels."""

    seeds: list[int]
    differences: list[float]  # level(with) - level(without)
    with_values: list[float] | None  # None when a level is not estimable
    without_values: list[float] | None


def predicted_row(fits: Jackknife | None, comparison: Comparison) -> PredictedRow:
    """The surrogate's per-seed values for `comparison`; no seeds when the fits do not
    determine its difference."""
    differences = fits.values(lambda f: f.difference(comparison.with_combo, comparison.without_combo)) if fits else None
    if differences is None:
        return PredictedRow([], [], None, None)
    with_values = fits.values(lambda f: f.level(comparison.with_combo))
    without_values = fits.values(lambda f: f.level(comparison.without_combo))
    complete = with_values is not None and without_values is not None
    return PredictedRow(fits.seeds, differences, with_values if complete else None,
                        without_values if complete else None)


@dataclass(frozen=True)
class PredictiveFit:
    """A target's surrogate predicting held-out subsets (leave one subset out, seed means)."""

    subsets: int
    parameters: int
    rmse: float | None
    r2: float | None


def predictive_fit(cells: Cells, design: StudyDesign, target: str) -> PredictiveFit:
    """Each sampled subset's mean over the seeds it was trained at, predicted by the surrogate
    fitted to the other subsets' means; RMSE and R^2 of those predictions (None when fewer
    subsets than it takes)."""
    sums: dict[Combination, list[float]] = {}
    for (combo, _), value in cells.items():
        if combo in design.sampled:
            sums.setdefault(combo, []).append(value)
    means = {combo: float(np.mean(v)) for combo, v in sums.items()}
    sources = sorted({n for s in means for n in s if n != target})
    errors, observed = [], []
    for held in sorted(means):
        rest = {s: v for s, v in means.items() if s != held}
        found = fit(list(rest.items()), (target,))
        predicted = found.level(held) if found is not None else None
        if predicted is None:
            continue
        errors.append(predicted - means[held])
        observed.append(means[held])
    if len(errors) < 2:
        return PredictiveFit(len(means), 1 + len(sources), None, None)
    spread = float(np.sum((np.array(observed) - np.mean(observed)) ** 2))
    sse = float(np.sum(np.square(errors)))
    return PredictiveFit(len(means), 1 + len(sources), float(np.sqrt(sse / len(errors))),
                         1 - sse / spread if spread > 0 else None)
