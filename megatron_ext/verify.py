"""Check a parallel layout against the single-process reference model, on CPU.

    python -m megatron_ext.verify --variant e2d2 --world 4 --tp 2 --pp 2 --encoder-stages 1

runs the reference model (``e2d2.model.DiffusionLM``) and the parallel model under the
layout on the same weights and the same noised batch, and compares the loss, every
parameter's gradient, the losses of a few AdamW steps with gradient clipping, and the
weights after the last step (whose update no loss measures). This is
what ``tests/test_parallel_equivalence.py`` asserts, usable on a laptop before a layout
spends cluster hours. Exit status 1 on a mismatch, 2 on an invalid layout.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from e2d2.config import DiffusionConfig, ModelConfig
from e2d2.diffusion import DiffusionObjective
from e2d2.errors import ConfigError
from e2d2.model import DiffusionLM
from megatron_ext.groups import megatron_layout
from megatron_ext.layout import ParallelConfig, PipelinePlan
from megatron_ext.testing import spawn_gloo


@dataclass(frozen=True)
class Run:
    """What both engines train on. Every step reuses one batch and one noise draw, so the
    reference loss falls: a run that matches a falling curve cannot be matching a no-op."""

    seed: int = 0
    global_batch: int = 4
    micro_batch: int = 1
    steps: int = 3
    lr: float = 1e-2
    # Adam's update m / (sqrt(v) + eps) is ~lr x sign(grad) where |grad| << eps: with the
    # default eps (1e-8) a rounding-level gradient difference on a near-zero gradient
    # (1e-9 from another summation order, another CPU's SIMD width) flips an lr-sized step.
    # With eps = 1e-3 the update is Lipschitz in the gradient (slope <= lr / eps), so the
    # multi-step comparison measures the engines, not the rounding; gradients larger than
    # eps (most of them) still take Adam's normalised step.
    adam_eps: float = 1e-3
    clip: float = 1.0
    prompt_and_padding: bool = False
    # The annealed mask (``diffusion.anneal_steps``) at training step ``anneal_at``: every
    # step of the run uses the ratio ``anneal_at / anneal_steps``.
    anneal_steps: int = 0
    anneal_at: int = 0

    def __post_init__(self) -> None:
        if min(self.global_batch, self.micro_batch) < 1 or self.global_batch % self.micro_batch:
            raise ConfigError(f"global_batch={self.global_batch} must be a positive multiple of "
                              f"micro_batch={self.micro_batch}")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")


def tiny_model_config(variant: str, **overrides) -> ModelConfig:
    """A model small enough for many layouts per minute on 2 CPU cores. ``[MASK]`` is the
    last id of the vocabulary (also of an overridden ``vocab_size``)."""
    base = dict(variant=variant, vocab_size=64, hidden_size=32,
                ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2, num_layers=2,
                num_decoder_layers=2 if variant.startswith("e2d2") else 0, seq_length=16,
                block_size=4)
    settings = base | overrides
    settings.setdefault("mask_token_id", settings["vocab_size"] - 1)
    return ModelConfig(**settings)


def _objective(cfg: ModelConfig, run: Run) -> DiffusionObjective:
    return DiffusionObjective(cfg, DiffusionConfig(anneal_steps=run.anneal_steps))


def _anneal_step(run: Run) -> int | None:
    return run.anneal_at if run.anneal_steps else None


def _global_batch(cfg: ModelConfig, run: Run) -> dict[str, torch.Tensor]:
    """``x0 [batch, L]``; with ``prompt_and_padding`` a one-block prompt on even rows and
    three padding positions at the end of row 1."""
    g = torch.Generator().manual_seed(1000 + run.seed)
    batch = {"x0": torch.randint(0, cfg.vocab_size - 1, (run.global_batch, cfg.seq_length),
                                 generator=g)}
    if run.prompt_and_padding:
        batch["attention_mask"] = torch.ones_like(batch["x0"])
        batch["attention_mask"][1 % run.global_batch, -3:] = 0
        batch["context_mask"] = torch.zeros_like(batch["x0"])
        batch["context_mask"][::2, : cfg.block_size] = 1
    return batch


def _noise_generator(run: Run) -> torch.Generator:
    return torch.Generator().manual_seed(2000 + run.seed)


def reference_run(cfg: ModelConfig, run: Run) -> dict:
    """Single process: step-0 gradients, the loss of every AdamW step (measured before that
    step's update) and the weights after the last step."""
    model = DiffusionLM(cfg, seed=run.seed)
    objective = _objective(cfg, run)
    optimizer = torch.optim.AdamW(model.parameters(), lr=run.lr, eps=run.adam_eps,
                                  weight_decay=0.0)
    losses, grads = [], None
    for _ in range(run.steps):
        optimizer.zero_grad()
        loss = objective.loss(model, **_global_batch(cfg, run), generator=_noise_generator(run),
                              step=_anneal_step(run))
        loss.backward()
        if grads is None:
            # Parameters the loss does not reach (shared-KV: the top encoder layer's MLP) have
            # no .grad here and a zero main_grad in megatron's DDP.
            grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                     for n, p in model.named_parameters()}
        torch.nn.utils.clip_grad_norm_(model.parameters(), run.clip)
        optimizer.step()
        losses.append(loss.item())
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"losses": losses, "grads": grads, "params": params}


