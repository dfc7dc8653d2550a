"""The initialisation rule (e2d2.init): any slice of a tensor, drawn alone, equals that slice
of the whole tensor; the distributions are the reference model's (norms ones, Normal(0,
init_std), output projections scaled by 1/sqrt(2 x depth)); seeds decide everything."""

from __future__ import annotations

import math

import pytest
import torch

from e2d2 import init
from e2d2.config import ModelConfig
from e2d2.model import DiffusionLM

CFG = ModelConfig(variant="e2d2", vocab_size=512, mask_token_id=511, hidden_size=64,
                  ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2, num_layers=3,
                  num_decoder_layers=1, tie_word_embeddings=False)


@pytest.fixture
def small_chunks(monkeypatch):
    """7 rows of 64 per chunk: chunk boundaries fall inside every TP shard below."""
    monkeypatch.setattr(init, "CHUNK_ELEMENTS", 7 * 64)


@pytest.mark.parametrize("index", [
    (slice(0, 256),), (slice(256, 512),),                 # column-parallel shards, TP2
    (slice(128, 256),), (slice(5, 6),),                   # TP4 shard, one row
    (slice(None), slice(0, 32)), (slice(None), slice(48, 64)),  # row-parallel shards
    (slice(100, 300), slice(10, 20)),
])
def test_a_slice_drawn_alone_equals_that_slice_of_the_whole_tensor(small_chunks, index):
    full = init.materialize(CFG, 3, "embed.weight", (512, 64))
    assert init.chunk_rows((512, 64)) == 7
    assert torch.equal(init.materialize(CFG, 3, "embed.weight", (512, 64), index), full[index])


def test_shards_fill_in_place_and_reassemble_bitwise(small_chunks):
    full = init.materialize(CFG, 3, "layers.0.attn.o_proj.weight", (64, 64))
    parts = []
    for rank in range(4):  # row-parallel: dim 1
        out = torch.empty(64, 16, dtype=torch.float64)
        init.fill_(out, CFG, 3, "layers.0.attn.o_proj.weight", (64, 64),
                   (slice(None), slice(16 * rank, 16 * rank + 16)))
        parts.append(out)
    assert torch.equal(torch.cat(parts, 1), full.double())


def test_values_depend_on_seed_and_name_only():
    a = init.materialize(CFG, 0, "layers.0.mlp.up_proj.weight", (128, 64))
    assert torch.equal(a, init.materialize(CFG, 0, "layers.0.mlp.up_proj.weight", (128, 64)))
    assert not torch.equal(a, init.materialize(CFG, 1, "layers.0.mlp.up_proj.weight", (128, 64)))
    assert not torch.equal(a, init.materialize(CFG, 0, "layers.1.mlp.up_proj.weight", (128, 64)))


def test_reference_model_uses_the_rule_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    model = DiffusionLM(CFG, seed=5)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)
    for name, p in model.named_parameters():
        assert torch.equal(p, init.materialize(CFG, 5, name, tuple(p.shape))), name
    # Without a seed: one drawn from the global generator, so manual_seed reproduces it.
    torch.manual_seed(9)
    a = DiffusionLM(CFG).embed.weight
    torch.manual_seed(9)
    assert torch.equal(a, DiffusionLM(CFG).embed.weight)


def test_distributions_are_the_reference_models():
    cfg = CFG.replace(hidden_size=256, ffn_hidden_size=512)
    model = DiffusionLM(cfg, seed=0)
    out_std = cfg.init_std / math.sqrt(2 * (cfg.num_layers + cfg.num_decoder_layers))
    for name, p in model.named_parameters():
        if p.dim() == 1:
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        std = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else cfg.init_std
        assert abs(p.mean().item()) < 3 * std / math.sqrt(p.numel()), name
        assert p.std().item() == pytest.approx(std, rel=0.02), name


def test_the_1b_embedding_is_drawn_in_16_mib_chunks():
    assert init.chunk_rows((151936, 2048)) == 2048
    assert init.chunk_rows((2048,)) == init.CHUNK_ELEMENTS


def test_meta_tensors_are_left_alone_and_wrong_shapes_refused():
    with torch.device("meta"):
        model = DiffusionLM(CFG)  # no draw, no allocation
    assert model.embed.weight.is_meta
    with pytest.raises(ValueError, match="not the slice"):
        init.fill_(torch.empty(3, 64), CFG, 0, "embed.weight", (512, 64), (slice(0, 4),))
