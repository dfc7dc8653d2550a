"""Scaling-law fits (launchers/sweep/fit.py): honest intervals on synthetic data with known
parameters, and degenerate data reported as not identified instead of fitted."""

from __future__ import annotations

import numpy as np
import pytest

from launchers.sweep.fit import EXPONENT_RANGE, fit, fit_many, fit_sigmoid, sigmoid

REPLICATES, DRAWS = 200, 60


def _runs(rng, truth: np.ndarray, seeds: int, noise: float) -> list[np.ndarray]:
    """Each point's runs: the law times log-normal noise (what seeds do to a loss)."""
    return [t * np.exp(rng.normal(0.0, noise, seeds)) for t in truth]


def _coverage(form: str, x: np.ndarray, truth: dict[str, float], seeds: int, noise: float
              ) -> dict[str, float]:
    rng = np.random.default_rng(1234)
    x0 = np.exp(np.log(x.reshape(len(x), -1)).mean(axis=0))
    X = x.reshape(len(x), -1) / x0
    law = truth["E"] + truth["A"] * X[:, 0] ** -truth["alpha"]
    if form == "joint":
        law = law + truth["B"] * X[:, 1] ** -truth["beta"]
    fits = fit_many(form, x, [_runs(rng, law, seeds, noise) for _ in range(REPLICATES)],
                    draws=DRAWS, seed=5)
    assert sum(f.identified for f in fits) >= 0.95 * REPLICATES, [f.reason for f in fits][:5]
    cover = {}
    for name, value in truth.items():
        inside = [lo <= value <= hi for f in fits if f.identified for lo, hi in [f.ci(name)]]
        cover[name] = float(np.mean(inside))
    return cover


def test_single_axis_intervals_cover_the_truth_at_their_level():
    """L = E + A (x/x0)^-alpha, 6 depths x 8 seeds, 1% noise per run: the 95% intervals
    cover the known parameters in 90-98% of 200 data sets."""
    cover = _coverage("single", np.array([1.0, 2, 3, 4, 6, 8]),
                      {"E": 2.0, "A": 1.0, "alpha": 0.7}, seeds=8, noise=0.01)
    assert all(0.90 <= c <= 0.98 for c in cover.values()), cover


def test_joint_intervals_cover_the_truth_at_their_level():
    """Chinchilla's L = E + A (N/N0)^-alpha + B (D/D0)^-beta over 4 sizes x 3 budgets, 8 seeds."""
    x = np.array([(n, d) for n in np.geomspace(1e6, 1e8, 4) for d in np.geomspace(1e8, 1e10, 3)])
    cover = _coverage("joint", x, {"E": 1.5, "A": 1.0, "alpha": 0.4, "B": 0.8, "beta": 0.3},
                      seeds=8, noise=0.01)
    assert all(0.90 <= c <= 0.98 for c in cover.values()), cover


def test_exact_data_gives_back_its_parameters():
    x = np.array([1.0, 2, 4, 8, 16, 32])
    x0 = np.exp(np.log(x).mean())
    law = 2.0 + 3.0 * (x / x0) ** -0.7
    runs = [v * np.array([0.999, 1.001]) for v in law]  # a little spread: an interval exists
    result = fit("single", x, runs, draws=100)
    assert result.identified, result.reason
    assert result.params["E"] == pytest.approx(2.0, rel=1e-3)
    assert result.params["A"] == pytest.approx(3.0, rel=1e-3)
    assert result.params["alpha"] == pytest.approx(0.7, rel=1e-3)
    assert result.x0 == pytest.approx((x0,))
    band = result.predict_draws([1.0, 10.0])
    assert band.shape == (100, 2) and result.predict([x0])[0] == pytest.approx(5.0, rel=1e-3)


@pytest.mark.parametrize("x, reason", [
    ([1.0, 2.0], "2 points for 3 parameters (needs >= 5)"),
    ([1.0, 2.0, 4.0], "3 points for 3 parameters (needs >= 5)"),
])
def test_too_few_points_are_not_identified(x, reason):
    result = fit("single", x, [[3.0 + 1 / v, 3.01 + 1 / v] for v in x], draws=20)
    assert not result.identified and result.reason == reason
    assert "E" not in result.as_dict()  # no numbers, not even with +- 0


def test_flat_data_is_not_identified():
    rng = np.random.default_rng(0)
    runs = [7.05 + rng.normal(0, 0.01, 2) for _ in range(6)]
    result = fit("single", [1.0, 2, 3, 4, 6, 8], runs, draws=100)
    assert not result.identified
    assert "bound" in result.reason or "decade" in result.reason, result.reason


