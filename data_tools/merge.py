"""Join tokenized shards, in order, into ``train`` and ``valid`` indexed datasets + manifest.

The validation split is chosen here, where the total is known: the ``n`` documents with the
smallest seeded hash of their tokens (``document_keys``; ``n`` from ``--valid-docs`` or
``--valid-fraction``). A document's hash depends on its tokens and the seed alone, so the
choice is the same for any worker or shard count, draws from every part of a corpus made of
concatenated sources (not only from its last source, as the last documents would), and puts
exact duplicates on one side. Each split keeps the corpus order. Documents are appended in
runs read straight from the shards' ``.bin`` through megatron-core's
``IndexedDatasetBuilder`` (see ``data_tools.indexed``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import Counter
from importlib import metadata
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_tools.atomic import remove, temp_name
from data_tools.indexed import IndexedWriter, read_index
from data_tools.sources import SKIP_REASONS
from data_tools.tokenizer import load_tokenizer
from data_tools.verify import SPLITS, split_record
from e2d2.errors import UserError

OUTPUTS = ("train.bin", "train.idx", "valid.bin", "valid.idx", "manifest.json", "tokenizer")
SHARDS_DIR = "shards"
VALID_SHARDS = "valid"  # under the shards directory: the shard of --valid-input
_SHARD_NAME = re.compile(r"shard-(\d{5})-of-(\d{5})\.json")


def require_directory(output: Path) -> None:
    """Fail clearly if ``output`` (or the nearest existing parent) is not a directory."""
    for path in (Path(output), *Path(output).parents):
        if path.exists():
            if not path.is_dir():
                raise UserError(
                    f"--output {output}: {path} is a file, not a directory; choose a directory"
                )
            return


def check_output_free(output: Path, overwrite: bool) -> None:
    """Refuse to replace an earlier result unless ``--overwrite`` was given."""
    require_directory(output)
    existing = [name for name in OUTPUTS if (Path(output) / name).exists()]
    if existing and not overwrite:
        raise UserError(
            f"{output} already holds {', '.join(existing)}; pass --overwrite to replace it "
            "or choose another --output"
        )


def read_shards(shards_dir: Path) -> list[tuple[Path, dict]]:
    """The complete shard records of ``shards_dir``, in order, checked to belong together."""
    found = {}
    for path in Path(shards_dir).glob("shard-*-of-*.json"):
        match = _SHARD_NAME.fullmatch(path.name)
        if match:
            found[(int(match[1]), int(match[2]))] = path
    if not found:
        raise UserError(f"no shards in {shards_dir}; run `e2d2 data preprocess` first")
    counts = {count for _, count in found}
    if len(counts) != 1:
        raise UserError(f"{shards_dir} mixes shard counts {sorted(counts)}; remove stale shards")
    count = counts.pop()
    missing = [i for i in range(count) if (i, count) not in found]
    if missing:
        raise UserError(
            f"{shards_dir}: shards {missing} of {count} are missing or incomplete; run "
            f"`e2d2 data preprocess ... --num-shards {count} --shard-index I` for each"
        )
    shards = []
    for index in range(count):
        path = found[(index, count)]
        shards.append((path.with_suffix(""), json.loads(path.read_text())))
    first = shards[0][1]
    for prefix, record in shards[1:]:
        _check_same_inputs(first["inputs"], prefix, record["inputs"])
        for key in ("tokenizer", "dtype", "split"):
            if record[key] != first[key]:
                raise UserError(
                    f"{prefix}: its {key} differs from shard 0's; re-run preprocess for all "
                    "shards with the same options"
                )
    return shards


def _check_same_inputs(first: list, prefix: Path, inputs: list) -> None:
    """Shards split the inputs by their sizes: all must have seen the same files, unchanged."""
    if inputs == first:
        return
    seen = {path: (size, mtime) for path, size, mtime in inputs}
    for path, size, mtime in first:
        now = seen.get(path)
        if now != (size, mtime):
            change = "does not see it" if now is None else f"saw {now[0]:,} bytes, mtime {now[1]}"
            raise UserError(
                f"{path}: shard 0 saw {size:,} bytes, mtime {mtime} (ns), but {prefix} "
                f"{change}: the input changed between the shards' runs. Re-run every shard "
                "on inputs that no longer change"
            )
    raise UserError(
        f"{prefix} read other input files than shard 0; re-run every shard with the same --input"
    )


def valid_count(split: dict, documents: int) -> int:
    """How many documents are held out for validation (of ``documents`` > 0)."""
    if "valid_docs" in split:
        n_valid = split["valid_docs"]
    else:
        fraction = split["valid_fraction"]
        n_valid = max(1, round(fraction * documents)) if fraction > 0 else 0
    if n_valid < 1:
        raise UserError(
            f"the split {split} holds out no validation documents; hold out at least one "
            "(--valid-docs 1 or more, or --valid-fraction above 0)"
        )
    if n_valid >= documents:
        raise UserError(
            f"the corpus has {documents} documents, too few to hold out {n_valid} for "
            "validation and keep some for training; lower --valid-docs / --valid-fraction"
        )
    return n_valid


def _documents(prefix: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(tokens, starts, lengths)`` of a shard's documents (tokens memory-mapped)."""
    dtype, lengths, _ = read_index(f"{prefix}.idx")
    lengths = lengths.astype(np.int64)
    tokens = np.memmap(f"{prefix}.bin", dtype=dtype, mode="r", shape=(int(lengths.sum()),))
    return tokens, np.cumsum(lengths) - lengths, lengths


