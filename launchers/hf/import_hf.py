"""``e2d2 import-hf``: a local Qwen3 / Llama causal LM, or an ``e2d2 export-hf`` export,
-> a training checkpoint.

The model config is derived from ``config.json``; the tensors are renamed by
`launchers.hf.param_mapping` and written as a dist checkpoint keyed ``model.{reference
name}`` (loadable at any TP/PP layout), with the run config as ``config.yaml`` inside
OUT, as in a run's iter directories. Start training from it with
``e2d2 pretrain CONFIG checkpoint.init=OUT``.

* ``--variant ar`` reproduces the causal LM exactly (same logits).
* E2D2 variants: the encoder takes every layer; the decoder's ``--decoder-layers N``
  copy the top (or ``--decoder-from bottom``) N layers, or, with ``--tie-decoder``
  (``e2d2_shared_kv``), are the top encoder layers themselves.
* Our own export (any variant, ``E2D2ForMaskedLM``) comes back as the model it was: the
  model config is ``config.json``'s, the tensors are copied unchanged (a float32 export
  gives bitwise the run's weights); ``--variant``, if given, must be the exported one.
* Weights are read from safetensors only. A directory with only ``pytorch_model.bin``
  is refused: unpickling runs arbitrary code. ``--allow-pickle`` loads it with
  ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from e2d2.config import VARIANTS, ModelConfig
from e2d2.errors import ConfigError, UserError
from launchers.checkpoint_dirs import CONFIG_NAME
from launchers.config import run_config_from_dict, save_run_config
from launchers.hf import param_mapping
from launchers.hf.checkpoints import save_reference_weights
from launchers.hf.export import HF_PREFIX, check_tensors, reference_shapes
from launchers.hf.staging import check_target, staged_directory

ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama"}
EXPORTED = "E2D2ForMaskedLM"  # the architecture `e2d2 export-hf` writes, with ModelConfig's fields
# config.json fields that change the computation in ways the reference model does not have.
_UNSUPPORTED = {  # field: the only value we accept (missing counts as this value)
    "attention_bias": False,
    "mlp_bias": False,
    "use_sliding_window": False,
    "hidden_act": "silu",
}


def _rope(hf: dict[str, Any], where: str) -> float:
    """RoPE base from ``rope_theta`` or ``rope_parameters`` (transformers >= 5); only the
    default (unscaled) RoPE is the reference model's."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise UserError(f"{where}: rope type {kind!r} (rope_parameters / rope_scaling) is not "
                        "supported; the reference model uses the default RoPE")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_config_from_hf(hf: dict[str, Any], where: str, variant: str, decoder_layers: int,
                         tie_decoder: bool, block_size: int, seq_length: int | None,
                         mask_token_id: int, shift: bool = False) -> ModelConfig:
    """Our ModelConfig for a Qwen3 / Llama ``config.json`` (as a dict); ``shift``: the
    DiffuLLaMA shift of an adapted AR model (docs/hf.md)."""
    archs = hf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES or hf.get("model_type") != ARCHITECTURES[archs[0]]:
        raise UserError(f"{where}: unsupported architecture {archs} (model_type "
                        f"{hf.get('model_type')!r}); import-hf reads "
                        f"{sorted([*ARCHITECTURES, EXPORTED])}")
    for field, accepted in _UNSUPPORTED.items():
        if hf.get(field, accepted) != accepted:
            raise UserError(f"{where}: {field}={hf[field]!r} is not supported (the reference "
                            f"model needs {field}={accepted!r})")
    try:
        heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
        n_layers = hf["num_hidden_layers"]
        max_len = hf.get("max_position_embeddings", 2048)
        length = seq_length or min(max_len, 2048) // block_size * block_size
        return ModelConfig(
            variant=variant,
            vocab_size=hf["vocab_size"],
            mask_token_id=mask_token_id,
            hidden_size=hidden,
            ffn_hidden_size=hf["intermediate_size"],
            num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            num_layers=n_layers,
            num_decoder_layers=decoder_layers if variant in ("e2d2", "e2d2_shared_kv") else 0,
            seq_length=length,
            block_size=block_size,
            qk_layernorm=ARCHITECTURES[archs[0]] == "qwen3",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            tie_decoder_to_encoder=tie_decoder,
            shift=shift,
            rope_theta=_rope(hf, where),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            init_std=float(hf.get("initializer_range", 0.02)),
        )
    except KeyError as exc:
        raise UserError(f"{where}: missing field {exc.args[0]!r}") from None
    except ConfigError as exc:
        raise UserError(f"{where}: {exc}") from None