def test_an_exponent_at_its_bound_is_not_identified():
    """A step from the first point to the rest wants alpha far above the search range."""
    x = np.array([1.0, 2, 3, 4, 6, 8])
    law = 2.0 + 1.0 * x ** -40.0
    result = fit("single", x, [v * np.array([0.999, 1.001]) for v in law], draws=50)
    assert not result.identified and "alpha" in result.reason.split(" at a bound")[0], result.reason
    assert EXPONENT_RANGE[1] == pytest.approx(result.params["alpha"], rel=1e-2)


def test_one_run_per_point_has_no_interval():
    x = np.array([1.0, 2, 4, 8, 16, 32])
    result = fit("single", x, [[2.0 + v ** -0.5] for v in x], draws=50)
    assert not result.identified and "one run per point" in result.reason


# OLMo's two-step chain on synthetic ladders: a known loss law, a known sigmoid of the loss
LAW = {"E": 2.0, "A": 1.0, "alpha": 0.4, "B": 0.8, "beta": 0.3}  # N, D over 1e7, 1e9
CURVE = {"a": 0.6, "L0": 4.0, "k": 2.5, "b": 0.25}  # acc = b + a / (1 + exp(k (L - L0)))
ITEMS = 400  # per task: binomial noise of the accuracy


def _loss(n, d):
    return LAW["E"] + LAW["A"] * (n / 1e7) ** -LAW["alpha"] + LAW["B"] * (d / 1e9) ** -LAW["beta"]


def _ladder(rng, flat: bool = False, seeds: int = 4) -> list[dict]:
    """Points as ``collect.point_rows`` makes them: 4 sizes x 3 budgets, each run's loss the
    law with 1% noise and its accuracy the sigmoid of that loss over ``ITEMS`` items (chance
    everywhere if ``flat``)."""
    points = []
    for n in np.geomspace(1e6, 1e8, 4):
        for d in np.geomspace(1e8, 1e10, 3):
            losses = _loss(n, d) * np.exp(rng.normal(0, 0.01, seeds))
            p = np.full(seeds, CURVE["b"]) if flat else \
                sigmoid(np.array([list(CURVE.values())]), losses)[0]
            accs = rng.binomial(ITEMS, p) / ITEMS
            points.append({"point": f"n{n:.0e}-d{d:.0e}", "baseline": None, "tokens": d,
                           "non_embedding_params": n, "train_flops": 6 * n * d,
                           "samples": {"loss": [(k, v, 0.01) for k, v in enumerate(losses)],
                                       "acc": [(k, v, np.sqrt(v * (1 - v) / ITEMS))
                                               for k, v in enumerate(accs)]}})
    return points


def test_two_step_chain_recovers_a_known_sigmoid_and_covers_the_held_out_accuracy(tmp_path):
    """12 synthetic ladders: step 1 (the joint fit without the largest point) chained with
    step 2 (the sigmoid over the other runs) predicts the largest point's accuracy; the 95%
    intervals of the sigmoid's parameters and of the prediction cover the truth in most."""
    from launchers.sweep import analysis
    from launchers.sweep.collect import response_points
    from launchers.sweep.evals import Metric

    rng = np.random.default_rng(7)
    truth = float(sigmoid(np.array([list(CURVE.values())]), [_loss(1e8, 1e10)])[0, 0])
    covered, params = [], {name: [] for name in CURVE}
    for _ in range(12):
        points = _ladder(rng)
        reduced, _ = analysis.validate(response_points(points, Metric("loss", False)), 80)
        curve, [row] = analysis.two_step(points, "loss", "acc", reduced, 80)
        assert curve.identified and reduced.identified, (curve.reason, reduced.reason)
        assert row["point"] == "n1e+08-d1e+10" and row["note"] == ""
        covered.append(row["predicted_ci_low"] <= truth <= row["predicted_ci_high"])
        for name, value in CURVE.items():
            lo, hi = curve.ci(name)
            params[name].append(lo <= value <= hi)
    assert np.mean(covered) >= 0.75, covered
    from launchers.sweep.plots import two_step_plot

    assert two_step_plot(tmp_path, points, "loss", "acc", curve, [row]) == "two_step_acc.png"
    assert (tmp_path / "two_step_acc.png").read_bytes()[:4] == b"\x89PNG"
    assert all(np.mean(c) >= 0.75 for c in params.values()), params


def test_two_step_at_chance_everywhere_is_not_identified():
    from launchers.sweep import analysis

    curve, [row] = analysis.two_step(_ladder(np.random.default_rng(0), flat=True), "loss",
                                     "acc", None, 50)
    assert not curve.identified and "does not fall with the loss" in curve.reason
    assert "predicted" not in row and row["note"].startswith("step 2 not identified")
    assert "a" not in curve.as_dict()  # no numbers
    too_few = fit_sigmoid([3.0, 3.5, 4.0], [0.8, 0.5, 0.3], draws=10)
    assert not too_few.identified and too_few.reason == "3 runs for 4 parameters (needs >= 6)"
