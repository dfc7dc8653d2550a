"""Corpus-scale inputs: compressed files, one file split across shards and workers, bad input."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os

import pytest
import zstandard
from test_data_helpers import (
    assert_documents_are,
    e2d2,
    output_files,
    pydoc_texts,
    sharded_equals_single,
    split_texts,
    write_jsonl,
)

from data_tools.sources import Piece, expand_inputs, iter_records
from data_tools.split import assign_pieces

COMPRESS = {
    "gz": gzip.compress,
    "bz2": lambda data: bz2.compress(data, 1),  # 100 kB blocks: a truncation keeps some
    "xz": lzma.compress,
    # as the zstd command line writes by default: with a checksum, so corruption is detectable
    "zst": zstandard.ZstdCompressor(write_checksum=True).compress,
}


def _records(piece: Piece, skip_bad: bool = False) -> list:
    return list(iter_records(piece, "text", skip_bad))


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())




def _compressed(path, data: bytes, codec: str):
    path.write_bytes(COMPRESS[codec](data))
    return path


# ---- splitting: every record read exactly once, in order, wherever the cuts fall ----


@pytest.mark.parametrize("read_bytes", [7, 1 << 20])  # lines spanning many reads, or one read
def test_every_byte_boundary_reads_each_line_once(tmp_path, monkeypatch, read_bytes):
    """Cut a jsonl at every byte offset: the two ranges together are the whole file's records,
    including cuts inside multi-byte UTF-8 characters and cuts on and right after a newline."""
    monkeypatch.setattr("data_tools.sources.READ_BYTES", read_bytes)
    texts = ["é", "日本語のテキスト", "emoji 🙂 and ü", "plain", "x" * 40]
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in texts]
    body = ("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:])).encode()  # a blank line too
    for ending in (b"\n", b""):  # with and without a final newline
        path = tmp_path / f"c{len(ending)}.jsonl"
        path.write_bytes(body + ending)
        [source] = expand_inputs([str(path)])
        whole = _records(source.whole())
        assert [text for text, _ in whole] == texts
        data = path.read_bytes()
        inside_char = data.index("日".encode()) + 1
        assert data[inside_char] & 0xC0 == 0x80  # a continuation byte: mid-character
        newline = data.index(b"\n")
        for cut in range(1, source.size):
            assert _records(Piece(source, 0, cut)) + _records(Piece(source, cut, source.size)) \
                == whole, cut
        for cut in (inside_char, newline, newline + 1):  # the named cases, in 3 parts too
            parts = [Piece(source, 0, cut), Piece(source, cut, cut + 2),
                     Piece(source, cut + 2, source.size)]
            assert [r for p in parts for r in _records(p)] == whole


def _mixed_sources(tmp_path):
    """Splittable and whole-only sources, with an empty file among them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = pydoc_texts(40)
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "a.jsonl", texts[:10])
    _compressed(src / "b.jsonl.zst", write_jsonl(tmp_path / "b", texts[10:15]).read_bytes(), "zst")
    (src / "c.jsonl").write_bytes(b"")
    pq.write_table(pa.table({"text": texts[15:35]}), src / "d.parquet", row_group_size=3)
    (src / "e.txt").write_text(texts[35])
    write_jsonl(src / "f.jsonl", texts[36:])
    return texts, expand_inputs([str(src)])


def test_shards_partition_the_records_for_any_shard_count(tmp_path):
    texts, sources = _mixed_sources(tmp_path)
    import pyarrow.parquet as pq

    assert pq.ParquetFile(sources[3].path).metadata.num_row_groups == 7
    for num_shards in range(1, 8):
        shards = [assign_pieces(sources, num_shards, i) for i in range(num_shards)]
        records = [r for pieces in shards for p in pieces for r in _records(p)]
        assert [text for text, _ in records] == texts, num_shards
        # each source is begun (and so described in the manifest) by exactly one shard
        begun = [p.source.path for pieces in shards for p in pieces if p.start == 0]
        assert begun == [s.path for s in sources]
        if num_shards == 3:  # the parquet file is read by more than one shard
            assert sum(any(p.source.kind == "parquet" for p in pieces) for pieces in shards) > 1


