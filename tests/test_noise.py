"""Noise schedules: (alpha, alpha') order, endpoints, monotonicity, and alpha' = d alpha / dt."""

from __future__ import annotations

import pytest
import torch

from e2d2.errors import ConfigError
from e2d2.noise import get_schedule

SCHEDULES = [
    ("linear", {}),
    ("cosine", {}),
    ("exp", {"k": 2.0}),
    ("exp", {"k": 0.5}),
    ("log", {}),
    ("clipped_linear", {"beta_min": 0.3, "beta_max": 0.8}),
]


@pytest.mark.parametrize("name,kw", SCHEDULES)
def test_alpha_prime_is_the_derivative_of_alpha(name, kw):
    schedule = get_schedule(name, **kw)
    t = torch.linspace(0.01, 0.99, 197, dtype=torch.float64)
    h = 1e-6
    numeric = (schedule(t + h)[0] - schedule(t - h)[0]) / (2 * h)
    alpha, alpha_prime = schedule(t)
    # Skip the kink where exp's clamp max(t^k, eps) switches on.
    smooth = ((t - h).pow(kw["k"]) > 1e-3) if name == "exp" else torch.ones_like(t, dtype=torch.bool)
    torch.testing.assert_close(alpha_prime[smooth], numeric[smooth], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,kw", SCHEDULES)
def test_alpha_is_monotone_decreasing_probability(name, kw):
    alpha, alpha_prime = get_schedule(name, **kw)(torch.linspace(0, 1, 101, dtype=torch.float64))
    assert torch.all(alpha[1:] <= alpha[:-1])
    assert torch.all((alpha >= 0) & (alpha <= 1))
    assert torch.all(alpha_prime <= 0)


@pytest.mark.parametrize("name", ["linear", "cosine", "exp", "log"])
def test_endpoints(name):
    alpha, _ = get_schedule(name)(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert alpha[0] > 0.99 and alpha[1] < 0.01


def test_order_is_alpha_then_derivative():
    alpha, alpha_prime = get_schedule("cosine")(torch.tensor([0.5]))
    assert alpha.item() > 0 and alpha_prime.item() < 0


@pytest.mark.parametrize("name,kw,match", [
    ("quadratic", {}, "unknown noise schedule"),
    ("clipped_linear", {"beta_min": 0.9, "beta_max": 0.1}, "beta_min < beta_max"),
    ("exp", {"k": -1.0}, "k > 0"),
    ("linear", {"eps": 0.1}, "bad arguments"),
])
def test_bad_schedule_raises_one_clear_error(name, kw, match):
    with pytest.raises(ConfigError, match=match):
        get_schedule(name, **kw)
