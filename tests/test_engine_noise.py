"""The engine's training noise (`megatron_ext.objective.noised_samples`): antithetic block
times are stratified over a step's whole global batch, and a sample's noise does not depend
on which rank or micro-batch it lands in."""

from __future__ import annotations

import pytest
import torch

from e2d2.config import DiffusionConfig, ModelConfig
from e2d2.diffusion import DiffusionObjective
from megatron_ext.objective import noised_samples

V, MASK, L, SEED = 32, 31, 16, 7
GLOBAL_BATCH = 6


def objective(variant: str, antithetic: bool = True) -> DiffusionObjective:
    cfg = ModelConfig(variant=variant, vocab_size=V, mask_token_id=MASK, seq_length=L, block_size=4,
                      hidden_size=16, ffn_hidden_size=32, num_attention_heads=2, num_query_groups=1,
                      num_layers=2, num_decoder_layers=1 if variant == "e2d2" else 0)
    return DiffusionObjective(cfg, DiffusionConfig(antithetic=antithetic))


def step_ids(step: int) -> list[int]:
    """A step's samples: GLOBAL_BATCH consecutive stream indices (megatron's sampler)."""
    return list(range(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH))


def block_times(obj: DiffusionObjective, batch: dict) -> torch.Tensor:
    return batch["t"][:, :: obj.model_cfg.diffusion_block_size]  # [batch, blocks]


@pytest.mark.parametrize("variant", ["mdlm", "e2d2", "bd3lm"])
def test_antithetic_times_take_every_stratum_of_the_global_batch_once(variant):
    obj = objective(variant)
    x0 = torch.randint(0, MASK, (GLOBAL_BATCH, L), generator=torch.Generator().manual_seed(0))
    t = block_times(obj, noised_samples(obj, x0, step_ids(3), SEED, step=3, global_batch=GLOBAL_BATCH))
    eps = obj.sampling_eps
    unit = ((t.flatten().double() - eps) / (1 - eps)).sort().values  # back to [0, 1)
    n = t.numel()
    # n equally spaced points, one per stratum: (u + i / n) mod 1 for i = 0..n-1
    assert torch.allclose(unit.diff(), torch.full((n - 1,), 1.0 / n, dtype=torch.float64), atol=1e-6)
    assert 0 <= float(unit[0]) < 1.0 / n


@pytest.mark.parametrize("variant", ["mdlm", "e2d2"])
def test_a_samples_noise_is_the_same_on_any_data_parallel_split(variant):
    obj = objective(variant)
    ids = step_ids(2)
    x0 = torch.randint(0, MASK, (GLOBAL_BATCH, L), generator=torch.Generator().manual_seed(1))
    whole = noised_samples(obj, x0, ids, SEED, step=2, global_batch=GLOBAL_BATCH)
    for split in ([0, 1, 2], [3, 4, 5]), ([0, 1], [2, 3], [4, 5]), ([4, 5, 0, 1], [2, 3]):
        for rows in split:  # DP ranks / micro-batches, in whatever order the sampler hands them
            part = noised_samples(obj, x0[rows], [ids[r] for r in rows], SEED, step=2,
                                  global_batch=GLOBAL_BATCH)
            for key, value in part.items():
                assert torch.equal(value, whole[key][rows]), (split, key)


def test_each_step_draws_its_own_offset():
    obj = objective("mdlm")
    x0 = torch.randint(0, MASK, (GLOBAL_BATCH, L), generator=torch.Generator().manual_seed(2))
    first, second = (block_times(obj, noised_samples(obj, x0, step_ids(s), SEED, step=s,
                                                     global_batch=GLOBAL_BATCH)).sort(0).values
                     for s in (4, 5))
    assert not torch.allclose(first, second)


def test_antithetic_training_noise_needs_the_global_batch():
    obj = objective("e2d2")
    x0 = torch.zeros(2, L, dtype=torch.long)
    with pytest.raises(ValueError, match="pass step and global_batch"):
        noised_samples(obj, x0, [0, 1], SEED, step=0)
    # without antithetic draws (and in evaluation) every sample draws its own times
    noised_samples(objective("e2d2", antithetic=False), x0, [0, 1], SEED, step=0)
    noised_samples(obj, x0, [0, 1], SEED, train=False)
