"""Input files to text records, with one clear error (or a counted skip) per bad record.

Inputs are files (``.jsonl``, ``.json``, ``.txt``, ``.parquet``; the first three also compressed
as ``.gz``, ``.bz2``, ``.xz`` or ``.zst``, streamed), globs, directories (searched recursively for
those suffixes) or a local Hugging Face ``datasets`` directory (written by ``save_to_disk``),
which is streamed. A ``.txt`` file is one document; a ``.json`` file is either a JSON array of
records or JSON lines.

Records are read per ``Piece``: an uncompressed ``.jsonl`` or ``.parquet`` file can be read in
byte ranges (a range holds the lines, or parquet row groups, that start inside it), every other
source only whole. ``iter_records`` yields ``(text, event)`` pairs: ``text`` is None for a
skipped record and ``event`` names why (one of ``SKIP_REASONS``); for a kept record ``event`` is
``utf8_replaced`` when invalid UTF-8 was replaced by U+FFFD, else None.

A source is looked at (size, mtime) once, when the inputs are expanded; a file is read no
further than that size, and one that differs from that first look after it is read is an error.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from data_tools.compressed import COMPRESSIONS, CompressedStreamError, decompressed_blocks
from e2d2.errors import UserError

SUFFIX_KINDS = {".jsonl": "jsonl", ".json": "json", ".txt": "txt", ".parquet": "parquet"}
HF_MARKERS = ("dataset_dict.json", "state.json")
SKIP_REASONS = (
    "bad_json", "not_an_object", "missing_text_key", "not_a_string", "empty", "bad_compression"
)
UTF8_REPLACED = "utf8_replaced"
READ_BYTES = 1 << 20  # bytes per read of an uncompressed file
SUPPORTED = (
    f"{', '.join(SUFFIX_KINDS)} (all but .parquet also as "
    f"{'/'.join(COMPRESSIONS)}), or a datasets directory"
)

Record = tuple[str | None, str | None]
Where = Callable[[], str]  # where a record is, for an error message; built only when needed


@dataclass(frozen=True)
class Source:
    path: Path
    kind: str  # one of SUFFIX_KINDS' values, or "hf"
    size: int  # bytes on disk at the first look, for progress and splitting
    mtime_ns: int  # modification time at the first look
    compression: str | None = None  # one of COMPRESSIONS' values

    @property
    def splittable(self) -> bool:
        """Whether pieces of it can be read on their own (by byte range or row group)."""
        return self.compression is None and self.kind in ("jsonl", "parquet")

    def whole(self) -> Piece:
        return Piece(self, 0, self.size)

    def first_look(self) -> list:
        return [str(self.path), self.size, self.mtime_ns]

    def check_unchanged(self) -> None:
        """Fail if the source differs (size or mtime) from its first look."""
        try:
            now = _look(self.path)
        except FileNotFoundError:
            now = None
        if now != (self.size, self.mtime_ns):
            seen = "it is gone" if now is None else f"size {now[0]:,} bytes, mtime {now[1]} ns"
            raise UserError(
                f"{self.path} changed while being read (first look: size {self.size:,} bytes, "
                f"mtime {self.mtime_ns} ns; now {seen}); nothing was written. Run again once "
                "whatever writes it has finished, or give a copy"
            )

    def describe(self) -> dict:
        """For the manifest: what was read, with the sha256 of the bytes on disk."""
        sha256 = _sha256(self)
        self.check_unchanged()  # the hash describes the first look's bytes
        return {"path": str(self.path), "kind": self.kind, "compression": self.compression,
                "size": self.size, "sha256": sha256}


@dataclass(frozen=True)
class Piece:
    """The records of ``source`` that start at byte offsets in ``[start, end)``: lines of an
    uncompressed ``.jsonl``, row groups of a ``.parquet``; any other source is read whole."""

    source: Source
    start: int
    end: int


def _files(source: Source) -> list[Path]:
    return sorted(p for p in source.path.rglob("*") if p.is_file()) if source.kind == "hf" else [
        source.path
    ]


def _look(path: Path) -> tuple[int, int]:
    """(size, mtime_ns) of a file; of a directory, the total size and the newest mtime."""
    if path.is_dir():
        stats = [p.stat() for p in path.rglob("*") if p.is_file()]
        return sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _sha256(source: Source) -> str:
    digest = hashlib.sha256()
    for path in _files(source):
        if source.kind == "hf":
            digest.update(str(path.relative_to(source.path)).encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(READ_BYTES):
                digest.update(block)
    return digest.hexdigest()


def _file_type(path: Path) -> tuple[str, str | None] | None:
    """(kind, compression) from the suffixes, e.g. ``a.jsonl.zst`` -> ("jsonl", "zst")."""
    compression = COMPRESSIONS.get(path.suffix.lower())
    kind = SUFFIX_KINDS.get(Path(path.stem).suffix.lower() if compression else path.suffix.lower())
    if kind is None or (compression and kind == "parquet"):
        return None
    return kind, compression


def _source(path: Path) -> Source:
    if path.is_dir():
        return Source(path, "hf", *_look(path))
    file_type = _file_type(path)
    if file_type is None:
        raise UserError(
            f"{path}: unsupported file type {''.join(path.suffixes)!r}; use one of {SUPPORTED}"
        )
    kind, compression = file_type
    return Source(path, kind, *_look(path), compression)


def _expand_path(path: Path, item: str) -> list[Source]:
    """The sources of one existing file or directory named (or matched) by ``--input item``."""
    if path.is_dir() and any((path / m).is_file() for m in HF_MARKERS):
        return [_source(path)]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and _file_type(p))
        if not found:
            raise UserError(
                f"--input {item}: no input files ({SUPPORTED}) in directory {path}, and it is "
                "no datasets directory; name the files or the right directory"
            )
        return [_source(p) for p in found]
    if path.is_file():
        return [_source(path)]
    raise UserError(f"--input {item}: no such file or directory")

def expand_inputs(inputs: list[str]) -> list[Source]:
    """The sources named by files, globs and directories, in a fixed (sorted) order.

    A directory matched by a glob is read like a directory named directly (a ``datasets``
    directory if it has one's marker files, else searched for input files); a file reached
    twice (e.g. by a ``**`` glob and its directory) is read once.
    """
    sources: list[Source] = []
    for item in inputs:
        path = Path(item)
        if glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            if not matches:
                raise UserError(
                    f"--input {item}: the pattern matches no files; check the pattern and the "
                    "current directory"
                )
            for match in matches:
                sources += _expand_path(match, item)
        else:
            sources += _expand_path(path, item)
    unique: dict[Path, Source] = {}
    for source in sources:
        unique.setdefault(source.path.resolve(), source)
    return list(unique.values())


class _RecordReader:
    """Turns raw values into records, raising or counting bad ones.

    ``first_of_file``: this reader starts at the file's first record, whose text key is
    checked even with ``--skip-bad-records``: a file written with another key would otherwise
    be skipped record by record.
    """

    def __init__(self, text_key: str, skip_bad: bool, first_of_file: bool) -> None:
        self.text_key = text_key
        self.skip_bad = skip_bad
        self.first_unseen = first_of_file  # the file's first JSON object is still to come

    def bad(self, where: Where, reason: str, message: str) -> Record:
        if not self.skip_bad:
            raise UserError(
                f"{where()}: {message}; fix the record, or pass --skip-bad-records to skip and "
                "count bad records"
            )
        return None, reason

    def from_text(self, text: str, replaced: bool = False) -> Record:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates, e.g. from a JSON "\ud800" escape
            text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
            replaced = True
        if not text or text.isspace():  # as `not text.strip()`, without copying the text
            return None, "empty"
        return text, UTF8_REPLACED if replaced else None

    def from_value(self, value, where: Where, replaced: bool = False) -> Record:
        if not isinstance(value, dict):
            return self.bad(where, "not_an_object", f"expected a JSON object, got {_kind(value)}")
        first, self.first_unseen = self.first_unseen, False
        if self.text_key not in value:
            keys = ", ".join(sorted(map(str, value))[:10]) or "none"
            if first:
                raise UserError(
                    f"{where()}: the file's first record has no key {self.text_key!r} (keys: "
                    f"{keys}): this file uses another text key than --text-key {self.text_key}. "
                    "Pass the right --text-key, or preprocess files with different keys in "
                    "separate runs"
                )
            return self.bad(
                where,
                "missing_text_key",
                f"no key {self.text_key!r} (keys: {keys}); pass --text-key with the right key",
            )
        text = value[self.text_key]
        if not isinstance(text, str):
            return self.bad(where, "not_a_string", f"{self.text_key!r} is {_kind(text)}, not text")
        return self.from_text(text, replaced)


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def _decode(raw: bytes) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace"), True


def _split_lines(blocks: Iterable[bytes]) -> Iterator[bytes]:
    """The lines of a byte stream, without their ``\\n``; a last line may lack one."""
    parts: list[bytes] = []  # the unfinished line, in pieces (a long line spans many blocks)
    for block in blocks:
        lines = block.split(b"\n")
        if len(lines) == 1:
            parts.append(block)
            continue
        parts.append(lines[0])
        yield b"".join(parts)
        yield from itertools.islice(lines, 1, len(lines) - 1)
        parts = [lines[-1]]
    if last := b"".join(parts):
        yield last


def _line_number(path: Path, offset: int) -> int:
    """The number of the line starting at byte ``offset`` (only for error messages)."""
    count = 1
    with open(path, "rb") as f:
        while offset > 0 and (block := f.read(min(READ_BYTES, offset))):
            count += block.count(b"\n")
            offset -= len(block)
    return count


def _range_lines(piece: Piece, advance) -> Iterator[tuple[bytes, Where]]:
    """The lines that start in ``[piece.start, piece.end)`` of an uncompressed file.

    Reading begins one byte early and drops everything up to the first newline: that is the
    tail of a line owned by the range before (just the newline, when ``start`` begins a line).
    Only ``\\n`` bytes are searched for, and UTF-8 never uses that byte inside a character, so
    a range boundary inside a multi-byte character needs no care.
    """
    path = piece.source.path
    offset = max(piece.start - 1, 0)
    with open(path, "rb") as f:
        f.seek(offset)
        remaining = piece.source.size - offset  # no further than the first look

        def blocks() -> Iterator[bytes]:
            nonlocal remaining
            while remaining > 0 and (block := f.read(min(READ_BYTES, remaining))):
                remaining -= len(block)
                yield block

        lines = _split_lines(blocks())
        if piece.start > 0:
            head = next(lines, None)
            if head is None:
                return
            offset += len(head) + 1
        for raw in lines:
            if offset >= piece.end:
                return
            advance(len(raw) + 1)
            yield raw, lambda at=offset: f"{path}:{_line_number(path, at)}"
            offset += len(raw) + 1


def _numbered(path: Path, lines: Iterable[bytes]) -> Iterator[tuple[bytes, Where]]:
    for lineno, raw in enumerate(lines, 1):
        yield raw, lambda n=lineno: f"{path}:{n}"


def _read_all(source: Source, advance) -> bytes:
    if source.compression:
        return b"".join(decompressed_blocks(source.path, source.compression, advance))
    with open(source.path, "rb") as f:
        raw = f.read(source.size)  # no further than the first look
    advance(len(raw))
    return raw


def _json_lines(lines: Iterable[tuple[bytes, Where]], reader: _RecordReader) -> Iterator[Record]:
    for raw, where in lines:
        if not raw.strip():  # blank lines separate nothing and are not records
            continue
        line, replaced = _decode(raw)
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            yield reader.bad(where, "bad_json", f"malformed JSON ({exc.msg})")
            continue
        yield reader.from_value(value, where, replaced)


def _jsonl(piece: Piece, reader: _RecordReader, advance) -> Iterator[Record]:
    source = piece.source
    if source.compression is None:
        return _json_lines(_range_lines(piece, advance), reader)
    blocks = decompressed_blocks(source.path, source.compression, advance)
    return _json_lines(_numbered(source.path, _split_lines(blocks)), reader)


def _json(piece: Piece, reader: _RecordReader, advance) -> Iterator[Record]:
    path = piece.source.path
    raw = _read_all(piece.source, advance)
    if not raw.lstrip().startswith(b"["):  # many ".json" corpora are JSON lines
        yield from _json_lines(_numbered(path, _split_lines([raw])), reader)
        return
    text, replaced = _decode(raw)
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from exc
    for index, value in enumerate(values):
        yield reader.from_value(value, lambda i=index: f"{path}[{i}]", replaced)


def _txt(piece: Piece, reader: _RecordReader, advance) -> Iterator[Record]:
    yield reader.from_text(*_decode(_read_all(piece.source, advance)))


def _row_group_starts(metadata) -> list[int]:
    """The byte offset where each row group starts (the first at 0), never decreasing."""
    starts = [0]
    for index in range(1, metadata.num_row_groups):
        group = metadata.row_group(index)
        starts.append(min(
            column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
            for column in (group.column(c) for c in range(group.num_columns))
        ))
    return list(itertools.accumulate(starts, max))


def _parquet(piece: Piece, reader: _RecordReader, advance) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = piece.source.path

    def unreadable(exc: Exception) -> UserError:
        return UserError(f"{path}: not a readable parquet file ({exc}); replace or remove the file")

    try:
        parquet = pq.ParquetFile(path)
        starts = _row_group_starts(parquet.metadata)
    except (pa.ArrowException, OSError) as exc:
        raise unreadable(exc) from exc
    if reader.text_key not in parquet.schema_arrow.names:
        raise UserError(
            f"{path}: no column {reader.text_key!r} (columns: "
            f"{', '.join(parquet.schema_arrow.names)}); pass --text-key with the right column"
        )
    groups = [i for i, start in enumerate(starts) if piece.start <= start < piece.end]
    if not groups:
        return
    sizes = [parquet.metadata.row_group(i).num_rows for i in range(len(starts))]
    row = sum(sizes[: groups[0]])  # rows before this piece, for error messages
    rows = max(sum(sizes[i] for i in groups), 1)
    batches = parquet.iter_batches(columns=[reader.text_key], batch_size=1024, row_groups=groups)
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as exc:
            raise unreadable(exc) from exc
        if batch is None:
            break
        advance((piece.end - piece.start) * batch.num_rows // rows)
        for text in batch.column(0).to_pylist():
            row += 1
            yield reader.from_value({reader.text_key: text}, lambda r=row: f"{path}: row {r}")


def _hf(piece: Piece, reader: _RecordReader, advance) -> Iterator[Record]:
    try:
        import datasets
    except ModuleNotFoundError as exc:
        raise UserError("reading a datasets directory needs: pip install 'e2d2[hf]'") from exc
    path = piece.source.path
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for a damaged or foreign directory
        raise UserError(
            f"{path}: not a readable datasets directory ({type(exc).__name__}: {exc}); "
            "give a directory written by datasets' save_to_disk, or the data files themselves"
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise UserError(f"{path}: no 'train' split (splits: {', '.join(loaded)})")
        loaded = loaded["train"]
    rows = max(len(loaded), 1)
    for index, value in enumerate(loaded.to_iterable_dataset()):  # streamed, not loaded
        advance(piece.source.size // rows)
        yield reader.from_value(value, lambda i=index: f"{path}: row {i + 1}")


_READERS = {"jsonl": _jsonl, "json": _json, "txt": _txt, "parquet": _parquet, "hf": _hf}


def iter_records(
    piece: Piece, text_key: str, skip_bad: bool, advance: Callable[[int], object] = lambda n: None
) -> Iterator[Record]:
    """The records of one piece; ``advance(nbytes)`` reports progress through the file.

    A corrupt or truncated compressed file is an error naming it and the byte offset; with
    ``skip_bad`` its records before the damage are kept and the rest is one ``bad_compression``
    skip. Once the piece is read, the file is checked against its first look.
    """
    reader = _RecordReader(text_key, skip_bad, first_of_file=piece.start == 0)
    try:
        yield from _READERS[piece.source.kind](piece, reader, advance)
    except CompressedStreamError as exc:
        if not skip_bad:
            raise UserError(
                f"{exc}; re-download or repair the file, or pass --skip-bad-records to keep the "
                "records before the damage and count the rest as skipped (bad_compression)"
            ) from exc
        yield None, "bad_compression"
    piece.source.check_unchanged()


def check_text_key(piece: Piece, text_key: str, skip_bad: bool) -> None:
    """Read up to the first record of a file that begins ``piece``: fails at once (before any
    work) if the file is unreadable or its first record lacks ``text_key``."""
    records = iter_records(piece, text_key, skip_bad)
    try:
        for _, event in records:
            if event not in ("bad_json", "not_an_object"):  # past the first JSON object
                break
    finally:
        records.close()
