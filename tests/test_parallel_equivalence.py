"""The parallel model equals the single-process reference model: loss, every parameter's
gradient, and three optimizer steps, under TP2, PP2 (one encoder + one decoder stage), DP2
and TP2xPP2.

Every case compares the parallel model under one layout with the single-process reference
model (``e2d2.model.DiffusionLM``) on the same weights and the same noised batch.
"""

from __future__ import annotations

import pytest
import torch

from e2d2.config import DiffusionConfig, ModelConfig
from e2d2.diffusion import DiffusionObjective
from e2d2.model import DiffusionLM
from megatron_ext.layout import ParallelConfig, PipelinePlan
from megatron_ext.mapping import reference_state_at_seed
from megatron_ext.testing import megatron_layout, spawn_gloo

SEED, GLOBAL_BATCH, MICRO_BATCH, STEPS, LR, CLIP = 0, 4, 1, 3, 1e-2, 1.0
# Adam's first steps are ~lr * sign(grad), so rounding-level gradient differences grow
# to ~1e-6 in the losses after three steps, under any layout.
STEPS_ATOL = 1e-5


def model_config(variant: str, **overrides) -> ModelConfig:
    n_dec = 2 if variant.startswith("e2d2") else 0
    base = dict(variant=variant, vocab_size=64, mask_token_id=63, hidden_size=32,
                ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2, num_layers=2,
                num_decoder_layers=n_dec, seq_length=16, block_size=4)
    return ModelConfig(**(base | overrides))


def objective_of(cfg: ModelConfig) -> DiffusionObjective:
    return DiffusionObjective(cfg, DiffusionConfig())


# Every step trains on the same batch and noise draw, so the loss must fall: a run that
# matches a falling reference curve cannot be matching a broken no-op.
def global_batch(cfg: ModelConfig, prompt_and_padding: bool) -> dict[str, torch.Tensor]:
    """``x0 [batch, L]``; optionally a one-block prompt on rows 0 and 2 and padding at the
    end of row 1 (``context_mask``, ``attention_mask``)."""
    g = torch.Generator().manual_seed(1000)
    batch = {"x0": torch.randint(0, cfg.vocab_size - 1, (GLOBAL_BATCH, cfg.seq_length), generator=g)}
    if prompt_and_padding:
        batch["attention_mask"] = torch.ones_like(batch["x0"])
        batch["attention_mask"][1, -3:] = 0
        batch["context_mask"] = torch.zeros_like(batch["x0"])
        batch["context_mask"][[0, 2], : cfg.block_size] = 1
    return batch


def noise_generator() -> torch.Generator:
    return torch.Generator().manual_seed(2000)


def reference_run(cfg: ModelConfig, prompt_and_padding: bool = False) -> dict:
    """Loss and gradients of step 0, then the losses of ``STEPS`` AdamW steps with clipping."""
    model = DiffusionLM(cfg)
    model.load_state_dict(reference_state_at_seed(cfg, SEED))
    objective = objective_of(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    losses, grads = [], None
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = objective.loss(model, **global_batch(cfg, prompt_and_padding),
                              generator=noise_generator())
        loss.backward()
        if grads is None:
            # Parameters the loss does not reach (shared-KV: the top encoder layer's MLP) have
            # no .grad here and a zero main_grad in megatron's DDP.
            grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                     for n, p in model.named_parameters()}
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        losses.append(loss.item())
    return {"losses": losses, "grads": grads}


