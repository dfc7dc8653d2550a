"""Block-by-block diffusion sampling with KV cache (spec section 5), and AR sampling.

Generation runs one block of ``S`` tokens at a time. A block starts all ``[MASK]`` and is
denoised in steps; each step calls the denoiser on the block (E2D2: the decoder only,
attending the cached clean keys), turns the logits into a distribution and reveals some
masked tokens with one *strategy* (`denoise_step`). When no mask is left, the block is
appended to the clean cache (E2D2: one encoder pass) and the next block starts.

Conventions and choices:

* **Prompts are encoded exactly as training reads a context mask** (`e2d2.masks`): the
  prompt's whole blocks are encoded once, with the prompt read bidirectionally where the
  model does so (``ModelConfig.prompt_is_bidirectional``: E2D2 by default), block-causally
  otherwise (BD3-LM, like the authors' code). A prompt tail (``P % S`` tokens) opens the
  first generated block as already-revealed tokens, never re-masked; when that block is
  committed, the tail reads the prompt only, as a context query does in training.
* **Batches of mixed prompt lengths** run as one batch. The block cache is *left-padded*:
  row ``r``'s cached columns are shifted by ``offset[r]`` so that every row's current block
  sits in the same columns, while RoPE positions stay each row's own. Pad columns are
  masked out. Each row's tokens equal those of its prompt sampled alone (same seed).
* **Randomness** is per row: row ``r`` draws only from its own generator, seeded by
  ``seeds[r]`` (or by a seed drawn from ``generator``), in a fixed order (per step: one
  uniform per block position for the token values unless greedy, then one per position for
  the strategy's choice, ancestral and first-hitting only), and only on steps where its block
  still has a mask. A row's sample therefore does not depend on the other rows of its batch,
  and cached and uncached runs consume identical streams and give identical tokens.
* **Confidence ties go to the left** (`strategies.tie_broken`): exact ties (an empty
  prompt's all-mask first block) reach the sampler as float noise that differs between a
  padded batch row and the row alone; ordering them by position keeps the row's choice its own.
* **Output reuse is per row**: a row whose block did not change since its last forward
  reuses its distribution; a step runs the denoiser only on the rows whose block changed.
  ``row_nfe`` counts each row's forwards, ``nfe_per_block`` the batched denoiser calls.
* **Stopping**: a row stops after the block (AR: the token) in which it generates EOS or
  completes a stop string (EOS or a stop string inside the prompt do not count). Stopped
  rows leave the working batch and the cache, so they cost nothing.
* **MDLM** has no block cache: it is sampled as one block covering prompt and completion,
  with a full forward per step (pads masked out); ``use_cache`` does not apply to it.
* **AR** samples one token per forward, with the same left-padded KV cache.
* **Shift** (``ModelConfig.shift``, `e2d2.shift`): block ``b`` is denoised through the
  window ``[x0[bS - 1], block tokens bS .. bS + S - 2]``, which reads the cache before
  ``bS - 1`` and whose outputs predict ``bS .. bS + S - 1``. Every row needs a prompt of at
  least one token (position 0 has no predictor).
* **Past ``seq_length``**: with ``sliding_window``, the oldest cached blocks are dropped so
  that the next block's positions stay inside the trained range (`KVCache.drop_oldest`):
  semi-autoregressive generation of any length. Without it, a warning.
"""

from e2d2.config import STRATEGIES, SamplerConfig
from e2d2.sampling.api import sample, sample_prompts
from e2d2.sampling.distributions import Distribution, RowStreams, draw_dtype
from e2d2.sampling.outputs import SampleOutput
from e2d2.sampling.strategies import StepTimes, denoise_step, reveal_counts, step_times

__all__ = [
    "STRATEGIES", "Distribution", "RowStreams", "SampleOutput", "SamplerConfig", "StepTimes",
    "denoise_step", "draw_dtype", "reveal_counts", "sample", "sample_prompts", "step_times",
]
