"""``e2d2 export-hf``: a training checkpoint -> a Hugging Face model directory.

One process reads the checkpoint shard by shard (a shard's tensors at a time, never the
whole model) and streams them into safetensors files, so peak memory is about the largest
shard. The directory holds:

* ``config.json``: the reference ``ModelConfig`` fields, ``auto_map`` for AutoConfig,
  AutoModel and AutoModelForMaskedLM, token ids;
* the Python files of `launchers.hf.remote_code` (generated from ``e2d2/``);
* ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` with
  ``model.safetensors.index.json`` above ``--max-shard-size``; tensors are named
  ``model.{reference name}``;
* the run's tokenizer (found as ``e2d2 sample`` finds it) or ``--tokenizer``;
* ``generation_config.json``: the run's sampler settings, every `SamplerConfig` field;
* ``README.md``: the model card.

Everything is written into a hidden sibling directory that is renamed to OUT at the end.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from e2d2.config import ModelConfig, SamplerConfig
from e2d2.errors import UserError
from e2d2.model import DiffusionLM
from launchers.checkpoint_dirs import TrainedCheckpoint, locate
from launchers.hf import model_card, remote_code
from launchers.hf.checkpoints import TensorReader, single_process_group, tensor_mismatch
from launchers.hf.staging import check_target, staged_directory
from megatron_ext.checkpoint import EMA_PREFIX, MODEL_PREFIX

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
HF_PREFIX = "model."  # E2D2ForMaskedLM keeps the reference model as ``self.model``
AUTO_MAP = {
    "AutoConfig": "configuration_e2d2.E2D2Config",
    "AutoModel": "modeling_e2d2.E2D2ForMaskedLM",
    "AutoModelForMaskedLM": "modeling_e2d2.E2D2ForMaskedLM",
}
# generation_config.json carries every sampler setting of the run: the exported generate()
# then samples as `e2d2 sample` does with the same run.
GENERATION_FIELDS = tuple(f.name for f in dataclasses.fields(SamplerConfig))


def reference_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every reference tensor's name and shape, in the model's order (built on meta: free)."""
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in DiffusionLM(cfg).state_dict().items()}


def check_tensors(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]],
                  where: str) -> None:
    """One error naming missing, unknown and mis-shaped tensors (``found`` vs ``expected``)."""
    missing = [n for n in expected if n not in found]
    unknown = [n for n in found if n not in expected]
    wrong = [f"{n}: {found[n]} vs expected {expected[n]}" for n in expected
             if n in found and tuple(found[n]) != tuple(expected[n])]
    problems = tensor_mismatch(missing, unknown, wrong)
    if problems:
        raise UserError(f"{where} does not match the model config: {problems}. Is the config "
                        "the one these weights were trained with?")


def _sampler_defaults(ckpt: TrainedCheckpoint) -> dict[str, Any]:
    values = {name: getattr(ckpt.config.sampler, name) for name in GENERATION_FIELDS}
    return {**values, "stop_strings": list(values["stop_strings"])}


def _data_dir(ckpt: TrainedCheckpoint) -> Path | None:
    """The run's (first) data directory: every directory of a blend shares the tokenizer."""
    paths = ckpt.config.data.paths
    return Path(paths[0]) if paths else None


def _tokenizer(ckpt: TrainedCheckpoint, override: str | None):
    """``--tokenizer DIR``, else the run's tokenizer (as ``e2d2 sample`` finds it), else None."""
    from data_tools.tokenizer import load_tokenizer
    from launchers.sample import run_tokenizer

    if override is not None:
        return load_tokenizer(override)
    try:
        return run_tokenizer(ckpt.config, ckpt.directory)
    except UserError:
        return None