def exported_model_config(hf: dict[str, Any], where: str, variant: str | None) -> ModelConfig:
    """The ModelConfig an ``e2d2 export-hf`` config.json was written from."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    missing = sorted(fields - set(hf))
    if missing:
        raise UserError(f"{where}: an {EXPORTED} config without {missing}: not written by "
                        "this version of e2d2 export-hf")
    if variant is not None and variant != hf["variant"]:
        raise UserError(f"{where}: the export is variant {hf['variant']!r}, not --variant "
                        f"{variant!r}; leave --variant out to import it as it is")
    try:
        return ModelConfig(**{name: hf[name] for name in fields})
    except ConfigError as exc:
        raise UserError(f"{where}: {exc}") from None


# ------------------------------------------------------------------ weights
class _Weights:
    """Tensor names/shapes of an HF directory without loading data; ``get(name)`` loads one."""

    def __init__(self, directory: Path, allow_pickle: bool):
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (directory / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            files = []
        if files:
            self._open_safetensors(directory, files)
            return
        bins = sorted(directory.glob("pytorch_model*.bin"))
        if not bins:
            raise UserError(f"{directory} has no model.safetensors (or index) and no "
                            "pytorch_model.bin: not a Hugging Face model directory")
        if not allow_pickle:
            raise UserError(f"{directory} holds only {', '.join(b.name for b in bins)}: pickle "
                            "files can run arbitrary code when loaded. Convert them to "
                            "safetensors first, or pass --allow-pickle to load them with "
                            "torch.load(weights_only=True)")
        self._tensors = {}
        for b in bins:
            self._tensors.update(torch.load(b, map_location="cpu", weights_only=True, mmap=True))
        self.shapes = {n: tuple(t.shape) for n, t in self._tensors.items()}

    def _open_safetensors(self, directory: Path, files: list[str]) -> None:
        from safetensors import safe_open

        self._handles, self.shapes, self._tensors = {}, {}, None
        for name in files:
            if not (directory / name).is_file():
                raise UserError(f"{directory}: the index names {name}, which is missing")
            handle = safe_open(str(directory / name), "pt")
            for key in handle.keys():
                self._handles[key] = handle
                self.shapes[key] = tuple(handle.get_slice(key).get_shape())

    def get(self, name: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[name]
        return self._handles[name].get_tensor(name)


class _Converted(Mapping):
    """Reference name -> fp32 tensor, read from the HF files only when asked for, so the
    conversion holds the model being written and one source tensor, not a second copy."""

    def __init__(self, weights: _Weights, sources: dict[str, str]):
        self._weights, self._sources = weights, sources

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._weights.get(self._sources[name]).to(torch.float32)

    def __contains__(self, name: object) -> bool:  # without reading the tensor
        return name in self._sources

    def __iter__(self):
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def _tokenizer_ids(directory: Path) -> tuple[int, int | None] | None:
    """(number of ids, mask id or None) of the tokenizer in ``directory``, if it has one."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    bound = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    config = directory / "tokenizer_config.json"
    mask = json.loads(config.read_text()).get("mask_token") if config.is_file() else None
    if isinstance(mask, dict):
        mask = mask.get("content")
    return bound, None if mask is None else tok.token_to_id(mask)


def _mask_token_id(directory: Path, vocab_size: int, variant: str, requested: int | None) -> int:
    tokenizer = _tokenizer_ids(directory)
    if tokenizer is not None and tokenizer[0] > vocab_size:
        raise UserError(f"{directory}: the tokenizer has ids up to {tokenizer[0] - 1} but "
                        f"config.json vocab_size is {vocab_size}: they do not belong together")
    if requested is not None:
        return requested
    if tokenizer is not None and tokenizer[1] is not None:
        return tokenizer[1]
    if tokenizer is not None and tokenizer[0] < vocab_size:
        return tokenizer[0]  # the first embedding row no token uses
    if variant == "ar":
        return vocab_size - 1  # never used by the AR objective
    raise UserError(f"{directory}: no mask token found (no tokenizer, or one that has no "
                    "mask_token and fills the vocabulary); pass --mask-token-id ID")


