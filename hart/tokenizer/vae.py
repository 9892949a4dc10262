"""Convolutional encoder and decoder of the VAR / HART tokenizer (docs/design/tokenizer.md, "Encoder and decoder").

Design: the taming/LDM "VQ-f16" conv net as VAR ships it, rebuilt so that module
attribute names reproduce the released state-dict keys exactly (`conv_in`,
`down.{level}.block.{i}`, `down.{level}.attn.{i}`, `down.{level}.downsample.conv`, `mid.block_1`,
`mid.attn_1`, `mid.block_2`, `norm_out`, `conv_out`; the decoder mirrors it with `up.{level}`,
stored lowest level first). Everything else (width, depth, which levels attend) comes from
`TokenizerConfig`, so the same code builds the released 160-channel net and the tiny test net.

Numerics that matter for the released weights:
- GroupNorm(`norm_groups`, 32 in every release; eps 1e-6) + SiLU before every conv of a residual block;
- downsampling pads one pixel right/bottom, then a stride-2 3x3 conv with no padding;
- upsampling is nearest x2 followed by a 3x3 conv;
- attention is single-head over all positions, 1x1-conv q/k/v packed as one (3C) conv in q,k,v
  order, softmax scale C^-0.5 (computed here with SDPA, the same math);
- self-attention only at the lowest-resolution level (after each block) and in the middle;
- the decoder has num_res_blocks + 1 blocks per level.

Shape legend: B batch, C channels, H/W spatial size, N = H*W positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hart.config import TokenizerConfig


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x_BCHW, scale_factor=2, mode="nearest"))


class Downsample(nn.Module):
    """Asymmetric zero pad (right, bottom) then a stride-2 3x3 conv: halves H and W exactly."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x_BCHW, (0, 1, 0, 1), mode="constant", value=0.0))


class ResnetBlock(nn.Module):
    """GN-SiLU-conv, GN-SiLU-dropout-conv, plus a 1x1 shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        # Identity when dropout is off keeps the module free of a no-op layer (no keys either way).
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h_BCHW = self.conv1(F.silu(self.norm1(x_BCHW)))
        h_BCHW = self.conv2(self.dropout(F.silu(self.norm2(h_BCHW))))
        return self.nin_shortcut(x_BCHW) + h_BCHW


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.channels = channels
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x_BCHW.shape
        qkv_B3CN = self.qkv(self.norm(x_BCHW)).reshape(B, 3, C, H * W)
        # (B, 1 head, N, C): SDPA's default scale is C^-0.5, the released one.
        q, k, v = (t.transpose(1, 2).unsqueeze(1) for t in qkv_B3CN.unbind(1))
        h_B1NC = F.scaled_dot_product_attention(q, k, v)
        h_BCHW = h_B1NC.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x_BCHW + self.proj_out(h_BCHW)


class _Level(nn.Module):
    """One resolution level; a plain container so the keys read `block.i`, `attn.i`, `downsample`."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Middle(nn.Module):
    def __init__(self, channels: int, dropout: float, using_mid_sa: bool, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups) if using_mid_sa else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x_BCHW)))


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> latent (B, z_channels, H/f, W/f), f = 2**(len(ch_mult)-1)."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        ch, ch_mult, groups = config.ch, tuple(config.ch_mult), config.norm_groups
        self.num_levels = len(ch_mult)
        self.num_res_blocks = config.num_res_blocks
        self.conv_in = nn.Conv2d(config.in_channels, ch, kernel_size=3, stride=1, padding=1)
        self.down = nn.ModuleList()
        width = ch
        for level, mult in enumerate(ch_mult):
            stage = _Level()
            lowest = level == self.num_levels - 1
            for _ in range(config.num_res_blocks):
                stage.block.append(ResnetBlock(width, ch * mult, config.dropout, groups))
                width = ch * mult
                if lowest and config.using_sa:
                    stage.attn.append(AttnBlock(width, groups))
            if not lowest:
                stage.downsample = Downsample(width)
            self.down.append(stage)
        self.mid = _Middle(width, config.dropout, config.using_mid_sa, groups)
        self.norm_out = group_norm(width, groups)
        self.conv_out = nn.Conv2d(width, config.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x_BCHW)
        for level, stage in enumerate(self.down):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if level != self.num_levels - 1:
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, in_channels, h*f, w*f), unclamped."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        ch, ch_mult, groups = config.ch, tuple(config.ch_mult), config.norm_groups
        self.num_levels = len(ch_mult)
        width = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, width, kernel_size=3, stride=1, padding=1)
        self.mid = _Middle(width, config.dropout, config.using_mid_sa, groups)
        # Built from the lowest resolution up, stored in level order (up.0 = full resolution),
        # which is how the released keys are numbered.
        levels: list[_Level] = []
        for level in reversed(range(self.num_levels)):
            stage = _Level()
            lowest = level == self.num_levels - 1
            for _ in range(config.num_res_blocks + 1):
                stage.block.append(ResnetBlock(width, ch * ch_mult[level], config.dropout, groups))
                width = ch * ch_mult[level]
                if lowest and config.using_sa:
                    stage.attn.append(AttnBlock(width, groups))
            if level != 0:
                stage.upsample = Upsample(width)
            levels.insert(0, stage)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(width, groups)
        self.conv_out = nn.Conv2d(width, config.in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z_BCHW))
        for level in reversed(range(self.num_levels)):
            stage = self.up[level]
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if level != 0:
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def last_layer_weight(self) -> torch.Tensor:
        """The output conv weight: the VQGAN adaptive GAN weight is measured on its gradients."""
        return self.conv_out.weight
