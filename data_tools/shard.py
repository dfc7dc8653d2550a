"""Tokenize one shard of the inputs into a megatron-core indexed dataset.

Chunks of documents are encoded in one ``encode_batch`` call each and appended through
megatron-core's ``IndexedDatasetBuilder`` (see ``data_tools.indexed``).

A shard is a contiguous run of the (sorted) input records (see ``data_tools.split``), so
concatenating the shards in order gives exactly the single-process output. Each shard is
written as ``shard-IIIII-of-NNNNN.{bin,idx}`` plus a ``.json`` record (counts, skip
positions, the inputs' first look, the sources it began), all under temporary names first;
the ``.json`` appears last and marks the shard complete.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from data_tools.atomic import atomic_path, temp_name
from data_tools.encode import DTYPES, ChunkEncoder, choose_dtype, run_in_order
from data_tools.indexed import IndexedWriter
from data_tools.sources import Piece, Source, check_text_key
from data_tools.work import TaskRunner, make_tasks
from e2d2.errors import ConfigError


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
    split_seed: int = 0  # keys the hash that picks the validation documents (data_tools.merge)
    valid_inputs: list[str] | None = None  # a separate validation set: all of inputs train
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
        given = [flag for flag, value in (("--valid-docs", self.valid_docs),
                                          ("--valid-fraction", self.valid_fraction),
                                          ("--valid-input", self.valid_inputs)) if value]
        if len(given) > 1:
            raise ConfigError(f"give one of {', '.join(given)}, not several")
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
        if self.valid_inputs:
            command += ["--valid-input", *map(str, self.valid_inputs)]
        options = (
            ("--text-key", self.text_key, "text"),
            ("--workers", self.workers, 1),
            ("--valid-docs", self.valid_docs, None),
            ("--valid-fraction", self.valid_fraction, None),
            ("--dtype", self.dtype, "auto"),
            ("--num-shards", self.num_shards, 1),
            ("--shard-index", self.shard_index, 0),
            ("--split-seed", self.split_seed, 0),
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
        """How merge holds out validation documents, chosen by a hash keyed by ``seed``;
        default: 1% (at least one document). With ``valid_inputs`` they are those inputs'."""
        if self.valid_inputs:
            return {"valid_inputs": [str(path) for path in self.valid_inputs]}
        if self.valid_docs is not None:
            return {"valid_docs": self.valid_docs, "seed": self.split_seed}
        return {"valid_fraction": 0.01 if self.valid_fraction is None else self.valid_fraction,
                "seed": self.split_seed}


def shard_prefix(shards_dir: Path, index: int, count: int) -> Path:
    return Path(shards_dir) / f"shard-{index:05d}-of-{count:05d}"


def write_shard(
    config: PreprocessConfig, sources: list[Source], pieces: list[Piece], tokenizer, prefix: Path
) -> dict:
    """Tokenize ``pieces`` (this shard's part of ``sources``) into ``prefix.{bin,idx,json}``;
    return the shard record."""
    dtype = choose_dtype(tokenizer.id_bound, config.dtype)
    for piece in pieces:  # fail before any work: every file this shard begins is checked
        if piece.start == 0:
            check_text_key(piece, config.text_key, config.skip_bad_records)
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    tmp_bin, tmp_idx = temp_name(bin_path), temp_name(idx_path)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    desc = f"shard {config.shard_index + 1}/{config.num_shards}"
    bar = tqdm(total=sum(p.end - p.start for p in pieces), unit="B", unit_scale=True, desc=desc)
    runner = TaskRunner(ChunkEncoder(tokenizer, dtype), config.text_key, config.skip_bad_records)
    tasks = make_tasks(pieces, config.workers, runner, bar.update)
    writer = IndexedWriter(tmp_bin, dtype)
    documents, events = 0, defaultdict(list)
    start = time.perf_counter()
    try:
        for encoded in run_in_order(runner, tasks, config.workers):
            writer.add_documents(encoded.flat, encoded.lengths)
            for reason, positions in encoded.events.items():
                events[reason] += [documents + p for p in positions]
            documents += len(encoded.lengths)
            bar.update(encoded.input_bytes)
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(
                f"{documents / elapsed:,.0f} docs/s, {writer.tokens / elapsed:,.0f} tok/s",
                refresh=False,
            )
        described = [p.source.describe() for p in pieces if p.start == 0]
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
    record = {
        "shard_index": config.shard_index,
        "num_shards": config.num_shards,
        "documents": documents,
        "tokens": writer.tokens,
        "events": dict(events),
        "dtype": dtype.__name__,
        "tokenizer": tokenizer.identity,
        "split": config.split,
        # what every shard planned its part from: merge checks that all saw the same inputs
        "inputs": [source.first_look() for source in sources],
        "sources": described,  # each source described by one shard, the one reading its start
        "command": config.command,
    }
    with atomic_path(f"{prefix}.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    return record
