"""Who reads what: the input sources cut into pieces for shards (MPI ranks) and for workers.

The sources, in order, are laid end to end on one line of ``T`` bytes (their sizes on disk);
shard ``r`` of ``K`` owns the bytes ``[ceil(r T / K), ceil((r + 1) T / K))`` of it:

* an uncompressed ``.jsonl`` or ``.parquet`` is split at those offsets, and each line (parquet
  row group) goes to the shard owning its first byte;
* any other source (compressed, ``.txt``, ``.json``, a ``datasets`` directory) cannot be read
  from an offset: it goes whole to the shard owning its midpoint, so compressed files are
  balanced across shards by compressed size.

Every record lands in exactly one shard, and the shards' records, concatenated in shard
order, are the records of all sources in order: the output does not depend on ``K``. Within a
shard, splittable pieces are cut the same way into tasks of about ``TASK_BYTES`` for workers.
"""

from __future__ import annotations

from bisect import bisect_right

from data_tools.sources import Piece, Source

TASK_BYTES = 1 << 22  # bytes of a splittable piece per worker task: ~1 s of encoding


def assign_pieces(sources: list[Source], num_shards: int, index: int) -> list[Piece]:
    """Shard ``index``'s pieces, in order. A source appears in a shard's list if that shard
    reads part of it, or, for an empty file, if it owns the file's position."""
    total = sum(source.size for source in sources)
    bounds = [-(-shard * total // num_shards) for shard in range(num_shards + 1)]

    def owner(point: int) -> int:
        return min(num_shards - 1, bisect_right(bounds, point) - 1)

    pieces, offset = [], 0
    for source in sources:
        if source.splittable and source.size:
            start = min(max(bounds[index] - offset, 0), source.size)
            end = min(max(bounds[index + 1] - offset, 0), source.size)
            if start < end:
                pieces.append(Piece(source, start, end))
        elif owner(offset + source.size // 2) == index:
            pieces.append(source.whole())
        offset += source.size
    return pieces


def split_piece(piece: Piece, nbytes: int | None = None) -> list[Piece]:
    """``piece`` cut into consecutive pieces of at most ``nbytes`` (default ``TASK_BYTES``)."""
    nbytes = TASK_BYTES if nbytes is None else nbytes
    return [
        Piece(piece.source, start, min(start + nbytes, piece.end))
        for start in range(piece.start, piece.end, nbytes)
    ]
