"""Mixtures: Dirichlet draws on the simplex, the simplex grid, the Scheffé quadratic model
recovering a known surface through seed offsets, and the recommended mixture with its
bootstrap."""

import numpy as np
import pytest

from omgseg.platform.study.mixtures import dirichlet_mixtures, fit_mixture, recommend_mixture, simplex_grid

NAMES = ("a", "b", "c")


def _surface(r):  # a loss: a alone 3, b alone 4, c alone 5; a and b help each other, a and c hurt
    return 3 * r[0] + 4 * r[1] + 5 * r[2] - 4 * r[0] * r[1] + 2 * r[0] * r[2]


def _trials(noise=0.0, mixtures=15, seeds=(0, 1, 2)):
    rng = np.random.default_rng(0)
    draws = dirichlet_mixtures(NAMES, mixtures, 1.0, seed=3)
    shares, seed_of, label, values = [], [], [], []
    for k, r in enumerate(draws):
        for s in seeds:
            shares.append(r)
            seed_of.append(s)
            label.append(k)
            values.append(_surface(r) + 0.2 * s + noise * rng.normal())
    return np.array(shares), seed_of, np.array(label), np.array(values)


def test_draws_and_the_grid_lie_on_the_simplex():
    draws = dirichlet_mixtures(NAMES, 20, 0.5, seed=1)
    assert len(draws) == 20 and all(abs(sum(d) - 1) < 1e-9 and min(d) >= 0 for d in draws)
    assert draws == dirichlet_mixtures(NAMES, 20, 0.5, seed=1) and draws != dirichlet_mixtures(NAMES, 20, 0.5, seed=2)
    grid = simplex_grid(3, 0.25)
    assert len(grid) == 15 and np.allclose(grid.sum(1), 1) and grid.min() >= 0  # C(4 + 2, 2)
    assert len(simplex_grid(4)) == 1771  # C(20 + 3, 3)


def test_the_scheffe_model_recovers_the_surface_through_seed_offsets():
    shares, seeds, _, values = _trials()
    fit = fit_mixture(NAMES, shares, seeds, values)
    # r_a, r_b, r_c, r_a r_b, r_a r_c, r_b r_c; the seed offsets average 0.2 into every b_i.
    assert fit.coefficients == pytest.approx([3.2, 4.2, 5.2, -4.0, 2.0, 0.0], abs=1e-8)
    low, high = fit.interval(np.array([0.5, 0.5, 0.0]))
    assert low <= 2.7 <= high
    assert fit_mixture(NAMES, shares[:5], seeds[:5], values[:5]) is None  # fewer trials than parameters


def test_the_recommendation_is_the_predicted_best_mixture_with_its_spread():
    shares, seeds, labels, values = _trials(noise=0.05)
    choice = recommend_mixture(NAMES, shares, seeds, values, labels, bootstraps=50)
    # The surface's minimum on the simplex: c out, a and b mixed (d/dr of 3r + 4(1-r) - 4r(1-r) = 0 at r = 5/8).
    assert choice.subset == ("a", "b") and choice.shares["c"] == 0.0
    assert choice.shares["a"] == pytest.approx(0.625, abs=0.06)
    assert choice.predicted_ci[0] <= choice.predicted <= choice.predicted_ci[1]
    assert choice.bootstraps > 40 and choice.in_subset["b"] > 0.9 and choice.in_subset["c"] < 0.1
