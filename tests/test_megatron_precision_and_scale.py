"""The engine's precision and scale options against the reference and against themselves.

* bf16 (megatron's ``Float16Module``, fp32 gradient buffers, the mixed-precision and the
  distributed optimizer with fp32 main parameters) against the fp32 reference model within
  bf16 tolerance: one process, TP2 (also with sequence parallelism), PP2, DP2 with the
  distributed optimizer and interleaved PP2 x DP2 (gloo all-reduces, all-gathers, reduce-scatters and sends bf16 on
  this torch build);
* ``overlap_grad_reduce`` / ``overlap_param_gather`` on == off, bitwise: DP2 (DDP and the
  distributed optimizer, where the reductions are checked to start inside the backward
  pass), PP2 x DP2 with the distributed optimizer, and the interleaved schedule (its
  ``grad_sync_func`` / ``param_sync_func``);
* activation recomputation, full and selective, gives the gradients and the trained weights
  of no recomputation: one process, TP2 (also with sequence parallelism) and PP2.
"""

from __future__ import annotations

import pytest
import torch

from megatron_ext.layout import ParallelConfig
from megatron_ext.testing import spawn_gloo
from megatron_ext.verify import Run, parallel_run, reference_run
from megatron_ext.verify import tiny_model_config as model_config

RUN = Run()
E2D2 = model_config("e2d2")
# E2D2 with a 1024-token vocabulary: the embedding straddles the distributed optimizer's
# DP shards, and 3 + 2 layers fill two interleaved chunks per pipeline rank.
E2D2_BIG = model_config("e2d2", vocab_size=1024, num_layers=3)

# bf16 has an 8-bit significand: each rounding is off by up to 2^-9 ~ 2e-3 relative. The
# weights start rounded to bf16 and every matmul, norm and residual output is rounded again,
# so over a few layers the loss drifts by a few roundings (observed: 4e-5 of 2.85 at step 0,
# 3e-3 after two AdamW steps at lr 1e-2, whose first updates are ~lr x sign(grad)) and each
# gradient tensor by ~1e-2 of its norm (observed at most 2.2%, on the small q/k-norm
# gradients). A wrong cast (bf16 main weights, a bf16 loss, unreduced gradients) or a skipped
# step is off by far more: Adam's first step moves every weight by ~lr = 1e-2.
BF16_LOSS_RTOL = 5e-3
BF16_STEP_LOSS_ATOL = 2e-2
BF16_GRAD_RTOL = 5e-2
# Recomputation runs the same ops on the same inputs; only the q/k-norm weight gradients
# (sums over heads and positions of gradients that arrive with other strides) change by
# summation order, observed 1e-10. Adam (dividing by sqrt(v) + eps) grows that to ~3e-8 in
# the weights after three steps; a recomputation that changed the math would be off by
# ~lr = 1e-2. A later step's loss sees those weights: 1 fp32 ulp (2.4e-7 at 2.7) observed.
RECOMPUTE_ATOL = 1e-8
RECOMPUTE_PARAMS_ATOL = 1e-6


def _bf16(**kwargs) -> ParallelConfig:
    return ParallelConfig(precision="bf16", **kwargs)


def _optimizer_precision(parallel: ParallelConfig) -> dict:
    """What megatron built for ``parallel``: the optimizer class and the dtypes of the model
    weights, the gradient buffers and the optimizer's main weights."""
    from megatron_ext.groups import megatron_layout
    from megatron_ext.model import build_chunks
    from megatron_ext.training import build_optimizer, wrap_ddp

    with megatron_layout(parallel):
        stages = build_chunks(E2D2, parallel)
        chunks = wrap_ddp(stages, stages[0].config, parallel)
        optimizer = build_optimizer(chunks, parallel, lr=1e-3)
        main = [p for group in optimizer.param_groups for p in group["params"]]
        return {"optimizer": {type(o).__name__ for o in optimizer.chained_optimizers},
                "wrapper": type(chunks[0].module).__name__,
                "weights": {p.dtype for p in stages[0].parameters()},
                "grads": {p.main_grad.dtype for p in stages[0].parameters()},
                "main": {p.dtype for p in main}}


def _counting_checkpoints(monkeypatch_target) -> list[int]:
    """Count the calls of megatron's ``checkpoint`` made by the engine's layers."""
    calls = [0]
    original = monkeypatch_target.checkpoint

    def counted(*args):
        calls[0] += 1
        return original(*args)

    monkeypatch_target.checkpoint = counted
    return calls


def _world1(rank: int) -> dict:
    from megatron_ext import model

    out = {"reference": reference_run(E2D2, RUN),
           "fp32": parallel_run(E2D2, ParallelConfig(1), RUN),
           "bf16": parallel_run(E2D2, _bf16(world_size=1), RUN),
           "built": {p.precision: _optimizer_precision(p)
                     for p in (ParallelConfig(1), _bf16(world_size=1))},
           "recompute": {}, "checkpoints": {}}
    for mode in ("full", "selective"):
        calls = _counting_checkpoints(model)
        out["recompute"][mode] = parallel_run(E2D2, ParallelConfig(1, recompute=mode), RUN)
        out["checkpoints"][mode] = calls[0]
    return out


