"""`e2d2 data preprocess / merge / inspect` on real text, read back with megatron-core."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from test_data_helpers import (
    assert_documents_are,
    e2d2,
    output_files,
    pydoc_texts,
    read_documents,
    sharded_equals_single,
    split_texts,
    write_jsonl,
)

from data_tools.tokenizer import load_tokenizer


@pytest.fixture
def data_corpus(tmp_path):
    texts = pydoc_texts(30)
    return texts, write_jsonl(tmp_path / "corpus.jsonl", texts)


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("spec", ["gpt2", "bytes"])
def test_round_trip_per_document(tmp_path, data_corpus, spec):
    texts, corpus = data_corpus
    out = tmp_path / "out"
    assert e2d2("data", "preprocess", "--input", corpus, "--tokenizer", spec,
                "--output", out, "--valid-docs", 4) == 0
    tok = load_tokenizer(out / "tokenizer")
    train = read_documents(out / "train")
    docs = train + read_documents(out / "valid")
    assert all(doc[-1] == tok.eod and tok.eod not in doc[:-1] for doc in docs)
    assert sorted(tok.decode(doc[:-1]) for doc in docs) == sorted(texts)
    assert (out / "train.bin").stat().st_size == 2 * sum(map(len, train))  # uint16


def test_manifest_counts_equal_the_files(tmp_path, data_corpus):
    _, corpus = data_corpus
    out = tmp_path / "out"
    assert e2d2("data", "preprocess", "--input", corpus, "--tokenizer", "bytes",
                "--output", out, "--valid-docs", 5) == 0
    manifest = _manifest(out)
    for split in ("train", "valid"):
        docs = read_documents(out / split)
        assert manifest[split]["documents"] == len(docs)
        assert manifest[split]["tokens"] == sum(map(len, docs))
        assert sum(manifest[split]["skipped"].values()) == 0
    assert manifest["dtype"] == "uint16"
    assert manifest["tokenizer"]["sha256"] == load_tokenizer("bytes").sha256
    [source] = manifest["sources"]
    assert source["sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert source["size"] == corpus.stat().st_size
    # the command main() was given (in-process here), not this test process's sys.argv
    assert manifest["commands"] == [
        f"e2d2 data preprocess --input {corpus} --tokenizer bytes --output {out} --valid-docs 5"
    ]


@pytest.mark.slow  # spawns worker processes
def test_byte_identical_at_1_and_2_workers(tmp_path, data_corpus, monkeypatch):
    _, corpus = data_corpus
    monkeypatch.setattr("data_tools.work.CHUNK_DOCS", 3)  # 10 chunks: both workers get work
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        # gpt2: the tokenizer whose encode_batch is multi-threaded, the likelier to reorder
        assert e2d2("data", "preprocess", "--input", corpus, "--tokenizer", "gpt2",
                    "--output", out, "--workers", workers, "--valid-docs", 3) == 0
        outs.append(output_files(out))
    assert outs[0] == outs[1]


def test_split_holds_out_hashed_documents_in_corpus_order(tmp_path, data_corpus):
    texts, corpus = data_corpus
    for flag, value, n_valid in (("--valid-docs", 7, 7), ("--valid-fraction", 0.1, 3)):
        out = tmp_path / flag
        assert e2d2("data", "preprocess", "--input", corpus, "--tokenizer", "bytes",
                    "--output", out, flag, value) == 0
        train, valid = split_texts(out)
        assert len(valid) == n_valid and sorted(train + valid) == sorted(texts)
        # each split keeps the corpus order
        assert train == [t for t in texts if t in train] and valid == [t for t in texts if t in valid]
    assert e2d2("data", "preprocess", "--input", corpus, "--tokenizer", "bytes",
                "--output", tmp_path / "x", "--valid-docs", 30) == 2


def test_concatenated_sources_all_reach_validation_and_the_seed_picks(tmp_path):
    """The last 1% of documents would validate on the last source only."""
    texts = pydoc_texts(60)
    first, second = texts[:30], texts[30:]
    corpus = write_jsonl(tmp_path / "c.jsonl", first + second)
    chosen = []
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        assert e2d2("data", "preprocess", "--input", corpus, "--tokenizer", "bytes",
                    "--output", out, "--valid-docs", 12, "--split-seed", seed) == 0
        _, valid = split_texts(out)
        assert any(t in first for t in valid) and any(t in second for t in valid)
        chosen.append(valid)
    assert chosen[0] != chosen[1]
    assert _manifest(tmp_path / "seed1")["split"] == {"valid_docs": 12, "seed": 1}


def test_an_empty_corpus_says_it_has_no_documents(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["", "  "])
    assert e2d2("data", "preprocess", "--input", corpus, "--tokenizer", "bytes",
                "--output", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "the input has no documents" in err and "--valid" not in err


def test_inputs_txt_json_parquet_dir_and_glob(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = pydoc_texts(8)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text(texts[0])
    (src / "b.json").write_text(json.dumps([{"body": t} for t in texts[1:3]]))
    write_jsonl(src / "sub" / "c.jsonl", texts[3:5], key="body")
    pq.write_table(pa.table({"body": texts[5:8]}), src / "sub" / "d.parquet")
    for inputs in ([src], [str(src / "*.*"), str(src / "sub" / "*")]):
        out = tmp_path / f"out{len(inputs)}"
        assert e2d2("data", "preprocess", "--input", *inputs, "--tokenizer", "bytes",
                    "--output", out, "--text-key", "body", "--valid-docs", 1) == 0
        assert_documents_are(out, texts)  # sorted path order


def test_datasets_directory_is_streamed(tmp_path):
    import datasets

    texts = pydoc_texts(6)
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "out"
    assert e2d2("data", "preprocess", "--input", tmp_path / "ds", "--tokenizer", "bytes",
                "--output", out, "--valid-docs", 1) == 0
    assert _manifest(out)["train"]["documents"] == 5


# ---- bad input: one clear error, or counted with --skip-bad-records ----


def _bad_corpus(tmp_path, texts):
    lines = [json.dumps({"text": texts[0]}), '{"text": "unterminated', json.dumps({"text": " \n"}),
             json.dumps({"text": texts[1]})]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_json_names_file_and_line(tmp_path, capsys):
    path = _bad_corpus(tmp_path, pydoc_texts(2))
    assert e2d2("data", "preprocess", "--input", path, "--tokenizer", "bytes",
                "--output", tmp_path / "out", "--valid-docs", 1) == 2
    err = capsys.readouterr().err
    assert f"error: {path}:2: malformed JSON" in err and "--skip-bad-records" in err
    assert not list((tmp_path / "out").glob("*.idx"))


def test_skip_bad_records_counts_them(tmp_path):
    texts = pydoc_texts(2)
    path = _bad_corpus(tmp_path, texts)
    out = tmp_path / "out"
    assert e2d2("data", "preprocess", "--input", path, "--tokenizer", "bytes", "--output", out,
                "--valid-docs", 1, "--skip-bad-records") == 0
    manifest = _manifest(out)
    # record order: doc0, bad json, empty, doc1; the skipped records come before doc1, so
    # they count for doc1's split
    assert manifest["train"]["documents"] == 1 and manifest["valid"]["documents"] == 1
    split = "valid" if split_texts(out)[1] == [texts[1]] else "train"
    other = {"train": "valid", "valid": "train"}[split]
    assert manifest[split]["skipped"]["bad_json"] == 1
    assert manifest[split]["skipped"]["empty"] == 1
    assert sum(manifest[other]["skipped"].values()) == 0


def test_empty_documents_are_skipped_and_counted(tmp_path):
    texts = pydoc_texts(3)
    path = write_jsonl(tmp_path / "c.jsonl", [texts[0], "", texts[1], "  \n\t", texts[2]])
    out = tmp_path / "out"
    assert e2d2("data", "preprocess", "--input", path, "--tokenizer", "bytes", "--output", out,
                "--valid-docs", 1) == 0
    manifest = _manifest(out)
    # each empty record counts for the split of the document after it (texts[1], texts[2])
    _, valid = split_texts(out)
    assert manifest["train"]["documents"] == 2 and manifest["valid"]["documents"] == 1
    held = sum(t in valid for t in texts[1:])
    assert manifest["valid"]["skipped"]["empty"] == held
    assert manifest["train"]["skipped"]["empty"] == 2 - held


def test_missing_text_key_is_an_error(tmp_path, capsys):
    texts = pydoc_texts(2)
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": texts[0]}) + "\n" + json.dumps({"content": texts[1]}))
    assert e2d2("data", "preprocess", "--input", path, "--tokenizer", "bytes",
                "--output", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{path}:2: no key 'text' (keys: content)" in err and "--text-key" in err


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "good"}\n{"text": "caf\xe9 \xff"}\n{"text": "lone \\ud800"}\n')
    out = tmp_path / "out"
    assert e2d2("data", "preprocess", "--input", path, "--tokenizer", "bytes", "--output", out,
                "--valid-docs", 1) == 0
    manifest = _manifest(out)
    train, valid = split_texts(out)
    assert sorted(train + valid) == sorted(["good", "caf\ufffd \ufffd", "lone \ufffd\ufffd\ufffd"])
    replaced = {split: sum(t != "good" for t in docs) for split, docs in (("train", train),
                                                                          ("valid", valid))}
    assert {s: manifest[s]["utf8_replaced"] for s in replaced} == replaced


def test_vocabulary_too_large_for_dtype_is_an_error(tmp_path, capsys):
    from tokenizers import Tokenizer, models

    vocab = {f"w{i}": i for i in range(70_000)} | {"<eos>": 70_000}
    tok_dir = tmp_path / "big"
    tok_dir.mkdir()
    Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text('{"eos_token": "<eos>"}')
    corpus = write_jsonl(tmp_path / "c.jsonl", ["w1 w69999", "w2"])
    args = ["data", "preprocess", "--input", corpus, "--tokenizer", tok_dir, "--valid-docs", 1]
    assert e2d2(*args, "--output", tmp_path / "o1", "--dtype", "uint16") == 2
    assert "--dtype uint16 holds ids below 65536, but the tokenizer has" in capsys.readouterr().err
    assert e2d2(*args, "--output", tmp_path / "o2") == 0  # auto picks int32
    assert _manifest(tmp_path / "o2")["dtype"] == "int32"


def test_dtype_fits_the_largest_id_not_the_token_count(tmp_path):
    """A vocabulary with gaps: 6 tokens, but an id of 70000, which uint16 cannot hold."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<eos>": 0, "<|mask|>": 1, "<|bos|>": 2, "<|pad|>": 3, "[UNK]": 4, "hello": 70_000}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tok_dir = tmp_path / "sparse"
    tok_dir.mkdir()
    tokenizer.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text('{"eos_token": "<eos>"}')
    assert load_tokenizer(tok_dir).vocab_size == 6
    corpus = write_jsonl(tmp_path / "c.jsonl", ["hello x", "hello"])
    out = tmp_path / "out"
    assert e2d2("data", "preprocess", "--input", corpus, "--tokenizer", tok_dir,
                "--output", out, "--valid-docs", 1) == 0
    assert _manifest(out)["dtype"] == "int32"
    assert sorted(read_documents(out / "train") + read_documents(out / "valid")) == [
        [70_000, 0], [70_000, 4, 0]
    ]


