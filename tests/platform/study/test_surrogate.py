"""The sampled design's surrogate: coefficients recovered from an additive truth over the seeds,
sources separated by different subsets at different seeds that no one seed's subsets separate,
what the design cannot separate left out, jackknife intervals that cover the truth at their
level, and the predictive fit on held-out subsets."""

import itertools

import numpy as np
import pytest

from omgseg.platform.study.design import StudyDesign
from omgseg.platform.study.stats import seed_contrast
from omgseg.platform.study.surrogate import comparisons, fit, jackknife, predicted_row, predictive_fit

NAMES = ("a", "b", "c", "d")
EFFECT = {"b": -0.5, "c": 0.8, "d": 0.0}  # on a's loss: b helps (lowers it), c hurts, d nothing
SUBSETS = [s for k in (1, 2, 3) for s in itertools.combinations(NAMES, k) if "a" in s]


def _design(draws) -> StudyDesign:
    combos = tuple(dict.fromkeys(c for _, c in draws))
    return StudyDesign(train=NAMES, combinations=combos, draws=tuple(draws))


EVERY_SEED = _design([(seed, s) for seed in (0, 1, 2, 3) for s in SUBSETS])


def _truth(subset, seed=0, offset=0.3):
    return 5.0 + offset * seed + sum(EFFECT[n] for n in subset if n != "a")


def _cells(noise: float = 0.0, seeds=(0, 1, 2, 3)):
    rng = np.random.default_rng(0)
    return {(s, seed): _truth(s, seed) + noise * rng.normal() for s in SUBSETS for seed in seeds}


def test_an_additive_truth_is_recovered_over_the_seeds():
    fits = jackknife(_cells(), EVERY_SEED, ("a",))
    assert fits.seeds == [0, 1, 2, 3] and fits.full.coefficients == pytest.approx(EFFECT)
    row = next(c for c in comparisons(EVERY_SEED, "a") if c.kind == "surrogate" and c.source == "b")
    assert (row.with_combo, row.without_combo) == (("a", "b"), ("a",))
    found = predicted_row(fits, row)
    assert found.seeds == [0, 1, 2, 3] and found.differences == pytest.approx([-0.5] * 4)
    # the pseudo-values of a level are the seeds' own levels when every seed trained the same subsets
    assert (found.with_values[2], found.without_values[2]) == pytest.approx((5.6 - 0.5, 5.6))


def test_different_subsets_at_different_seeds_separate_what_no_seed_can():
    # each seed trains a with two subsets: one seed cannot fit an intercept and three sources
    draws = [(0, ("a",)), (0, ("a", "b")), (1, ("a", "c")), (1, ("a", "b", "d")), (2, ("a", "d")), (2, ("a", "b", "c")),
             (3, ("a",)), (3, ("a", "c", "d"))]
    design = _design(draws)
    cells = {(c, s): _truth(c, offset=0.0) for s, c in draws}
    for seed in range(4):
        one = fit([(c, v) for (c, s), v in cells.items() if s == seed], ("a",))
        assert len(one.coefficients) < 3
    fits = jackknife(cells, design, ("a",))
    assert fits.full.coefficients == pytest.approx(EFFECT)
    rows = {c.source: predicted_row(fits, c) for c in comparisons(design, "a") if c.kind == "surrogate"}
    assert {n: r.differences for n, r in rows.items()} == {n: pytest.approx([e] * 4) for n, e in EFFECT.items()}


def test_a_row_that_a_seed_left_out_cannot_determine_gets_no_values():
    draws = [(0, ("a",)), (0, ("a", "b")), (0, ("a", "d")), (1, ("a",)), (1, ("a", "b"))]  # d at seed 0 only
    design = _design(draws)
    fits = jackknife({(c, s): _truth(c) for s, c in draws}, design, ("a",))
    rows = {c.source: predicted_row(fits, c) for c in comparisons(design, "a") if c.kind == "surrogate"}
    assert rows["d"].seeds == [] and rows["c"].seeds == []  # c: never trained with a
    assert rows["b"].seeds == [0, 1] and rows["b"].differences == pytest.approx([-0.5, -0.5])


def test_the_jackknife_interval_covers_the_truth_at_its_level():
    """400 noisy studies of 6 seeds x 4 different subsets of 3 or 4 of 7 data sets: the 95 %
    t interval of the pseudo-values covers the planted coefficient about 95 % of the time."""
    names = ("a", "b", "c", "d", "e", "f", "g")
    effect = {"b": -0.4, "c": 0.6, "d": 0.0, "e": 0.2, "f": 0.0, "g": -0.1}
    pool = [c for k in (3, 4) for c in itertools.combinations(names, k) if "a" in c]
    rng = np.random.default_rng(7)
    covered, made = 0, 0
    for _ in range(400):
        draws = [(seed, pool[i]) for seed in range(6) for i in rng.choice(len(pool), 4, replace=False)]
        design = StudyDesign(train=names, combinations=tuple(dict.fromkeys(c for _, c in draws)), draws=tuple(draws))
        cells = {(c, s): 2.0 + sum(effect[n] for n in c if n != "a") + 0.3 * rng.normal() for s, c in draws}
        row = next(c for c in comparisons(design, "a") if c.kind == "surrogate" and c.source == "b")
        found = predicted_row(jackknife(cells, design, ("a",)), row)
        if not found.seeds:
            continue
        contrast = seed_contrast(dict(zip(found.seeds, found.differences)))
        made += 1
        covered += contrast.ci_low <= effect["b"] <= contrast.ci_high
    assert made > 300 and 0.90 <= covered / made <= 0.995


def test_what_the_subsets_cannot_separate_gets_no_value():
    together = [("a",), ("a", "b", "c"), ("a", "d")]  # b and c only ever together
    found = fit([(s, 1.0 + len(s)) for s in together], ("a",))
    assert set(found.coefficients) == {"d"} and found.level(("a", "b")) is None
    assert found.level(("a", "b", "c")) == pytest.approx(4.0)
    assert found.level(("a", "e")) is None  # a data set no subset had
    # Subsets of one size: every one holds a and two others, so the intercept and the sum of the
    # coefficients cannot be told apart; the differences between coefficients can.
    triples = [s for s in SUBSETS if len(s) == 3] + [("a", "c", "d")]
    found = fit([(s, _truth(s)) for s in triples], ("a",))
    assert found.coefficients == {} and found.level(("a",)) is None
    assert found.difference(("a", "b"), ("a", "d")) == pytest.approx(EFFECT["b"] - EFFECT["d"])


def test_the_predictive_fit_on_held_out_subsets():
    exact = predictive_fit(_cells(), EVERY_SEED, "a")
    assert exact.subsets == len(SUBSETS) and exact.parameters == 4
    assert exact.rmse == pytest.approx(0.0, abs=1e-9) and exact.r2 == pytest.approx(1.0)
    noisy = predictive_fit(_cells(noise=0.3, seeds=(0,)), EVERY_SEED, "a")
    assert noisy.rmse > 0.05 and noisy.r2 < 1.0


def test_an_evaluation_only_target_is_compared_against_no_data_set():
    design = StudyDesign(train=("a", "b"), combinations=(("a",), ("b",), ("a", "b")),
                         draws=((0, ("a",)), (0, ("b",)), (0, ("a", "b"))))
    rows = comparisons(design, "z")
    assert [(r.source, r.with_combo, r.without_combo) for r in rows] == [("a", ("a",), ()), ("b", ("b",), ())]
