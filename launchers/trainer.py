"""The training run behind ``e2d2 pretrain`` (`launchers.pretrain`), on the megatron-core engine.

One step: this rank's micro-batches (``launchers.data``), noised per sample
(``megatron_ext.objective.noised_samples``: the noise of a sample depends only on the run
seed and its index), megatron's schedules with DDP and (distributed) optimizer
(``megatron_ext.training.train_step``), the LR from megatron's
``OptimizerParamScheduler``, an optional EMA. Every ``train.eval_every`` steps the NELBO is
evaluated on the held-out split through the same engine, with seeded Monte-Carlo draws.

The run directory holds ``config.yaml``, ``metrics.jsonl`` (``launchers.metrics``),
``checkpoints/`` (``launchers.checkpointing``), ``tensorboard/`` and, once the last step
is done, ``summary.json``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from e2d2 import flops
from e2d2.diffusion import DiffusionObjective
from e2d2.errors import ConfigError, UserError
from e2d2.model import DiffusionLM
from launchers.checkpoint_dirs import resolve_checkpoint
from launchers.checkpointing import RunCheckpoints
from launchers.config import (
    RunConfig,
    identity_differences,
    load_run_config,
    save_run_config,
)
from launchers.data import PretrainData
from launchers.inputs import load_run_tokenizer
from launchers.metrics import VALID_NELBO_NAME, Progress, RunLogger, train_loss_name
from launchers.preemption import (
    STOP,
    describe,
    how_to_continue,
    start_checkpoint_helpers,
)

# Fault injection, for the tests and for rehearsing a cluster's failure handling; unset in
# normal runs. Comma-separated ``nan@STEP`` (that step's loss is NaN), ``kill_in_save@STEP``
# (SIGKILL the rank's process group while the checkpoint of STEP is half written),
# ``hold@STEP`` (after STEP and its checkpoint, wait for a stop signal) and ``hold@startup``
# (wait for it once the world is up, before the model and data are built).
FAULTS_ENV = "E2D2_FAULTS"
HOLD_TIMEOUT_S = 600.0  # hold@STEP waits this long for the signal a test promised


class TrainingAborted(RuntimeError):
    """The run cannot go on (too many non-finite steps in a row)."""


def pretrain(cfg: RunConfig, resume: str = "auto") -> int:
    """Run (or continue) the training described by ``cfg`` on this process's world."""
    from launchers.world import init_world, reported_once
    from megatron_ext import cpu_compat

    candidates, tokenizer, faults = checked_inputs(cfg, resume)
    if finished_at(cfg, resume, candidates) is not None:
        return 0
    cpu_compat.install()  # a no-op where CUDA is available
    from megatron_ext.training import enable_tf32

    enable_tf32()
    init_world()
    try:
        with reported_once():
            return _Trainer(cfg, faults).run(candidates, tokenizer)
    finally:
        torch.distributed.destroy_process_group()


def checked_inputs(cfg: RunConfig, resume: str) -> tuple[list[Path], object, dict[str, set]]:
    """Everything that can be checked without the other ranks (one ``UserError``): the
    checkpoints to resume from, the run's tokenizer, the injected faults."""
    candidates = resume_candidates(cfg, resume)
    tokenizer = load_run_tokenizer(cfg)
    faults = injected_faults()
    if cfg.checkpoint.init is not None:
        resolve_checkpoint(cfg.checkpoint.init)
    return candidates, tokenizer, faults


def finished_at(cfg: RunConfig, resume: str, candidates: list[Path]) -> int | None:
    """The step at which ``run.dir`` already finished, for ``train.steps`` at or below it (its
    summary written at the step of the checkpoint ``--resume auto`` would continue from),
    said once on the console; None when there is training to do."""
    from megatron_ext.checkpoint import CheckpointError, read_common

    summary = Path(cfg.run.dir) / "summary.json"
    if resume != "auto" or not candidates or not summary.is_file():
        return None
    step = json.loads(summary.read_text())["step"]
    try:
        saved = read_common(candidates[0])["state"]["step"]
    except CheckpointError:
        return None  # the restore falls back to an earlier checkpoint, and says so
    if not saved == step >= cfg.train.steps:
        return None
    from launchers.world import discover_world

    if discover_world().rank == 0:
        print(f"e2d2 pretrain: {cfg.run.dir} already finished at step {step} (train.steps="
              f"{cfg.train.steps}); nothing to do, nothing written. Raise train.steps to train "
              "further", file=sys.stderr)
    return step


