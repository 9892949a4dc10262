"""Self-attention (block-causal over scales, KV cache) and the two cross-attentions (HART option, STAR).

Design: HART's mask is block-causal with sorted levels: text is level 0, scale k is level
k, and a query attends to every key whose level is <= its own. Because levels only grow
along the sequence, the keys of a query segment are exactly the prefix that ends where
its own segment ends. So instead of a dense (L, L) additive mask (363 MB at 1024px, which
the released code keeps as a buffer) we run one unmasked `scaled_dot_product_attention`
per segment over that key prefix. This is exact, lets SDPA pick flash/efficient kernels
on GPU, works identically on CPU, and also covers token subsampling (kept last-scale
tokens still form one trailing segment). With a KV cache (sampling) each call adds one
segment (the text, or one scale) and attends to everything cached so far.

A second training path runs the whole block-causal mask in one FlexAttention call
(`flex_segmented_attention`) with a `BlockMask` built once per segment layout (text length,
scale list, kept last-scale count) and cached (`block_causal_mask`). It computes the same
function as the segment path, fused into one kernel on GPU, and its mask is exactly the one
above: text pads are attended, as in the released model. FlexAttention has no CPU backward
(torch 2.13), so on CPU it serves forward passes only; `hart.training.parallelize` picks the path.

Projection layout matches the checkpoint: `qkv_proj` (llama) / `mat_qkv` (gpt2) without
bias, learnable `q_bias` and `v_bias`, a persistent all-zero `zero_k_bias` buffer, `proj`
with bias, and `scale_mul_1H11` (log scale, clamped at log 100) when `attn_l2_norm`.
Softmax scale is 0.25/sqrt(hd) (the released value), or 1 after L2-normalising q and k.
RoPE is applied after the L2 norm, and the cache stores post-RoPE keys.

Shape legend: B batch, L tokens, C width, H heads, hd head dim, T text tokens.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from hart.layers.rope import apply_rope

ATTENTION_BACKENDS = ("sdpa", "flex")
# One BlockMask per segment layout: with last-scale subsampling the kept count sets the last segment,
# so a run sees at most one mask per kept count (a handful with bucketed counts).
MASK_CACHE_SIZE = 256


class _Prefixes(torch.autograd.Function):
    """Views x.to(dtype)[:, :, :end] for each end, with one gradient buffer in backward.

    Plain slicing is correct but slow in backward: each slice's gradient is a zero-filled tensor
    of x's full size, and autograd adds the n of them together (n fills + n full-size adds: a
    quarter of the attention's forward + backward time at 11 segments, measured on CPU). Here the
    prefix gradients are added in place into one buffer of x's dtype, each only over its own
    prefix. They are added last segment first, the order autograd's engine uses for the slices, so
    the sums are bit-identical to plain slicing (tests/hart/transformer/test_model.py checks). The cast
    to `dtype` (the autocast dtype SDPA would cast each prefix to) also happens once, not per segment.
    """

    @staticmethod
    def forward(ctx, x_BHLd: torch.Tensor, ends: list[int], dtype: torch.dtype):
        ctx.ends, ctx.shape, ctx.dtype = ends, x_BHLd.shape, x_BHLd.dtype
        cast_BHLd = x_BHLd.to(dtype)
        return tuple(cast_BHLd[:, :, :end] for end in ends)

    @staticmethod
    def backward(ctx, *grads):
        grad_BHLd = grads[0].new_zeros(ctx.shape, dtype=ctx.dtype)
        for end, grad in reversed(list(zip(ctx.ends, grads))):
            if grad is not None:
                grad_BHLd[:, :, :end].add_(grad)  # not `+=`: that also copies the slice back onto itself
        return grad_BHLd, None, None


@torch.compiler.disable
def segmented_attention(q_BHLd, k_BHLd, v_BHLd, ends: list[int], scale: float) -> torch.Tensor:
    """Block-causal attention as one SDPA call per segment: segment i's queries see keys [0, ends[i]).

    Queries are split into disjoint segments (split's backward is one concatenation); keys and
    values are prefixes, whose gradients `_Prefixes` sums without full-size zero tensors.
    Kept out of torch.compile (a graph break; the SDPA kernels are already fused): the last
    segment's length changes every step (last-scale subsampling), so the compiled block goes
    dynamic in L, and inductor (torch 2.13, CPU) then fixed the strides of these slices at their
    first values and failed in backward ("expected stride ... at dim=0") once L changed.
    """
    # Under autocast SDPA casts its inputs to the autocast dtype (with attn_l2_norm q and k arrive in
    # fp32, v in bf16): cast each tensor once here, not once per segment and key prefix.
    device = q_BHLd.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q_BHLd.dtype
    sizes = [end - start for start, end in zip([0, *ends[:-1]], ends)]
    queries = q_BHLd.to(dtype).split(sizes, dim=2)
    keys, values = _Prefixes.apply(k_BHLd, ends, dtype), _Prefixes.apply(v_BHLd, ends, dtype)
    outs = [F.scaled_dot_product_attention(q, k, v, scale=scale) for q, k, v in zip(queries, keys, values)]
    return torch.cat(outs, dim=2)


@functools.lru_cache(maxsize=MASK_CACHE_SIZE)
def block_causal_mask(ends: tuple[int, ...], device: str) -> BlockMask:
    """The block-causal rule of `ends` (query segment i sees keys [0, ends[i])) as a FlexAttention mask.

    Segment i holds level i; a query attends to every key whose level is not above its own.
    Built once per (ends, device) and kept: creating it evaluates the rule over the whole grid.
    """
    sizes = torch.tensor([ends[0], *(b - a for a, b in zip(ends, ends[1:]))])
    levels_L = torch.repeat_interleave(torch.arange(len(ends)), sizes).to(device)

    def query_level_at_least_key_level(batch, head, q_idx, kv_idx):
        return levels_L[q_idx] >= levels_L[kv_idx]

    return create_block_mask(query_level_at_least_key_level, B=None, H=None, Q_LEN=ends[-1], KV_LEN=ends[-1],
                             device=device)


@functools.cache
def _compiled_flex_attention():
    # Called eagerly, flex_attention materialises the whole score matrix; compiled, it is one fused
    # kernel. Inside a compiled block (parallel.compile) the plain function is traced instead.
    return torch.compile(flex_attention, dynamic=False)


def flex_segmented_attention(q_BHLd, k_BHLd, v_BHLd, block_mask: BlockMask, scale: float) -> torch.Tensor:
    """Block-causal attention in one FlexAttention call; same function as `segmented_attention`."""
    device = q_BHLd.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q_BHLd.dtype
    # One dtype (autocast does not cast for flex) and contiguous: compiled on CPU (torch 2.13), the flex
    # kernel read the strided views the qkv projection leaves (v) wrongly inside a compiled block (max
    # error 0.5 on the tiny preset; exact once contiguous). Under compile the copy fuses into the producer.
    q, k, v = (t.to(dtype).contiguous() for t in (q_BHLd, k_BHLd, v_BHLd))
    if device == "cuda" and not torch.compiler.is_compiling():
        return _compiled_flex_attention()(q, k, v, block_mask=block_mask, scale=scale)
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale)


class KVCache:
    """Post-RoPE keys and values of one block, grown one segment at a time.

    With `capacity` (the whole sequence length) the cache is static: two buffers allocated at the
    first append and filled in place, each call attending to a prefix view of them. No per-scale
    concatenation (which copied the whole cache at every scale and briefly held it twice), and fixed
    addresses and shapes per scale for compiled or graph-captured steps. SDPA reads the views as it
    read the concatenated tensors: the outputs are bit-identical (tests/hart/transformer/test_model.py).
    Without `capacity` segments are concatenated (any length).
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.length = 0
        self.k_BHLd: torch.Tensor | None = None
        self.v_BHLd: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if self.capacity is None:
            self.k_BHLd = k if self.k_BHLd is None else torch.cat([self.k_BHLd, k], dim=2)
            self.v_BHLd = v if self.v_BHLd is None else torch.cat([self.v_BHLd, v], dim=2)
            self.length = end
            return self.k_BHLd, self.v_BHLd
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} tokens; appending {k.shape[2]} to {self.length} overflows it")
        if self.k_BHLd is None:
            B, H, _, hd = k.shape
            self.k_BHLd = k.new_empty(B, H, self.capacity, hd)
            self.v_BHLd = v.new_empty(B, H, self.capacity, v.shape[-1])
        self.k_BHLd[:, :, self.length : end].copy_(k)
        self.v_BHLd[:, :, self.length : end].copy_(v)
        self.length = end
        return self.k_BHLd[:, :, :end], self.v_BHLd[:, :, :end]


