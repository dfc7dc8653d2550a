"""``e2d2 eval``: the two data conventions, the token-weighted statistics, the same number at
every layout, and agreement with the run's own last evaluation."""

from __future__ import annotations

import argparse
import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_tools.corpus import iter_documents
from data_tools.tokenizer import load_tokenizer
from e2d2.evaluate import token_weighted_nelbo
from launchers.eval.data import eval_rows

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_helpers import make_data_dir, run_pretrain, write_config  # noqa: E402


def _raw(root: Path, documents: int = 6) -> Path:
    path = root / "held_out.jsonl.gz"
    texts = [t for _, t in zip(range(400 + documents), iter_documents("kjv"), strict=False)][400:]
    with gzip.open(path, "wt") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return path


def test_document_convention_starts_each_document_with_a_clean_prompt_token(tmp_path):
    tok = load_tokenizer("bytes")
    path = _raw(tmp_path, 3)
    rows = eval_rows([str(path)], tok, seq_length=32, block_size=4, convention="document",
                     cache_dir=tmp_path)
    texts = [json.loads(line)["text"] for line in gzip.open(path, "rt")]
    lengths = [len(tok.encode(t)) + 2 for t in texts]  # BOS (= EOD) before, EOD after
    assert len(rows) == sum(math.ceil((n - 1) / 31) for n in lengths)  # 1 token of overlap
    assert int(rows.context_mask.sum()) == len(rows)  # each chunk starts with a clean prompt
    scored = rows.attention_mask & ~rows.context_mask
    assert int(scored.sum()) == sum(n - 1 for n in lengths)  # every token once, no padding
    assert rows.x0[0, 0] == tok.eod and rows.x0[1, 0] == rows.x0[0, 31]
    packed = eval_rows([str(path)], tok, seq_length=32, block_size=4, convention="packed",
                       cache_dir=tmp_path)
    assert int(packed.attention_mask.sum()) == sum(n - 1 for n in lengths)
    assert not packed.context_mask.any()


def test_token_weighted_errors_are_the_sequence_std_for_equal_lengths():
    g = torch.Generator().manual_seed(0)
    nats = torch.rand(50, 4, generator=g, dtype=torch.float64) * 10
    equal = token_weighted_nelbo(nats, torch.full((50,), 10))
    per_token = nats.mean(1) / 10
    assert equal.nelbo == pytest.approx(per_token.mean().item())
    assert equal.sequence_std_error == pytest.approx(per_token.std().item() / math.sqrt(50))
    assert equal.std_error == pytest.approx((nats.var(1).mean() / 200).sqrt().item() / 10)
    # unequal lengths: total nats over total tokens; empty rows dropped
    tokens = torch.tensor([10] * 25 + [30] * 24 + [0])
    weighted = token_weighted_nelbo(nats, tokens)
    assert weighted.sequences == 49
    assert weighted.nelbo == pytest.approx((nats.mean(1)[:49].sum() / tokens.sum()).item())
    assert token_weighted_nelbo(nats[:, :1], tokens, exact=True).std_error == 0.0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_run")
    data = make_data_dir(root)
    config = write_config(root / "tiny.yaml", run={"dir": str(root / "run")},
                          data={"path": str(data)}, train={"steps": 2, "eval_draws": 2})
    done = run_pretrain(config)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run", data, _raw(root)


def _args(run_dir, data, convention, overrides=()):
    return argparse.Namespace(checkpoint=str(run_dir), overrides=list(overrides), data=[str(data)],
                              split="valid", convention=convention, draws=2, max_sequences=None,
                              ema=False, json=True, nproc_per_node=None)


LAYOUTS = {"tp2": ["parallel.tensor_parallel=2"],
           "pp2": ["parallel.pipeline_parallel=2", "parallel.encoder_pipeline_stages=1"],
           "dp2": []}


def _layouts_body(rank, layouts, run_dir, data, raw):
    from launchers.eval.nelbo import _evaluate, _setup

    out = {}
    for name, overrides in layouts.items():
        for convention, path in (("packed", data), ("document", raw)):
            args = _args(run_dir, path, convention, overrides)
            record = _evaluate(args, *_setup(args))
            if rank == 0:
                out[name, convention] = record
    return out


