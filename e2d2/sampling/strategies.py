"""The reverse step: which masked tokens a step reveals, and with what values (spec section 5)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from e2d2.noise import get_schedule
from e2d2.sampling.distributions import Distribution


@dataclass(frozen=True)
class StepTimes:
    """Schedule values for one step from time ``t`` to ``s < t``.

    ``alpha_start`` is alpha at the block's first time, which fixes the top-k masking
    fraction ``(1 - alpha_s) / (1 - alpha_start)``. ``last`` forces every mask to go.
    """

    alpha_t: float
    alpha_s: float
    alpha_start: float
    last: bool


def step_times(schedule: str, steps: int, min_t: float = 0.0) -> list[StepTimes]:
    """The ``steps`` transitions of the uniform time grid ``1 = t_0 > ... > t_steps = min_t``."""
    t = torch.linspace(1.0, min_t, steps + 1, dtype=torch.float64)
    alpha = get_schedule(schedule)(t)[0].tolist()
    return [StepTimes(alpha[j], alpha[j + 1], alpha[0], j == steps - 1) for j in range(steps)]


def reveal_counts(strategy: str, times: StepTimes | None, n_start: list[int],
                  n_masked: list[int]) -> list[int] | None:
    """Per row, how many masked tokens the step reveals, where that is fixed before it runs:
    top-k's schedule (``n_start``: masked tokens at the block's start, ``n_masked``: now),
    first-hitting's one, the last step's all; None where draws or confidences decide it
    (ancestral, threshold). Host integers: the sampler's bookkeeping needs no device sync."""
    if times is not None and times.last:
        return list(n_masked)
    if strategy == "first_hitting":
        return [min(n, 1) for n in n_masked]
    if strategy not in ("topk", "topk_margin"):
        return None
    frac = min(max((1.0 - times.alpha_s) / (1.0 - times.alpha_start), 0.0), 1.0)
    return [max(n - math.floor(n0 * frac), 0) for n0, n in zip(n_start, n_masked, strict=True)]


