"""Single-process training of the reference model.

This is the debugging / demo trainer: one process, plain PyTorch, the same objective the
megatron-core engine optimizes. Cluster pretraining goes through `megatron_ext`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from e2d2.config import TrainConfig
from e2d2.diffusion import DiffusionObjective
from e2d2.errors import require
from e2d2.evaluate import NelboResult, evaluate_nelbo


@dataclass
class TrainHistory:
    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, NelboResult]] = field(default_factory=list)


def pack_documents(documents: list[list[int]], seq_length: int, eod: int) -> torch.Tensor:
    """Concatenate documents, each followed by ``eod``, into rows ``[n, seq_length]`` (tail dropped)."""
    flat = [tok for doc in documents for tok in (*doc, eod)]
    n = len(flat) // seq_length
    require(n > 0, f"corpus of {len(flat)} tokens is shorter than one sequence of {seq_length}")
    return torch.tensor(flat[: n * seq_length], dtype=torch.long).view(n, seq_length)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then ``cfg.lr_decay`` to ``min_lr_ratio * lr`` (the engine uses
    megatron's ``OptimizerParamScheduler`` with the same settings)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_decay == "cosine" else 1 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)


def train(
    model: torch.nn.Module,
    objective: DiffusionObjective,
    train_rows: torch.Tensor,
    valid_rows: torch.Tensor,
    cfg: TrainConfig,
    on_eval: Callable[[int, NelboResult, float], None] | None = None,
    seed: int = 0,
    log_dir: str | None = None,
) -> TrainHistory:
    """Train on random batches of ``train_rows [n, L]``; evaluate NELBO on ``valid_rows`` every
    ``eval_every`` steps (and before the first step). Logs to TensorBoard when ``log_dir`` is set."""
    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps,
    )
    writer = _writer(log_dir)
    valid_batches = [valid_rows[i : i + cfg.batch_size] for i in range(0, len(valid_rows), cfg.batch_size)]
    valid_batches = valid_batches[: cfg.eval_batches]
    history = TrainHistory()

    def evaluate(step: int) -> None:
        result = evaluate_nelbo(model, objective, valid_batches, draws=cfg.eval_draws, seed=seed)
        history.evals.append((step, result))
        recent = history.losses[-cfg.eval_every :]
        if writer:
            writer.add_scalar("valid/nelbo", result.nelbo, step)
            writer.add_scalar("valid/ppl_bound", result.perplexity, step)
        if on_eval:
            on_eval(step, result, sum(recent) / len(recent) if recent else float("nan"))

    model.train()
    evaluate(0)
    bar = tqdm(range(cfg.steps), desc="train", unit="step", dynamic_ncols=True)
    tokens_per_step = cfg.batch_size * train_rows.shape[1]
    for step in bar:
        start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        rows = torch.randint(len(train_rows), (cfg.batch_size,), generator=gen)
        loss = objective.loss(model, train_rows[rows], generator=gen, step=step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        history.losses.append(loss.item())
        tok_s = tokens_per_step / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tok_s:,.0f}")
        if writer:
            writer.add_scalar("train/loss", loss.item(), step + 1)
            writer.add_scalar("train/grad_norm", grad_norm.item(), step + 1)
            writer.add_scalar("train/lr", lr_at(step, cfg), step + 1)
            writer.add_scalar("train/tokens_per_s", tok_s, step + 1)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            evaluate(step + 1)
    bar.close()
    if writer:
        writer.close()
    return history


def _writer(log_dir: str | None):
    if log_dir is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    Path(log_dir).mkdir(parents=True, exist_ok=True)
    return SummaryWriter(log_dir)
