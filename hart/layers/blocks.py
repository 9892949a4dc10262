"""Building blocks of the HART transformer: norms, MLPs, the timestep embedder, AdaLN blocks.

Design: module and attribute names are the official state-dict names (`ln_wo_grad`,
`ada_lin.1`, `ffn.gate_proj`, `lvl_embed.mlp.0`, ...), so a released checkpoint loads
strictly without a key map. Two families exist, picked by `TransformerConfig`:
- "llama": RMSNorm that keeps a learnable weight (the released code ignores
  `elementwise_affine` for its fused RMSNorm, so `ln_wo_grad.weight` is in the checkpoint)
  and a SwiGLU MLP without biases, hidden `int(C*ratio*2/3 + 255)//256*256`.
- "gpt2": LayerNorm without affine parameters and a GELU-tanh MLP with biases.

An AdaLN block modulates both sublayers with six vectors computed from a pooled text
condition, in the official chunk order gamma1, gamma2, scale1, scale2, shift1, shift2.

Shape legend: B batch, L tokens, T text tokens, C width, D condition width, H heads.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hart.layers.attention import CrossAttention, SelfAttention


class RMSNorm(nn.Module):
    """w * x / sqrt(mean(x^2) + eps), statistics in float32 (LLaMA convention)."""

    def __init__(self, dim: int, eps: float = 1e-6, scale: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), float(scale)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op (statistics in fp32 inside it, also for bf16 input) in x's dtype. In fp32 it is
        # the reference's arithmetic bit for bit. Under bf16 autocast (bf16 activations, fp32 weight)
        # the reference normalises in fp32, rounds to bf16 and multiplies by the fp32 weight, so its
        # output is fp32 and the next linear casts it back; here the output stays bf16 (equal to the
        # reference's for the blocks' constant unit weight, one bf16 rounding off otherwise).
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)


def make_norm(attn_type: str, dim: int, eps: float, affine: bool) -> nn.Module:
    """The norm of a block ("wo_grad" position: affine=False) or of decoder_norm (affine=True).

    The llama RMSNorm always owns a weight (checkpoint layout); the gpt2 LayerNorm honours `affine`.
    """
    if attn_type == "llama":
        return RMSNorm(dim, eps)
    return nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)


def llama_hidden_dim(embed_dim: int, mlp_ratio: float) -> int:
    return int((embed_dim * mlp_ratio * 2) / 3 + 255) // 256 * 256


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases (official `LlamaMLP`)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """fc2(gelu_tanh(fc1(x))) with biases (VAR/GPT-2 `FFN`)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a residual branch for a random subset of rows, rescale the rest by 1/(1-p)."""
    if p == 0.0 or not training:
        return x
    keep_B1 = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1.0 - p)
    return x * keep_B1 / (1.0 - p)


class TimestepEmbedder(nn.Module):
    """Sinusoid [cos, sin] of a (possibly fractional) step -> Linear -> SiLU -> Linear.

    Used for the scale level of the transformer and the diffusion step of the head.
    """

    def __init__(self, dim: int, frequency_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def sinusoid(self, t_N: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(
            -math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t_N.device) / half
        )
        args_NF = t_N[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args_NF), torch.sin(args_NF)], dim=-1)
        if self.frequency_dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t_N: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(t_N).to(self.mlp[0].weight.dtype))


def pool_condition(cond_BTD: torch.Tensor, mask_BT: torch.Tensor, mode: str) -> torch.Tensor:
    """AdaLN condition from the text tokens: masked mean ("avg") or max over all tokens ("max").

    "max" includes the pad positions on purpose: the released model was trained that way.
    """
    if mode == "max":
        return cond_BTD.max(dim=1).values
    weights_BT1 = mask_BT.unsqueeze(-1).to(cond_BTD.dtype)
    return (cond_BTD * weights_BT1 / weights_BT1.sum(1, keepdim=True).clamp(min=1)).sum(1)


class AdaLNSelfAttnBlock(nn.Module):
    """Pre-norm transformer block with AdaLN modulation from a pooled text condition."""

    def __init__(
        self,
        embed_dim: int,
        cond_dim: int,
        num_heads: int,
        mlp_ratio: float,
        norm_eps: float,
        attn_type: str,
        mlp_type: str,
        attn_l2_norm: bool,
        use_cross_attn: bool,
        disable_aln: bool,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.attn = SelfAttention(embed_dim, num_heads, attn_l2_norm, qkv_name="qkv_proj" if attn_type == "llama" else "mat_qkv")
        if mlp_type == "llama":
            self.ffn: nn.Module = SwiGLU(embed_dim, llama_hidden_dim(embed_dim, mlp_ratio))
        else:
            self.ffn = GeluMLP(embed_dim, round(embed_dim * mlp_ratio))
        self.ln_wo_grad = make_norm(attn_type, embed_dim, norm_eps, affine=False)
        self.disable_aln = disable_aln
        if not disable_aln:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * embed_dim))
        self.cross_attn = CrossAttention(embed_dim, num_heads) if use_cross_attn else None

    def forward(
        self,
        x_BLC: torch.Tensor,
        cond_BD: torch.Tensor,
        attend: Callable[[SelfAttention, torch.Tensor], torch.Tensor],
        num_text: int,
        text_BTC: torch.Tensor | None = None,
        text_mask_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`attend(attn_module, normed_x)` runs the self-attention with the caller's mask/cache.

        `num_text` leading tokens of x are text prefix tokens (no cross-attention for them).
        """
        if self.disable_aln:
            x_BLC = x_BLC + attend(self.attn, self.ln_wo_grad(x_BLC))
            x_BLC = self._cross(x_BLC, num_text, text_BTC, text_mask_BT)
            return x_BLC + self.ffn(self.ln_wo_grad(x_BLC))
        mod = self.ada_lin(cond_BD).view(-1, 1, 6, self.embed_dim)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod.unbind(2)
        x_BLC = x_BLC + attend(self.attn, self.ln_wo_grad(x_BLC) * (scale1 + 1) + shift1) * gamma1
        x_BLC = self._cross(x_BLC, num_text, text_BTC, text_mask_BT)
        return x_BLC + self.ffn(self.ln_wo_grad(x_BLC) * (scale2 + 1) + shift2) * gamma2

    def _cross(self, x_BLC, num_text, text_BTC, text_mask_BT):
        if self.cross_attn is None or x_BLC.shape[1] == num_text:
            return x_BLC
        image = x_BLC[:, num_text:]
        image = image + self.cross_attn(image, text_BTC, text_mask_BT)
        return torch.cat([x_BLC[:, :num_text], image], dim=1)


class AdaLNBeforeHead(nn.Module):
    """Norm + (scale, shift) modulation before the logits head."""

    def __init__(self, embed_dim: int, cond_dim: int, norm_eps: float, attn_type: str):
        super().__init__()
        self.embed_dim = embed_dim
        self.ln_wo_grad = make_norm(attn_type, embed_dim, norm_eps, affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * embed_dim))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.embed_dim).unbind(2)
        return self.ln_wo_grad(x_BLC) * (scale + 1) + shift