BF16_WORLD2 = [_bf16(world_size=2, tensor_parallel=2),
               _bf16(world_size=2, tensor_parallel=2, sequence_parallel=True),
               _bf16(world_size=2, pipeline_parallel=2, encoder_pipeline_stages=1),
               _bf16(world_size=2, use_distributed_optimizer=True)]
OVERLAP_WORLD2 = [dict(world_size=2), dict(world_size=2, use_distributed_optimizer=True)]
RECOMPUTE_WORLD2 = [dict(world_size=2, tensor_parallel=2),
                    dict(world_size=2, tensor_parallel=2, sequence_parallel=True),
                    dict(world_size=2, pipeline_parallel=2, encoder_pipeline_stages=1)]


def _overlapped(layout: dict) -> ParallelConfig:
    return ParallelConfig(overlap_grad_reduce=True,
                          overlap_param_gather=layout.get("use_distributed_optimizer", False),
                          **layout)


def _spy_grad_syncs() -> list[str]:
    """Where megatron's bucketed gradient reductions start: ``"backward"`` (overlapped, from
    DDP's gradient hooks) or ``"after"`` (in ``finalize_model_grads``)."""
    import traceback

    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup

    starts, original = [], _ParamAndGradBucketGroup.start_grad_sync

    def start_grad_sync(self, *args, **kwargs):
        in_hook = any(f.name == "register_grad_ready" for f in traceback.extract_stack())
        starts.append("backward" if in_hook else "after")
        return original(self, *args, **kwargs)

    _ParamAndGradBucketGroup.start_grad_sync = start_grad_sync
    return starts


def _world2(rank: int) -> dict:
    out = {"reference": reference_run(E2D2, RUN)}
    out["bf16"] = {p.name: parallel_run(E2D2, p, RUN) for p in BF16_WORLD2}
    starts = _spy_grad_syncs()
    out["overlap"] = {}
    for layout in OVERLAP_WORLD2:
        plain = parallel_run(E2D2, ParallelConfig(**layout), RUN)
        starts.clear()
        out["overlap"][ParallelConfig(**layout).name] = (
            plain, parallel_run(E2D2, _overlapped(layout), RUN), list(starts))
    out["recompute"] = {ParallelConfig(**layout).name: {
        mode: parallel_run(E2D2, ParallelConfig(recompute=mode, **layout), RUN)
        for mode in ("none", "full", "selective")} for layout in RECOMPUTE_WORLD2}
    return out


OVERLAP_WORLD4 = [
    dict(world_size=4, pipeline_parallel=2, encoder_pipeline_stages=1,
         use_distributed_optimizer=True),
    # megatron's interleaved schedule calls grad_sync_func / param_sync_func per chunk.
    dict(world_size=4, pipeline_parallel=2, virtual_pipeline=2, encoder_pipeline_stages=2,
         use_distributed_optimizer=True),
]


# Float16Module on interleaved chunks (its first/last-stage casts read the chunk's vp_stage).
BF16_WORLD4 = _bf16(**OVERLAP_WORLD4[1])


def _world4(rank: int) -> dict:
    out = {ParallelConfig(**layout).name: (parallel_run(E2D2_BIG, ParallelConfig(**layout), RUN),
                                           parallel_run(E2D2_BIG, _overlapped(layout), RUN))
           for layout in OVERLAP_WORLD4}
    out["reference"] = reference_run(E2D2_BIG, RUN)
    out["bf16"] = parallel_run(E2D2_BIG, BF16_WORLD4, RUN)
    return out


