"""``e2d2 export-hf``: the exported directory loads through transformers and is the
reference model: same logits (1e-5 fp32), same samples for every strategy, shipped code
identical to ``e2d2/``, shards streamed, bad input refused with nothing written."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from test_hf_helpers import MASK, tiny_config, write_run

from e2d2.errors import UserError
from e2d2.model import DiffusionLM
from e2d2.sampling import STRATEGIES, SamplerConfig, sample
from launchers.hf import export as export_mod
from launchers.hf.export import export_hf

pytest.importorskip("transformers")

VARIANTS = {
    "e2d2": tiny_config("e2d2"),
    "e2d2_shared_kv_tied": tiny_config("e2d2_shared_kv", tie_decoder_to_encoder=True),
    "bd3lm_untied": tiny_config("bd3lm", tie_word_embeddings=False),
    "mdlm": tiny_config("mdlm"),
    "ar": tiny_config("ar"),
}


def _model(cfg, seed=0) -> DiffusionLM:
    torch.manual_seed(seed)
    model = DiffusionLM(cfg).eval()
    with torch.no_grad():  # norms away from 1, so a swapped norm weight shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """variant -> (reference model, run directory); the e2d2 run also keeps an EMA."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, cfg in VARIANTS.items():
        model = _model(cfg)
        ema = _model(cfg, seed=1).state_dict() if name == "e2d2" else None
        sampler = {"strategy": "topk", "steps": 2, "temperature": 0.0, "max_new_tokens": 8}
        out[name] = (model, write_run(root / name, cfg, model.state_dict(), sampler, ema))
    return out


def _load(path: Path):
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM.from_pretrained(str(path), trust_remote_code=True).eval()


def _out(tmp_path: Path, name: str) -> Path:
    # transformers names the dynamic module after the directory: keep names unique
    return tmp_path / f"{name}_{uuid.uuid4().hex[:8]}"


def _tokens(batch=2, L=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, MASK, (batch, L), generator=g)
    xt = torch.where(torch.rand(batch, L, generator=g) < 0.5, MASK, x0)
    return x0, xt


@pytest.mark.parametrize("name", list(VARIANTS))
def test_exported_logits_equal_the_reference_model(runs, tmp_path, name):
    model, run = runs[name]
    hf = _load(export_hf(run, _out(tmp_path, name)))
    x0, xt = _tokens()
    padding = torch.ones_like(x0)
    padding[1, -4:] = 0
    context = torch.zeros_like(x0)
    context[:, :4] = 1
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": padding, "context_mask": context}):
            ref = model(x0, xt, kwargs.get("attention_mask"), kwargs.get("context_mask"))
            got = hf(input_ids=xt, clean_input_ids=x0, **kwargs).logits
            assert got.shape == (2, 16, model.cfg.vocab_size)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_generate_is_the_reference_sampler_for_every_strategy(runs, tmp_path):
    model, run = runs["e2d2"]
    hf = _load(export_hf(run, _out(tmp_path, "gen")))
    prompt = _tokens(batch=3, L=6)[0]
    for strategy in STRATEGIES:
        for temperature in (0.0, 1.0):
            cfg = SamplerConfig(strategy=strategy, steps=3, temperature=temperature,
                                max_new_tokens=9, eos_token_id=7)
            ref = sample(model, prompt, cfg, torch.Generator().manual_seed(5)).tokens
            got = hf.generate(prompt, max_new_tokens=9, strategy=strategy, steps=3,
                              temperature=temperature, eos_token_id=7,
                              generator=torch.Generator().manual_seed(5))
            assert got.shape == (3, 6 + 9)
            assert torch.equal(got, ref), (strategy, temperature)
    # Unset arguments come from generation_config.json (the run's sampler: greedy top-k).
    default = SamplerConfig(strategy="topk", steps=2, temperature=0.0, max_new_tokens=8)
    assert torch.equal(hf.generate(prompt), sample(model, prompt, default).tokens)


