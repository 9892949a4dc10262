"""Tests of hart/layers/blocks.py: RMSNorm, the two MLPs, the timestep embedder, text pooling and the
AdaLN blocks.

Covered: each piece against its formula written out by hand, the official state-dict names of both
block families, the AdaLN modulation in the released chunk order (gamma1, gamma2, scale1, scale2,
shift1, shift2), the zero-gamma block being the identity, and cross-attention leaving the text
prefix alone.

Run: .venv/bin/pytest tests/hart/layers/test_blocks.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hart.layers.blocks import (
    AdaLNBeforeHead, AdaLNSelfAttnBlock, GeluMLP, RMSNorm, SwiGLU, TimestepEmbedder, llama_hidden_dim, make_norm,
    pool_condition,
)

C, D, H = 32, 24, 4  # width, condition width, heads


def make_block(family="llama", **changes):
    options = dict(embed_dim=C, cond_dim=D, num_heads=H, mlp_ratio=4.0, norm_eps=1e-6, attn_type=family,
                   mlp_type=family, attn_l2_norm=False, use_cross_attn=False, disable_aln=False)
    torch.manual_seed(0)
    return AdaLNSelfAttnBlock(**{**options, **changes}).eval()


def test_rms_norm_matches_the_llama_formula_and_keeps_bf16_in_bf16():
    """RMSNorm is one fused op: in fp32 bit-equal to the reference formula (fp32 statistics, cast back,
    times the weight); a bf16 input (autocast) stays bf16, equal to the reference rounded to bf16 for the
    blocks' unit weight."""
    from hart.layers.blocks import RMSNorm

    def reference(x, weight, eps):
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(64, eps=1e-6)
    x = torch.randn(3, 17, 64, generator=g) * 4
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=g) + 0.5)
        assert torch.equal(norm(x), reference(x, norm.weight, 1e-6))
        norm.weight.fill_(1.0)
        x_bf16 = x.bfloat16()
        out = norm(x_bf16)
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, reference(x_bf16, norm.weight, 1e-6).bfloat16())


def test_norm_choice_and_hidden_width():
    llama = make_norm("llama", C, 1e-6, affine=False)
    assert isinstance(llama, RMSNorm) and set(llama.state_dict()) == {"weight"}  # kept: it is in the checkpoint
    assert list(make_norm("gpt2", C, 1e-6, affine=False).state_dict()) == []
    assert set(make_norm("gpt2", C, 1e-6, affine=True).state_dict()) == {"weight", "bias"}
    # int(C * ratio * 2/3 + 255) // 256 * 256: the released 1536-wide blocks have 4096 hidden units
    assert [llama_hidden_dim(1536, 4.0), llama_hidden_dim(64, 4.0), llama_hidden_dim(512, 4.0)] == [4096, 256, 1536]


def test_mlps_follow_their_formulas():
    torch.manual_seed(0)
    x = torch.randn(2, 5, C)
    swiglu = SwiGLU(C, 48)
    assert set(swiglu.state_dict()) == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}  # no biases
    expected = (F.silu(x @ swiglu.gate_proj.weight.T) * (x @ swiglu.up_proj.weight.T)) @ swiglu.down_proj.weight.T
    torch.testing.assert_close(swiglu(x), expected)
    gelu = GeluMLP(C, 48)
    h = x @ gelu.fc1.weight.T + gelu.fc1.bias
    h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    torch.testing.assert_close(gelu(x), h @ gelu.fc2.weight.T + gelu.fc2.bias)


def test_timestep_sinusoid():
    embedder = TimestepEmbedder(C, frequency_dim=8, max_period=100.0)
    t = torch.tensor([0.0, 2.5])
    emb = embedder.sinusoid(t)
    freqs = torch.tensor([100.0 ** (-i / 4) for i in range(4)])
    assert emb[0].tolist() == [1.0] * 4 + [0.0] * 4  # step 0: cos 1, sin 0
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(2.5 * freqs), torch.sin(2.5 * freqs)]))
    odd = TimestepEmbedder(C, frequency_dim=9).sinusoid(t)
    assert odd.shape == (2, 9) and odd[:, -1].abs().sum() == 0  # padded with a zero column
    assert embedder(t).shape == (2, C)


