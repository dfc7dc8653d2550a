"""Block-by-block diffusion sampling with KV cache (spec section 5).

Generation runs one block of ``S`` tokens at a time. A block starts all ``[MASK]`` and is
denoised in steps; each step calls the denoiser on the block (E2D2: the decoder only,
attending the cached clean keys), turns the logits into SUBS log-probs and reveals some
masked tokens with one *strategy* (`denoise_step`). When no mask is left, the block is
appended to the clean cache (E2D2: one encoder pass) and the next block starts.

Conventions and choices:

* **Prompts are processed block-causally**, exactly like training data without a context
  mask: prompt block ``b`` sees prompt blocks ``<= b`` only, never later ones. The whole
  blocks of the prompt are encoded once; a prompt tail (``P % S`` tokens) is placed at the
  head of the first noisy block as already-revealed tokens, which are never re-masked.
* **MDLM** has no block cache: it is sampled as one block covering prompt and completion,
  with a full forward per step; ``use_cache`` does not apply to it. AR is not a diffusion
  model and is rejected.
* **Output reuse**: when the block did not change since the last forward, the previous
  log-probs are reused; that step costs no function evaluation (NFE).
* **Batching**: all rows share the prompt length, so they move through blocks in lockstep.
  EOS is checked when a block completes; a row that produced EOS is dropped from the
  working batch and from the cache, so its tokens never change again and it costs nothing.
* **Randomness** comes only from ``generator``, drawn in a fixed order with shapes that
  depend only on the working batch and block length, never on the logits. Cached and
  uncached runs therefore consume identical streams and give identical tokens. Because
  rows share the stream, a row's sample depends on the other rows of its batch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from e2d2.config import SCHEDULES
from e2d2.diffusion import subs_logits
from e2d2.errors import ConfigError
from e2d2.model import DiffusionLM
from e2d2.noise import get_schedule

STRATEGIES: tuple[str, ...] = ("ancestral", "first_hitting", "topk", "topk_margin", "threshold")


@dataclass(frozen=True)
class SamplerConfig:
    """How to sample.

    * ``strategy``: ``ancestral`` (posterior of the masked process), ``first_hitting`` (one
      token per step; ``steps`` does not apply), ``topk`` / ``topk_margin`` (reveal the most
      confident tokens, as many as the schedule says), ``threshold`` (reveal every token whose
      probability exceeds ``threshold``, at least one per step).
    * ``steps``: denoising steps per block; the last one reveals whatever is still masked.
    * ``schedule``: noise schedule that places the step times (`e2d2.noise`).
    * ``temperature``: 0 means greedy (argmax values); otherwise logits are divided by it.
    * ``eos_token_id``: a row stops after the block in which it generates this token (EOS
      inside the prompt does not count); positions after its first EOS are filled with EOS.
    * ``use_cache``: False recomputes the full forward over the whole prefix at every step
      (the reference the KV cache is tested against).
    """

    strategy: str = "ancestral"
    steps: int = 16
    schedule: str = "linear"
    temperature: float = 1.0
    threshold: float = 0.9
    max_new_tokens: int = 64
    eos_token_id: int | None = None
    use_cache: bool = True

    def __post_init__(self) -> None:
        checks = (
            (self.strategy in STRATEGIES,
             f"unknown strategy {self.strategy!r}; choose one of {STRATEGIES}"),
            (self.schedule in SCHEDULES,
             f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.temperature >= 0,
             f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (0.0 <= self.threshold < 1.0, f"threshold must be in [0, 1), got {self.threshold}"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.eos_token_id is None or self.eos_token_id >= 0,
             f"eos_token_id must be a token id >= 0, got {self.eos_token_id}"),
        )
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)


@dataclass
class SampleOutput:
    """Result of `sample`.

    * ``tokens``: ``[batch, P + max_new_tokens]``, prompt then completion; positions at or
      after ``lengths`` hold EOS (only rows that finished have any).
    * ``lengths``: ``[batch]``, valid length of each row (prompt + completion through EOS).
    * ``finished``: ``bool[batch]``, whether the row generated EOS within the budget.
    * ``nfe_per_block``: forwards of the (working) batch spent on each generated block.
    * ``num_blocks``: blocks generated before every row finished or the budget ran out.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor
    nfe_per_block: list[int]

    @property
    def nfe(self) -> int:
        return sum(self.nfe_per_block)

    @property
    def num_blocks(self) -> int:
        return len(self.nfe_per_block)