def micro_batch_size(cfg: RunConfig, parallel) -> int:
    """``train.micro_batch_size``, or the whole per-DP-rank batch, checked against the layout."""
    dp, batch = parallel.data_parallel, cfg.train.batch_size
    micro = cfg.train.micro_batch_size or batch // dp
    if micro < 1 or batch % (micro * dp):
        raise ConfigError(
            f"train.batch_size={batch} must be a multiple of train.micro_batch_size x "
            f"data-parallel size = {cfg.train.micro_batch_size or 'batch_size/DP'} x {dp}")
    return micro


@dataclass
class TrainState:
    """What a checkpoint's common state carries besides the tensors."""

    step: int = 0
    consumed_samples: int = 0
    skipped_total: int = 0
    consecutive_skips: int = 0


def injected_faults() -> dict[str, set]:
    """``{"nan": {steps}, "kill_in_save": {steps}, "hold": {steps, "startup"?}}`` from
    ``E2D2_FAULTS``."""
    faults: dict[str, set] = {"nan": set(), "kill_in_save": set(), "hold": set()}
    raw = os.environ.get(FAULTS_ENV, "")
    for item in filter(None, (part.strip() for part in raw.split(","))):
        kind, _, step = item.partition("@")
        if kind == "hold" and step == "startup":
            faults[kind].add(step)
            continue
        if kind not in faults or not step.isdigit():
            raise ConfigError(f"{FAULTS_ENV}={raw!r}: expected comma-separated nan@STEP, "
                              "kill_in_save@STEP, hold@STEP or hold@startup")
        faults[kind].add(int(step))
    return faults


def _layout_of(parallel) -> dict:
    return {"world_size": parallel.world_size, "tensor_parallel": parallel.tensor_parallel,
            "pipeline_parallel": parallel.pipeline_parallel,
            "virtual_pipeline": parallel.virtual_pipeline,
            "encoder_pipeline_stages": parallel.encoder_pipeline_stages,
            # only when set, so that checkpoints from before the key keep matching
            **({"context_parallel": parallel.context_parallel}
               if parallel.context_parallel > 1 else {})}


def resume_candidates(cfg: RunConfig, resume: str) -> list[Path]:
    """Checkpoints to continue from, best first (empty: start fresh). Refuses a run directory
    that holds another run's config, and ``--resume none`` over existing checkpoints."""
    run_dir = Path(cfg.run.dir)
    own = RunCheckpoints(run_dir, cfg.checkpoint.keep)
    if resume == "none":
        if own.candidates():
            raise UserError(f"run.dir {run_dir} already holds checkpoints; continue it with "
                            "--resume auto, or start a new run with a new run.dir")
        return []
    saved_config = run_dir / "config.yaml"
    if saved_config.is_file():
        diffs = identity_differences(load_run_config(saved_config), cfg)
        if diffs:
            raise UserError(f"run.dir {run_dir} belongs to a different config ({'; '.join(diffs)}); "
                            "use a new run.dir with --resume none, or the config it was started with")
    if resume == "auto":
        return own.candidates()
    path = resolve_checkpoint(resume)
    if (path / "config.yaml").is_file():
        diffs = identity_differences(load_run_config(path / "config.yaml"), cfg)
        if diffs:
            raise UserError(f"checkpoint {path} holds another model ({'; '.join(diffs)})")
    return [path]


def _save_tokenizer(tokenizer, directory: Path) -> None:
    """A copy of the run's tokenizer (``e2d2 sample`` and export read it), written atomically."""
    if directory.is_dir():
        return
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    tokenizer.save(tmp)
    os.replace(tmp, directory)


