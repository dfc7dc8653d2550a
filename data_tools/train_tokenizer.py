"""``e2d2 data train-tokenizer``: a byte-level BPE trained with HF ``tokenizers``.

It carries the four specials (``<|endoftext|>``, ``<|bos|>``, ``<|pad|>``, ``<|mask|>``, ids
0-3) and saves as ``tokenizer.json`` + ``tokenizer_config.json``, loadable by
``transformers.PreTrainedTokenizerFast`` / ``AutoTokenizer`` and by ``--tokenizer DIR``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_tools.atomic import atomic_path, remove
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

MIN_VOCAB = 256 + len(DEFAULT_SPECIALS)  # every byte plus the specials


def _texts(inputs: list[str], text_key: str, skip_bad: bool) -> Iterator[str]:
    for source in expand_inputs(inputs):
        for text, _ in iter_records(source, text_key, skip_bad):
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
    if output.exists() and not overwrite:
        raise UserError(f"{output} exists; pass --overwrite to replace it")
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
    remove(output)
    with atomic_path(output) as tmp:
        tokenizer.save(tmp)
    return tokenizer
