"""The exported ``generate()``, loaded through transformers: padded batches (left, right,
mixed; rows of any length, empty too) give each row its prompt's completion alone, and every
sampler setting of the run reaches it, so it samples exactly as ``e2d2 sample``."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from test_hf_helpers import MASK, tiny_config, write_run

from data_tools.tokenizer import bytes_tokenizer
from e2d2.model import DiffusionLM
from e2d2.sampling import SamplerConfig, sample, sample_prompts
from launchers.hf.export import export_hf

pytest.importorskip("transformers")

EOS, PAD = 7, 256


def _model(cfg) -> DiffusionLM:
    torch.manual_seed(0)
    model = DiffusionLM(cfg).eval()
    with torch.no_grad():  # larger weights: peaked, prompt-dependent predictions
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(10.0)
    return model


def _export(run: Path, tmp_path: Path) -> Path:
    # transformers names the dynamic module after the directory: keep names unique
    return export_hf(run, tmp_path / f"hf_{uuid.uuid4().hex[:8]}")


def _load(path: Path):
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM.from_pretrained(str(path), trust_remote_code=True).eval()


@pytest.fixture(scope="module", params=["e2d2", "mdlm"])
def exported(request, tmp_path_factory):
    """(reference model, its export loaded by transformers)."""
    tmp = tmp_path_factory.mktemp(request.param)
    model = _model(tiny_config(request.param))
    run = write_run(tmp / "run", model.cfg, model.state_dict(), {"strategy": "topk", "steps": 2})
    return model, _load(_export(run, tmp))


def _padded(prompts: list[list[int]], sides: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for r, (p, side) in enumerate(zip(prompts, sides, strict=True)):
        at = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[r, at], mask[r, at] = torch.tensor(p, dtype=torch.long), 1
    return ids, mask


@pytest.mark.parametrize("layout", ["left", "right", "mixed"])
def test_padded_batches_give_each_row_its_prompt_alone(exported, layout):
    model, hf = exported
    prompts = [[5, 6, 7, 8, 9, 10], [3, 4], [], [1, 2, 3, 4, 5]]
    sides = {"left": ["left"] * 4, "right": ["right"] * 4, "mixed": ["left", "right", "left", "right"]}[layout]
    ids, mask = _padded(prompts, sides)
    seeds, N = [11, 12, 13, 14], 9
    for strategy, temperature in (("topk", 0.0), ("ancestral", 1.0), ("threshold", 1.0)):
        kw = dict(strategy=strategy, steps=3, temperature=temperature, max_new_tokens=N, eos_token_id=EOS)
        out = hf.generate(ids, attention_mask=mask, seeds=seeds, **kw)
        assert out.shape == (4, ids.shape[1] + N) and torch.equal(out[:, :ids.shape[1]], ids)
        for r, p in enumerate(prompts):
            prompt = torch.tensor(p, dtype=torch.long).view(1, len(p))
            alone = sample(model, prompt, SamplerConfig(**kw), seeds=[seeds[r]]).tokens[0, len(p):]
            assert torch.equal(out[r, ids.shape[1]:], alone), (strategy, r)


def test_generate_refuses_what_it_cannot_sample(exported):
    _, hf = exported
    ids = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="row 0 has padding inside the prompt"):
        hf.generate(ids, attention_mask=torch.tensor([[1, 0, 1, 1]]), max_new_tokens=4)
    with pytest.raises(TypeError, match=r"unknown arguments \['top_k'\]"):
        hf.generate(ids, max_new_tokens=4, top_k=5)
    with pytest.raises(ValueError, match="need the model's tokenizer"):
        hf.generate(ids, max_new_tokens=4, stop_strings=["ab"])


def _ascii_pair(ids: list[int]) -> str:
    """The first two printable ASCII tokens in a row, after the first three tokens."""
    for i in range(3, len(ids) - 1):
        if all(32 <= t < 127 for t in ids[i:i + 2]):
            return bytes(ids[i:i + 2]).decode()
    raise AssertionError(f"no printable pair in {ids}: pick another seed")


@pytest.mark.slow
def test_generate_carries_every_sampler_field_and_equals_e2d2_sample(tmp_path):
    """A run whose sampler sets every field to a non-default value: the export's generation
    config holds all of them, and generate() gives exactly `e2d2 sample`'s tokens (sliding
    window past seq_length, inference block size, top-p, min_t, a stop string, EOS)."""
    from transformers import AutoTokenizer

    cfg = tiny_config("e2d2")
    model, tok = _model(cfg), bytes_tokenizer()
    prompts = ["In the beginning", "God"]
    base = SamplerConfig(strategy="topk_margin", steps=3, schedule="cosine", temperature=0.8,
                         threshold=0.5, max_new_tokens=40, eos_token_id=258, top_p=0.9, min_t=0.1,
                         block_size=2, sliding_window=True)
    assert base.max_new_tokens + len(tok.encode(prompts[0])) > cfg.seq_length  # the window slides
    free = sample_prompts(model, [tok.encode(t) for t in prompts], base, seeds=[3, 4], decode=tok.decode)
    sampler = dataclasses.replace(base, stop_strings=(_ascii_pair(free[0]),))  # ends row 0 early
    default = SamplerConfig()
    same = [f.name for f in dataclasses.fields(SamplerConfig) if getattr(sampler, f.name) == getattr(default, f.name)]
    assert same == ["use_cache"]  # sliding_window needs the cache
    section = {**dataclasses.asdict(sampler), "stop_strings": list(sampler.stop_strings)}
    run = write_run(tmp_path / "run", cfg, model.state_dict(), section)
    tok.save(run / "tokenizer")
    out = _export(run, tmp_path)
    hf, hf_tok = _load(out), AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    carried = {f.name: getattr(hf.generation_config, f.name) for f in dataclasses.fields(SamplerConfig)}
    assert SamplerConfig(**carried) == sampler

    e2d2 = Path(sys.executable).with_name("e2d2")
    command = [str(e2d2), "sample", str(run), "--prompt", prompts[0], "--prompt", prompts[1], "--seed", "3"]
    done = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["sample"], r["seed"], r["prompt"]) for r in rows] == [(1, 3, prompts[0]), (2, 4, prompts[1])]
    assert len(rows[0]["tokens"]) < sampler.max_new_tokens  # the stop string ended it

    batch = hf_tok(prompts, padding=True, return_tensors="pt")
    assert batch["input_ids"][0].tolist() == tok.encode(prompts[0])
    got = hf.generate(batch["input_ids"], attention_mask=batch["attention_mask"], seeds=[3, 4], tokenizer=hf_tok)
    P = batch["input_ids"].shape[1]
    for r, row in enumerate(rows):
        n = len(row["tokens"])
        assert got[r, P:P + n].tolist() == row["tokens"], r
        assert (got[r, P + n:] == sampler.eos_token_id).all()

    # Without --json: every sample under a numbered header, its text exactly the prompt and
    # completion (which may hold newlines themselves).
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = "\n".join(f"=== sample {r['sample']} of 2 (seed {r['seed']}, {len(r['tokens'])} tokens) ===\n"
                         f"{r['prompt']}{r['text']}\n" for r in rows)
    assert done.stdout == expected
    assert MASK not in sum((r["tokens"] for r in rows), [])
