"""Scaling-law functional forms, fitted as Hoffmann et al. (2022, approach 3) and OLMo's ladder do.

Forms (``x0`` is the geometric mean of the data's values of each axis, so that ``A`` and ``B``
are the reducible losses at the data's centre: in the units of ``x`` they would be tied to the
exponents and their intervals would span decades for no reason):

* ``single``: ``L = E + A (x / x0)^-alpha``;
* ``joint`` (Chinchilla): ``L = E + A (N / N0)^-alpha + B (D / D0)^-beta``;
* ``sigmoid`` (step 2 of OLMo's ladder, Bhagia et al. 2024: task accuracy from a loss):
  ``acc = b + a / (1 + exp(k (L - L0)))``, ``k > 0`` (accuracy rises as the loss falls, from
  the floor ``b`` to ``b + a``; OLMo writes ``a / (1 + exp(-k (L - L0))) + b`` with ``k < 0``).
  Fitted by ``fit_sigmoid`` (least squares over the runs, scipy's ``least_squares``).

The fit minimises a Huber loss on log residuals ``log f(x) - log L`` with scipy's L-BFGS-B
within the bounds of ``search_range``, from the best points of a grid of starts; ``E``, ``A``
and ``B`` are searched in log space. Huber's ``delta`` is ``HUBER_NOISE`` standard errors of a
point's log mean (quadratic within the noise, linear for an outlying point); Hoffmann et al.'s
1e-3 where the noise is unknown (one run per point). Many problems of one form (the starts,
the bootstrap resamples) are solved ``CHUNK`` at a time as one L-BFGS-B problem whose
variables are the stacked parameter vectors: the objective is a sum of independent terms, so
its minimum is each term's minimum, and one call costs less than many small ones.

Uncertainty: a bootstrap that resamples the runs (seeds) within each point, with replacement,
and refits the points' means from the full-data optimum. Resampling ``n`` runs shrinks the
variance of their mean by ``(n - 1) / n``; each run's deviation from its point's mean is widened by
``sqrt(n / (n - 1))`` first, so that the resampled means vary as much as the means of new runs
would. Intervals are percentile intervals of the refits.

A fit is *not identified* (``Fit.identified`` is False, with the reason) when it has fewer
points than parameters + 2, when a parameter sits at a bound of its search range, or when a
95% interval is degenerate (no spread: one run per point) or spans more than a decade.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

HUBER_DELTA = 1e-3  # Hoffmann et al.'s, where the points' noise is unknown
HUBER_NOISE = 1.345  # else delta = this many standard errors of a point's log mean (Huber's
# choice: 95% efficiency under Gaussian noise, robust to an outlying point)
CHUNK = 128  # problems per L-BFGS-B call: larger solves converge in fewer steps per problem
EXPONENT_RANGE = (0.01, 4.0)
LEVEL = 0.95
STARTS = 4  # L-BFGS-B runs per fit, from the best points of the grid of starts
FORMS = {"single": ("E", "A", "alpha"), "joint": ("E", "A", "alpha", "B", "beta"),
         "sigmoid": ("a", "L0", "k", "b")}
Z = 2.0  # standard errors of about a 95% two-sided test (a difference, a slope against 0)


def search_range(form: str, y: np.ndarray) -> np.ndarray:
    """``[p, 2]`` bounds of the optimisation variables ``(log E, log A, alpha[, log B,
    beta])``: ``E`` up to the lowest loss, the reducible terms from 1e-4 to 10 times the
    highest, the exponents in ``EXPONENT_RANGE``."""
    lo, hi = float(np.min(y)), float(np.max(y))
    term = (np.log(1e-4 * hi), np.log(10 * hi))
    rows = [(np.log(1e-3 * lo), np.log(lo)), term, EXPONENT_RANGE]
    if form == "joint":
        rows += [term, EXPONENT_RANGE]
    return np.array(rows, dtype=float)


def _model(theta: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """``f [R, n]`` and its terms for parameters ``theta [R, p]`` at ``z = log(x / x0) [n, k]``."""
    terms = [np.exp(theta[:, :1]) * np.ones(z.shape[0])]
    for k in range(z.shape[1]):
        c, g = theta[:, 1 + 2 * k:2 + 2 * k], theta[:, 2 + 2 * k:3 + 2 * k]
        terms.append(np.exp(c - g * z[None, :, k]))
    return sum(terms), terms


def _huber(r: np.ndarray, delta: np.ndarray) -> np.ndarray:
    absr = np.abs(r)
    return np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta))


def _objective(flat: np.ndarray, z: np.ndarray, log_y: np.ndarray, delta: np.ndarray, p: int):
    """Sum over problems of the Huber loss of log residuals, and its gradient."""
    theta = flat.reshape(-1, p)
    f, terms = _model(theta, z)
    r = np.log(f) - log_y
    loss = _huber(r, delta)
    dr = np.clip(r, -delta, delta) / f  # d loss / d f
    grad = np.empty_like(theta)
    grad[:, 0] = (dr * terms[0]).sum(axis=1)
    for k in range(z.shape[1]):
        grad[:, 1 + 2 * k] = (dr * terms[k + 1]).sum(axis=1)
        grad[:, 2 + 2 * k] = -(dr * terms[k + 1] * z[None, :, k]).sum(axis=1)
    scale = 1.0 / delta.mean()  # the loss in units of log residual: L-BFGS-B's tolerances fit
    return float(loss.sum()) * scale, grad.ravel() * scale


def minimise(z: np.ndarray, log_y: np.ndarray, delta: np.ndarray, starts: np.ndarray,
             bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Solve ``R`` problems: ``log_y [R, n]`` with Huber ``delta [R]`` from ``starts [R, p]``
    within ``bounds [R, p, 2]``, ``CHUNK`` of them per L-BFGS-B problem; return the optima
    ``[R, p]`` and each problem's loss ``[R]``."""
    rows, p = starts.shape
    theta = np.clip(starts, bounds[..., 0], bounds[..., 1])
    with threadpool_limits(limits=1, user_api="blas"):  # BLAS threads only slow tiny problems
        for s in range(0, rows, CHUNK):
            part = slice(s, s + CHUNK)
            result = minimize(_objective, theta[part].ravel(), jac=True, method="L-BFGS-B",
                              args=(z, log_y[part], delta[part, None], p),
                              bounds=bounds[part].reshape(-1, 2),
                              options={"maxiter": 20000, "maxfun": 40000, "ftol": 1e-15,
                                       "gtol": 1e-10})
            theta[part] = result.x.reshape(-1, p)
    return theta, _huber_loss(theta, z, log_y, delta)


