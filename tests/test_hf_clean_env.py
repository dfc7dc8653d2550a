"""The whole path through the commands: a Hugging Face causal LM is imported, trained by
``e2d2 pretrain``, exported, and the export loads in a fresh process whose only packages are
torch, transformers and safetensors (with their dependencies), offline: AutoConfig /
AutoModel / AutoModelForMaskedLM with trust_remote_code, the bundled tokenizer, and logits
and greedy samples equal to the reference model's on the run's EMA weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pretrain_helpers import make_data_dir, run_pretrain, write_config
from test_hf_helpers import MASK, clean_site, cli, run_clean, save_tiny_qwen3, trained_model

from data_tools.tokenizer import load_tokenizer
from e2d2.sampling import SamplerConfig, sample
from megatron_ext.checkpoint import EMA_PREFIX

transformers = pytest.importorskip("transformers")

CLEAN_SCRIPT = r"""
import importlib, json, sys
for name in ("e2d2", "launchers", "megatron_ext", "megatron", "data_tools"):
    try:
        importlib.import_module(name)
    except ImportError:
        continue
    raise SystemExit(f"{name} is importable in the clean environment")
import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

out = sys.argv[1]
config = AutoConfig.from_pretrained(out, trust_remote_code=True)
model = AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True).eval()
base = AutoModel.from_pretrained(out, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
inputs = torch.load("inputs.pt", weights_only=True)
with torch.no_grad():
    logits = model(input_ids=inputs["xt"], clean_input_ids=inputs["x0"]).logits
tokens = model.generate(inputs["prompt"], max_new_tokens=10, strategy="topk", steps=2,
                        temperature=0)
text_ids = torch.tensor([tok.encode("In the beginning", add_special_tokens=False)])
generated = model.generate(text_ids, max_new_tokens=10, strategy="topk", steps=2, temperature=0)
text = tok.decode(generated[0])
torch.save({"logits": logits, "tokens": tokens}, "result.pt")
print(json.dumps({
    "config": type(config).__name__, "model": type(model).__name__, "base": type(base).__name__,
    "module": type(model).__module__, "variant": config.variant, "text": text,
    "completion": generated[0, text_ids.shape[1]:].tolist(),
    "project_modules": sorted(m for m in sys.modules if m.split(".")[0] in ("e2d2", "launchers")),
}))
"""


@pytest.mark.slow
def test_import_pretrain_export_loads_in_a_clean_environment(tmp_path):
    """import-hf a tiny Qwen3 as E2D2 -> ``e2d2 pretrain`` from it (checkpoint.init, EMA) ->
    export-hf --ema, sharded -> load offline with only torch/transformers/safetensors."""
    data = make_data_dir(tmp_path)  # bytes tokenizer: vocabulary 260, mask 259, EOD 256
    save_tiny_qwen3(tmp_path / "qwen3")
    imported = tmp_path / "imported"
    cli("import-hf", str(tmp_path / "qwen3"), str(imported), "--variant", "e2d2",
         "--decoder-layers", "1", "--mask-token-id", "259", "--seq-length", "32")
    model_section = yaml.safe_load((imported / "config.yaml").read_text())["model"]
    run = tmp_path / "run"
    config = write_config(tmp_path / "adapt.yaml", model=model_section,
                          train={"steps": 2, "ema_decay": 0.5}, data={"path": str(data)},
                          run={"dir": str(run)}, checkpoint={"init": str(imported)})
    done = run_pretrain(config)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "exported"
    cli("export-hf", str(run), str(out), "--ema", "--max-shard-size", "40KB")
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()

    # The reference: the run's EMA weights in the reference model.
    _, model = trained_model(run, EMA_PREFIX)

    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, MASK, (2, 16), generator=g)
    xt = torch.where(torch.rand(2, 16, generator=g) < 0.5, MASK, x0)
    prompt = x0[:, :5]
    work = tmp_path / "elsewhere"
    work.mkdir()
    torch.save({"x0": x0, "xt": xt, "prompt": prompt}, work / "inputs.pt")
    site = clean_site(tmp_path / "site")
    done = run_clean(CLEAN_SCRIPT.replace("sys.argv[1]", repr(str(out))), site, work)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["config"] == "E2D2Config" and report["variant"] == "e2d2"
    assert report["model"] == report["base"] == "E2D2ForMaskedLM"
    assert report["module"].startswith("transformers_modules.") and report["project_modules"] == []
    assert report["text"].startswith("In the beginning")

    # The same tokens as `e2d2 sample` on the checkpoint it was exported from (greedy top-k).
    e2d2 = Path(sys.executable).with_name("e2d2")
    sampled = subprocess.run([str(e2d2), "sample", str(run), "--prompt", "In the beginning",
                              "--max-new-tokens", "10", "--strategy", "topk", "--steps", "2",
                              "--temperature", "0", "--ema", "--json"],
                             capture_output=True, text=True, timeout=600)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    tokens = json.loads(sampled.stdout.strip().splitlines()[-1])["tokens"]
    eod = load_tokenizer(data / "tokenizer").eod
    assert report["completion"] == tokens + [eod] * (10 - len(tokens))

    result = torch.load(work / "result.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(result["logits"], model(x0, xt), atol=1e-5, rtol=0)
    greedy = SamplerConfig(strategy="topk", steps=2, temperature=0.0, max_new_tokens=10,
                           eos_token_id=eod)
    assert torch.equal(result["tokens"], sample(model, prompt, greedy).tokens)
