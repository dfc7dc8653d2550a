"""Streamed decompression of ``.gz``/``.bz2``/``.xz`` (stdlib) and ``.zst`` (``zstandard``).

Files are decompressed block by block, never unpacked to disk. Each codec's incremental
decompressor is driven directly (rather than through ``gzip.open`` and friends) so that a
damaged file is reported with the byte offset where it went wrong, and so that a stream that
simply stops is an error: a truncated ``.zst`` otherwise reads as a silently short file.
Concatenated members/frames (``pigz``, ``pzstd``, ``cat a.gz b.gz``) are read in sequence.
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

COMPRESSIONS = {".gz": "gz", ".bz2": "bz2", ".xz": "xz", ".zst": "zst"}
BLOCK_BYTES = 1 << 16  # compressed bytes per step: the resolution of a reported offset


class CompressedStreamError(Exception):
    """A compressed file is corrupt or truncated; ``offset`` is a compressed byte offset."""

    def __init__(self, path: Path, offset: int, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.offset, self.problem = path, offset, problem


def _decompressor(compression: str):
    """A fresh incremental decompressor with ``decompress``, ``eof`` and ``unused_data``."""
    if compression == "gz":
        return zlib.decompressobj(wbits=31), zlib.error
    if compression == "bz2":
        return bz2.BZ2Decompressor(), OSError
    if compression == "xz":
        return lzma.LZMADecompressor(), lzma.LZMAError
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj(), zstandard.ZstdError


def decompressed_blocks(
    path: Path, compression: str, advance: Callable[[int], object] = lambda n: None
) -> Iterator[bytes]:
    """The decompressed content of ``path`` in blocks; ``advance(n)`` per compressed block.

    Raises ``CompressedStreamError`` for corrupt data (naming the compressed byte range it
    lies in) and for a stream that ends before its end marker (naming the file size).
    """
    decompressor, error = _decompressor(compression)
    fed = False  # whether the current member/frame has received any input
    offset = 0
    with open(path, "rb") as f:
        while block := f.read(BLOCK_BYTES):
            data = block
            while data:
                try:
                    out = decompressor.decompress(data)
                except (error, EOFError) as exc:
                    raise CompressedStreamError(
                        path, offset,
                        f"corrupt {compression} data in compressed bytes "
                        f"{offset:,}-{offset + len(block):,} ({exc})",
                    ) from exc
                fed = True
                if out:
                    yield out
                if decompressor.eof:  # a member/frame ended: the rest starts the next one
                    data = decompressor.unused_data
                    decompressor, error = _decompressor(compression)
                    fed = False
                else:
                    data = b""
            offset += len(block)
            advance(len(block))
    if fed:
        raise CompressedStreamError(
            path, offset,
            f"truncated: the {compression} stream stops at byte {offset:,} (the end of the "
            "file) before its end marker",
        )