def _parameter_counts(cfg) -> tuple[int, int]:
    """(all, non-embedding) parameters of the reference model."""
    with torch.device("meta"):
        model = DiffusionLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for n, p in model.named_parameters()
                    if n.startswith(("embed.", "lm_head.")))
    return total, total - embedding


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class _Trainer:
    def __init__(self, cfg: RunConfig, faults: dict[str, set[int]]) -> None:
        from megatron_ext.layout import PipelinePlan

        self.cfg, self.faults = cfg, faults
        self.rank = torch.distributed.get_rank()
        self.parallel = cfg.parallel.engine(torch.distributed.get_world_size(),
                                            cfg.train.precision, cfg.model)
        self.plan = PipelinePlan(cfg.model, self.parallel)
        self.micro_batch = micro_batch_size(cfg, self.parallel)
        self.run_dir = Path(cfg.run.dir)
        self.checkpoints = RunCheckpoints(self.run_dir, cfg.checkpoint.keep)
        self.objective = DiffusionObjective(cfg.model, cfg.diffusion)
        self.eval_noised: list[list[dict]] | None = None  # built on the first evaluation
        self.last_eval: dict | None = None

    def log(self, message: str) -> None:
        if self.rank == 0:
            from tqdm.auto import tqdm

            tqdm.write(message, file=sys.stderr)

    def _stopped_in_startup(self) -> int:
        """The stop code of a signal received so far (imports, build and restore included),
        logged; 0 when none. Called where nothing of the run has been written yet."""
        code = STOP.requested()
        if code:
            self.log(f"e2d2 pretrain: {describe(code)} during the start-up; no step taken, nothing "
                     f"half-written; exiting with code {code} ({how_to_continue(code)})")
        return code

    def run(self, candidates: list[Path], tokenizer) -> int:
        from megatron_ext.groups import megatron_layout

        if "startup" in self.faults["hold"]:
            STOP.wait(HOLD_TIMEOUT_S)
        if code := self._stopped_in_startup():
            return code
        with megatron_layout(self.parallel, seed=self.cfg.run.seed,
                             get_embedding_ranks=self.plan.get_embedding_ranks):
            from launchers.world import log_layout

            log_layout(self.plan)
            self.log("e2d2 pretrain: predicted forward FLOPs: " + self.plan.describe_shares())
            self._build_model()
            state = self._restore(candidates)
            from megatron.core import parallel_state

            # Continued from the consumed-sample count, also after a change of batch_size.
            last_sample = (state.consumed_samples
                           + max(self.cfg.train.steps - state.step, 0) * self.cfg.train.batch_size)
            self.data = PretrainData(self.cfg, tokenizer, parallel_state.get_data_parallel_rank(),
                                     self.parallel.data_parallel, self.micro_batch,
                                     self.run_dir / "cache", last_sample)
            if code := self._stopped_in_startup():
                return code
            if self.rank == 0:
                save_run_config(self.cfg, self.run_dir / "config.yaml")
                _save_tokenizer(tokenizer, self.run_dir / "tokenizer")
            logger = RunLogger(self.run_dir, self.rank == 0, self.cfg.log.tensorboard, state.step,
                               self.cfg.log.wandb, self.cfg.to_dict())
            try:
                return self._loop(state, logger)
            finally:
                logger.close()

    # -- setup ------------------------------------------------------------------------------
    def _build_model(self) -> None:
        from megatron_ext.engine import build_engine
        from megatron_ext.mapping import param_maps
        from megatron_ext.training import build_training_optimizer

        cfg = self.cfg
        init = cfg.checkpoint.init
        self.stages, self.chunks = build_engine(
            cfg.model, self.parallel, seed=cfg.run.seed,
            init=None if init is None else resolve_checkpoint(init),
            init_strict=cfg.checkpoint.init_strict, log=lambda line: self.log(f"e2d2 pretrain: {line}"))
        self.optimizer, self.scheduler = build_training_optimizer(self.chunks, self.parallel,
                                                                  cfg.train)
        self.params = [m.param for stage in self.stages for m in param_maps(stage)]
        # fp32 even for bf16 weights: a bf16 average would drop updates of (1 - decay) ~ 1e-4.
        # A copy always: `.float()` of an fp32 parameter is the parameter itself, and an EMA
        # aliasing the weights is just the weights.
        self.ema = ([p.detach().to(torch.float32, copy=True) for p in self.params]
                    if cfg.train.ema_decay > 0 else None)

    def _restore(self, candidates: list[Path]) -> TrainState:
        if not candidates:
            return TrainState()
        self._check_optimizer_state(candidates[0])
        layout = _layout_of(self.parallel)
        path, common = self.checkpoints.load(
            candidates, self.stages, self.optimizer, self.ema,
            same_layout=lambda common: common.get("layout") == layout)
        # The schedule's shape comes from this run's config (a longer train.steps re-shapes
        # the decay); only the position in it comes from the checkpoint.
        self.scheduler.num_steps = common["scheduler"]["num_steps"]
        self.scheduler.step(0)
        state = TrainState(**common["state"])
        changed = "" if common.get("layout") == layout else (
            f" (saved on {common.get('layout')}: resharded; RNG states from run.seed)")
        self.log(f"e2d2 pretrain: resumed from {path} at step {state.step}{changed}")
        moved = self.checkpoints.abandon_after(state.step)
        if moved:
            self.log(f"e2d2 pretrain: the checkpoints after step {state.step} belong to the "
                     f"trajectory this resume abandons; moved {', '.join(p.name for p in moved)} "
                     f"to {moved[0].parent} (delete them when no longer needed)")
        return state

    def _check_optimizer_state(self, path: Path) -> None:
        """One clear error, before any load, for a checkpoint whose optimizer state this run's
        optimizer cannot read (megatron-core 0.16.1 gives a KeyError deep in the load, and
        every checkpoint would then look corrupt)."""
        from megatron_ext.checkpoint import CheckpointError, read_common

        try:
            common = read_common(path)
        except CheckpointError:
            return  # unreadable: the loader reports it and falls back
        way_out = (f"or start a new run from its weights (Adam's moments start afresh) with "
                   f"checkpoint.init={path} and --resume none")
        # The two optimizers' formats differ: the distributed optimizer keeps fp32 main
        # weights and per-parameter group metadata, megatron's other optimizers neither.
        distributed = self.parallel.use_distributed_optimizer
        saved_distributed = common.get("config", {}).get("parallel", {}).get(
            "use_distributed_optimizer", distributed)
        if saved_distributed != distributed:
            raise UserError(
                f"checkpoint {path} was saved with parallel.use_distributed_optimizer="
                f"{str(saved_distributed).lower()}, this run has "
                f"{str(distributed).lower()}: megatron-core stores the two optimizers' states "
                "in formats that do not load into each other. Resume with parallel."
                f"use_distributed_optimizer={str(saved_distributed).lower()}, {way_out}")
        # megatron's fp32 and mixed-precision optimizers keep different states (only the
        # distributed optimizer's loads across precisions).
        saved = common.get("precision", "fp32")  # older checkpoints: fp32
        now = self.cfg.train.precision
        if not distributed and (saved == "fp32") != (now == "fp32"):
            raise UserError(f"checkpoint {path} was saved with train.precision={saved}, this run "
                            f"has train.precision={now}: the optimizer states differ. Resume "
                            f"with train.precision={saved}, {way_out}")

    def _save(self, state: TrainState) -> None:
        from megatron_ext.training import sync_params

        sync_params(self.chunks)  # the weights of this step, not of the previous one
        common = {"state": dataclasses.asdict(state), "scheduler": self.scheduler.state_dict(),
                  "config": self.cfg.to_dict(), "layout": _layout_of(self.parallel),
                  "precision": self.cfg.train.precision}
        kill = state.step in self.faults["kill_in_save"]
        path = self.checkpoints.save(state.step, self.cfg, self.stages, self.optimizer,
                                     self.ema, common, kill_after_write=kill)
        self.log(f"e2d2 pretrain: saved {path}")

    # -- the loop ---------------------------------------------------------------------------
    def _loop(self, state: TrainState, logger: RunLogger) -> int:
        from megatron_ext.objective import make_forward_step, noised_samples
        from megatron_ext.training import sync_params, train_step

        cfg, train = self.cfg, self.cfg.train
        start_checkpoint_helpers()
        poisoned = self.faults["nan"]
        forward = make_forward_step(self.objective)
        poisoned_forward = make_forward_step(self.objective, poison_loss=True)
        tokens_per_step = train.batch_size * cfg.model.seq_length
        flops_per_token = flops.training_flops_per_token(cfg.model).masked
        seq_length = self.stages[0].stream_length()
        bar = Progress(train.steps, state.step, self.rank == 0,
                       train_loss_name(cfg.diffusion.loss_weighting, cfg.model.variant))
        if state.step == 0:
            self._evaluate(0, logger)
        batches = self.data.train_steps(state.consumed_samples)
        saved_at = state.step
        while state.step < train.steps:
            start = time.perf_counter()
            micro = next(batches)
            data_wait = time.perf_counter() - start
            noised = [noised_samples(self.objective, x0, ids, cfg.run.seed, step=state.step,
                                     global_batch=train.batch_size)
                      for x0, ids in micro]
            self.scheduler.step(1)  # warm-up from lr/warmup at the first step, not from 0
            lr = self.optimizer.param_groups[0]["lr"]
            result = train_step(
                self.chunks, self.optimizer,
                poisoned_forward if state.step + 1 in poisoned else forward, noised,
                seq_length=seq_length, micro_batch_size=self.micro_batch)
            state.step += 1
            state.consumed_samples += train.batch_size
            if result.skipped:
                state.skipped_total += 1
                state.consecutive_skips += 1
            else:
                state.consecutive_skips = 0
                if self.ema is not None:
                    sync_params(self.chunks)  # gives up overlap_param_gather's overlap
                    torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.params],
                                         1.0 - train.ema_decay)
            elapsed = time.perf_counter() - start
            tokens_per_s = tokens_per_step / elapsed
            record = {"step": state.step, "loss": result.loss, "lr": lr,
                      "grad_norm": result.grad_norm, "tokens_per_s": tokens_per_s,
                      "skipped": result.skipped, "skipped_total": state.skipped_total,
                      "data_wait_s": data_wait}
            if cfg.diffusion.anneal_steps:  # the ratio the step trained with
                record["anneal_ratio"] = self.objective.anneal_ratio(state.step - 1)
            scalars = {}
            if state.step % cfg.log.interval == 0 or state.step == train.steps:
                scalars = self._scalars(result, lr, tokens_per_s, flops_per_token, data_wait)
            logger.record(record, scalars)
            bar.step(state.step, result.loss, tokens_per_s, scalars)
            if result.skipped:
                self.log(f"step {state.step}: non-finite loss or gradients, step skipped "
                         f"({state.consecutive_skips} in a row, {state.skipped_total} in all)")
            if state.consecutive_skips >= train.max_consecutive_skips:
                raise TrainingAborted(
                    f"{state.consecutive_skips} consecutive steps had non-finite loss or "
                    f"gradients (train.max_consecutive_skips={train.max_consecutive_skips}) at "
                    f"step {state.step}; lower train.lr, check the data, or resume from an "
                    "earlier checkpoint")
            if state.step % train.eval_every == 0 or state.step == train.steps:
                self._evaluate(state.step, logger)
            if state.step % cfg.checkpoint.interval == 0 or state.step == train.steps:
                self._save(state)
                saved_at = state.step
            if state.step in self.faults["hold"]:
                STOP.wait(HOLD_TIMEOUT_S)
            # After the last step the run completes instead (its summary is a step away).
            if state.step < train.steps and (code := STOP.requested()):
                if saved_at != state.step:
                    self._save(state)
                self.log(f"e2d2 pretrain: {describe(code)} at step {state.step}; checkpoint "
                         f"saved, exiting with code {code} ({how_to_continue(code)})")
                bar.close()
                return code
        bar.close()
        if self.last_eval is None:  # resumed a finished run whose summary was not written
            self._evaluate(state.step, logger)
        self._write_summary(state)
        return 0

    def _scalars(self, result, lr, tokens_per_s, flops_per_token, data_wait) -> dict[str, float]:
        achieved = tokens_per_s * flops_per_token
        scalars = {"train/loss": result.loss, "train/lr": lr,
                   "train/grad_norm": result.grad_norm if result.grad_norm is not None else math.nan,
                   "perf/tokens_per_s": tokens_per_s, "perf/tflops": achieved / 1e12,
                   "perf/peak_memory_gb": _peak_memory_gb(), "perf/data_wait_s": data_wait}
        if torch.cuda.is_available():
            per_gpu = tokens_per_s / self.parallel.world_size
            scalars["perf/mfu"] = flops.mfu(per_gpu, flops_per_token)
        return scalars

    # -- evaluation -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _evaluation_weights(self):
        """The EMA weights in the model while evaluating, when an EMA is kept."""
        if self.ema is None:
            yield
            return
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.ema)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, backup)

    def _eval_inputs(self) -> list[list[dict]]:
        """Noised validation micro-batches per Monte-Carlo draw: seeded, so every evaluation
        of a run (and of any layout) sees the same noise."""
        if self.eval_noised is None:
            from megatron_ext.objective import noised_samples

            batches = self.data.eval_batches()
            self.eval_noised = [
                [noised_samples(self.objective, x0, ids, self.cfg.run.seed, train=False, draw=d)
                 for x0, ids in batches]
                for d in range(self.cfg.train.eval_draws)]
        return self.eval_noised

    def _evaluate(self, step: int, logger: RunLogger) -> None:
        from megatron_ext.groups import collective_device
        from megatron_ext.objective import make_forward_step
        from megatron_ext.training import forward_only, last_stage_sum, sync_params

        forward = make_forward_step(self.objective, evaluation=True)
        sync_params(self.chunks)
        values = []
        with self._evaluation_weights():
            for chunk in self.chunks:
                chunk.eval()
            for draw in self._eval_inputs():
                outputs = forward_only(self.chunks, forward, draw,
                                       seq_length=self.stages[0].stream_length(),
                                       micro_batch_size=self.micro_batch)
                values += [out["per_sequence"] for out in outputs]
            for chunk in self.chunks:
                chunk.train()
        local = (torch.cat(values).double() if values
                 else torch.zeros(0, dtype=torch.float64, device=collective_device()))
        total, squares, count = last_stage_sum(torch.stack(
            [local.sum(), (local**2).sum(), torch.tensor(float(local.numel()), device=local.device)]))
        nelbo = (total / count).item()
        variance = max((squares / count).item() - nelbo**2, 0.0)
        std_error = math.sqrt(variance / count.item()) if count > 1 else math.nan
        ppl = math.exp(min(nelbo, 700.0))
        record = {"step": step, "nelbo": nelbo, "ppl": ppl, "nelbo_std_error": std_error,
                  "eval_sequences": int(count.item()) // self.cfg.train.eval_draws}
        logger.record(record, {"valid/nelbo": nelbo, "valid/ppl": ppl})
        self.last_eval = record
        self.log(f"step {step:6d}  {VALID_NELBO_NAME}: {nelbo:.4f} ± {std_error:.4f} "
                 f"(ppl <= {ppl:.2f})")

    def _write_summary(self, state: TrainState) -> None:
        if self.rank != 0:
            return
        params, non_embedding = _parameter_counts(self.cfg.model)
        tokens = state.consumed_samples * self.cfg.model.seq_length
        summary = {"step": state.step, "nelbo": self.last_eval["nelbo"],
                   "nelbo_std_error": self.last_eval["nelbo_std_error"],
                   "ppl": self.last_eval["ppl"], "params": params,
                   "non_embedding_params": non_embedding,
                   "train_flops": flops.training_flops_per_token(self.cfg.model).masked * tokens,
                   "tokens": tokens, "skipped_steps": state.skipped_total}
        path = self.run_dir / "summary.json"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, path)

