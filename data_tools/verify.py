"""Verification of a preprocess output (``.bin``/``.idx`` pairs) against its manifest.

Two levels, each ending in one ``DataError`` that names the file and what is wrong:

* ``cheap`` (``e2d2 data inspect``, and ``e2d2 pretrain`` at start-up): the ``.idx`` reads as
  megatron-core's format; its size is what its header's counts make; the document lengths are
  positive and the sequence pointers and document indices consistent with them; the
  ``.bin`` holds exactly their tokens; the counts and dtype are the manifest's; the largest
  token id the manifest recorded fits the vocabulary (``id_bound``) and is no ``[MASK]``.
  Reads the index only, never the tokens.
* ``full`` (``e2d2 data inspect --verify``): also the sha256 of every file against the
  manifest and a scan of every token: each id below ``id_bound``, none the mask id, the
  largest the recorded one.

A manifest written before checksums and the largest id were recorded (``format``
``e2d2-indexed/1`` without ``bin_sha256``) is verified as far as it goes: the result's
``notes`` say what could not be checked, and nothing fails for it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from e2d2.errors import UserError

SPLITS = ("train", "valid")
# megatron-core's .idx header: magic (9 bytes), version (8), dtype code (1), two counts (16)
_IDX_HEADER_BYTES = 34
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
               7: np.float32, 8: np.uint16}  # megatron.core.datasets.indexed_dataset.DType
_SCAN_TOKENS = 1 << 24  # tokens per chunk of the full scan (32-64 MiB)


class DataError(UserError):
    """A damaged or inconsistent dataset file."""


@dataclass
class Verified:
    """What a verification could not check (``notes``)."""

    notes: list[str] = field(default_factory=list)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def split_record(prefix: str | Path, dtype) -> dict:
    """What ``e2d2 data preprocess``/``merge`` record of a written split beyond its counts:
    the files' sha256 and the largest token id."""
    bin_sha256, max_id = _sha256_and_max_id(f"{prefix}.bin", dtype)
    return {"bin_sha256": bin_sha256, "idx_sha256": file_sha256(f"{prefix}.idx"), "max_id": max_id}


def _sha256_and_max_id(path: str | Path, dtype) -> tuple[str, int]:
    """One read of a ``.bin`` (a corpus's worth of bytes): its sha256 and its largest token
    id (-1 when empty)."""
    digest, largest = hashlib.sha256(), -1
    with open(path, "rb") as f:
        while chunk := f.read(_SCAN_TOKENS * np.dtype(dtype).itemsize):
            digest.update(chunk)
            largest = max(largest, int(np.frombuffer(chunk, dtype=dtype).max()))
    return digest.hexdigest(), largest


def _read_index(prefix: Path):
    """``(dtype, sequence_lengths, sequence_pointers, document_indices)`` of a megatron-core
    ``.idx`` (version 1: magic, version, dtype code, the two counts, then the three arrays),
    read with numpy: the start-up check runs on a login node without torch or megatron-core.
    `tests/test_data_verify.py` checks this reader against megatron-core's own."""
    idx = Path(f"{prefix}.idx")
    try:
        with open(idx, "rb") as f:
            header = f.read(_IDX_HEADER_BYTES)
        if len(header) < _IDX_HEADER_BYTES or header[:9] != _IDX_MAGIC:
            raise ValueError("not a megatron-core index (bad magic or short header)")
        version, code, sequences, documents = struct.unpack("<QBQQ", header[9:])
        if version != 1 or code not in _IDX_DTYPES:
            raise ValueError(f"unknown index version {version} or dtype code {code}")
        arrays, offset = [], _IDX_HEADER_BYTES
        for dtype, count in ((np.int32, sequences), (np.int64, sequences), (np.int64, documents)):
            arrays.append(np.fromfile(idx, dtype=dtype, count=count, offset=offset))
            if len(arrays[-1]) != count:
                raise ValueError(f"{idx.stat().st_size:,} bytes end inside its arrays")
            offset += arrays[-1].nbytes
        return (_IDX_DTYPES[code], *arrays)
    except (OSError, ValueError, struct.error) as exc:
        raise DataError(f"{idx} is damaged: it cannot be read as a megatron-core index ({exc})") from None


def _check_index(prefix: Path) -> tuple[type, np.ndarray, int]:
    """The ``.idx``/``.bin`` pair agree with each other; returns the dtype, the sequence
    lengths and the number of documents."""
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    dtype, lengths, pointers, documents = _read_index(prefix)
    expected = _IDX_HEADER_BYTES + lengths.nbytes + pointers.nbytes + documents.nbytes
    size = idx.stat().st_size
    if size != expected:
        raise DataError(f"{idx} is damaged: {size:,} bytes, its header's counts "
                        f"({len(lengths):,} documents) make {expected:,}")
    if len(lengths) and int(lengths.min()) < 1:
        bad = int(np.argmin(lengths))
        raise DataError(f"{idx} is damaged: document {bad} has length {int(lengths[bad])}")
    itemsize = np.dtype(dtype).itemsize
    starts = np.concatenate(([0], np.cumsum(lengths[:-1], dtype=np.int64))) * itemsize
    if not np.array_equal(pointers, starts[:len(pointers)]):
        bad = int(np.argmax(pointers != starts))
        raise DataError(f"{idx} is damaged: document {bad} starts at byte {int(pointers[bad])}, "
                        f"its predecessors' lengths put it at {int(starts[bad])}")
    # a document is one sequence here; other tools' (sentence-split) may hold several
    if (len(documents) < 1 or documents[0] != 0 or documents[-1] != len(lengths)
            or (np.diff(documents) < 0).any()):
        raise DataError(f"{idx} is damaged: its document indices are not an increasing run "
                        f"from 0 to its {len(lengths):,} sequences")
    tokens = int(lengths.sum(dtype=np.int64))
    if not bin_.is_file():
        raise DataError(f"{bin_} is missing")
    if bin_.stat().st_size != tokens * itemsize:
        raise DataError(f"{bin_} is damaged: {bin_.stat().st_size:,} bytes, its index says "
                        f"{tokens:,} tokens of {itemsize} bytes = {tokens * itemsize:,} "
                        "(truncated or appended to?)")
    return dtype, lengths, len(documents) - 1


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} is missing; is {directory} an `e2d2 data preprocess` output?") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is damaged: {exc}") from None


