"""Mixing ratios as a design and as a prediction: Dirichlet draws on the simplex for a ratio
sweep, and a mixture model fitted to the swept trials that predicts the best mixture for an
objective, with its uncertainty.

The model is Scheffé's quadratic mixture polynomial (the textbook model of mixture
experiments, Cornell 2002), with a block per seed:

    y = sum_i b_i r_i + sum_{i<j} b_ij r_i r_j + o_seed + e,      sum_i r_i = 1

where r are the realised sample shares of the trial's data sets (a data set a trial did not
train has share 0). b_i is the objective when training on i alone, b_ij the interaction of
i and j: negative where the two help each other (for a loss), positive where they hurt. It is
fitted by least squares (statsmodels OLS). The recommendation is the mixture that minimises the
predicted objective over a grid on the simplex (every mixture whose shares are multiples of
`GRID` : subsets are its faces); its uncertainty is the prediction's confidence interval and
the spread of the recommended shares over bootstrap refits (mixtures resampled with their
seeds), with how often each data set is in the recommended subset.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

GRID = 0.05  # the simplex grid's step
IN_SUBSET = 0.05  # a share below this counts as leaving the data set out


def dirichlet_mixtures(names: tuple[str, ...], count: int, concentration: float, seed: int) -> list[tuple[float, ...]]:
    """`count` mixtures of `names` drawn from a symmetric Dirichlet(`concentration`), rounded
    to 3 decimals and renormalised (the ratios a trial's config records)."""
    rng = np.random.default_rng(seed)
    out = []
    for draw in rng.dirichlet([concentration] * len(names), size=count):
        rounded = np.maximum(np.round(draw, 3), 0.0)
        out.append(tuple(float(v) for v in rounded / rounded.sum()))
    return out


def simplex_grid(n: int, step: float = GRID) -> np.ndarray:
    """Every point of the n-simplex whose coordinates are multiples of `step`: (points, n)."""
    units = round(1 / step)
    points = [np.diff([-1, *bars, units + n - 1]) - 1  # stars and bars: n - 1 bars among units + n - 1 places
              for bars in itertools.combinations(range(units + n - 1), n - 1)]
    return np.array(points, dtype=float) / units


def scheffe_terms(shares: np.ndarray) -> np.ndarray:
    """The quadratic Scheffé terms of shares (rows x n): r_i, then r_i r_j for i < j."""
    n = shares.shape[1]
    pairs = [shares[:, i] * shares[:, j] for i, j in itertools.combinations(range(n), 2)]
    return np.column_stack([shares, *pairs]) if pairs else shares


@dataclass(frozen=True)
class MixtureFit:
    """The fitted mixture model of one objective."""

    names: tuple[str, ...]
    coefficients: np.ndarray  # the Scheffé terms' (seed blocks averaged into them)
    covariance: np.ndarray  # of those coefficients
    df: int
    sigma: float

    def predict(self, shares: np.ndarray) -> np.ndarray:
        return scheffe_terms(np.atleast_2d(shares)) @ self.coefficients

    def interval(self, shares: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
        """The (1 - alpha) confidence interval of the predicted mean objective at `shares`."""
        from scipy import stats

        x = scheffe_terms(np.atleast_2d(shares))[0]
        se = float(np.sqrt(x @ self.covariance @ x))
        half = float(stats.t.ppf(1 - alpha / 2, self.df)) * se
        mean = float(x @ self.coefficients)
        return mean - half, mean + half


def fit_mixture(names: tuple[str, ...], shares: np.ndarray, seeds: list[int], values: np.ndarray) -> MixtureFit | None:
    """The Scheffé quadratic model with seed blocks (sum-to-zero, so the coefficients are the
    seed-averaged surface); None when there are fewer trials than parameters plus one."""
    import statsmodels.api as sm

    terms = scheffe_terms(shares)
    distinct = sorted(set(seeds))
    blocks = np.zeros((len(seeds), max(len(distinct) - 1, 0)))
    for row, seed in enumerate(seeds):  # effect coding: the last seed is minus the sum of the others
        k = distinct.index(seed)
        if k < len(distinct) - 1:
            blocks[row, k] = 1.0
        else:
            blocks[row, :] = -1.0
    x = np.column_stack([terms, blocks]) if blocks.shape[1] else terms
    if len(values) <= x.shape[1] or np.linalg.matrix_rank(x) < x.shape[1]:
        return None
    result = sm.OLS(values, x).fit()
    k = terms.shape[1]
    return MixtureFit(names=names, coefficients=np.asarray(result.params[:k]),
                      covariance=np.asarray(result.cov_params())[:k, :k], df=int(result.df_resid),
                      sigma=float(np.sqrt(result.scale)))


@dataclass(frozen=True)
class MixtureChoice:
    """The mixture a fit predicts best, with its uncertainty."""

    shares: dict[str, float]
    predicted: float
    predicted_ci: tuple[float, float]
    subset: tuple[str, ...]  # the data sets with a share of at least IN_SUBSET
    share_intervals: dict[str, tuple[float, float]]  # 2.5 and 97.5 percentiles over bootstrap refits
    in_subset: dict[str, float]  # how often each data set is in the recommended subset over the refits
    bootstraps: int


def best_mixture(fit: MixtureFit, grid: np.ndarray) -> np.ndarray:
    return grid[int(np.argmin(fit.predict(grid)))]


def recommend_mixture(names: tuple[str, ...], shares: np.ndarray, seeds: list[int], values: np.ndarray,
                      mixtures: np.ndarray, bootstraps: int = 200, seed: int = 0) -> MixtureChoice | None:
    """The best mixture of `fit_mixture(names, shares, seeds, values)` over the simplex grid,
    and its bootstrap: `mixtures` labels each row's mixture (rows of one mixture, one per seed,
    are resampled together)."""
    fit = fit_mixture(names, shares, seeds, values)
    if fit is None:
        return None
    grid = simplex_grid(len(names))
    best = best_mixture(fit, grid)
    rng = np.random.default_rng(seed)
    labels = sorted(set(mixtures.tolist()))
    picked = []
    for _ in range(bootstraps):
        chosen = rng.choice(len(labels), size=len(labels), replace=True)
        rows = np.concatenate([np.flatnonzero(mixtures == labels[k]) for k in chosen])
        refit = fit_mixture(names, shares[rows], [seeds[r] for r in rows], values[rows])
        if refit is not None:
            picked.append(best_mixture(refit, grid))
    spread = np.array(picked) if picked else np.empty((0, len(names)))
    return MixtureChoice(
        shares={n: float(v) for n, v in zip(names, best)}, predicted=float(fit.predict(best)[0]),
        predicted_ci=fit.interval(best), subset=tuple(n for n, v in zip(names, best) if v >= IN_SUBSET),
        share_intervals={n: (float(np.percentile(spread[:, k], 2.5)), float(np.percentile(spread[:, k], 97.5)))
                         for k, n in enumerate(names)} if len(spread) else {},
        in_subset={n: float(np.mean(spread[:, k] >= IN_SUBSET)) for k, n in enumerate(names)} if len(spread) else {},
        bootstraps=len(spread))
