"""Sampling a model with ``shift`` (`e2d2.shift`): the KV-cached sampler (windows
``[x0[bS - 1], block[:S - 1]]``) gives the tokens of the uncached one, which runs the
training forward; a row of a mixed-length batch equals its prompt sampled alone; an empty
prompt is one clear error."""

from __future__ import annotations

import functools

import pytest
import torch
from test_sampling import EOS, MASK, tiny_model

from e2d2.model import DiffusionLM
from e2d2.sampling import SamplerConfig, sample, sample_prompts


@functools.cache
def shifted_model(variant: str) -> DiffusionLM:
    """tests/test_sampling.py's tiny float64 model with ``shift``, on the same weights."""
    base = tiny_model(variant)
    model = DiffusionLM(base.cfg.replace(shift=True)).double()
    model.load_state_dict(base.state_dict())
    return model


@pytest.mark.parametrize("prompt_len", [1, 3, 4, 5, 9])  # inside the first block, whole blocks, tails
@pytest.mark.parametrize("strategy,temperature", [("ancestral", 1.0), ("topk", 0.0)])
@pytest.mark.parametrize("variant", ["e2d2", "e2d2_shared_kv", "bd3lm"])
def test_cached_equals_uncached(variant, strategy, temperature, prompt_len):
    model = shifted_model(variant)
    prompt = torch.randint(0, MASK, (3, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    kw = dict(strategy=strategy, steps=3, temperature=temperature, max_new_tokens=10, eos_token_id=EOS)
    cached = sample(model, prompt, SamplerConfig(use_cache=True, **kw), seeds=[1, 2, 3])
    full = sample(model, prompt, SamplerConfig(use_cache=False, **kw), seeds=[1, 2, 3])
    assert torch.equal(cached.tokens, full.tokens)
    assert cached.nfe_per_block == full.nfe_per_block
    assert not (cached.tokens == MASK).any() and torch.equal(cached.tokens[:, :prompt_len], prompt)


@pytest.mark.parametrize("variant", ["e2d2", "bd3lm", "mdlm"])
def test_mixed_length_prompts_equal_each_prompt_alone(variant):
    model = shifted_model(variant)
    lists = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10], [2, 2, 2, 2], [7] * 9]
    seeds = list(range(10, 10 + len(lists)))
    for use_cache in (True, False):
        cfg = SamplerConfig(strategy="ancestral", steps=3, max_new_tokens=10, eos_token_id=EOS,
                            use_cache=use_cache)
        got = sample_prompts(model, lists, cfg, seeds=seeds)
        for p, seed, completion in zip(lists, seeds, got, strict=True):
            alone = sample(model, torch.tensor([p], dtype=torch.long), cfg, seeds=[seed])
            assert completion == alone.completion(0), (p, use_cache)


def test_an_empty_prompt_is_one_clear_error():
    with pytest.raises(ValueError, match="at least one token"):
        sample(shifted_model("e2d2"), torch.zeros(1, 0, dtype=torch.long), SamplerConfig())


def test_sliding_window_past_seq_length():
    """Dropping the oldest cached block keeps the window's last-cached-column rule: mixed
    lengths still equal each prompt alone, with no mask left (seq_length is 64)."""
    model = shifted_model("bd3lm")
    lists = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [4]]
    cfg = SamplerConfig(strategy="topk", steps=2, max_new_tokens=90, sliding_window=True)
    got = sample_prompts(model, lists, cfg, seeds=[1, 2])
    assert [len(c) for c in got] == [90] * 2 and not any(MASK in c for c in got)
    for p, seed, completion in zip(lists, [1, 2], got, strict=True):
        alone = sample(model, torch.tensor([p], dtype=torch.long), cfg, seeds=[seed])
        assert completion == alone.completion(0)
