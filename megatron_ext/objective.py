"""The forward step megatron-core's schedules call, and the loss on vocab-parallel logits.

Noising happens before the schedule (``noised_batch``), identically on every stage of a
pipeline, so each stage reads the fields it needs from the same micro-batch. The loss
math is ``e2d2.diffusion``'s: only the per-token NLL is computed here, with megatron's
vocab-parallel cross-entropy, because no rank holds the full vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from functools import partial

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from e2d2.diffusion import (
    DiffusionObjective,
    NoisedBatch,
    ar_per_sequence_loss,
    loss_mask_of,
    per_sequence_loss,
    stratified_times,
)
from megatron_ext.context import ContextSplit

Batch = dict[str, torch.Tensor]  # NoisedBatch fields plus optional attention/context masks


def noised_batch(objective: DiffusionObjective, x0: torch.Tensor, attention_mask=None,
                 context_mask=None, generator: torch.Generator | None = None,
                 train: bool = True, step: int | None = None,
                 times: torch.Tensor | None = None) -> Batch:
    """Noise ``x0 [batch, L]`` with the reference objective (training or evaluation noise)
    into a schedule micro-batch source. AR gets only ``x0`` and its loss mask.

    ``step``: the training step, whose attention annealing ratio (``diffusion.anneal_steps``)
    travels as ``anneal_ratio [batch]`` (float64, so it is the reference's float exactly)
    while it is below 1; the model's ``_mask`` reads it. None (evaluation): the variant's mask.
    ``times [batch, L / S]``: given block times (`noised_samples`), else drawn from ``generator``.
    """
    if objective.model_cfg.plan.autoregressive:
        batch = {"x0": x0, "loss_mask": loss_mask_of(x0, attention_mask, context_mask)}
    else:
        nb = objective.noise(x0, attention_mask, context_mask, train=train, generator=generator,
                             times=times)
        batch = dataclasses.asdict(nb)
        ratio = objective.anneal_ratio(step)
        if ratio < 1:
            batch["anneal_ratio"] = torch.full((x0.shape[0],), ratio, dtype=torch.float64)
    for name, value in (("attention_mask", attention_mask), ("context_mask", context_mask)):
        if value is not None:
            batch[name] = value
    return batch


def sample_generator(seed: int, *keys: int) -> torch.Generator:
    """A generator determined by ``(seed, *keys)`` alone (numpy's SeedSequence mixing), so that a
    sample's noise depends on the run seed and the sample's index, never on the layout, the
    micro-batch split or how often the run was resumed."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0]))


TRAIN_NOISE, EVAL_NOISE, STEP_TIMES = 0, 1, 2  # ``keys`` namespaces of sample_generator


def noised_samples(objective: DiffusionObjective, x0: torch.Tensor, sample_ids: list[int],
                   seed: int, train: bool = True, draw: int = 0, step: int | None = None,
                   global_batch: int | None = None, attention_mask: torch.Tensor | None = None,
                   context_mask: torch.Tensor | None = None) -> Batch:
    """Noise each row of ``x0 [n, L]`` with its own generator, keyed by its global sample index
    (``sample_ids``, the dataset index) and, for evaluation, the Monte-Carlo ``draw``;
    ``attention_mask`` / ``context_mask [n, L]``: padding and prompts (`e2d2 eval`'s rows).

    Per-row generators make the global batch's noise independent of the data-parallel split,
    so a resumed or re-laid-out run sees the very noise it would have seen. ``step``: the
    training step (the annealed mask, `noised_batch`).

    Antithetic training times (``DiffusionConfig.antithetic``) are stratified over the step's
    whole global batch, as the reference trainer stratifies its batch: one uniform per step
    (keyed by ``step``) shifted by ``i / n`` over the ``n = global_batch * L / S`` blocks,
    block ``j`` of a sample taking stratum ``(sample_id % global_batch) * L / S + j``. A step's
    samples are ``global_batch`` consecutive stream indices (megatron's pretraining sampler),
    so every stratum is taken once, on whichever rank its sample lands; MDLM, one block per
    sequence, is stratified over the sequences.
    """
    if x0.shape[0] != len(sample_ids):
        raise ValueError(f"{x0.shape[0]} rows for {len(sample_ids)} sample ids")
    times = None
    if train and objective.cfg.antithetic and not objective.model_cfg.plan.autoregressive:
        if step is None or global_batch is None:
            raise ValueError("antithetic training noise is stratified over the global batch: "
                             "pass step and global_batch")
        n_blocks = x0.shape[1] // objective.model_cfg.diffusion_block_size
        u = torch.rand(1, generator=sample_generator(seed, STEP_TIMES, step))
        first = torch.tensor(sample_ids) % global_batch * n_blocks
        times = stratified_times(u, first[:, None] + torch.arange(n_blocks), global_batch * n_blocks,
                                 objective.sampling_eps)
    namespace = (TRAIN_NOISE,) if train else (EVAL_NOISE, draw)
    rows = [noised_batch(objective, x0[i : i + 1], _row(attention_mask, i), _row(context_mask, i),
                         train=train, step=step,
                         generator=sample_generator(seed, *namespace, sample_id),
                         times=None if times is None else times[i : i + 1])
            for i, sample_id in enumerate(sample_ids)]
    return {k: torch.cat([row[k] for row in rows]) for k in rows[0]}


def _row(mask: torch.Tensor | None, i: int) -> torch.Tensor | None:
    return None if mask is None else mask[i : i + 1]


def micro_batches(batch: Batch, micro_batch_size: int) -> list[Batch]:
    """Split every ``[batch, ...]`` field into micro-batches of ``micro_batch_size`` rows."""
    n = next(iter(batch.values())).shape[0]
    if n % micro_batch_size:
        raise ValueError(f"batch of {n} rows is not a multiple of micro_batch_size={micro_batch_size}")
    return [{k: v[i : i + micro_batch_size] for k, v in batch.items()}
            for i in range(0, n, micro_batch_size)]


def vocab_parallel_token_nll(logits: torch.Tensor, target: torch.Tensor,
                             exclude_token: int | None = None) -> torch.Tensor:
    """``-log softmax(logits)[target]`` for logits split over TP ranks on the vocab dim.

    logits ``[batch, L, vocab / TP]``, contiguous or a sequence-first tensor seen batch-first
    (the LM head's output under sequence parallelism; megatron ``.view``s its input, so the
    cross-entropy runs sequence-first there, as in megatron's GPT), target ``[batch, L]`` ->
    ``[batch, L]`` float32. ``exclude_token`` gets logit ``-inf`` first
    (SUBS: ``[MASK]`` is never predicted), on the one rank whose vocab slice holds it, like
    ``e2d2.diffusion.token_nll``.

    **Consumes ``logits``** (no copy is made): the ``-inf`` is written into them and megatron's
    cross-entropy turns them into the softmax in place, which it keeps for the backward pass.
    That is safe for the model's output, which nothing else reads: the LM head's backward
    needs its input and weight, not its output. fp32 logits are used as they are (bf16 runs
    get fp32 logits from ``Float16Module``, the one upcast); lower-precision logits are
    upcast once inside megatron's cross-entropy.
    """
    if exclude_token is not None:
        local = logits.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * local
        if start <= exclude_token < start + local:
            logits[..., exclude_token - start] = float("-inf")
    if not logits.is_contiguous() and logits.transpose(0, 1).is_contiguous():
        nll = vocab_parallel_cross_entropy(logits.transpose(0, 1), target.t().contiguous())
        return nll.t()
    return vocab_parallel_cross_entropy(logits, target)


def _sequence_nll(logits: torch.Tensor, targets: torch.Tensor,
                  exclude_token: int | None = None, shifted: bool = False) -> torch.Tensor:
    """``vocab_parallel_token_nll`` of the whole sequence's ``targets [batch, L]``; with
    context parallelism ``logits`` hold this rank's positions only (``megatron_ext.context``)
    and the ranks' NLLs are gathered, so that every CP rank reduces the whole sequence.

    ``shifted`` (``ModelConfig.shift`` under CP): the logits are the model's unaligned slot
    outputs, slot ``s`` predicting ``targets[s + 1]``, which may sit on another CP rank, so
    the NLL is aligned after the gather instead (as ``e2d2.shift.align_logits`` aligns the
    logits: position 0 gets slot 0's value, a dummy that never counts)."""
    split = ContextSplit.current()
    if split is None:
        return vocab_parallel_token_nll(logits, targets, exclude_token)
    if shifted:
        targets = torch.cat((targets[:, 1:], targets[:, -1:]), 1)
    nll = split.gather_tokens(vocab_parallel_token_nll(logits, split.local(targets), exclude_token))
    return torch.cat((nll[:, :1], nll[:, :-1]), 1) if shifted else nll


def _reduced(per_sequence: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Micro-batch mean for the backward pass; the detached mean (``loss``) and per-sequence
    values (``per_sequence``, evaluation) for what the schedule returns."""
    loss = per_sequence.mean()
    return loss, {"loss": loss.detach().clone(), "per_sequence": per_sequence.detach().clone()}


def diffusion_loss(batch: Batch, logits: torch.Tensor, *, mask_token_id: int,
                   weighting: str, shifted: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Micro-batch mean of ``e2d2.diffusion.per_sequence_loss`` (the reference's reduction).
    With ``weighting="elbo"`` on evaluation noise, ``per_sequence`` is each row's NELBO.
    ``shifted``: see ``_sequence_nll``."""
    nll = _sequence_nll(logits, batch["x0"], mask_token_id, shifted)
    fields = {f.name: batch[f.name] for f in dataclasses.fields(NoisedBatch)}
    return _reduced(per_sequence_loss(nll, NoisedBatch(**fields), weighting))


def ar_loss(batch: Batch, logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token loss: vocab-parallel NLL, reduced by ``e2d2.diffusion.ar_per_sequence_loss``.
    The last position has no next token; its NLL (against a dummy target) is computed with
    the rest and dropped, so that the logits are used whole instead of copied out of a
    non-contiguous ``[:, :-1]`` slice. Dropped, it gets a zero gradient."""
    x0 = batch["x0"]
    targets = torch.cat((x0[:, 1:], torch.zeros_like(x0[:, :1])), dim=1)
    nll = _sequence_nll(logits, targets)[:, :-1]
    return _reduced(ar_per_sequence_loss(nll, batch["loss_mask"]))


def make_forward_step(objective: DiffusionObjective, evaluation: bool = False,
                      poison_loss: bool = False) -> Callable:
    """``forward_step(data_iterator, model) -> (output, loss_func)`` for megatron's schedules.

    ``evaluation``: the NELBO's ELBO weighting (feed it evaluation noise), whatever the
    training weighting. ``poison_loss`` multiplies the loss by NaN: fault injection for the
    tests of non-finite step handling.
    """
    cfg = objective.model_cfg
    if cfg.plan.autoregressive:
        loss_of = ar_loss
    else:
        loss_of = partial(diffusion_loss, mask_token_id=cfg.mask_token_id,
                          weighting="elbo" if evaluation else objective.cfg.loss_weighting,
                          shifted=cfg.shift)
    if poison_loss:
        clean_loss_of = loss_of

        def loss_of(batch, logits):
            loss, reduced = clean_loss_of(batch, logits)
            return loss * float("nan"), {k: v * float("nan") for k, v in reduced.items()}

    def forward_step(data_iterator: Iterator[Batch], model: torch.nn.Module):
        # The micro-batch goes to the model's device (CUDA after build_chunks on a GPU;
        # a no-op on CPU).
        batch = next(data_iterator)
        param = next(model.parameters(), None)
        if param is not None:
            batch = {k: v.to(param.device) for k, v in batch.items()}
        return model(batch), partial(loss_of, batch)

    return forward_step
