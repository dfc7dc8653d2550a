"""Context parallelism (``parallel.context_parallel``) gives the reference model's loss,
every gradient and three optimizer steps: CP2 for E2D2 (also shared-KV), BD3-LM (both with
a prompt and padding), MDLM and AR, E2D2 and BD3-LM with the shift of an adapted AR
model, and E2D2 with selective recompute and (within bf16
tolerance) in bf16; CP2 x TP2 (E2D2 with sequence parallelism), CP2 x PP2 (one encoder and
one decoder stage; BD3-LM also interleaved), CP2 x DP2 with the distributed optimizer and
full recompute. A CP2 x TP2 checkpoint loads at CP1 (TP2 x PP2) and at CP2 x PP2. The zig-zag
split gives every rank the same share of the block-causal masks; lengths that do not split
into whole blocks are refused with the valid ones. ``e2d2 pretrain`` on two processes at
CP2 repeats the one-process losses and validation NELBO.

As in ``tests/test_parallel_equivalence.py``, the layouts of one world size share one spawn.
"""

from __future__ import annotations

import pytest
import torch
from pretrain_helpers import make_data_dir, records, run_pretrain, write_config
from test_megatron_precision_and_scale import _check_bf16

from e2d2 import masks
from e2d2.errors import ConfigError
from megatron_ext.context import chunk_positions
from megatron_ext.groups import megatron_layout
from megatron_ext.layout import ParallelConfig, PipelinePlan
from megatron_ext.testing import spawn_gloo
from megatron_ext.verify import Run, compare, parallel_run, reference_run
from megatron_ext.verify import tiny_model_config as model_config

STEPS_ATOL = 1e-5  # as tests/test_parallel_equivalence.py
PLAIN, PROMPT_PAD = Run(), Run(prompt_and_padding=True)


def _problems(world: list[dict], case: str, option: str | None = None) -> list[str]:
    """``compare`` of ``case``'s reference with every rank's parallel result of ``case``
    (or of the engine ``option`` run on ``case``'s model and batch)."""
    results = [rank["options"][option] if option else rank[case]["parallel"] for rank in world]
    return compare(world[0][case]["reference"], results, 1e-5, STEPS_ATOL)