def document_keys(shards, seed: int) -> np.ndarray:
    """``[documents]`` uint64: each document's BLAKE2b hash (keyed by ``seed``) of its tokens
    as little-endian int64, whatever the dtype on disk."""
    key = int(seed).to_bytes(8, "little", signed=True)
    keys = []
    for prefix, record in shards:
        if record["documents"] == 0:
            continue
        tokens, starts, lengths = _documents(prefix)
        for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
            data = np.asarray(tokens[start:start + length], dtype="<i8").tobytes()
            keys.append(int.from_bytes(hashlib.blake2b(data, digest_size=8, key=key).digest(),
                                       "little"))
    return np.asarray(keys, dtype=np.uint64)


def valid_mask(split: dict, keys: np.ndarray) -> np.ndarray:
    """``[documents]`` bool: the ``valid_count`` documents of smallest key (ties: the earlier
    document) are held out."""
    n_valid = valid_count(split, len(keys))
    order = np.lexsort((np.arange(len(keys)), keys))
    mask = np.zeros(len(keys), dtype=bool)
    mask[order[:n_valid]] = True
    return mask


def _split_of_events(groups) -> dict[str, dict[str, Counter]]:
    """Count skip/repair events per split: an event at position k (before document k) counts
    for the split of document k (of the last document when none follows)."""
    counts = {split: Counter() for split in SPLITS}
    for shards, mask in groups:
        offset = 0
        for _, record in shards:
            for reason, positions in record["events"].items():
                where = np.minimum(np.asarray(positions, dtype=np.int64) + offset, len(mask) - 1)
                in_valid = int(np.count_nonzero(mask[where]))
                counts["valid"][reason] += in_valid
                counts["train"][reason] += len(positions) - in_valid
            offset += record["documents"]
    return counts


def _copy_documents(groups, prefixes: dict[str, Path], dtype) -> None:
    """Append the documents of each group's shards to train or valid (the group's mask), in
    runs read straight from each shard's ``.bin``."""
    writers = {s: IndexedWriter(f"{prefixes[s]}.bin", dtype) for s in SPLITS}
    try:
        for shards, mask in groups:
            _copy_group(shards, mask, writers)
        for split in SPLITS:
            writers[split].finalize(f"{prefixes[split]}.idx")
    finally:
        for writer in writers.values():
            writer.close()


def _copy_group(shards, mask: np.ndarray, writers: dict[str, IndexedWriter]) -> None:
    dtype, offset = writers["train"].dtype, 0
    for prefix, record in tqdm(shards, desc="merge", unit="shard"):
        if record["documents"] == 0:  # owns no sources, or only skipped records
            # megatron cannot open its empty .bin ("cannot mmap an empty file")
            if not Path(f"{prefix}.idx").is_file() or Path(f"{prefix}.bin").stat().st_size:
                raise UserError(f"{prefix}.bin disagrees with {prefix}.json; re-run that shard")
            continue
        shard_dtype, lengths, document_indices = read_index(f"{prefix}.idx")
        itemsize = np.dtype(shard_dtype).itemsize
        if (
            len(lengths) != record["documents"]
            or len(document_indices) != len(lengths) + 1
            or shard_dtype is not dtype
            or Path(f"{prefix}.bin").stat().st_size != itemsize * int(lengths.sum())
        ):
            raise UserError(f"{prefix}.idx disagrees with {prefix}.json; re-run that shard")
        held = mask[offset:offset + len(lengths)]
        starts = np.cumsum(lengths, dtype=np.int64) - lengths
        edges = [0, *(np.flatnonzero(held[1:] != held[:-1]) + 1).tolist(), len(held)]
        for a, b in zip(edges[:-1], edges[1:], strict=True):  # runs of one split
            writers["valid" if held[a] else "train"].add_from(
                f"{prefix}.bin", lengths[a:b], itemsize * int(starts[a]))
        offset += len(lengths)


