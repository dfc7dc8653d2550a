"""Hugging Face Qwen3 / Llama causal-LM tensor names -> reference names, declared once.

``PARAM_MAPPINGS`` is the whole name and layout mapping (as Megatron-Bridge's
``param_mappings``): one row per tensor, ``*`` standing for the layer index on both sides.
Shapes and layouts are identical on both sides (``[out, in]`` linears, rotate-half RoPE),
so no tensor is transformed. E2D2's own tensors, which no causal LM has, are initialised
from mapped ones by ``DERIVED``; ``IGNORED`` names HF tensors that hold no learned state.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from e2d2.errors import UserError
from launchers.hf.checkpoints import tensor_mismatch


@dataclass(frozen=True)
class ParamMapping:
    hf: str  # Hugging Face name; "*" is a layer index
    ours: str  # reference name (e2d2.model); "*" is the same index

    def _regex(self, pattern: str) -> re.Pattern:
        return re.compile("^" + re.escape(pattern).replace(r"\*", r"(\d+)") + "$")

    def to_ours(self, hf_name: str) -> str | None:
        match = self._regex(self.hf).match(hf_name)
        return None if match is None else self.ours.replace("*", match.group(1)) if match.groups() else self.ours

    def to_hf(self, our_name: str) -> str | None:
        match = self._regex(self.ours).match(our_name)
        return None if match is None else self.hf.replace("*", match.group(1)) if match.groups() else self.hf


PARAM_MAPPINGS: tuple[ParamMapping, ...] = (
    ParamMapping("model.embed_tokens.weight", "embed.weight"),
    ParamMapping("model.layers.*.input_layernorm.weight", "layers.*.input_norm.weight"),
    ParamMapping("model.layers.*.self_attn.q_proj.weight", "layers.*.attn.q_proj.weight"),
    ParamMapping("model.layers.*.self_attn.k_proj.weight", "layers.*.attn.k_proj.weight"),
    ParamMapping("model.layers.*.self_attn.v_proj.weight", "layers.*.attn.v_proj.weight"),
    ParamMapping("model.layers.*.self_attn.o_proj.weight", "layers.*.attn.o_proj.weight"),
    ParamMapping("model.layers.*.self_attn.q_norm.weight", "layers.*.attn.q_norm.weight"),  # Qwen3
    ParamMapping("model.layers.*.self_attn.k_norm.weight", "layers.*.attn.k_norm.weight"),  # Qwen3
    ParamMapping("model.layers.*.post_attention_layernorm.weight", "layers.*.mlp_norm.weight"),
    ParamMapping("model.layers.*.mlp.gate_proj.weight", "layers.*.mlp.gate_proj.weight"),
    ParamMapping("model.layers.*.mlp.up_proj.weight", "layers.*.mlp.up_proj.weight"),
    ParamMapping("model.layers.*.mlp.down_proj.weight", "layers.*.mlp.down_proj.weight"),
    ParamMapping("model.norm.weight", "norm.weight"),
    ParamMapping("lm_head.weight", "lm_head.weight"),
)

# E2D2 tensors initialised from a mapped one: decoder layer k copies main-stack layer
# ``source(k)`` (top or bottom layers, `import_hf`), and the encoder's output norm copies
# the causal LM's final norm, which normalised the same last hidden state.
DERIVED: tuple[tuple[str, str], ...] = (
    ("decoder_layers.*.", "layers.{source}."),
    ("encoder_norm.weight", "norm.weight"),
)

# Non-persistent buffers that old checkpoints saved: recomputed, never learned.
IGNORED: tuple[str, ...] = ("model.layers.*.self_attn.rotary_emb.inv_freq",)


def hf_to_reference(hf_names: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Map HF names through ``PARAM_MAPPINGS``: (reference name -> HF name, unmapped HF names)."""
    ignored = [ParamMapping(p, p) for p in IGNORED]
    mapped, unknown = {}, []
    for name in hf_names:
        ours = next((o for m in PARAM_MAPPINGS if (o := m.to_ours(name)) is not None), None)
        if ours is not None:
            mapped[ours] = name
        elif not any(m.to_ours(name) for m in ignored):
            unknown.append(name)
    return mapped, unknown


def expected_hf_name(our_name: str) -> str:
    """The HF tensor a reference tensor comes from (for error messages)."""
    return next((h for m in PARAM_MAPPINGS if (h := m.to_hf(our_name)) is not None), our_name)


def plan(expected: Iterable[str], hf_names: Iterable[str], source_layer: Callable[[int], int],
         where: str) -> dict[str, str]:
    """Reference name -> HF name for every ``expected`` reference tensor.

    Raises one `UserError` naming every missing and every unknown HF tensor (an unknown one
    would be silently dropped: a bias, an extra layer, a different architecture).
    """
    mapped, unknown = hf_to_reference(hf_names)
    out, missing = {}, []
    for name in expected:
        source = _derived_source(name, source_layer)
        hf = mapped.get(source)
        if hf is None:
            missing.append(expected_hf_name(source))
        else:
            out[name] = hf
    used = set(out.values())
    unknown += sorted(hf for hf in mapped.values() if hf not in used)
    problems = tensor_mismatch(missing, sorted(unknown))
    if problems:
        raise UserError(f"{where}: {problems}. import-hf reads Qwen3 and Llama causal LMs "
                        "without biases; is config.json the one of these weights?")
    return out


def _derived_source(name: str, source_layer: Callable[[int], int]) -> str:
    for ours, source in DERIVED:
        if ours.endswith("*.") and (m := re.match("^" + re.escape(ours).replace(r"\*", r"(\d+)"), name)):
            return source.format(source=source_layer(int(m.group(1)))) + name[m.end():]
        if name == ours:
            return source
    return name