def test_pool_condition_max_keeps_pads_and_avg_masks_them():
    cond = torch.tensor([[[1.0, -2.0], [3.0, 0.0], [9.0, 9.0]],
                         [[-1.0, -1.0], [-3.0, 5.0], [-5.0, -5.0]]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    # "max" reads every token, pads included (the released behaviour)
    assert pool_condition(cond, mask, "max").tolist() == [[9.0, 9.0], [-1.0, 5.0]]
    # "avg" is the mean over valid tokens; a row without any gives zeros rather than NaN
    assert pool_condition(cond, mask, "avg").tolist() == [[2.0, -1.0], [0.0, 0.0]]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_block_keys_follow_the_official_names(family):
    keys = set(make_block(family).state_dict())
    qkv, mlp = ("qkv_proj", "gate_proj") if family == "llama" else ("mat_qkv", "fc1")
    assert {f"attn.{qkv}.weight", f"ffn.{mlp}.weight", "ada_lin.1.weight", "ada_lin.1.bias"} <= keys
    assert ("ln_wo_grad.weight" in keys) == (family == "llama")
    assert make_block(family).ada_lin[1].out_features == 6 * C
    no_aln = set(make_block(family, disable_aln=True, use_cross_attn=True).state_dict())
    assert not any(k.startswith("ada_lin") for k in no_aln)
    assert {"cross_attn.q_linear.weight", "cross_attn.kv_linear.weight", "cross_attn.proj.weight"} <= no_aln


def test_adaln_modulation_uses_the_released_chunk_order():
    block = make_block()
    chunks = torch.randn(6, C, generator=torch.Generator().manual_seed(1))
    gamma1, gamma2, scale1, scale2, shift1, shift2 = chunks
    with torch.no_grad():
        block.ada_lin[1].weight.zero_()
        block.ada_lin[1].bias.copy_(chunks.flatten())
    x = torch.randn(2, 7, C)
    seen = []

    def attend(attn, normed):  # a stand-in attention that records its input and returns it doubled
        seen.append(normed)
        return 2 * normed

    with torch.no_grad():
        out = block(x, torch.randn(2, D), attend, num_text=0)
        ln = block.ln_wo_grad
        normed1 = ln(x) * (scale1 + 1) + shift1
        mid = x + 2 * normed1 * gamma1
        expected = mid + block.ffn(ln(mid) * (scale2 + 1) + shift2) * gamma2
    torch.testing.assert_close(seen[0], normed1)
    torch.testing.assert_close(out, expected)


def test_zero_gamma_block_is_the_identity_and_the_condition_matters_otherwise():
    block = make_block()
    x, cond = torch.randn(2, 7, C), torch.randn(2, D)

    def attend(attn, normed):
        return attn(normed, (torch.ones(2, 7, C // H), torch.zeros(2, 7, C // H), False))

    with torch.no_grad():
        block.ada_lin[1].weight[: 2 * C].zero_()  # gamma1, gamma2 rows
        block.ada_lin[1].bias[: 2 * C].zero_()
        assert torch.equal(block(x, cond, attend, num_text=0), x)
        block.ada_lin[1].bias[: 2 * C].fill_(0.5)
        a = block(x, cond, attend, num_text=0)
        b = block(x, cond + 1, attend, num_text=0)
    assert not torch.allclose(a, x) and not torch.allclose(a, b)


def test_cross_attention_skips_the_text_prefix():
    block = make_block(disable_aln=True, use_cross_attn=True)
    x = torch.randn(2, 9, C)
    text_a, text_b = torch.randn(2, 5, C), torch.randn(2, 5, C)
    mask = torch.ones(2, 5, dtype=torch.bool)

    def attend(attn, normed):  # no token mixing, so only cross-attention sees the text
        return torch.zeros_like(normed)

    with torch.no_grad():
        a = block(x, None, attend, num_text=3, text_BTC=text_a, text_mask_BT=mask)
        b = block(x, None, attend, num_text=3, text_BTC=text_b, text_mask_BT=mask)
        assert torch.equal(a[:, :3], b[:, :3])  # the 3 text prefix tokens
        assert not torch.allclose(a[:, 3:], b[:, 3:])
        only_text = block(x[:, :3], None, attend, num_text=3, text_BTC=text_a, text_mask_BT=mask)
    assert torch.equal(only_text, a[:, :3])


def test_adaln_before_head_scale_then_shift():
    torch.manual_seed(0)
    head = AdaLNBeforeHead(C, D, 1e-6, "gpt2")
    scale, shift = torch.randn(2, C)
    with torch.no_grad():
        head.ada_lin[1].weight.zero_()
        head.ada_lin[1].bias.copy_(torch.cat([scale, shift]))
        x = torch.randn(3, 4, C)
        expected = F.layer_norm(x, (C,), eps=1e-6) * (scale + 1) + shift
        torch.testing.assert_close(head(x, torch.randn(3, D)), expected)
    assert isinstance(head.ln_wo_grad, nn.LayerNorm)
