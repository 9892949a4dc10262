"""Tests of hart/tokenizer/quantizer.py: Phi selection, residual identity, teacher forcing, and agreement
with an independent, deliberately plain re-derivation of VAR's multi-scale loop
(docs/design/tokenizer.md, "Multi-scale residual quantization").

Run: .venv/bin/pytest tests/hart/tokenizer/test_quantizer.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configuration.loader import replace
from hart.config import PATCH_NUMS_256, PATCH_NUMS_1024, TOKENIZER_PRESETS, TokenizerConfig
from hart.tokenizer.quantizer import MultiScaleQuantizer

TINY = TOKENIZER_PRESETS["tiny"]


def make_quantizer(config: TokenizerConfig = TINY, seed: int = 0) -> MultiScaleQuantizer:
    torch.manual_seed(seed)
    quantizer = MultiScaleQuantizer(config)
    # Spread the codebook like a trained one so many codes are used.
    torch.nn.init.normal_(quantizer.embedding.weight, std=1.0)
    return quantizer.double().eval()


def random_latent(config: TokenizerConfig, batch: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    H = config.patch_nums[-1]
    return torch.randn(batch, config.z_channels, H, H, generator=g, dtype=torch.float64)


@pytest.mark.parametrize(
    "patch_nums, expected",
    [
        (PATCH_NUMS_256, [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]),
        (PATCH_NUMS_1024, [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]),
    ],
)
def test_phi_indices_match_var(patch_nums, expected):
    config = TokenizerConfig(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 1), patch_nums=patch_nums)
    assert MultiScaleQuantizer(config).phi_indices() == expected


def test_residual_identity_and_shapes():
    quantizer = make_quantizer()
    f = random_latent(TINY)
    tokens, residual = quantizer.latent_to_tokens(f)
    assert [t.shape for t in tokens] == [(3, pn * pn) for pn in TINY.patch_nums]
    assert all(t.dtype == torch.int64 for t in tokens)
    assert residual.shape == f.shape
    torch.testing.assert_close(quantizer.tokens_to_latent(tokens, hart_last=True) + residual, f, rtol=0, atol=1e-10)
    # The residual is a real remainder, not zero: the discrete part alone misses something.
    assert residual.abs().mean() > 1e-3


def reference_var_loop(quantizer: MultiScaleQuantizer, f: torch.Tensor, hart_last: bool):
    """VAR's loop written from the spec formulas, sharing only the learned tensors."""
    patch_nums = quantizer.patch_nums
    num_scales = len(patch_nums)
    codebook = quantizer.embedding.weight.detach()  # (V, C)
    convs = quantizer.quant_resi.qresi_ls
    q = 0.5
    ticks = np.linspace(1 / 12, 11 / 12, 4)  # K == 4 special case
    B, C, H, _ = f.shape
    rest = f.clone()
    all_tokens = []
    for si, pn in enumerate(patch_nums):
        small = F.adaptive_avg_pool2d(rest, pn) if pn < H else rest  # area resize == avg pool here
        vectors = small.permute(0, 2, 3, 1).reshape(-1, C)
        distances = ((vectors[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)
        idx = distances.argmin(dim=1)
        all_tokens.append(idx.view(B, pn * pn))
        code = codebook[idx].view(B, pn, pn, C).permute(0, 3, 1, 2)
        up = F.interpolate(code, size=(H, H), mode="bicubic") if pn < H else code
        if not (hart_last and si == num_scales - 1):
            conv = convs[int(np.argmin(np.abs(ticks - si / (num_scales - 1))))]
            up = (1 - q) * up + q * F.conv2d(up, conv.weight, conv.bias, padding=1)
        rest = rest - up
    return all_tokens, rest


def test_agrees_with_plain_rederivation():
    config = replace(TINY, patch_nums=(1, 2, 3, 5, 8))  # exercises non-divisible area resizes
    quantizer = make_quantizer(config)
    f = random_latent(config)
    tokens, residual = quantizer.latent_to_tokens(f)
    ref_tokens, ref_residual = reference_var_loop(quantizer, f, hart_last=True)
    for si, (ours, ref) in enumerate(zip(tokens, ref_tokens)):
        assert torch.equal(ours, ref), f"scale {si} tokens differ"
    torch.testing.assert_close(residual, ref_residual, rtol=0, atol=1e-9)
    # VAR rule (Phi also at the last scale) for the discrete decode path.
    _, ref_rest_var = reference_var_loop(quantizer, f, hart_last=False)
    torch.testing.assert_close(quantizer.tokens_to_latent(tokens, hart_last=False), f - ref_rest_var, rtol=0, atol=1e-9)


def test_teacher_forcing_matches_autoregressive_inputs():
    quantizer = make_quantizer()
    f = random_latent(TINY)
    tokens, _ = quantizer.latent_to_tokens(f)
    tf_input = quantizer.tokens_to_teacher_forcing_input(tokens)
    L = TINY.num_tokens()
    assert tf_input.shape == (3, L - 1, TINY.z_channels)
    # Replay the sampling path scale by scale; its next-scale inputs must equal teacher forcing.
    f_hat, pieces = None, []
    for si, pn in enumerate(TINY.patch_nums):
        f_hat, nxt = quantizer.next_autoregressive_input(si, f_hat, quantizer.embed_tokens(tokens[si], pn))
        if si < len(TINY.patch_nums) - 1:
            pieces.append(nxt.flatten(2).transpose(1, 2))
    torch.testing.assert_close(torch.cat(pieces, 1), tf_input, rtol=0, atol=1e-10)
    # And the sampling path's final f_hat is the HART-rule latent.
    torch.testing.assert_close(f_hat, quantizer.tokens_to_latent(tokens, hart_last=True), rtol=0, atol=1e-10)


def test_training_forward_values():
    quantizer = make_quantizer()
    f = random_latent(TINY).requires_grad_(True)
    tokens, _ = quantizer.latent_to_tokens(f.detach())
    out, vq_loss, _ = quantizer(f, continuous=False)
    torch.testing.assert_close(out, quantizer.tokens_to_latent(tokens, hart_last=False), rtol=0, atol=1e-9)
    assert torch.isfinite(vq_loss) and vq_loss > 0
    out_continuous, _, _ = quantizer(f, continuous=True)
    torch.testing.assert_close(out_continuous, f.detach(), rtol=0, atol=1e-9)
    # Straight-through: the gradient of the output w.r.t. f is the identity.
    (grad,) = torch.autograd.grad(out.sum(), f)
    assert torch.equal(grad, torch.ones_like(grad))


def test_int16_tokens_decode_like_int64():
    quantizer = make_quantizer()
    tokens, _ = quantizer.latent_to_tokens(random_latent(TINY))
    small = [t.to(torch.int16) for t in tokens]
    assert torch.equal(quantizer.tokens_to_latent(small), quantizer.tokens_to_latent(tokens))


def test_bad_inputs_raise():
    quantizer = make_quantizer()
    with pytest.raises(ValueError, match="last scale"):
        quantizer.latent_to_tokens(torch.zeros(1, TINY.z_channels, 6, 6, dtype=torch.float64))
    tokens, _ = quantizer.latent_to_tokens(random_latent(TINY))
    with pytest.raises(ValueError, match="expected 6 token scales"):
        quantizer.tokens_to_latent(tokens[:-1])
    tokens[2] = tokens[2].clone()
    tokens[2][0, 0] = TINY.vocab_size
    with pytest.raises(ValueError, match="outside"):
        quantizer.tokens_to_latent(tokens)


def test_restart_codes_initialises_a_collapsed_codebook_from_the_latents():
    """VAR-style tiny codebook far from the encoder's outputs: few codes win; re-seeding fixes it."""
    torch.manual_seed(0)
    quantizer = MultiScaleQuantizer(TINY).double()
    torch.nn.init.uniform_(quantizer.embedding.weight, -1 / TINY.vocab_size, 1 / TINY.vocab_size)
    g = torch.Generator().manual_seed(1)
    # Clustered latents away from the origin (an encoder's outputs are structured, not white noise):
    # each position holds one of 64 prototype vectors.
    prototypes_KC = 3.0 + torch.randn(64, TINY.z_channels, generator=g, dtype=torch.float64)
    which_BHW = torch.randint(0, 64, (8, 8, 8), generator=g)
    f = prototypes_KC[which_BHW].permute(0, 3, 1, 2).contiguous()

    def codes_used() -> int:
        tokens, _ = quantizer.latent_to_tokens(f)
        return len(torch.unique(torch.cat([t.flatten() for t in tokens])))

    before = codes_used()
    assert quantizer.restart_codes(f, None, torch.Generator().manual_seed(0)) == TINY.vocab_size
    after = codes_used()
    assert after >= 2 * before, (before, after)  # 10 -> 20 codes here; training then spreads them


def test_restart_codes_replaces_only_dead_codes():
    quantizer = make_quantizer().train()
    f = random_latent(TINY, batch=4)
    hits = torch.ones(TINY.vocab_size)
    dead = torch.tensor([3, 17, 200])
    hits[dead] = 0.0
    quantizer.ema_vocab_hit_SV.copy_(hits.expand(len(TINY.patch_nums), -1))
    before = quantizer.embedding.weight.detach().clone()
    inputs = quantizer.search_inputs(f)
    assert quantizer.restart_codes(f, 0.03, torch.Generator().manual_seed(0)) == 3
    after = quantizer.embedding.weight.detach()
    changed = (after != before).any(1).nonzero().flatten()
    assert torch.equal(changed, dead)
    assert torch.cdist(after[dead], inputs).min(1).values.max() < 1e-5  # each re-seeded from a search input
    # their hit counts restart at the mean, so the next call finds nothing dead
    assert quantizer.restart_codes(f, 0.03) == 0