def parallel_run(cfg: ModelConfig, parallel: ParallelConfig, run: Run,
                 save_to: str | None = None) -> dict:
    """``reference_run`` on this rank's share of ``parallel`` (call on every rank of a live
    gloo/NCCL world). Returns the step-0 loss (the last stage's, on every rank) and
    gradients, the step losses, and the final weights; optionally saves them with dist_checkpointing."""
    from megatron.core import parallel_state

    from megatron_ext import checkpoint
    from megatron_ext.engine import build_engine
    from megatron_ext.mapping import gather_reference_state
    from megatron_ext.objective import make_forward_step, micro_batches, noised_batch
    from megatron_ext.training import build_optimizer, sync_params, train_step

    plan = PipelinePlan(cfg, parallel)
    with megatron_layout(parallel, get_embedding_ranks=plan.get_embedding_ranks):
        stages, chunks = build_engine(cfg, parallel, seed=run.seed)  # the reference's weights
        objective = _objective(cfg, run)
        forward_step = make_forward_step(objective)
        per_rank = run.global_batch // parallel.data_parallel
        rows = slice(parallel_state.get_data_parallel_rank() * per_rank,
                     (parallel_state.get_data_parallel_rank() + 1) * per_rank)
        batch = noised_batch(objective, **_global_batch(cfg, run), generator=_noise_generator(run),
                             step=_anneal_step(run))
        mine = micro_batches({k: v[rows] for k, v in batch.items()}, run.micro_batch)
        kwargs = dict(seq_length=stages[0].stream_length(), micro_batch_size=run.micro_batch)

        first_loss = train_step(chunks, None, forward_step, mine, **kwargs).loss
        # The distributed optimizer reduce-scatters: each rank's main_grad is only right on
        # its own slice, so its gradients are checked through the step losses instead.
        grads = (None if parallel.use_distributed_optimizer
                 else gather_reference_state(stages, grads=True))
        optimizer = build_optimizer(chunks, parallel, lr=run.lr, adam_eps=run.adam_eps,
                                    weight_decay=0.0, clip_grad=run.clip)
        # a skipped (non-finite) step leaves its loss NaN or the next ones off: compare sees it
        losses = [train_step(chunks, optimizer, forward_step, mine, **kwargs).loss
                  for _ in range(run.steps)]
        sync_params(chunks)
        if save_to is not None:
            checkpoint.save(stages, save_to)
        return {"first_loss": first_loss, "losses": losses, "grads": grads,
                "params": gather_reference_state(stages)}


def _mismatches(what: str, reference: dict, tensors: dict | None, atol: float) -> list[str]:
    if tensors is None:
        return []
    if tensors.keys() != reference.keys():
        return [f"{what} names differ: {sorted(tensors.keys() ^ reference.keys())}"]
    errors = {name: (tensors[name] - ref).abs().max().item() for name, ref in reference.items()}
    return [f"{what} {name} off by {err:.2e}" for name, err in errors.items() if err > atol]


