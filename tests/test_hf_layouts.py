"""Export works from checkpoints saved at any layout, and import writes checkpoints that
load at any layout: TP2 and PP2 (E2D2 encoder stage + decoder stage) runs written by
pretrain's checkpoint writer export to the reference logits; an imported Qwen3 loads at
TP2 with its exact weights (what ``checkpoint.init`` does)."""

from __future__ import annotations

import pytest
import torch
from test_hf_helpers import MASK, save_and_load_at_layouts, save_tiny_qwen3, tiny_config

from e2d2.model import DiffusionLM
from launchers.hf.export import export_hf
from launchers.hf.import_hf import import_hf
from megatron_ext.mapping import reference_state_at_seed
from megatron_ext.testing import spawn_gloo

transformers = pytest.importorskip("transformers")

CASES = [
    ("e2d2_tp2", tiny_config("e2d2"), {"tensor_parallel": 2}),
    ("e2d2_pp2", tiny_config("e2d2", tie_word_embeddings=False),
     {"pipeline_parallel": 2, "encoder_pipeline_stages": 1}),
    ("bd3lm_tp2", tiny_config("bd3lm"), {"tensor_parallel": 2}),
]


@pytest.mark.slow
def test_export_from_parallel_layouts_and_import_to_them(tmp_path):
    from transformers import AutoModelForMaskedLM

    qwen = save_tiny_qwen3(tmp_path / "qwen3", vocab_size=64, intermediate_size=48)
    imported = import_hf(tmp_path / "qwen3", tmp_path / "imported", "e2d2", decoder_layers=1,
                         mask_token_id=63, tp=2)

    results = spawn_gloo(save_and_load_at_layouts, 2, str(tmp_path / "runs"), CASES, str(imported))

    hf_state = qwen.state_dict()
    loaded = results[0]
    assert torch.equal(loaded["layers.1.attn.q_proj.weight"], hf_state["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(loaded["decoder_layers.0.mlp.up_proj.weight"], hf_state["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(loaded["embed.weight"], hf_state["model.embed_tokens.weight"])

    x0 = torch.randint(0, MASK, (2, 16), generator=torch.Generator().manual_seed(0))
    xt = torch.where(torch.rand(2, 16, generator=torch.Generator().manual_seed(1)) < 0.5, MASK, x0)
    for name, cfg, _ in CASES:
        reference = DiffusionLM(cfg).eval()
        reference.load_state_dict(reference_state_at_seed(cfg, 0))
        out = export_hf(tmp_path / "runs" / name, tmp_path / f"hf_{name}_{tmp_path.name}")
        hf = AutoModelForMaskedLM.from_pretrained(str(out), trust_remote_code=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(input_ids=xt, clean_input_ids=x0).logits,
                                       reference(x0, xt), atol=1e-5, rtol=0)