def verify_directory(directory: str | Path, id_bound: int | None, mask_id: int | None = None,
                     full: bool = False) -> Verified:
    """Check both splits of a preprocess output directory (see the module docstring).

    ``id_bound``: every token id must be below it (the model's ``vocab_size``, or the
    tokenizer's bound; None: unchecked); ``mask_id``: an id no token may have. Raises
    ``DataError``.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    result = Verified()
    for split in SPLITS:
        verify_split(directory / split, manifest, id_bound, mask_id, full, result)
    return result


def verify_split(prefix: Path, manifest: dict | None, id_bound: int | None,
                 mask_id: int | None, full: bool, result: Verified) -> None:
    """Check one ``prefix.{bin,idx}`` pair; against ``manifest`` (its directory's, with a
    record under ``prefix.name``) where there is one. Adds to ``result``."""
    dtype, lengths, n_documents = _check_index(prefix)
    counts = {"documents": n_documents, "tokens": int(lengths.sum(dtype=np.int64)),
              "dtype": np.dtype(dtype).name}
    if manifest is None:
        result.notes.append(f"{prefix}: no manifest.json beside it: only its .idx and .bin are "
                            "checked against each other")
        record = {}
    else:
        record = manifest.get(prefix.name)
        if not isinstance(record, dict):
            raise DataError(f"{prefix.parent}/manifest.json has no {prefix.name!r} record; "
                            "re-run `e2d2 data preprocess`")
        for key, found in counts.items():
            wanted = manifest.get("dtype") if key == "dtype" else record.get(key)
            if wanted != found:
                raise DataError(f"{prefix}.idx: {key} {found}, {prefix.parent}/manifest.json "
                                f"says {wanted}: the files were replaced or damaged; re-run "
                                "`e2d2 data preprocess`")
    if id_bound is None:
        result.notes.append(f"{prefix}: no tokenizer or model given: token ids unchecked")
    else:
        _check_ids(prefix, record, dtype, id_bound, mask_id, full, result)
    if full and manifest is not None:
        _check_checksums(prefix, record, result)


def _check_ids(prefix: Path, record: dict, dtype, id_bound: int, mask_id: int | None,
               full: bool, result: Verified) -> None:
    """The largest id recorded (cheap) or every id (``full``) against the vocabulary."""
    recorded = record.get("max_id")
    if full:
        found = scan_ids(f"{prefix}.bin", dtype, id_bound, mask_id)
        if recorded is not None and found != recorded:
            raise DataError(f"{prefix}.bin: its largest token id is {found}, the manifest "
                            f"recorded {recorded}: the file is damaged")
        return
    if recorded is None:
        result.notes.append(f"{prefix}: the manifest records no largest token id (written "
                            "by an older e2d2): ids are checked by `e2d2 data inspect --verify`")
        return
    if recorded >= id_bound or recorded == mask_id:
        what = "the [MASK] id" if recorded == mask_id else f"not below {id_bound}"
        raise DataError(f"{prefix}.bin holds token id {recorded}, {what}: the data was "
                        "tokenized for another vocabulary; re-run `e2d2 data preprocess` with "
                        "the model's tokenizer (or fix model.vocab_size)")


def scan_ids(bin_path: str | Path, dtype, id_bound: int | None = None,
             mask_id: int | None = None) -> int:
    """The largest token id of a ``.bin`` (-1 when empty), read in chunks; with ``id_bound``
    / ``mask_id``, a ``DataError`` at the first id not below it / equal to it."""
    path = Path(bin_path)
    if not path.stat().st_size:
        return -1
    tokens = np.memmap(path, dtype=dtype, mode="r")
    largest = -1
    for start in range(0, len(tokens), _SCAN_TOKENS):
        chunk = tokens[start:start + _SCAN_TOKENS]
        bad = np.zeros(len(chunk), dtype=bool)
        if id_bound is not None:
            bad |= chunk >= id_bound
        if mask_id is not None:
            bad |= chunk == mask_id
        if bad.any():
            at = int(np.argmax(bad))
            raise DataError(f"{path}: token {start + at:,} has id {int(chunk[at])}, "
                            f"{'the [MASK] id' if chunk[at] == mask_id else f'not below {id_bound}'}"
                            ": the file is damaged or was tokenized for another vocabulary")
        largest = max(largest, int(chunk.max()))
    return largest


def _check_checksums(prefix: Path, record: dict, result: Verified) -> None:
    for suffix in ("bin", "idx"):
        wanted = record.get(f"{suffix}_sha256")
        path = Path(f"{prefix}.{suffix}")
        if wanted is None:
            result.notes.append(f"{path}: the manifest records no checksum (written by an older "
                                "e2d2); re-run `e2d2 data preprocess` to have one")
            continue
        found = file_sha256(path)
        if found != wanted:
            raise DataError(f"{path} is damaged: its sha256 is {found[:16]}..., the manifest "
                            f"recorded {wanted[:16]}...")
