"""``e2d2 data train-tokenizer``: a byte-level BPE trained with HF ``tokenizers``.

It carries the four specials (``<|endoftext|>``, ``<|bos|>``, ``<|pad|>``, ``<|mask|>``, ids
0-3) and saves as ``tokenizer.json`` + ``tokenizer_config.json``, loadable by
``transformers.PreTrainedTokenizerFast`` / ``AutoTokenizer`` and by ``--tokenizer DIR``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_tools.merge import require_directory
from data_tools.sources import expand_inputs, iter_records
from data_tools.tokenizer import (
    BOS_TOKEN,
    DEFAULT_SPECIALS,
    EOD_TOKEN,
    MASK_TOKEN,
    PAD_TOKEN,
    E2D2Tokenizer,
    SpecialTokens,
)
from e2d2.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what E2D2Tokenizer.save writes
MIN_VOCAB = 256 + len(DEFAULT_SPECIALS)  # every byte plus the specials


def _texts(inputs: list[str], text_key: str, skip_bad: bool) -> Iterator[str]:
    for source in expand_inputs(inputs):
        for text, _ in iter_records(source.whole(), text_key, skip_bad):
            if text is not None:
                yield text


def train_tokenizer(
    inputs: list[str],
    output: str | Path,
    vocab_size: int,
    text_key: str = "text",
    skip_bad_records: bool = False,
    overwrite: bool = False,
) -> E2D2Tokenizer:
    """Train on ``inputs`` and save to the directory ``output``; return the tokenizer."""
    if vocab_size < MIN_VOCAB:
        raise UserError(f"--vocab-size {vocab_size}: must be at least {MIN_VOCAB} (bytes + specials)")
    output = Path(output)
    require_directory(output)
    existing = [name for name in TOKENIZER_FILES if (output / name).exists()]
    if existing and not overwrite:
        raise UserError(
            f"{output} already holds {', '.join(existing)}; pass --overwrite to replace the "
            "tokenizer or choose another --output"
        )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(DEFAULT_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte stays encodable
        show_progress=True,
    )
    bpe.train_from_iterator(_texts(inputs, text_key, skip_bad_records), trainer)
    tokenizer = E2D2Tokenizer(
        bpe, SpecialTokens(EOD_TOKEN, MASK_TOKEN, BOS_TOKEN, PAD_TOKEN), f"bpe-{vocab_size}"
    )
    _save_into(tokenizer, output)
    return tokenizer


def _save_into(tokenizer: E2D2Tokenizer, output: Path) -> None:
    """Save into ``output``, replacing only the tokenizer's own files, each atomically; any
    other file in ``output`` (e.g. the corpus it was trained on) is left alone."""
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-tokenizer-", dir=output))
    try:
        tokenizer.save(staging)
        for path in sorted(staging.iterdir()):
            os.replace(path, output / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
