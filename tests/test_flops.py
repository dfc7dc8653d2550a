"""Analytic FLOPs (`e2d2.flops`) against a profiler count, the masks, and the paper's claims.

The profiler is ``torch.utils.flop_counter.FlopCounterMode``. On CPU, SDPA dispatches to
``aten._scaled_dot_product_flash_attention_for_cpu`` (and its backward), which torch's
counter has no formula for: it would count attention as 0. So attention is counted two
ways, and both must agree with the analytic dense count:

* ``math``: SDPA's math backend decomposes attention into the ``bmm`` ops the counter sees
  (GQA K/V expanded to every query head, every masked pair computed);
* ``fused``: the kernel the model really runs on CPU, with torch's own SDPA formulas mapped
  onto the CPU ops.

The analytic count covers exactly the matmuls the profiler sees, so the agreement is tight
(``REL``), far tighter than the 5% the issue asks for: at 5% a missing term such as the E2D2
decoder's K/V projection of ``h_enc`` (about 2% here) would go unnoticed.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from e2d2 import flops, masks
from e2d2.config import ModelConfig
from e2d2.model import DiffusionLM
from e2d2.sampling import SamplerConfig, sample

REL = 1e-6
aten = torch.ops.aten
CPU_SDPA_FORMULAS = {  # FlopCounterMode passes shapes: (q, k, v, ...) and (grad_out, q, k, v, ...)
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, **kwargs: flop_counter.sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, **kwargs: flop_counter.sdpa_backward_flop_count(grad, q, k, v),
}
VARIANTS = ["e2d2", "e2d2_shared_kv", "e2d2_tied", "bd3lm", "mdlm", "ar"]


def small_config(name: str, seq_length: int = 64) -> ModelConfig:
    """A small model with realistic ratios: GQA, ffn = 3 x hidden, vocab >> head_dim."""
    base = dict(hidden_size=128, ffn_hidden_size=384, num_attention_heads=4, num_query_groups=2,
                vocab_size=512, mask_token_id=511, seq_length=seq_length, block_size=4)
    if name == "e2d2_tied":
        return ModelConfig(variant="e2d2_shared_kv", num_layers=3, num_decoder_layers=2,
                           tie_decoder_to_encoder=True, **base)
    if name.startswith("e2d2"):
        return ModelConfig(variant=name, num_layers=3, num_decoder_layers=2, **base)
    return ModelConfig(variant=name, num_layers=5, num_decoder_layers=0, **base)


@contextlib.contextmanager
def profiler(backend: str):
    """A FlopCounterMode that sees attention under ``backend`` ("math" or "fused")."""
    if backend == "math":
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            yield counter
    else:
        with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FORMULAS) as counter:
            yield counter


def batch_of(cfg: ModelConfig, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean tokens ``x0 [batch, L]`` and a noisy copy ``xt`` with every third token masked."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, cfg.mask_token_id, (batch, cfg.seq_length), generator=g)
    xt = x0.clone()
    xt[:, ::3] = cfg.mask_token_id
    return x0, xt


@pytest.mark.parametrize("backend", ["math", "fused"])
@pytest.mark.parametrize("name", VARIANTS)
def test_forward_flops_match_profiler(name: str, backend: str):
    cfg = small_config(name)
    model = DiffusionLM(cfg)
    x0, xt = batch_of(cfg)
    with torch.no_grad(), profiler(backend) as counter:
        model(x0, xt)
    analytic = flops.forward_flops_per_token(cfg) * x0.numel()
    assert counter.get_total_flops() == pytest.approx(analytic.dense, rel=REL)


@pytest.mark.parametrize("name", VARIANTS)
def test_training_flops_match_profiler(name: str):
    """Forward + backward, attention decomposed: backward is exactly 2x the forward it reaches."""
    cfg = small_config(name)
    model = DiffusionLM(cfg)
    x0, xt = batch_of(cfg)
    with profiler("math") as counter:
        model(x0, xt).float().logsumexp(-1).mean().backward()
    analytic = flops.training_flops_per_token(cfg) * x0.numel()
    assert counter.get_total_flops() == pytest.approx(analytic.dense, rel=REL)


@pytest.mark.parametrize("name", ["e2d2", "bd3lm", "mdlm"])
def test_fused_attention_backward_recomputes_the_scores(name: str):
    """The fused CPU kernel (like FlashAttention) recomputes ``QK^T`` in its backward: one
    attention matmul more per layer than the model FLOPs (half the forward attention).
    Hardware work, not model work, so `e2d2.flops` leaves it out, as MFU conventions do."""
    cfg = small_config(name)
    model = DiffusionLM(cfg)
    x0, xt = batch_of(cfg)
    with profiler("fused") as counter:
        model(x0, xt).float().logsumexp(-1).mean().backward()
    training, forward = flops.training_flops_per_token(cfg), flops.forward_flops_per_token(cfg)
    expected = (training.dense + forward.attention_dense / 2) * x0.numel()
    assert counter.get_total_flops() == pytest.approx(expected, rel=REL)


def test_shared_kv_runs_only_the_top_encoder_layers_kv():
    """Nothing reads the shared-KV top encoder layer's output: training and the sampler's
    clean pass run only its K/V projections (no Q, attention, O or MLP), so training is
    exactly 3x the forward, which counts that layer's K/V only."""
    cfg = small_config("e2d2_shared_kv")
    model = DiffusionLM(cfg)
    top = model.layers[-1]
    calls = []
    for module in (top.attn.q_proj, top.attn.o_proj, top.mlp):
        module.register_forward_hook(lambda module, args, out: calls.append(module))
    x0, xt = batch_of(cfg)
    model(x0, xt).float().logsumexp(-1).mean().backward()
    assert calls == []
    assert top.attn.k_proj.weight.grad is not None
    training, forward = flops.training_flops_per_token(cfg), flops.forward_flops_per_token(cfg)
    assert training.dense == pytest.approx(3 * forward.dense)
    n, L = 8, cfg.seq_length  # the sampler's clean pass over n prompt tokens, all visible
    with torch.no_grad(), profiler("math") as counter:
        model.encode(x0[:, :n], model.new_cache(2, L), torch.arange(n).expand(2, n))
    expected = (flops._stack(cfg, cfg.num_layers - 1, n, n, n * n)
                + flops.FlopsCount(linear=n * flops._kv_per_token(cfg)))
    assert counter.get_total_flops() == pytest.approx(2 * expected.dense, rel=REL)


