"""Block-diffusion sampler: cache equivalence, prompts as in training, mixed-length batches,
per-row streams and output reuse, EOS and stop strings, strategy properties."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import e2d2.sampling as sampling
import e2d2.sampling.denoise
from e2d2.config import ModelConfig
from e2d2.errors import ConfigError
from e2d2.model import BlockForward, DiffusionLM
from e2d2.sampling import (
    STRATEGIES,
    Distribution,
    SamplerConfig,
    StepTimes,
    denoise_step,
    sample,
    sample_prompts,
)
from e2d2.sampling.distributions import nucleus

V, MASK, S = 12, 11, 4  # small vocabulary, so a random model hits any given token often
EOS = 3
BLOCK_VARIANTS = ("e2d2", "e2d2_shared_kv", "e2d2_shared_kv_tied", "bd3lm")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models are tiny: a second intra-op thread only adds sync overhead, and under
    pytest-xdist it oversubscribes the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def tiny_model(name: str) -> DiffusionLM:
    """A random float64 model: float64 makes cached and full forwards agree to ~1e-15."""
    variant = name.removesuffix("_tied")
    n_dec = 1 if variant.startswith("e2d2") else 0
    if variant == "ar":
        n_dec = 0
    cfg = ModelConfig(variant=variant, vocab_size=V, mask_token_id=MASK, hidden_size=32,
                      ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2, num_layers=2,
                      num_decoder_layers=n_dec, seq_length=64, block_size=S,
                      tie_decoder_to_encoder=name.endswith("_tied"))
    torch.manual_seed(0)
    model = DiffusionLM(cfg).double()
    # Larger weights than the 0.02 init give peaked, prompt-dependent predictions, so
    # confidence orderings and greedy choices are not decided by rounding noise.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(25.0)
    return model


def prompts(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, MASK, (batch, length), generator=g)


def run(model, prompt, seed=1, decode=None, **kw) -> sampling.SampleOutput:
    return sample(model, prompt, SamplerConfig(**kw), torch.Generator().manual_seed(seed), decode=decode)


def record(monkeypatch, obj, name: str) -> list:
    """Replace ``obj.name`` by a wrapper that records its positional arguments."""
    calls, fn = [], getattr(obj, name)

    def wrapped(*args, **kwargs):
        calls.append(args)
        return fn(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapped)
    return calls



# ------------------------------------------------------------ cache equivalence
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "stochastic"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("variant", BLOCK_VARIANTS)
def test_cached_equals_uncached(variant, strategy, batch, temperature):
    model, prompt = tiny_model(variant), prompts(batch, 5)  # 5 = one whole block + a tail
    kw = dict(strategy=strategy, steps=3, temperature=temperature, max_new_tokens=14,
              eos_token_id=EOS)
    cached = run(model, prompt, use_cache=True, **kw)
    full = run(model, prompt, use_cache=False, **kw)
    assert torch.equal(cached.tokens, full.tokens)
    assert torch.equal(cached.lengths, full.lengths)
    assert cached.nfe_per_block == full.nfe_per_block
    assert not (cached.tokens == MASK).any()
    assert torch.equal(cached.tokens[:, :5], prompt)


@pytest.mark.parametrize("prompt_len", [0, 2, 4, 9])
def test_cached_equals_uncached_any_prompt_length(prompt_len):
    model, prompt = tiny_model("e2d2"), prompts(2, prompt_len)
    kw = dict(strategy="ancestral", steps=4, max_new_tokens=7)
    cached = run(model, prompt, use_cache=True, **kw)
    full = run(model, prompt, use_cache=False, **kw)
    assert torch.equal(cached.tokens, full.tokens)
    assert cached.tokens.shape == (2, prompt_len + 7)
    assert torch.equal(cached.tokens[:, :prompt_len], prompt)
    # the prompt tail shares the first block, so the blocks cover tail + budget exactly
    assert cached.num_blocks == -(-(prompt_len % S + 7) // S)


UPDATES = ("in_place", "load_state_dict", "assign", "new_submodule")


@pytest.mark.parametrize("update", UPDATES)
def test_inference_path_follows_weight_updates(update):
    """The cached sampler's fused weights (`TransformerLayer.fused_weights`) are rebuilt when a
    parameter changes in place (an optimizer step, ``load_state_dict``), a parameter is
    replaced (``load_state_dict(assign=True)``) or a submodule is: after the update, cached
    sampling still equals the uncached training forward, whose tokens change."""
    model, prompt = tiny_model("e2d2"), prompts(2, 5)
    kw = dict(strategy="topk", steps=4, max_new_tokens=8, temperature=0.0)
    old = run(model, prompt, **kw)  # builds and caches the fused weights
    torch.manual_seed(UPDATES.index(update))  # new weights for each case (the model is shared)
    with torch.no_grad():
        if update == "in_place":
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        elif update == "new_submodule":
            for layer in (*model.layers, *model.decoder_layers):
                layer.mlp.up_proj = torch.nn.Linear(32, 64, bias=False).double()
                layer.mlp.up_proj.weight.normal_(0, 5.0)
        else:
            other = DiffusionLM(model.cfg).double()
            for p in other.parameters():
                p.normal_(0, 1.0)
            model.load_state_dict(other.state_dict(), assign=update == "assign")
    cached, full = run(model, prompt, **kw), run(model, prompt, use_cache=False, **kw)
    assert torch.equal(cached.tokens, full.tokens)
    assert not torch.equal(cached.tokens, old.tokens)


def test_cache_is_really_used(monkeypatch):
    """The cached path must run the decoder on the block only and encode each block once."""
    model = tiny_model("e2d2")
    denoised = record(monkeypatch, BlockForward, "__call__")  # a step's forward: (plan, xt)
    encoded = record(monkeypatch, model, "encode")
    out = run(model, prompts(2, 5), strategy="topk", steps=4, max_new_tokens=11)
    assert len(denoised) == out.nfe and all(args[1].shape == (2, S) for args in denoised)
    # the prompt once (its whole block reads the tail too: E2D2 reads prompts bidirectionally),
    # then every generated block except the last
    assert [args[0].shape[1] for args in encoded] == [5] + [S] * (out.num_blocks - 1)


# ------------------------------------------------------------ EOS and batching
def finish_block(out, prompt_len) -> list[float]:
    """Index of the generated block in which each row finished (inf if it never did)."""
    n_ctx = prompt_len - prompt_len % S
    rows = zip(out.lengths.tolist(), out.finished.tolist(), strict=True)
    return [(n - 1 - n_ctx) // S if f else float("inf") for n, f in rows]


def test_eos_stops_rows_and_drops_them(monkeypatch):
    model, prompt = tiny_model("bd3lm"), prompts(4, 4, seed=3)
    calls = record(monkeypatch, model, "denoise")
    # a high temperature makes every token, EOS included, likely at every position
    out = run(model, prompt, seed=6, strategy="ancestral", steps=4, temperature=10.0,
              max_new_tokens=48, eos_token_id=EOS)
    done = finish_block(out, 4)
    assert out.finished.all() and len(set(done)) > 1, "seed gives no staggered stop; pick another"
    assert out.num_blocks == max(done) + 1 < 48 // S  # stopped before the budget
    total = 4 + 48
    for row in range(4):
        n = int(out.lengths[row])
        assert out.tokens[row, n - 1] == EOS
        assert not (out.tokens[row, 4:n - 1] == EOS).any()
        assert (out.tokens[row, n:] == EOS).all() and n < total
    # the working batch in block b holds exactly the rows that had not finished before b
    for args in calls:
        xt, cache = args[:2]
        b = (cache.length - 4) // S
        assert cache.offset.shape[0] == sum(d >= b for d in done)  # the cache's rows
        assert xt.shape[0] <= cache.offset.shape[0]  # a step runs the rows that changed


def test_eos_does_not_change_the_finished_prefix():
    """Greedy top-k uses no randomness: stopping at EOS must not alter anything before it."""
    model, prompt = tiny_model("e2d2"), prompts(4, 6, seed=1)
    kw = dict(strategy="topk", steps=4, temperature=0.0, max_new_tokens=20)
    free = run(model, prompt, **kw)
    eos = int(free.tokens[0, 6 + S])  # row 0 finishes in its second generated block at the latest
    out = run(model, prompt, eos_token_id=eos, **kw)
    assert len(set(out.lengths.tolist())) > 1, "rows should stop at different blocks"
    for row in range(4):
        gen = free.tokens[row, 6:]
        hits = (gen == eos).nonzero()
        n = 6 + int(hits[0]) + 1 if len(hits) else 26
        assert int(out.lengths[row]) == n
        assert torch.equal(out.tokens[row, :n], free.tokens[row, :n])
        assert bool(out.finished[row]) == bool(len(hits))


# ------------------------------------------------------------ output reuse and NFE
@pytest.mark.parametrize("use_cache", [True, False])
def test_unchanged_block_reuses_model_output(monkeypatch, use_cache):
    model = tiny_model("e2d2_shared_kv")
    forwards = record(monkeypatch, BlockForward, "__call__") if use_cache else record(monkeypatch, model, "forward")
    states = record(monkeypatch, e2d2.sampling.denoise, "denoise_step")
    steps = 64  # with 4 tokens per block, most steps reveal nothing
    out = run(model, prompts(1, 4), strategy="ancestral", steps=steps, max_new_tokens=12,
              use_cache=use_cache)
    assert len(forwards) == out.nfe == int(out.row_nfe.sum())
    assert all(0 < n < steps for n in out.nfe_per_block)
    # per block, NFE equals the number of distinct states the sampler stepped from
    blocks: list[set] = []
    for args in states:
        xt, times = args[1], args[3]
        if times.alpha_t == times.alpha_start:  # the first step of a block
            blocks.append(set())
        blocks[-1].add(tuple(xt.flatten().tolist()))
    assert [len(b) for b in blocks] == out.nfe_per_block
    assert len(states) > out.nfe


@pytest.mark.parametrize("variant", ["e2d2", "bd3lm", "mdlm"])
def test_nfe_per_row_does_not_grow_with_the_batch(monkeypatch, variant):
    """Only the rows whose block changed are forwarded: with per-row seeds, every row of a
    batch of 16 spends exactly the forwards it spends alone (and gets the same tokens)."""
    model = tiny_model(variant)
    prompt, seeds = prompts(16, 6), list(range(100, 116))
    kw = dict(strategy="ancestral", steps=16, max_new_tokens=12)
    if variant == "mdlm":
        inputs = record(monkeypatch, model, "forward")  # args: (x0, xt)
    else:
        inputs = record(monkeypatch, BlockForward, "__call__")  # a cached step, args: (plan, xt)
    batch = sample(model, prompt, SamplerConfig(**kw), seeds=seeds)
    forwarded = sum(args[1].shape[0] for args in inputs)
    assert forwarded == int(batch.row_nfe.sum())  # rows the denoiser really ran
    for r in range(16):
        alone = sample(model, prompt[r:r + 1], SamplerConfig(**kw), seeds=[seeds[r]])
        assert torch.equal(batch.row_nfe[r], alone.row_nfe[0])
        assert torch.equal(batch.tokens[r], alone.tokens[0])
    per_row = batch.row_nfe.sum(1).float().mean()
    assert batch.nfe > per_row  # the batch calls more often than any one row needs ...
    assert forwarded < 16 * batch.nfe  # ... but does not recompute every row each time


# ------------------------------------------------------------ strategies, end to end
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("variant", BLOCK_VARIANTS + ("mdlm",))
def test_blocks_end_unmasked_and_prompt_kept(variant, strategy):
    model, prompt = tiny_model(variant), prompts(3, 6)
    out = run(model, prompt, strategy=strategy, steps=2, max_new_tokens=9)
    assert out.tokens.shape == (3, 15)
    assert not (out.tokens == MASK).any()
    assert torch.equal(out.tokens[:, :6], prompt)


def test_mdlm_is_one_block_with_full_forwards():
    model, prompt = tiny_model("mdlm"), prompts(2, 5)
    out = run(model, prompt, strategy="first_hitting", max_new_tokens=7)
    assert out.nfe_per_block == [7]  # one forward per masked token, one block
    cached = run(model, prompt, strategy="first_hitting", max_new_tokens=7, use_cache=False)
    assert torch.equal(out.tokens, cached.tokens)


def test_first_hitting_reveals_one_token_per_forward():
    # prompt tail of 2 tokens: the first block has 2 masks, the next ones S
    out = run(tiny_model("e2d2"), prompts(2, 6), strategy="first_hitting", steps=1,
              max_new_tokens=10)
    assert out.nfe_per_block == [2, S, S]


@pytest.mark.parametrize("threshold, nfe_per_block", [(0.999, S), (0.0, 1)])
def test_threshold_reveals_at_least_one_per_step(threshold, nfe_per_block):
    """Nothing clears 0.999, so exactly one token per step (NFE = S, not 1 stall + forced
    reveal); everything clears 0, so one forward per block."""
    # a high temperature flattens p, so no token comes near 0.999
    out = run(tiny_model("bd3lm"), prompts(2, 4), strategy="threshold", threshold=threshold,
              steps=3 * S, temperature=50.0, max_new_tokens=12)
    assert out.nfe_per_block == [nfe_per_block] * 3


# ------------------------------------------------------------ strategies, one step
# StepTimes are alpha values; under the linear schedule alpha(t) = 1 - t, so alpha_start = 0.
FULL_STEP = StepTimes(alpha_t=0.0, alpha_s=1.0, alpha_start=0.0, last=False)


def _step(strategy, xt, probs, times=FULL_STEP, threshold=0.9, seed=0, greedy=True, n_start=None):
    n_masked = (xt == MASK).sum(-1).tolist()
    n_reveal = sampling.reveal_counts(strategy, times, n_masked if n_start is None else n_start, n_masked)
    if greedy:
        dist = Distribution(probs, argmax=probs.argmax(-1), top2=probs.topk(2, dim=-1))
    else:
        dist = Distribution(probs, cdf=probs.double().cumsum(-1), top2=probs.topk(2, dim=-1))
    g = torch.Generator().manual_seed(seed)
    return denoise_step(strategy, xt, dist, times, n_reveal, MASK, threshold,
                        lambda: torch.rand(xt.shape, generator=g, dtype=torch.float64))


def _probs(rows: list[list[list[float]]]) -> torch.Tensor:
    """Distributions over the first few tokens, zero elsewhere: ``[batch, S, V]``."""
    p = torch.zeros(len(rows), len(rows[0]), V)
    dist = torch.tensor(rows)
    p[..., : dist.shape[-1]] = dist
    return p


def test_threshold_step():
    xt = torch.full((1, 3), MASK)
    low = _probs([[[0.5, 0.3, 0.2], [0.6, 0.2, 0.2], [0.4, 0.3, 0.3]]])
    assert (_step("threshold", xt, low) != MASK).tolist() == [[False, True, False]]
    high = _probs([[[0.95, 0.05, 0.0], [0.6, 0.2, 0.2], [0.0, 0.92, 0.08]]])
    assert _step("threshold", xt, high).tolist() == [[0, MASK, 1]]


def test_topk_and_margin_order_differently():
    # position 0: p1 = .50, p2 = .45 (margin .05); position 1: p1 = .40, p2 = .10 (margin .30)
    xt = torch.full((1, 2), MASK)
    probs = _probs([[[0.50, 0.45, 0.05, 0.0, 0.0, 0.0], [0.4, 0.1, 0.1, 0.1, 0.1, 0.2]]])
    half = StepTimes(0.0, 0.5, 0.0, False)  # half the tokens stay masked
    assert _step("topk", xt, probs, half).tolist() == [[0, MASK]]
    assert _step("topk_margin", xt, probs, half).tolist() == [[MASK, 0]]


def test_topk_follows_the_schedule():
    xt = torch.full((2, 8), MASK)
    logits = torch.randn(2, 8, V, generator=torch.Generator().manual_seed(0))
    probs = torch.softmax(logits.index_fill(-1, torch.tensor([MASK]), -torch.inf), -1)  # [MASK] excluded
    n_start = [8, 8]
    for j, tm in enumerate(sampling.step_times("linear", 4)):
        xt = _step("topk", xt, probs, tm, n_start=n_start)
        assert (xt == MASK).sum(-1).tolist() == [8 - 2 * (j + 1)] * 2


def test_first_hitting_step_is_one_uniform_masked_token():
    xt = torch.tensor([[MASK, 5, MASK, MASK]])
    probs = _probs([[[0.0, 1.0]] * 4])
    counts = torch.zeros(4)
    for seed in range(600):
        xs = _step("first_hitting", xt, probs, None, seed=seed)
        assert (xs != xt).sum() == 1 and xs[0, 1] == 5
        counts += (xs != xt)[0]
    assert counts[1] == 0 and (counts[[0, 2, 3]] - 200).abs().max() < 60  # ~4 sigma


def test_ancestral_step_unmask_rate_and_values():
    n = 4000
    xt = torch.full((1, n), MASK)
    probs = _probs([[[0.2, 0.8]] * n])
    times = StepTimes(0.5, 0.75, 0.0, False)  # unmask probability (0.75 - 0.5) / (1 - 0.5)
    xs = _step("ancestral", xt, probs, times, greedy=False)
    revealed = xs != MASK
    assert abs(revealed.float().mean() - 0.5) < 4 * (0.25 / n) ** 0.5
    assert abs((xs[revealed] == 1).float().mean() - 0.8) < 4 * (0.16 / revealed.sum()) ** 0.5
    assert set(xs[revealed].tolist()) <= {0, 1}  # zero-probability tokens are never drawn


@pytest.mark.parametrize("strategy", ["ancestral", "topk", "topk_margin", "threshold"])
def test_last_step_reveals_everything_and_keeps_revealed(strategy):
    xt = torch.tensor([[MASK, 7, MASK, MASK]])
    probs = _probs([[[0.3, 0.3, 0.4]] * 4])
    last = StepTimes(0.1, 0.1, 0.0, True)  # no schedule progress: only `last` can reveal
    xs = _step(strategy, xt, probs, last, threshold=0.99)
    assert xs.tolist() == [[2, 7, 2, 2]]


# ------------------------------------------------------------ prompts as in training
@pytest.mark.parametrize("variant", BLOCK_VARIANTS + ("bd3lm_bidirectional",))
def test_first_block_logits_equal_the_training_forward_with_the_prompt_as_context(monkeypatch, variant):
    """The sampler encodes a prompt with the training mask: the logits of its first block equal
    the training forward with that context mask, for every prompt length (mid-block too)."""
    if variant == "bd3lm_bidirectional":
        base = tiny_model("bd3lm")
        model = DiffusionLM(base.cfg.replace(bidirectional_prompt=True)).double()
        model.load_state_dict(base.state_dict())
    else:
        model = tiny_model(variant)
    blocks = record(monkeypatch, model, "block_forward")  # args: (cache, positions, mask)
    steps = record(monkeypatch, BlockForward, "__call__")  # args: (plan, xt)
    for P in range(0, 3 * S + 1):
        blocks.clear()
        steps.clear()
        prompt = prompts(2, P, seed=P)
        sample(model, prompt, SamplerConfig(strategy="topk", steps=2, max_new_tokens=1), seeds=[0, 1])
        (cache, positions, _), xt = blocks[0], steps[0][1]
        logits = model.denoise(xt, cache, positions)
        lo = P - P % S
        x0 = torch.cat((prompt, torch.zeros(2, S - P % S, dtype=torch.long)), 1)
        noisy = torch.cat((prompt, xt[:, P % S:]), 1)
        context = torch.arange(lo + S)[None, :].expand(2, -1) < P
        expected = model(x0, noisy, context_mask=context)[:, lo:]
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-10, msg=f"prompt length {P}")


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "seeded"])
@pytest.mark.parametrize("variant", BLOCK_VARIANTS + ("mdlm", "ar"))
def test_mixed_length_prompts_equal_each_prompt_alone(variant, temperature):
    """One batched run for prompts of every length (empty, mid-block, whole blocks): each row's
    tokens equal those of its prompt sampled alone with its seed."""
    model = tiny_model(variant)
    lists = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10], [2, 2, 2, 2], [7] * 9, [8, 1, 5, 5, 0, 2, 4, 6]]
    if variant != "ar":
        lists.append([])
    seeds = list(range(10, 10 + len(lists)))
    for use_cache in (True, False):
        cfg = SamplerConfig(strategy="ancestral", steps=3, temperature=temperature, max_new_tokens=10,
                            eos_token_id=EOS, use_cache=use_cache)
        got = sample_prompts(model, lists, cfg, seeds=seeds)
        for p, seed, completion in zip(lists, seeds, got, strict=True):
            alone = sample(model, torch.tensor([p], dtype=torch.long).view(1, len(p)), cfg, seeds=[seed])
            assert completion == alone.completion(0), (p, use_cache)


@functools.cache
def tiny_model_float32(name: str) -> DiffusionLM:
    return copy.deepcopy(tiny_model(name)).float()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("variant", ["e2d2", "bd3lm", "mdlm"])
def test_an_empty_prompt_in_a_mixed_batch_equals_it_alone(variant, strategy, dtype):
    """After an empty prompt every position of the first block is [MASK] and gets the same
    logits up to float noise, which differs between a padded batch row and the row alone:
    confidence ties must be broken the same way in both (by position)."""
    model = tiny_model(variant) if dtype == "float64" else tiny_model_float32(variant)
    lists = [[1, 2, 3], [], [5, 6, 7, 8, 9, 10], [4]]
    for temperature in (0.0, 1.0):
        cfg = SamplerConfig(strategy=strategy, steps=3, temperature=temperature, max_new_tokens=10)
        got = sample_prompts(model, lists, cfg, seeds=[1, 2, 3, 4])
        alone = sample(model, torch.zeros(1, 0, dtype=torch.long), cfg, seeds=[2])
        assert got[1] == alone.completion(0), temperature


@pytest.mark.parametrize("strategy", ["topk", "topk_margin", "threshold"])
def test_confidence_ties_go_to_the_leftmost_position(strategy):
    """Equal distributions at every position, perturbed by noise far below any real lead
    (the rightmost slightly ahead): the step reveals the leftmost positions."""
    xt = torch.full((2, 6), MASK)
    probs = _probs([[[0.5, 0.3, 0.2]] * 6] * 2)
    noise = torch.tensor([[0, 1, 2, 3, 4, 5], [5, 0, 4, 1, 3, 2]]) * 1e-8
    probs[..., 0] += noise
    half = StepTimes(0.0, 0.5, 0.0, False)  # top-k reveals 3 of 6; threshold 0.9 reveals 1
    revealed = (_step(strategy, xt, probs, half) != MASK).tolist()
    expected = [True] * 3 + [False] * 3 if strategy != "threshold" else [True] + [False] * 5
    assert revealed == [expected, expected]
    # a real lead still wins: the most confident position is the last one
    probs[:, -1, 0] += 0.01
    revealed = (_step(strategy, xt, probs, half) != MASK).tolist()
    expected = [True] * 2 + [False] * 3 + [True] if strategy != "threshold" else [False] * 5 + [True]
    assert revealed == [expected, expected]


# ------------------------------------------------------------ API and validation
@pytest.mark.parametrize("bad", [
    dict(strategy="beam"), dict(steps=0), dict(schedule="square"), dict(temperature=-1.0),
    dict(threshold=1.0), dict(max_new_tokens=0), dict(eos_token_id=-2), dict(top_p=0.0),
    dict(top_p=1.5), dict(min_t=1.0), dict(block_size=0), dict(stop_strings="END"),
    dict(stop_strings=[""]), dict(sliding_window=True, use_cache=False),
])
def test_config_is_validated(bad):
    with pytest.raises(ConfigError):
        SamplerConfig(**bad)


def test_bad_inputs_raise():
    model = tiny_model("e2d2")
    with pytest.raises(ConfigError, match="eos_token_id"):
        sample(model, prompts(1, 3), SamplerConfig(eos_token_id=MASK))
    with pytest.raises(ValueError, match="mask token"):
        sample(model, torch.full((1, 3), MASK), SamplerConfig())
    with pytest.raises(ValueError, match="at least one token"):
        sample(tiny_model("ar"), prompts(1, 0), SamplerConfig())
    with pytest.raises(ConfigError, match="decode"):
        sample(model, prompts(1, 3), SamplerConfig(stop_strings=("ab",), max_new_tokens=4))
    with pytest.raises(ConfigError, match="no blocks"):
        sample(tiny_model("mdlm"), prompts(1, 3), SamplerConfig(block_size=2))
    with pytest.raises(ValueError, match="seeds has 1 entries for 2"):
        sample(model, prompts(2, 3), SamplerConfig(max_new_tokens=4), seeds=[1])


def test_prompt_ids_outside_the_vocabulary_are_one_clear_error():
    torch.manual_seed(0)
    cfg = ModelConfig(variant="e2d2", vocab_size=20, mask_token_id=19, hidden_size=16,
                      ffn_hidden_size=32, num_attention_heads=2, num_query_groups=1,
                      num_layers=1, num_decoder_layers=1, seq_length=16, block_size=4)
    model = DiffusionLM(cfg)
    with pytest.raises(ValueError, match=r"prompt ids must lie in \[0, 20\)"):
        sample(model, torch.tensor([[3, 25]]), SamplerConfig(max_new_tokens=4))
    with pytest.warns(UserWarning, match="never seen in training"):
        sample(model, torch.tensor([[3, 4]]), SamplerConfig(max_new_tokens=20))


# ------------------------------------------------------------ KV cache memory
def test_cache_is_preallocated_once(monkeypatch):
    model = tiny_model("e2d2")
    calls = record(monkeypatch, model, "block_forward")  # once per block: (cache, positions, mask)
    run(model, prompts(2, 5), strategy="ancestral", steps=4, max_new_tokens=20)
    pointers = {args[0].layers[0][0].data_ptr() for args in calls} | {args[0].decoder[0][1].data_ptr()
                                                                       for args in calls}
    assert len(pointers) == 2  # the same two buffers from the first step to the last


def _step_allocations(model, cache, rows=None) -> int:
    """Bytes allocated by one denoising step after ``cache``, as the profiler sees them."""
    from torch.profiler import ProfilerActivity, profile

    xt = torch.full((2, S), MASK)
    positions = cache.length + torch.arange(S).expand(2, S)
    with torch.no_grad():
        model.denoise(xt, cache, positions, rows=rows)  # grows the RoPE table once, outside the count
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model.denoise(xt, cache, positions, rows=rows)
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)


@pytest.mark.parametrize("variant", ["e2d2", "e2d2_shared_kv", "bd3lm"])
def test_memory_of_a_denoising_step_stays_flat_as_the_prefix_grows(variant):
    """A step attends views of the preallocated cache: it copies no prefix, so what it
    allocates does not grow with the number of cached tokens (a torch.cat prefix would add
    the prefix's K/V of every layer, here 16x the margin allowed). float32: the fused CPU
    attention kernel, which reads K/V in place (float64 falls back to the math kernel, whose
    score matrix grows with the prefix by construction)."""
    cfg = tiny_model(variant).cfg
    torch.manual_seed(0)
    model = DiffusionLM(cfg)
    cache = model.new_cache(2, 1024)
    with torch.no_grad():
        model.encode(prompts(2, 8), cache, torch.arange(8).expand(2, 8))
        short = _step_allocations(model, cache)
        added = 960
        tokens = torch.randint(0, MASK, (2, added))
        model.encode(tokens, cache, (8 + torch.arange(added)).expand(2, added))
        long = _step_allocations(model, cache)
        # control: selecting rows copies their prefix (what a torch.cat cache does every step)
        copying = _step_allocations(model, cache, rows=torch.arange(2))
    prefix_kv_one_layer = 2 * 2 * cfg.num_query_groups * (8 + added) * cfg.kv_channels * 4  # K and V, float32
    assert long - short < prefix_kv_one_layer / 8, (short, long, prefix_kv_one_layer)
    assert copying - long > prefix_kv_one_layer, (copying, long)


# ------------------------------------------------------------ filtering, stopping, options
def test_tiny_top_p_samples_the_argmax():
    """top_p keeps the smallest set reaching p: with p -> 0 only the most likely token is left,
    so seeded sampling gives the greedy tokens."""
    model, prompt = tiny_model("e2d2"), prompts(3, 5)
    kw = dict(strategy="topk", steps=2, max_new_tokens=8)
    greedy = run(model, prompt, temperature=0.0, **kw)
    nucleus = run(model, prompt, temperature=1.0, top_p=1e-9, **kw)
    free = run(model, prompt, temperature=1.0, **kw)
    assert torch.equal(nucleus.tokens, greedy.tokens)
    assert not torch.equal(free.tokens, greedy.tokens)


def test_nucleus_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[[0.5, 0.3, 0.15, 0.05]]])
    kept = nucleus(probs, 0.75)  # 0.5 + 0.3 reaches it; 0.5 alone does not
    torch.testing.assert_close(kept, torch.tensor([[[0.625, 0.375, 0.0, 0.0]]]))
    torch.testing.assert_close(nucleus(probs, 1.0), probs)


def test_min_t_ends_the_time_grid():
    grid = sampling.step_times("linear", 4, min_t=0.2)
    assert grid[0].alpha_t == pytest.approx(0.0) and grid[-1].alpha_s == pytest.approx(0.8)
    assert [g.last for g in grid] == [False, False, False, True]
    # top-k keeps (1 - alpha_s) of the masks at each step: min_t changes how many per step
    model, prompt = tiny_model("bd3lm"), prompts(2, 4)
    base = run(model, prompt, strategy="topk", steps=4, temperature=0.0, max_new_tokens=8)
    late = run(model, prompt, strategy="topk", steps=4, temperature=0.0, max_new_tokens=8, min_t=0.5)
    assert not (late.tokens == MASK).any()
    assert base.nfe_per_block == [4, 4] and late.nfe_per_block == [3, 3]


def _letters(ids: list[int]) -> str:
    return "".join("abcdefghijkl"[i] for i in ids)


@pytest.mark.parametrize("variant", ["e2d2", "mdlm", "ar"])
def test_stop_strings_end_a_row_at_the_token_that_completes_them(variant):
    model, prompt = tiny_model(variant), prompts(4, 6, seed=2)
    kw = dict(strategy="topk", steps=4, temperature=0.0, max_new_tokens=16)
    free = run(model, prompt, **kw)
    text = [_letters(free.tokens[r, 6:].tolist()) for r in range(4)]
    stop = text[0][5:7]  # a string row 0 generates, two tokens long
    out = run(model, prompt, stop_strings=(stop,), decode=_letters, **kw)
    for r in range(4):
        n = text[r].find(stop)
        expected = 6 + (n + len(stop) if n >= 0 else 16)
        assert int(out.lengths[r]) == expected and bool(out.finished[r]) == (n >= 0)
        assert torch.equal(out.tokens[r, :expected], free.tokens[r, :expected])
        assert (out.tokens[r, expected:] == MASK).all()  # no EOS id: the mask token fills


@pytest.mark.parametrize("variant", ["e2d2", "e2d2_shared_kv", "bd3lm"])
@pytest.mark.parametrize("block_size", [2, 8])
def test_inference_block_size(variant, block_size):
    """Blocks of another size than the trained one: cached equals the uncached forward with
    that block size's masks, and the blocks tile the budget."""
    model, prompt = tiny_model(variant), prompts(2, 5)
    kw = dict(strategy="ancestral", steps=3, max_new_tokens=11, block_size=block_size)
    cached = run(model, prompt, use_cache=True, **kw)
    full = run(model, prompt, use_cache=False, **kw)
    assert torch.equal(cached.tokens, full.tokens)
    assert cached.num_blocks == -(-(5 % block_size + 11) // block_size)
    assert not (cached.tokens == MASK).any()


# ------------------------------------------------------------ past seq_length
def test_sliding_window_changes_nothing_while_the_sequence_fits():
    model, prompt = tiny_model("e2d2"), prompts(2, 6)
    kw = dict(strategy="ancestral", steps=3, max_new_tokens=40)
    assert torch.equal(run(model, prompt, sliding_window=True, **kw).tokens, run(model, prompt, **kw).tokens)


@pytest.mark.parametrize("variant", ["e2d2", "e2d2_shared_kv", "bd3lm"])
def test_sliding_window_generates_past_seq_length_inside_the_trained_positions(monkeypatch, variant):
    model = tiny_model(variant)  # seq_length 64
    positions = record(monkeypatch, model, "_rope")
    lists = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [4], []]
    cfg = SamplerConfig(strategy="topk", steps=2, max_new_tokens=150, sliding_window=True)
    got = sample_prompts(model, lists, cfg, seeds=[1, 2, 3])
    assert [len(c) for c in got] == [150] * 3 and not any(MASK in c for c in got)
    assert max(int(args[0].max()) for args in positions) < model.cfg.seq_length
    for p, seed, completion in zip(lists, [1, 2, 3], got, strict=True):  # mixed lengths still exact
        alone = sample(model, torch.tensor([p], dtype=torch.long).view(1, len(p)), cfg, seeds=[seed])
        assert completion == alone.completion(0)


def test_dropping_a_block_rebases_positions_without_changing_attention():
    """RoPE scores depend on position differences only: after the oldest block is dropped and
    the keys rotated back, a block at rebased positions gets the logits it gets at its
    original positions with the oldest block masked out."""
    model = tiny_model("e2d2")
    cache = model.new_cache(2, 64)
    tokens = prompts(2, 24, seed=4)
    with torch.no_grad():
        model.encode(tokens, cache, torch.arange(24).expand(2, 24))
        xt = torch.full((2, S), MASK)
        hidden = torch.arange(24 + S) >= S  # the oldest block is out of the window
        expected = model.denoise(xt, cache, (24 + torch.arange(S)).expand(2, S),
                                 hidden.expand(2, S, -1).clone())
        cache.drop_oldest(S, model.cfg.kv_channels, model.cfg.rope_theta)
        got = model.denoise(xt, cache, (20 + torch.arange(S)).expand(2, S))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)  # float32 RoPE tables
