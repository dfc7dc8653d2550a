"""The per-module profiler behind ``e2d2 profile`` (`launchers.profile`, whose help says what
it measures)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from e2d2.config import ModelConfig
from e2d2.errors import UserError

TOLERANCE = 0.02  # the largest relative DeepSpeed-vs-analytic difference not flagged
INSTALL_HINT = ("e2d2 profile needs DeepSpeed's FLOPs profiler, which is not installed: "
                "pip install 'e2d2[profile]' (from a checkout: pip install -e '.[profile]'). "
                "Without CUDA, keep the CPU torch and skip DeepSpeed's kernels: "
                "DS_BUILD_OPS=0 pip install deepspeed 'torch==<your torch version>'")


# ------------------------------------------------------------------ results
@dataclass(frozen=True)
class Row:
    """One module: ``flops`` (DeepSpeed) and ``analytic`` (e2d2.flops; None: no count) are
    forward FLOPs per step; times are seconds per step."""

    name: str
    params: int
    flops: float
    analytic: float | None
    forward_s: float | None
    backward_s: float | None

    @property
    def difference(self) -> float | None:
        """(DeepSpeed - analytic) / analytic, None where there is nothing to compare."""
        if self.analytic is None or self.analytic == 0:
            return None
        return (self.flops - self.analytic) / self.analytic

    @property
    def flagged(self) -> bool:
        """Counted both ways and apart by more than ``TOLERANCE`` (modules without matmuls,
        the norms and the embedding, are not compared)."""
        return self.difference is not None and abs(self.difference) > TOLERANCE


@dataclass(frozen=True)
class ProfileReport:
    title: str
    rows: list[Row]

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    def format(self) -> str:
        headers = ["module", "params", "fwd FLOPs (DeepSpeed)", "fwd FLOPs (e2d2.flops)", "diff",
                   "", "fwd ms", "bwd FLOPs (2x fwd)", "bwd ms"]
        cells = []
        for r in self.rows:
            diff = "" if r.difference is None else f"{100 * r.difference:+.2f}%"
            cells.append([r.name or "(model)", _si(r.params), _si(r.flops),
                          "" if r.analytic is None else _si(r.analytic), diff,
                          "!" if r.flagged else "", _ms(r.forward_s), _si(2 * r.flops),
                          _ms(r.backward_s)])
        flagged = [r.name or "(model)" for r in self.rows if r.flagged]
        note = (f"! DeepSpeed and e2d2.flops differ by more than {100 * TOLERANCE:.0f}%: "
                + ", ".join(flagged)) if flagged else (
            f"DeepSpeed and e2d2.flops agree within {100 * TOLERANCE:.0f}% on every module compared")
        return "\n".join([self.title, _table(headers, cells), note])


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{1e3 * seconds:.2f}"


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3f} {unit}"
    return f"{x:.0f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "| " + " | ".join([first, *rest]) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), rule, *map(line, rows)])


# ------------------------------------------------------------------ analytic counts
def analytic_flops(cfg: ModelConfig, names: list[str], batch: int) -> dict[str, float]:
    """``e2d2.flops.module_costs`` (dense attention) of one step of ``batch`` sequences for
    every module name of a (stage of a) model with reference-style names: ``layers.{i}``,
    ``.attn``, ``.mlp``, ``decoder_layers.{k}...``, ``lm_head`` (0 for norms and the
    embedding, which do no matmul); the model (``""``) is the sum of its layers and head."""
    from e2d2 import flops

    m = flops.module_costs(cfg)
    # A decoder tied to the encoder runs the matched encoder layers a second time.
    tied = ({cfg.matched_encoder_layer(k) for k in range(cfg.num_decoder_layers)}
            if cfg.tie_decoder_to_encoder else set())

    def layer(stack: str, index: int) -> dict[str, float]:
        """A layer's forward FLOPs per call it gets: {"attn": ..., "mlp": ...}."""
        top = stack == "layers" and index == cfg.num_layers - 1
        calls = [(m.top_attention, m.top_mlp) if top else (m.attention, m.mlp)] if stack == "layers" else []
        if stack == "decoder_layers" or index in tied:
            calls.append((m.decoder_attention, m.decoder_mlp))
        return {"attn": sum(a.dense for a, _ in calls), "mlp": sum(f.dense for _, f in calls)}

    out = {}
    for name in names:
        parts = name.split(".")
        if parts[0] in ("layers", "decoder_layers") and len(parts) > 1:
            costs = layer(parts[0], int(parts[1]))
            if len(parts) == 2:
                out[name] = batch * (costs["attn"] + costs["mlp"])
            elif len(parts) == 3:
                out[name] = batch * costs.get(parts[2], 0.0)  # norms: 0
        elif name == "lm_head":
            out[name] = batch * m.head.dense
        elif name and "." not in name and name not in ("layers", "decoder_layers"):
            out[name] = 0.0  # the embedding, the encoder and final norms
    for stack in ("layers", "decoder_layers"):  # the ModuleLists
        if stack in names:
            out[stack] = sum(v for k, v in out.items() if k.startswith(stack + ".")
                             and k.count(".") == 1)
    out[""] = sum(v for k, v in out.items() if k.count(".") == 1 or k == "lm_head")
    return out


