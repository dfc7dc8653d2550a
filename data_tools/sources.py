"""Input files to text records, with one clear error (or a counted skip) per bad record.

Inputs are files (``.jsonl``, ``.json``, ``.txt``, ``.parquet``), globs, directories (searched
recursively for those suffixes) or a local Hugging Face ``datasets`` directory (written by
``save_to_disk``), which is streamed. A ``.txt`` file is one document; a ``.json`` file is either
a JSON array of records or JSON lines.

``iter_records`` yields ``(text, event)`` pairs: ``text`` is None for a skipped record and
``event`` names why (``bad_json``, ``not_an_object``, ``missing_text_key``, ``not_a_string``,
``empty``); for a kept record ``event`` is ``utf8_replaced`` when invalid UTF-8 was replaced
by U+FFFD, else None.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from e2d2.errors import UserError

SUFFIX_KINDS = {".jsonl": "jsonl", ".json": "json", ".txt": "txt", ".parquet": "parquet"}
HF_MARKERS = ("dataset_dict.json", "state.json")
SKIP_REASONS = ("bad_json", "not_an_object", "missing_text_key", "not_a_string", "empty")
UTF8_REPLACED = "utf8_replaced"

Record = tuple[str | None, str | None]


@dataclass(frozen=True)
class Source:
    path: Path
    kind: str  # one of SUFFIX_KINDS' values, or "hf"
    size: int  # bytes on disk, for progress and shard balancing

    def describe(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "size": self.size, "sha256": _sha256(self)}


def _files(source: Source) -> list[Path]:
    return sorted(p for p in source.path.rglob("*") if p.is_file()) if source.kind == "hf" else [
        source.path
    ]


def _sha256(source: Source) -> str:
    digest = hashlib.sha256()
    for path in _files(source):
        if source.kind == "hf":
            digest.update(str(path.relative_to(source.path)).encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _source(path: Path) -> Source:
    if path.is_dir():
        return Source(path, "hf", sum(p.stat().st_size for p in path.rglob("*") if p.is_file()))
    kind = SUFFIX_KINDS.get(path.suffix.lower())
    if kind is None:
        raise UserError(
            f"{path}: unsupported file type {path.suffix!r}; use one of "
            f"{', '.join(SUFFIX_KINDS)} or a datasets directory"
        )
    return Source(path, kind, path.stat().st_size)


def _expand_path(path: Path, item: str) -> list[Source]:
    """The sources of one existing file or directory named (or matched) by ``--input item``."""
    if path.is_dir() and any((path / m).is_file() for m in HF_MARKERS):
        return [_source(path)]
    if path.is_dir():
        found = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIX_KINDS
        )
        if not found:
            raise UserError(
                f"--input {item}: no {'/'.join(SUFFIX_KINDS)} files in directory {path} (and it "
                "is no datasets directory); name the files or the right directory"
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
                raise UserError(f"--input {item}: the pattern matches no files")
            for match in matches:
                sources += _expand_path(match, item)
        else:
            sources += _expand_path(path, item)
    unique: dict[Path, Source] = {}
    for source in sources:
        unique.setdefault(source.path.resolve(), source)
    return list(unique.values())


class _RecordReader:
    """Turns raw values into records, raising or counting bad ones."""

    def __init__(self, text_key: str, skip_bad: bool) -> None:
        self.text_key = text_key
        self.skip_bad = skip_bad

    def bad(self, where: str, reason: str, message: str) -> Record:
        if not self.skip_bad:
            raise UserError(
                f"{where}: {message}; fix the record, or pass --skip-bad-records to skip and "
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

    def from_value(self, value, where: str, replaced: bool = False) -> Record:
        if not isinstance(value, dict):
            return self.bad(where, "not_an_object", f"expected a JSON object, got {_kind(value)}")
        if self.text_key not in value:
            keys = ", ".join(sorted(map(str, value))[:10]) or "none"
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


def _jsonl(source: Source, reader: _RecordReader, advance) -> Iterator[Record]:
    with open(source.path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            advance(len(raw))
            if not raw.strip():  # blank lines separate nothing and are not records
                continue
            line, replaced = _decode(raw)
            where = f"{source.path}:{lineno}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                yield reader.bad(where, "bad_json", f"malformed JSON ({exc.msg})")
                continue
            yield reader.from_value(value, where, replaced)


def _json(source: Source, reader: _RecordReader, advance) -> Iterator[Record]:
    raw = source.path.read_bytes()
    if not raw.lstrip().startswith(b"["):  # many ".json" corpora are JSON lines
        yield from _jsonl(source, reader, advance)
        return
    text, replaced = _decode(raw)
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{source.path}:{exc.lineno}: malformed JSON ({exc.msg})") from exc
    advance(len(raw))
    for index, value in enumerate(values):
        yield reader.from_value(value, f"{source.path}[{index}]", replaced)


def _txt(source: Source, reader: _RecordReader, advance) -> Iterator[Record]:
    raw = source.path.read_bytes()
    advance(len(raw))
    yield reader.from_text(*_decode(raw))


def _parquet(source: Source, reader: _RecordReader, advance) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def unreadable(exc: Exception) -> UserError:
        return UserError(
            f"{source.path}: not a readable parquet file ({exc}); replace or remove the file"
        )

    try:
        parquet = pq.ParquetFile(source.path)
    except (pa.ArrowException, OSError) as exc:
        raise unreadable(exc) from exc
    if reader.text_key not in parquet.schema_arrow.names:
        raise UserError(
            f"{source.path}: no column {reader.text_key!r} (columns: "
            f"{', '.join(parquet.schema_arrow.names)}); pass --text-key with the right column"
        )
    rows = max(parquet.metadata.num_rows, 1)
    row = 0
    batches = parquet.iter_batches(columns=[reader.text_key], batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as exc:
            raise unreadable(exc) from exc
        if batch is None:
            break
        advance(source.size * batch.num_rows // rows)
        for text in batch.column(0).to_pylist():
            row += 1
            yield reader.from_value({reader.text_key: text}, f"{source.path}: row {row}")


def _hf(source: Source, reader: _RecordReader, advance) -> Iterator[Record]:
    try:
        import datasets
    except ModuleNotFoundError as exc:
        raise UserError("reading a datasets directory needs: pip install 'e2d2[hf]'") from exc
    try:
        loaded = datasets.load_from_disk(str(source.path))
    except Exception as exc:  # datasets raises many types for a damaged or foreign directory
        raise UserError(
            f"{source.path}: not a readable datasets directory ({type(exc).__name__}: {exc}); "
            "give a directory written by datasets' save_to_disk, or the data files themselves"
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise UserError(f"{source.path}: no 'train' split (splits: {', '.join(loaded)})")
        loaded = loaded["train"]
    rows = max(len(loaded), 1)
    for index, value in enumerate(loaded.to_iterable_dataset()):  # streamed, not loaded
        advance(source.size // rows)
        yield reader.from_value(value, f"{source.path}: row {index + 1}")


_READERS = {"jsonl": _jsonl, "json": _json, "txt": _txt, "parquet": _parquet, "hf": _hf}


def iter_records(
    source: Source, text_key: str, skip_bad: bool, advance: Callable[[int], object] = lambda n: None
) -> Iterator[Record]:
    """The records of one source; ``advance(nbytes)`` reports progress through the file."""
    return _READERS[source.kind](source, _RecordReader(text_key, skip_bad), advance)
