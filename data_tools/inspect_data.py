"""``e2d2 data inspect``: counts, dtype, document-length histogram and a decoded sample.

Every dataset is verified first (``data_tools.verify``): the cheap checks always, checksums
and every token id with ``--verify``; damage is one ``DataError`` (exit 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_tools.tokenizer import load_tokenizer
from data_tools.verify import SPLITS, Verified, read_manifest, verify_split
from e2d2.errors import UserError

HISTOGRAM_WIDTH = 40  # characters of the longest bar


def _prefixes(path: Path) -> list[Path]:
    """A preprocess output directory gives its splits; a prefix or .bin/.idx gives itself."""
    if path.is_dir():
        prefixes = [path / split for split in SPLITS if (path / f"{split}.idx").is_file()]
        if not prefixes:
            raise UserError(f"{path} has no train.idx/valid.idx; is it a preprocess --output?")
        return prefixes
    prefix = path.with_suffix("") if path.suffix in (".bin", ".idx") else path
    if not (Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()):
        raise UserError(f"{path}: no {prefix}.bin/.idx pair; pass a directory or a dataset prefix")
    return [prefix]


def length_histogram(lengths: np.ndarray) -> list[tuple[int, int, int]]:
    """(low, high, count) over power-of-two buckets [low, high) of document lengths."""
    if len(lengths) == 0:
        return []
    top = int(np.ceil(np.log2(lengths.max() + 1)))
    edges = 2 ** np.arange(top + 1)
    counts, _ = np.histogram(lengths, bins=edges)
    return [(int(lo), int(hi), int(n)) for lo, hi, n in zip(edges[:-1], edges[1:], counts, strict=True) if n]


def inspect_dataset(prefix: Path, tokenizer, sample_chars: int = 400) -> dict:
    """Statistics of one indexed dataset, with its first document decoded."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    lengths = dataset.sequence_lengths
    sample = tokenizer.decode(dataset[0]) if len(dataset) and tokenizer else None
    return {
        "prefix": str(prefix),
        "documents": len(dataset.document_indices) - 1,
        "tokens": int(lengths.sum(dtype=np.int64)),
        "dtype": dataset.index.dtype.__name__,
        "length_min": int(lengths.min()) if len(lengths) else 0,
        "length_median": float(np.median(lengths)) if len(lengths) else 0.0,
        "length_max": int(lengths.max()) if len(lengths) else 0,
        "histogram": length_histogram(lengths),
        "sample": None if sample is None else sample[:sample_chars],
    }


def _tokenizer_for(path: Path, spec: str | None):
    if spec:
        return load_tokenizer(spec)
    directory = (path if path.is_dir() else path.parent) / "tokenizer"
    return load_tokenizer(directory) if directory.is_dir() else None


def format_report(stats: dict) -> str:
    lines = [
        f"{stats['prefix']}: {stats['documents']:,} documents, {stats['tokens']:,} tokens, "
        f"dtype {stats['dtype']}",
        f"  document length (tokens, with EOD): min {stats['length_min']}, "
        f"median {stats['length_median']:g}, max {stats['length_max']}",
    ]
    peak = max((n for _, _, n in stats["histogram"]), default=1)
    for low, high, count in stats["histogram"]:
        bar = "#" * max(1, round(HISTOGRAM_WIDTH * count / peak))
        lines.append(f"  [{low:>7}, {high:>7}) {count:>9,} {bar}")
    if stats["sample"] is None:
        lines.append("  (no tokenizer found: pass --tokenizer to see a decoded sample)")
    else:
        lines.append(f"  first document: {stats['sample']!r}")
    return "\n".join(lines)


def verify_prefixes(prefixes: list[Path], tokenizer, full: bool) -> Verified:
    """``data_tools.verify`` of each prefix, against its directory's manifest where it has
    one, ids against the tokenizer's bound and [MASK] id where there is a tokenizer."""
    result = Verified()
    for prefix in prefixes:
        has_manifest = prefix.name in SPLITS and (prefix.parent / "manifest.json").is_file()
        manifest = read_manifest(prefix.parent) if has_manifest else None
        verify_split(prefix, manifest, tokenizer.id_bound if tokenizer else None,
                     tokenizer.mask_id if tokenizer else None, full, result)
    return result


def inspect_path(path: str | Path, tokenizer_spec: str | None = None, verify: bool = False
                 ) -> tuple[list[dict], Verified]:
    """The statistics of every dataset under ``path``, after verifying them (``verify``: the
    full verification); returns them and what the verification could not check."""
    path = Path(path)
    tokenizer = _tokenizer_for(path, tokenizer_spec)
    prefixes = _prefixes(path)
    verified = verify_prefixes(prefixes, tokenizer, verify)
    return [inspect_dataset(prefix, tokenizer) for prefix in prefixes], verified
