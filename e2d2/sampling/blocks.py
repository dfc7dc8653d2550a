"""The block loops: E2D2 and BD3-LM block by block, MDLM as one block over prompt and completion."""

from __future__ import annotations

import torch

from e2d2.sampling.denoise import denoise_block
from e2d2.sampling.denoisers import BlockRun, CachedDenoiser, FullDenoiser, ShiftedCachedDenoiser
from e2d2.sampling.distributions import RowStreams
from e2d2.sampling.outputs import SampleOutput, make_output, stop_lengths
from e2d2.sampling.strategies import step_times


def sample_blocks(model, prompt, plens, cfg, streams, decode) -> SampleOutput:
    S = cfg.block_size or model.cfg.block_size
    run = BlockRun(model, prompt, plens, cfg, S)
    cached = ShiftedCachedDenoiser if model.cfg.shift else CachedDenoiser
    denoiser = (cached if cfg.use_cache else FullDenoiser)(run)
    times = step_times(cfg.schedule, cfg.steps, cfg.min_t)
    batch, device = len(plens), plens.device
    act, rows = torch.arange(batch, device=device), list(range(batch))  # working rows (tensor, host)
    first = run.n_ctx[:, None] + torch.arange(S, device=device)  # [b, S]: block 0's positions, + j S for block j
    nfe_per_block, row_nfe = [], [[0] * max(run.blocks_of) for _ in range(batch)]
    for j in range(max(run.blocks_of)):
        denoiser.start_block(j)
        pos = first + j * S
        block = run.seq.gather(1, pos) if len(rows) == batch else run.seq[act[:, None], pos]
        block, calls, counts = denoise_block(denoiser, block, cfg, times, model.cfg.mask_token_id, streams)
        run.seq[act[:, None], pos] = block
        for r, n in zip(rows, counts, strict=True):
            row_nfe[r][j] = n
        nfe_per_block.append(calls)
        go_on = run.finish_block(act, rows, j, decode)
        keep = [i for i, go in enumerate(go_on) if go]
        if not keep:
            break
        if len(keep) < len(rows):
            idx = torch.tensor(keep, device=device)
            act, block, first, streams = act[idx], block[idx], first[idx], streams.select(keep)
            rows = [rows[i] for i in keep]
            denoiser.select(idx)
        denoiser.commit(block, j)
    row_nfe = torch.tensor(row_nfe, dtype=torch.long, device=device)
    return make_output(model, run.seq, plens, run.lengths, run.finished, cfg, nfe_per_block,
                   row_nfe[:, :len(nfe_per_block)])



def sample_mdlm(model, prompt, plens, cfg, streams, decode) -> SampleOutput:
    """One block over prompt + completion, right-padded, a full forward per step."""
    mask_id, device = model.cfg.mask_token_id, plens.device
    batch, width = len(plens), int(plens.max()) + cfg.max_new_tokens
    col = torch.arange(width, device=device)[None, :]
    end = plens[:, None] + cfg.max_new_tokens
    x = torch.zeros(batch, width, dtype=torch.long, device=device)
    x[:, :prompt.shape[1]] = prompt
    x = torch.where(col < plens[:, None], x, torch.where(col < end, mask_id, 0))
    real = col < end
    ragged = not bool(real.all())

    def forward(xs, rows):
        pad = (real if rows is None else real[rows]) if ragged else None
        return model(xs, xs, attention_mask=pad)

    times = step_times(cfg.schedule, cfg.steps, cfg.min_t)
    streams = RowStreams(streams.generators, streams.device, end[:, 0].tolist())
    x, calls, counts = denoise_block(forward, x, cfg, times, mask_id, streams)
    stop = stop_lengths(x, plens, plens, end[:, 0], cfg, decode)
    lengths = torch.where(stop >= 0, stop, end[:, 0])
    return make_output(model, x, plens, lengths, stop >= 0, cfg, [calls],
                   torch.tensor(counts, dtype=torch.long, device=device)[:, None])
