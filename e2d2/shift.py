"""The "shift" of an adapted autoregressive model (DiffuLLaMA, spec section 7): the noisy
stream's slot ``s`` predicts token ``s + 1``, as the AR model it starts from did.

Targets keep their blocks; only the noisy stream moves. For target block ``b`` (positions
``[bS, bS + S)``) the noisy slots are ``[bS - 1, bS + S - 2]`` (`e2d2.masks.with_shift`):
slot ``bS - 1`` holds the clean token ``x0[bS - 1]`` (the previous block's last token,
committed when block ``b`` is denoised), the others the block's noisy tokens. MDLM, one
block over the whole sequence, reads ``xt`` unchanged (DiffuLLaMA's own setting): its full
mask would let every slot read a clean token placed anywhere.

The model's logits come back aligned with the targets (``aligned[:, p] = out[:, p - 1]``),
so SUBS, the loss and the NELBO are those of an unshifted model. Position 0 has no
predictor: it gets a finite dummy and is never a target (``DiffusionObjective`` keeps it
clean, as ``keep_clean_bos`` does). Both engines call these two functions.
"""

from __future__ import annotations

import torch

from e2d2.variants import VariantPlan


def noisy_input(plan: VariantPlan, x0: torch.Tensor, xt: torch.Tensor, block_size: int) -> torch.Tensor:
    """The noisy stream's tokens ``[batch, L]`` under the shift: ``x0[s]`` at slots with
    ``(s + 1) % block_size == 0``, ``xt[s]`` elsewhere (one block over the whole sequence,
    MDLM: ``xt`` everywhere)."""
    if plan.decoding == "whole_sequence":
        return xt
    slot = torch.arange(x0.shape[1], device=x0.device)
    return torch.where((slot + 1) % block_size == 0, x0, xt)


def align_logits(out: torch.Tensor) -> torch.Tensor:
    """Slot outputs ``[batch, L, vocab]`` -> logits aligned with their targets (position 0:
    slot 0's output again, a dummy that never counts)."""
    return torch.cat((out[:, :1], out[:, :-1]), 1)