def _grid_starts(bounds: np.ndarray) -> np.ndarray:
    """``[3^p, p]``: the quartiles of each log-space range, exponents 0.2, 0.5 and 1."""
    axes = [[0.2, 0.5, 1.0] if i >= 2 and i % 2 == 0 else
            [lo + (hi - lo) * q for q in (0.25, 0.5, 0.75)] for i, (lo, hi) in enumerate(bounds)]
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


def _huber_loss(theta: np.ndarray, z: np.ndarray, log_y: np.ndarray, delta: np.ndarray
                ) -> np.ndarray:
    """``[R]``: each problem's loss."""
    return _huber(np.log(_model(theta, z)[0]) - log_y, delta[:, None]).sum(axis=1)


@dataclass(frozen=True)
class Fit:
    """A fitted form: point estimates, bootstrap draws ``[draws, p]`` (reported parameters),
    and whether it is identified (if not, ``reason`` says why)."""

    form: str
    params: dict[str, float]
    x0: tuple[float, ...]  # the centre of each axis
    n: int  # points
    draws: np.ndarray
    identified: bool
    reason: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        return FORMS[self.form]

    def predict(self, x) -> np.ndarray:
        """``L`` at ``x [m]`` (single) or ``[m, 2]`` (joint)."""
        return self._predict(np.array([[self.params[n] for n in self.names]]), x)[0]

    def predict_draws(self, x) -> np.ndarray:
        """``[draws, m]``: every bootstrap fit's prediction (for bands and intervals)."""
        return self._predict(self.draws, x)

    def _predict(self, values: np.ndarray, x) -> np.ndarray:
        if self.form == "sigmoid":
            return sigmoid(values, x)
        x = np.asarray(x, dtype=float).reshape(len(np.atleast_1d(x)), -1)
        out = values[:, :1] * np.ones(len(x))
        for k in range(x.shape[1]):
            amp, exp = values[:, 1 + 2 * k:2 + 2 * k], values[:, 2 + 2 * k:3 + 2 * k]
            out = out + amp * (x[None, :, k] / self.x0[k]) ** -exp
        return out

    def ci(self, name: str, level: float = LEVEL) -> tuple[float, float]:
        tail = (1 - level) / 2 * 100
        lo, hi = np.percentile(self.draws[:, self.names.index(name)], [tail, 100 - tail])
        return float(lo), float(hi)

    def as_dict(self) -> dict:
        out: dict = {"form": self.form, "n": self.n, "identified": self.identified,
                     "reason": self.reason, "bootstrap_draws": len(self.draws)}
        out |= {f"x0_{i}": v for i, v in enumerate(self.x0)}
        if self.identified:
            for name in self.names:
                lo, hi = self.ci(name)
                out |= {name: self.params[name], f"{name}_ci_low": lo, f"{name}_ci_high": hi}
        return out


