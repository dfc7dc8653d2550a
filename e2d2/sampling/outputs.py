"""What a sampler run returns (`SampleOutput`), and where each row stops (EOS, stop strings)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from e2d2.config import SamplerConfig


@dataclass
class SampleOutput:
    """Result of `sample` (``P = max(prompt_lengths)``, ``N = max_new_tokens``).

    * ``tokens``: ``[batch, P + N]``, row ``r``: its prompt, then its completion. Positions at
      or after ``lengths[r]`` hold EOS when ``eos_token_id`` is set, else the mask token.
    * ``prompt_lengths``: ``[batch]``. ``lengths``: ``[batch]``, valid length of each row
      (prompt + completion through EOS or the stop string).
    * ``finished``: ``bool[batch]``, whether the row stopped (EOS, stop string) within budget.
    * ``nfe_per_block``: batched denoiser calls spent on each generated block (AR: per token).
    * ``row_nfe``: ``[batch, num_blocks]``, the forwards each row took part in, per block.
    """

    tokens: torch.Tensor
    prompt_lengths: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor
    nfe_per_block: list[int]
    row_nfe: torch.Tensor

    @property
    def nfe(self) -> int:
        return sum(self.nfe_per_block)

    @property
    def num_blocks(self) -> int:
        return len(self.nfe_per_block)

    def completion(self, row: int) -> list[int]:
        """Row ``row``'s generated tokens (through EOS or the stop string, if any)."""
        return self.tokens[row, int(self.prompt_lengths[row]):int(self.lengths[row])].tolist()


def stop_lengths(
    seq: torch.Tensor, prompt_lengths: torch.Tensor, checked: torch.Tensor, end: torch.Tensor,
    cfg: SamplerConfig, decode,
) -> torch.Tensor:
    """Per row, the sequence length through its first EOS or completed stop string among the
    generated positions ``[checked, end)`` (earlier ones were checked before), or -1.

    ``seq [b, width]`` is position-indexed; the others are ``[b]``.
    """
    b, width = seq.shape
    out = torch.full((b,), -1, dtype=torch.long, device=seq.device)
    if cfg.eos_token_id is not None:
        pos = torch.arange(width, device=seq.device)
        hit = (seq == cfg.eos_token_id) & (pos >= checked[:, None]) & (pos < end[:, None])
        first = torch.where(hit, pos, width).min(-1).values
        out = torch.where(hit.any(-1), first + 1, out)
    if cfg.stop_strings:
        for r in range(b):
            p, lo = int(prompt_lengths[r]), int(checked[r])
            hi = int(out[r]) if out[r] >= 0 else int(end[r])
            gen = seq[r, p:hi].tolist()
            if not any(s in decode(gen) for s in cfg.stop_strings):
                continue
            for n in range(max(lo - p, 0) + 1, len(gen) + 1):  # the token that completes it
                if any(s in decode(gen[:n]) for s in cfg.stop_strings):
                    out[r] = p + n
                    break
    return out



def make_output(model, seq, plens, lengths, finished, cfg, nfe_per_block, row_nfe) -> SampleOutput:
    width = int(plens.max()) + cfg.max_new_tokens
    tokens = seq[:, :width]
    fill = cfg.eos_token_id if cfg.eos_token_id is not None else model.cfg.mask_token_id
    after = torch.arange(width, device=seq.device)[None, :] >= lengths[:, None]
    return SampleOutput(tokens.masked_fill(after, fill), plens, lengths, finished, nfe_per_block, row_nfe)