# Final weights after ``Run.steps`` AdamW steps at lr 1e-2. With ``Run.adam_eps`` the update
# is Lipschitz in the gradient, so rounding-level gradient differences (observed <= 1e-8)
# stay rounding-level in the weights (observed <= 1.2e-7 at TP2 with anneal, shift, prompt
# and padding). A skipped or wrong step moves weights whose gradient exceeds eps by ~lr.
PARAMS_ATOL = 1e-5


def compare(reference: dict, results: list[dict], atol: float, steps_atol: float,
            params_atol: float = PARAMS_ATOL) -> list[str]:
    """Mismatches (empty = equal) between the reference and every rank's parallel result:
    gradients and step-0 loss within ``atol``, the step losses within ``steps_atol``, and
    the final weights (after the last step, which no loss measures) within ``params_atol``
    (see ``PARAMS_ATOL``). At least one rank (a last pipeline stage) must report losses."""
    problems = []
    if all(res["first_loss"] is None for res in results):
        problems.append("no rank reported a loss")
    for rank, res in enumerate(results):
        problems += [f"rank {rank}: {p}" for p in _mismatches("grad", reference["grads"],
                                                              res["grads"], atol)]
        problems += [f"rank {rank}: {p}" for p in _mismatches("param", reference["params"],
                                                              res["params"], params_atol)]
        if res["first_loss"] is None:
            continue  # not a last pipeline stage
        if abs(res["first_loss"] - reference["losses"][0]) > atol:
            problems.append(f"rank {rank}: loss {res['first_loss']} != {reference['losses'][0]}")
        diff = (torch.tensor(res["losses"]) - torch.tensor(reference["losses"])).abs().max().item()
        if diff > steps_atol:
            problems.append(f"rank {rank}: step losses {res['losses']} != {reference['losses']}")
    return problems


def _verify_body(rank: int, cfg: ModelConfig, parallel: ParallelConfig, run: Run) -> dict:
    return {"reference": reference_run(cfg, run) if rank == 0 else None,
            "parallel": parallel_run(cfg, parallel, run)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_ext.verify", description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="e2d2")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--encoder-stages", type=int, default=None)
    p.add_argument("--virtual-pipeline", type=int, default=None)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--cp", type=int, default=1, help="context_parallel")
    p.add_argument("--distributed-optimizer", action="store_true")
    p.add_argument("--layers", type=int, default=None, help="main-stack (encoder) layers")
    p.add_argument("--decoder-layers", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary size (the last id is [MASK]); default 64. A larger one "
                   "(e.g. 1024) makes the embedding straddle the distributed optimizer's DP shards")
    p.add_argument("--prompt-and-padding", action="store_true")
    p.add_argument("--micro-batch", type=int, default=1, help="rows per micro-batch (of 4 per DP rank)")
    p.add_argument("--atol", type=float, default=1e-5)
    args = p.parse_args(argv)
    overrides = {k: v for k, v in (("num_layers", args.layers),
                                   ("num_decoder_layers", args.decoder_layers),
                                   ("vocab_size", args.vocab_size)) if v is not None}
    try:
        cfg = tiny_model_config(args.variant, **overrides)
        parallel = ParallelConfig(args.world, args.tp, args.pp, args.encoder_stages,
                                  args.virtual_pipeline, args.sequence_parallel,
                                  use_distributed_optimizer=args.distributed_optimizer,
                                  context_parallel=args.cp)
        run = Run(global_batch=4 * parallel.data_parallel, micro_batch=args.micro_batch,
                  prompt_and_padding=args.prompt_and_padding)
        PipelinePlan(cfg, parallel)  # fail here, before any process starts
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    per_rank = spawn_gloo(_verify_body, parallel.world_size, cfg, parallel, run)
    reference = per_rank[0]["reference"]
    problems = compare(reference, [r["parallel"] for r in per_rank], args.atol, args.atol)
    last = next(r["parallel"]["losses"] for r in per_rank if r["parallel"]["first_loss"] is not None)
    print(f"{cfg.variant} {parallel.name}: reference losses {reference['losses']}, parallel {last}")
    for problem in problems:
        print(problem)
    print("MATCH" if not problems else f"MISMATCH ({len(problems)} problems)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
