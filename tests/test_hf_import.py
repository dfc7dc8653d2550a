"""``e2d2 import-hf``: tiny random Qwen3 and Llama causal LMs built with transformers and
saved locally. As our AR variant they give the HF model's logits (1e-5 fp32), which proves
the name and layout mapping; E2D2 decoders copy (or tie) the chosen layers; bad input is
one clear error and nothing is written."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch

from e2d2.config import ModelConfig
from e2d2.errors import UserError
from e2d2.model import DiffusionLM
from launchers.config import load_run_config
from launchers.hf.checkpoints import TensorReader, single_process_group
from launchers.hf.import_hf import import_hf
from launchers.hf.param_mapping import PARAM_MAPPINGS
from megatron_ext.checkpoint import MODEL_PREFIX

transformers = pytest.importorskip("transformers")

VOCAB = 96


def _qwen3(tied: bool = True):
    cfg = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                   head_dim=16, max_position_embeddings=64, rope_theta=5e5,
                                   tie_word_embeddings=tied, rms_norm_eps=1e-5)
    return transformers.Qwen3ForCausalLM(cfg)


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def _saved(model, directory: Path) -> Path:
    torch.manual_seed(0)
    with torch.no_grad():  # random norms, so a swapped or skipped norm shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.uniform_(0.5, 1.5)
    model.eval().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(1)
    qwen, llama = _qwen3(), _llama()
    return {"qwen3": (qwen, _saved(qwen, root / "qwen3")),
            "llama": (llama, _saved(llama, root / "llama"))}


def _read(out: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    cfg = load_run_config(out / "config.yaml").model
    with single_process_group():
        reader = TensorReader(out, MODEL_PREFIX)
        return cfg, reader.read(sorted(reader.shapes))


def _imported(out: Path) -> DiffusionLM:
    cfg, state = _read(out)
    model = DiffusionLM(cfg).eval()
    model.load_state_dict(state)
    return model


def _out(tmp_path: Path) -> Path:
    return tmp_path / f"ckpt_{uuid.uuid4().hex[:6]}"


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_ar_import_reproduces_the_causal_lm_logits(hf_models, tmp_path, arch):
    hf, directory = hf_models[arch]
    ours = _imported(import_hf(directory, _out(tmp_path), "ar", mask_token_id=VOCAB - 1))
    assert ours.cfg.qk_layernorm == (arch == "qwen3")
    assert ours.cfg.tie_word_embeddings == (arch == "qwen3")
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-5, rtol=0)


def test_e2d2_decoder_takes_the_chosen_layers(hf_models, tmp_path):
    hf, directory = hf_models["qwen3"]
    hf_state = hf.state_dict()
    top = _read(import_hf(directory, _out(tmp_path), "e2d2", decoder_layers=2,
                          mask_token_id=VOCAB - 1))[1]
    bottom = _read(import_hf(directory, _out(tmp_path), "e2d2", decoder_layers=2,
                             decoder_from="bottom", mask_token_id=VOCAB - 1))[1]
    for k, (t, b) in enumerate(((1, 0), (2, 1))):  # 3 layers: top = 1, 2; bottom = 0, 1
        for suffix in ("attn.q_proj.weight", "attn.k_norm.weight", "mlp.down_proj.weight"):
            mapping = next(m for m in PARAM_MAPPINGS if m.ours == f"layers.*.{suffix}")
            assert torch.equal(top[f"decoder_layers.{k}.{suffix}"], hf_state[mapping.to_hf(f"layers.{t}.{suffix}")])
            assert torch.equal(bottom[f"decoder_layers.{k}.{suffix}"], hf_state[mapping.to_hf(f"layers.{b}.{suffix}")])
    assert torch.equal(top["encoder_norm.weight"], hf_state["model.norm.weight"])
    assert sum(n.startswith("layers.") for n in top) == 3 * 11  # the encoder takes every layer

    cfg, tied = _read(import_hf(directory, _out(tmp_path), "e2d2_shared_kv", decoder_layers=2,
                                tie_decoder=True, mask_token_id=VOCAB - 1))
    assert cfg.tie_decoder_to_encoder and not any(n.startswith("decoder_layers.") for n in tied)
    with pytest.raises(UserError, match="cannot take the bottom"):
        import_hf(directory, _out(tmp_path), "e2d2_shared_kv", tie_decoder=True, decoder_from="bottom")


def test_layout_is_validated_and_recorded(hf_models, tmp_path):
    _, directory = hf_models["qwen3"]
    out = import_hf(directory, _out(tmp_path), "e2d2", tp=2, pp=2, mask_token_id=VOCAB - 1,
                    decoder_layers=1)
    parallel = load_run_config(out / "config.yaml").parallel
    assert (parallel.tensor_parallel, parallel.pipeline_parallel, parallel.encoder_pipeline_stages) == (2, 2, 1)
    with pytest.raises(UserError, match="does not divide num_query_groups"):
        import_hf(directory, _out(tmp_path), "ar", tp=4, mask_token_id=VOCAB - 1)


def _rewrite(src: Path, dst: Path, edit_tensors=None, edit_config=None) -> Path:
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    save_file(tensors, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_bad_input_is_one_clear_error_and_writes_nothing(hf_models, tmp_path):
    _, src = hf_models["llama"]
    out = tmp_path / "out"

    def refused(directory, match, **kwargs):
        with pytest.raises(UserError, match=match):
            import_hf(directory, out, kwargs.pop("variant", "ar"), **{"mask_token_id": 5, **kwargs})
        assert not out.exists() and not list(tmp_path.glob(".tmp-*"))

    bias = _rewrite(src, tmp_path / "bias", lambda t: t.update(
        {"model.layers.1.self_attn.q_proj.bias": torch.zeros(32)}))
    refused(bias, r"unknown tensors \['model\.layers\.1\.self_attn\.q_proj\.bias'\]")
    missing = _rewrite(src, tmp_path / "missing", lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    refused(missing, r"missing tensors \['model\.layers\.0\.mlp\.up_proj\.weight'\]")
    shape = _rewrite(src, tmp_path / "shape", edit_config=lambda c: c.update(intermediate_size=40))
    refused(shape, r"layers\.0\.mlp\.gate_proj\.weight: \(48, 32\) vs expected \(40, 32\)")
    arch = _rewrite(src, tmp_path / "arch", edit_config=lambda c: c.update(
        architectures=["MistralForCausalLM"], model_type="mistral"))
    refused(arch, r"unsupported architecture \['MistralForCausalLM'\]")
    refused(_rewrite(src, tmp_path / "act", edit_config=lambda c: c.update(hidden_act="gelu")),
            "hidden_act='gelu' is not supported")
    refused(_rewrite(src, tmp_path / "rope", edit_config=lambda c: c.update(
        rope_parameters={"rope_type": "llama3", "rope_theta": 1e4})), "rope type 'llama3'")

    from tokenizers import Tokenizer, models

    vocab = _rewrite(src, tmp_path / "vocab")
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB + 10)}, unk_token="t0")).save(
        str(vocab / "tokenizer.json"))
    refused(vocab, "tokenizer has ids up to 105 but config.json vocab_size is 96")
    refused(src, "no mask token found", variant="e2d2", mask_token_id=None)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((src / "config.json").read_text())
    torch.save(hf_models["llama"][0].state_dict(), pickled / "pytorch_model.bin")
    refused(pickled, "pickle files can run arbitrary code.*--allow-pickle")
    ours = _imported(import_hf(pickled, out, "ar", allow_pickle=True, mask_token_id=5))
    tokens = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf_models["llama"][0](tokens).logits, atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        import_hf(src, out, "ar", mask_token_id=5)


def test_import_then_export_round_trips_to_the_original_logits(hf_models, tmp_path):
    from transformers import AutoModelForMaskedLM

    from launchers.hf.export import export_hf

    hf, directory = hf_models["qwen3"]
    ckpt = import_hf(directory, _out(tmp_path), "ar", mask_token_id=VOCAB - 1)
    exported = export_hf(ckpt, tmp_path / f"rt_{uuid.uuid4().hex[:6]}")
    back = AutoModelForMaskedLM.from_pretrained(str(exported), trust_remote_code=True).eval()
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=tokens).logits, hf(tokens).logits, atol=1e-5, rtol=0)
