"""Units of work for the encoders: chunks of documents, or pieces of files to read and encode.

A task is either a ``Chunk`` (documents the main process has read: a source that cannot be
split, or any source when one encoder runs beside the reader) or a ``Piece`` of a splittable
file, which the worker reads itself so that reading and JSON parsing scale with the workers.
Either way the result is an ``Encoded``: the tokens of the task's documents, EOD after each,
with the task's skip/repair events.

Kept free of megatron imports: spawned workers import this module (see ``data_tools.encode``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from data_tools.encode import ChunkEncoder
from data_tools.sources import Piece, Record, iter_records
from data_tools.split import split_piece

CHUNK_DOCS = 512  # documents per encode_batch call
CHUNK_CHARS = 1 << 20  # ... or fewer, for long documents: bounds memory in flight

Events = dict[str, list[int]]  # reason -> positions: documents kept before each event


@dataclass
class Chunk:
    texts: list[str]
    events: Events  # positions relative to the chunk's first document


@dataclass
class Encoded:
    flat: np.ndarray  # [tokens] the documents' tokens, EOD after each
    lengths: np.ndarray  # [documents] int64, EOD included
    events: Events  # positions relative to the task's first document
    input_bytes: int  # bytes the worker read (0 for a chunk: the reader counted them)


def chunk_records(records: Iterable[Record]) -> Iterator[Chunk]:
    """Records grouped into chunks of at most ``CHUNK_DOCS`` documents / ``CHUNK_CHARS``.

    An event's position is the number of documents kept before it (for a repaired document,
    its own index), which tells merge which split the event belongs to."""
    texts: list[str] = []
    events: Events = defaultdict(list)
    chars = 0
    for text, event in records:
        if event is not None:
            events[event].append(len(texts))
        if text is None:
            continue
        texts.append(text)
        chars += len(text)
        if len(texts) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
            yield Chunk(texts, dict(events))
            texts, events, chars = [], defaultdict(list), 0
    if texts or events:
        yield Chunk(texts, dict(events))


@dataclass(frozen=True)
class TaskRunner:
    """Runs one task (in a worker process or the encoding thread); picklable."""

    encoder: ChunkEncoder
    text_key: str
    skip_bad: bool

    def __call__(self, task: Chunk | Piece) -> Encoded:
        if isinstance(task, Chunk):
            return Encoded(*self.encoder(task.texts), task.events, 0)
        flats, lengths, events, documents = [], [], defaultdict(list), 0
        for chunk in chunk_records(iter_records(task, self.text_key, self.skip_bad)):
            flat, chunk_lengths = self.encoder(chunk.texts)
            flats.append(flat)
            lengths.append(chunk_lengths)
            for reason, positions in chunk.events.items():
                events[reason] += [documents + p for p in positions]
            documents += len(chunk.texts)
        return Encoded(
            np.concatenate(flats) if flats else np.empty(0, self.encoder.dtype),
            np.concatenate(lengths) if lengths else np.empty(0, np.int64),
            dict(events),
            task.end - task.start,
        )


def make_tasks(
    pieces: list[Piece], workers: int, runner: TaskRunner, advance: Callable[[int], object]
) -> Iterator[Chunk | Piece]:
    """The tasks for ``pieces``, in order. With several workers a splittable piece is cut
    into pieces for them to read; everything else is read here, in chunks."""
    for piece in pieces:
        if workers > 1 and piece.source.splittable:
            yield from split_piece(piece)
        else:
            records = iter_records(piece, runner.text_key, runner.skip_bad, advance)
            yield from chunk_records(records)
