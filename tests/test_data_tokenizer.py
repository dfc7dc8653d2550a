"""Tokenizers (gpt2, bytes, trained BPE, local directory) and the embedded corpora."""

from __future__ import annotations

import pickle

import pytest
from test_data_helpers import e2d2, pydoc_texts, write_jsonl

from data_tools.corpus import iter_documents, write_corpus
from data_tools.tokenizer import load_tokenizer
from e2d2.errors import UserError

TEXT = "Héllo wörld, <|endoftext|> is text here. 😀\n\tEnd"


def test_gpt2_matches_official_ids_and_paper_vocab():
    tok = load_tokenizer("gpt2")
    assert tok.vocab_size == 50258
    # tiktoken gpt2 ids of these strings
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the quick brown fox") == [262, 2068, 7586, 21831]
    assert (tok.eod, tok.mask_id) == (50256, 50257)
    assert tok.decode(tok.encode(TEXT)) == TEXT


def test_literal_special_token_text_is_not_a_special_id():
    for spec in ("gpt2", "bytes"):
        tok = load_tokenizer(spec)
        ids = tok.encode("a<|endoftext|>b")
        assert tok.eod not in ids and tok.decode(ids) == "a<|endoftext|>b"


def test_bytes_tokenizer_is_utf8_bytes_with_distinct_specials():
    tok = load_tokenizer("bytes")
    assert tok.encode(TEXT) == list(TEXT.encode("utf-8"))
    assert tok.encode_batch([TEXT, "x"]) == [list(TEXT.encode("utf-8")), [120]]
    specials = [tok.eod, tok.mask_id, tok.pad, tok.bos]
    assert len(set(specials)) == 4 and all(256 <= s < tok.vocab_size for s in specials)
    # decode tolerates specials and broken UTF-8 (a lone continuation byte)
    assert tok.decode([72, tok.mask_id, 0x80, tok.eod, 105]) == "H<|mask|>\ufffd<|endoftext|>i"


def test_pickled_tokenizer_is_identical():
    tok = load_tokenizer("gpt2")
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.sha256 == tok.sha256 and clone.encode(TEXT) == tok.encode(TEXT)


@pytest.mark.parametrize("spec", ["gpt2", "bytes"])
def test_saved_directory_loads_in_transformers_and_back(tmp_path, spec):
    from transformers import AutoTokenizer

    tok = load_tokenizer(spec)
    tok.save(tmp_path / "tok")
    hf = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert hf.encode("Hello world", add_special_tokens=False) == tok.encode("Hello world")
    assert (hf.eos_token_id, hf.mask_token_id) == (tok.eod, tok.mask_id)
    assert load_tokenizer(tmp_path / "tok").identity == tok.identity


def test_foreign_directory_without_mask_gets_one_added(tmp_path):
    from tokenizers import Tokenizer, models

    words = {"<eos>": 0, "hello": 1, "[UNK]": 2}
    Tokenizer(models.WordLevel(words, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<eos>"}')
    tok = load_tokenizer(tmp_path)
    assert tok.eod == 0 and tok.vocab_size == 6  # + mask, bos, pad
    assert len({tok.eod, tok.mask_id, tok.bos, tok.pad}) == 4


def test_unknown_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="gpt2, bytes, or a tokenizer directory"):
        load_tokenizer("gpt5")
    with pytest.raises(UserError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_train_tokenizer_cli(tmp_path):
    from transformers import AutoTokenizer

    corpus = write_jsonl(tmp_path / "c.jsonl", pydoc_texts(20))
    out = tmp_path / "bpe"
    assert e2d2("data", "train-tokenizer", "--input", corpus, "--output", out,
                "--vocab-size", 400) == 0
    tok = load_tokenizer(out)
    assert tok.vocab_size == 400
    assert len({tok.eod, tok.mask_id, tok.bos, tok.pad}) == 4
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert len(tok.encode("the statement")) < len("the statement")  # merges were learned
    hf = AutoTokenizer.from_pretrained(out)
    plain = "Héllo wörld, the assert statement 😀"
    assert hf.encode(plain, add_special_tokens=False) == tok.encode(plain)
    assert e2d2("data", "train-tokenizer", "--input", corpus, "--output", out) == 2


@pytest.mark.parametrize("name,minimum", [("kjv", 4000), ("shakespeare", 30), ("pydoc", 70)])
def test_embedded_corpora(name, minimum):
    docs = list(iter_documents(name))
    assert len(docs) >= minimum and all(d.strip() for d in docs)
    assert docs[:3] == list(iter_documents(name))[:3]  # fixed order


def test_corpus_written_as_jsonl(tmp_path):
    assert e2d2("data", "corpus", "pydoc", "--output", tmp_path / "p.jsonl") == 0
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert len(lines) == write_corpus("pydoc", tmp_path / "q.jsonl")
    with pytest.raises(UserError, match="unknown corpus"):
        list(iter_documents("bible"))


def test_train_tokenizer_overwrite_keeps_other_files(tmp_path, capsys):
    """--overwrite replaces the tokenizer's files only: an input corpus in --output survives."""
    out = tmp_path / "dir"
    out.mkdir()
    corpus = write_jsonl(out / "corpus.jsonl", pydoc_texts(20))
    corpus_bytes = corpus.read_bytes()
    args = ["data", "train-tokenizer", "--input", corpus, "--output", out]
    assert e2d2(*args, "--vocab-size", 300) == 0  # into a directory holding only the corpus
    assert e2d2(*args, "--vocab-size", 400) == 2
    assert "already holds tokenizer.json" in capsys.readouterr().err
    assert load_tokenizer(out).vocab_size == 300
    assert e2d2(*args, "--vocab-size", 400, "--overwrite") == 0
    assert load_tokenizer(out).vocab_size == 400
    assert corpus.read_bytes() == corpus_bytes
    assert sorted(p.name for p in out.iterdir()) == [
        "corpus.jsonl", "tokenizer.json", "tokenizer_config.json"
    ]
    file_out = tmp_path / "taken"
    file_out.write_text("keep me")
    assert e2d2("data", "train-tokenizer", "--input", corpus, "--output", file_out) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert file_out.read_text() == "keep me"


def test_corpus_needs_overwrite_to_replace_a_file(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text("mine\n")
    assert e2d2("data", "corpus", "pydoc", "--output", path) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert path.read_text() == "mine\n"
    assert e2d2("data", "corpus", "pydoc", "--output", path, "--overwrite") == 0
    assert len(path.read_text().splitlines()) == write_corpus("pydoc", tmp_path / "q.jsonl")
    assert e2d2("data", "corpus", "pydoc", "--output", tmp_path) == 2
    assert "is a directory" in capsys.readouterr().err