# ------------------------------------------------------------------ strategies
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


def step_times(schedule: str, steps: int) -> list[StepTimes]:
    """The ``steps`` transitions of the uniform time grid ``1 = t_0 > ... > t_steps = 0``."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    alpha = get_schedule(schedule)(t)[0].tolist()
    return [StepTimes(alpha[j], alpha[j + 1], alpha[0], j == steps - 1) for j in range(steps)]


def denoise_step(
    strategy: str,
    xt: torch.Tensor,
    logp: torch.Tensor,
    times: StepTimes | None,
    n_start: torch.Tensor,
    mask_id: int,
    greedy: bool,
    threshold: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One reverse step: ``xt [batch, S]`` -> ``xs [batch, S]``; only masked tokens change.

    ``logp [batch, S, vocab]``: SUBS log-probs (temperature already applied). ``times``: the
    step's schedule values (None for first-hitting, which needs no grid). ``n_start
    [batch]``: masked tokens at the block's start (top-k's schedule is relative to it).
    Draws, in this order: one uniform per position for the token values (unless greedy),
    then one per position for the strategy's choice (ancestral and first-hitting only).
    """
    masked = xt == mask_id
    probs = logp.exp()
    values = _draw_values(probs, greedy, generator)
    if strategy == "ancestral":
        reveal = _ancestral(masked, times, generator)
    elif strategy == "first_hitting":
        reveal = _first_hitting(masked, generator)
    else:
        conf = _confidence(probs, values, margin=strategy == "topk_margin")
        conf = conf.masked_fill(~masked, -math.inf)
        if strategy == "threshold":
            reveal = _threshold(conf, masked, threshold)
        else:
            reveal = _topk(conf, masked, times, n_start)
    if times is not None and times.last:
        reveal = masked
    return torch.where(reveal & masked, values, xt)


