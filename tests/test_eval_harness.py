"""The lm-eval model ``e2d2``: batch-size invariance, AR exactness against the HF export,
generation with stop strings, and ``e2d2 lm-eval`` on the offline task pack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lm_eval")

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_helpers import make_data_dir, run_pretrain, write_config  # noqa: E402

from launchers.eval.harness import E2D2Harness  # noqa: E402

REQUESTS = [("In the beginning God", " created the heaven"), ("", " And God said"),
            ("And the earth was ", "without form, and void; and darkness was upon the deep"),
            ("Let there be light", ": and there was light."), ("The LORD", " is my shepherd"),
            ("Blessed are the meek: for they shall", " inherit the earth."), ("a", " b"),
            ("Jesus wept", ".")]


def _requests(args):
    return [SimpleNamespace(args=a) for a in args]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny E2D2 run and a tiny AR run, 2 steps each, on bytes-tokenized KJV."""
    root = tmp_path_factory.mktemp("harness")
    data = make_data_dir(root, documents=120)
    out = {}
    for variant, layers in (("e2d2", {"num_decoder_layers": 1}), ("ar", {"num_decoder_layers": 0})):
        config = write_config(root / f"{variant}.yaml", run={"dir": str(root / variant)},
                              data={"path": str(data)}, train={"steps": 2},
                              model={"variant": variant, **layers})
        done = run_pretrain(config)
        assert done.returncode == 0, done.stderr[-3000:]
        out[variant] = root / variant
    return out


@pytest.mark.slow
def test_results_do_not_depend_on_the_batch_size(runs):
    one = E2D2Harness(str(runs["e2d2"]), mc_draws=8, batch_size=1)
    eight = E2D2Harness(str(runs["e2d2"]), mc_draws=8, batch_size=8)
    a, b = one.loglikelihood(_requests(REQUESTS)), eight.loglikelihood(_requests(REQUESTS))
    assert [g for _, g in a] == [g for _, g in b]
    # the same draws; only float32 rounding of the padded batch may differ
    assert [v for v, _ in a] == pytest.approx([v for v, _ in b], abs=1e-4)
    rolling = [("In the beginning God created the heaven and the earth. " * 2,)]
    assert one.loglikelihood_rolling(_requests(rolling)) == pytest.approx(
        eight.loglikelihood_rolling(_requests(rolling)), abs=1e-4)
    # the request's own seed: reordering the batch changes nothing
    c = eight.loglikelihood(_requests(REQUESTS[::-1]))[::-1]
    assert [v for v, _ in c] == pytest.approx([v for v, _ in b], abs=1e-4)


@pytest.mark.slow
def test_ar_loglikelihood_is_exact_and_matches_the_hf_export(runs, tmp_path):
    from launchers.cli import main

    harness = E2D2Harness(str(runs["ar"]), batch_size=4)
    got = harness.loglikelihood(_requests(REQUESTS))
    model = harness.model
    export = tmp_path / "hf"
    assert main(["export-hf", str(runs["ar"]), str(export)]) == 0
    from transformers import AutoModelForMaskedLM

    hf = AutoModelForMaskedLM.from_pretrained(export, trust_remote_code=True).eval()
    from_export = E2D2Harness(str(export), batch_size=3).loglikelihood(_requests(REQUESTS))
    for (context, continuation), (value, greedy), (value_export, _) in zip(REQUESTS, got, from_export,
                                                                           strict=True):
        # the exact sum over the rows the request is scored on (one, or the pieces of a
        # continuation longer than seq_length, each after the tokens before it)
        exact = by_hf = 0.0
        argmax = True
        for row, prompt in harness._rows(*harness._encode_pair(context, continuation)):
            ids = torch.tensor([row])
            with torch.no_grad():
                logp = model(ids).double().log_softmax(-1)[0]
                hf_logp = hf(input_ids=ids).logits.double().log_softmax(-1)[0]
            exact += sum(logp[i - 1, row[i]].item() for i in range(prompt, len(row)))
            by_hf += sum(hf_logp[i - 1, row[i]].item() for i in range(prompt, len(row)))
            argmax &= all(logp[i - 1].argmax().item() == row[i] for i in range(prompt, len(row)))
        assert value == pytest.approx(exact, abs=1e-4)
        assert value == pytest.approx(by_hf, abs=1e-4)
        assert value_export == pytest.approx(exact, abs=1e-4)
        assert greedy == argmax


@pytest.mark.slow
def test_generate_until_batches_mixed_prompts_and_stops_at_the_stop_string(runs):
    harness = E2D2Harness(str(runs["e2d2"]), batch_size=4, temperature=0.0)
    kwargs = {"until": ["e"], "max_gen_toks": 12}
    prompts = [("And God said, ", kwargs), ("In the beginning God created the heaven ", kwargs),
               ("Amen", kwargs)]
    together = harness.generate_until(_requests(prompts))
    alone = [harness.generate_until(_requests([p]))[0] for p in prompts]
    assert together == alone
    assert all("e" not in text for text in together)


@pytest.mark.slow
def test_lm_eval_command_runs_the_offline_task_pack(runs, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "E2D2_TASK_PACK": str(tmp_path / "pack"), "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    cmd = [sys.executable, "-m", "launchers.cli", "lm-eval", "--model_args",
           f"pretrained={runs['e2d2']},mc_draws=2", "--tasks", "kjv_cloze,kjv_lastword",
           "--limit", "4", "--batch_size", "8", "--output_path", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    assert 0.0 <= results["kjv_cloze"]["acc,none"] <= 1.0
    assert "perplexity,none" in results["kjv_lastword"]
