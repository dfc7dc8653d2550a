"""Held-out evaluation data -> rows of ``seq_length`` tokens, under one of two conventions.

* ``packed`` (what a run's own evaluation reports): documents end to end, each followed by
  EOD, cut into ``seq_length`` windows. A preprocessed directory is read through megatron's
  GPTDataset exactly as ``e2d2 pretrain`` reads its valid split (one epoch, shuffled with the
  run's seed), so ``e2d2 eval`` on a run's own data reproduces its evaluation; raw files are
  packed in file order, the last window padded.
* ``document`` (MDLM's zero-shot evaluation): each document alone, ``[BOS] + document + [EOD]``
  cut into ``seq_length`` chunks, the last one padded; a chunk after the first starts with
  the previous chunk's last token (`document_windows`). BOS is the token that precedes every
  document in the packed training stream, EOD (GPT-2's convention, BOS = EOS). A chunk's first
  token is a clean prompt, never a target; padding is never counted.

``PATH`` is a preprocessed directory (its ``--split``) or raw ``.jsonl``/``.json``/``.txt``/
``.parquet`` files, directories or globs (compressed too), tokenized with the run's tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from e2d2.errors import UserError

CONVENTIONS = ("packed", "document")
ENCODE_BATCH = 256  # documents tokenized per call


@dataclass(frozen=True)
class EvalRows:
    """``x0``, ``attention_mask`` (1 = real), ``context_mask`` (1 = prompt): ``[n, L]``."""

    x0: torch.Tensor
    attention_mask: torch.Tensor
    context_mask: torch.Tensor

    def __len__(self) -> int:
        return self.x0.shape[0]

    def head(self, n: int | None) -> EvalRows:
        return self if n is None else EvalRows(self.x0[:n], self.attention_mask[:n], self.context_mask[:n])


def is_preprocessed(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").is_file()


def _preprocessed_prefix(path: Path, split: str) -> str:
    prefix = path / split
    if not (Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()):
        raise UserError(f"--data {path}: no {split}.bin/{split}.idx; pass --split train|valid "
                        "or re-run `e2d2 data preprocess` into it")
    return str(prefix)


def _raw_documents(path: str, tokenizer) -> Iterator[list[int]]:
    """Token ids of each document of raw files (EOD appended), in file order."""
    from data_tools.sources import expand_inputs, iter_records

    texts: list[str] = []
    for source in expand_inputs([path]):
        if source.kind == "hf":
            raise UserError(f"--data {path}: a datasets directory; preprocess it with "
                            "`e2d2 data preprocess` and pass the output directory")
        for text, _ in iter_records(source.whole(), "text", skip_bad=False):
            if text is not None:
                texts.append(text)
            if len(texts) == ENCODE_BATCH:
                yield from (ids + [tokenizer.eod] for ids in tokenizer.encode_batch(texts))
                texts = []
    yield from (ids + [tokenizer.eod] for ids in tokenizer.encode_batch(texts))


def _indexed_documents(prefix: str) -> Iterator[list[int]]:
    """The documents of an indexed dataset (each ends with the EOD preprocess wrote)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    for i in range(len(dataset)):
        yield dataset[i].tolist()


def _gpt_samples(prefix: str, tokenizer, seq_length: int, block_size: int, seed: int,
                 cache_dir: Path) -> torch.Tensor:
    """The split's samples as ``e2d2 pretrain`` builds its valid split: ``[n, L]``."""
    from data_tools.batches import DataConfig, build_gpt_datasets

    config = DataConfig((prefix,), (prefix,), seq_length=seq_length, block_size=block_size,
                        seed=seed, cache_dir=str(cache_dir))
    _, valid = build_gpt_datasets(config, tokenizer, splits=("valid",))
    if len(valid) == 0:
        return torch.zeros(0, seq_length, dtype=torch.long)
    return torch.stack([torch.as_tensor(valid[i]["tokens"]).long() for i in range(len(valid))])


def _windows(stream: list[int], L: int, pad: int) -> list[tuple[list[int], int]]:
    """``stream`` cut into disjoint ``L``-token windows: ``(padded ids, real length)``."""
    return [(stream[i:i + L] + [pad] * max(0, i + L - len(stream)), min(L, len(stream) - i))
            for i in range(0, len(stream), L)]


def document_windows(ids: list[int], L: int, start: int, pad: int) -> list[tuple[list[int], int]]:
    """One document's rows under the ``document`` convention (also lm-eval's rolling
    log-likelihood): ``[start] + ids`` in ``L``-token chunks whose first token is a clean
    prompt: ``start`` for the first, the previous chunk's last token for the others, so that
    every token of ``ids`` is a target exactly once (an AR model too, which never predicts
    position 0)."""
    tokens = [start] + list(ids)
    windows = []
    for i in range(0, max(len(tokens) - 1, 1), L - 1):
        piece = tokens[i:i + L]
        windows.append((piece + [pad] * (L - len(piece)), len(piece)))
    return windows


def _rows(windows: list[tuple[list[int], int]], prompt_first: bool, L: int) -> EvalRows:
    n = len(windows)
    x0 = torch.tensor([ids for ids, _ in windows], dtype=torch.long).view(n, L)
    real = torch.arange(L)[None] < torch.tensor([length for _, length in windows])[:, None]
    context = torch.zeros(n, L, dtype=torch.bool)
    context[:, 0] = prompt_first
    return EvalRows(x0, real, context)


def eval_rows(paths: list[str], tokenizer, *, seq_length: int, block_size: int, convention: str,
              split: str = "valid", seed: int = 0, cache_dir: Path) -> EvalRows:
    """Every evaluation row of ``paths`` in order (module docstring)."""
    if convention not in CONVENTIONS:
        raise UserError(f"--convention {convention!r}: choose one of {', '.join(CONVENTIONS)}")
    L, pad = seq_length, tokenizer.pad
    parts: list[EvalRows] = []
    for item in paths:
        path = Path(item)
        preprocessed = is_preprocessed(path)
        if preprocessed and convention == "packed":
            x0 = _gpt_samples(_preprocessed_prefix(path, split), tokenizer, L, block_size, seed,
                              cache_dir)
            ones = torch.ones_like(x0, dtype=torch.bool)
            parts.append(EvalRows(x0, ones, torch.zeros_like(ones)))
            continue
        documents = (_indexed_documents(_preprocessed_prefix(path, split)) if preprocessed
                     else _raw_documents(item, tokenizer))
        if convention == "packed":
            windows = _windows([t for doc in documents for t in doc], L, pad)
        else:
            windows = [w for doc in documents for w in document_windows(doc, L, tokenizer.eod, pad)]
        if windows:
            parts.append(_rows(windows, convention == "document", L))
    if not parts or sum(len(p) for p in parts) == 0:
        raise UserError(f"--data {' '.join(paths)}: no evaluation sequence (no documents in the "
                        f"{split} split or the files)")
    return EvalRows(*(torch.cat([getattr(p, f) for p in parts])
                      for f in ("x0", "attention_mask", "context_mask")))
