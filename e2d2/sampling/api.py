"""The entry points: `sample` and `sample_prompts` check their input, seed the rows and run
the variant's loop."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from e2d2.config import SamplerConfig
from e2d2.errors import ConfigError
from e2d2.model import DiffusionLM
from e2d2.sampling.ar import sample_ar
from e2d2.sampling.blocks import sample_blocks, sample_mdlm
from e2d2.sampling.distributions import RowStreams
from e2d2.sampling.outputs import SampleOutput


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
                      "(sliding_window=True, `e2d2 sample --sliding-window`, keeps them inside)", stacklevel=4)



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
    samplers = {"autoregressive": sample_ar, "whole_sequence": sample_mdlm, "blocks": sample_blocks}
    return samplers[mcfg.plan.decoding](model, prompt, plens, cfg, streams, decode)


def sample(
    model: DiffusionLM,
    prompt: torch.Tensor,
    cfg: SamplerConfig,
    generator: torch.Generator | None = None,
    *,
    seeds: Sequence[int] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    prompt_lengths: torch.Tensor | None = None,
) -> SampleOutput:
    """Generate ``cfg.max_new_tokens`` tokens after ``prompt [batch, P]`` (see module docstring).

    ``seeds``: one seed per row (row ``r`` draws only from its own stream); by default they
    are drawn from ``generator`` (or torch's global generator). ``decode``: token ids to text,
    needed by ``cfg.stop_strings``. ``prompt_lengths [batch]``: row ``r``'s prompt is
    ``prompt[r, :prompt_lengths[r]]`` (the rest is padding); default: every row is ``P`` long.
    """
    batch, P = prompt.shape[0], prompt.shape[-1]
    if prompt_lengths is None:
        plens = torch.full((batch,), P, dtype=torch.long, device=prompt.device)
    else:
        plens = torch.as_tensor(prompt_lengths, dtype=torch.long, device=prompt.device)
        if plens.shape != (batch,) or bool((plens < 0).any() or (plens > P).any()):
            raise ValueError(f"prompt_lengths must hold {batch} lengths in [0, {P}], got {plens.tolist()}")
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
    out = sample(model, padded, cfg, generator, seeds=seeds, decode=decode, prompt_lengths=plens)
    return [out.completion(i) for i in range(len(prompts))]