@pytest.mark.parametrize("name", ["e2d2", "e2d2_shared_kv", "bd3lm", "mdlm", "ar"])
@pytest.mark.parametrize("prompt_length", [0, 6])  # none; a whole block and a tail in block 1
def test_sampling_flops_match_profiler(name: str, prompt_length: int):
    """The analytic per-token count reproduces what the real sampler spends, given each row's NFE."""
    cfg = small_config(name)
    model = DiffusionLM(cfg)
    batch, new_tokens = 2, 8
    prompt_length = max(prompt_length, 1) if name == "ar" else prompt_length
    prompt = torch.randint(0, cfg.mask_token_id, (batch, prompt_length), generator=torch.Generator().manual_seed(1))
    sampler = SamplerConfig(strategy="topk", steps=2, temperature=0.0, max_new_tokens=new_tokens)
    with profiler("fused") as counter:
        out = sample(model, prompt, sampler)
    if name != "ar":
        assert max(out.nfe_per_block) > 1  # several forwards per block, or steps would go uncounted
    analytic = sum((flops.sampling_flops_per_token(cfg, prompt_length, new_tokens, out.row_nfe[r].tolist())
                    for r in range(batch)), flops.FlopsCount())
    assert counter.get_total_flops() == pytest.approx(analytic.dense * new_tokens, rel=REL)


def test_sampling_flops_of_a_run_stopped_at_eos():
    """A row that stops early has fewer blocks: its count covers the blocks it generated."""
    cfg = small_config("e2d2")
    model = DiffusionLM(cfg)
    prompt = torch.randint(0, cfg.mask_token_id, (1, 5), generator=torch.Generator().manual_seed(1))
    free = sample(model, prompt, SamplerConfig(strategy="topk", steps=2, temperature=0.0, max_new_tokens=16))
    eos = int(free.tokens[0, 5 + 4])  # a token of the second generated block
    sampler = SamplerConfig(strategy="topk", steps=2, temperature=0.0, max_new_tokens=16, eos_token_id=eos)
    with profiler("fused") as counter:
        out = sample(model, prompt, sampler)
    assert out.finished[0] and out.num_blocks < 5
    analytic = flops.sampling_flops_per_token(cfg, 5, 16, out.row_nfe[0].tolist())
    generated = 3 + 4 * (out.num_blocks - 1)  # the first block holds the prompt's tail
    assert counter.get_total_flops() == pytest.approx(analytic.dense * generated, rel=REL)


