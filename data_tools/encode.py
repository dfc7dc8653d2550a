"""Texts to packed token arrays, in this process or in a pool of worker processes.

Kept free of megatron imports: spawned workers import this module, and a light import keeps
their start-up short.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import chain

import numpy as np

from e2d2.errors import UserError

DTYPES = {"uint16": np.uint16, "int32": np.int32}


def choose_dtype(vocab_size: int, requested: str = "auto") -> type[np.number]:
    """uint16 where every id fits (as megatron's GPTDatasetConfig assumes), else int32."""
    if requested == "auto":
        return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    dtype = DTYPES[requested]
    if vocab_size > np.iinfo(dtype).max + 1:
        raise UserError(
            f"--dtype {requested} holds ids below {np.iinfo(dtype).max + 1}, but the tokenizer "
            f"has {vocab_size} tokens; use --dtype int32 or auto"
        )
    return dtype


class ChunkEncoder:
    """Encodes a list of documents into one flat array (EOD after each) and their lengths."""

    def __init__(self, tokenizer, dtype: type[np.number]) -> None:
        self.tokenizer = tokenizer
        self.dtype = dtype

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = self.tokenizer.encode_batch(texts)
        for doc in ids:
            doc.append(self.tokenizer.eod)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum()))
        return flat, lengths


_WORKER_ENCODER: ChunkEncoder | None = None


def _init_worker(encoder: ChunkEncoder) -> None:
    # N processes each using every core through tokenizers' own threads would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _WORKER_ENCODER
    _WORKER_ENCODER = encoder


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _WORKER_ENCODER(texts)


def encode_chunks(
    encoder: ChunkEncoder, chunks: Iterable[list[str]], workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encoded chunks in input order, whatever the worker count (so the output is identical).

    At most ``4 * workers`` chunks are in flight: Pool.imap would read the whole input ahead.
    """
    if workers <= 1:
        yield from map(encoder, chunks)
        return
    # spawn, not fork: forking a process that holds tokenizers' threads (or MPI) is unsafe.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(encoder,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
