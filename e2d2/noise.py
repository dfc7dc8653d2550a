"""Noise schedules. Each maps ``t in [0, 1]`` to ``(alpha(t), alpha'(t))``, in that order.

``alpha`` is the probability that a token is still clean at time ``t``; it is
monotone decreasing with ``alpha(0) ~ 1`` and ``alpha(1) ~ 0``. ``alpha'`` is the
exact derivative with respect to ``t`` (tests compare it to finite differences).

The schedules are written with tensor methods, so that the run configs (which build one to
validate its arguments) import this module without torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from e2d2.errors import ConfigError

if TYPE_CHECKING:
    import torch

Schedule = Callable[["torch.Tensor"], tuple["torch.Tensor", "torch.Tensor"]]


@dataclass(frozen=True)
class Linear:
    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 1.0 - t, -t.new_ones(t.shape)


@dataclass(frozen=True)
class Cosine:
    eps: float = 1e-3

    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half_pi = math.pi / 2
        return (1 - self.eps) * (half_pi * t).cos(), -(1 - self.eps) * half_pi * (half_pi * t).sin()


@dataclass(frozen=True)
class Exponential:
    """``1 - alpha = max(t^k, eps)``; below the clamp alpha is constant, so alpha' is 0 there."""

    k: float = 2.0
    eps: float = 1e-3

    def __post_init__(self) -> None:
        if self.k <= 0:
            raise ConfigError(f"exp schedule needs k > 0, got k={self.k}")

    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tk = t.pow(self.k)
        alpha = 1.0 - tk.clamp(min=self.eps)
        alpha_prime = (-self.k * t.pow(self.k - 1)).where(tk > self.eps, t.new_zeros(t.shape))
        return alpha, alpha_prime


@dataclass(frozen=True)
class Logarithmic:
    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log2 = math.log(2.0)
        return 1.0 - t.log1p() / log2, -1.0 / (log2 * (1.0 + t))


@dataclass(frozen=True)
class ClippedLinear:
    """BD3-LM's clipped schedule: ``t`` is mapped into ``[beta_min, beta_max]`` first."""

    beta_min: float = 0.3
    beta_max: float = 0.8

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta_min < self.beta_max <= 1.0:
            raise ConfigError(
                f"clipped_linear needs 0 <= beta_min < beta_max <= 1, got [{self.beta_min}, {self.beta_max}]"
            )

    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        width = self.beta_max - self.beta_min
        return 1.0 - (self.beta_min + width * t), t.new_full(t.shape, -width)


_SCHEDULES: dict[str, type] = {
    "linear": Linear,
    "cosine": Cosine,
    "exp": Exponential,
    "log": Logarithmic,
    "clipped_linear": ClippedLinear,
}


def evaluation_schedule(name: str, **kwargs: float) -> Schedule:
    """The schedule the NELBO integrates over: the training schedule, unclipped.

    Clipping is a training-time variance reduction: ``clipped_linear`` masks only rates in
    ``[beta_min, beta_max]``, so a NELBO computed with it integrates the ELBO over that part
    of the path only, with weight ``(beta_max - beta_min) / (1 - alpha)``, and is no bound
    (a uniform model would score well under ``log(V - 1)``). Any unclipped schedule gives
    the same continuous-time bound; linear is the clipped schedule's own path.
    """
    if name == "clipped_linear":
        get_schedule(name, **kwargs)  # still validate the training arguments
        return Linear()
    return get_schedule(name, **kwargs)


def get_schedule(name: str, **kwargs: float) -> Schedule:
    """Build a schedule by name: linear, cosine, exp, log, clipped_linear."""
    if name not in _SCHEDULES:
        raise ConfigError(f"unknown noise schedule {name!r}; choose one of {sorted(_SCHEDULES)}")
    try:
        return _SCHEDULES[name](**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad arguments for schedule {name!r}: {exc}") from None