def test_sampling_rejects_a_wrong_number_of_blocks():
    with pytest.raises(ValueError, match="entries"):
        flops.sampling_flops_per_token(small_config("bd3lm"), 8, 16, [4] * 5)


# ------------------------------------------------------------------ masks
MASKS = [masks.E2D2_ENCODER, masks.E2D2_DECODER, masks.BD3LM, masks.MDLM, masks.AR]


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: m.name)
@pytest.mark.parametrize(("L", "S"), [(4, 4), (8, 1), (16, 4), (24, 8), (64, 4), (96, 16)])
def test_visible_pairs_match_dense_masks(mask: masks.AttentionMask, L: int, S: int):
    assert flops.visible_pairs(mask, L, S) == int(mask.dense(L, S).sum())


@pytest.mark.parametrize(("mask", "density"), [
    (masks.E2D2_ENCODER, 1 / 2),  # block-causal ~ half of full
    (masks.E2D2_DECODER, 1 / 4),  # L x 2L keys, of which ~ L/2 clean and S noisy are visible
    (masks.BD3LM, 1 / 4),         # 2L x 2L, three quarters ~ block-causal, one empty
    (masks.MDLM, 1.0),
    (masks.AR, 1 / 2),
])
def test_mask_densities_at_paper_length(mask: masks.AttentionMask, density: float):
    assert flops.mask_density(mask, 1024, 4) == pytest.approx(density, rel=0.01)


# ------------------------------------------------------------------ paper claims
def owt_config(variant: str, num_layers: int, num_decoder_layers: int = 0) -> ModelConfig:
    """The paper's OpenWebText scale: GPT-2 small width and vocabulary, L = 1024, S = 4."""
    return ModelConfig(variant=variant, num_layers=num_layers, num_decoder_layers=num_decoder_layers,
                       hidden_size=768, ffn_hidden_size=3072, num_attention_heads=12,
                       num_query_groups=12, vocab_size=50258, mask_token_id=50257,
                       seq_length=1024, block_size=4)


def without_head(count: flops.FlopsCount) -> float:
    return count.masked - count.lm_head


@pytest.mark.parametrize("num_decoder_layers", [1, 2, 4])
def test_e2d2_trains_at_half_the_cost_of_bd3lm_with_as_many_layers(num_decoder_layers: int):
    """E2D2 with N_enc + N_dec = N vs BD3-LM with N layers: the transformer layers cost half.

    Both run the LM head on the same L tokens, so with GPT-2's 50k vocabulary the whole-model
    ratio sits a little above half.
    """
    e2d2 = flops.training_flops_per_token(owt_config("e2d2", 12 - num_decoder_layers, num_decoder_layers))
    bd3lm = flops.training_flops_per_token(owt_config("bd3lm", 12))
    assert without_head(e2d2) / without_head(bd3lm) == pytest.approx(0.5, abs=0.04)
    assert 0.5 < e2d2.masked / bd3lm.masked < 0.62


@pytest.mark.parametrize("num_decoder_layers", [1, 2, 4])
def test_bd3lm_costs_as_much_as_e2d2_with_twice_the_layers(num_decoder_layers: int):
    """BD3-LM with N layers vs E2D2 with N_enc + N_dec = 2N: the paper's train-matched pair."""
    e2d2 = flops.training_flops_per_token(owt_config("e2d2", 24 - num_decoder_layers, num_decoder_layers))
    bd3lm = flops.training_flops_per_token(owt_config("bd3lm", 12))
    assert e2d2.masked / bd3lm.masked == pytest.approx(1.0, abs=0.05)


def test_e2d2_sampling_runs_only_the_decoder_per_step():
    """Per block, BD3-LM's S steps cost N layers each and E2D2's only N_dec, plus one clean pass
    each (N and N_enc layers). S = 4 forwards per block is the most a block of 4 masks can take
    (a forward is spent only on a new state, and each has fewer masks): (S N_dec + N_enc) /
    ((S + 1) N) = 18 / 60 of BD3-LM's layer passes."""
    e2d2 = flops.sampling_flops_per_token(owt_config("e2d2", 10, 2), 0, 1024, 4)
    bd3lm = flops.sampling_flops_per_token(owt_config("bd3lm", 12), 0, 1024, 4)
    assert without_head(e2d2) / without_head(bd3lm) == pytest.approx(18 / 60, rel=0.1)


def test_mfu():
    assert flops.mfu(1e4, 1e9, peak_flops=1e14) == pytest.approx(0.1)
    assert flops.H100_BF16_DENSE_PEAK_FLOPS == 989e12
