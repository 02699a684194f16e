"""The statistics of the influence tables (docs/studies.md, "Statistics", has every formula).

Every influence row compares combinations trained at the same seeds. A seed fixes the initial
weights and, through common random numbers, the samples and their treatment, so a row is
estimated seed by seed, where the seed's offset cancels: its per-seed values d_s (for a pair
row, the signed difference of the two combinations at seed s) are the data, their mean the
estimate, their spread the standard error, with S - 1 degrees of freedom for S seeds.
Nothing is pooled across combinations: a combination noisier than the others (a singleton,
in the default study) widens its own rows' intervals and no other's.

This was chosen by simulating null studies of the default design through the table code
(tests/benchmarks/bench_stats.py; tests/platform/study/test_stats.py runs a small version):
with singletons twice as noisy as the rest, one residual variance pooled over all
combinations of a target gave per-row and family-wise false-positive rates above 0.05, a
per-combination variance (estimated from the pooled model's residuals, Satterthwaite degrees
of freedom) kept the per-row rate but not the family-wise one; the per-seed contrast kept
both, at the cost of fewer degrees of freedom when the noise is in fact equal.

- `Contrast`: a row's per-seed values, their mean, standard error, Student-t interval,
  p-value and minimum detectable effect.
- `minimum_detectable_effect`: the effect a two-sided t-test finds with 80 % power.
- `benjamini_hochberg` q-values over a family of rows, the level of the FCR-adjusted intervals
  (Benjamini & Yekutieli 2005), which exclude zero exactly for the rows BH selects.
- `aa_check`: the A/A null check on the rows themselves: each row's seeds split in halves
  whose difference is zero by construction.
- `pairing_ratio`: Var(paired difference) / (Var(with) + Var(without)), the gain of pairing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import stats

ALPHA = 0.05
POWER = 0.8


@dataclass(frozen=True)
class Contrast:
    """A row's per-seed values d_s and the one-sample t statistics of their mean."""

    seeds: tuple[int, ...]
    values: tuple[float, ...]  # d_s, in the order of `seeds`
    estimate: float
    se: float
    df: int
    p_value: float
    ci_low: float
    ci_high: float
    mde: float  # the smallest |effect| detected with POWER at ALPHA (two-sided), at this se and df

    def interval(self, alpha: float) -> tuple[float, float]:
        """The (1 - alpha) Student-t interval."""
        half = float(stats.t.ppf(1 - alpha / 2, self.df)) * self.se
        return self.estimate - half, self.estimate + half


def seed_contrast(per_seed: dict[int, float], alpha: float = ALPHA) -> Contrast | None:
    """The contrast whose value at seed s is per_seed[s]; None with fewer than 2 seeds or no
    spread (the interval would be undefined or of zero width)."""
    seeds = tuple(sorted(per_seed))
    values = np.array([per_seed[s] for s in seeds], dtype=float)
    if len(values) < 2 or not values.std(ddof=1) > 0:
        return None
    test = stats.ttest_1samp(values, 0.0)
    low, high = test.confidence_interval(1 - alpha)
    se = float(values.std(ddof=1) / math.sqrt(len(values)))
    return Contrast(seeds=seeds, values=tuple(float(v) for v in values), estimate=float(values.mean()), se=se,
                    df=int(test.df), p_value=float(test.pvalue), ci_low=float(low), ci_high=float(high),
                    mde=minimum_detectable_effect(se, int(test.df), alpha))


@lru_cache(maxsize=256)
def noncentrality(df: int, alpha: float, power: float) -> float:
    """The noncentrality at which a two-sided one-sample t-test with `df` degrees of freedom
    rejects at `alpha` with probability `power` (statsmodels solves the noncentral t)."""
    from statsmodels.stats.power import TTestPower

    n = df + 1
    return float(TTestPower().solve_power(nobs=n, alpha=alpha, power=power, alternative="two-sided")) * math.sqrt(n)


def _c4(df: int) -> float:
    """E[s] / sigma for a sample standard deviation with `df` degrees of freedom."""
    return math.sqrt(2 / df) * math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2))


def minimum_detectable_effect(se: float, df: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The effect the two-sided t-test at `alpha` detects with probability `power`: the
    noncentral t's noncentrality times the standard error. The estimated se is divided by
    c4(df) first: a sample standard deviation underestimates sigma on average (by 5 % at 5 df),
    and the MDE is meant for the true one."""
    return noncentrality(df, alpha, power) * se / _c4(df)


def benjamini_hochberg(p_values: Sequence[float]) -> list[float]:
    """BH-adjusted p-values (q-values), in the order given."""
    if not len(p_values):
        return []
    return [float(q) for q in stats.false_discovery_control(np.asarray(p_values, dtype=float), method="bh")]


def adjusted_alpha(q_values: Sequence[float], alpha: float = ALPHA) -> float:
    """The level BH used in a family of m rows with R selected at q <= alpha: alpha * R / m, or
    alpha / m when nothing is selected. The FCR-adjusted intervals (Benjamini & Yekutieli 2005)
    and `mde_adjusted` are taken at it."""
    m = len(q_values)
    selected = sum(q <= alpha for q in q_values)
    return alpha * max(selected, 1) / m if m else alpha


def pairing_ratio(with_values: Sequence[float], without_values: Sequence[float]) -> float | None:
    """Var(with - without) / (Var(with) + Var(without)) over paired seeds: below 1, pairing
    (common random numbers) made the difference less noisy than independent runs would."""
    if len(with_values) < 2:
        return None
    a, b = np.asarray(with_values, dtype=float), np.asarray(without_values, dtype=float)
    independent = a.var(ddof=1) + b.var(ddof=1)
    return float((a - b).var(ddof=1) / independent) if independent > 0 else None


def split_half_p(values: Sequence[float]) -> float | None:
    """The A/A test of one row: its per-seed values (in seed order), the first half of the
    seeds against the second, compared by a two-sample t-test with one variance (the row's own
    model: the d_s are exchangeable with one spread). The difference is zero by construction;
    None with fewer than 4 seeds or no spread within the halves."""
    n = len(values)
    if n < 4:
        return None
    first, second = np.array(values[: n // 2], dtype=float), np.array(values[n // 2:], dtype=float)
    if not (first.var(ddof=1) + second.var(ddof=1)) > 0:
        return None
    return float(stats.ttest_ind(first, second).pvalue)


def aa_check(families: dict[str, list[Sequence[float]]], alpha: float = ALPHA) -> dict:
    """The A/A null check, per family of rows (each given by its per-seed values): every row
    with at least 4 seeds is split in seed halves (`split_half_p`), BH over the family's splits; it passes when none is
    significant after correction. It tests the rows' own model on the rows' own trials."""
    out = {}
    for family, rows in families.items():
        p_values = [p for p in (split_half_p(values) for values in rows) if p is not None]
        q_values = benjamini_hochberg(p_values)
        significant = sum(q <= alpha for q in q_values)
        out[family] = {
            "tests": len(p_values),
            "significant_uncorrected": sum(p <= alpha for p in p_values),
            "significant_after_correction": significant,
            "smallest_q": min(q_values) if q_values else None,
            "passed": significant == 0 if p_values else None,
        }
    return out
