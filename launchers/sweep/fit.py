"""Saturating power law ``L = E + A * X^-alpha`` with bootstrap confidence intervals.

For a fixed ``alpha`` the model is linear in ``(E, A)``, so the least-squares fit is a 1-D
search over ``alpha`` (a log grid, refined around its minimum) with ``(E, A)`` solved in
closed form under ``E >= 0, A >= 0`` (variable projection: no local minima in ``E, A``, no
starting point to guess). ``X`` is scaled by its smallest value inside the fit, which keeps
FLOPs-sized inputs well conditioned; ``A`` is reported in the original units.

Uncertainty: case-resampling bootstrap (points drawn with replacement, refit); standard
errors are the bootstrap standard deviations and intervals the percentile intervals.
Resamples with fewer than three distinct ``X`` cannot identify three parameters and are
dropped. With exactly three points the fit interpolates them and the intervals say little.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALPHA_RANGE = (1e-3, 5.0)
PARAMS = ("E", "A", "alpha")


def _linear(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``min ||E + A z - y||^2`` over ``E, A >= 0`` for each row of ``z [G, n]``:
    ``(E [G], A [G], sse [G])``. The constrained optimum is the unconstrained one when it is
    feasible, else the best of the two boundary fits (``E = 0`` or ``A = 0``)."""
    zm = z.mean(axis=1, keepdims=True)
    zc, yc = z - zm, y - y.mean()
    denom = (zc * zc).sum(axis=1)
    a_free = np.where(denom > 0, (zc * yc).sum(axis=1) / np.where(denom > 0, denom, 1), -1.0)
    e_free = y.mean() - a_free * zm[:, 0]
    zz = (z * z).sum(axis=1)
    a_zero_e = np.maximum((z * y).sum(axis=1) / np.where(zz > 0, zz, 1), 0.0)
    candidates = [  # (E, A) per row
        (np.zeros_like(a_zero_e), a_zero_e),
        (np.full_like(a_zero_e, max(float(y.mean()), 0.0)), np.zeros_like(a_zero_e)),
    ]
    feasible = (a_free >= 0) & (e_free >= 0)
    candidates.append((np.where(feasible, e_free, np.nan), np.where(feasible, a_free, np.nan)))
    sse = np.stack([np.nan_to_num(((e[:, None] + a[:, None] * z - y) ** 2).sum(axis=1),
                                  nan=np.inf) for e, a in candidates])
    best = sse.argmin(axis=0)
    rows = np.arange(z.shape[0])
    e = np.stack([c[0] for c in candidates])[best, rows]
    a = np.stack([c[1] for c in candidates])[best, rows]
    return e, a, sse[best, rows]


def _fit_scaled(xs: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least squares on ``xs >= 1``: ``(E, A_scaled, alpha)``: a log grid over ``alpha``,
    refined four times around its best value."""
    lo, hi = np.log(ALPHA_RANGE[0]), np.log(ALPHA_RANGE[1])
    for _ in range(5):
        grid = np.linspace(lo, hi, 65)
        e, a, sse = _linear(xs[None, :] ** -np.exp(grid)[:, None], y)
        i = int(np.argmin(sse))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    return float(e[i]), float(a[i]), float(np.exp(grid[i]))


def fit_power_law(x, y) -> tuple[float, float, float]:
    """Least-squares ``(E, A, alpha)`` of ``y = E + A x^-alpha`` (needs 3 distinct x > 0)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("x and y must be 1-D and of equal length")
    if np.any(x <= 0) or len(np.unique(x)) < 3:
        raise ValueError(f"a saturating power law needs >= 3 distinct positive x, got {x.tolist()}")
    scale = float(x.min())
    e, a_scaled, alpha = _fit_scaled(x / scale, y)
    return e, a_scaled * scale ** alpha, alpha


@dataclass(frozen=True)
class PowerLawFit:
    """A fit and its bootstrap draws ``[draws, 3]`` (columns E, A, alpha)."""

    E: float
    A: float
    alpha: float
    n: int
    rmse: float
    draws: np.ndarray

    def predict(self, x) -> np.ndarray:
        return self.E + self.A * np.asarray(x, dtype=float) ** -self.alpha

    def predict_draws(self, x) -> np.ndarray:
        """``[draws, len(x)]`` curves of the bootstrap fits (for confidence bands)."""
        x = np.asarray(x, dtype=float)
        e, a, alpha = (self.draws[:, i:i + 1] for i in range(3))
        return e + a * x[None, :] ** -alpha

    def se(self, name: str) -> float:
        column = self.draws[:, PARAMS.index(name)]
        return float(column.std(ddof=1)) if len(column) > 1 else float("nan")

    def ci(self, name: str, level: float = 0.95) -> tuple[float, float]:
        column = self.draws[:, PARAMS.index(name)]
        if len(column) == 0:
            return float("nan"), float("nan")
        tail = (1 - level) / 2 * 100
        lo, hi = np.percentile(column, [tail, 100 - tail])
        return float(lo), float(hi)

    def as_dict(self) -> dict:
        out: dict = {"n": self.n, "rmse": self.rmse, "bootstrap_draws": len(self.draws)}
        for name in PARAMS:
            lo, hi = self.ci(name)
            out |= {name: getattr(self, name), f"{name}_se": self.se(name),
                    f"{name}_ci_low": lo, f"{name}_ci_high": hi}
        return out


def bootstrap_fit(x, y, draws: int = 1000, seed: int = 0) -> PowerLawFit:
    """``fit_power_law`` plus ``draws`` case-resampling bootstrap refits."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    e, a, alpha = fit_power_law(x, y)
    rmse = float(np.sqrt(np.mean((e + a * x ** -alpha - y) ** 2)))
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(draws):
        idx = rng.integers(0, len(x), len(x))
        if len(np.unique(x[idx])) < 3:
            continue
        samples.append(fit_power_law(x[idx], y[idx]))
    return PowerLawFit(e, a, alpha, len(x), rmse, np.array(samples, dtype=float).reshape(-1, 3))
