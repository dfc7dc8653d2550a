"""Shared by the Hugging Face tests: tiny trained-run directories in the checkpoint format,
and a Python environment that has only torch, transformers and safetensors."""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

import torch
from packaging.requirements import Requirement

from e2d2.config import ModelConfig
from e2d2.model import DiffusionLM
from launchers.checkpoint_dirs import locate
from launchers.checkpointing import RunCheckpoints
from launchers.config import run_config_from_dict, save_run_config
from launchers.hf.checkpoints import TensorReader, single_process_group
from megatron_ext.groups import megatron_layout
from megatron_ext.layout import ParallelConfig
from megatron_ext.mapping import load_reference_state, param_maps
from megatron_ext.model import build_chunks

MASK = 259  # the default ModelConfig's mask id (vocabulary 260 = bytes tokenizer)


def tiny_config(variant: str, **changes) -> ModelConfig:
    n_dec = 1 if variant in ("e2d2", "e2d2_shared_kv") else 0
    base = dict(variant=variant, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                num_query_groups=2, num_layers=2, num_decoder_layers=n_dec, seq_length=32,
                block_size=4)
    return ModelConfig(**{**base, **changes})


def save_tiny_qwen3(directory: Path, vocab_size: int = 260, intermediate_size: int = 64):
    """A randomly initialised 2-layer Qwen3 (GQA 4/2, tied embeddings), saved as an HF
    directory; returns the model."""
    import transformers

    qwen = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=intermediate_size,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        tie_word_embeddings=True))
    qwen.save_pretrained(directory)
    return qwen


def cli(*args: str) -> None:
    """Run the installed ``e2d2`` command; it must succeed."""
    e2d2 = Path(sys.executable).with_name("e2d2")
    done = subprocess.run([str(e2d2), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def trained_model(run_dir: Path, prefix: str):
    """(checkpoint, reference model) with the run's latest weights under ``prefix``
    (``megatron_ext.checkpoint.MODEL_PREFIX`` or ``EMA_PREFIX``), in eval mode."""
    ckpt = locate(run_dir)
    with single_process_group():
        reader = TensorReader(ckpt.directory, prefix)
        state = reader.read(sorted(reader.shapes))
    model = DiffusionLM(ckpt.config.model).eval()
    model.load_state_dict(state)
    return ckpt, model


def write_run(run_dir: Path, cfg: ModelConfig, state: dict[str, torch.Tensor],
              sampler: dict | None = None, ema: dict[str, torch.Tensor] | None = None,
              data_path: str | None = None, step: int = 10) -> Path:
    """A run directory as ``e2d2 pretrain`` leaves it (its own checkpoint writer, on one
    process): config.yaml, metrics.jsonl, checkpoints/latest -> iter_{step}/ with the
    weights ``state`` (and ``ema``)."""
    run_cfg = run_config_from_dict({"model": dataclasses.asdict(cfg), "sampler": sampler or {},
                                    "run": {"dir": str(run_dir)}, "data": {"path": data_path}})
    parallel = ParallelConfig(world_size=1)
    with single_process_group(), megatron_layout(parallel):
        stages = build_chunks(cfg, parallel)
        for stage in stages:
            load_reference_state(stage, state)
        ema_list = None if ema is None else [m.local_from(ema) for s in stages for m in param_maps(s)]
        RunCheckpoints(run_dir, keep=1).save(step, run_cfg, stages, None, ema_list, {"step": step})
    save_run_config(run_cfg, run_dir / "config.yaml")
    (run_dir / "metrics.jsonl").write_text(
        f'{{"step": {step}, "loss": 3.25, "lr": 0.001}}\n{{"step": {step}, "nelbo": 3.5, "ppl": 33.1}}\n')
    return run_dir


def _distributions(names: tuple[str, ...]) -> set[str]:
    """``names`` and everything they require (no extras), as installed distribution names."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional requirement whose marker applies but is not installed
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def clean_site(directory: Path, packages=("torch", "transformers", "safetensors")) -> Path:
    """A site directory of symlinks to ``packages`` and their dependencies only."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in _distributions(packages):
        dist = md.distribution(name)
        for entry in {Path(str(f)).parts[0] for f in dist.files or []}:
            source = Path(dist.locate_file(entry))
            target = directory / entry
            if entry != ".." and source.exists() and not target.exists():
                target.symlink_to(source)
    return directory


def run_clean(script: str, site: Path, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``script`` with ``python -I -S`` (no user site, no .pth files, so not the editable
    project install) and ``site`` as the only package directory, offline, from ``cwd``."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(cwd / "hf_home"), "OMP_NUM_THREADS": "1"}
    prelude = f"import sys; sys.path.append({str(site)!r})\n"
    return subprocess.run([sys.executable, "-I", "-S", "-c", prelude + script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def save_and_load_at_layouts(rank: int, root: str, cases: list, imported: str) -> dict:
    """On a gloo world of 2: save each ``(name, cfg, layout kwargs)`` case's seed-0 weights
    as run ``root/name`` with pretrain's writer at that layout, then load the ``imported``
    checkpoint (``e2d2 import-hf`` output) at TP2 and return its gathered weights."""
    from launchers.config import load_run_config
    from megatron_ext import checkpoint as engine_checkpoint
    from megatron_ext.layout import PipelinePlan
    from megatron_ext.mapping import gather_reference_state, reference_state_at_seed

    for name, cfg, kwargs in cases:
        parallel = ParallelConfig(world_size=2, **kwargs)
        plan = PipelinePlan(cfg, parallel)
        run_cfg = run_config_from_dict({"model": dataclasses.asdict(cfg), "parallel": kwargs,
                                        "run": {"dir": f"{root}/{name}"}})
        with megatron_layout(parallel, get_embedding_ranks=plan.get_embedding_ranks):
            stages = build_chunks(cfg, parallel)
            state = reference_state_at_seed(cfg, 0)
            for stage in stages:
                load_reference_state(stage, state)
            RunCheckpoints(Path(root) / name, keep=1).save(5, run_cfg, stages, None, None, {})
    cfg = load_run_config(Path(imported) / "config.yaml").model
    parallel = ParallelConfig(world_size=2, tensor_parallel=2)
    with megatron_layout(parallel):
        stages = build_chunks(cfg, parallel)
        engine_checkpoint.load(stages, imported)
        return {k: v.cpu() for k, v in gather_reference_state(stages).items()}