def _token_ids(tok, cfg: ModelConfig) -> dict[str, int]:
    """The tokenizer's special ids, after checking that it is this model's."""
    if tok.id_bound > cfg.vocab_size:
        raise UserError(f"tokenizer {tok.name!r} has ids up to {tok.id_bound - 1}, but the model's "
                        f"vocab_size is {cfg.vocab_size}: it is not this model's tokenizer")
    if cfg.is_diffusion and tok.mask_id != cfg.mask_token_id:
        raise UserError(f"tokenizer {tok.name!r} has mask id {tok.mask_id}, but the model's "
                        f"mask_token_id is {cfg.mask_token_id}: it is not this model's tokenizer")
    return {"eos_token_id": tok.eod, "bos_token_id": tok.bos, "pad_token_id": tok.pad}


def _plan_shards(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, max_shard_size: str):
    from huggingface_hub import split_torch_state_dict_into_shards

    meta = {HF_PREFIX + n: torch.empty(s, dtype=dtype, device="meta") for n, s in shapes.items()}
    try:
        return split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size)
    except ValueError as exc:
        raise UserError(f"--max-shard-size {max_shard_size!r}: {exc} (e.g. 5GB, 500MB)") from None


def write_weights(reader: TensorReader, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                  max_shard_size: str, out: Path) -> int:
    """Stream the reader's tensors into safetensors shards in ``out``; returns the bytes written.
    Only one shard's tensors are in memory at a time."""
    from safetensors.torch import save_file

    split = _plan_shards(shapes, dtype, max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        names = [k[len(HF_PREFIX):] for k in keys]
        loaded = reader.read(names)
        shard = {HF_PREFIX + n: loaded.pop(n).to(dtype).contiguous() for n in names}
        save_file(shard, str(out / filename), metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return int(split.metadata["total_size"])


def _config_json(cfg: ModelConfig, dtype: str, token_ids: dict[str, int]) -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "model_type": "e2d2",
        "architectures": ["E2D2ForMaskedLM"],
        "auto_map": AUTO_MAP,
        **dataclasses.asdict(cfg),
        **token_ids,
        "dtype": dtype,
        "transformers_version": version("transformers"),
    }


def export_hf(source: str | Path, out: str | Path, max_shard_size: str = "5GB",
              dtype: str = "float32", ema: bool = False, overwrite: bool = False,
              tokenizer: str | None = None) -> Path:
    """Export the checkpoint at ``source`` (run or iter directory) to the new directory ``out``."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    out = Path(out)
    check_target(out, overwrite)
    ckpt = locate(source)
    cfg = ckpt.config.model
    tok = _tokenizer(ckpt, tokenizer)
    token_ids = _token_ids(tok, cfg) if tok is not None else {}
    generation = _sampler_defaults(ckpt)
    if generation["eos_token_id"] is None and "eos_token_id" in token_ids:
        generation["eos_token_id"] = token_ids["eos_token_id"]
    shapes = reference_shapes(cfg)
    prefix = EMA_PREFIX if ema else MODEL_PREFIX
    with single_process_group():
        reader = TensorReader(ckpt.directory, prefix)
        if ema and not reader.shapes:
            raise UserError(f"{ckpt.directory} has no EMA weights (ema.* tensors): the run did "
                            "not keep an EMA; export without --ema")
        check_tensors(shapes, {n: s for n, (s, _) in reader.shapes.items()},
                      f"checkpoint {ckpt.directory} ({prefix}* tensors)")
        with staged_directory(out, overwrite) as stage:
            write_weights(reader, shapes, DTYPES[dtype], max_shard_size, stage)
            remote_code.write(stage)
            config = _config_json(cfg, dtype, token_ids)
            (stage / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            # generate() ignores do_sample; True keeps transformers from warning that the
            # temperature is unused (it is used: 0 means greedy).
            generation_config = {**generation, "do_sample": True}
            (stage / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
            if tok is not None:
                tok.save(stage)  # tokenizer.json + tokenizer_config.json (AutoTokenizer)
            card = model_card.render(
                cfg, sum(torch.Size(s).numel() for s in shapes.values()), dtype,
                ckpt.config.to_dict(), generation, model_card.final_metrics(ckpt.run_dir),
                model_card.data_summary(_data_dir(ckpt)), str(source))
            (stage / "README.md").write_text(card)
    return out
