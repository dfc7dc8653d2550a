"""Tokenize one shard of the inputs into a megatron-core indexed dataset.

Chunks of documents are encoded in one ``encode_batch`` call each and appended through
megatron-core's ``IndexedDatasetBuilder`` (see ``data_tools.indexed``).

A shard is a contiguous run of the (sorted) input sources, so concatenating the shards in
order gives exactly the single-process output. Each shard is written as
``shard-IIIII-of-NNNNN.{bin,idx}`` plus a ``.json`` record (counts, skip positions, sources),
all under temporary names first; the ``.json`` appears last and marks the shard complete.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from data_tools.atomic import atomic_path, temp_name
from data_tools.encode import DTYPES, ChunkEncoder, choose_dtype, encode_chunks
from data_tools.indexed import IndexedWriter
from data_tools.sources import Source, iter_records
from e2d2.errors import ConfigError

CHUNK_DOCS = 512  # documents per unit of work sent to a worker
CHUNK_CHARS = 1 << 20  # ... or fewer, for long documents: bounds memory in flight


@dataclass(frozen=True)
class PreprocessConfig:
    """What ``e2d2 data preprocess`` was asked to do; validated at construction."""

    inputs: list[str]
    tokenizer: str
    output: Path
    text_key: str = "text"
    workers: int = 1
    valid_docs: int | None = None
    valid_fraction: float | None = None
    skip_bad_records: bool = False
    overwrite: bool = False
    dtype: str = "auto"
    num_shards: int = 1
    shard_index: int = 0
    # Recorded in the manifest. Default: the equivalent ``e2d2 data preprocess`` command line,
    # built from these fields (not sys.argv, which is the caller's when run in-process).
    command: list[str] | None = None

    def __post_init__(self) -> None:
        if self.command is None:
            object.__setattr__(self, "command", self.command_line())
        if not self.inputs:
            raise ConfigError("--input: give at least one file, glob or directory")
        if not self.text_key:
            raise ConfigError("--text-key must not be empty")
        if self.workers < 1:
            raise ConfigError(f"--workers {self.workers}: must be at least 1")
        if self.valid_docs is not None and self.valid_fraction is not None:
            raise ConfigError("give --valid-docs or --valid-fraction, not both")
        if self.valid_docs is not None and self.valid_docs < 1:
            raise ConfigError(
                f"--valid-docs {self.valid_docs}: must be 1 or more (the valid split cannot be "
                "empty); hold out at least one document"
            )
        if self.valid_fraction is not None and not 0 < self.valid_fraction < 1:
            raise ConfigError(
                f"--valid-fraction {self.valid_fraction}: must be in (0, 1) (the valid split "
                "cannot be empty); give e.g. 0.01"
            )
        if self.dtype not in ("auto", *DTYPES):
            raise ConfigError(f"--dtype {self.dtype}: choose auto, {', '.join(DTYPES)}")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(
                f"--shard-index {self.shard_index} --num-shards {self.num_shards}: need "
                "0 <= shard-index < num-shards"
            )

    def command_line(self) -> list[str]:
        """The ``e2d2 data preprocess`` arguments that give this config."""
        command = ["e2d2", "data", "preprocess", "--input", *map(str, self.inputs),
                   "--tokenizer", str(self.tokenizer), "--output", str(self.output)]
        options = (
            ("--text-key", self.text_key, "text"),
            ("--workers", self.workers, 1),
            ("--valid-docs", self.valid_docs, None),
            ("--valid-fraction", self.valid_fraction, None),
            ("--dtype", self.dtype, "auto"),
            ("--num-shards", self.num_shards, 1),
            ("--shard-index", self.shard_index, 0),
        )
        command += [str(a) for flag, value, default in options if value != default
                    for a in (flag, value)]
        if self.skip_bad_records:
            command.append("--skip-bad-records")
        if self.overwrite:
            command.append("--overwrite")
        return command

    @property
    def split(self) -> dict:
        """How merge holds out validation documents; default: 1% (at least one document)."""
        if self.valid_docs is not None:
            return {"valid_docs": self.valid_docs}
        return {"valid_fraction": 0.01 if self.valid_fraction is None else self.valid_fraction}


def shard_prefix(shards_dir: Path, index: int, count: int) -> Path:
    return Path(shards_dir) / f"shard-{index:05d}-of-{count:05d}"


def assign_sources(sources: list[Source], num_shards: int, index: int) -> list[Source]:
    """Shard ``index``'s contiguous run of sources, balanced by bytes (a source is never split)."""
    total = sum(s.size for s in sources) or 1
    mine, before = [], 0
    for source in sources:
        # A source belongs to the shard that holds its midpoint: monotone, hence contiguous.
        owner = min(num_shards - 1, int((before + source.size / 2) * num_shards / total))
        if owner == index:
            mine.append(source)
        before += source.size
    return mine


class _Chunker:
    """Reads records into chunks of texts, noting where each skip or repair happened.

    An event's position is the number of documents kept before it (for a repaired
    document, its own index), which tells merge which split the event belongs to.
    """

    def __init__(self, sources: list[Source], config: PreprocessConfig, bar: tqdm) -> None:
        self.sources = sources
        self.config = config
        self.bar = bar
        self.documents = 0
        self.events: dict[str, list[int]] = defaultdict(list)

    def __iter__(self) -> Iterator[list[str]]:
        texts: list[str] = []
        chars = 0
        for source in self.sources:
            records = iter_records(
                source, self.config.text_key, self.config.skip_bad_records, self.bar.update
            )
            for text, event in records:
                if event is not None:
                    self.events[event].append(self.documents)
                if text is None:
                    continue
                self.documents += 1
                texts.append(text)
                chars += len(text)
                if len(texts) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
                    yield texts
                    texts, chars = [], 0
        if texts:
            yield texts


def write_shard(
    config: PreprocessConfig, sources: list[Source], tokenizer, prefix: Path
) -> dict:
    """Tokenize ``sources`` into ``prefix.{bin,idx,json}``; return the shard record."""
    dtype = choose_dtype(tokenizer.id_bound, config.dtype)
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    tmp_bin, tmp_idx = temp_name(bin_path), temp_name(idx_path)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    desc = f"shard {config.shard_index + 1}/{config.num_shards}"
    bar = tqdm(total=sum(s.size for s in sources), unit="B", unit_scale=True, desc=desc)
    chunker = _Chunker(sources, config, bar)
    writer = IndexedWriter(tmp_bin, dtype)
    start = time.perf_counter()
    try:
        encoder = ChunkEncoder(tokenizer, dtype)
        for flat, lengths in encode_chunks(encoder, chunker, config.workers):
            writer.add_documents(flat, lengths)
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(
                f"{chunker.documents / elapsed:,.0f} docs/s, {writer.tokens / elapsed:,.0f} tok/s",
                refresh=False,
            )
        writer.finalize(tmp_idx)
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    except BaseException:
        writer.close()
        for path in (tmp_bin, tmp_idx):
            path.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    tokens = writer.tokens
    record = {
        "shard_index": config.shard_index,
        "num_shards": config.num_shards,
        "documents": chunker.documents,
        "tokens": tokens,
        "events": dict(chunker.events),
        "dtype": dtype.__name__,
        "tokenizer": tokenizer.identity,
        "split": config.split,
        "sources": [s.describe() for s in sources],
        "command": config.command,
    }
    with atomic_path(f"{prefix}.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    return record
