"""The shift (spec 7, DiffuLLaMA): the noisy stream's slot s predicts token s + 1. Its masks
equal a per-element reading of the definition; the noisy input and the logit alignment are
what `e2d2.shift` says; and an AR checkpoint (a tiny Hugging Face Qwen3 through
``e2d2 import-hf``) adapted with the shift, at annealing step 0 and with ``xt = x0``,
reproduces the AR model's logits for MDLM, BD3-LM and E2D2 shared-KV whose decoder holds
every layer (copied or tied), to 1e-5 in fp32."""

from __future__ import annotations

import pytest
import torch

from e2d2 import masks, shift
from e2d2.config import DiffusionConfig, ModelConfig
from e2d2.diffusion import DiffusionObjective
from e2d2.errors import ConfigError
from e2d2.model import DiffusionLM
from e2d2.variants import PLANS

transformers = pytest.importorskip("transformers")


def _brute(kind: str, L: int, S: int) -> torch.Tensor:
    """Noisy slot s belongs to target block b = (s + 1) // S: it attends the noisy slots of
    that block and the clean keys j < bS - 1 (slot bS - 1 carries x0[bS - 1] itself). BD3-LM's
    clean queries keep the unshifted block-causal rule and never see the noisy stream."""
    two = kind == "bd3lm"
    lq = 2 * L if two else L
    out = torch.zeros(lq, 2 * L, dtype=torch.bool)
    for qi in range(lq):
        q_noisy = not two or qi >= L
        q = qi % L
        for ki in range(2 * L):
            k_noisy, k = ki >= L, ki % L
            if not q_noisy:
                ok = not k_noisy and k // S <= q // S
            elif k_noisy:
                ok = (k + 1) // S == (q + 1) // S
            else:
                ok = k < (q + 1) // S * S - 1
            out[qi, ki] = ok
    return out


@pytest.mark.parametrize("kind,spec", [("e2d2_decoder", masks.E2D2_DECODER), ("bd3lm", masks.BD3LM)])
@pytest.mark.parametrize("L,S", [(8, 1), (8, 2), (12, 4), (16, 8), (8, 8)])
def test_shifted_masks_match_the_definition(kind, spec, L, S):
    got = masks.with_shift(spec, True).dense(L, S)
    assert torch.equal(got, _brute(kind, L, S)), (got != _brute(kind, L, S)).nonzero().tolist()[:5]


def test_clean_and_single_stream_masks_are_not_shifted():
    for spec in (masks.E2D2_ENCODER, masks.MDLM, masks.AR):
        assert masks.with_shift(spec, True) is spec


def test_noisy_input_and_alignment():
    x0 = torch.arange(100, 112).view(1, 12)
    xt = torch.full_like(x0, 7)
    got = shift.noisy_input(PLANS["e2d2"], x0, xt, 4)
    expected = [7, 7, 7, 103, 7, 7, 7, 107, 7, 7, 7, 111]  # slot bS - 1 holds x0[bS - 1]
    assert got.tolist() == [expected]
    assert torch.equal(shift.noisy_input(PLANS["mdlm"], x0, xt, 12), xt)
    out = torch.arange(12.0).view(1, 12, 1)
    assert shift.align_logits(out).flatten().tolist() == [0.0] + list(range(11))


def test_position_zero_is_never_a_target():
    cfg = ModelConfig(variant="bd3lm", num_decoder_layers=0, shift=True, seq_length=16)
    objective = DiffusionObjective(cfg, DiffusionConfig())
    x0 = torch.randint(0, 200, (64, 16), generator=torch.Generator().manual_seed(0))
    nb = objective.noise(x0, generator=torch.Generator().manual_seed(1))
    assert not nb.masked[:, 0].any() and not nb.loss_mask[:, 0].any()
    assert nb.masked[:, 1:].any()


