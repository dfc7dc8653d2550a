"""Texts to packed token arrays; tasks run in order in this process or in a pool of workers.

Kept free of megatron imports: spawned encoder workers import this module (and
``data_tools.work``) only, and a light import keeps their start-up short (the shard writer in
the parent does the megatron I/O).
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from e2d2.errors import UserError

DTYPES = {"uint16": np.uint16, "int32": np.int32}


def choose_dtype(id_bound: int, requested: str = "auto") -> type[np.number]:
    """uint16 where every id fits (as megatron's GPTDatasetConfig assumes), else int32.

    ``id_bound`` is one past the largest token id (not the token count: ids may have gaps)."""
    if requested == "auto":
        return np.uint16 if id_bound <= np.iinfo(np.uint16).max + 1 else np.int32
    dtype = DTYPES[requested]
    if id_bound > np.iinfo(dtype).max + 1:
        raise UserError(
            f"--dtype {requested} holds ids below {np.iinfo(dtype).max + 1}, but the tokenizer "
            f"has ids up to {id_bound - 1}; use --dtype int32 or auto"
        )
    return dtype


class ChunkEncoder:
    """Encodes a list of documents into one flat array (EOD after each) and their lengths."""

    def __init__(self, tokenizer, dtype: type[np.number]) -> None:
        self.tokenizer = tokenizer
        self.dtype = dtype

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = self.tokenizer.encode_batch(texts)
        eod = self.tokenizer.eod
        flat: list[int] = []
        for doc in ids:  # list concatenation in C; one numpy conversion for the chunk
            flat += doc
            flat.append(eod)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 1
        return np.array(flat, dtype=self.dtype), lengths


_WORKER_FUNCTION: Callable | None = None


def _init_worker(function: Callable) -> None:
    # N processes each using every core through tokenizers' own threads would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _WORKER_FUNCTION
    _WORKER_FUNCTION = function


def _run_in_worker(task):
    return _WORKER_FUNCTION(task)


def _in_order(submit: Callable, result: Callable, tasks: Iterable, window: int) -> Iterator:
    """Submit tasks with at most ``window`` in flight; yield their results in input order."""
    pending: deque = deque()
    for task in tasks:
        pending.append(submit(task))
        if len(pending) >= window:
            yield result(pending.popleft())
    while pending:
        yield result(pending.popleft())


def run_in_order(function: Callable, tasks: Iterable, workers: int) -> Iterator:
    """``function(task)`` for each task, in input order whatever the worker count (so the
    output is identical). ``function`` must be picklable.

    ``workers == 1``: one thread in this process, so reading and writing (Python, holding the
    GIL) overlap with encoding (Rust, which releases it). Otherwise a pool of spawned
    processes with at most ``4 * workers`` tasks in flight (Pool.imap would read the whole
    input ahead).
    """
    if workers <= 1:
        pool = ThreadPoolExecutor(1, thread_name_prefix="e2d2-encode")
        try:
            yield from _in_order(
                lambda task: pool.submit(function, task), Future.result, tasks, window=2
            )
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return
    # spawn, not fork: forking a process that holds tokenizers' threads (or MPI) is unsafe.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(function,)) as pool:
        yield from _in_order(
            lambda task: pool.apply_async(_run_in_worker, (task,)),
            lambda async_result: async_result.get(),
            tasks,
            window=4 * workers,
        )