def _uniform(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(like.shape[:2], generator=generator, device=like.device, dtype=torch.float64)


def _draw_values(probs: torch.Tensor, greedy: bool, generator) -> torch.Tensor:
    """A token per position, ``[batch, S]``: argmax, or inverse-CDF sampling from ``probs``.

    Inverse CDF needs exactly one uniform per position, so the random stream does not depend
    on the vocabulary or the probabilities. The target is scaled by the CDF's total so a
    float sum below 1 never lands past the last token with nonzero probability.
    """
    if greedy:
        return probs.argmax(-1)
    cdf = probs.double().cumsum(-1)
    target = _uniform(probs, generator).unsqueeze(-1) * cdf[..., -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


def _confidence(probs: torch.Tensor, values: torch.Tensor, margin: bool) -> torch.Tensor:
    """``p(value)``, or with ``margin`` ``p(value) - max_{v != value} p(v)``: ``[batch, S]``."""
    chosen = probs.gather(-1, values.unsqueeze(-1)).squeeze(-1)
    if not margin:
        return chosen
    top2, top2_idx = probs.topk(2, dim=-1)
    best_other = torch.where(top2_idx[..., 0] == values, top2[..., 1], top2[..., 0])
    return chosen - best_other


def _ancestral(masked: torch.Tensor, times: StepTimes, generator) -> torch.Tensor:
    """Each masked token unmasks with probability ``(alpha_s - alpha_t) / (1 - alpha_t)``."""
    p_unmask = (times.alpha_s - times.alpha_t) / (1.0 - times.alpha_t)
    return (_uniform(masked, generator) < p_unmask) & masked


def _first_hitting(masked: torch.Tensor, generator) -> torch.Tensor:
    """Reveal exactly one masked token, chosen uniformly (rows with none reveal nothing).

    First-hitting sampling draws the time of the next unmasking event, ``1 - alpha_s =
    (1 - alpha_t) u^(1/n)`` for ``n`` masked tokens, then unmasks one of them uniformly.
    Our denoisers are not conditioned on time, so that time changes nothing downstream and
    the step reduces to the uniform choice (Zheng et al., 2024: masked diffusion is time-agnostic).
    """
    scores = _uniform(masked, generator).masked_fill(~masked, -1.0)
    one = torch.zeros_like(masked).scatter_(-1, scores.argmax(-1, keepdim=True), True)
    return one & masked


def _threshold(conf: torch.Tensor, masked: torch.Tensor, threshold: float) -> torch.Tensor:
    """Every masked token above ``threshold``, plus the most confident so a step never stalls."""
    best = torch.zeros_like(masked).scatter_(-1, conf.argmax(-1, keepdim=True), True)
    return ((conf > threshold) | best) & masked


def _topk(conf: torch.Tensor, masked: torch.Tensor, times: StepTimes, n_start: torch.Tensor):
    """Reveal the most confident masked tokens until ``n_start * (1 - alpha_s) / (1 - alpha_start)``
    (rounded down) remain masked: predict x0, then re-noise to time ``s`` by confidence."""
    frac = (1.0 - times.alpha_s) / (1.0 - times.alpha_start)
    keep_masked = torch.floor(n_start.double() * min(max(frac, 0.0), 1.0)).long()
    k = (masked.sum(-1) - keep_masked).clamp(min=0)
    rank = conf.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1, stable=True)
    return (rank < k.unsqueeze(-1)) & masked


# ------------------------------------------------------------------ denoisers
class _CachedDenoiser:
    """Clean prefix kept as a KV cache; a step runs only ``model.denoise`` on the block."""

    def __init__(self, model: DiffusionLM, context: torch.Tensor):
        self.model, self.cache = model, model.new_cache()
        if context.shape[1]:
            model.encode(context, self.cache)

    def __call__(self, block: torch.Tensor) -> torch.Tensor:
        return self.model.denoise(block, self.cache)

    def commit(self, block: torch.Tensor) -> None:
        self.model.encode(block, self.cache)

    def select(self, rows: torch.Tensor) -> None:
        self.cache = self.cache.select(rows)


class _FullDenoiser:
    """Clean prefix kept as tokens; a step runs the training forward on ``[prefix ; block]``.

    The same tokens go into both streams: the masks guarantee that the block's logits see
    only the clean prefix and the noisy block itself, so the other halves do not matter.
    """

    def __init__(self, model: DiffusionLM, context: torch.Tensor):
        self.model, self.prefix = model, context

    def __call__(self, block: torch.Tensor) -> torch.Tensor:
        x = torch.cat((self.prefix, block), 1)
        return self.model(x, x)[:, self.prefix.shape[1]:]

    def commit(self, block: torch.Tensor) -> None:
        self.prefix = torch.cat((self.prefix, block), 1)

    def select(self, rows: torch.Tensor) -> None:
        self.prefix = self.prefix.index_select(0, rows)


def _denoise_block(
    denoiser: _CachedDenoiser | _FullDenoiser,
    x: torch.Tensor,
    cfg: SamplerConfig,
    times: list[StepTimes],
    mask_id: int,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, int]:
    """Denoise ``x [batch, S]`` until no mask is left; returns it and the forwards spent."""
    n_start = (x == mask_id).sum(-1)
    logp, seen, nfe, step = None, None, 0, 0
    while (x == mask_id).any():
        if seen is None or not torch.equal(x, seen):
            logits = denoiser(x)
            logp = subs_logits(logits / cfg.temperature if cfg.temperature else logits, x, mask_id)
            seen, nfe = x, nfe + 1
        # first-hitting takes one step per masked token, however many that is: no time grid
        step_time = None if cfg.strategy == "first_hitting" else times[step]
        x = denoise_step(cfg.strategy, x, logp, step_time, n_start, mask_id,
                         cfg.temperature == 0, cfg.threshold, generator)
        step += 1
    return x, nfe


# ------------------------------------------------------------------ the loop
def _check(model: DiffusionLM, prompt: torch.Tensor, cfg: SamplerConfig) -> None:
    mcfg = model.cfg
    if not mcfg.is_diffusion:
        raise ConfigError(
            f"variant {mcfg.variant!r} is autoregressive; the diffusion sampler does not apply"
        )
    if prompt.dim() != 2 or prompt.dtype != torch.long:
        raise ValueError(
            f"prompt must be a LongTensor [batch, P], got {prompt.dtype} {tuple(prompt.shape)}"
        )
    if (prompt == mcfg.mask_token_id).any():
        raise ValueError(f"prompt contains the mask token {mcfg.mask_token_id}")
    if prompt.numel() and (prompt.min() < 0 or prompt.max() >= mcfg.vocab_size):
        raise ValueError(f"prompt ids must lie in [0, {mcfg.vocab_size}); got "
                         f"[{int(prompt.min())}, {int(prompt.max())}]: was it encoded with this "
                         "model's tokenizer?")
    total = prompt.shape[1] + cfg.max_new_tokens
    if total > mcfg.seq_length:
        warnings.warn(f"sampling {total} positions with a model trained on seq_length="
                      f"{mcfg.seq_length}: positions past it were never seen in training",
                      stacklevel=3)
    eos = cfg.eos_token_id
    if eos is not None and (eos >= mcfg.vocab_size or eos == mcfg.mask_token_id):
        raise ConfigError(f"eos_token_id={eos} must be a vocabulary id below {mcfg.vocab_size} "
                          f"other than the mask token {mcfg.mask_token_id}")


def _first_eos(block: torch.Tensor, lo: int, begin: int, end: int, eos: int) -> torch.Tensor:
    """Absolute position of the first EOS in generated positions ``[begin, end)`` of a block
    that starts at ``lo``, per row; -1 where there is none. ``block [batch, S]`` -> ``[batch]``."""
    pos = torch.arange(lo, lo + block.shape[1], device=block.device)
    hit = (block == eos) & (pos >= begin) & (pos < end)
    first = torch.where(hit, pos, lo + block.shape[1]).min(-1).values
    return torch.where(hit.any(-1), first, -1)


@torch.no_grad()
def sample(
    model: DiffusionLM,
    prompt: torch.Tensor,
    cfg: SamplerConfig,
    generator: torch.Generator | None = None,
) -> SampleOutput:
    """Generate ``cfg.max_new_tokens`` tokens after ``prompt [batch, P]`` (see module docstring)."""
    _check(model, prompt, cfg)
    mcfg, (batch, P), device = model.cfg, prompt.shape, prompt.device
    mask_id, total = mcfg.mask_token_id, P + cfg.max_new_tokens
    if mcfg.variant == "mdlm":
        n_ctx, S, n_blocks = 0, total, 1
    else:
        S = mcfg.block_size
        n_ctx = P - P % S
        n_blocks = -(-(total - n_ctx) // S)
    # Whole blocks are generated; what lies past the budget is cut off at the end.
    buf = torch.full((batch, n_ctx + n_blocks * S), mask_id, dtype=torch.long, device=device)
    buf[:, :P] = prompt
    lengths = torch.full((batch,), total, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    active = torch.arange(batch, device=device)
    make = _CachedDenoiser if cfg.use_cache and mcfg.variant != "mdlm" else _FullDenoiser
    denoiser = make(model, buf[:, :n_ctx])
    times = step_times(cfg.schedule, cfg.steps)
    nfe_per_block: list[int] = []
    for b in range(n_blocks):
        lo = n_ctx + b * S
        block = buf[active, lo:lo + S]
        block, nfe = _denoise_block(denoiser, block, cfg, times, mask_id, generator)
        buf[active, lo:lo + S] = block
        nfe_per_block.append(nfe)
        if cfg.eos_token_id is not None:
            eos_at = _first_eos(block, lo, P, total, cfg.eos_token_id)
            lengths[active] = torch.where(eos_at >= 0, eos_at + 1, lengths[active])
            finished[active] = eos_at >= 0
            keep = (eos_at < 0).nonzero().squeeze(1)
            if keep.numel() < active.numel():
                active, block = active[keep], block[keep]
                denoiser.select(keep)
        if active.numel() == 0 or b == n_blocks - 1:
            break
        denoiser.commit(block)
    tokens = buf[:, :total]
    if cfg.eos_token_id is not None:
        after = torch.arange(total, device=device) >= lengths.unsqueeze(1)
        tokens = tokens.masked_fill(after, cfg.eos_token_id)
    return SampleOutput(tokens, lengths, finished, nfe_per_block)


def sample_prompts(
    model: DiffusionLM,
    prompts: Sequence[Sequence[int]],
    cfg: SamplerConfig,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Completions (through EOS, if any) for prompts of different lengths, in input order.

    Prompts are grouped by length and each group is sampled as one batch, in order of first
    appearance. We group instead of padding because a pad would shift block boundaries and
    positions, and the block cache has no notion of padding.
    """
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in prompts]
    for n, rows in groups.items():
        batch = torch.tensor([list(prompts[i]) for i in rows], dtype=torch.long, device=device)
        res = sample(model, batch.view(len(rows), n), cfg, generator)
        for r, i in enumerate(rows):
            out[i] = res.tokens[r, n:res.lengths[r]].tolist()
    return out
