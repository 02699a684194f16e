"""The surrogate of a sampled design: per target, its value as a function of which data sets
trained with it, fitted over the sampled subsets, and its influence rows.

For a target t and the sampled subsets in its scope, at each seed s separately:

    y[S, s] = a_s + sum over data sets i in S, i != t, of b_i,s       (least squares)

b_i,s is what adding i does to t at seed s, averaged over the subsets the design drew (a
first-order surrogate, as in Li et al. 2023, "Identification of negative transfers in
multitask learning using surrogate models"). A `surrogate` row is b_i over the seeds, through
the study's statistics like any other row (omgseg.platform.study.stats: per-seed values, t
interval, BH, MDE, A/A); with the control among the subsets, a `surrogate_controlled` row is
b_i - b_control, what i does beyond what an unrelated data set does. A row is made at the
seeds where its difference is estimable (a linear function of the observations): a source
never apart from another data set, or fewer subsets with t than parameters, give none, and
with subsets of a single size the coefficients themselves are not estimable (every subset
holds t and k - 1 others, so the intercept and their sum cannot be told apart) while their
differences, the controlled rows, are; the design cannot see what it cannot estimate. Where a
row's two levels are not estimable, its with_source and without_source are left empty and its
relative delta is taken against the target's mean over its subsets.

The surrogate's predictive fit is measured on held-out subsets: each subset's mean over seeds
predicted by the surrogate fitted without it (leave one subset out), per target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from omgseg.platform.study.design import Combination, Comparison, StudyDesign

Cells = dict[tuple[Combination, int], float]  # (combination, seed) -> value


@dataclass(frozen=True)
class SeedFit:
    """One seed's surrogate of one target: the least-squares coefficients over its subsets, with
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


def fit_seed(values: dict[Combination, float], fixed: tuple[str, ...]) -> SeedFit | None:
    """The first-order surrogate over one seed's subsets, each of which holds the `fixed` data
    sets; None without subsets."""
    if not values:
        return None
    subsets = sorted(values)
    sources = tuple(sorted({n for s in subsets for n in s if n not in fixed}))
    x = np.zeros((len(subsets), 1 + len(sources)))
    x[:, 0] = 1.0
    for row, subset in enumerate(subsets):
        for k, name in enumerate(sources):
            x[row, 1 + k] = name in subset
    pinv = np.linalg.pinv(x)
    return SeedFit(sources=sources, beta=pinv @ np.array([values[s] for s in subsets]), basis=pinv @ x, fixed=fixed)


def seed_fits(cells: Cells, design: StudyDesign, target: str) -> dict[int, SeedFit]:
    """The surrogate of `target` at every seed, over the design's sampled subsets among `cells`
    (the target's cells in its scope)."""
    by_seed: dict[int, dict[Combination, float]] = {}
    for (combo, seed), value in cells.items():
        if combo in design.sampled:
            by_seed.setdefault(seed, {})[combo] = value
    fits = {seed: fit_seed(values, (target,)) for seed, values in sorted(by_seed.items())}
    return {seed: fit for seed, fit in fits.items() if fit is not None}


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
    """A surrogate row's per-seed values: the predicted difference at every seed where it is
    estimable, and the two sides' predicted levels where those are too."""

    seeds: list[int]
    differences: list[float]  # level(with) - level(without)
    with_values: list[float] | None  # None when a level is not estimable at some seed
    without_values: list[float] | None


def predicted_row(fits: dict[int, SeedFit], comparison: Comparison) -> PredictedRow:
    """The surrogate's values for `comparison` at every seed whose fit estimates its difference."""
    seeds, differences, with_values, without_values = [], [], [], []
    for seed, fit in sorted(fits.items()):
        d = fit.difference(comparison.with_combo, comparison.without_combo)
        if d is None:
            continue
        seeds.append(seed)
        differences.append(d)
        with_values.append(fit.level(comparison.with_combo))
        without_values.append(fit.level(comparison.without_combo))
    complete = all(v is not None for v in with_values + without_values)
    return PredictedRow(seeds, differences, with_values if complete else None, without_values if complete else None)


@dataclass(frozen=True)
class PredictiveFit:
    """A target's surrogate predicting held-out subsets (leave one subset out, seed means)."""

    subsets: int
    parameters: int
    rmse: float | None
    r2: float | None


def predictive_fit(cells: Cells, design: StudyDesign, target: str) -> PredictiveFit:
    """Each sampled subset's mean over seeds, predicted by the surrogate fitted to the other
    subsets' means; RMSE and R^2 of those predictions (None when fewer subsets than it takes)."""
    sums: dict[Combination, list[float]] = {}
    for (combo, _), value in cells.items():
        if combo in design.sampled:
            sums.setdefault(combo, []).append(value)
    means = {combo: float(np.mean(v)) for combo, v in sums.items()}
    sources = sorted({n for s in means for n in s if n != target})
    errors, observed = [], []
    for held in sorted(means):
        rest = {s: v for s, v in means.items() if s != held}
        fit = fit_seed(rest, (target,))
        predicted = fit.level(held) if fit is not None else None
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