# ------------------------------------------------------------------ the models
def _deepspeed_profiler():
    if not torch.cuda.is_available():  # what DeepSpeed would detect, without its warning
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from deepspeed.profiling.flops_profiler import FlopsProfiler
        from deepspeed.profiling.flops_profiler.profiler import (
            get_module_duration,
            get_module_flops,
        )
    except ImportError as exc:
        raise UserError(f"{INSTALL_HINT} ({exc})") from None
    return FlopsProfiler, get_module_flops, get_module_duration


def _tokens(cfg: ModelConfig, batch: int, generator: torch.Generator, device) -> dict:
    """Random ``x0`` without ``[MASK]`` and ``xt``: x0 with half its tokens masked."""
    x0 = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_length), generator=generator)
    if cfg.mask_token_id is not None:
        x0[x0 == cfg.mask_token_id] = (cfg.mask_token_id + 1) % cfg.vocab_size
        xt = torch.where(torch.rand(x0.shape, generator=generator) < 0.5, cfg.mask_token_id, x0)
    else:
        xt = x0.clone()
    return {"x0": x0.to(device), "xt": xt.to(device)}


class _Reference:
    """One step of ``DiffusionLM``: logits of the predicted stream, cross-entropy to ``x0``."""

    def __init__(self, cfg: ModelConfig, seed: int, device):
        from e2d2.model import DiffusionLM

        self.model = DiffusionLM(cfg, seed=seed).to(device)
        self.title = "reference DiffusionLM"

    def step(self, batch: dict, sync) -> float:
        logits = self.model(batch["x0"], batch["xt"])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["x0"].flatten())
        return _timed_backward(loss, None, sync)


class _EngineStage:
    """One step of a ``ParallelDiffusionLM`` stage at TP1 (inside ``megatron_layout``)."""

    def __init__(self, run_cfg, stage: int | None, device):
        from megatron_ext.layout import ParallelConfig, PipelinePlan
        from megatron_ext.mapping import initialize_at_seed
        from megatron_ext.model import ParallelDiffusionLM, transformer_config

        cfg, p = run_cfg.model, run_cfg.parallel
        one = ParallelConfig(1)
        if stage is None:
            plan, stage = PipelinePlan(cfg, one), 0
        else:
            pipeline = ParallelConfig(p.pipeline_parallel, 1, p.pipeline_parallel,
                                      p.encoder_pipeline_stages, p.virtual_pipeline,
                                      pipeline_layers=p.pipeline_layers)
            plan = PipelinePlan(cfg, pipeline)
            if not 0 <= stage < len(plan.stages()):
                raise UserError(f"--stage {stage}: the plan has stages 0..{len(plan.stages()) - 1}")
        self.model = ParallelDiffusionLM(cfg, plan, stage, transformer_config(cfg, one)).to(device)
        initialize_at_seed(self.model, cfg, run_cfg.run.seed)
        here = self.model.layers_here
        self.title = (f"engine stage {stage} of {len(plan.stages())} (TP1): encoder layers "
                      f"{list(here.encoder)}, decoder layers {list(here.decoder)}"
                      f"{', LM head' if here.holds_head else ''}")

    def step(self, batch: dict, sync) -> float:
        model = self.model
        if not model.pre_process:
            incoming = torch.randn(model.stream_length(), batch["x0"].shape[0],
                                   model.cfg.hidden_size, device=batch["x0"].device,
                                   requires_grad=True)
            model.set_input_tensor(incoming)
        out = model(batch)
        if model.post_process:
            loss = F.cross_entropy(out.flatten(0, 1).float(), batch["x0"].flatten())
            return _timed_backward(loss, None, sync)
        return _timed_backward(out, torch.randn_like(out), sync)


def _timed_backward(output: torch.Tensor, gradient: torch.Tensor | None, sync) -> float:
    sync()
    start = time.perf_counter()
    output.backward(gradient)
    sync()
    return time.perf_counter() - start


