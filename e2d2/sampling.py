"""Block-by-block diffusion sampling with KV cache (spec section 5), and AR sampling.

Generation runs one block of ``S`` tokens at a time. A block starts all ``[MASK]`` and is
denoised in steps; each step calls the denoiser on the block (E2D2: the decoder only,
attending the cached clean keys), turns the logits into a distribution and reveals some
masked tokens with one *strategy* (`denoise_step`). When no mask is left, the block is
appended to the clean cache (E2D2: one encoder pass) and the next block starts.

Conventions and choices:

* **Prompts are encoded exactly as training reads a context mask** (`e2d2.masks`): the
  prompt's whole blocks are encoded once, with the prompt read bidirectionally where the
  model does so (``ModelConfig.prompt_is_bidirectional``: E2D2 by default), block-causally
  otherwise (BD3-LM, like the authors' code). A prompt tail (``P % S`` tokens) opens the
  first generated block as already-revealed tokens, never re-masked; when that block is
  committed, the tail reads the prompt only, as a context query does in training.
* **Batches of mixed prompt lengths** run as one batch. The block cache is *left-padded*:
  row ``r``'s cached columns are shifted by ``offset[r]`` so that every row's current block
  sits in the same columns, while RoPE positions stay each row's own. Pad columns are
  masked out. Each row's tokens equal those of its prompt sampled alone (same seed).
* **Randomness** is per row: row ``r`` draws only from its own generator, seeded by
  ``seeds[r]`` (or by a seed drawn from ``generator``), in a fixed order (per step: one
  uniform per block position for the token values unless greedy, then one per position for
  the strategy's choice, ancestral and first-hitting only), and only on steps where its block
  still has a mask. A row's sample therefore does not depend on the other rows of its batch,
  and cached and uncached runs consume identical streams and give identical tokens.
* **Output reuse is per row**: a row whose block did not change since its last forward
  reuses its distribution; a step runs the denoiser only on the rows whose block changed.
  ``row_nfe`` counts each row's forwards, ``nfe_per_block`` the batched denoiser calls.
* **Stopping**: a row stops after the block (AR: the token) in which it generates EOS or
  completes a stop string (EOS or a stop string inside the prompt do not count). Stopped
  rows leave the working batch and the cache, so they cost nothing.
* **MDLM** has no block cache: it is sampled as one block covering prompt and completion,
  with a full forward per step (pads masked out); ``use_cache`` does not apply to it.
* **AR** samples one token per forward, with the same left-padded KV cache.
* **Shift** (``ModelConfig.shift``, `e2d2.shift`): block ``b`` is denoised through the
  window ``[x0[bS - 1], block tokens bS .. bS + S - 2]``, which reads the cache before
  ``bS - 1`` and whose outputs predict ``bS .. bS + S - 1``. Every row needs a prompt of at
  least one token (position 0 has no predictor).
* **Past ``seq_length``**: with ``sliding_window``, the oldest cached blocks are dropped so
  that the next block's positions stay inside the trained range (`KVCache.drop_oldest`):
  semi-autoregressive generation of any length. Without it, a warning.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch

from e2d2.config import SCHEDULES
from e2d2.errors import ConfigError
from e2d2.model import DiffusionLM, KVCache
from e2d2.noise import get_schedule

STRATEGIES: tuple[str, ...] = ("ancestral", "first_hitting", "topk", "topk_margin", "threshold")


@dataclass(frozen=True)
class SamplerConfig:
    """How to sample.

    * ``strategy``: ``ancestral`` (posterior of the masked process), ``first_hitting`` (one
      token per step; ``steps`` does not apply), ``topk`` / ``topk_margin`` (reveal the most
      confident tokens, as many as the schedule says), ``threshold`` (reveal every token whose
      probability exceeds ``threshold``, at least one per step). AR models ignore it.
    * ``steps``: denoising steps per block; the last one reveals whatever is still masked.
    * ``schedule``: noise schedule that places the step times (`e2d2.noise`) on the grid
      ``1 = t_0 > ... > t_steps = min_t``. ``min_t`` (in ``[0, 1)``) is the last step's time.
    * ``temperature``: 0 means greedy (argmax values); otherwise logits are divided by it.
    * ``top_p``: nucleus filtering: values are drawn from the smallest set of tokens whose
      probability reaches ``top_p`` (1 = off); confidences still read the model's unfiltered
      probabilities (filtered, every kept-alone token would have confidence 1).
    * ``eos_token_id``: a row stops after the block in which it generates this token;
      positions after its first EOS are filled with EOS.
    * ``stop_strings``: a row also stops once its decoded completion contains one of them
      (``sample`` then needs ``decode``); it ends with the token that completes the string.
    * ``use_cache``: False recomputes the full forward over the whole prefix at every step
      (the reference the KV cache is tested against).
    * ``block_size``: block size at inference (E2D2 and BD3-LM; None = the trained one).
    * ``sliding_window``: generate past ``seq_length`` by dropping the oldest cached blocks
      (needs ``use_cache``; E2D2 and BD3-LM).
    """

    strategy: str = "ancestral"
    steps: int = 16
    schedule: str = "linear"
    temperature: float = 1.0
    threshold: float = 0.9
    max_new_tokens: int = 64
    eos_token_id: int | None = None
    use_cache: bool = True
    top_p: float = 1.0
    min_t: float = 0.0
    stop_strings: tuple[str, ...] = ()
    block_size: int | None = None
    sliding_window: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop_strings, str) or not all(isinstance(s, str) and s for s in self.stop_strings):
            raise ConfigError(f"stop_strings must be a list of non-empty strings, got {self.stop_strings!r}")
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))  # YAML gives a list
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
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1] (1 = off), got {self.top_p}"),
            (0.0 <= self.min_t < 1.0, f"min_t must be in [0, 1), got {self.min_t}"),
            (self.block_size is None or self.block_size >= 1,
             f"block_size must be >= 1 (or unset for the trained one), got {self.block_size}"),
            (not (self.sliding_window and not self.use_cache),
             "sliding_window drops cached blocks: it needs use_cache=True"),
        )
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)


@dataclass
class SampleOutput:
    """Result of `sample` (``P = max(prompt_lengths)``, ``N = max_new_tokens``).

    * ``tokens``: ``[batch, P + N]``, row ``r``: its prompt, then its completion. Positions at
      or after ``lengths[r]`` hold EOS when ``eos_token_id`` is set, else the mask token.
    * ``prompt_lengths``: ``[batch]``. ``lengths``: ``[batch]``, valid length of each row
      (prompt + completion through EOS or the stop string).
    * ``finished``: ``bool[batch]``, whether the row stopped (EOS, stop string) within budget.
    * ``nfe_per_block``: batched denoiser calls spent on each generated block (AR: per token).
    * ``row_nfe``: ``[batch, num_blocks]``, the forwards each row took part in, per block.
    """

    tokens: torch.Tensor
    prompt_lengths: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor
    nfe_per_block: list[int]
    row_nfe: torch.Tensor

    @property
    def nfe(self) -> int:
        return sum(self.nfe_per_block)

    @property
    def num_blocks(self) -> int:
        return len(self.nfe_per_block)

    def completion(self, row: int) -> list[int]:
        """Row ``row``'s generated tokens (through EOS or the stop string, if any)."""
        return self.tokens[row, int(self.prompt_lengths[row]):int(self.lengths[row])].tolist()


