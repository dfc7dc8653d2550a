"""The GPU check: one script, one report, under 8 minutes on one H100/H200.

    .venv/bin/python -m benchmarks.gpu_check            # on a GPU machine
    .venv/bin/python -m benchmarks.gpu_check --tiny     # tiny shapes on CPU (CI: tests/test_gpu_check.py)

Sections of the report:

1. **Accuracy**: E2D2 forward + backward in bf16 with FlexAttention against the fp32
   reference (dense-mask SDPA, ``e2d2.attention.sdpa_only``), same weights and batch: the
   max logit error and the worst per-tensor gradient error, both relative to the
   reference's largest magnitude.
2. **Training**: tokens/s and MFU (mask-density FLOPs, ``e2d2.flops.training_flops_per_token``
   ``.masked``, against the device's bf16 dense peak) of a full step (diffusion loss,
   backward, AdamW) for a ~125M E2D2 (L = 1024, S = 4) and for the 1B config
   (``configs/h100-1b-e2d2.yaml``) with fewer layers, so that it fits one GPU.
3. **Sampling**: tokens/s at batch 1 and 8 for a Qwen3-1.7B-shaped E2D2 (28 encoder + 14
   decoder layers, random weights, 256 new tokens, KV cache, one token revealed per step:
   the worst case, 4 denoiser calls per block). The paper reports 99 tok/s at batch 1 on
   an H100.
4. **FP8**: only reported as skipped or present; see "What it does not do".
5. **The engine**: ``e2d2 pretrain`` itself, in a child process (a world of one), on the
   ~125M config in bf16 (``train.precision: bf16``: megatron's ``Float16Module``, fp32 main
   weights in megatron's optimizer), 30 steps on the embedded KJV corpus bytes-tokenized:
   median tokens/s after 5 steps and its MFU. This is what a user's run gets.

Each section is printed when it is measured; a section that raises prints its traceback's
end and the next one runs. ``--sections 5`` (or ``1,3``) runs only those.

Precision: sections 1-2 run the reference model (`e2d2.model.DiffusionLM`, fp32 weights)
under ``torch.autocast(bfloat16)``, section 3 the reference model cast to bf16 (weights and
KV cache), section 5 the megatron engine.

With ``--tiny`` every shape is tiny, the device is the CPU, attention is SDPA with dense
masks (FlexAttention is used on CUDA only) and MFU is not computed (no known peak): it
proves that the script runs and prints its report, not any number.

What it does not do: FP8 through Transformer Engine needs TE's linears, which only the
megatron engine has (``train.precision: fp8``); running it needs a process group and is left to
``e2d2 pretrain`` on a GPU. The report says whether TE is importable.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import kjv_bytes_dataset, pretrain_tokens_per_s
from e2d2 import flops
from e2d2.attention import sdpa_only, use_flex
from e2d2.config import DiffusionConfig, ModelConfig
from e2d2.diffusion import DiffusionObjective
from e2d2.model import DiffusionLM
from e2d2.sampling import SamplerConfig, sample
from megatron_ext.layout import transformer_engine_available

# bf16 dense tensor-core peaks (no sparsity), by a substring of torch.cuda.get_device_name.
BF16_DENSE_PEAK_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": flops.H100_BF16_DENSE_PEAK_FLOPS,
    "A100": 312e12,
}
PAPER_SAMPLING_TOKENS_PER_S = 99.0  # E2D2 paper, batch 1, H100

QWEN3_1_7B_E2D2 = ModelConfig(
    variant="e2d2", vocab_size=151936, mask_token_id=151669, hidden_size=2048,
    ffn_hidden_size=6144, num_attention_heads=16, num_query_groups=8, head_dim=128,
    num_layers=28, num_decoder_layers=14, seq_length=2048, block_size=4, qk_layernorm=True,
    tie_word_embeddings=True, rope_theta=1e6)
E2D2_125M = ModelConfig(
    variant="e2d2", vocab_size=50258, mask_token_id=50257, hidden_size=768,
    ffn_hidden_size=2304, num_attention_heads=12, num_query_groups=12, num_layers=10,
    num_decoder_layers=2, seq_length=1024, block_size=4, tie_word_embeddings=True)
ONE_B_LAYERS = (8, 2)  # of 24 + 4: fits one GPU with fp32 weights + AdamW
BYTES_MASK_ID = 259  # the bytes tokenizer's [MASK]: the engine section trains on bytes-tokenized KJV
ENGINE_STEPS, ENGINE_WARMUP = 30, 5  # steps of the engine run; those not timed (compilation)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (proves it runs)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per config")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--sections", type=_section_numbers, default=SECTIONS,
                   help="which sections to run, e.g. 5 or 1,3 (default: all): a rerun of the "
                        "ones that failed costs the lent machine only their minutes")
    return p.parse_args(argv)


SECTIONS = (1, 2, 3, 4, 5)


def _section_numbers(text: str) -> tuple[int, ...]:
    try:
        numbers = tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        numbers = ()
    if not numbers or not set(numbers) <= set(SECTIONS):
        raise argparse.ArgumentTypeError(f"{text!r}: give section numbers from {SECTIONS}, "
                                         "comma-separated (e.g. 1,3)")
    return numbers


@dataclasses.dataclass(frozen=True)
class Plan:
    """Shapes of one run of the check."""

    accuracy: ModelConfig
    accuracy_batch: int
    training: dict[str, tuple[ModelConfig, int]]  # label -> (config, batch)
    sampling: ModelConfig
    sampling_batches: tuple[int, ...]
    prompt_length: int
    engine: tuple[ModelConfig, int, int]  # `e2d2 pretrain`: (config, batch, steps)


def full_plan() -> Plan:
    from launchers.config import load_run_config

    one_b = load_run_config("configs/h100-1b-e2d2.yaml").model
    one_b = one_b.replace(num_layers=ONE_B_LAYERS[0], num_decoder_layers=ONE_B_LAYERS[1])
    return Plan(
        accuracy=E2D2_125M, accuracy_batch=4,
        training={"~125M E2D2 10+2, L=1024, S=4": (E2D2_125M, 16),
                  f"1B width, {ONE_B_LAYERS[0]}+{ONE_B_LAYERS[1]} layers, L=2048, S=4": (one_b, 4)},
        sampling=QWEN3_1_7B_E2D2, sampling_batches=(1, 8), prompt_length=64,
        engine=(E2D2_125M.replace(mask_token_id=BYTES_MASK_ID), 16, ENGINE_STEPS))


def tiny_plan() -> Plan:
    tiny = ModelConfig(variant="e2d2", vocab_size=128, mask_token_id=127, hidden_size=32,
                       ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                       num_layers=2, num_decoder_layers=1, seq_length=32, block_size=4)
    return Plan(accuracy=tiny, accuracy_batch=2, training={"tiny E2D2 2+1, L=32": (tiny, 2)},
                sampling=tiny.replace(num_layers=2, num_decoder_layers=1),
                sampling_batches=(1, 8), prompt_length=8,
                engine=(tiny.replace(vocab_size=260, mask_token_id=BYTES_MASK_ID), 2, 4))


def bf16_dense_peak(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_DENSE_PEAK_FLOPS.items():
        if key in name:
            return name, peak
    return name, None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def model_at_seed(cfg: ModelConfig, device: torch.device, seed: int = 0) -> DiffusionLM:
    torch.manual_seed(seed)
    return DiffusionLM(cfg).to(device)


# ------------------------------------------------------------------ 1. accuracy
def _logits_and_grads(model, x0, xt, precision: Callable) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    with precision():
        logits = model(x0, xt)
    masked = xt == model.cfg.mask_token_id
    loss = F.cross_entropy(logits.float()[masked], x0[masked])
    loss.backward()
    return logits.detach().float(), {n: p.grad.detach().float() for n, p in model.named_parameters()
                                     if p.grad is not None}


def accuracy(plan: Plan, device: torch.device) -> list[str]:
    cfg, batch = plan.accuracy, plan.accuracy_batch
    model = model_at_seed(cfg, device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randint(0, cfg.mask_token_id, (batch, cfg.seq_length), generator=gen)
    xt = torch.where(torch.rand(x0.shape, generator=gen) < 0.5, cfg.mask_token_id, x0)
    x0, xt = x0.to(device), xt.to(device)
    with sdpa_only():
        ref_logits, ref_grads = _logits_and_grads(model, x0, xt, nullcontext)
    logits, grads = _logits_and_grads(model, x0, xt, lambda: autocast(device))
    logit_err = (logits - ref_logits).abs().max().item() / ref_logits.abs().max().item()
    worst_name, worst = max(
        ((n, (grads[n] - g).abs().max().item() / max(g.abs().max().item(), 1e-30))
         for n, g in ref_grads.items()), key=lambda item: item[1])
    kernel = "FlexAttention" if use_flex(device) else "SDPA (dense mask)"
    return [
        f"## 1. Accuracy: bf16 autocast + {kernel} vs fp32 + SDPA reference",
        f"model: E2D2 {cfg.num_layers}+{cfg.num_decoder_layers}, hidden {cfg.hidden_size}, "
        f"L={cfg.seq_length}, S={cfg.block_size}, batch {batch}",
        f"max |logit error| / max |logit|: {logit_err:.2e}",
        f"worst gradient: max |error| / max |grad| = {worst:.2e} ({worst_name})",
        f"gradients compared: {len(ref_grads)} tensors",
    ]


# ------------------------------------------------------------------ 2. training
def _train_step(cfg: ModelConfig, batch: int, device: torch.device) -> Callable[[], None]:
    model = model_at_seed(cfg, device)
    objective = DiffusionObjective(cfg, DiffusionConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x0 = torch.randint(0, cfg.mask_token_id, (batch, cfg.seq_length), device=device)
    gen = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(device):
            loss = objective.loss(model, x0, generator=gen)
        loss.backward()
        opt.step()

    return step


def _time(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    """Seconds per call after ``warmup`` calls (FlexAttention compiles on the first)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def training(plan: Plan, device: torch.device, steps: int, peak: float | None) -> list[str]:
    lines = ["## 2. Training (bf16 autocast, AdamW, diffusion loss)",
             "| config | params | batch x L | step (ms) | tokens/s | TFLOP/s (masked) | MFU |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, (cfg, batch) in plan.training.items():
        step = _train_step(cfg, batch, device)
        seconds = _time(step, device, warmup=3, repeats=steps)
        tokens_per_s = batch * cfg.seq_length / seconds
        per_token = flops.training_flops_per_token(cfg).masked
        achieved = tokens_per_s * per_token
        mfu = "n/a" if peak is None else f"{100 * achieved / peak:.1f}%"
        lines.append(f"| {label} | {_params(cfg) / 1e6:.2f}M | {batch} x {cfg.seq_length} | "
                     f"{1e3 * seconds:.1f} | {tokens_per_s:,.0f} | {achieved / 1e12:.1f} | {mfu} |")
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return lines


def _params(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in DiffusionLM(cfg).parameters())


# ------------------------------------------------------------------ 3. sampling
def sampling(plan: Plan, device: torch.device, new_tokens: int) -> list[str]:
    cfg = plan.sampling
    # bf16 weights, as one serves a model: under autocast every step would re-cast the fp32
    # weights (the sampler's fused inference weights are no autocast-cached leaves) and the
    # fp32 KV cache, several times the weight bytes a step reads.
    model = model_at_seed(cfg, device).to(torch.bfloat16).eval()
    S = cfg.block_size
    sampler = SamplerConfig(strategy="topk", steps=S, temperature=0.0, max_new_tokens=new_tokens)
    warm = dataclasses.replace(sampler, max_new_tokens=min(new_tokens, 4 * S))
    lines = ["## 3. Sampling (bf16 weights and KV cache, greedy top-k, 1 token per step)",
             f"model: E2D2 {cfg.num_layers}+{cfg.num_decoder_layers}, hidden {cfg.hidden_size}, "
             f"vocab {cfg.vocab_size}, S={S}; prompt {plan.prompt_length}, {new_tokens} new tokens",
             "| batch | seconds | NFE | tokens/s | x paper's 99 tok/s (batch 1, H100) |",
             "| --- | --- | --- | --- | --- |"]
    for batch in plan.sampling_batches:
        prompt = torch.randint(0, cfg.mask_token_id, (batch, plan.prompt_length), device=device)
        sample(model, prompt, warm)
        synchronize(device)
        start = time.perf_counter()
        out = sample(model, prompt, sampler)
        synchronize(device)
        seconds = time.perf_counter() - start
        tokens_per_s = batch * new_tokens / seconds
        lines.append(f"| {batch} | {seconds:.2f} | {out.nfe} | {tokens_per_s:,.1f} | "
                     f"{tokens_per_s / PAPER_SAMPLING_TOKENS_PER_S:.2f} |")
    return lines


# ------------------------------------------------------------------ 5. the engine
def engine(plan: Plan, device: torch.device, peak: float | None) -> list[str]:
    """``e2d2 pretrain`` itself: the megatron engine in bf16 (``Float16Module``, fp32 main
    weights, megatron's optimizer) at TP1 / PP1 on one device, on the embedded KJV corpus
    (bytes-tokenized: the vocabulary stays the config's, ids above 259 unused)."""
    cfg, batch, steps = plan.engine
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        speeds = pretrain_tokens_per_s(cfg, kjv_bytes_dataset(root), root / "run", steps, batch,
                                       train={"precision": "bf16"}, cpu=device.type == "cpu")
    timed = speeds[min(ENGINE_WARMUP, len(speeds) - 1):]
    tokens_per_s = statistics.median(timed)
    achieved = tokens_per_s * flops.training_flops_per_token(cfg).masked
    mfu = "n/a" if peak is None else f"{100 * achieved / peak:.1f}%"
    return ["## 5. Training through the megatron engine (`e2d2 pretrain`, bf16, TP1 / PP1)",
            f"model: E2D2 {cfg.num_layers}+{cfg.num_decoder_layers}, hidden {cfg.hidden_size}, "
            f"vocab {cfg.vocab_size}, L={cfg.seq_length}, S={cfg.block_size}; batch {batch}; "
            f"median of steps {len(speeds) - len(timed) + 1}-{len(speeds)}",
            "| tokens/s | TFLOP/s (masked) | MFU |", "| --- | --- | --- |",
            f"| {tokens_per_s:,.0f} | {achieved / 1e12:.1f} | {mfu} |"]


# ------------------------------------------------------------------ 4. FP8
def fp8() -> list[str]:
    state = "importable" if transformer_engine_available() else "not importable"
    return ["## 4. FP8 (Transformer Engine)",
            f"Transformer Engine: {state}; FP8 is not measured by this script (it needs the "
            "megatron engine's TE linears: run `e2d2 pretrain` with train.precision=fp8)."]


def _guarded(title: str, section: Callable[[], list[str]]) -> list[str]:
    """A section's lines, or its title and the end of its traceback: one failing section
    (a kernel that does not compile, memory) must not cost the others of a one-shot GPU run."""
    try:
        return section()
    except Exception:  # noqa: BLE001 - reported, and the next section runs
        return [title, "FAILED:", *traceback.format_exc().strip().splitlines()[-12:]]


def report(args: argparse.Namespace) -> Iterator[str]:
    """The report's sections, each as soon as it is measured (a run cut short keeps them)."""
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    plan = tiny_plan() if args.tiny else full_plan()
    name, peak = bf16_dense_peak(device)
    # TF32 stays off: the fp32 reference of section 1 must be true fp32 (bf16 runs autocast).
    new_tokens = min(args.new_tokens, 16) if args.tiny else args.new_tokens
    steps = min(args.steps, 2) if args.tiny else args.steps
    peak_text = "unknown (MFU not computed)" if peak is None else f"{peak / 1e12:.0f} TFLOP/s"
    started = time.perf_counter()
    yield "\n".join([
        "# E2D2 GPU check" + (" (--tiny: shapes too small for any number to mean anything)"
                             if args.tiny else ""),
        f"device: {name}; torch {torch.__version__}; bf16 dense peak: {peak_text}",
        "precision: sections 1-2 run the reference model (fp32 weights) under "
        "torch.autocast(bfloat16), section 3 the reference model in bf16, section 5 the "
        "megatron engine's bf16 (e2d2 pretrain)",
        f"attention: {'FlexAttention (block masks)' if use_flex(device) else 'SDPA, dense masks'}",
    ])
    sections = {1: ("## 1. Accuracy", lambda: accuracy(plan, device)),
                2: ("## 2. Training", lambda: training(plan, device, steps, peak)),
                3: ("## 3. Sampling", lambda: sampling(plan, device, new_tokens)),
                4: ("## 4. FP8", fp8),
                5: ("## 5. Training through the megatron engine", lambda: engine(plan, device, peak))}
    for title, section in (sections[n] for n in args.sections):
        yield "\n".join(_guarded(title, section))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    yield f"total time: {time.perf_counter() - started:.0f} s"


def main(argv: list[str] | None = None) -> None:
    for text in report(parse_args(argv)):
        print(text + "\n", flush=True)


if __name__ == "__main__":
    main()
