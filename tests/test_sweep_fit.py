"""The saturating power law L = E + A X^-alpha: recovery, bootstrap intervals, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from launchers.sweep.fit import bootstrap_fit, fit_power_law


@pytest.mark.parametrize("x, E, A, alpha", [
    ([1, 2, 4, 8, 16], 2.0, 3.0, 0.7),
    ([1, 2, 3], 3.1, 0.9, 1.3),  # three points: the law interpolates them
    ([1e15, 4e15, 1.6e16, 6.4e16], 1.5, 3e4, 0.3),  # FLOPs-sized X
    ([1e6, 3e6, 1e7, 3e7, 1e8], 0.0, 40.0, 0.25),  # pure power law, E on its bound
])
def test_exact_data_gives_back_its_parameters(x, E, A, alpha):
    x = np.array(x, dtype=float)
    e, a, al = fit_power_law(x, E + A * x ** -alpha)
    assert e == pytest.approx(E, abs=1e-4)
    assert a == pytest.approx(A, rel=1e-3)
    assert al == pytest.approx(alpha, rel=1e-4)


def test_noisy_data_intervals_cover_the_truth_and_shrink_with_more_points():
    rng = np.random.default_rng(0)
    truth = {"E": 2.0, "A": 3.0, "alpha": 0.7}

    def fit(repeats: int):
        x = np.repeat([1.0, 2, 4, 8, 16, 32], repeats)
        y = truth["E"] + truth["A"] * x ** -truth["alpha"] + rng.normal(0, 0.01, len(x))
        return bootstrap_fit(x, y, draws=300, seed=1)

    small, large = fit(2), fit(8)
    for name, value in truth.items():
        lo, hi = large.ci(name)
        assert lo <= value <= hi, (name, lo, hi)
        assert large.se(name) < small.se(name)
    band = large.predict_draws([1.0, 10.0, 100.0])
    assert band.shape == (len(large.draws), 3)
    assert large.as_dict()["bootstrap_draws"] == len(large.draws) > 250


def test_too_few_distinct_points_are_refused():
    with pytest.raises(ValueError, match="needs >= 3 distinct positive x"):
        fit_power_law([1, 1, 2], [3.0, 3.0, 2.0])
    with pytest.raises(ValueError, match="needs >= 3 distinct positive x"):
        fit_power_law([0, 1, 2], [3.0, 2.5, 2.0])