def test_rms_norm_in_bf16_reduces_in_fp32_and_rounds_once():
    """What the engine relies on for its norms in bf16 (torch's ``rms_norm``, not ours)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 512, generator=g) * 3 + 1).bfloat16()
    weight = (torch.randn(512, generator=g) * 0.1 + 1).bfloat16()
    norm = torch.nn.RMSNorm(512, eps=1e-6).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(weight)
    xf = x.float()
    in_fp32 = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.float()
    assert torch.equal(norm(x), in_fp32.bfloat16())
    in_bf16 = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    assert not torch.equal(norm(x), in_bf16)  # the check can tell the two apart


@pytest.fixture(scope="module")
def world1() -> list[dict]:
    return spawn_gloo(_world1, 1)


@pytest.fixture(scope="module")
def world2() -> list[dict]:
    return spawn_gloo(_world2, 2)


@pytest.fixture(scope="module")
def world4() -> list[dict]:
    return spawn_gloo(_world4, 4)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b).norm() / b.norm().clamp(min=1e-12)).item()


def _check_bf16(reference: dict, per_rank: list[dict]) -> None:
    losses = [r for r in per_rank if r["first_loss"] is not None]
    assert losses, "no rank reported a loss"
    for res in losses:
        assert abs(res["first_loss"] - reference["losses"][0]) <= BF16_LOSS_RTOL * reference["losses"][0]
        steps = (torch.tensor(res["losses"]) - torch.tensor(reference["losses"])).abs().max()
        assert steps <= BF16_STEP_LOSS_ATOL, (res["losses"], reference["losses"])
    for res in per_rank:
        assert all(p.dtype == torch.bfloat16 for p in res["params"].values())
        if res["grads"] is None:  # the distributed optimizer: checked through the losses
            continue
        assert all(g.dtype == torch.float32 for g in res["grads"].values())  # fp32 buffers
        errors = {n: _relative(res["grads"][n], g) for n, g in reference["grads"].items()}
        assert max(errors.values()) <= BF16_GRAD_RTOL, sorted(errors.items(), key=lambda e: -e[1])[:3]


@pytest.mark.slow
def test_bf16_is_megatron_mixed_precision_with_fp32_main_weights_and_grads(world1):
    built = world1[0]["built"]
    assert built["bf16"] == {"optimizer": {"Float16OptimizerWithFloat16Params"},
                             "wrapper": "Float16Module", "weights": {torch.bfloat16},
                             "grads": {torch.float32}, "main": {torch.float32}}
    assert built["fp32"] == {"optimizer": {"FP32Optimizer"}, "wrapper": "ParallelDiffusionLM",
                             "weights": {torch.float32}, "grads": {torch.float32},
                             "main": {torch.float32}}


@pytest.mark.slow
def test_bf16_single_process_matches_the_fp32_reference_within_bf16_tolerance(world1):
    (result,) = world1
    _check_bf16(result["reference"], [result["bf16"]])
    fp32, bf16 = result["fp32"], result["bf16"]
    # Not the fp32 engine under another name: the gradients differ by bf16 rounding.
    assert any(not torch.equal(bf16["grads"][n], fp32["grads"][n]) for n in fp32["grads"])


@pytest.mark.slow
@pytest.mark.parametrize("layout", [p.name for p in BF16_WORLD2])
def test_bf16_across_ranks_matches_the_fp32_reference_within_bf16_tolerance(world2, layout):
    _check_bf16(world2[0]["reference"], [r["bf16"][layout] for r in world2])


@pytest.mark.slow
def test_bf16_interleaved_pp2_dp2_matches_the_fp32_reference_within_bf16_tolerance(world4):
    _check_bf16(world4[0]["reference"], [r["bf16"] for r in world4])


def _assert_identical(a: dict, b: dict, atol: float = 0.0, params_atol: float = 0.0) -> None:
    """Same step-0 loss and gradients within ``atol``; later step losses (which see the
    updated weights) and final weights within ``params_atol``."""
    if a["first_loss"] is not None:
        losses_a, losses_b = torch.tensor(a["losses"]), torch.tensor(b["losses"])
        assert (losses_a[0] - losses_b[0]).abs().item() <= atol, (a["losses"], b["losses"])
        diff = (losses_a - losses_b).abs().max().item()
        assert diff <= params_atol, (a["losses"], b["losses"])
    for what in ("grads", "params"):
        if a[what] is None:
            continue
        assert a[what].keys() == b[what].keys()
        for name in a[what]:
            err = (a[what][name] - b[what][name]).abs().max().item()
            assert err <= (atol if what == "grads" else params_atol), f"{what} {name} off by {err:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("layout", [ParallelConfig(**d).name for d in OVERLAP_WORLD2])
def test_overlapped_grad_reduce_and_param_gather_equal_no_overlap_dp2(world2, layout):
    for result in world2:
        plain, overlapped, starts = result["overlap"][layout]
        # megatron 0.16.1 reduces the first step after the backward (it learns how often each
        # gradient becomes ready), then every later step from the backward hooks.
        assert starts == ["after"] + ["backward"] * RUN.steps
        _assert_identical(plain, overlapped)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [ParallelConfig(**d).name for d in OVERLAP_WORLD4])
def test_overlapped_grad_reduce_and_param_gather_equal_no_overlap_pp2_dp2(world4, layout):
    for result in world4:
        plain, overlapped = result[layout]
        _assert_identical(plain, overlapped)


@pytest.mark.slow
def test_recompute_matches_no_recompute_single_process(world1):
    (result,) = world1
    layers = E2D2.num_layers + E2D2.num_decoder_layers
    for mode, recomputed in result["recompute"].items():
        # One checkpoint per layer (full) or per attention (selective) in each of the
        # 1 + RUN.steps backward passes over 4 micro-batches.
        assert result["checkpoints"][mode] == layers * 4 * (1 + RUN.steps), mode
        _assert_identical(result["fp32"], recomputed, RECOMPUTE_ATOL, RECOMPUTE_PARAMS_ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [ParallelConfig(**d).name for d in RECOMPUTE_WORLD2])
def test_recompute_matches_no_recompute_tp2_pp2(world2, layout):
    for result in world2:
        runs = result["recompute"][layout]
        for mode in ("full", "selective"):
            _assert_identical(runs["none"], runs[mode], RECOMPUTE_ATOL, RECOMPUTE_PARAMS_ATOL)
