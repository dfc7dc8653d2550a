"""megatron-core's indexed dataset format (``.bin``/``.idx``), written and read with numpy alone.

The files are byte-for-byte what ``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder``
writes when every document is one sequence (``add_document(tokens, [len(tokens)])``), so
megatron-core's ``IndexedDataset`` and ``GPTDataset`` read them unchanged;
tests/test_data_preprocess.py checks both against megatron-core itself.

Why not the builder itself: importing it imports all of megatron-core and torch (5-8 s, more
than tokenizing the embedded corpus takes), and it works one document at a time (a numpy copy
and a write per document, then a Python loop over every document to compute the byte
offsets). Here whole chunks of documents are written with one ``write`` and the index is
built with vectorized numpy, so the cost per document is a few bytes of index.

Format (little-endian), as in megatron-core 0.16 ``_IndexWriter``:

* ``.bin``: the tokens of every sequence, concatenated, in the dataset's dtype;
* ``.idx``: ``b"MMIDIDX\\x00\\x00"``, version ``<Q`` 1, dtype code ``<B``, sequence count
  ``<Q``, document count ``<Q`` (sequences + 1), then the sequence lengths (int32), the byte
  offset of each sequence (int64) and the document indices (int64, ``0..sequences``).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
# megatron.core.datasets.indexed_dataset.DType
DTYPE_CODES = {
    np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6,
    np.float32: 7, np.uint16: 8,
}
_CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
_COPY_BLOCK = 16 << 20


class IndexedWriter:
    """Writes one ``.bin`` as chunks arrive and its ``.idx`` at ``finalize``; one document per
    sequence. Call ``close`` (idempotent) if ``finalize`` is never reached."""

    def __init__(self, bin_path: str | Path, dtype: type[np.number]) -> None:
        self.dtype = np.dtype(dtype).type
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"megatron's indexed format has no dtype {self.dtype.__name__}")
        self._lengths: list[np.ndarray] = []
        self.tokens = 0
        self.file = open(bin_path, "wb")  # closed by finalize or close

    def add_documents(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append ``len(lengths)`` documents whose tokens, concatenated, are ``flat``."""
        flat = np.ascontiguousarray(flat, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != flat.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())}, but {flat.size} tokens given")
        self.file.write(memoryview(flat).cast("B"))
        self._lengths.append(lengths.astype(np.int32))
        self.tokens += flat.size

    def add_from(self, bin_path: str | Path, lengths: np.ndarray, start_byte: int) -> None:
        """Append documents copied from another ``.bin`` of the same dtype: ``lengths`` are
        theirs, and the first begins ``start_byte`` bytes into that file."""
        lengths = np.asarray(lengths, dtype=np.int64)
        remaining = int(lengths.sum()) * np.dtype(self.dtype).itemsize
        with open(bin_path, "rb") as source:
            source.seek(start_byte)
            while remaining:
                block = source.read(min(remaining, _COPY_BLOCK))
                if not block:
                    raise ValueError(f"{bin_path} is shorter than its index says")
                self.file.write(block)
                remaining -= len(block)
        self._lengths.append(lengths.astype(np.int32))
        self.tokens += int(lengths.sum())

    def finalize(self, idx_path: str | Path) -> None:
        self.file.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        write_index(idx_path, self.dtype, lengths)

    def close(self) -> None:
        self.file.close()


def write_index(idx_path: str | Path, dtype: type[np.number], lengths: np.ndarray) -> None:
    """The ``.idx`` for documents of ``lengths`` tokens, each one sequence."""
    lengths = np.asarray(lengths, dtype=np.int32)
    count = lengths.size
    pointers = np.zeros(count, dtype=np.int64)
    if count:
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= np.dtype(dtype).itemsize
    with open(idx_path, "wb") as f:
        f.write(INDEX_HEADER)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", DTYPE_CODES[np.dtype(dtype).type]))
        f.write(struct.pack("<Q", count))
        f.write(struct.pack("<Q", count + 1))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(count + 1, dtype=np.int64).tobytes())


def read_index(idx_path: str | Path) -> tuple[type[np.number], np.ndarray, np.ndarray]:
    """``(dtype, sequence_lengths, document_indices)`` of an ``.idx`` file."""
    raw = Path(idx_path).read_bytes()
    if raw[:9] != INDEX_HEADER or struct.unpack_from("<Q", raw, 9)[0] != 1:
        raise ValueError(f"{idx_path} is not a megatron indexed dataset index")
    dtype = _CODE_DTYPES[raw[17]]
    sequences, documents = struct.unpack_from("<QQ", raw, 18)
    offset = 34
    lengths = np.frombuffer(raw, dtype=np.int32, count=sequences, offset=offset)
    offset += lengths.nbytes + 8 * sequences  # skip the pointers
    document_indices = np.frombuffer(raw, dtype=np.int64, count=documents, offset=offset)
    return dtype, lengths, document_indices