def test_shift_with_ar_is_one_clear_error(qwen3, tmp_path):
    from e2d2.errors import UserError
    from launchers.hf.import_hf import import_hf

    with pytest.raises(ConfigError, match="shift"):
        ModelConfig(variant="ar", num_decoder_layers=0, shift=True)
    with pytest.raises(UserError, match="shift"):
        import_hf(qwen3[1], tmp_path / "ar", "ar", shift=True)
    assert not (tmp_path / "ar").exists()


# ------------------------------------------------------------- AR equivalence from Qwen3
VOCAB, LAYERS, L = 96, 3, 16


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A tiny random Qwen3 causal LM saved locally (nothing is downloaded), with random norms
    so that a skipped or swapped norm would show."""
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=LAYERS, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                                   rope_theta=5e5, tie_word_embeddings=True, rms_norm_eps=1e-5)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    directory = tmp_path_factory.mktemp("qwen3") / "hf"
    model.save_pretrained(directory)
    return model, directory


def _adapted(hf_dir, tmp_path, variant: str, block_size: int, **import_kwargs) -> DiffusionLM:
    """``e2d2 import-hf --shift`` as ``variant``, loaded in the reference model."""
    from launchers.config import load_run_config
    from launchers.hf.checkpoints import TensorReader, single_process_group
    from launchers.hf.import_hf import import_hf
    from megatron_ext.checkpoint import MODEL_PREFIX

    out = import_hf(hf_dir, tmp_path / f"{variant}-{block_size}-{len(import_kwargs)}", variant,
                    block_size=block_size, seq_length=L, mask_token_id=VOCAB - 1, shift=True,
                    **import_kwargs)
    cfg = load_run_config(out / "config.yaml").model
    assert cfg.shift
    with single_process_group():
        reader = TensorReader(out, MODEL_PREFIX)
        state = reader.read(sorted(reader.shapes))
    model = DiffusionLM(cfg).eval()
    model.load_state_dict(state)
    return model


CASES = [("mdlm", 4, {}), ("bd3lm", 4, {}), ("bd3lm", 1, {}),
         ("e2d2_shared_kv", 4, {"decoder_layers": LAYERS}),
         ("e2d2_shared_kv", 8, {"decoder_layers": LAYERS, "tie_decoder": True})]


@pytest.mark.parametrize("variant,block_size,kwargs", CASES,
                         ids=[f"{v}-S{s}{'-tied' if k.get('tie_decoder') else ''}" for v, s, k in CASES])
def test_adapted_model_at_step_0_gives_the_ar_logits(qwen3, tmp_path, variant, block_size, kwargs):
    hf, hf_dir = qwen3
    x0 = torch.randint(0, VOCAB - 1, (2, L), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ar = hf(input_ids=x0).logits  # ar[:, p] predicts x0[p + 1]
        model = _adapted(hf_dir, tmp_path, variant, block_size, **kwargs)
        objective = DiffusionObjective(model.cfg, DiffusionConfig(anneal_steps=10))
        got = model(x0, x0, anneal=objective.anneal_ratio(0))
        torch.testing.assert_close(got[:, 1:], ar[:, :-1], rtol=0, atol=1e-5)
        # the check can fail: once annealing has begun the logits leave the AR model's (except
        # for block size 1, where the shifted BD3-LM mask is the causal one: an AR model)
        if block_size > 1:
            assert (model(x0, x0, anneal=objective.anneal_ratio(5))[:, 1:]
                    - ar[:, :-1]).abs().max() > 1e-3


def test_last_hidden_e2d2_is_not_ar_equivalent(qwen3, tmp_path):
    """Documented in docs/hf.md: its decoder reads the encoder's last hidden state."""
    hf, hf_dir = qwen3
    x0 = torch.randint(0, VOCAB - 1, (2, L), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model = _adapted(hf_dir, tmp_path, "e2d2", 4, decoder_layers=LAYERS)
        diff = (model(x0, x0, anneal=0.0)[:, 1:] - hf(input_ids=x0).logits[:, :-1]).abs().max()
    assert diff > 1e-3
