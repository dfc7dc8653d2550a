"""The parallel engine equals the reference model with an annealed mask (ratio 0.5) and the
shift: loss, every gradient and three optimizer steps under TP2, PP2 (E2D2: one encoder and
one decoder stage, so the shifted noisy stream is embedded on stage 1) and TP2 with
sequence parallelism. The comparison is ``megatron_ext.verify``'s, as in
tests/test_parallel_equivalence.py."""

from __future__ import annotations

import pytest

from megatron_ext.layout import ParallelConfig
from megatron_ext.testing import spawn_gloo
from megatron_ext.verify import Run, compare, parallel_run, reference_run
from megatron_ext.verify import tiny_model_config as model_config

STEPS_ATOL = 1e-5  # as tests/test_parallel_equivalence.py
HALF = Run(anneal_steps=4, anneal_at=2)
HALF_PROMPT_PAD = Run(anneal_steps=4, anneal_at=2, prompt_and_padding=True)

CASES = {  # name: (model config, run, layouts)
    "e2d2": (model_config("e2d2", shift=True), HALF_PROMPT_PAD, [
        ParallelConfig(2, tensor_parallel=2),
        ParallelConfig(2, pipeline_parallel=2, encoder_pipeline_stages=1),
    ]),
    "e2d2_shared_kv": (model_config("e2d2_shared_kv", shift=True), HALF,
                       [ParallelConfig(2, tensor_parallel=2)]),
    "bd3lm": (model_config("bd3lm", shift=True), HALF_PROMPT_PAD, [
        ParallelConfig(2, pipeline_parallel=2),
        ParallelConfig(2, tensor_parallel=2, sequence_parallel=True),
    ]),
    "mdlm": (model_config("mdlm", shift=True), HALF, [ParallelConfig(2, tensor_parallel=2)]),
}


def _world2(rank: int) -> dict:
    out = {}
    for case, (cfg, run, layouts) in CASES.items():
        out[case] = {"reference": reference_run(cfg, run)}
        for parallel in layouts:
            # two rows per micro-batch under sequence parallelism (see test_parallel_equivalence)
            layout_run = Run(**{**run.__dict__, "micro_batch": 2}) if parallel.sequence_parallel else run
            out[case][parallel.name] = parallel_run(cfg, parallel, layout_run)
    return out


@pytest.fixture(scope="module")
def world2() -> list[dict]:
    return spawn_gloo(_world2, 2)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_parallel_equals_reference_with_anneal_and_shift(world2, case):
    reference = world2[0][case]["reference"]
    assert reference["losses"][-1] < reference["losses"][0], "reference does not train"
    for name in (n for n in world2[0][case] if n != "reference"):
        problems = compare(reference, [r[case][name] for r in world2], 1e-5, STEPS_ATOL)
        assert not problems, f"{case} {name}:\n" + "\n".join(problems[:10])