@contextlib.contextmanager
def _engine_world(seed: int) -> Iterator[None]:
    from launchers.hf.checkpoints import single_process_group
    from megatron_ext.groups import megatron_layout
    from megatron_ext.layout import ParallelConfig

    with single_process_group(), megatron_layout(ParallelConfig(1), seed=seed):
        yield


def _first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((t for t in map(_first_tensor, value) if t is not None), None)
    return None


class _BackwardTimer:
    """Per module: seconds from the gradient reaching its (first) output to the gradient of
    its (first) input being complete; modules whose input needs no gradient get None."""

    def __init__(self, modules: dict[str, nn.Module], sync):
        self.seconds: dict[str, float | None] = dict.fromkeys(modules)
        self._sync = sync
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def forward_hook(module, args, output):
            out, inp = _first_tensor(output), _first_tensor(args)
            if out is None or inp is None or not (out.requires_grad and inp.requires_grad):
                return
            started: list[float] = []

            def output_grad(grad):
                self._sync()
                started.append(time.perf_counter())

            def input_grad(grad):
                if started:
                    self._sync()
                    self.seconds[name] = (self.seconds[name] or 0.0) + time.perf_counter() - started.pop()

            out.register_hook(output_grad)
            inp.register_hook(input_grad)

        return forward_hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def profile(run_cfg, model: str = "reference", stage: int | None = None, steps: int = 2,
            warmup: int = 1, depth: int = 3) -> ProfileReport:
    """Profile ``steps`` steps (after ``warmup``) of ``run_cfg``'s model; see the module doc."""
    FlopsProfiler, get_module_flops, get_module_duration = _deepspeed_profiler()
    from e2d2.attention import sdpa_only

    if steps < 1 or warmup < 0:
        raise UserError(f"--steps must be >= 1 and --warmup >= 0 (got {steps}, {warmup})")
    if stage is not None and model != "engine":
        raise UserError("--stage profiles a pipeline stage of the engine: add --model engine")
    cfg = run_cfg.model
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else (
        torch.device("cpu"))
    batch_size = run_cfg.train.micro_batch_size or run_cfg.train.batch_size
    batch = _tokens(cfg, batch_size, torch.Generator().manual_seed(run_cfg.run.seed), device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    world = _engine_world(run_cfg.run.seed) if model == "engine" else contextlib.nullcontext()
    with world, sdpa_only():
        runner = _EngineStage(run_cfg, stage, device) if model == "engine" else _Reference(
            cfg, run_cfg.run.seed, device)
        net = runner.model
        for _ in range(warmup):
            runner.step(batch, sync)
        modules = {n: m for n, m in net.named_modules() if n == "" or n.count(".") < depth}
        timer = _BackwardTimer(modules, sync)
        profiler = FlopsProfiler(net)
        profiler.start_profile()
        backward = 0.0
        try:
            for _ in range(steps):
                net.zero_grad(set_to_none=True)
                backward += runner.step(batch, sync)
            profiler.stop_profile()
            timer.seconds[""] = backward  # the whole backward pass
            # Counted over every module, so that a stack's total does not depend on --depth.
            analytic = analytic_flops(cfg, [n for n, _ in net.named_modules()] + ["lm_head"],
                                      batch_size)
            rows = _rows(cfg, modules, analytic, steps, timer, get_module_flops,
                         get_module_duration, model == "reference")
        finally:
            timer.remove()
            profiler.end_profile()
    title = (f"e2d2 profile: {runner.title}; {cfg.variant}, micro-batch {batch_size} x "
             f"{cfg.seq_length} tokens, {steps} profiled steps after {warmup} warm-up, on {device}"
             f"; per step")
    return ProfileReport(title, rows)


def _rows(cfg, modules, analytic, steps, timer, get_module_flops, get_module_duration,
          reference: bool) -> list[Row]:
    rows = []
    for name, module in modules.items():
        if reference and name == "lm_head":
            continue  # never called: DiffusionLM.logits applies its weight with F.linear
        params = sum(p.numel() for p in module.parameters())
        flops = get_module_flops(module) / steps
        backward = timer.seconds[name]
        rows.append(Row(name, params, flops, analytic.get(name),
                        get_module_duration(module) / steps,
                        None if backward is None else backward / steps))
    if reference:
        root = modules[""]
        head = root.embed if cfg.tie_word_embeddings else root.lm_head
        # The top level's own FLOPs: the logits' F.linear (and nothing else that DeepSpeed counts).
        rows.append(Row("lm_head", head.weight.numel(), root.__flops__ / steps,
                        analytic["lm_head"], None, None))
    return rows