def _to_params(theta: np.ndarray) -> np.ndarray:
    """Optimisation variables -> reported parameters: E, A, B are searched as logs."""
    out = theta.copy()
    logs = [0, *range(1, theta.shape[1], 2)]
    out[:, logs] = np.exp(theta[:, logs])
    return out


def resample_means(runs: Sequence[np.ndarray], draws: int, rng: np.random.Generator
                   ) -> np.ndarray:
    """``[draws, points]``: each point's mean over its runs drawn with replacement, each run's
    deviation from the point's mean widened by ``sqrt(n / (n - 1))`` (see the module doc)."""
    out = np.empty((draws, len(runs)))
    for i, values in enumerate(runs):
        values = np.asarray(values, dtype=float)
        n = len(values)
        widened = values.mean() + (values - values.mean()) * (np.sqrt(n / (n - 1)) if n > 1 else 1)
        out[:, i] = widened[rng.integers(0, n, (draws, n))].mean(axis=1)
    return out


def huber_delta(runs: Sequence[Sequence[float]]) -> float:
    """``HUBER_NOISE`` times the median standard error of the points' log means (from their
    runs' spread); ``HUBER_DELTA`` when no point has two runs."""
    ses = [np.std(np.log(r), ddof=1) / np.sqrt(len(r)) for r in runs if len(r) > 1]
    se = float(np.median(ses)) if ses else 0.0
    return HUBER_NOISE * se if se > 0 else HUBER_DELTA


def _check(result: Fit, names: Sequence[str] | None = None) -> Fit:
    """``result`` with its bootstrap judged: not identified if an interval (of ``names``,
    default all) has no spread or spans more than a decade."""
    for name in names or result.names:
        lo, hi = result.ci(name)
        if not hi > lo:
            why = f"no spread in the bootstrap of {name} (one run per point: set seeds >= 2)"
        elif lo <= 0 or hi > 10 * lo:
            why = f"the 95% interval of {name} spans more than a decade [{lo:.3g}, {hi:.3g}]"
        else:
            continue
        return Fit(result.form, result.params, result.x0, result.n, result.draws, False, why)
    return result


def fit_many(form: str, x, replicates: Sequence[Sequence[Sequence[float]]], draws: int = 1000,
             seed: int = 0) -> list[Fit]:
    """``fit`` of several data sets over the same points ``x``, solved together (the
    coverage test fits hundreds)."""
    names = FORMS[form]
    n, p = len(replicates[0]), len(names)
    x = np.asarray(x, dtype=float).reshape(n, -1)
    if x.shape[1] != (p - 1) // 2:
        raise ValueError(f"a {form} fit takes {(p - 1) // 2} axes, got {x.shape[1]}")
    if np.any(x <= 0):
        raise ValueError(f"every x must be positive, got {x.tolist()}")
    x0 = tuple(float(v) for v in np.exp(np.log(x).mean(axis=0)))
    empty = np.zeros((0, p))
    if n < p + 2:
        why = f"{n} point{'s' * (n != 1)} for {p} parameters (needs >= {p + 2})"
        return [Fit(form, {}, x0, n, empty, False, why) for _ in replicates]
    z = np.log(x / np.array(x0))
    means = np.array([[np.mean(r) for r in runs] for runs in replicates])  # [R, n]
    delta = np.array([huber_delta(runs) for runs in replicates])  # [R]
    bounds = np.stack([search_range(form, m) for m in means])  # [R, p, 2]
    # the grid's best STARTS points of each data set, then L-BFGS-B from each of them
    grid = np.stack([_grid_starts(b) for b in bounds])  # [R, G, p]
    g = grid.shape[1]
    losses = _huber_loss(grid.reshape(-1, p), z, np.repeat(np.log(means), g, axis=0),
                         np.repeat(delta, g))
    keep = np.argsort(losses.reshape(-1, g), axis=1)[:, :STARTS]  # [R, STARTS]
    starts = np.take_along_axis(grid, keep[:, :, None], axis=1).reshape(-1, p)
    thetas, losses = minimise(z, np.repeat(np.log(means), STARTS, axis=0),
                              np.repeat(delta, STARTS), starts, np.repeat(bounds, STARTS, axis=0))
    best = thetas.reshape(-1, STARTS, p)[np.arange(len(means)),
                                          np.argmin(losses.reshape(-1, STARTS), axis=1)]
    params = [dict(zip(names, row.tolist(), strict=True)) for row in _to_params(best)]
    width = bounds[:, :, 1] - bounds[:, :, 0]
    near = np.minimum(best - bounds[:, :, 0], bounds[:, :, 1] - best) < 1e-3 * width  # [R, p]
    rng = np.random.default_rng(seed)
    free = [i for i in range(len(means)) if not near[i].any()]
    resampled = np.concatenate([resample_means(replicates[i], draws, rng) for i in free]) \
        if free else np.zeros((0, n))
    refits, _ = minimise(z, np.log(resampled), np.repeat(delta[free], draws),
                         np.repeat(best[free], draws, axis=0),
                         np.repeat(bounds[free], draws, axis=0)) if free else (empty, None)
    out = []
    for i in range(len(means)):
        if near[i].any():
            why = f"{', '.join(np.array(names)[near[i]])} at a bound of the search range"
            out.append(Fit(form, params[i], x0, n, empty, False, why))
            continue
        k = free.index(i)
        out.append(_check(Fit(form, params[i], x0, n,
                              _to_params(refits[k * draws:(k + 1) * draws]), True)))
    return out