def parallel_run(cfg: ModelConfig, parallel: ParallelConfig, prompt_and_padding: bool = False,
                 save_to: str | None = None) -> dict:
    """The same as ``reference_run`` on this rank's share of ``parallel`` (inside the spawn);
    optionally saves the trained weights with dist_checkpointing."""
    from megatron.core import parallel_state

    from megatron_ext import checkpoint
    from megatron_ext.mapping import gather_reference_state, load_reference_state
    from megatron_ext.model import build_chunks
    from megatron_ext.objective import make_forward_step, micro_batches, noised_batch
    from megatron_ext.training import build_optimizer, train_step, wrap_ddp

    plan = PipelinePlan(cfg, parallel)
    with megatron_layout(parallel, get_embedding_ranks=plan.get_embedding_ranks):
        stages = build_chunks(cfg, parallel)
        for stage in stages:
            load_reference_state(stage, reference_state_at_seed(cfg, SEED))
        chunks = wrap_ddp(stages, stages[0].config, parallel)
        objective = objective_of(cfg)
        forward_step = make_forward_step(objective)
        dp_rank, per_rank = parallel_state.get_data_parallel_rank(), GLOBAL_BATCH // parallel.data_parallel

        def step_batches():
            batch = noised_batch(objective, **global_batch(cfg, prompt_and_padding),
                                 generator=noise_generator())
            mine = {k: v[dp_rank * per_rank:(dp_rank + 1) * per_rank] for k, v in batch.items()}
            return micro_batches(mine, MICRO_BATCH)

        kwargs = dict(seq_length=stages[0].stream_length(), micro_batch_size=MICRO_BATCH)
        first_loss = train_step(chunks, None, forward_step, step_batches(), **kwargs)
        # The distributed optimizer reduce-scatters: each rank's main_grad is only right on
        # its own slice, so its gradients are checked through the step losses instead.
        grads = None if parallel.use_distributed_optimizer else gather_reference_state(stages, grads=True)
        optimizer = build_optimizer(chunks, parallel, lr=LR, weight_decay=0.0, clip_grad=CLIP)
        losses = [train_step(chunks, optimizer, forward_step, step_batches(), **kwargs)
                  for _ in range(STEPS)]
        if save_to is not None:
            checkpoint.save(stages, save_to)
        return {"first_loss": first_loss, "losses": losses, "grads": grads,
                "params": gather_reference_state(stages)}


def loaded_params(cfg: ModelConfig, parallel: ParallelConfig, directory: str) -> dict:
    """Full reference-named weights after loading ``directory`` under ``parallel``."""
    from megatron_ext import checkpoint
    from megatron_ext.mapping import gather_reference_state
    from megatron_ext.model import build_chunks

    plan = PipelinePlan(cfg, parallel)
    with megatron_layout(parallel, get_embedding_ranks=plan.get_embedding_ranks):
        stages = build_chunks(cfg, parallel)
        checkpoint.load(stages, directory)
        return gather_reference_state(stages)


def _grad_mismatches(reference: dict, grads: dict | None, atol: float) -> list[str]:
    if grads is None:
        return []
    if grads.keys() != reference.keys():
        return [f"parameter names differ: {sorted(grads.keys() ^ reference.keys())}"]
    errors = {name: (grads[name] - ref).abs().max().item() for name, ref in reference.items()}
    return [f"grad {name} off by {err:.2e}" for name, err in errors.items() if err > atol]


def compare(reference: dict, results: list[dict], atol: float) -> list[str]:
    """Mismatches (empty = equal) between the reference and every rank's parallel result."""
    problems = []
    for rank, res in enumerate(results):
        problems += [f"rank {rank}: {p}" for p in _grad_mismatches(reference["grads"], res["grads"], atol)]
        if res["first_loss"] is None:
            continue  # not a last pipeline stage
        if abs(res["first_loss"] - reference["losses"][0]) > atol:
            problems.append(f"rank {rank}: loss {res['first_loss']} != {reference['losses'][0]}")
        diff = (torch.tensor(res["losses"]) - torch.tensor(reference["losses"])).abs().max().item()
        if diff > STEPS_ATOL:
            problems.append(f"rank {rank}: {STEPS}-step losses {res['losses']} != "
                            f"{reference['losses']}")
    return problems



CASES = {  # name: (model config, with a prompt and padding)
    "e2d2": (model_config("e2d2"), False),
    "e2d2_prompt_pad": (model_config("e2d2"), True),
    # Untied: the embedding still has two copies (stage 0 for x0, stage 1 for xt), the head none.
    "e2d2_untied": (model_config("e2d2", tie_word_embeddings=False), False),
    "e2d2_shared_kv": (model_config("e2d2_shared_kv"), False),
    "e2d2_shared_kv_tied": (model_config("e2d2_shared_kv", tie_decoder_to_encoder=True), False),
    "bd3lm": (model_config("bd3lm"), False),
    "bd3lm_prompt_pad": (model_config("bd3lm"), True),
    "mdlm": (model_config("mdlm"), False),
    # Four layers so that PP2 x two interleaved chunks gives every virtual stage one layer.
    "bd3lm_4layers": (model_config("bd3lm", num_layers=4), False),
    "ar": (model_config("ar"), True),
}


