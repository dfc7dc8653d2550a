"""Per-block masked-diffusion noising, the SUBS parameterization and the loss (spec 2 and 4).

The functions here are engine-independent tensor math: the reference model and the
megatron-core engine both call them (noising on the first stage, the loss reduction on
the last stage, where the engine computes the per-token NLL with vocab-parallel CE).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from e2d2 import masks
from e2d2.config import DiffusionConfig, ModelConfig
from e2d2.errors import require
from e2d2.noise import Schedule, evaluation_schedule, get_schedule


@dataclass
class NoisedBatch:
    """A noised batch. All tensors ``[batch, L]``.

    ``masked``: positions replaced by ``[MASK]``. ``loss_mask``: positions that count
    (real, non-context). ``alpha``/``alpha_prime``: the schedule at each token's block time.
    """

    x0: torch.Tensor
    xt: torch.Tensor
    masked: torch.Tensor
    loss_mask: torch.Tensor
    t: torch.Tensor
    alpha: torch.Tensor
    alpha_prime: torch.Tensor


def sample_block_times(
    batch: int, n_blocks: int, antithetic: bool, sampling_eps: float, generator=None, device=None
) -> torch.Tensor:
    """One time per block, ``[batch, n_blocks]`` in ``[sampling_eps, 1]``.

    Antithetic: the ``batch * n_blocks`` times are stratified (one shared uniform shifted by
    ``i / n``), which lowers the variance of the batch loss.
    """
    n = batch * n_blocks
    if antithetic:
        u = torch.rand(1, generator=generator, device=device)
        return stratified_times(u, torch.arange(n, device=device), n, sampling_eps).view(batch, n_blocks)
    t = torch.rand(n, generator=generator, device=device)
    return ((1.0 - sampling_eps) * t + sampling_eps).view(batch, n_blocks)


def stratified_times(u: torch.Tensor, strata: torch.Tensor, n: int, sampling_eps: float) -> torch.Tensor:
    """Antithetic times: stratum ``i`` of ``n`` gets ``(u + i / n) mod 1``, mapped to
    ``[sampling_eps, 1]`` (``u``: one shared uniform; ``strata``: integer tensor, any shape)."""
    t = (u + strata / n) % 1.0
    return (1.0 - sampling_eps) * t + sampling_eps


def loss_mask_of(x0: torch.Tensor, attention_mask=None, context_mask=None,
                 keep_clean_bos: bool = False) -> torch.Tensor:
    """Positions that are real and not context (nor BOS, with ``keep_clean_bos``): the tokens
    that count, ``bool[batch, L]``."""
    keep = torch.ones_like(x0, dtype=torch.bool)
    if attention_mask is not None:
        keep &= attention_mask.bool()
    if context_mask is not None:
        keep &= ~context_mask.bool()
    if keep_clean_bos:
        keep[:, 0] = False
    return keep


def noise(
    x0: torch.Tensor,
    t_blocks: torch.Tensor,
    schedule: Schedule,
    block_size: int,
    mask_token_id: int,
    attention_mask: torch.Tensor | None = None,
    context_mask: torch.Tensor | None = None,
    ensure_masked: bool = True,
    generator=None,
    keep_clean_bos: bool = False,
    remask_prompt_blocks: bool = True,
) -> NoisedBatch:
    """Mask each eligible token of block ``b`` with probability ``1 - alpha(t_b)``.

    x0 ``[batch, L]``, t_blocks ``[batch, L // block_size]``. With ``ensure_masked`` (training),
    a block left with no masked eligible token gets ``m ~ U{1..eligible}`` random positions
    masked, so every block carries signal; ``remask_prompt_blocks=False`` exempts blocks that
    hold a context token. ``keep_clean_bos``: position 0 is never masked nor counted.
    """
    S = block_size
    eligible = loss_mask_of(x0, attention_mask, context_mask, keep_clean_bos)
    t = t_blocks.repeat_interleave(S, dim=1)
    alpha, alpha_prime = schedule(t)
    u = torch.rand(x0.shape, generator=generator, device=x0.device)
    masked = (u < 1.0 - alpha) & eligible
    if ensure_masked:
        remask = eligible
        if not remask_prompt_blocks and context_mask is not None:
            has_prompt = context_mask.bool().view(x0.shape[0], -1, S).any(-1, keepdim=True)
            remask = eligible & ~has_prompt.expand(-1, -1, S).reshape(x0.shape)
        masked |= _remask_empty_blocks(masked, remask, S, generator)
    xt = torch.where(masked, torch.full_like(x0, mask_token_id), x0)
    return NoisedBatch(x0, xt, masked, eligible, t, alpha, alpha_prime)


def _remask_empty_blocks(masked, eligible, S, generator) -> torch.Tensor:
    """Extra positions to mask in blocks that have eligible tokens but none masked."""
    batch, L = masked.shape
    m3, e3 = masked.view(batch, -1, S), eligible.view(batch, -1, S)
    n_eligible = e3.sum(-1)
    empty = (m3.sum(-1) == 0) & (n_eligible > 0)
    # Random order of eligible positions inside each block; mask the first m of them.
    scores = torch.rand(e3.shape, generator=generator, device=masked.device).masked_fill(~e3, 2.0)
    rank = scores.argsort(-1).argsort(-1)
    frac = torch.rand(n_eligible.shape, generator=generator, device=masked.device)
    m = (frac * n_eligible).long() + 1
    extra = (rank < m[..., None]) & e3 & empty[..., None]
    return extra.view(batch, L)


def subs_logits(logits: torch.Tensor, xt: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """SUBS: ``[MASK]`` never predicted; unmasked positions copy their input (log-prob 0).

    logits ``[batch, L, vocab]`` -> log-probs ``[batch, L, vocab]`` (float32); ``logits`` is
    left as it is.
    """
    logp = _without_mask_logit(logits, mask_token_id).log_softmax(-1)
    unmasked = xt != mask_token_id
    copy = torch.full_like(logp, float("-inf"))
    copy.scatter_(-1, xt.unsqueeze(-1), 0.0)
    return torch.where(unmasked.unsqueeze(-1), copy, logp)


def token_nll(logits: torch.Tensor, x0: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """``-log p(x0_i | xt)`` at every position with ``[MASK]`` excluded: ``[batch, L]`` float32.

    Only masked positions enter the loss, where SUBS equals plain CE with the mask logit
    removed; the engine computes the same thing with vocab-parallel cross-entropy. ``logits``
    is left as it is.
    """
    return F.cross_entropy(_without_mask_logit(logits, mask_token_id).transpose(1, 2), x0, reduction="none")


def _without_mask_logit(logits: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """A float32 copy of ``logits`` with the ``[MASK]`` logit at ``-inf`` (never in place:
    ``.float()`` of float32 logits is the caller's tensor itself)."""
    is_mask = torch.arange(logits.shape[-1], device=logits.device) == mask_token_id
    return logits.float().masked_fill(is_mask, float("-inf"))


def elbo_weight(nb: NoisedBatch) -> torch.Tensor:
    """``-alpha'(t) / (1 - alpha(t))`` per token, ``[batch, L]``."""
    return -nb.alpha_prime / (1.0 - nb.alpha).clamp(min=1e-6)


def per_sequence_loss(nll: torch.Tensor, nb: NoisedBatch, weighting: str) -> torch.Tensor:
    """Sum of (weighted) NLL over masked counted positions / number of counted tokens: ``[batch]``."""
    weight = elbo_weight(nb) if weighting == "elbo" else torch.ones_like(nll)
    counted = (nb.masked & nb.loss_mask).float()
    n_tokens = nb.loss_mask.float().sum(-1).clamp(min=1.0)
    return (nll * weight * counted).sum(-1) / n_tokens


def ar_per_sequence_loss(next_token_nll: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over counted targets, per sequence: ``[batch]``.

    ``next_token_nll [batch, L-1]`` is ``-log p(x0[i+1] | x0[:i+1])``; ``loss_mask [batch, L]``.
    """
    counted = loss_mask[:, 1:].float()
    return (next_token_nll * counted).sum(-1) / counted.sum(-1).clamp(min=1.0)


def ar_nll(logits: torch.Tensor, x0: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Next-token NLL per sequence: ``[batch]`` (mean over counted target tokens)."""
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), x0[:, 1:], reduction="none")
    return ar_per_sequence_loss(nll, loss_mask)


class DiffusionObjective:
    """Ties a model config to its noising process and loss; used by training and evaluation.

    ``schedule`` noises training batches; ``eval_schedule`` (the same, unclipped) noises
    evaluation batches, so that the NELBO is a bound whatever the training schedule.
    With ``ModelConfig.shift`` position 0 has no predictor, so it stays clean and uncounted
    (``keep_clean_bos`` forced on).
    """

    def __init__(self, model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig, sampling_eps: float = 1e-3):
        require(not (diffusion_cfg.anneal_steps and model_cfg.plan.autoregressive),
                "diffusion.anneal_steps anneals a causal mask into a diffusion mask; the 'ar' "
                "variant has only the causal one: set anneal_steps=0 or pick a diffusion variant")
        self.model_cfg, self.cfg = model_cfg, diffusion_cfg
        self.keep_clean_bos = diffusion_cfg.keep_clean_bos or model_cfg.shift
        self.schedule = get_schedule(diffusion_cfg.schedule, **diffusion_cfg.schedule_kwargs)
        self.eval_schedule = evaluation_schedule(diffusion_cfg.schedule, **diffusion_cfg.schedule_kwargs)
        self.sampling_eps = sampling_eps

    def noise(self, x0, attention_mask=None, context_mask=None, train=True, generator=None,
              times: torch.Tensor | None = None) -> NoisedBatch:
        """``times [batch, L / S]``: the block times, when the caller stratifies them over more
        than this batch (the engine: over the global batch, `megatron_ext.objective`); by
        default drawn here (`sample_block_times`)."""
        S = self.model_cfg.diffusion_block_size
        if times is None:
            times = sample_block_times(x0.shape[0], x0.shape[1] // S, self.cfg.antithetic and train,
                                       self.sampling_eps, generator, x0.device)
        return noise(x0, times, self.schedule if train else self.eval_schedule, S, self.model_cfg.mask_token_id,
                     attention_mask, context_mask, ensure_masked=train, generator=generator,
                     keep_clean_bos=self.keep_clean_bos, remask_prompt_blocks=self.cfg.remask_prompt_blocks)

    def anneal_ratio(self, step: int | None) -> float:
        """The attention annealing ratio at training ``step`` (`e2d2.masks.anneal_ratio`); 1
        (the variant's mask) for ``None``: evaluation and sampling."""
        return 1.0 if step is None else masks.anneal_ratio(step, self.cfg.anneal_steps)

    def loss_mask(self, x0, attention_mask=None, context_mask=None) -> torch.Tensor:
        """The tokens that count, ``bool[batch, L]``: real, not context, not a kept-clean BOS
        (AR: not position 0, which it never predicts)."""
        no_bos = self.keep_clean_bos or self.model_cfg.plan.autoregressive
        return loss_mask_of(x0, attention_mask, context_mask, no_bos)

    def loss(self, model, x0, attention_mask=None, context_mask=None, generator=None,
             step: int | None = None) -> torch.Tensor:
        """Training loss (scalar): the configured weighting, with the every-block-masked rule.
        ``step``: the training step, for the annealed mask (None: the variant's mask)."""
        if self.model_cfg.plan.autoregressive:
            return ar_nll(model(x0), x0, self.loss_mask(x0, attention_mask, context_mask)).mean()
        nb = self.noise(x0, attention_mask, context_mask, train=True, generator=generator)
        logits = model(x0, nb.xt, attention_mask, context_mask, anneal=self.anneal_ratio(step))
        nll = token_nll(logits, x0, self.model_cfg.mask_token_id)
        return per_sequence_loss(nll, nb, self.cfg.loss_weighting).mean()

    @torch.no_grad()
    def nelbo(self, model, x0, attention_mask=None, context_mask=None, generator=None) -> torch.Tensor:
        """One Monte-Carlo draw of the NELBO per token for each sequence: ``[batch]`` (nats).

        AR models return their exact NLL per token, so all variants report a comparable bound.
        """
        if self.model_cfg.plan.autoregressive:
            return ar_nll(model(x0), x0, self.loss_mask(x0, attention_mask, context_mask))
        nb = self.noise(x0, attention_mask, context_mask, train=False, generator=generator)
        nll = token_nll(model(x0, nb.xt, attention_mask, context_mask), x0, self.model_cfg.mask_token_id)
        return per_sequence_loss(nll, nb, "elbo")