def test_ema_export_holds_the_ema_weights(runs, tmp_path):
    _, run = runs["e2d2"]
    hf = _load(export_hf(run, _out(tmp_path, "ema"), ema=True))
    ema = _model(VARIANTS["e2d2"], seed=1)
    x0, xt = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=xt, clean_input_ids=x0).logits, ema(x0, xt),
                                   atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="no EMA weights"):
        export_hf(runs["mdlm"][1], _out(tmp_path, "noema"), ema=True)


def test_shards_are_streamed_one_at_a_time(runs, tmp_path, monkeypatch):
    model, run = runs["bd3lm_untied"]
    reads = []
    original = export_mod.TensorReader.read

    def recording_read(self, names):
        tensors = original(self, names)
        reads.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        return tensors

    monkeypatch.setattr(export_mod.TensorReader, "read", recording_read)
    out = export_hf(run, _out(tmp_path, "shards"), max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == len(reads) > 3 and all((out / f).is_file() for f in files)
    assert set(index["weight_map"]) == {f"model.{n}" for n in model.state_dict()}
    largest = max(p.numel() * 4 for p in model.parameters())
    assert max(reads) <= max(20_000, largest)  # one shard in memory, never the model
    assert sum(reads) == index["metadata"]["total_size"]


def test_bfloat16_export(runs, tmp_path):
    model, run = runs["e2d2"]
    out = export_hf(run, _out(tmp_path, "bf16"), dtype="bfloat16")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        weight = f.get_tensor("model.embed.weight")
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight, model.embed.weight.detach().to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf = _load(out)  # transformers keeps the checkpoint's dtype; the sampler runs in it
    assert hf.model.embed.weight.dtype == torch.bfloat16
    assert hf.generate(_tokens(L=5)[0], max_new_tokens=6, steps=2).shape == (2, 11)


def test_config_card_and_generation_config(runs, tmp_path):
    _, run = runs["e2d2"]
    out = export_hf(run, _out(tmp_path, "files"))
    config = json.loads((out / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForMaskedLM"}
    assert config["variant"] == "e2d2" and config["num_layers"] == 2
    generation = json.loads((out / "generation_config.json").read_text())
    assert {k: generation[k] for k in ("strategy", "steps", "temperature", "max_new_tokens")} == {
        "strategy": "topk", "steps": 2, "temperature": 0.0, "max_new_tokens": 8}
    card = (out / "README.md").read_text()
    for expected in ("E2D2 encoder-decoder", "`nelbo`: 3.5", "`train_loss`: 3.25", "trust_remote_code"):
        assert expected in card
    assert not list(tmp_path.glob(".tmp-*"))


def _normalized(tree: ast.Module, modules: dict[str, str]) -> str:
    """The AST with the export's relative imports turned back into ``e2d2`` imports
    (``modules``: shipped file stem -> module, ``e2d2_sampling_api`` -> ``e2d2.sampling.api``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            node.level, node.module = 0, modules[node.module]
    return ast.dump(tree)


def _drifted(out: Path) -> list[str]:
    """Shipped ``e2d2_*.py`` files whose code differs from ``e2d2/`` (an empty list: none)."""
    from launchers.hf import remote_code

    sources = {remote_code.shipped_name(m): m for m in remote_code.module_closure()}
    modules = {name.removesuffix(".py"): m for name, m in sources.items()}
    bad = []
    for shipped in sorted(out.glob("e2d2_*.py")):
        source = Path(importlib.util.find_spec(sources[shipped.name]).origin)
        if _normalized(ast.parse(shipped.read_text()), modules) != ast.dump(ast.parse(source.read_text())):
            bad.append(shipped.name)
    return bad


def test_shipped_code_is_the_reference_code(runs, tmp_path):
    from transformers.dynamic_module_utils import get_imports, get_relative_import_files

    out = export_hf(runs["e2d2"][1], _out(tmp_path, "code"))
    assert _drifted(out) == []
    shipped = {p.name for p in out.glob("*.py")}
    assert {"e2d2_model.py", "e2d2_sampling.py", "e2d2_sampling_api.py", "e2d2_layers.py",
            "e2d2_masks.py"} <= shipped
    assert shipped >= {f"e2d2_sampling_{p.stem}.py" for p in (Path(__file__).parents[1] / "e2d2"
                                                               / "sampling").glob("[!_]*.py")}
    # transformers copies exactly these files for the modeling module, and each of them
    # imports nothing but the standard library, torch and transformers.
    found = {Path(p).name for p in get_relative_import_files(str(out / "modeling_e2d2.py"))}
    assert found == shipped - {"modeling_e2d2.py"}
    import sys

    for name in shipped:
        third_party = set(get_imports(str(out / name))) - set(sys.stdlib_module_names)
        assert third_party <= {"torch", "transformers"}, (name, third_party)
    # The check fails on a drifted copy.
    masks = out / "e2d2_masks.py"
    masks.write_text(masks.read_text().replace("k // S <= q // S", "k // S < q // S"))
    assert _drifted(out) == ["e2d2_masks.py"]


def test_bad_input_is_refused_and_nothing_is_written(runs, tmp_path, monkeypatch):
    _, run = runs["e2d2"]
    out = _out(tmp_path, "exists")
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        export_hf(run, out)

    def failing(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_mod, "write_weights", failing)
    with pytest.raises(OSError, match="disk full"):
        export_hf(run, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    monkeypatch.undo()
    export_hf(run, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()

    # A config that does not match the tensors names what differs.
    wrong = tmp_path / "wrong_iter"
    shutil.copytree(run / "checkpoints" / "iter_0000010", wrong)
    config = wrong / "config.yaml"
    config.write_text(config.read_text().replace("num_layers: 2", "num_layers: 3"))
    with pytest.raises(UserError, match=r"missing tensors \['layers\.2\.input_norm\.weight'"):
        export_hf(wrong, _out(tmp_path, "wrong"))
    with pytest.raises(UserError, match="is neither a checkpoint"):
        export_hf(tmp_path, _out(tmp_path, "none"))
    with pytest.raises(UserError, match="max-shard-size"):
        export_hf(run, _out(tmp_path, "size"), max_shard_size="lots")


def test_transformers_copies_every_module_the_shipped_code_imports(tmp_path):
    """transformers copies a remote-code directory's modules by following the ``from .x
    import`` lines it finds with a regular expression; every relative import of every shipped
    file must be one it sees (``from . import x`` is not)."""
    from transformers.dynamic_module_utils import get_relative_imports

    from launchers.hf import remote_code

    for name, text in remote_code.generate().items():
        (tmp_path / name).write_text(text)
        imported = set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.level:
                imported |= {node.module} if node.module else {a.name for a in node.names}
        assert imported <= set(get_relative_imports(tmp_path / name)), name


@pytest.mark.parametrize("name", ["e2d2", "bd3lm_untied", "mdlm", "ar"])
def test_import_hf_of_our_export_gives_bitwise_the_run_weights(runs, tmp_path, name):
    from launchers.hf.checkpoints import TensorReader, single_process_group
    from launchers.hf.import_hf import import_hf
    from megatron_ext.checkpoint import MODEL_PREFIX

    model, run = runs[name]
    exported = export_hf(run, _out(tmp_path, name))
    ckpt = import_hf(exported, tmp_path / "imported", variant=None)
    with single_process_group():
        reader = TensorReader(ckpt, MODEL_PREFIX)
        state = reader.read(sorted(reader.shapes))
    expected = model.state_dict()
    assert sorted(state) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key
    with pytest.raises(UserError, match="the export is variant"):
        import_hf(exported, tmp_path / "other", variant="mdlm" if name != "mdlm" else "ar")


def test_export_files_are_readable_by_the_group_and_tags_are_unique(runs, tmp_path):
    _, run = runs["e2d2"]
    out = export_hf(run, _out(tmp_path, "modes"))
    umask = os.umask(0)
    os.umask(umask)
    for path in out.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name
    front = (out / "README.md").read_text().split("---")[1]
    tags = yaml.safe_load(front)["tags"]
    assert len(tags) == len(set(tags)) and "e2d2" in tags
