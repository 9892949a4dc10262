"""Rotary position embeddings: 1-D for text, HART's 2-D for image scales, STAR's normalized 2-D.

Design: every function returns (cos, sin) tables of shape (B, L, hd) that `apply_rope`
applies to q and k of shape (B, H, L, hd). Text and image tables are concatenated along L,
so one attention call handles both.

HART mode (released checkpoint; docs/design/transformer.md, "2-D RoPE"), reproduced bit for bit:
- text: standard LLaMA 1-D RoPE, `inv_freq = theta^-(arange(0, hd, 2)/hd)`, positions
  `cumsum(mask) - 1`, laid out `[p*f, p*f]` and applied with `rotate_half`.
- image: a pn x pn scale has float coordinates `(row, col) / pn * pn_max` plus the last
  text position id; `inv_freq = theta^-(arange(0, hd, 4)/hd)` (hd/4 frequencies); the table
  is laid out `[row*f, row*f, col*f, col*f]` and applied with `rotate_half`, which pairs
  dim j with dim j + hd/2. For j < hd/4 that pairs a row angle with a column angle: the
  map is not a pure rotation when row != col. That is what the weights were trained with.
STAR mode (`rope_mode="star"`; docs/design/star.md, "Normalized RoPE"): coordinates
`(row, col) / (pn - 1) * rope_norm` (the 1x1 scale at 0), no text offset, table `[x*f, y*f]` per
complex pair (x = column), applied to interleaved (even, odd) pairs. Text keeps 1-D positions, also
in interleaved pairing.

Shape legend: B batch, L tokens, T text tokens, H heads, hd head dim, F frequencies.
"""

from __future__ import annotations

import torch


def inv_freq_1d(head_dim: int, theta: float, device=None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))


def inv_freq_2d(head_dim: int, theta: float, device=None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 4, dtype=torch.int64, device=device).float() / head_dim))


def text_positions(mask_BT: torch.Tensor) -> torch.Tensor:
    """Official text position ids: cumsum(mask) - 1 (pads repeat the last valid id)."""
    return torch.cumsum(mask_BT.long(), dim=1) - 1


def hart_scale_coords(patch_nums: tuple[int, ...], pn_max: int, device=None) -> torch.Tensor:
    """(sum pn^2, 2) float coordinates (row, col) / pn * pn_max of the given scales."""
    coords = []
    for pn in patch_nums:
        r = torch.arange(pn, device=device)
        grid = torch.stack(torch.meshgrid(r, r, indexing="ij"), dim=-1)  # (pn, pn, 2) int64
        coords.append((grid / pn * pn_max).reshape(-1, 2))
    return torch.cat(coords, dim=0)


def star_scale_coords(patch_nums: tuple[int, ...], rope_norm: float, device=None) -> torch.Tensor:
    coords = []
    for pn in patch_nums:
        r = torch.arange(pn, device=device, dtype=torch.float32)
        grid = torch.stack(torch.meshgrid(r, r, indexing="ij"), dim=-1)
        if pn > 1:
            grid = grid / (pn - 1) * rope_norm
        coords.append(grid.reshape(-1, 2))
    return torch.cat(coords, dim=0)


def text_rope(pos_BT: torch.Tensor, head_dim: int, theta: float, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    freqs_BTF = pos_BT.float()[..., None] * inv_freq_1d(head_dim, theta, pos_BT.device)
    if interleaved:
        emb = freqs_BTF.repeat_interleave(2, dim=-1)
    else:
        emb = torch.cat([freqs_BTF, freqs_BTF], dim=-1)
    return emb.cos(), emb.sin()


def image_rope(pos_BL2: torch.Tensor, head_dim: int, theta: float, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of 2-D positions (B, L, 2) in the HART (`interleaved=False`) or STAR layout."""
    inv = inv_freq_2d(head_dim, theta, pos_BL2.device)
    row_BLF = pos_BL2[..., 0:1].float() * inv
    col_BLF = pos_BL2[..., 1:2].float() * inv
    if interleaved:  # STAR: x (column) frequencies first, then y (row)
        emb = torch.cat([col_BLF, row_BLF], dim=-1).repeat_interleave(2, dim=-1)
    else:
        emb = torch.cat([row_BLF, row_BLF, col_BLF, col_BLF], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): the interleaved complex rotation."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def apply_rope(x_BHLd: torch.Tensor, cos_BLd: torch.Tensor, sin_BLd: torch.Tensor, interleaved: bool) -> torch.Tensor:
    cos, sin = cos_BLd.unsqueeze(1).to(x_BHLd.dtype), sin_BLd.unsqueeze(1).to(x_BHLd.dtype)
    rotated = rotate_pairs(x_BHLd) if interleaved else rotate_half(x_BHLd)
    return x_BHLd * cos + rotated * sin


class RopeBuilder:
    """Builds the (cos, sin) tables of a sequence for one `TransformerConfig`."""

    def __init__(self, patch_nums: tuple[int, ...], head_dim: int, theta: float, mode: str, rope_norm: float):
        self.patch_nums = tuple(patch_nums)
        self.head_dim = head_dim
        self.theta = theta
        self.mode = mode
        self.rope_norm = rope_norm
        self.interleaved = mode == "star"

    def text(self, pos_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return text_rope(pos_BT, self.head_dim, self.theta, self.interleaved)

    def image_positions(self, scale_indices: list[int], text_pos_BT: torch.Tensor) -> torch.Tensor:
        """(B, sum pn^2, 2) positions of the listed scales (indices into patch_nums)."""
        pns = tuple(self.patch_nums[i] for i in scale_indices)
        device = text_pos_BT.device
        if self.mode == "star":
            coords = star_scale_coords(pns, self.rope_norm, device)
            return coords.unsqueeze(0).expand(text_pos_BT.shape[0], -1, -1)
        coords = hart_scale_coords(pns, self.patch_nums[-1], device)
        # Image positions continue after the text: the last text position id is added to both axes.
        return coords.unsqueeze(0) + text_pos_BT[:, -1].view(-1, 1, 1)

    def image(self, pos_BL2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return image_rope(pos_BL2, self.head_dim, self.theta, self.interleaved)
