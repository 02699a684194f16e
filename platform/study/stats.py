"""The statistics of the influence tables (docs/studies.md, "Statistics", has every formula).

- `BlockedFit`: per target, the seed-blocked linear model over every combination that has the
  target, y[c, s] = mu_c + beta_s + e, fitted by least squares (statsmodels OLS). Seeds are
  blocks: every combination of a seed shares its initial weights and its samples (common
  random numbers), so a seed's offset cancels from every contrast, and the residual degrees
  of freedom are pooled over all combinations, (C - 1)(S - 1) when complete, instead of the
  S - 1 of one paired difference.
- `Contrast`: an estimate of sum_c w_c mu_c with its standard error, Student-t interval,
  p-value and minimum detectable effect (80 % power at the same alpha, two-sided).
- `benjamini_hochberg` q-values over a family of rows, and FCR-adjusted intervals
  (Benjamini & Yekutieli 2005) that exclude zero exactly for the rows BH selects.
- `aa_check`: the A/A null check, a combination's seeds split in two halves as if they were two
  combinations: the "influence" of nothing.
- `pairing_ratio`: Var(paired difference) / (Var(with) + Var(without)), the gain of pairing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05
POWER = 0.8


@dataclass(frozen=True)
class Contrast:
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


def minimum_detectable_effect(se: float, df: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """(t_{1 - alpha/2, df} + t_{power, df}) * se."""
    return (float(stats.t.ppf(1 - alpha / 2, df)) + float(stats.t.ppf(power, df))) * se


class BlockedFit:
    """The seed-blocked model of one target over (combination, seed, value) cells."""

    def __init__(self, cells: Sequence[tuple[str, int, float]]) -> None:
        import statsmodels.api as sm

        self.combinations = sorted({c for c, _, _ in cells})
        self.seeds = sorted({s for _, s, _ in cells})
        index = {c: i for i, c in enumerate(self.combinations)}
        seeds = {s: i for i, s in enumerate(self.seeds)}
        n_c, n_s = len(self.combinations), len(self.seeds)
        # Columns: one mean per combination, then seed offsets against the first seed.
        x = np.zeros((len(cells), n_c + n_s - 1))
        y = np.zeros(len(cells))
        for row, (combo, seed, value) in enumerate(cells):
            x[row, index[combo]] = 1.0
            if seeds[seed] > 0:
                x[row, n_c + seeds[seed] - 1] = 1.0
            y[row] = value
        self.n = len(cells)
        self.values = y
        self.result = sm.OLS(y, x).fit() if len(cells) else None
        rank = int(np.linalg.matrix_rank(x)) if len(cells) else 0
        self.df = self.n - rank
        self.sigma = float(math.sqrt(self.result.ssr / self.df)) if self.df > 0 else float("nan")
        self._index = index

    def contrast(self, weights: dict[str, float], alpha: float = ALPHA) -> Contrast | None:
        """sum_c weights[c] * mu_c; None when the model has no residual degrees of freedom or
        no residual variance (the interval would be undefined or of zero width), or when the
        contrast is not estimable from the cells."""
        if self.df < 1 or not self.sigma > 0 or any(c not in self._index for c in weights):
            return None
        vector = np.zeros(self.result.params.shape[0])
        for combo, w in weights.items():
            vector[self._index[combo]] = w
        x = self.result.model.exog
        if not np.allclose(vector @ np.linalg.pinv(x) @ x, vector, atol=1e-8):
            return None  # not estimable: the cells cannot separate these combinations from the seeds
        test = self.result.t_test(vector)
        estimate, se = float(np.squeeze(test.effect)), float(np.squeeze(test.sd))
        if not se > 0:
            return None
        low, high = (float(v) for v in np.squeeze(test.conf_int(alpha)))
        return Contrast(estimate=estimate, se=se, df=self.df, p_value=float(np.squeeze(test.pvalue)), ci_low=low,
                        ci_high=high, mde=minimum_detectable_effect(se, self.df, alpha))


def benjamini_hochberg(p_values: Sequence[float]) -> list[float]:
    """BH-adjusted p-values (q-values), in the order given."""
    if not len(p_values):
        return []
    return [float(q) for q in stats.false_discovery_control(np.asarray(p_values, dtype=float), method="bh")]


def adjusted_alpha(q_values: Sequence[float], alpha: float = ALPHA) -> float:
    """The level of the FCR-adjusted intervals of a family of m rows with R selected at q <= alpha:
    alpha * R / m, or alpha / m when nothing is selected (Benjamini & Yekutieli 2005)."""
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


def aa_check(families: dict[str, list[list[tuple[str, int, float]]]], alpha: float = ALPHA) -> dict:
    """The A/A null check, per family: for every target's cells and every combination with at
    least 4 seeds, that combination's seeds are split into two halves (first and second half
    of the sorted seeds) that enter the blocked model as two combinations; the contrast between
    them estimates an effect that is zero by construction. BH over each family's tests; the
    check passes when none is significant after correction."""
    out = {}
    for family, targets in families.items():
        p_values, estimates = [], []
        for cells in targets:
            by_combo: dict[str, list[int]] = {}
            for combo, seed, _ in cells:
                by_combo.setdefault(combo, []).append(seed)
            for combo, seeds in sorted(by_combo.items()):
                if len(seeds) < 4:
                    continue
                first = set(sorted(seeds)[: len(seeds) // 2])
                split = [(f"{c}#A" if s in first else f"{c}#B", s, v) if c == combo else (c, s, v) for c, s, v in cells]
                contrast = BlockedFit(split).contrast({f"{combo}#A": 1.0, f"{combo}#B": -1.0}, alpha)
                if contrast is not None:
                    p_values.append(contrast.p_value)
                    estimates.append(contrast.estimate / contrast.se)
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