def test_existing_output_needs_overwrite(tmp_path, data_corpus, capsys):
    texts, corpus = data_corpus
    out = tmp_path / "out"
    args = ["data", "preprocess", "--input", corpus, "--tokenizer", "bytes", "--output", out]
    assert e2d2(*args, "--valid-docs", 2) == 0
    before = output_files(out)
    assert e2d2(*args, "--valid-docs", 5) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert output_files(out) == before
    assert e2d2(*args, "--valid-docs", 5, "--overwrite") == 0
    assert _manifest(out)["valid"]["documents"] == 5


def test_interrupt_leaves_no_complete_looking_output(tmp_path, data_corpus, monkeypatch):
    from data_tools.indexed import IndexedWriter

    _, corpus = data_corpus
    monkeypatch.setattr("data_tools.work.CHUNK_DOCS", 1)  # one document per write
    calls = []
    real = IndexedWriter.add_documents

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(IndexedWriter, "add_documents", interrupted)
    out = tmp_path / "out"
    assert e2d2("data", "preprocess", "--input", corpus, "--tokenizer", "bytes",
                "--output", out) == 130
    assert len(calls) == 20  # interrupted mid-shard, with some documents written
    leftovers = [p.name for p in out.rglob("*") if p.is_file()]
    assert not [n for n in leftovers if n.endswith((".idx", ".bin", ".json"))], leftovers


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_indexed_writer_chunks_and_byte_range_copies_read_back_in_megatron(tmp_path, dtype):
    """Chunked writes and merge's copy of a document range give exactly the documents back
    through megatron-core's own IndexedDataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from data_tools.indexed import IndexedWriter, read_index

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50258, size=n).astype(dtype) for n in (5, 1, 300, 17, 2, 64)]
    writer = IndexedWriter(tmp_path / "ours.bin", dtype)
    writer.add_documents(np.concatenate(docs[:3]), [len(d) for d in docs[:3]])
    writer.add_documents(np.concatenate(docs[3:]), [len(d) for d in docs[3:]])
    writer.finalize(tmp_path / "ours.idx")
    full = IndexedDataset(str(tmp_path / "ours"))
    assert [full[i].tolist() for i in range(len(full))] == [d.tolist() for d in docs]

    _, lengths, _ = read_index(tmp_path / "ours.idx")  # copy docs 2.. as merge does
    part = IndexedWriter(tmp_path / "part.bin", dtype)
    part.add_from(tmp_path / "ours.bin", lengths[2:], int(lengths[:2].sum()) * dtype().itemsize)
    part.finalize(tmp_path / "part.idx")
    dataset = IndexedDataset(str(tmp_path / "part"))
    assert [dataset[i].tolist() for i in range(len(dataset))] == [d.tolist() for d in docs[2:]]
    assert dataset.index.dtype is dtype


# ---- sharding and merge ----


def test_manual_shards_merge_to_the_single_process_output(tmp_path, capsys):
    texts = pydoc_texts(30)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        write_jsonl(src / f"part{i}.jsonl", texts[i * 10 : (i + 1) * 10])
    common = ["data", "preprocess", "--input", src, "--tokenizer", "bytes", "--valid-docs", 12]
    assert e2d2(*common, "--output", tmp_path / "single") == 0
    sharded = tmp_path / "sharded"
    assert e2d2(*common, "--output", sharded, "--num-shards", 2, "--shard-index", 1) == 0
    assert e2d2("data", "merge", sharded) == 2
    assert "shards [0] of 2 are missing" in capsys.readouterr().err
    assert e2d2(*common, "--output", sharded, "--num-shards", 2, "--shard-index", 0) == 0
    shard_docs = [json.loads(p.read_text())["documents"]
                  for p in sorted((sharded / "shards").glob("*.json"))]
    assert shard_docs[0] and shard_docs[1] and sum(shard_docs) == 30  # both shards did work
    assert e2d2("data", "merge", sharded) == 0
    single, merged = output_files(tmp_path / "single"), output_files(sharded)
    assert {k: v for k, v in merged.items() if not k.startswith("shards/")} == single


def test_inspect_reports_counts_histogram_and_sample(tmp_path, data_corpus, capsys):
    texts, corpus = data_corpus
    out = tmp_path / "out"
    assert e2d2("data", "preprocess", "--input", corpus, "--tokenizer", "gpt2",
                "--output", out, "--valid-docs", 4) == 0
    capsys.readouterr()
    assert e2d2("data", "inspect", out, "--json") == 0
    train, valid = json.loads(capsys.readouterr().out)
    lengths = [len(d) for d in read_documents(out / "train")]
    assert train["documents"] == 26 and train["tokens"] == sum(lengths)
    assert train["dtype"] == "uint16" and valid["documents"] == 4
    assert sum(n for _, _, n in train["histogram"]) == 26
    assert all(lo <= min(lengths) for lo, _, _ in train["histogram"][:1])
    assert train["sample"] == texts[0][: len(train["sample"])] and len(train["sample"]) > 50
    assert e2d2("data", "inspect", out / "valid") == 0
    report = capsys.readouterr().out
    assert "4 documents" in report and "first document:" in report
    assert np.median([len(d) for d in read_documents(out / "valid")]) == valid["length_median"]


# ---- review fixes: empty shards, empty splits, unreadable inputs, staged overwrite ----


def test_empty_shards_merge(tmp_path):
    """One compressed file (never split) over 3 shards: two shards own no sources (an empty
    .bin each); another case: a shard whose only records are skipped ones."""
    import gzip

    texts = pydoc_texts(30)
    corpus = tmp_path / "corpus.jsonl.gz"
    corpus.write_bytes(gzip.compress(write_jsonl(tmp_path / "c.jsonl", texts).read_bytes()))
    args = ["data", "preprocess", "--input", corpus, "--tokenizer", "bytes", "--valid-docs", 4]
    assert sorted(sharded_equals_single(args, tmp_path, 3)) == [0, 0, 30]

    src = tmp_path / "src"
    src.mkdir()
    size = write_jsonl(src / "a.jsonl", texts).stat().st_size
    empties = [" ", "\n", ""] * (size // 30)  # more bytes than a.jsonl: shard 1 is all empty
    write_jsonl(src / "b.jsonl", empties)
    out = tmp_path / "skipped"
    common = ["data", "preprocess", "--input", src, "--tokenizer", "bytes", "--valid-docs", 2,
              "--skip-bad-records", "--output", out, "--num-shards", 2]
    for index in range(2):
        assert e2d2(*common, "--shard-index", index) == 0
    assert json.loads((out / "shards" / "shard-00001-of-00002.json").read_text())["documents"] == 0
    assert e2d2("data", "merge", out) == 0
    manifest = _manifest(out)
    assert manifest["train"]["documents"] == 28 and manifest["valid"]["documents"] == 2
    # after the last document: they count for its split
    last = "valid" if texts[-1] in split_texts(out)[1] else "train"
    assert manifest[last]["skipped"]["empty"] == len(empties)


@pytest.mark.parametrize("flag", ["--valid-docs", "--valid-fraction"])
def test_empty_valid_split_is_rejected_up_front(tmp_path, data_corpus, capsys, flag):
    _, corpus = data_corpus
    out = tmp_path / "out"
    assert e2d2("data", "preprocess", "--input", corpus, "--tokenizer", "bytes",
                "--output", out, flag, 0) == 2
    err = capsys.readouterr().err
    assert f"error: {flag} 0" in err and "cannot be empty" in err
    assert not out.exists()


def test_unreadable_inputs_and_file_output_are_clear_errors(tmp_path, data_corpus, capsys):
    _, corpus = data_corpus
    args = ["data", "preprocess", "--tokenizer", "bytes", "--valid-docs", 1]
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet")
    assert e2d2(*args, "--input", bad, "--output", tmp_path / "o1") == 2
    assert f"error: {bad}: not a readable parquet file" in capsys.readouterr().err

    fake = tmp_path / "fake_ds"
    fake.mkdir()
    (fake / "state.json").write_text("{not json")
    assert e2d2(*args, "--input", fake, "--output", tmp_path / "o2") == 2
    assert f"error: {fake}: not a readable datasets directory" in capsys.readouterr().err

    file_out = tmp_path / "taken.txt"
    file_out.write_text("keep me")
    assert e2d2(*args, "--input", corpus, "--output", file_out) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert file_out.read_text() == "keep me"
    assert e2d2(*args, "--input", corpus, "--output", file_out / "sub") == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_glob_matching_a_plain_directory_reads_its_files(tmp_path):
    texts = pydoc_texts(6)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    write_jsonl(src / "a.jsonl", texts[:3])
    write_jsonl(src / "sub" / "b.jsonl", texts[3:])
    out = tmp_path / "out"
    # "src/*" matches a.jsonl and the directory sub; "src/**" also reaches b.jsonl directly
    assert e2d2("data", "preprocess", "--input", str(src / "*"), str(src / "**"),
                "--tokenizer", "bytes", "--output", out, "--valid-docs", 1) == 0
    assert_documents_are(out, texts)  # each file once


def test_failed_overwrite_keeps_the_earlier_result(tmp_path, data_corpus, monkeypatch):
    from data_tools.indexed import IndexedWriter

    _, corpus = data_corpus
    out = tmp_path / "out"
    args = ["data", "preprocess", "--input", corpus, "--tokenizer", "bytes", "--output", out]
    assert e2d2(*args, "--valid-docs", 2) == 0
    before = output_files(out)

    class Failing(IndexedWriter):  # the shard is written; merge fails writing its new files
        def finalize(self, idx_path):
            raise OSError("disk full")

    monkeypatch.setattr("data_tools.merge.IndexedWriter", Failing)
    with pytest.raises(OSError, match="disk full"):
        e2d2(*args, "--valid-docs", 5, "--overwrite")
    assert output_files(out) == before
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_valid_input_is_a_separate_validation_set(tmp_path):
    texts = pydoc_texts(12)
    train_file = write_jsonl(tmp_path / "train.jsonl", texts[:9])
    valid_file = write_jsonl(tmp_path / "valid.jsonl", texts[9:])
    out = tmp_path / "out"
    args = ["data", "preprocess", "--input", train_file, "--tokenizer", "bytes",
            "--valid-input", valid_file]
    assert e2d2(*args, "--output", out) == 0
    assert split_texts(out) == (texts[:9], texts[9:])
    manifest = _manifest(out)
    assert manifest["split"] == {"valid_inputs": [str(valid_file)]}
    assert [s["path"] for s in manifest["sources"]] == [str(train_file), str(valid_file)]
    # shards written apart, then merged: the same result
    sharded = tmp_path / "sharded"
    for index in range(2):
        assert e2d2(*args, "--output", sharded, "--num-shards", 2, "--shard-index", index) == 0
    assert e2d2("data", "merge", sharded) == 0
    assert split_texts(sharded) == (texts[:9], texts[9:])
    empty = write_jsonl(tmp_path / "empty.jsonl", [""])
    assert e2d2("data", "preprocess", "--input", train_file, "--tokenizer", "bytes",
                "--valid-input", empty, "--output", tmp_path / "x") == 2
