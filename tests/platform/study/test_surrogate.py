"""The sampled design's surrogate: coefficients recovered from an additive truth at every seed,
what the design cannot separate left out, the rows' predicted pairs, and the predictive fit on
held-out subsets."""

import itertools

import numpy as np
import pytest

from omgseg.platform.study.design import StudyDesign
from omgseg.platform.study.surrogate import comparisons, fit_seed, predicted_row, predictive_fit, seed_fits

NAMES = ("a", "b", "c", "d")
EFFECT = {"b": -0.5, "c": 0.8, "d": 0.0}  # on a's loss: b helps (lowers it), c hurts, d nothing
SUBSETS = [s for k in (1, 2, 3) for s in itertools.combinations(NAMES, k) if "a" in s]
DESIGN = StudyDesign(train=NAMES, combinations=tuple(SUBSETS), sampled=tuple(SUBSETS))


def _cells(noise: float = 0.0, seeds=(0, 1, 2, 3)):
    rng = np.random.default_rng(0)
    return {(s, seed): 5.0 + 0.3 * seed + sum(EFFECT[n] for n in s if n != "a") + noise * rng.normal()
            for s in SUBSETS for seed in seeds}


def test_an_additive_truth_is_recovered_at_every_seed():
    fits = seed_fits(_cells(), DESIGN, "a")
    assert sorted(fits) == [0, 1, 2, 3]
    for seed, fit in fits.items():
        assert fit.level(("a",)) == pytest.approx(5.0 + 0.3 * seed)
        assert fit.coefficients == pytest.approx(EFFECT)
    row = next(c for c in comparisons(DESIGN, "a") if c.kind == "surrogate" and c.source == "b")
    assert (row.with_combo, row.without_combo) == (("a", "b"), ("a",))
    found = predicted_row(fits, row)
    assert found.seeds == [0, 1, 2, 3] and found.differences == pytest.approx([-0.5] * 4)
    assert (found.with_values[2], found.without_values[2]) == pytest.approx((5.6 - 0.5, 5.6))


def test_what_the_subsets_cannot_separate_gets_no_value():
    together = [("a",), ("a", "b", "c"), ("a", "d")]  # b and c only ever together
    fit = fit_seed({s: 1.0 + len(s) for s in together}, ("a",))
    assert set(fit.coefficients) == {"d"} and fit.level(("a", "b")) is None and fit.level(("a", "b", "c")) == pytest.approx(4.0)
    assert fit.level(("a", "e")) is None  # a data set no subset had
    # Subsets of one size: every one holds a and two others, so the intercept and the sum of the
    # coefficients cannot be told apart; the differences between coefficients can.
    triples = [s for s in SUBSETS if len(s) == 3] + [("a", "c", "d")]
    fit = fit_seed({s: 5.0 + sum(EFFECT[n] for n in s if n != "a") for s in triples}, ("a",))
    assert fit.coefficients == {} and fit.level(("a",)) is None
    assert fit.difference(("a", "b"), ("a", "d")) == pytest.approx(EFFECT["b"] - EFFECT["d"])


def test_the_predictive_fit_on_held_out_subsets():
    exact = predictive_fit(_cells(), DESIGN, "a")
    assert exact.subsets == len(SUBSETS) and exact.parameters == 4
    assert exact.rmse == pytest.approx(0.0, abs=1e-9) and exact.r2 == pytest.approx(1.0)
    noisy = predictive_fit(_cells(noise=0.3, seeds=(0,)), DESIGN, "a")
    assert noisy.rmse > 0.05 and noisy.r2 < 1.0


def test_an_evaluation_only_target_is_compared_against_no_data_set():
    design = StudyDesign(train=("a", "b"), combinations=(("a",), ("b",), ("a", "b")), sampled=(("a",), ("b",), ("a", "b")))
    rows = comparisons(design, "z")
    assert [(r.source, r.with_combo, r.without_combo) for r in rows] == [("a", ("a",), ()), ("b", ("b",), ())]
