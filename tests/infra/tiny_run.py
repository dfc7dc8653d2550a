"""A tiny real pretraining setup for launch tests: a bytes-tokenized corpus written by
``e2d2 data preprocess`` and a config small enough for seconds per step on 2 cores."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from data_tools.corpus import iter_documents
from launchers.cli import main as e2d2_main

TINY = {
    "model": {"variant": "e2d2", "vocab_size": 260, "mask_token_id": 259, "hidden_size": 32,
              "ffn_hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
              "num_layers": 2, "num_decoder_layers": 1, "seq_length": 48, "block_size": 4},
    "train": {"steps": 4, "batch_size": 4, "lr": 3.0e-3, "warmup_steps": 1, "eval_every": 100,
              "eval_batches": 1, "eval_draws": 1},
    "checkpoint": {"interval": 2, "keep": 2},
    "log": {"interval": 1, "tensorboard": False},
}


def make_data_dir(root: Path, documents: int = 200) -> Path:
    corpus = root / "kjv.jsonl"
    with open(corpus, "w") as f:
        for _, text in zip(range(documents), iter_documents("kjv"), strict=False):
            f.write(json.dumps({"text": text}) + "\n")
    out = root / "data"
    assert e2d2_main(["data", "preprocess", "--input", str(corpus), "--tokenizer", "bytes",
                      "--output", str(out), "--valid-docs", "20"]) == 0
    return out


def write_config(path: Path, data: Path, **sections) -> Path:
    cfg = {name: dict(values) for name, values in TINY.items()}
    cfg["data"] = {"path": str(data)}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path