def _world2(rank: int) -> dict:
    out = {}
    for case, (cfg, prompt_and_padding) in CASES.items():
        layouts = [ParallelConfig(2, tensor_parallel=2), ParallelConfig(2)]
        if cfg.variant != "e2d2_shared_kv":  # one stage only (PipelinePlan says why)
            layouts.append(ParallelConfig(2, pipeline_parallel=2,
                                          encoder_pipeline_stages=1 if cfg.is_e2d2 else None))
        if cfg.num_layers == 4:  # megatron's interleaved 1F1B schedule
            layouts.append(ParallelConfig(2, pipeline_parallel=2, virtual_pipeline=2))
        out[case] = {"reference": reference_run(cfg, prompt_and_padding)}
        for parallel in layouts:
            out[case][parallel.name] = parallel_run(cfg, parallel, prompt_and_padding)
    return out


SAVED_LAYOUT = "tp2-pp2-dp1-enc1"


def _world4(rank: int, ckpt_dir: str) -> dict:
    out = {}
    for variant in ("e2d2", "e2d2_shared_kv", "bd3lm"):
        cfg = model_config(variant)
        if variant == "e2d2_shared_kv":
            layouts = [ParallelConfig(4, tensor_parallel=2, use_distributed_optimizer=True)]
        else:
            layouts = [ParallelConfig(4, tensor_parallel=2, pipeline_parallel=2,
                                      encoder_pipeline_stages=1 if cfg.is_e2d2 else None)]
        if variant == "e2d2":  # middle stages: an encoder stage and a decoder stage in between
            layouts.append(ParallelConfig(4, pipeline_parallel=4, encoder_pipeline_stages=2))
        out[variant] = {"reference": reference_run(cfg)}
        for parallel in layouts:
            save_to = ckpt_dir if parallel.name == SAVED_LAYOUT and variant == "e2d2" else None
            out[variant][parallel.name] = parallel_run(cfg, parallel, save_to=save_to)
    cfg = model_config("e2d2")
    for parallel in (ParallelConfig(4), ParallelConfig(4, pipeline_parallel=2,
                                                       encoder_pipeline_stages=1)):
        out["e2d2"]["load-" + parallel.name] = loaded_params(cfg, parallel, ckpt_dir)
    return out


def _check(per_rank: list[dict], variant: str) -> None:
    reference = per_rank[0][variant]["reference"]
    assert reference["losses"][-1] < reference["losses"][0], "reference does not train"
    names = [n for n in per_rank[0][variant] if n != "reference" and not n.startswith("load-")]
    assert names
    for name in names:
        # DP only splits the batch (the reference sums it in one pass, so equal to rounding);
        # TP changes summation order inside matmuls and megatron's vocab-parallel CE.
        atol = 1e-6 if name.startswith("tp1-pp1") else 1e-5
        problems = compare(reference, [r[variant][name] for r in per_rank], atol)
        assert not problems, f"{variant} {name}:\n" + "\n".join(problems[:10])


@pytest.fixture(scope="module")
def world2() -> list[dict]:
    return spawn_gloo(_world2, 2)


@pytest.fixture(scope="module")
def world4(tmp_path_factory) -> list[dict]:
    ckpt = tmp_path_factory.mktemp("ckpt") / "tp2pp2"
    return spawn_gloo(_world4, 4, str(ckpt))


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(CASES))
def test_tp2_pp2_dp2_match_reference(world2, variant):
    _check(world2, variant)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["e2d2", "e2d2_shared_kv", "bd3lm"])
def test_four_ranks_match_reference(world4, variant):
    _check(world4, variant)


@pytest.mark.slow
def test_checkpoint_tp2pp2_loads_at_tp1_and_pp2(world4):
    saved = world4[0]["e2d2"][SAVED_LAYOUT]["params"]
    initial = reference_state_at_seed(model_config("e2d2"), SEED)
    assert any(not torch.equal(saved[n], initial[n]) for n in saved), "nothing was trained"
    for layout in ("load-tp1-pp1-dp4", "load-tp1-pp2-dp2-enc1"):
        for rank, result in enumerate(world4):
            loaded = result["e2d2"][layout]
            assert loaded.keys() == saved.keys()
            for name in saved:
                assert torch.equal(loaded[name], saved[name]), f"{layout} rank {rank}: {name}"
