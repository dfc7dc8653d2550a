"""Helpers (no tests) shared by the data pipeline tests: small real corpora and the real CLI."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

from data_tools.corpus import iter_documents
from launchers.cli import main


def pydoc_texts(count: int = 30) -> list[str]:
    """The first ``count`` topics of Python's own help text: small, real, varied text."""
    return list(islice(iter_documents("pydoc"), count))


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: t}) + "\n" for t in texts), encoding="utf-8")
    return path


def e2d2(*args: str) -> int:
    """Run the real ``e2d2`` command line in-process; return its exit status."""
    return main([str(a) for a in args])


def read_documents(prefix: Path) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def split_texts(out: Path) -> tuple[list[str], list[str]]:
    """The decoded documents of ``out/train`` and ``out/valid`` (end-of-document dropped)."""
    from data_tools.tokenizer import load_tokenizer

    tok = load_tokenizer(out / "tokenizer")
    return tuple([tok.decode(d[:-1]) for d in read_documents(out / s)] for s in ("train", "valid"))


def assert_documents_are(out: Path, texts: list[str]) -> None:
    """``out``'s two splits hold exactly ``texts``, each split in their order (the validation
    documents are picked by hash, so the splits interleave in the corpus)."""
    train, valid = split_texts(out)
    assert sorted(train + valid) == sorted(texts)
    for split in (train, valid):
        rest = iter(texts)
        assert all(any(t == u for u in rest) for t in split), "a split is out of corpus order"


def output_files(directory: Path) -> dict[str, bytes]:
    """Every output byte of a preprocess run, keyed by path (manifest minus run details)."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            files[str(path.relative_to(directory))] = path.read_bytes()
    manifest = json.loads(files.pop("manifest.json"))
    for key in ("commands", "sources", "shards"):  # differ legitimately between runs
        manifest.pop(key)
    files["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return files


def sharded_equals_single(args: list, tmp_path: Path, num_shards: int) -> list[int]:
    """Run ``e2d2 *args`` once as one process and once as ``num_shards`` manual shards plus
    ``merge``; assert both give the same output; return each shard's document count."""
    assert e2d2(*args, "--output", tmp_path / "single") == 0
    sharded = tmp_path / "sharded"
    for index in range(num_shards):
        assert e2d2(*args, "--output", sharded, "--num-shards", num_shards,
                    "--shard-index", index) == 0
    shard_docs = [json.loads(p.read_text())["documents"]
                  for p in sorted((sharded / "shards").glob("*.json"))]
    assert e2d2("data", "merge", sharded) == 0
    merged = output_files(sharded)
    assert {k: v for k, v in merged.items() if not k.startswith("shards/")} == output_files(
        tmp_path / "single"
    )
    return shard_docs