def _split_stats(prefix: Path, events: dict[str, Counter]) -> dict:
    """Counts, checksums and the largest id read back from the written files, so the
    manifest describes what is there (``data_tools.verify`` checks against it)."""
    dtype, lengths, document_indices = read_index(f"{prefix}.idx")
    return {
        "documents": len(document_indices) - 1,
        "tokens": int(lengths.sum(dtype=np.int64)),
        **split_record(prefix, dtype),
        "skipped": {reason: events.get(reason, 0) for reason in SKIP_REASONS},
        "utf8_replaced": events.get("utf8_replaced", 0),
    }


def _version(package: str) -> str:
    """The installed version of ``package``, without importing it (megatron-core imports torch)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:  # e.g. run from a source checkout without pip install
        return "unknown (not installed)"


def merge(
    output: Path, overwrite: bool = False, shards_dir: Path | None = None, tokenizer=None
) -> dict:
    """Merge ``output/shards`` (or ``shards_dir``) into ``output``; return the manifest.

    ``tokenizer``: the one the shards were just written with, if the caller holds it (saves
    loading it again from ``shards_dir/tokenizer``).
    """
    output = Path(output)
    shards_dir = Path(shards_dir) if shards_dir else output / SHARDS_DIR
    check_output_free(output, overwrite)
    shards = read_shards(shards_dir)
    first = shards[0][1]
    if tokenizer is None:
        tokenizer = load_tokenizer(shards_dir / "tokenizer")
    if tokenizer.identity != first["tokenizer"]:
        raise UserError(f"{shards_dir}/tokenizer is not the tokenizer the shards were made with")
    split = first["split"]
    documents = sum(record["documents"] for _, record in shards)
    if documents == 0:
        raise UserError("the input has no documents (every record was empty or skipped): "
                        "check --input and --text-key")
    if "valid_inputs" in split:  # all of the inputs train; the validation set is separate
        valid_shards = read_shards(shards_dir / VALID_SHARDS)
        held = sum(record["documents"] for _, record in valid_shards)
        if held == 0:
            raise UserError(f"--valid-input {' '.join(split['valid_inputs'])} has no documents")
        groups = [(shards, np.zeros(documents, dtype=bool)),
                  (valid_shards, np.ones(held, dtype=bool))]
    else:
        valid_count(split, documents)  # a bad split fails before the hashing pass
        groups = [(shards, valid_mask(split, document_keys(shards, split.get("seed", 0))))]

    # Everything is written under temporary names first; an earlier result is replaced only
    # once the new one is complete (manifest.json last: its presence marks a complete result).
    output.mkdir(parents=True, exist_ok=True)
    staged = {split: temp_name(output / split) for split in SPLITS}
    staged_tokenizer = temp_name(output / "tokenizer")
    staged_manifest = temp_name(output / "manifest.json")
    try:
        _copy_documents(groups, staged, np.dtype(first["dtype"]).type)
        remove(staged_tokenizer)
        shutil.copytree(shards_dir / "tokenizer", staged_tokenizer)  # as saved by shard 0
        events = _split_of_events(groups)
        manifest = {
            "format": "e2d2-indexed/1",
            "e2d2_version": _version("e2d2"),
            "megatron_core_version": _version("megatron-core"),
            **{split: _split_stats(staged[split], events[split]) for split in SPLITS},
            "split": first["split"],
            "dtype": first["dtype"],
            "tokenizer": first["tokenizer"],
            "sources": [source for group, _ in groups for _, record in group
                        for source in record["sources"]],
            "commands": sorted({" ".join(record["command"]) for _, record in shards}),
            "shards": len(shards),
        }
        staged_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
        remove(output / "manifest.json")  # the old result is no longer complete from here on
        for split in SPLITS:
            for suffix in (".bin", ".idx"):  # .idx last: a lone .bin is visibly incomplete
                os.replace(f"{staged[split]}{suffix}", output / f"{split}{suffix}")
        remove(output / "tokenizer")  # a directory: os.replace cannot replace a non-empty one
        os.replace(staged_tokenizer, output / "tokenizer")
        os.replace(staged_manifest, output / "manifest.json")
    finally:
        for split in SPLITS:
            for suffix in (".bin", ".idx"):
                Path(f"{staged[split]}{suffix}").unlink(missing_ok=True)
        remove(staged_tokenizer)
        remove(staged_manifest)
    return manifest