def fit(form: str, x, runs: Sequence[Sequence[float]], draws: int = 1000, seed: int = 0) -> Fit:
    """Fit ``form`` to points ``x [n]`` (single) or ``[n, 2]`` (joint) whose runs' losses are
    ``runs[i]``, bootstrap it with ``draws`` resamples and judge whether it is identified."""
    return fit_many(form, x, [runs], draws, seed)[0]


def sigmoid(values: np.ndarray, loss) -> np.ndarray:
    """``[R, m]``: ``b + a / (1 + exp(k (L - L0)))`` for parameter rows ``values [R, 4]``
    (``a, L0, k, b``) at losses ``[m]``, or at each row's own losses (``[R, m]``)."""
    a, l0, k, b = (values[:, i:i + 1] for i in range(4))
    loss = np.asarray(loss, dtype=float)
    loss = loss if loss.ndim == 2 else np.atleast_1d(loss)[None, :]
    return b + a / (1 + np.exp(np.clip(k * (loss - l0), -500, 500)))


def fit_sigmoid(loss, acc, draws: int = 1000, seed: int = 0) -> Fit:
    """Fit ``sigmoid`` to runs' ``(loss, acc)`` pairs by least squares and bootstrap it by
    resampling the runs (pairs, with replacement). Not identified (no numbers) with fewer
    than 6 runs, when the accuracy does not fall with the loss beyond noise (the slope of a
    straight line within ``Z`` standard errors of 0: accuracy near chance everywhere), when
    ``a``, ``L0`` or ``k`` sits at a bound of the search (a floor ``b`` of 0 is a valid
    floor), or when the 95% interval of ``a`` or ``k`` spans more than a decade."""
    from scipy.optimize import least_squares
    from scipy.stats import linregress

    loss, acc = np.asarray(loss, dtype=float), np.asarray(acc, dtype=float)
    names, n, empty = FORMS["sigmoid"], len(loss), np.zeros((0, 4))

    def not_identified(why: str, params: dict | None = None) -> Fit:
        return Fit("sigmoid", params or {}, (), n, empty, False, why)

    if n < 6:
        return not_identified(f"{n} runs for 4 parameters (needs >= 6)")
    width = float(loss.max() - loss.min())
    if width <= 0:
        return not_identified("every run has the same loss")
    trend = linregress(loss, acc)
    if not trend.slope < -Z * trend.stderr:
        return not_identified(f"the accuracy does not fall with the loss beyond noise (slope "
                              f"{trend.slope:.3g} ± {trend.stderr:.2g} per nat: near chance "
                              "everywhere?)")
    lo = np.array([1e-4, loss.min() - 2 * width, 0.01 / width, 0.0])
    hi = np.array([1.0, loss.max() + 2 * width, 100 / width, 1.0])

    def solve(start: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return least_squares(lambda t: sigmoid(t[None], x)[0] - y, start, bounds=(lo, hi),
                             method="trf", x_scale=hi - lo).x

    with threadpool_limits(limits=1, user_api="blas"):
        starts = [np.array([acc.max() - acc.min(), c, s / width, acc.min()])
                  for c in np.quantile(loss, [0.25, 0.5, 0.75]) for s in (1.0, 5.0, 20.0)]
        fits = [solve(np.clip(t, lo, hi), loss, acc) for t in starts]
        best = min(fits, key=lambda t: float(((sigmoid(t[None], loss)[0] - acc) ** 2).sum()))
        params = dict(zip(names, best.tolist(), strict=True))
        near = np.minimum(best - lo, hi - best) < 1e-3 * (hi - lo)
        near[3] &= best[3] > 0.5  # b at 0: a floor of zero accuracy is a result
        if near.any():
            return not_identified(f"{', '.join(np.array(names)[near])} at a bound of the "
                                  "search range", params)
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, n, (draws, n))
        refits = np.stack([solve(best, loss[i], acc[i]) for i in picks])
    return _check(Fit("sigmoid", params, (), n, refits, True), names=("a", "k"))
