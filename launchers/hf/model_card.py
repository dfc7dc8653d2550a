"""``README.md`` of an exported model: what it is, how it was trained, how to use it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from e2d2.config import ModelConfig

_VARIANT_NAMES = {
    "e2d2": "E2D2 encoder-decoder block diffusion (last-hidden decoder)",
    "e2d2_shared_kv": "E2D2 encoder-decoder block diffusion (shared-KV decoder)",
    "bd3lm": "BD3-LM block diffusion",
    "mdlm": "MDLM masked diffusion",
    "ar": "autoregressive baseline",
}


def final_metrics(run_dir: Path | None) -> dict[str, Any]:
    """The last training and evaluation records of the run's ``metrics.jsonl`` (may be empty)."""
    from launchers.metrics import read_metrics

    records = [] if run_dir is None else read_metrics(run_dir)
    train = next((r for r in reversed(records) if "loss" in r), None)
    evaluation = next((r for r in reversed(records) if "nelbo" in r), None)
    out = {}
    if train:
        out.update(step=train.get("step"), train_loss=train.get("loss"))
    if evaluation:
        out.update(eval_step=evaluation.get("step"), nelbo=evaluation.get("nelbo"),
                   ppl=evaluation.get("ppl"))
    return out


def data_summary(data_dir: Path | None) -> dict[str, Any]:
    """Tokens and documents per split, tokenizer and sources from the data manifest."""
    manifest = None if data_dir is None else data_dir / "manifest.json"
    if manifest is None or not manifest.is_file():
        return {}
    m = json.loads(manifest.read_text())
    out = {split: {k: m[split].get(k) for k in ("documents", "tokens")}
           for split in ("train", "valid") if isinstance(m.get(split), dict)}
    tok = m.get("tokenizer") or {}
    out["tokenizer"] = {k: tok.get(k) for k in ("name", "vocab_size", "sha256")}
    out["sources"] = len(m.get("sources") or [])
    return out


def render(
    model: ModelConfig,
    num_params: int,
    dtype: str,
    run_config: dict[str, Any],
    generation: dict[str, Any],
    metrics: dict[str, Any],
    data: dict[str, Any],
    source: str,
) -> str:
    """The model card text (YAML front matter, then Markdown)."""
    tags = list(dict.fromkeys(["e2d2", "block-diffusion", model.variant]))  # once each
    front = yaml.safe_dump({"library_name": "transformers", "pipeline_tag": "fill-mask",
                            "tags": tags}, sort_keys=False)
    size = (f"{num_params / 1e6:.1f}M" if num_params >= 1e6 else f"{num_params:,}")
    decoder = (f", decoder {model.num_decoder_layers} layers"
               + (" (tied to the encoder's top layers)" if model.tie_decoder_to_encoder else "")
               if model.is_e2d2 else "")
    lines = [
        f"---\n{front}---\n",
        f"# {_VARIANT_NAMES[model.variant]} ({size} parameters)\n",
        f"Exported by `e2d2 export-hf` from `{source}`; weights in {dtype}.\n",
        "## Architecture\n",
        f"* variant `{model.variant}`: {'encoder' if model.is_e2d2 else 'stack'} "
        f"{model.num_layers} layers{decoder}",
        f"* hidden {model.hidden_size}, FFN {model.ffn_hidden_size}, heads "
        f"{model.num_attention_heads} (KV groups {model.num_query_groups}, head dim "
        f"{model.kv_channels}), QK-norm {model.qk_layernorm}",
        f"* vocabulary {model.vocab_size} (mask id {model.mask_token_id}), sequence length "
        f"{model.seq_length}, diffusion block size {model.block_size}, tied embeddings "
        f"{model.tie_word_embeddings}\n",
        "## Usage\n",
        "```python",
        "import torch",
        "from transformers import AutoModelForMaskedLM, AutoTokenizer",
        "",
        'model = AutoModelForMaskedLM.from_pretrained("PATH", trust_remote_code=True)',
        'tok = AutoTokenizer.from_pretrained("PATH", trust_remote_code=True)',
        'ids = torch.tensor([tok.encode("Hello")])',
        'out = model.generate(ids, max_new_tokens=32, strategy="topk", steps=8, temperature=0)',
        "print(tok.decode(out[0]))",
        "```\n",
        "`model(input_ids=xt, clean_input_ids=x0).logits` are the training model's logits "
        "`[batch, L, vocab]` for the noisy tokens `xt` given the clean tokens `x0`.\n",
        "## Sampler defaults (`generation_config.json`)\n",
        *(f"* `{k}`: {v}" for k, v in generation.items()),
        "",
    ]
    if metrics:
        lines += ["## Final metrics\n", *(f"* `{k}`: {v}" for k, v in metrics.items()), ""]
    if data:
        lines += ["## Data\n", "```json", json.dumps(data, indent=2), "```\n"]
    lines += ["## Training configuration\n", "```yaml",
              yaml.safe_dump(run_config, sort_keys=False).rstrip(), "```\n"]
    return "\n".join(lines)
