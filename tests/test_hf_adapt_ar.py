"""Adapting an AR checkpoint end to end (spec 7, DiffuLLaMA): a tiny Hugging Face Qwen3 is
imported as E2D2 shared-KV (the decoder copies every layer), ``e2d2 pretrain`` adapts it with
``diffusion.anneal_steps`` and ``model.shift``, and its export loads offline in a fresh
process with only torch, transformers and safetensors: the logits and greedy samples of
``AutoModelForMaskedLM`` equal the reference model's on the run's weights, shift included."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from pretrain_helpers import make_data_dir, records, run_pretrain, write_config
from test_hf_helpers import MASK, clean_site, cli, run_clean, save_tiny_qwen3, trained_model

from e2d2.sampling import SamplerConfig, sample
from megatron_ext.checkpoint import MODEL_PREFIX

transformers = pytest.importorskip("transformers")

CLEAN_SCRIPT = r"""
import json, sys
import torch
from transformers import AutoConfig, AutoModelForMaskedLM

out = sys.argv[1]
config = AutoConfig.from_pretrained(out, trust_remote_code=True)
model = AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True).eval()
inputs = torch.load("inputs.pt", weights_only=True)
with torch.no_grad():
    logits = model(input_ids=inputs["xt"], clean_input_ids=inputs["x0"]).logits
tokens = model.generate(inputs["prompt"], max_new_tokens=10, strategy="topk", steps=2, temperature=0)
torch.save({"logits": logits, "tokens": tokens}, "result.pt")
print(json.dumps({"variant": config.variant, "shift": config.shift}))
"""


@pytest.mark.slow
def test_import_adapt_with_anneal_and_shift_export_and_load_clean(tmp_path):
    data = make_data_dir(tmp_path)  # bytes tokenizer: vocabulary 260, mask 259
    torch.manual_seed(0)
    save_tiny_qwen3(tmp_path / "qwen3")
    imported = tmp_path / "imported"
    cli("import-hf", str(tmp_path / "qwen3"), str(imported), "--variant", "e2d2_shared_kv",
         "--decoder-layers", "2", "--mask-token-id", "259", "--seq-length", "32", "--shift")
    model_section = yaml.safe_load((imported / "config.yaml").read_text())["model"]
    assert model_section["shift"] is True
    run = tmp_path / "run"
    config = write_config(tmp_path / "adapt.yaml", model=model_section,
                          diffusion={"anneal_steps": 2}, train={"steps": 3},
                          data={"path": str(data)}, run={"dir": str(run)},
                          checkpoint={"init": str(imported)})
    done = run_pretrain(config)
    assert done.returncode == 0, done.stderr[-3000:]
    trained = [r for r in records(run) if "loss" in r]
    assert [r["anneal_ratio"] for r in trained] == [0.0, 0.5, 1.0]  # causal -> the variant's mask

    out = tmp_path / "exported"
    cli("export-hf", str(run), str(out))
    assert json.loads((out / "config.json").read_text())["shift"] is True

    ckpt, model = trained_model(run, MODEL_PREFIX)
    assert ckpt.config.model.shift and ckpt.config.diffusion.anneal_steps == 2

    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, MASK, (2, 16), generator=g)
    xt = torch.where(torch.rand(2, 16, generator=g) < 0.5, MASK, x0)
    xt[:, 0] = x0[:, 0]  # position 0 is never masked under the shift
    prompt = x0[:, :5]
    work = tmp_path / "elsewhere"
    work.mkdir()
    torch.save({"x0": x0, "xt": xt, "prompt": prompt}, work / "inputs.pt")
    done = run_clean(CLEAN_SCRIPT.replace("sys.argv[1]", repr(str(out))), clean_site(tmp_path / "site"), work)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"variant": "e2d2_shared_kv", "shift": True}

    result = torch.load(work / "result.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(result["logits"], model(x0, xt), atol=1e-5, rtol=0)
    eod = json.loads((out / "generation_config.json").read_text()).get("eos_token_id")
    greedy = SamplerConfig(strategy="topk", steps=2, temperature=0.0, max_new_tokens=10, eos_token_id=eod)
    assert torch.equal(result["tokens"], sample(model, prompt, greedy).tokens)