# ------------------------------------------------------------------ randomness
def draw_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the sampler's uniforms and of the CDF they are searched in.

    float32 on CPU: torch's CPU ``cumsum`` accumulates float32 in double, so a float32 CDF is
    the exact one rounded once per entry (a token's chance is off by at most ~1 ulp, ~6e-8),
    and the float32 scan dispatches 1 op where a float64 one converts first (4 more; ~10% of a
    batch-1 step's sampler time). float64 elsewhere: CUDA's scan accumulates in float32, whose
    error over a 150k vocabulary would reach the rare tokens' probabilities."""
    return torch.float32 if device.type == "cpu" else torch.float64


class RowStreams:
    """One random generator per row; draws ``[rows, n]`` uniforms (`draw_dtype`), each row from its own.

    ``widths``: how many of the ``n`` columns each row really has (MDLM's ragged rows): a row
    draws only those, so its stream does not depend on the batch's widest row; the rest is
    filled with 0.5 (those positions are never masked).
    """

    def __init__(self, generators: list[torch.Generator], device: torch.device,
                 widths: list[int] | None = None):
        self.generators, self.device, self.widths = generators, device, widths
        self.dtype = draw_dtype(device)

    @classmethod
    def seeded(cls, seeds: Sequence[int], device: torch.device) -> RowStreams:
        return cls([torch.Generator(device=device).manual_seed(int(s)) for s in seeds], device)

    def select(self, rows: list[int]) -> RowStreams:
        widths = None if self.widths is None else [self.widths[i] for i in rows]
        return RowStreams([self.generators[i] for i in rows], self.device, widths)

    def uniform(self, n: int, rows: list[int] | None = None) -> torch.Tensor:
        idx = range(len(self.generators)) if rows is None else rows
        if self.widths is None and len(idx) == 1:  # batch 1: no stacking
            return torch.rand(1, n, generator=self.generators[idx[0]], device=self.device, dtype=self.dtype)
        draws = []
        for i in idx:
            w = n if self.widths is None else self.widths[i]
            u = torch.rand(w, generator=self.generators[i], device=self.device, dtype=self.dtype)
            draws.append(u if w == n else torch.cat((u, u.new_full((n - w,), 0.5))))
        return torch.stack(draws)


# ------------------------------------------------------------------ distributions
@dataclass
class Distribution:
    """What one forward gives each position of a block, kept while the block is unchanged.

    ``probs [b, S, vocab]`` (``[MASK]`` excluded, temperature applied), which confidences read;
    greedy: ``argmax [b, S]``; sampling: the ``cdf [b, S, vocab]`` (`draw_dtype`) values are drawn
    from, top-p filtered (computed once per forward, not per step); ``top2`` probabilities and
    ids for the margin strategy.
    """

    probs: torch.Tensor
    argmax: torch.Tensor | None = None
    cdf: torch.Tensor | None = None
    top2: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def of(cls, logits: torch.Tensor, mask_id: int, temperature: float, top_p: float,
           margin: bool) -> Distribution:
        """From a forward's ``logits [b, S, vocab]``, which it overwrites (the sampler's own)."""
        # ``logits`` is the sampler's own fresh forward output: the mask logit is set in place
        if logits.dtype != torch.float32:  # a skipped no-op is one dispatch less per step
            logits = logits.float()
        if temperature not in (0.0, 1.0):
            logits = logits / temperature
        logits.select(-1, mask_id).fill_(-math.inf)  # not ``logits[..., mask_id] =``: one op fewer
        probs = logits.softmax(-1)
        top2 = probs.topk(2, dim=-1) if margin else None
        if temperature == 0:
            return cls(probs, argmax=probs.argmax(-1), top2=top2)
        values_from = _nucleus(probs, top_p) if top_p < 1.0 else probs
        return cls(probs, cdf=values_from.cumsum(-1, dtype=draw_dtype(probs.device)), top2=top2)

    def rows(self, rows: torch.Tensor | None) -> Distribution:
        if rows is None:
            return self

        def pick(t):
            return None if t is None else t[rows]

        top2 = None if self.top2 is None else (self.top2[0][rows], self.top2[1][rows])
        return Distribution(self.probs[rows], pick(self.argmax), pick(self.cdf), top2)

    def update(self, rows: torch.Tensor, new: Distribution) -> None:
        self.probs[rows] = new.probs
        for name in ("argmax", "cdf"):
            if getattr(self, name) is not None:
                getattr(self, name)[rows] = getattr(new, name)
        if self.top2 is not None:
            self.top2[0][rows], self.top2[1][rows] = new.top2


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p``; renormalize."""
    sorted_p, order = probs.sort(-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the more likely tokens
    keep_sorted = before < top_p
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    kept = probs * keep
    return kept / kept.sum(-1, keepdim=True)


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


def _threshold(conf: torch.Tensor, masked: torch.Tensor, threshold: float) -> torch.Tensor:
    """Every masked token above ``threshold``, plus the most confident so a step never stalls."""
    best = torch.zeros_like(masked).scatter_(-1, conf.argmax(-1, keepdim=True), True)
    return ((conf > threshold) | best) & masked


def _topk(conf: torch.Tensor, n_reveal: list[int]) -> torch.Tensor:
    """The ``n_reveal[r]`` most confident masked tokens of each row r (`reveal_counts`: the
    schedule leaves ``n_start * (1 - alpha_s) / (1 - alpha_start)``, rounded down, masked):
    predict x0, then re-noise to time ``s`` by confidence. ``conf`` is -inf where unmasked and
    above it where masked, so the ``n_reveal`` largest are masked tokens.

    Ties go as ``torch.topk`` breaks them, per row. Rows with different counts run one
    ``topk`` per count, so a row's choice never depends on the rest of the batch (the first
    ``k`` of a larger ``topk`` may break a tie otherwise). One ``topk`` and a scatter: a
    stable double ``argsort`` costs ~3x as much (a sort dispatches 8 ops)."""
    reveal = torch.zeros_like(conf, dtype=torch.bool)
    counts = set(n_reveal)
    if len(counts) == 1:
        return reveal.scatter_(-1, conf.topk(n_reveal[0], dim=-1).indices, True)
    for k in counts:
        rows = torch.tensor([r for r, n in enumerate(n_reveal) if n == k], device=conf.device)
        reveal[rows] = reveal[rows].scatter_(-1, conf[rows].topk(k, dim=-1).indices, True)
    return reveal


# ------------------------------------------------------------------ one block
Forward = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _denoise_block(
    forward: Forward,
    x: torch.Tensor,
    cfg: SamplerConfig,
    times: list[StepTimes],
    mask_id: int,
    streams: RowStreams,
) -> tuple[torch.Tensor, int, list[int]]:
    """Denoise ``x [b, W]`` until no mask is left; returns it, the batched forwards spent and
    each row's forwards.

    ``forward(x_rows, rows)`` gives logits for the rows ``rows`` (None = all) of the block.
    A row steps while its block has a mask; it is forwarded again only if its block changed
    since its last forward. Which rows step, need a forward or changed is kept on the host
    from each row's count of masked tokens (a step only ever reveals masked tokens, so a row
    changed iff its count fell): one device sync per block, plus one per step for the
    strategies whose reveal count is not fixed in advance (`reveal_counts`).
    Profiler labels ``sample.step`` and ``sample.forward`` split a step into the model and
    the rest (``benchmarks/bench_sample.py`` measures that overhead).
    """
    batch, width = x.shape
    n_masked = (x == mask_id).sum(-1).tolist()
    n_start = list(n_masked)
    fresh = [False] * batch  # the row's distribution matches its block
    row_nfe = [0] * batch
    dist: Distribution | None = None
    calls, step = 0, 0
    while True:
        stepping = [r for r in range(batch) if n_masked[r]]
        if not stepping:
            return x, calls, row_nfe
        with _region("sample.step"):
            need = [r for r in stepping if not fresh[r]]
            if need:
                rows = _row_index(need, batch, x.device)
                with _region("sample.forward"):
                    logits = forward(x if rows is None else x[rows], rows)
                new = Distribution.of(logits, mask_id, cfg.temperature, cfg.top_p, cfg.strategy == "topk_margin")
                if dist is None or rows is None:
                    dist = new if rows is None else _scatter_new(new, rows, batch)
                else:
                    dist.update(rows, new)
                for r in need:
                    row_nfe[r] += 1
                    fresh[r] = True
                calls += 1
            rows = _row_index(stepping, batch, x.device)
            step_time = None if cfg.strategy == "first_hitting" else times[min(step, len(times) - 1)]
            n_reveal = reveal_counts(cfg.strategy, step_time, [n_start[r] for r in stepping],
                                     [n_masked[r] for r in stepping])
            new_x = denoise_step(cfg.strategy, x if rows is None else x[rows], dist.rows(rows), step_time,
                                 n_reveal, mask_id, cfg.threshold,
                                 partial(streams.uniform, width, None if rows is None else stepping))
            if n_reveal is None:
                left = (new_x == mask_id).sum(-1).tolist()
            else:
                left = [n_masked[r] - k for r, k in zip(stepping, n_reveal, strict=True)]
            for r, n in zip(stepping, left, strict=True):
                if n < n_masked[r]:
                    n_masked[r], fresh[r] = n, False
            x = new_x if rows is None else x.index_copy(0, rows, new_x)
            step += 1


def _region(name: str):
    """A profiler label, only while a profiler runs (``record_function`` costs ~6 us, two per step)."""
    return torch.profiler.record_function(name) if torch.autograd._profiler_enabled() else nullcontext()


def _row_index(rows: list[int], batch: int, device: torch.device) -> torch.Tensor | None:
    """``rows`` of a batch as an index tensor, or None when they are all of it."""
    return None if len(rows) == batch else torch.tensor(rows, device=device)


def _scatter_new(new: Distribution, rows: torch.Tensor, batch: int) -> Distribution:
    """A ``batch``-row distribution holding ``new`` at ``rows`` (the others are filled later)."""

    def grow(t):
        if t is None:
            return None
        out = t.new_zeros((batch, *t.shape[1:]))
        out[rows] = t
        return out

    top2 = None if new.top2 is None else (grow(new.top2[0]), grow(new.top2[1]))
    return Distribution(grow(new.probs), grow(new.argmax), grow(new.cdf), top2)


# ------------------------------------------------------------------ checks and stopping
def _check(model: DiffusionLM, prompt_lengths: torch.Tensor, cfg: SamplerConfig, decode) -> None:
    mcfg = model.cfg
    eos = cfg.eos_token_id
    if eos is not None and (eos >= mcfg.vocab_size or eos == mcfg.mask_token_id):
        raise ConfigError(f"eos_token_id={eos} must be a vocabulary id below {mcfg.vocab_size} "
                          f"other than the mask token {mcfg.mask_token_id}")
    if cfg.stop_strings and decode is None:
        raise ConfigError("stop_strings need a decode function (token ids -> text): pass "
                          "decode=tokenizer.decode to sample")
    if mcfg.plan.decoding != "blocks" and (cfg.block_size is not None or cfg.sliding_window):
        raise ConfigError(f"variant {mcfg.variant!r} has no blocks: block_size and sliding_window "
                          "apply to E2D2 and BD3-LM only")
    if mcfg.plan.autoregressive and int(prompt_lengths.min()) < 1:
        raise ValueError("AR sampling conditions on the prompt: give every row at least one token "
                         "(e.g. BOS)")
    if mcfg.shift and int(prompt_lengths.min()) < 1:
        raise ValueError("a model with shift predicts each token from the one before it, and "
                         "position 0 has none: give every row a prompt of at least one token "
                         "(e.g. BOS)")
    S = cfg.block_size or mcfg.block_size
    longest = int(prompt_lengths.max()) + cfg.max_new_tokens
    if cfg.sliding_window:
        first_block_end = int(prompt_lengths.max()) // S * S + S
        if mcfg.seq_length % S or first_block_end > mcfg.seq_length:
            raise ConfigError(f"sliding_window keeps positions below seq_length={mcfg.seq_length}: it "
                              f"must be a multiple of block_size={S} and hold the prompt's blocks "
                              f"and one more ({first_block_end} positions); shorten the prompt")
    elif longest > mcfg.seq_length:
        warnings.warn(f"sampling {longest} positions with a model trained on seq_length="
                      f"{mcfg.seq_length}: positions past it were never seen in training "
                      "(sliding_window=True keeps them inside)", stacklevel=4)


def _stop_lengths(
    seq: torch.Tensor, prompt_lengths: torch.Tensor, checked: torch.Tensor, end: torch.Tensor,
    cfg: SamplerConfig, decode,
) -> torch.Tensor:
    """Per row, the sequence length through its first EOS or completed stop string among the
    generated positions ``[checked, end)`` (earlier ones were checked before), or -1.

    ``seq [b, width]`` is position-indexed; the others are ``[b]``.
    """
    b, width = seq.shape
    out = torch.full((b,), -1, dtype=torch.long, device=seq.device)
    if cfg.eos_token_id is not None:
        pos = torch.arange(width, device=seq.device)
        hit = (seq == cfg.eos_token_id) & (pos >= checked[:, None]) & (pos < end[:, None])
        first = torch.where(hit, pos, width).min(-1).values
        out = torch.where(hit.any(-1), first + 1, out)
    if cfg.stop_strings:
        for r in range(b):
            p, lo = int(prompt_lengths[r]), int(checked[r])
            hi = int(out[r]) if out[r] >= 0 else int(end[r])
            gen = seq[r, p:hi].tolist()
            if not any(s in decode(gen) for s in cfg.stop_strings):
                continue
            for n in range(max(lo - p, 0) + 1, len(gen) + 1):  # the token that completes it
                if any(s in decode(gen[:n]) for s in cfg.stop_strings):
                    out[r] = p + n
                    break
    return out


# ------------------------------------------------------------------ block variants
class _BlockRun:
    """Shared bookkeeping of a block run: rows, their prompts, output, stopping."""

    def __init__(self, model: DiffusionLM, prompt: torch.Tensor, plens: torch.Tensor,
                 cfg: SamplerConfig, S: int):
        self.model, self.cfg, self.S = model, cfg, S
        device = prompt.device
        self.plens = plens
        self.tail = plens % S
        self.n_ctx = plens - self.tail
        self.budget_end = plens + cfg.max_new_tokens  # each row's last position, exclusive
        self.n_blocks = -(-(self.tail + cfg.max_new_tokens) // S)  # [B]
        self.blocks_of = self.n_blocks.tolist()  # the same on the host
        width = int((self.n_ctx + self.n_blocks * S).max())
        self.seq = torch.full((prompt.shape[0], width), model.cfg.mask_token_id, dtype=torch.long, device=device)
        self.seq[:, :prompt.shape[1]] = prompt
        self.seq[torch.arange(width, device=device)[None, :] >= plens[:, None]] = model.cfg.mask_token_id
        self.lengths = self.budget_end.clone()
        self.finished = torch.zeros_like(plens, dtype=torch.bool)

    def finish_block(self, act: torch.Tensor, rows: list[int], j: int, decode) -> list[bool]:
        """Record stops after block ``j``; returns which of ``act`` (on the host: ``rows``) go on."""
        more = [self.blocks_of[r] > j + 1 for r in rows]
        if self.cfg.eos_token_id is None and not self.cfg.stop_strings:
            return more  # nothing stops a row before its budget
        start = torch.maximum(self.n_ctx[act] + j * self.S, self.plens[act])
        end = torch.minimum(self.n_ctx[act] + (j + 1) * self.S, self.budget_end[act])
        stop = _stop_lengths(self.seq[act], self.plens[act], start, end, self.cfg, decode)
        stopped = stop >= 0
        self.lengths[act] = torch.where(stopped, stop, self.lengths[act])
        self.finished[act] = stopped
        return [go and not halt for go, halt in zip(more, stopped.tolist(), strict=True)]


class _CachedDenoiser:
    """Clean prefix kept as a left-padded KV cache; a step runs only ``model.denoise`` on the block."""

    def __init__(self, run: _BlockRun):
        self.run, model, S = run, run.model, run.S
        mcfg = model.cfg
        self.bidirectional = mcfg.prompt_is_bidirectional
        max_ctx = int(run.n_ctx.max())
        capacity = max_ctx + int(run.n_blocks.max()) * S
        if run.cfg.sliding_window:
            capacity = min(capacity, mcfg.seq_length)
        self.cache: KVCache = model.new_cache(len(run.plens), capacity, max_ctx - run.n_ctx)
        self.tail = run.tail
        self._constants_of: torch.Tensor | None = None
        self._prefill(max_ctx)

    def _prefill(self, max_ctx: int) -> None:
        """Encode the prompts' whole blocks; with a bidirectional prompt they also read the tail."""
        run, S, cache = self.run, self.S, self.cache
        if max_ctx == 0:
            return  # no whole block to keep: a tail is encoded with its block
        width = max_ctx + (int(self.tail.max()) if self.bidirectional else 0)
        col = torch.arange(width, device=run.seq.device)
        pos = col[None, :] - cache.offset[:, None]  # [B, width]
        real = (pos >= 0) & (pos < run.plens[:, None])
        tokens = run.seq.gather(1, pos.clamp(0, run.seq.shape[1] - 1)).masked_fill(~real, 0)
        if self.bidirectional:
            mask = real[:, None, :].expand(-1, width, -1)
        else:
            mask = real[:, None, :] & (col[None, None, :] // S <= col[None, :, None] // S)
        mask = mask | ((col[:, None] == col[None, :]) & ~real[:, :, None])  # pads see themselves
        run.model.encode(tokens, cache, pos.clamp(min=0), mask, keep=max_ctx)

    @property
    def S(self) -> int:
        return self.run.S

    def _offset_constants(self) -> tuple[torch.Tensor, bool]:
        """``arange(S) - offset [b, S]`` and whether any row is padded, made again only when the
        cache's offsets change (rows dropped, a sliding window moved)."""
        offset = self.cache.offset
        if self._constants_of is not offset:
            self._constants = (torch.arange(self.S, device=offset.device) - offset[:, None], bool((offset > 0).any()))
            self._constants_of = offset
        return self._constants

    def positions(self) -> torch.Tensor:
        """RoPE positions of the current block of every working row: ``[b, S]``."""
        return self._offset_constants()[0] + self.cache.length

    def _visible(self) -> torch.Tensor | None:
        """``bool[b, S, length + S]``: cached columns at or past each row's offset, and the block."""
        if not self._offset_constants()[1]:
            return None
        col = torch.arange(self.cache.length + self.S, device=self.cache.offset.device)
        return (col[None, :] >= self.cache.offset[:, None])[:, None, :].expand(-1, self.S, -1)

    def _begin(self, j: int) -> None:
        """Block ``j``'s positions, visibility mask and RoPE tables (its steps' and its commit's)."""
        cfg, cache = self.run.cfg, self.cache
        if cfg.sliding_window and cache.length + self.S > self.run.model.cfg.seq_length:
            mcfg = self.run.model.cfg
            cache.drop_oldest(self.S, mcfg.kv_channels, mcfg.rope_theta)
        self._positions, self._mask = self.positions(), self._visible()
        self._rope = self.run.model.rope_tables(self._positions)

    def start_block(self, j: int) -> None:
        self._begin(j)
        self._forward = self.run.model.block_forward(self.cache, self._positions, self._mask, rope=self._rope)

    def __call__(self, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        return (self._forward if rows is None else self._forward.select(rows))(x)

    def commit(self, block: torch.Tensor, j: int) -> None:
        mask = self._mask
        if j == 0 and self.bidirectional and bool((self.tail > 0).any()):
            # the tail is context: in training its queries read context keys only
            if mask is None:
                mask = torch.ones(block.shape[0], self.S, self.cache.length + self.S, dtype=torch.bool,
                                  device=block.device)
            i = torch.arange(self.S, device=block.device)
            tail_q = i[None, :, None] < self.tail[:, None, None]  # [b, S, 1]
            own_k = torch.arange(self.cache.length + self.S, device=block.device) - self.cache.length
            own_non_ctx = own_k[None, None, :] >= self.tail[:, None, None]  # a key of the block past the tail
            mask = mask & ~(tail_q & own_non_ctx)
        self.run.model.encode(block, self.cache, self._positions, mask, rope=self._rope)

    def select(self, rows: torch.Tensor) -> None:
        """Keep batch ``rows`` (between a block's steps and its commit; the next block's
        forward is made at its start)."""
        self.cache = self.cache.select(rows)
        self.tail = self.tail[rows]
        self._positions = self._positions[rows]
        self._mask = None if self._mask is None else self._mask[rows]
        self._rope = self._rope.rows(rows)
        self._forward = None


class _ShiftedCachedDenoiser(_CachedDenoiser):
    """The cached denoiser of a model with ``shift`` (`e2d2.shift`): block ``j`` at positions
    ``[start, start + S)`` is denoised through the window ``[x0[start - 1], block[:S - 1]]``
    at positions ``[start - 1, start + S - 1)``, whose slot ``i`` predicts block token ``i``;
    the window sees the cached columns before ``start - 1`` (the last one it holds itself).
    A row with nothing cached (its first block starts at 0, the prompt's first token revealed
    in it) has a dummy first slot that no other slot sees."""

    def __init__(self, run: _BlockRun):
        super().__init__(run)
        self.act = torch.arange(len(run.plens), device=run.plens.device)  # rows of run.seq

    def start_block(self, j: int) -> None:
        self._begin(j)
        cache, S = self.cache, self.S
        start = self.run.n_ctx[self.act] + j * S
        self._prev = self.run.seq[self.act, (start - 1).clamp(min=0)]  # [b]
        self._positions_window = (self._positions - 1).clamp(min=0)
        col = torch.arange(cache.length + S, device=start.device)
        empty = cache.offset == cache.length  # no cached column: slot 0 is a dummy
        cached = (col[None, :] >= cache.offset[:, None]) & (col[None, :] < cache.length - 1)
        own = (col[None, :] >= cache.length) & ~(empty[:, None] & (col[None, :] == cache.length))
        mask = (cached | own)[:, None, :].repeat(1, S, 1)
        mask[:, 0, cache.length] |= empty  # the dummy query sees itself
        self._window_mask = mask
        self._forward = self.run.model.block_forward(cache, self._positions_window, mask)

    def __call__(self, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        prev = self._prev if rows is None else self._prev[rows]
        window = torch.cat((prev[:, None], x[:, :-1]), 1)
        return (self._forward if rows is None else self._forward.select(rows))(window)

    def select(self, rows: torch.Tensor) -> None:
        super().select(rows)
        self.act = self.act[rows]


class _FullDenoiser:
    """No cache: each row runs the training forward (with its prompt as context mask) on its
    prefix and block, alone. The reference the cache is tested against."""

    def __init__(self, run: _BlockRun):
        self.run = run
        self.act = torch.arange(len(run.plens), device=run.plens.device)

    def start_block(self, j: int) -> None:
        self.j = j

    def __call__(self, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        run, S = self.run, self.run.S
        rows = torch.arange(x.shape[0], device=x.device) if rows is None else rows
        out = []
        for i, r in enumerate(self.act[rows].tolist()):
            start = int(run.n_ctx[r]) + self.j * S
            tokens = torch.cat((run.seq[r, :start], x[i]))[None]
            context = torch.arange(start + S, device=x.device)[None] < run.plens[r]
            out.append(run.model(tokens, tokens, context_mask=context, block_size=S)[:, start:])
        return torch.cat(out)

    def commit(self, block: torch.Tensor, j: int) -> None:
        pass  # the run's position-indexed sequence already holds the block

    def select(self, rows: torch.Tensor) -> None:
        self.act = self.act[rows]


def _sample_blocks(model, prompt, plens, cfg, streams, decode) -> SampleOutput:
    S = cfg.block_size or model.cfg.block_size
    run = _BlockRun(model, prompt, plens, cfg, S)
    cached = _ShiftedCachedDenoiser if model.cfg.shift else _CachedDenoiser
    denoiser = (cached if cfg.use_cache else _FullDenoiser)(run)
    times = step_times(cfg.schedule, cfg.steps, cfg.min_t)
    batch, device = len(plens), plens.device
    act, rows = torch.arange(batch, device=device), list(range(batch))  # working rows (tensor, host)
    first = run.n_ctx[:, None] + torch.arange(S, device=device)  # [b, S]: block 0's positions, + j S for block j
    nfe_per_block, row_nfe = [], [[0] * max(run.blocks_of) for _ in range(batch)]
    for j in range(max(run.blocks_of)):
        denoiser.start_block(j)
        pos = first + j * S
        block = run.seq.gather(1, pos) if len(rows) == batch else run.seq[act[:, None], pos]
        block, calls, counts = _denoise_block(denoiser, block, cfg, times, model.cfg.mask_token_id, streams)
        run.seq[act[:, None], pos] = block
        for r, n in zip(rows, counts, strict=True):
            row_nfe[r][j] = n
        nfe_per_block.append(calls)
        go_on = run.finish_block(act, rows, j, decode)
        keep = [i for i, go in enumerate(go_on) if go]
        if not keep:
            break
        if len(keep) < len(rows):
            idx = torch.tensor(keep, device=device)
            act, block, first, streams = act[idx], block[idx], first[idx], streams.select(keep)
            rows = [rows[i] for i in keep]
            denoiser.select(idx)
        denoiser.commit(block, j)
    row_nfe = torch.tensor(row_nfe, dtype=torch.long, device=device)
    return _output(model, run.seq, plens, run.lengths, run.finished, cfg, nfe_per_block,
                   row_nfe[:, :len(nfe_per_block)])


def _output(model, seq, plens, lengths, finished, cfg, nfe_per_block, row_nfe) -> SampleOutput:
    width = int(plens.max()) + cfg.max_new_tokens
    tokens = seq[:, :width]
    fill = cfg.eos_token_id if cfg.eos_token_id is not None else model.cfg.mask_token_id
    after = torch.arange(width, device=seq.device)[None, :] >= lengths[:, None]
    return SampleOutput(tokens.masked_fill(after, fill), plens, lengths, finished, nfe_per_block, row_nfe)


# ------------------------------------------------------------------ MDLM and AR
def _sample_mdlm(model, prompt, plens, cfg, streams, decode) -> SampleOutput:
    """One block over prompt + completion, right-padded, a full forward per step."""
    mask_id, device = model.cfg.mask_token_id, plens.device
    batch, width = len(plens), int(plens.max()) + cfg.max_new_tokens
    col = torch.arange(width, device=device)[None, :]
    end = plens[:, None] + cfg.max_new_tokens
    x = torch.zeros(batch, width, dtype=torch.long, device=device)
    x[:, :prompt.shape[1]] = prompt
    x = torch.where(col < plens[:, None], x, torch.where(col < end, mask_id, 0))
    real = col < end
    ragged = not bool(real.all())

    def forward(xs, rows):
        pad = (real if rows is None else real[rows]) if ragged else None
        return model(xs, xs, attention_mask=pad)

    times = step_times(cfg.schedule, cfg.steps, cfg.min_t)
    streams = RowStreams(streams.generators, streams.device, end[:, 0].tolist())
    x, calls, counts = _denoise_block(forward, x, cfg, times, mask_id, streams)
    stop = _stop_lengths(x, plens, plens, end[:, 0], cfg, decode)
    lengths = torch.where(stop >= 0, stop, end[:, 0])
    return _output(model, x, plens, lengths, stop >= 0, cfg, [calls],
                   torch.tensor(counts, dtype=torch.long, device=device)[:, None])


def _sample_ar(model, prompt, plens, cfg, streams, decode) -> SampleOutput:
    """Next-token sampling, one forward per token, with a left-padded KV cache (or without)."""
    mask_id, device = model.cfg.mask_token_id, plens.device
    batch, max_p = len(plens), int(plens.max())
    width = max_p + cfg.max_new_tokens
    seq = torch.full((batch, width), mask_id, dtype=torch.long, device=device)
    seq[:, :prompt.shape[1]] = prompt
    lengths, finished = plens + cfg.max_new_tokens, torch.zeros(batch, dtype=torch.bool, device=device)
    act = torch.arange(batch, device=device)
    step = _ARCached(model, seq, plens, width) if cfg.use_cache else _ARFull(model, seq, plens)
    logits = step.first()
    for i in range(cfg.max_new_tokens):
        dist = Distribution.of(logits[:, None], mask_id, cfg.temperature, cfg.top_p, False)
        if dist.cdf is None:
            tok = dist.argmax[:, 0]
        else:
            u = streams.uniform(1)
            tok = torch.searchsorted(dist.cdf[:, 0], u * dist.cdf[:, 0, -1:], right=True)[:, 0]
        at = plens[act] + i
        seq[act, at] = tok
        stop = _stop_lengths(seq[act], plens[act], at, at + 1, cfg, decode)
        stopped = stop >= 0
        lengths[act] = torch.where(stopped, stop, lengths[act])
        finished[act] = stopped
        if i == cfg.max_new_tokens - 1 or bool(stopped.all()):
            break
        if bool(stopped.any()):
            keep = (~stopped).nonzero().squeeze(1)
            act, tok, streams = act[keep], tok[keep], streams.select(keep.tolist())
            step.select(keep)
        logits = step.next(tok, i)
    n = int((lengths - plens).max())
    return _output(model, seq, plens, lengths, finished, cfg, [1] * n,
                   ((lengths - plens)[:, None] > torch.arange(n, device=device)).long())


class _ARCached:
    def __init__(self, model, seq, plens, capacity):
        self.model, self.plens = model, plens
        max_p = int(plens.max())
        self.cache = model.new_cache(len(plens), capacity, max_p - plens)
        col = torch.arange(max_p, device=plens.device)
        pos = col[None, :] - self.cache.offset[:, None]
        real = pos >= 0
        self.tokens = seq.gather(1, pos.clamp(min=0)).masked_fill(~real, 0)
        self.pos = pos.clamp(min=0)
        causal = col[None, :] <= col[:, None]
        self.mask = (causal[None] & real[:, None, :]) | (torch.eye(max_p, dtype=torch.bool, device=plens.device)[None])
        self.act = torch.arange(len(plens), device=plens.device)

    def first(self) -> torch.Tensor:
        h = self.model.encode(self.tokens, self.cache, self.pos, self.mask)
        return self.model.logits(h[:, -1])

    def next(self, tok: torch.Tensor, i: int) -> torch.Tensor:
        cache = self.cache
        mask = None
        if bool((cache.offset > 0).any()):
            col = torch.arange(cache.length + 1, device=tok.device)
            mask = (col[None, :] >= cache.offset[:, None])[:, None, :]
        pos = (self.plens[self.act] + i)[:, None]
        h = self.model.encode(tok[:, None], cache, pos, mask)
        return self.model.logits(h[:, -1])

    def select(self, rows):
        self.cache, self.act = self.cache.select(rows), self.act[rows]


class _ARFull:
    def __init__(self, model, seq, plens):
        self.model, self.seq, self.plens = model, seq, plens
        self.act = torch.arange(len(plens), device=plens.device)

    def _logits(self, i: int) -> torch.Tensor:
        out = []
        for r in self.act.tolist():
            tokens = self.seq[r, : int(self.plens[r]) + i][None]
            out.append(self.model(tokens)[:, -1])
        return torch.cat(out)

    def first(self) -> torch.Tensor:
        return self._logits(0)

    def next(self, tok: torch.Tensor, i: int) -> torch.Tensor:
        return self._logits(i + 1)  # seq already holds tok

    def select(self, rows):
        self.act = self.act[rows]


# ------------------------------------------------------------------ entry points
@torch.no_grad()
def _run(model, prompt, plens, cfg, generator, seeds, decode) -> SampleOutput:
    mcfg = model.cfg
    if prompt.dim() != 2 or prompt.dtype != torch.long:
        raise ValueError(f"prompt must be a LongTensor [batch, P], got {prompt.dtype} {tuple(prompt.shape)}")
    real = torch.arange(prompt.shape[1], device=prompt.device)[None, :] < plens[:, None]
    if (prompt[real] == mcfg.mask_token_id).any():
        raise ValueError(f"prompt contains the mask token {mcfg.mask_token_id}")
    if real.any() and (prompt[real].min() < 0 or prompt[real].max() >= mcfg.vocab_size):
        raise ValueError(f"prompt ids must lie in [0, {mcfg.vocab_size}); got "
                         f"[{int(prompt[real].min())}, {int(prompt[real].max())}]: was it encoded with "
                         "this model's tokenizer?")
    _check(model, plens, cfg, decode)
    batch, device = prompt.shape[0], prompt.device
    if seeds is None:
        seeds = torch.randint(0, 2**62, (batch,), generator=generator).tolist()
    elif len(seeds) != batch:
        raise ValueError(f"seeds has {len(seeds)} entries for {batch} prompts")
    streams = RowStreams.seeded(seeds, device)
    prompt = prompt.masked_fill(~real, 0)
    samplers = {"autoregressive": _sample_ar, "whole_sequence": _sample_mdlm, "blocks": _sample_blocks}
    return samplers[mcfg.plan.decoding](model, prompt, plens, cfg, streams, decode)


def sample(
    model: DiffusionLM,
    prompt: torch.Tensor,
    cfg: SamplerConfig,
    generator: torch.Generator | None = None,
    *,
    seeds: Sequence[int] | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> SampleOutput:
    """Generate ``cfg.max_new_tokens`` tokens after ``prompt [batch, P]`` (see module docstring).

    ``seeds``: one seed per row (row ``r`` draws only from its own stream); by default they
    are drawn from ``generator`` (or torch's global generator). ``decode``: token ids to text,
    needed by ``cfg.stop_strings``.
    """
    plens = torch.full((prompt.shape[0],), prompt.shape[1], dtype=torch.long, device=prompt.device)
    return _run(model, prompt, plens, cfg, generator, seeds, decode)


def sample_prompts(
    model: DiffusionLM,
    prompts: Sequence[Sequence[int]],
    cfg: SamplerConfig,
    generator: torch.Generator | None = None,
    *,
    seeds: Sequence[int] | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> list[list[int]]:
    """Completions (through EOS or the stop string, if any) for prompts of any lengths, in
    input order, sampled as one batch: each equals its prompt sampled alone with its seed."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    plens = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
    padded = torch.zeros(len(prompts), int(plens.max()), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        padded[i, :len(p)] = torch.tensor(list(p), dtype=torch.long)
    out = _run(model, padded, plens, cfg, generator, seeds, decode)
    return [out.completion(i) for i in range(len(prompts))]
