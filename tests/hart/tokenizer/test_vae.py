"""Tests of hart/tokenizer/vae.py: the convolutional encoder and decoder of the tokenizer.

Covered: image <-> latent shapes for the tiny preset, the official module names (`down.{level}`,
`up.{level}` stored lowest level first, attention only at the lowest level, decoder blocks
num_res_blocks + 1, 1x1 shortcuts only where the width changes), and the released numerics of the
pieces: right/bottom padding before the stride-2 conv, nearest upsampling, single-head attention
with scale C^-0.5.

Run: .venv/bin/pytest tests/hart/tokenizer/test_vae.py -q
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from configuration.loader import replace
from hart.config import TOKENIZER_PRESETS
from hart.tokenizer.vae import AttnBlock, Decoder, Downsample, Encoder, ResnetBlock, Upsample

TINY = TOKENIZER_PRESETS["tiny"]
THREE_LEVELS = replace(TINY, ch_mult=(1, 2, 2), num_res_blocks=1)  # ch 32: widths 32, 64, 64


def modules(net: nn.Module) -> set[str]:
    """Names of the modules that own state-dict entries."""
    return {key.rsplit(".", 1)[0] for key in net.state_dict()}


def resnet(prefix: str, shortcut: bool = False) -> set[str]:
    return {f"{prefix}.{name}" for name in ("norm1", "conv1", "norm2", "conv2")} | ({f"{prefix}.nin_shortcut"} if shortcut else set())


def attn(prefix: str) -> set[str]:
    return {f"{prefix}.{name}" for name in ("norm", "qkv", "proj_out")}


MIDDLE = resnet("mid.block_1") | attn("mid.attn_1") | resnet("mid.block_2")


def test_tiny_preset_shapes():
    torch.manual_seed(0)
    encoder, decoder = Encoder(TINY).eval(), Decoder(TINY).eval()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        latent = encoder(images)
        assert latent.shape == (2, TINY.z_channels, 8, 8)  # factor 2**(4 levels - 1)
        assert decoder(latent).shape == images.shape
        assert encoder(images[:, :, :32, :48]).shape == (2, TINY.z_channels, 4, 6)  # any multiple of 8
    assert decoder.last_layer_weight() is decoder.conv_out.weight


def test_encoder_and_decoder_use_the_official_names():
    encoder = modules(Encoder(THREE_LEVELS))
    assert encoder == (
        {"conv_in", "norm_out", "conv_out", "down.0.downsample.conv", "down.1.downsample.conv"}
        | resnet("down.0.block.0") | resnet("down.1.block.0", shortcut=True)  # 32 -> 64
        | resnet("down.2.block.0") | attn("down.2.attn.0")  # attention at the lowest level only
        | MIDDLE
    )
    decoder = modules(Decoder(THREE_LEVELS))
    assert decoder == (
        {"conv_in", "norm_out", "conv_out", "up.2.upsample.conv", "up.1.upsample.conv"}
        | resnet("up.2.block.0") | resnet("up.2.block.1") | attn("up.2.attn.0") | attn("up.2.attn.1")
        | resnet("up.1.block.0") | resnet("up.1.block.1")
        | resnet("up.0.block.0", shortcut=True) | resnet("up.0.block.1")  # 64 -> 32 at full resolution
        | MIDDLE
    )
    plain = replace(THREE_LEVELS, using_sa=False, using_mid_sa=False)
    assert not any("attn" in name for name in modules(Encoder(plain)) | modules(Decoder(plain)))


def test_downsample_pads_right_and_bottom_then_halves():
    torch.manual_seed(0)
    down = Downsample(4)
    x = torch.randn(1, 4, 8, 8)
    out = down(x)
    assert out.shape == (1, 4, 4, 4)
    padded = torch.zeros(1, 4, 9, 9)
    padded[..., :8, :8] = x  # zeros on the right and at the bottom only
    torch.testing.assert_close(out, F.conv2d(padded, down.conv.weight, down.conv.bias, stride=2))
    symmetric = F.conv2d(F.pad(x, (1, 0, 1, 0)), down.conv.weight, down.conv.bias, stride=2)
    assert not torch.allclose(out, symmetric)


def test_upsample_is_nearest_then_conv():
    torch.manual_seed(0)
    up = Upsample(4)
    x = torch.randn(1, 4, 3, 3)
    nearest = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(up(x), F.conv2d(nearest, up.conv.weight, up.conv.bias, padding=1))


def test_attention_block_is_single_head_softmax_attention():
    torch.manual_seed(0)
    block = AttnBlock(8, groups=2)
    x = torch.randn(2, 8, 3, 4)
    h = block.norm(x).flatten(2)  # (B, C, N)
    w, b = block.qkv.weight[:, :, 0, 0], block.qkv.bias
    q, k, v = (w @ h + b[:, None]).split(8, dim=1)
    weights = torch.softmax(q.transpose(1, 2) @ k / 8**0.5, dim=-1)  # (B, N, N), scale C^-0.5
    attended = (v @ weights.transpose(1, 2)).view(2, 8, 3, 4)
    torch.testing.assert_close(block(x), x + block.proj_out(attended), atol=1e-5, rtol=1e-5)


def test_resnet_block_shortcut_and_dropout_slots():
    same, wider = ResnetBlock(8, 8, dropout=0.0, groups=2), ResnetBlock(8, 16, dropout=0.1, groups=2)
    assert isinstance(same.nin_shortcut, nn.Identity) and isinstance(same.dropout, nn.Identity)
    assert isinstance(wider.nin_shortcut, nn.Conv2d) and isinstance(wider.dropout, nn.Dropout)
    with torch.no_grad():  # zero second conv: the block reduces to its shortcut
        same.conv2.weight.zero_(), same.conv2.bias.zero_()
        x = torch.randn(1, 8, 4, 4)
        assert torch.equal(same(x), x)
    with pytest.raises(ValueError):
        ResnetBlock(8, 12, dropout=0.0, groups=8)  # GroupNorm(8) cannot split 12 channels
