"""Damaged data files are found: ``e2d2 data inspect`` (cheap checks), ``--verify``
(checksums, every token id) and ``e2d2 pretrain``'s start-up each end in one error naming
the file and what is wrong (exit 2), never a traceback or full counts of a damaged file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from pretrain_helpers import TINY, run_pretrain, write_config

from data_tools.corpus import iter_documents
from data_tools.verify import DataError, _read_index, file_sha256
from e2d2.errors import UserError
from launchers.cli import main as e2d2_main
from launchers.config import run_config_from_dict
from launchers.inputs import load_run_tokenizer

VOCAB = 260  # the bytes tokenizer's: ids 0-258 and [MASK] 259


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("verify")
    corpus = root / "kjv.jsonl"
    with open(corpus, "w") as f:
        for _, text in zip(range(40), iter_documents("kjv"), strict=False):
            f.write(json.dumps({"text": text}) + "\n")
    assert e2d2_main(["data", "preprocess", "--input", str(corpus), "--tokenizer", "bytes",
                      "--output", str(root / "data"), "--valid-docs", "5"]) == 0
    return root / "data"


@pytest.fixture
def data(clean, tmp_path) -> Path:
    """A copy of the clean dataset to damage."""
    return Path(shutil.copytree(clean, tmp_path / "data"))


def inspect(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = e2d2_main(["data", "inspect", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def edit_manifest(directory: Path, edit) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_the_manifest_records_checksums_and_the_largest_id(clean, capsys):
    manifest = json.loads((clean / "manifest.json").read_text())
    for split in ("train", "valid"):
        tokens = np.fromfile(clean / f"{split}.bin", dtype=np.uint16)
        assert manifest[split]["max_id"] == int(tokens.max())
        assert manifest[split]["bin_sha256"] == file_sha256(clean / f"{split}.bin")
        assert manifest[split]["idx_sha256"] == file_sha256(clean / f"{split}.idx")
    code, out, _ = inspect(capsys, clean, "--verify")
    assert code == 0 and "verified: sizes, counts, checksums and every token id" in out
    assert "note:" not in out


def test_the_index_reader_reads_what_megatron_core_reads(clean):
    # The check reads .idx files with numpy (no torch on a login node): the same arrays as
    # megatron-core's own reader, or its format changed under us.
    from megatron.core.datasets.indexed_dataset import _IndexReader

    for split in ("train", "valid"):
        theirs = _IndexReader(str(clean / f"{split}.idx"), multimodal=False)
        dtype, lengths, pointers, documents = _read_index(clean / split)
        assert dtype is theirs.dtype
        for ours, their in ((lengths, theirs.sequence_lengths), (pointers, theirs.sequence_pointers),
                            (documents, theirs.document_indices)):
            assert ours.dtype == their.dtype and np.array_equal(ours, their)


@pytest.mark.parametrize(("damage", "named"), [
    (lambda d: os.truncate(d / "train.bin", (d / "train.bin").stat().st_size - 10),
     "train.bin is damaged: "),
    (lambda d: write_at(d / "train.idx", 34 + 8, (-65219).to_bytes(4, "little", signed=True)),
     "train.idx is damaged: document 2 has length -65219"),
    (lambda d: os.truncate(d / "train.idx", (d / "train.idx").stat().st_size - 20),
     "train.idx is damaged: it cannot be read as a megatron-core index"),
    (lambda d: write_at(d / "valid.idx", 0, b"NOTANIDX"),
     "valid.idx is damaged: it cannot be read as a megatron-core index (not a megatron-core"),
    (lambda d: (d / "valid.idx").write_bytes((d / "valid.idx").read_bytes() + b"\0" * 8),
     "valid.idx is damaged: "),
    (lambda d: edit_manifest(d, lambda m: m["train"].update(tokens=m["train"]["tokens"] + 1)),
     "train.idx: tokens "),
])
def test_inspect_refuses_a_damaged_dataset(data, capsys, damage, named):
    damage(data)
    code, out, err = inspect(capsys, data)
    assert code == 2 and named in err, err
    assert "Traceback" not in err and "documents" not in out
    # the same checks for one prefix, e.g. `inspect DIR/train`
    assert inspect(capsys, data / named.split(".")[0])[0] == 2


def test_verify_finds_an_out_of_vocabulary_id_that_the_cheap_checks_cannot(data, capsys):
    write_at(data / "train.bin", 2 * 100, (300).to_bytes(2, "little"))
    assert inspect(capsys, data)[0] == 0  # sizes and counts are intact
    code, _, err = inspect(capsys, data, "--verify")
    assert code == 2
    assert f"train.bin: token 100 has id 300, not below {VOCAB}" in err


def test_verify_finds_a_changed_token_by_its_checksum(data, capsys):
    write_at(data / "train.bin", 2 * 100, (65).to_bytes(2, "little"))  # a valid id
    code, _, err = inspect(capsys, data, "--verify")
    assert code == 2 and "train.bin is damaged: its sha256 is" in err


def test_verify_of_an_older_manifest_says_what_it_cannot_check(data, capsys):
    def older(manifest):
        for split in ("train", "valid"):
            for key in ("bin_sha256", "idx_sha256", "max_id"):
                del manifest[split][key]

    edit_manifest(data, older)
    code, out, _ = inspect(capsys, data)
    assert code == 0 and "records no largest token id" in out
    code, out, _ = inspect(capsys, data, "--verify")
    assert code == 0 and out.count("records no checksum") == 4


def run_config(data: Path, **model):
    return run_config_from_dict({**TINY, "model": {**TINY["model"], **model},
                                 "data": {"path": str(data)}})


def test_pretrain_start_up_runs_the_cheap_checks(data):
    assert load_run_tokenizer(run_config(data)).id_bound == VOCAB
    edit_manifest(data, lambda m: m["valid"].update(max_id=259))  # as if [MASK] were in it
    with pytest.raises(DataError, match=r"valid.bin holds token id 259, the \[MASK\] id"):
        load_run_tokenizer(run_config(data))
    os.truncate(data / "train.bin", 100)
    with pytest.raises(DataError, match="train.bin is damaged"):
        load_run_tokenizer(run_config(data))


@pytest.mark.slow
def test_pretrain_on_a_truncated_file_is_one_error(data, tmp_path):
    os.truncate(data / "train.bin", (data / "train.bin").stat().st_size // 2)
    config = write_config(tmp_path / "run.yaml", data={"path": str(data)})
    result = run_pretrain(config, f"run.dir={tmp_path / 'run'}", nproc=2)
    assert result.returncode == 2, result.stderr
    assert "train.bin is damaged" in result.stderr and "Traceback" not in result.stderr


def test_training_stops_at_an_id_the_start_up_check_cannot_see(data, tmp_path):
    from launchers.data import PretrainData

    tokenizer = load_run_tokenizer(run_config(data))
    np.memmap(data / "train.bin", dtype=np.uint16, mode="r+")[:] = 300  # sizes intact
    cfg = run_config(data)
    pretrain_data = PretrainData(cfg, tokenizer, 0, 1, 2, tmp_path / "cache",
                                 train_samples=cfg.train.steps * cfg.train.batch_size)
    with pytest.raises(UserError, match=f"token id 300, not below model.vocab_size={VOCAB}"):
        next(pretrain_data.train_steps(0))