def add_bias_projection_and_scale(module: nn.Module, embed_dim: int, num_heads: int, attn_l2_norm: bool) -> None:
    """VAR's attention parts after the input projections, shared by the self- and the text
    cross-attention (same names, so both load the released keys): q and v biases (k has none; a zero
    buffer keeps its checkpoint key), the output projection, and the logit scale: L2-normalised q, k
    with a learned per-head multiplier (init 4, at most 100) and softmax scale 1, else 0.25/sqrt(hd).
    Called right after the input projections, so random initialisation draws in the same order."""
    module.q_bias = nn.Parameter(torch.zeros(embed_dim))
    module.v_bias = nn.Parameter(torch.zeros(embed_dim))
    module.register_buffer("zero_k_bias", torch.zeros(embed_dim))
    module.proj = nn.Linear(embed_dim, embed_dim)
    module.attn_l2_norm = attn_l2_norm
    if attn_l2_norm:
        module.scale = 1.0
        module.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        module.max_scale_mul = math.log(100.0)
    else:
        module.scale = 0.25 / math.sqrt(embed_dim // num_heads)


class SelfAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, attn_l2_norm: bool, qkv_name: str = "qkv_proj"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.qkv_name = qkv_name
        setattr(self, qkv_name, nn.Linear(embed_dim, 3 * embed_dim, bias=False))
        add_bias_projection_and_scale(self, embed_dim, num_heads, attn_l2_norm)

    def project_qkv(
        self, x_BLC: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor, bool] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, H, L, hd): q and k L2-normalised (attn_l2_norm) and rotated (RoPE) as one tensor.

        Normalising and rotating q and k together halves those elementwise calls (each a kernel
        launch on a GPU, and the same again in backward); per element the arithmetic is the one of
        separate calls, so fp32 results are bit-identical (k's scale factor is exactly 1). Under bf16
        autocast, q times its fp32 scale is fp32 (k with it: one tensor), RoPE runs in fp32, and q, k
        are cast to v's dtype once, here, so the KV cache and every attention kernel get bf16.
        """
        B, L, C = x_BLC.shape
        weight = getattr(self, self.qkv_name).weight
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        qkv_3BHLd = F.linear(x_BLC, weight, bias).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        qk_2BHLd, v_BHLd = qkv_3BHLd[:2], qkv_3BHLd[2]
        if self.attn_l2_norm:
            scale_mul_1H11 = self.scale_mul_1H11.clamp(max=self.max_scale_mul).exp()
            scales_21H11 = torch.stack([scale_mul_1H11, torch.ones_like(scale_mul_1H11)])  # q scaled, k not
            qk_2BHLd = F.normalize(qk_2BHLd, dim=-1) * scales_21H11
        if rope is not None:
            cos_BLd, sin_BLd, interleaved = rope
            qk_2BHLd = apply_rope(qk_2BHLd, cos_BLd, sin_BLd, interleaved)  # (B, 1, L, d) broadcasts over both
        if qk_2BHLd.dtype != v_BHLd.dtype:  # bf16 autocast with attn_l2_norm
            qk_2BHLd = qk_2BHLd.to(v_BHLd.dtype)
        q_BHLd, k_BHLd = qk_2BHLd.unbind(0)
        return q_BHLd, k_BHLd, v_BHLd

    def forward(
        self,
        x_BLC: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor, bool] | None,
        segment_ends: list[int] | None = None,
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
        block_mask: BlockMask | None = None,
    ) -> torch.Tensor:
        """Attend with one of four masks.

        - `segment_ends` (training): query segment i is [ends[i-1], ends[i]) and sees keys [0, ends[i]).
        - `block_mask` (training, flex path): the same rule as one FlexAttention mask (`block_causal_mask`).
        - `cache` (sampling): all queries see every cached key plus the new ones.
        - `attn_mask` (reference/tests only): a dense additive or boolean mask for SDPA.
        """
        B, L, C = x_BLC.shape
        q, k, v = self.project_qkv(x_BLC, rope)
        if cache is not None:
            k, v = cache.append(k, v)
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        elif attn_mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        elif block_mask is not None:
            out = flex_segmented_attention(q, k, v, block_mask, self.scale)
        else:
            ends = segment_ends or [L]
            assert ends[-1] == L, f"segments end at {ends[-1]} but the sequence has {L} tokens"
            out = segmented_attention(q, k, v, ends, self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to the projected text tokens (keys/values), per sample.

    Key names follow HART's unused `MultiHeadCrossAttention` (`q_linear`, `kv_linear`, `proj`).
    Unlike that code (xformers over the flattened batch, pads unmasked) each sample sees only
    its own text, with pad tokens masked. The output projection starts at zero, so switching
    it on leaves a pretrained model's function unchanged at step 0.
    """

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.q_linear = nn.Linear(embed_dim, embed_dim)
        self.kv_linear = nn.Linear(embed_dim, 2 * embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x_BNC: torch.Tensor, text_BTC: torch.Tensor, mask_BT: torch.Tensor | None) -> torch.Tensor:
        B, N, C = x_BNC.shape
        T = text_BTC.shape[1]
        q = self.q_linear(x_BNC).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_linear(text_BTC).view(B, T, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        keep = text_key_mask(mask_BT) if mask_BT is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


def text_key_mask(mask_BT: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, T) boolean SDPA mask that hides padded text keys.

    A fully padded row keeps its first key: with every key hidden the softmax has no support and
    returns NaN (STAR's additive -inf mask would; CLIP's BOS/EOS never leave a row empty there).
    """
    keep_BT = mask_BT.bool().clone()
    keep_BT[:, 0] |= ~keep_BT.any(dim=1)
    return keep_BT[:, None, None, :]


class TextCrossAttention(nn.Module):
    """STAR's cross-attention: image tokens (queries) attend to the raw text-encoder features.

    Differs from `CrossAttention` (HART's option) in where keys and values come from and how the
    logits are scaled (docs/design/star.md, "Cross-attention"; STAR-T2I `models/basic_var.py`):
    - keys/values are the text features (B, T, D) themselves through `mat_kv` (D -> 2C, no bias) plus
      the [zero_k_bias, v_bias] bias, not C-dim projected prefix tokens; the query is `mat_q` (C -> C,
      no bias) plus `q_bias`. The caller passes the query input (STAR: a non-affine LayerNorm of x).
    - with `attn_l2_norm` q and k are L2-normalised per head, q is multiplied by
      exp(min(scale_mul_1H11, log 100)) (init log 4) and the softmax scale is 1; without it the scale
      is 0.25 / sqrt(hd), VAR's. No RoPE: text has no 2-D position.
    Parameter names are STAR's checkpoint keys. Every row sees only its own text (pads masked).
    """

    def __init__(self, embed_dim: int, text_dim: int, num_heads: int, attn_l2_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.mat_q = nn.Linear(embed_dim, embed_dim, bias=False)
        self.mat_kv = nn.Linear(text_dim, 2 * embed_dim, bias=False)
        add_bias_projection_and_scale(self, embed_dim, num_heads, attn_l2_norm)

    def forward(self, x_BLC: torch.Tensor, text_BTD: torch.Tensor, keep_B11T: torch.Tensor | None) -> torch.Tensor:
        """`keep_B11T` from `text_key_mask` (built once per batch, shared by all blocks)."""
        B, L, C = x_BLC.shape
        T = text_BTD.shape[1]
        q_BHLd = F.linear(x_BLC, self.mat_q.weight, self.q_bias).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        kv_bias = torch.cat([self.zero_k_bias, self.v_bias])
        kv = F.linear(text_BTD.to(x_BLC.dtype), self.mat_kv.weight, kv_bias).view(B, T, 2, self.num_heads, self.head_dim)
        k_BHTd, v_BHTd = kv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.attn_l2_norm:
            q_BHLd = F.normalize(q_BHLd, dim=-1) * self.scale_mul_1H11.clamp(max=self.max_scale_mul).exp()
            k_BHTd = F.normalize(k_BHTd, dim=-1)
            q_BHLd, k_BHTd = q_BHLd.to(v_BHTd.dtype), k_BHTd.to(v_BHTd.dtype)
        out = F.scaled_dot_product_attention(q_BHLd, k_BHTd, v_BHTd, attn_mask=keep_B11T, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))