@pytest.fixture(scope="module")
def layouts(run):
    """One gloo world of 2 for every layout, and one process for the reference."""
    from megatron_ext.testing import spawn_gloo

    results = spawn_gloo(_layouts_body, 2, LAYOUTS, *run)[0]
    results.update(spawn_gloo(_layouts_body, 1, {"single": []}, *run)[0])
    return results


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("convention", ["packed", "document"])
def test_every_layout_gives_the_single_process_number(layouts, layout, convention):
    got, reference = layouts[layout, convention], layouts["single", convention]
    assert got["layout"] != reference["layout"]
    for key in ("nelbo", "nelbo_std_error", "nelbo_mc_std_error"):
        assert got[key] == pytest.approx(reference[key], abs=1e-5), key
    assert (got["tokens"], got["sequences"]) == (reference["tokens"], reference["sequences"])


@pytest.mark.slow
def test_the_local_launcher_gives_the_single_process_number(run, layouts):
    # `e2d2 eval --nproc-per-node 2`: the launcher's ranks (DP2) through the command line
    run_dir, data, _ = run
    done = subprocess.run([sys.executable, "-m", "launchers.cli", "eval", str(run_dir), "--data",
                           str(data), "--draws", "2", "--json", "--nproc-per-node", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["nelbo"] == pytest.approx(layouts["single", "packed"]["nelbo"], abs=1e-5)


@pytest.mark.slow
def test_eval_on_the_runs_own_validation_data_reproduces_its_last_evaluation(run):
    run_dir, data, _ = run
    last = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if '"nelbo"' in line][-1]
    cmd = [sys.executable, "-m", "launchers.cli", "eval", str(run_dir), "--data", str(data),
           "--max-sequences", str(last["eval_sequences"]), "--json"]  # draws: train.eval_draws
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["nelbo"] == pytest.approx(last["nelbo"], abs=1e-6)
    assert result["draws"] == 2 and result["sequences"] == last["eval_sequences"]
    written = [json.loads(line) for line in open(run_dir / "eval.jsonl")]
    assert written[-1] == result


@pytest.mark.slow
def test_ema_evaluation_reproduces_the_runs_last_evaluation_of_its_ema(run, tmp_path):
    # A run that keeps an EMA evaluates with it; `e2d2 eval --ema` reads only the checkpoint's
    # EMA tensors (nothing drawn first) and must give the same number.
    _, data, _ = run
    config = write_config(tmp_path / "ema.yaml", run={"dir": str(tmp_path / "run")},
                          data={"path": str(data)},
                          train={"steps": 2, "eval_draws": 1, "ema_decay": 0.5})
    done = run_pretrain(config)
    assert done.returncode == 0, done.stderr[-3000:]
    last = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")
            if '"nelbo"' in line][-1]
    cmd = [sys.executable, "-m", "launchers.cli", "eval", str(tmp_path / "run"), "--data",
           str(data), "--max-sequences", str(last["eval_sequences"]), "--json"]
    ema = subprocess.run([*cmd, "--ema"], capture_output=True, text=True, timeout=300)
    assert ema.returncode == 0, ema.stderr[-3000:]
    assert json.loads(ema.stdout.splitlines()[-1])["nelbo"] == pytest.approx(last["nelbo"], abs=1e-6)
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert abs(json.loads(plain.stdout.splitlines()[-1])["nelbo"] - last["nelbo"]) > 1e-4
    # the run without an EMA: one clear error
    none = subprocess.run([*cmd[:4], str(run[0]), *cmd[5:], "--ema"], capture_output=True,
                          text=True, timeout=300)
    assert none.returncode == 2 and "the run kept no EMA" in none.stderr, none.stderr[-2000:]


def test_bad_input_is_one_clear_error(tmp_path):
    from launchers.cli import main

    assert main(["eval", str(tmp_path), "--data", str(tmp_path)]) == 2