# ----------------------------------------------------------------------- split and limits
@pytest.mark.parametrize("cp", [2, 4])
def test_zigzag_split_covers_every_position_once_and_balances_block_causal_masks(cp):
    L, S = 64, 4
    chunks = [chunk_positions(L, cp, r) for r in range(cp)]
    assert torch.equal(torch.cat(chunks).sort().values, torch.arange(L))
    for full in (masks.e2d2_encoder(L, S), masks.e2d2_decoder(L, S), masks.ar(L)):
        visible = [int(full[rows].sum()) for rows in chunks]
        assert len(set(visible)) == 1, visible  # every rank attends the same number of pairs
        contiguous = [int(full[r * L // cp:(r + 1) * L // cp].sum()) for r in range(cp)]
        assert max(contiguous) > 2 * min(contiguous)  # what the zig-zag avoids


def test_lengths_that_do_not_split_into_whole_blocks_are_refused_with_valid_values():
    cfg = model_config("e2d2")  # seq_length 16, block_size 4
    PipelinePlan(cfg, ParallelConfig(2, context_parallel=2))  # 4 chunks of one block
    with pytest.raises(ConfigError, match=r"multiple of 32 \(32, 64, 96"):
        PipelinePlan(cfg, ParallelConfig(4, context_parallel=4))
    with pytest.raises(ConfigError, match="tensor_parallel x pipeline_parallel x context_parallel"):
        ParallelConfig(6, tensor_parallel=2, context_parallel=2)
    odd = model_config("ar", seq_length=12, block_size=1, num_attention_heads=8,
                       num_query_groups=4)  # 6 positions per CP rank
    with pytest.raises(ConfigError, match=r"seq_length / context_parallel = 6"):
        PipelinePlan(odd, ParallelConfig(8, tensor_parallel=4, context_parallel=2,
                                         sequence_parallel=True))
    layout = ParallelConfig(8, tensor_parallel=2, context_parallel=2)
    assert (layout.data_parallel, layout.name) == (2, "tp2-pp1-dp2-cp2")


# ------------------------------------------------------------------- equivalence, 2 ranks
CP2 = ParallelConfig(2, context_parallel=2)
CASES2 = {  # name: (model config, run)
    "e2d2_prompt_pad": (model_config("e2d2"), PROMPT_PAD),
    "e2d2_shared_kv": (model_config("e2d2_shared_kv"), PLAIN),
    "bd3lm_prompt_pad": (model_config("bd3lm"), PROMPT_PAD),
    "mdlm": (model_config("mdlm"), PLAIN),
    "ar": (model_config("ar"), PROMPT_PAD),
    # an adapted AR model (e2d2.shift): slot s predicts s + 1, across the chunk boundaries
    "e2d2_shift_prompt_pad": (model_config("e2d2", shift=True), PROMPT_PAD),
    "bd3lm_shift": (model_config("bd3lm", shift=True), PLAIN),
}


# Other settings of the engine at CP2, on E2D2 with a prompt and padding.
OPTIONS2 = {"bf16": ParallelConfig(2, context_parallel=2, precision="bf16"),
            "recompute_selective": ParallelConfig(2, context_parallel=2, recompute="selective")}


def _world2(rank: int) -> dict:
    out = {case: {"reference": reference_run(cfg, run) if rank == 0 else None,
                  "parallel": parallel_run(cfg, CP2, run)}
           for case, (cfg, run) in CASES2.items()}
    cfg, run = CASES2["e2d2_prompt_pad"]
    out["options"] = {name: parallel_run(cfg, layout, run) for name, layout in OPTIONS2.items()}
    return out


@pytest.fixture(scope="module")
def world2():
    return spawn_gloo(_world2, 2)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES2))
def test_cp2_matches_reference(world2, case):
    assert not _problems(world2, case)


@pytest.mark.slow
def test_cp2_in_bf16_matches_reference_within_bf16_tolerance(world2):
    _check_bf16(world2[0]["e2d2_prompt_pad"]["reference"],
                [r["options"]["bf16"] for r in world2])


@pytest.mark.slow
def test_cp2_with_selective_recompute_matches_reference(world2):
    assert not _problems(world2, "e2d2_prompt_pad", "recompute_selective")


# ------------------------------------------------------------------- equivalence, 4 ranks
LAYOUTS4 = {  # name: (model config, layout, run)
    "e2d2_cp2_tp2_sp": (model_config("e2d2"), ParallelConfig(
        4, tensor_parallel=2, context_parallel=2, sequence_parallel=True), PROMPT_PAD),
    "bd3lm_cp2_tp2": (model_config("bd3lm"), ParallelConfig(
        4, tensor_parallel=2, context_parallel=2), PROMPT_PAD),
    "e2d2_cp2_pp2": (model_config("e2d2"), ParallelConfig(
        4, pipeline_parallel=2, encoder_pipeline_stages=1, context_parallel=2), PROMPT_PAD),
    "bd3lm_cp2_pp2": (model_config("bd3lm"), ParallelConfig(
        4, pipeline_parallel=2, context_parallel=2), PROMPT_PAD),
    # megatron's interleaved schedule: two chunks of two layers on each pipeline rank
    "bd3lm_cp2_pp2_interleaved": (model_config("bd3lm", num_layers=4), ParallelConfig(
        4, pipeline_parallel=2, virtual_pipeline=2, context_parallel=2), PLAIN),
    "e2d2_cp2_dp2_distopt_recompute": (model_config("e2d2"), ParallelConfig(
        4, context_parallel=2, use_distributed_optimizer=True, recompute="full"),
        Run(global_batch=8, prompt_and_padding=True)),
}
SAVED = "e2d2_cp2_tp2_sp"  # its checkpoint is loaded at these layouts
LOADED_AT = {"tp2_pp2": ParallelConfig(4, tensor_parallel=2, pipeline_parallel=2,
                                       encoder_pipeline_stages=1),
             "cp2_pp2": LAYOUTS4["e2d2_cp2_pp2"][1]}


def _loaded_params(cfg, parallel: ParallelConfig, directory: str) -> dict:
    from megatron_ext import checkpoint
    from megatron_ext.mapping import gather_reference_state
    from megatron_ext.model import build_chunks

    plan = PipelinePlan(cfg, parallel)
    with megatron_layout(parallel, get_embedding_ranks=plan.get_embedding_ranks):
        stages = build_chunks(cfg, parallel)
        checkpoint.load(stages, directory)
        return gather_reference_state(stages)


def _world4(rank: int, ckpt: str) -> dict:
    out = {name: {"reference": reference_run(cfg, run) if rank == 0 else None,
                  "parallel": parallel_run(cfg, layout, run,
                                           save_to=ckpt if name == SAVED else None)}
           for name, (cfg, layout, run) in LAYOUTS4.items()}
    out["loaded"] = {name: _loaded_params(LAYOUTS4[SAVED][0], layout, ckpt)
                     for name, layout in LOADED_AT.items()}
    return out


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return spawn_gloo(_world4, 4, str(tmp_path_factory.mktemp("cp") / "ckpt"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS4))
def test_cp2_with_tp_pp_dp_matches_reference(world4, name):
    assert not _problems(world4, name)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LOADED_AT))
def test_cp2_checkpoint_loads_at_other_context_parallel_layouts(world4, layout):
    saved = world4[0][SAVED]["parallel"]["params"]
    for rank in world4:
        loaded = rank["loaded"][layout]
        assert loaded.keys() == saved.keys()
        for name, value in saved.items():
            assert torch.equal(loaded[name], value), name


# ---------------------------------------------------------------------------- the CLI
@pytest.mark.slow
def test_pretrain_at_cp2_repeats_the_one_process_losses(tmp_path):
    data = make_data_dir(tmp_path)
    config = write_config(tmp_path / "tiny.yaml", train={"steps": 3, "eval_every": 3})
    runs = {}
    for name, nproc, extra in (("single", 1, []), ("cp2", 2, ["parallel.context_parallel=2"])):
        run_dir = tmp_path / name
        result = run_pretrain(config, f"run.dir={run_dir}", f"data.path={data}", *extra,
                              nproc=nproc)
        assert result.returncode == 0, result.stderr
        if nproc > 1:  # two processes that are not DP2 (which would give the same losses)
            assert "layout tp1-pp1-dp1-cp2 " in result.stderr
        runs[name] = records(run_dir)
    for key in ("loss", "nelbo"):
        single = [r[key] for r in runs["single"] if key in r]
        cp2 = [r[key] for r in runs["cp2"] if key in r]
        assert single and cp2 == pytest.approx(single, rel=1e-5, abs=1e-6), key
