"""Writing and reading megatron-core indexed datasets (``.bin``/``.idx``) through megatron-core.

Every file the pipeline writes goes through ``megatron.core.datasets.indexed_dataset.
IndexedDatasetBuilder`` and is read back with its ``IndexedDataset``, so megatron-core's
``GPTDataset`` reads our output unchanged and a format change upstream cannot silently
diverge from us. Each document is one sequence.

Importing megatron-core costs a few seconds per process (it imports torch); that is a
fixed cost per worker, small against tokenizing a real corpus.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder


class IndexedWriter:
    """Appends documents to one ``.bin`` and writes its ``.idx`` at ``finalize``.

    Call ``close`` (idempotent) if ``finalize`` is never reached.
    """

    def __init__(self, bin_path: str | Path, dtype: type[np.number]) -> None:
        self.dtype = np.dtype(dtype).type
        self.builder = IndexedDatasetBuilder(str(bin_path), dtype=self.dtype)
        self.tokens = 0

    def add_documents(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append ``len(lengths)`` documents whose tokens, concatenated, are ``flat``."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != flat.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())}, but {flat.size} tokens given")
        ends = np.cumsum(lengths)
        for start, end in zip((ends - lengths).tolist(), ends.tolist(), strict=True):
            self.builder.add_document(flat[start:end], [end - start])
        self.tokens += flat.size

    def add_from(self, bin_path: str | Path, lengths: np.ndarray, start_byte: int) -> None:
        """Append documents read from another ``.bin`` of the same dtype: ``lengths`` are
        theirs, and the first begins ``start_byte`` bytes into that file."""
        lengths = np.asarray(lengths, dtype=np.int64)
        count = int(lengths.sum())
        if count == 0:
            return
        tokens = np.memmap(bin_path, dtype=self.dtype, mode="r", offset=start_byte, shape=(count,))
        self.add_documents(tokens, lengths)

    def finalize(self, idx_path: str | Path) -> None:
        self.builder.finalize(str(idx_path))

    def close(self) -> None:
        self.builder.data_file.close()


def read_index(idx_path: str | Path) -> tuple[type[np.number], np.ndarray, np.ndarray]:
    """``(dtype, sequence_lengths, document_indices)`` of an indexed dataset, via megatron-core."""
    idx_path = str(idx_path)
    if not idx_path.endswith(".idx"):
        raise ValueError(f"{idx_path} is not an .idx path")
    dataset = IndexedDataset(idx_path[: -len(".idx")])
    # Copies: the arrays view the index's mmap, which closes with the dataset.
    return dataset.index.dtype, np.array(dataset.sequence_lengths), np.array(dataset.document_indices)