def test_parquet_with_several_row_groups_over_shards_merges_to_one_process(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = pydoc_texts(30)
    corpus = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": texts}), corpus, row_group_size=4)  # 8 row groups
    args = ["data", "preprocess", "--input", corpus, "--tokenizer", "bytes", "--valid-docs", 3]
    shard_docs = sharded_equals_single(args, tmp_path, 3)
    assert all(shard_docs) and sum(shard_docs) == 30  # every shard read row groups
    assert_documents_are(tmp_path / "sharded", texts)


def test_one_jsonl_over_manual_shards_merges_to_one_process(tmp_path):
    texts = pydoc_texts(30)
    corpus = write_jsonl(tmp_path / "c.jsonl", texts)
    args = ["data", "preprocess", "--input", corpus, "--tokenizer", "bytes", "--valid-docs", 4]
    assert all(sharded_equals_single(args, tmp_path, 3))
    # described once, by the shard reading its start
    [source] = _manifest(tmp_path / "sharded")["sources"]
    assert source["path"] == str(corpus) and source["size"] == corpus.stat().st_size


@pytest.mark.slow  # spawns worker processes
def test_one_jsonl_over_1_2_3_workers_is_byte_identical(tmp_path, monkeypatch):
    import data_tools.work

    texts = pydoc_texts(30)
    corpus = write_jsonl(tmp_path / "c.jsonl", texts)
    monkeypatch.setattr("data_tools.split.TASK_BYTES", 8192)  # ~20 ranges for the workers
    cuts = []
    real_split = data_tools.work.split_piece

    def split_piece(piece):
        cuts.append(pieces := real_split(piece))
        return pieces

    monkeypatch.setattr(data_tools.work, "split_piece", split_piece)
    outs = []
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        assert e2d2("data", "preprocess", "--input", corpus, "--tokenizer", "gpt2",
                    "--output", out, "--workers", workers, "--valid-docs", 3) == 0
        outs.append(output_files(out))
    assert outs[0] == outs[1] == outs[2]
    assert len(cuts) == 2 and len(cuts[0]) > 10  # workers 2 and 3 read ranges themselves
    assert_documents_are(tmp_path / "w3", texts)


# ---- compressed inputs ----


@pytest.mark.parametrize("codec", list(COMPRESS))
def test_compressed_jsonl_reads_like_the_plain_file(tmp_path, monkeypatch, codec):
    monkeypatch.setattr("data_tools.compressed.BLOCK_BYTES", 1000)  # members end mid-block
    texts = pydoc_texts(12)
    plain = write_jsonl(tmp_path / "c.jsonl", texts)
    data = plain.read_bytes()
    # two members / frames, as written by parallel compressors or `cat a.gz b.gz`
    half = data.index(b"\n", len(data) // 2) + 1
    packed = tmp_path / f"c.jsonl.{codec}"
    packed.write_bytes(COMPRESS[codec](data[:half]) + COMPRESS[codec](data[half:]))
    args = ["data", "preprocess", "--tokenizer", "bytes", "--valid-docs", 2]
    assert e2d2(*args, "--input", plain, "--output", tmp_path / "plain") == 0
    assert e2d2(*args, "--input", packed, "--output", tmp_path / "packed") == 0
    assert output_files(tmp_path / "packed") == output_files(tmp_path / "plain")
    [source] = _manifest(tmp_path / "packed")["sources"]
    import hashlib

    assert source == {"path": str(packed), "kind": "jsonl", "compression": codec,
                      "size": packed.stat().st_size,
                      "sha256": hashlib.sha256(packed.read_bytes()).hexdigest()}


def test_compressed_txt_and_json(tmp_path):
    texts = pydoc_texts(4)
    src = tmp_path / "src"
    src.mkdir()
    _compressed(src / "a.txt.gz", texts[0].encode(), "gz")
    _compressed(src / "b.json.xz", json.dumps([{"text": t} for t in texts[1:3]]).encode(), "xz")
    _compressed(src / "c.json.zst", json.dumps({"text": texts[3]}).encode(), "zst")  # JSON lines
    out = tmp_path / "out"
    assert e2d2("data", "preprocess", "--input", src, "--tokenizer", "bytes",
                "--output", out, "--valid-docs", 1) == 0
    assert_documents_are(out, texts)


@pytest.mark.parametrize("codec", list(COMPRESS))
def test_truncated_compressed_file_is_an_error_or_a_counted_skip(tmp_path, codec, capsys):
    texts = pydoc_texts(100)  # all 79 topics, 0.5 MB: 2/3 of it holds complete records
    data = write_jsonl(tmp_path / "c.jsonl", texts).read_bytes()
    whole = COMPRESS[codec](data)
    path = tmp_path / f"c.jsonl.{codec}"
    path.write_bytes(whole[: len(whole) * 2 // 3])
    args = ["data", "preprocess", "--input", path, "--tokenizer", "bytes", "--valid-docs", 1]
    assert e2d2(*args, "--output", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"error: {path}: truncated" in err and f"stops at byte {path.stat().st_size:,}" in err
    assert "--skip-bad-records" in err
    assert not (tmp_path / "out" / "manifest.json").exists()

    out = tmp_path / "skipped"
    assert e2d2(*args, "--output", out, "--skip-bad-records") == 0
    manifest = _manifest(out)
    kept = manifest["train"]["documents"] + manifest["valid"]["documents"]
    assert 0 < kept < len(texts)
    # after the last document: it counts for that document's split
    last = "valid" if texts[kept - 1] in split_texts(out)[1] else "train"
    assert manifest[last]["skipped"]["bad_compression"] == 1
    assert_documents_are(out, texts[:kept])  # the complete records before the damage, in order


@pytest.mark.parametrize("codec", list(COMPRESS))
def test_corrupt_compressed_file_names_the_byte_offset(tmp_path, codec, capsys):
    data = write_jsonl(tmp_path / "c.jsonl", pydoc_texts(30)).read_bytes()
    damaged = bytearray(COMPRESS[codec](data))
    middle = len(damaged) // 2
    damaged[middle : middle + 64] = bytes(64)
    path = tmp_path / f"c.jsonl.{codec}"
    path.write_bytes(damaged)
    assert e2d2("data", "preprocess", "--input", path, "--tokenizer", "bytes",
                "--output", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"error: {path}: corrupt {codec} data in compressed bytes 0-{len(damaged):,}" in err


# ---- bad input ----


def test_glob_matching_nothing_is_an_error(tmp_path, capsys):
    assert e2d2("data", "preprocess", "--input", str(tmp_path / "*.jsonl.zst"), "--tokenizer",
                "bytes", "--output", tmp_path / "out") == 2
    assert f"--input {tmp_path}/*.jsonl.zst: the pattern matches no files" in (
        capsys.readouterr().err
    )


def test_unsupported_compressed_type_is_an_error(tmp_path, capsys):
    path = tmp_path / "c.parquet.gz"
    path.write_bytes(gzip.compress(b"x"))
    assert e2d2("data", "preprocess", "--input", path, "--tokenizer", "bytes",
                "--output", tmp_path / "out") == 2
    assert f"error: {path}: unsupported file type '.parquet.gz'" in capsys.readouterr().err


@pytest.mark.parametrize("skip", [False, True])
def test_mixed_text_keys_across_files_name_the_file(tmp_path, capsys, skip):
    texts = pydoc_texts(6)
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "a.jsonl", texts[:3])
    other = _compressed(src / "b.jsonl.gz", write_jsonl(tmp_path / "b", texts[3:], key="content")
                        .read_bytes(), "gz")
    flags = ["--skip-bad-records"] if skip else []
    assert e2d2("data", "preprocess", "--input", src, "--tokenizer", "bytes",
                "--output", tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err
    assert f"error: {other}:1: the file's first record has no key 'text' (keys: content)" in err
    assert not list((tmp_path / "out").rglob("*"))  # checked before any work


def test_parquet_without_the_text_column_names_the_file(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"text": pydoc_texts(2)}), src / "a.parquet")
    pq.write_table(pa.table({"body": pydoc_texts(2)}), src / "b.parquet")
    assert e2d2("data", "preprocess", "--input", src, "--tokenizer", "bytes",
                "--output", tmp_path / "out", "--skip-bad-records") == 2
    assert f"error: {src / 'b.parquet'}: no column 'text' (columns: body)" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("change", ["append", "touch"])
def test_file_changing_while_read_is_an_error_with_no_output(tmp_path, monkeypatch, capsys,
                                                              change):
    from data_tools.indexed import IndexedWriter

    corpus = write_jsonl(tmp_path / "c.jsonl", pydoc_texts(30))
    monkeypatch.setattr("data_tools.work.CHUNK_DOCS", 2)  # several writes while reading
    real = IndexedWriter.add_documents

    def changing(self, *args, **kwargs):  # the file changes after the first write
        if self.tokens == 0:
            if change == "append":
                with open(corpus, "a") as f:
                    f.write(json.dumps({"text": "late"}) + "\n")
            else:
                stat = corpus.stat()
                os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(IndexedWriter, "add_documents", changing)
    out = tmp_path / "out"
    assert e2d2("data", "preprocess", "--input", corpus, "--tokenizer", "bytes",
                "--output", out, "--valid-docs", 1) == 2
    err = capsys.readouterr().err
    assert f"error: {corpus} changed while being read" in err
    leftovers = [p.name for p in out.rglob("*") if p.is_file()]
    assert not [n for n in leftovers if n.endswith((".idx", ".bin", ".json"))], leftovers


def test_input_changed_between_manual_shards_is_caught_by_merge(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", pydoc_texts(20))
    common = ["data", "preprocess", "--input", corpus, "--tokenizer", "bytes", "--valid-docs", 2,
              "--output", tmp_path / "out", "--num-shards", 2]
    assert e2d2(*common, "--shard-index", 0) == 0
    with open(corpus, "a") as f:  # shard 1 plans its range from another size
        f.write(json.dumps({"text": "late"}) + "\n")
    assert e2d2(*common, "--shard-index", 1) == 0
    assert e2d2("data", "merge", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"error: {corpus}: shard 0 saw" in err and "the input changed between" in err
    assert not (tmp_path / "out" / "manifest.json").exists()
