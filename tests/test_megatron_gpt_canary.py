"""Canary for the CPU/gloo layer: a plain megatron-core GPTModel (local spec) trains the
same under TP2, PP2 (1F1B), DP2 (with and without the distributed optimizer) and TP2xPP2
as a single-process copy, with megatron's optimizer and gradient clipping, and weights
moved between layouts by dist_checkpointing."""

from __future__ import annotations

import pytest
import torch

from megatron_ext.groups import megatron_layout
from megatron_ext.layout import ParallelConfig
from megatron_ext.testing import spawn_gloo

WORLD = 4
VOCAB, SEQ, GLOBAL_BATCH, MICRO_BATCH, STEPS = 64, 16, 8, 2, 3
LR, CLIP = 1e-2, 0.5
# Lipschitz Adam updates, as megatron_ext.verify.Run.adam_eps explains: the losses after a
# step must not hinge on the sign of a rounding-level difference of a near-zero gradient.
ADAM_EPS = 1e-3
LAYOUTS = (
    ParallelConfig(WORLD, tensor_parallel=2),
    ParallelConfig(WORLD, pipeline_parallel=2),
    ParallelConfig(WORLD),
    ParallelConfig(WORLD, use_distributed_optimizer=True),
    ParallelConfig(WORLD, tensor_parallel=2, pipeline_parallel=2),
)


def _gpt(parallel: ParallelConfig):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=4,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=64,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        normalization="RMSNorm",
    )
    model = GPTModel(
        config,
        get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=True,
    )
    return model, config


def _batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(7))


def _gpt_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    position_ids = torch.arange(SEQ).expand(tokens.shape[0], SEQ)
    return model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:])


def _reference(ckpt_dir: str) -> list[float]:
    """Single-process run (every rank computes it alone); saves the initial weights."""
    from megatron.core import dist_checkpointing

    model, _ = _gpt(ParallelConfig(WORLD))
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, eps=ADAM_EPS, weight_decay=0.0)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = _gpt_loss(model, _batch()).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        losses.append(loss.item())
    return losses


def _forward_step(data_iterator, model):
    tokens = next(data_iterator)

    def loss_func(per_token):
        loss = per_token.mean()
        return loss, {"loss": loss.clone().detach()}

    return _gpt_loss(model, tokens), loss_func


def _parallel_run(parallel: ParallelConfig, ckpt_dir: str) -> list[float]:
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_ext.training import build_optimizer, train_step, wrap_ddp

    model, config = _gpt(parallel)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir))
    chunks = wrap_ddp([model], config, parallel)
    optimizer = build_optimizer(chunks, parallel, lr=LR, adam_eps=ADAM_EPS, weight_decay=0.0,
                                clip_grad=CLIP)
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel.data_parallel
    per_rank = GLOBAL_BATCH // dp
    losses = []
    for _ in range(STEPS):
        mine = _batch()[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        losses.append(
            train_step(
                chunks,
                optimizer,
                _forward_step,
                mine.split(MICRO_BATCH),
                seq_length=SEQ,
                micro_batch_size=MICRO_BATCH,
            ).loss
        )
    return losses


def _body(rank: int, ckpt_root: str) -> dict[str, list]:
    with megatron_layout(ParallelConfig(WORLD)):
        results = {"reference": _reference(f"{ckpt_root}/init")}
    for parallel in LAYOUTS:
        with megatron_layout(parallel):
            results[parallel.name] = _parallel_run(parallel, f"{ckpt_root}/init")
    return results


@pytest.mark.slow
def test_gpt_layouts_match_single_process(tmp_path):
    (tmp_path / "init").mkdir()
    per_rank = spawn_gloo(_body, WORLD, str(tmp_path))
    reference = per_rank[0]["reference"]
    assert reference[-1] < reference[0]  # the run trains, so matching it means something
    for parallel in LAYOUTS:
        last_stage_losses = [r[parallel.name] for r in per_rank if r[parallel.name][0] is not None]
        assert last_stage_losses, parallel.name
        for losses in last_stage_losses:
            torch.testing.assert_close(
                torch.tensor(losses), torch.tensor(reference), rtol=1e-5, atol=1e-5,
                msg=lambda m, name=parallel.name: f"{name}: {m}",
            )
