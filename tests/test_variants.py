"""A variant is its stream plan (`e2d2.variants`) and nothing else: a variant registered only
as a plan, under a new name, trains, counts FLOPs, samples and runs in the parallel engine
exactly like the built-in variant whose plan it reuses. So no module outside the plan table
keys on a variant's name, and adding a variant is one entry in ``PLANS``."""

from __future__ import annotations

import contextlib

import pytest
import torch

from e2d2 import flops
from e2d2.config import DiffusionConfig, ModelConfig
from e2d2.diffusion import DiffusionObjective
from e2d2.model import DiffusionLM
from e2d2.sampling import SamplerConfig, sample_prompts
from e2d2.variants import PLANS
from megatron_ext.layout import ParallelConfig
from megatron_ext.testing import spawn_gloo
from megatron_ext.verify import Run, compare, parallel_run, reference_run, tiny_model_config

BUILT_IN = ("e2d2", "e2d2_shared_kv", "bd3lm", "mdlm", "ar")


@contextlib.contextmanager
def renamed_plans():
    """Every built-in plan also under ``<name>_renamed``."""
    added = {f"{name}_renamed": PLANS[name] for name in BUILT_IN}
    PLANS.update(added)
    try:
        yield
    finally:
        for name in added:
            del PLANS[name]


def _pair(name: str, **overrides) -> tuple[ModelConfig, ModelConfig]:
    cfg = tiny_model_config(name, **overrides)
    return cfg, cfg.replace(variant=f"{name}_renamed")


@pytest.mark.parametrize("name", BUILT_IN)
def test_a_plan_alone_defines_the_reference_model_its_loss_flops_and_sampler(name):
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 63, (3, 16), generator=generator)
    # a prompt ending mid-block and a padded row: the masks' hardest inputs
    context = torch.zeros(3, 16, dtype=torch.bool)
    context[:, :6] = True
    padding = torch.ones(3, 16, dtype=torch.bool)
    padding[2, 13:] = False
    with renamed_plans():
        cfg, renamed = _pair(name)
        model, twin = DiffusionLM(cfg, seed=3), DiffusionLM(renamed, seed=3)
        assert model.state_dict().keys() == twin.state_dict().keys()
        losses = [DiffusionObjective(c, DiffusionConfig()).loss(
            m, x0, padding, context, generator=torch.Generator().manual_seed(1))
            for c, m in ((cfg, model), (renamed, twin))]
        assert torch.equal(losses[0], losses[1])
        assert flops.training_flops_per_token(cfg) == flops.training_flops_per_token(renamed)
        assert flops.sampling_flops_per_token(cfg, 5, 8, 2) == \
            flops.sampling_flops_per_token(renamed, 5, 8, 2)
        sampler = SamplerConfig(steps=2, max_new_tokens=8)
        prompts = [[1, 2, 3, 4, 5], [7]]
        assert sample_prompts(model, prompts, sampler, seeds=[4, 5]) == \
            sample_prompts(twin, prompts, sampler, seeds=[4, 5])


def _engine_world(rank: int) -> dict:
    cases = {"e2d2": ParallelConfig(2, pipeline_parallel=2, encoder_pipeline_stages=1),
             "e2d2_shared_kv": ParallelConfig(2, tensor_parallel=2),
             "bd3lm": ParallelConfig(2, pipeline_parallel=2),
             "mdlm": ParallelConfig(2, tensor_parallel=2),
             "ar": ParallelConfig(2, tensor_parallel=2)}
    run = Run(prompt_and_padding=True)
    out = {}
    with renamed_plans():
        for name, parallel in cases.items():
            cfg, renamed = _pair(name)
            out[name] = {"layout": parallel.name, "reference": reference_run(cfg, run),
                         "renamed": parallel_run(renamed, parallel, run)}
    return out


@pytest.mark.slow
def test_a_plan_alone_defines_the_parallel_engine_under_tp_and_pp():
    """The renamed variants on the engine (E2D2 and BD3-LM over two pipeline stages, the
    others at TP2) match the built-in variants' single-process reference."""
    results = spawn_gloo(_engine_world, 2)
    for name, case in results[0].items():
        ranks = [r[name]["renamed"] for r in results]
        problems = compare(case["reference"], ranks, atol=1e-5, steps_atol=1e-5)
        assert problems == [], f"{name} {case['layout']}: {problems}"
