"""An export made by the ``e2d2 export-hf`` command loads in a fresh process whose only
packages are torch, transformers and safetensors (with their dependencies), offline:
AutoConfig / AutoModel / AutoModelForMaskedLM with trust_remote_code, the bundled
tokenizer, and logits and greedy samples equal to the reference model's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_hf_helpers import MASK, clean_site, run_clean, tiny_config, write_run

from data_tools.tokenizer import load_tokenizer
from e2d2.model import DiffusionLM
from e2d2.sampling import SamplerConfig, sample

pytest.importorskip("transformers")

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
text_ids = tok("In the beginning", return_tensors="pt").input_ids
text = tok.decode(model.generate(text_ids, max_new_tokens=8, strategy="topk", steps=2)[0])
torch.save({"logits": logits, "tokens": tokens}, "result.pt")
print(json.dumps({
    "config": type(config).__name__, "model": type(model).__name__, "base": type(base).__name__,
    "module": type(model).__module__, "variant": config.variant, "text": text,
    "project_modules": sorted(m for m in sys.modules if m.split(".")[0] in ("e2d2", "launchers")),
}))
"""


@pytest.mark.slow
def test_export_cli_loads_in_a_clean_environment(tmp_path):
    tokenizer = load_tokenizer("bytes")  # vocabulary 260, mask 259: the default model's
    data = tmp_path / "data"
    tokenizer.save(data / "tokenizer")
    cfg = tiny_config("e2d2")
    torch.manual_seed(0)
    model = DiffusionLM(cfg).eval()
    run = write_run(tmp_path / "run", cfg, model.state_dict(),
                    {"strategy": "topk", "steps": 2, "temperature": 0.0}, data_path=str(data))
    out = tmp_path / "exported"
    e2d2 = Path(sys.executable).with_name("e2d2")
    done = subprocess.run([str(e2d2), "export-hf", str(run), str(out), "--max-shard-size", "40KB"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors.index.json").is_file()
    assert (out / "tokenizer.json").is_file()

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

    result = torch.load(work / "result.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(result["logits"], model(x0, xt), atol=1e-5, rtol=0)
    greedy = SamplerConfig(strategy="topk", steps=2, temperature=0.0, max_new_tokens=10,
                           eos_token_id=tokenizer.eod)
    assert torch.equal(result["tokens"], sample(model, prompt, greedy).tokens)
