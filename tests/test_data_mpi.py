"""A real `mpirun -n 2` preprocess: one shard per rank, merged on rank 0."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_data_helpers import e2d2, output_files, pydoc_texts, write_jsonl

MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")


def mpirun_e2d2(*args) -> subprocess.CompletedProcess:
    """``mpirun -n 2 e2d2 ARGS`` (as root, this checkout first on the path); it must succeed."""
    env = os.environ | {
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    command = [MPIRUN, "-n", "2", "--oversubscribe", sys.executable, "-m", "launchers.cli", *map(str, args)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.skipif(MPIRUN is None, reason="mpirun not found (pip install 'e2d2[mpi]')")
def test_mpi_shards_merge_to_the_single_process_output(tmp_path):
    texts = pydoc_texts(24)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        write_jsonl(src / f"part{i}.jsonl", texts[i * 6 : (i + 1) * 6])
    args = ["data", "preprocess", "--input", src, "--tokenizer", "gpt2", "--valid-docs", 5]
    assert e2d2(*args, "--output", tmp_path / "single") == 0

    result = mpirun_e2d2(*args, "--output", tmp_path / "mpi")
    assert "shard 1/2" in result.stderr and "shard 2/2" in result.stderr  # both ranks worked
    assert output_files(tmp_path / "mpi") == output_files(tmp_path / "single")
    assert not list((tmp_path / "mpi").glob(".shards-*"))  # staging removed


@pytest.mark.slow
@pytest.mark.skipif(MPIRUN is None, reason="mpirun not found (pip install 'e2d2[mpi]')")
@pytest.mark.parametrize("name", ["corpus.jsonl", "corpus.jsonl.gz"])
def test_mpi_with_one_input_file(tmp_path, name):
    """`mpirun -n 2` with one file: a jsonl is split by byte range over both ranks; a
    compressed file cannot be split, so rank 1 owns nothing and writes a 0-document shard."""
    from data_tools.sources import expand_inputs
    from data_tools.split import assign_pieces

    plain = write_jsonl(tmp_path / "plain.jsonl", pydoc_texts(12))
    corpus = tmp_path / name
    corpus.write_bytes(gzip.compress(plain.read_bytes()) if name.endswith(".gz")
                       else plain.read_bytes())
    sources = expand_inputs([str(corpus)])
    ranks_with_work = sum(bool(assign_pieces(sources, 2, rank)) for rank in range(2))
    assert ranks_with_work == (1 if name.endswith(".gz") else 2)
    args = ["data", "preprocess", "--input", corpus, "--tokenizer", "bytes", "--valid-docs", 2]
    assert e2d2(*args, "--output", tmp_path / "single") == 0
    mpirun_e2d2(*args, "--output", tmp_path / "mpi")
    assert output_files(tmp_path / "mpi") == output_files(tmp_path / "single")
