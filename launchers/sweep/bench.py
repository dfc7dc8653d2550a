"""The fixed, short sampling benchmark every sweep point runs after training.

Same settings for every point, so that throughputs compare: a batch of ``BATCH`` prompts of
two blocks, then up to ``NEW_BLOCKS`` blocks (within ``seq_length``), the block sampler with
KV cache, ``topk`` with one token revealed per step (``steps = block_size``), no EOS. With
these settings every block costs the same denoiser calls whatever the weights, so the
model is built from the point's config at a fixed seed (the trained checkpoint would give
the same timing). On CPU one thread is used: comparable on a shared machine.
``tokens_per_s`` is generated tokens (batch x new tokens) per second, the median of
``REPEATS`` timed runs after one warm-up run; ``tokens_per_s_repeats`` keeps each timed run,
so that the spread of a measurement on a shared machine is reported with it.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from e2d2.config import ModelConfig

BATCH, PROMPT_BLOCKS, NEW_BLOCKS, REPEATS = 4, 2, 8, 5
RESULT_FILE = "sampling.json"


def sampling_benchmark(cfg: ModelConfig, device: str | None = None) -> dict:
    import torch  # not at the top: `e2d2 sweep status` reads RESULT_FILE without torch

    from e2d2.model import DiffusionLM
    from e2d2.sampling import SamplerConfig, sample

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(1)
    torch.manual_seed(0)
    model = DiffusionLM(cfg).to(device).eval()
    prompt_len = PROMPT_BLOCKS * cfg.block_size
    new = min(NEW_BLOCKS * cfg.block_size, cfg.seq_length - prompt_len)
    if new < cfg.block_size:
        raise ValueError(f"seq_length={cfg.seq_length} leaves no room for a sampled block "
                         f"after a {prompt_len}-token prompt")
    sampler = SamplerConfig(strategy="topk", steps=cfg.block_size, temperature=1.0,
                            max_new_tokens=new)
    generator = torch.Generator(device).manual_seed(0)
    prompt = torch.randint(0, cfg.mask_token_id, (BATCH, prompt_len), generator=generator,
                           device=device)
    seconds, nfe = [], 0
    for run in range(REPEATS + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = sample(model, prompt, sampler, generator=generator)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if run > 0:  # run 0 warms up
            seconds.append(time.perf_counter() - start)
        nfe = out.nfe
    median = statistics.median(seconds)
    return {"tokens_per_s": BATCH * new / median, "seconds": median,
            "tokens_per_s_repeats": [BATCH * new / s for s in seconds], "batch_size": BATCH,
            "prompt_tokens": prompt_len, "new_tokens": new, "nfe": nfe, "device": device,
            "threads": torch.get_num_threads()}


def run_benchmark(run_dir: Path) -> dict:
    """Benchmark the model of ``run_dir/config.yaml``; write ``run_dir/sampling.json``."""
    from launchers.config import load_run_config
    from launchers.submit import write_text_atomic

    cfg = load_run_config(run_dir / "config.yaml").model
    result = sampling_benchmark(cfg)
    write_text_atomic(run_dir / RESULT_FILE, json.dumps(result, indent=2) + "\n")
    return result
