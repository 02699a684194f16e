"""The influence rows' statistics: the per-seed contrast against scipy's paired t-test, the MDE
against the noncentral t's power, the A/A split, and simulated studies of the default design
through the real table code (tests/nullstudies.py): false-positive rates with singletons twice
as noisy as the rest, and power at the rows' reported MDE. The full simulation is the slow
test below and tests/benchmarks/bench_stats.py; the default suite runs a smaller one, whose
thresholds allow two Monte-Carlo errors."""

import math

import numpy as np
import pytest
from nullstudies import Simulation, default_design, null_rates, pair_effect, power, singletons_noisier
from scipy import stats

from omgseg.platform.study.stats import (
    ALPHA,
    POWER,
    aa_check,
    minimum_detectable_effect,
    noncentrality,
    seed_contrast,
    split_half_p,
)

ROW = ("vipseg", "coco", "object_queries")  # the noisy singleton {coco} against {coco, vipseg}


def test_a_seed_contrast_is_the_paired_t_test():
    rng = np.random.default_rng(3)
    with_values, without_values = rng.normal(1.0, 1.0, 6), rng.normal(0.0, 2.0, 6)
    contrast = seed_contrast({s: a - b for s, (a, b) in enumerate(zip(with_values, without_values))})
    paired = stats.ttest_rel(with_values, without_values)
    assert contrast.p_value == pytest.approx(paired.pvalue) and contrast.df == 5
    assert contrast.estimate == pytest.approx(np.mean(with_values - without_values))
    assert (contrast.ci_low, contrast.ci_high) == pytest.approx(tuple(paired.confidence_interval(0.95)))
    assert contrast.interval(ALPHA) == pytest.approx((contrast.ci_low, contrast.ci_high))
    assert seed_contrast({0: 1.0}) is None and seed_contrast({0: 1.0, 1: 1.0}) is None  # one seed; no spread


def test_the_mde_is_where_the_noncentral_t_has_80_percent_power():
    for df in (2, 5, 15):
        ncp = noncentrality(df, ALPHA, POWER)
        critical = stats.t.ppf(1 - ALPHA / 2, df)
        assert stats.nct.sf(critical, df, ncp) + stats.nct.cdf(-critical, df, ncp) == pytest.approx(POWER, abs=1e-4)
    # The estimated se is divided by c4 (E[s] = c4 sigma): at 5 df, c4 = 0.9515.
    assert minimum_detectable_effect(1.0, 5) == pytest.approx(noncentrality(5, ALPHA, POWER) / 0.9515, rel=1e-4)
    assert minimum_detectable_effect(1.0, 5, alpha=0.005) > minimum_detectable_effect(1.0, 5)


def test_the_a_a_split_compares_seed_halves():
    values = [0.1, -0.2, 0.05, 3.1, 2.9, 3.2]
    assert split_half_p(values) == pytest.approx(stats.ttest_ind(values[:3], values[3:]).pvalue)
    assert split_half_p(values[:3]) is None  # fewer than 4 seeds
    check = aa_check({"primary": [values, [0.1, -0.1, 0.2, 0.0, 0.1, -0.2]], "secondary": []})
    assert check["primary"]["tests"] == 2 and check["primary"]["significant_after_correction"] == 1
    assert not check["primary"]["passed"] and check["secondary"]["passed"] is None


def _check_rates(studies: int, tolerance: float) -> None:
    """Null studies with singletons 2x noisier: per-row and family-wise false-positive rates <=
    0.06 (+ tolerance Monte-Carlo errors); power at the row's mean reported MDE >= 0.75; with
    equal noise, power at the pooled model's MDE at least 3/4 of its 80 %."""
    design = default_design()
    rates = null_rates(Simulation(design, singletons_noisier(2.0)), studies)
    assert rates.per_row <= 0.06 + tolerance * rates.monte_carlo_error(0.06), rates
    assert rates.family_wise <= 0.06 + tolerance * rates.monte_carlo_error(0.06), rates
    key, effect = pair_effect(design, *ROW, size=rates.mde[("pair", *ROW)])
    found = power(Simulation(design, singletons_noisier(2.0), [effect]), key, studies)
    assert found >= 0.75 - tolerance * math.sqrt(0.75 * 0.25 / studies), found
    # Equal noise (sigma 1): the pooled model's MDE with 15 df, its 80 % power point.
    pooled_mde = noncentrality(15, ALPHA, POWER) * math.sqrt(2 / len(design.seeds))
    key, effect = pair_effect(design, *ROW, size=pooled_mde)
    equal = power(Simulation(design, singletons_noisier(1.0), [effect]), key, studies)
    assert equal >= 0.75 * POWER - tolerance * math.sqrt(0.6 * 0.4 / studies), equal


def test_simulated_studies_of_the_default_design_small():
    _check_rates(studies=150, tolerance=2.0)


@pytest.mark.slow
def test_simulated_studies_of_the_default_design():
    _check_rates(studies=3000, tolerance=0.0)
