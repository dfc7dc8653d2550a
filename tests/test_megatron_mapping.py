"""Reference-name mapping of parallel-stage parameters (no processes needed)."""

from __future__ import annotations

import pytest
import torch

from e2d2.config import ModelConfig
from megatron_ext.mapping import _parts, _reference_name, reference_state_at_seed


@pytest.mark.parametrize(
    "local, encoder_offset, decoder_offset, reference",
    [
        ("layers.0.attn.q_proj.weight", 3, 0, "layers.3.attn.q_proj.weight"),
        ("decoder_layers.1.mlp.down_proj.weight", 5, 2, "decoder_layers.3.mlp.down_proj.weight"),
        ("layers.2.attn.q_layernorm.weight", 0, 0, "layers.2.attn.q_norm.weight"),
        ("decoder_layers.0.attn.k_layernorm.weight", 0, 1, "decoder_layers.1.attn.k_norm.weight"),
        ("embed.weight", 4, 4, "embed.weight"),
        ("encoder_norm.weight", 4, 4, "encoder_norm.weight"),
    ],
)
def test_reference_names(local, encoder_offset, decoder_offset, reference):
    assert _reference_name(local, encoder_offset, decoder_offset) == reference


def test_initial_state_depends_only_on_seed():
    cfg = ModelConfig(variant="e2d2", hidden_size=32, ffn_hidden_size=64, num_layers=2)
    torch.manual_seed(123)
    before = torch.rand(1)
    a, b = reference_state_at_seed(cfg, 7), reference_state_at_seed(cfg, 7)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)  # the global RNG is untouched
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embed.weight"], reference_state_at_seed(cfg, 8)["embed.weight"])


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fused_parameter_parts_cover_its_rows_once_with_their_shard_shapes(tp):
    cfg = ModelConfig(variant="e2d2", hidden_size=32, ffn_hidden_size=64, num_attention_heads=8,
                      num_query_groups=4, num_layers=1)  # head_dim 4
    for name, rows, shards in (
        ("layers.0.attn.linear_qkv.weight", (8 + 2 * 4) * 4, {"q": 32, "k": 16, "v": 16}),
        ("decoder_layers.0.mlp.linear_fc1.weight", 2 * 64, {"gate": 64, "up": 64}),
    ):
        local = torch.arange(rows // tp, dtype=torch.float32)[:, None].expand(-1, 3)
        parts = _parts(name, 0, cfg, tp)
        assert [p.reference_name.split(".")[-2] for p in parts] == [f"{n}_proj" for n in shards]
        assert [p.shape(local.shape) for p in parts] == [(n // tp, 3) for n in shards.values()]
        covered = torch.cat([p.read(local)[:, 0] for p in parts]).sort().values
        assert torch.equal(covered, local[:, 0])