def denoise_step(
    strategy: str,
    xt: torch.Tensor,
    dist: Distribution,
    times: StepTimes | None,
    n_reveal: list[int] | None,
    mask_id: int,
    threshold: float,
    uniform: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """One reverse step: ``xt [b, S]`` -> ``xs [b, S]``; only masked tokens change.

    ``dist``: the denoiser's distribution at each position (greedy when it has no CDF).
    ``times``: the step's schedule values (None for first-hitting, which needs no grid).
    ``n_reveal``: `reveal_counts` of the rows (top-k reads it; the others may pass None).
    ``uniform()``: the next ``[b, S]`` uniforms of each row's stream; called, in this order,
    for the token values (unless greedy), then for the strategy's choice (ancestral and
    first-hitting only).
    """
    masked = xt == mask_id
    if dist.cdf is None:
        values, values_at = dist.argmax, None
    else:
        target = uniform().unsqueeze(-1) * dist.cdf[..., -1:]
        values_at = torch.searchsorted(dist.cdf, target, right=True)  # [b, S, 1], as `gather` takes it
        values = values_at.squeeze(-1)
    # every strategy's ``reveal`` lies within ``masked``; ancestral and first-hitting draw
    # their uniforms on the last step too, so that the row's stream stays where it was
    if strategy == "ancestral":
        reveal = _ancestral(masked, times, uniform)
    elif strategy == "first_hitting":
        reveal = _first_hitting(masked, uniform)
    elif times is not None and times.last:
        reveal = masked
    else:
        conf = torch.where(masked, _confidence(dist, values, values_at, margin=strategy == "topk_margin"), -math.inf)
        reveal = _threshold(conf, masked, threshold) if strategy == "threshold" else _topk(conf, n_reveal)
    if times is not None and times.last:
        reveal = masked
    return torch.where(reveal, values, xt)


def _confidence(dist: Distribution, values: torch.Tensor, values_at: torch.Tensor | None,
                margin: bool) -> torch.Tensor:
    """``p(value)``, or with ``margin`` ``p(value) - max_{v != value} p(v)``: ``[b, S]``
    (``values [b, S]``; ``values_at``: the same ``[b, S, 1]`` where the caller has it)."""
    chosen = dist.probs.gather(-1, values.unsqueeze(-1) if values_at is None else values_at).squeeze(-1)
    if not margin:
        return chosen
    top2, top2_idx = dist.top2
    best_other = torch.where(top2_idx[..., 0] == values, top2[..., 1], top2[..., 0])
    return chosen - best_other


def _ancestral(masked: torch.Tensor, times: StepTimes, uniform) -> torch.Tensor:
    """Each masked token unmasks with probability ``(alpha_s - alpha_t) / (1 - alpha_t)``."""
    p_unmask = (times.alpha_s - times.alpha_t) / (1.0 - times.alpha_t)
    return (uniform() < p_unmask) & masked


def _first_hitting(masked: torch.Tensor, uniform) -> torch.Tensor:
    """Reveal exactly one masked token, chosen uniformly (rows with none reveal nothing).

    First-hitting sampling draws the time of the next unmasking event, ``1 - alpha_s =
    (1 - alpha_t) u^(1/n)`` for ``n`` masked tokens, then unmasks one of them uniformly.
    Our denoisers are not conditioned on time, so that time changes nothing downstream and
    the step reduces to the uniform choice (Zheng et al., 2024: masked diffusion is time-agnostic).
    """
    scores = torch.where(masked, uniform(), -1.0)
    one = torch.zeros_like(masked).scatter_(-1, scores.argmax(-1, keepdim=True), True)
    return one & masked


# A confidence lead smaller than this per position of distance goes to the left position.
# Exact ties (the identical positions of an all-mask block after an empty prompt) reach the
# sampler as float noise (~4e-7 in float32), which differs between a padded batch row and the
# same prompt alone; ordering them by position makes a row's choice its own.
TIE_STEP = 2.0 ** -17


def tie_broken(conf: torch.Tensor) -> torch.Tensor:
    """``conf [b, W]`` made strictly ordered: ``conf - TIE_STEP * position``, so confidences
    equal up to float noise go leftmost first (``-inf`` stays ``-inf``)."""
    return conf - torch.arange(conf.shape[-1], device=conf.device, dtype=conf.dtype) * TIE_STEP


def _threshold(conf: torch.Tensor, masked: torch.Tensor, threshold: float) -> torch.Tensor:
    """Every masked token above ``threshold``, plus the most confident (`tie_broken`) so a
    step never stalls."""
    best = torch.zeros_like(masked).scatter_(-1, tie_broken(conf).argmax(-1, keepdim=True), True)
    return ((conf > threshold) | best) & masked


def _topk(conf: torch.Tensor, n_reveal: list[int]) -> torch.Tensor:
    """The ``n_reveal[r]`` most confident masked tokens of each row r (`reveal_counts`: the
    schedule leaves ``n_start * (1 - alpha_s) / (1 - alpha_start)``, rounded down, masked):
    predict x0, then re-noise to time ``s`` by confidence. ``conf`` is -inf where unmasked and
    above it where masked, so the ``n_reveal`` largest are masked tokens.

    Ties go to the left (`tie_broken`): the order is strict, so a row with a smaller count
    takes the first ``k`` of the batch's one ``topk``, and its choice never depends on the
    rest of the batch. One ``topk`` and a scatter: a stable double ``argsort`` costs ~3x as
    much (a sort dispatches 8 ops)."""
    reveal = torch.zeros_like(conf, dtype=torch.bool)
    most = max(n_reveal)
    order = tie_broken(conf).topk(most, dim=-1).indices  # sorted, most confident first
    if min(n_reveal) == most:
        return reveal.scatter_(-1, order, True)
    take = torch.arange(most, device=conf.device) < torch.tensor(n_reveal, device=conf.device)[:, None]
    return reveal.scatter_(-1, order, take)