def import_hf(hf_dir: str | Path, out: str | Path, variant: str | None, decoder_layers: int = 1,
              tie_decoder: bool = False, decoder_from: str = "top", tp: int = 1, pp: int = 1,
              encoder_pipeline_stages: int | None = None, block_size: int = 4,
              seq_length: int | None = None, mask_token_id: int | None = None,
              allow_pickle: bool = False, overwrite: bool = False, shift: bool = False) -> Path:
    """Convert ``hf_dir`` into the new checkpoint directory ``out``; returns ``out``.
    ``shift`` goes into the written config (``model.shift``, adapting an AR model)."""
    from megatron_ext.layout import ParallelConfig, PipelinePlan

    hf_dir, out = Path(hf_dir), Path(out)
    check_target(out, overwrite)
    if variant is not None and variant not in VARIANTS:
        raise UserError(f"--variant {variant!r}: choose one of {VARIANTS}")
    if tie_decoder and decoder_from != "top":
        raise UserError("--tie-decoder shares the top encoder layers; it cannot take the bottom ones")
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    hf = json.loads(config_path.read_text())
    ours = hf.get("architectures") == [EXPORTED]
    if ours:
        cfg = exported_model_config(hf, str(config_path), variant)
    elif variant is None:
        raise UserError(f"{hf_dir} is a causal LM: pass --variant (one of {VARIANTS})")
    else:
        mask = _mask_token_id(hf_dir, hf.get("vocab_size", 0), variant, mask_token_id)
        cfg = model_config_from_hf(hf, str(config_path), variant, decoder_layers, tie_decoder,
                                   block_size, seq_length, mask, shift)
    if pp > 1 and cfg.variant == "e2d2" and encoder_pipeline_stages is None:
        encoder_pipeline_stages = pp - 1
    parallel = {"tensor_parallel": tp, "pipeline_parallel": pp,
                "encoder_pipeline_stages": encoder_pipeline_stages}
    try:
        PipelinePlan(cfg, ParallelConfig(world_size=tp * pp, **parallel))
    except ConfigError as exc:
        raise UserError(f"--tp {tp} --pp {pp}: {exc}") from None

    weights = _Weights(hf_dir, allow_pickle)
    names = dict(weights.shapes)
    shapes = reference_shapes(cfg)
    if ours:
        sources = {name: HF_PREFIX + name for name in shapes}
        check_tensors({HF_PREFIX + n: s for n, s in shapes.items()}, names, str(hf_dir))
    else:
        sources = _causal_lm_sources(cfg, weights, names, decoder_from, hf_dir, shapes)
    state = _Converted(weights, sources)
    run_config = run_config_from_dict({"model": dataclasses.asdict(cfg), "parallel": parallel},
                                      str(hf_dir))
    with staged_directory(out, overwrite) as stage:
        save_reference_weights(state, cfg, stage)
        save_run_config(run_config, stage / CONFIG_NAME)
    return out


def _causal_lm_sources(cfg: ModelConfig, weights: _Weights, names: dict[str, tuple[int, ...]],
                       decoder_from: str, hf_dir: Path,
                       shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Reference name -> the causal LM's tensor name (`launchers.hf.param_mapping`)."""
    if cfg.tie_word_embeddings and "lm_head.weight" in names:
        # Some tied checkpoints store the head anyway; it must be the embedding itself.
        if not torch.equal(weights.get("lm_head.weight"), weights.get("model.embed_tokens.weight")):
            raise UserError(f"{hf_dir}: tie_word_embeddings is true but lm_head.weight differs "
                            "from model.embed_tokens.weight")
        del names["lm_head.weight"]

    def source_layer(j: int) -> int:
        return cfg.num_layers - cfg.num_decoder_layers + j if decoder_from == "top" else j

    sources = param_mapping.plan(shapes, names, source_layer, str(hf_dir))
    check_tensors(shapes, {ours: names[hf] for ours, hf in sources.items()}, str(hf_dir))
    return sources
