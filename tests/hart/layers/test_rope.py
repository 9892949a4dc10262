"""Tests of hart/layers/rope.py: the HART 2-D RoPE (with its released pairing quirk), STAR's normalized
2-D RoPE and the 1-D text RoPE.

Covered: the tables against the spec written out per dimension, coordinates of every scale, the
rotation properties (norms kept, q.k depending only on the position offset) where the layout is a
rotation, and the positions `RopeBuilder` gives text and image tokens in both modes.

Run: .venv/bin/pytest tests/hart/layers/test_rope.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from hart.layers.rope import (
    RopeBuilder, apply_rope, hart_scale_coords, image_rope, rotate_pairs, star_scale_coords, text_positions, text_rope,
)


def spec_rope_2d(x, row, col, hd, theta=10000.0):
    """(docs/design/transformer.md, "2-D RoPE") written out per dimension: layout [row f, row f, col f, col f],
    dim j paired with j + hd/2."""
    q = hd // 4
    inv = [1.0 / theta ** (4 * i / hd) for i in range(q)]
    angle = [row * inv[j % q] if j < hd // 2 else col * inv[j % q] for j in range(hd)]
    out = torch.empty_like(x)
    for j in range(hd // 2):
        out[..., j] = x[..., j] * math.cos(angle[j]) - x[..., j + hd // 2] * math.sin(angle[j])
        out[..., j + hd // 2] = x[..., j + hd // 2] * math.cos(angle[j + hd // 2]) + x[..., j] * math.sin(angle[j + hd // 2])
    return out


def test_rope_2d_reproduces_spec_pairing_quirk():
    hd, pn_max = 16, 8
    coords = hart_scale_coords((2, 3), pn_max)
    assert coords[:4].tolist() == [[0, 0], [0, 4], [4, 0], [4, 4]]  # 2x2 scale: (i, j) / 2 * 8
    assert torch.allclose(coords[4 + 5], torch.tensor([8 / 3 * 1, 8 / 3 * 2]))  # 3x3 scale, (1, 2)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    pos_text = text_positions(mask)
    assert pos_text.tolist() == [[0, 1, 2, 3, 4, 4, 4, 4]]
    pos = coords.unsqueeze(0) + pos_text[:, -1].view(1, 1, 1)  # + last text position id (4)
    x = torch.randn(1, 1, pos.shape[1], hd, dtype=torch.float64)
    cos, sin = image_rope(pos, hd, 10000.0, interleaved=False)
    ours = apply_rope(x, cos.double(), sin.double(), interleaved=False)
    for i in range(pos.shape[1]):
        row, col = float(pos[0, i, 0]), float(pos[0, i, 1])
        torch.testing.assert_close(ours[0, 0, i], spec_rope_2d(x[0, 0, i], row, col, hd), atol=1e-6, rtol=1e-5)
    # the quirk: with row != col the map is not a rotation (norms change)
    i = 1  # (0, 4) + 4 -> row 4, col 8
    assert abs(float(ours[0, 0, i].norm() - x[0, 0, i].norm())) > 1e-4


def test_star_normalized_rope_values():
    coords = star_scale_coords((1, 2, 3), rope_norm=32.0)
    assert coords[0].tolist() == [0, 0]  # the 1x1 scale stays at the origin
    assert coords[1:5].tolist() == [[0, 0], [0, 32], [32, 0], [32, 32]]  # every scale spans [0, rope_norm]
    assert coords[5:].unique().tolist() == [0, 16, 32]
    hd, theta = 8, 100.0
    pos = coords.unsqueeze(0)
    x = torch.randn(1, 1, pos.shape[1], hd, dtype=torch.float64)
    cos, sin = image_rope(pos, hd, theta, interleaved=True)
    ours = apply_rope(x, cos.double(), sin.double(), interleaved=True)
    # STAR: freqs theta^-(arange(0, hd, 4)/hd); cis = [polar(x f), polar(y f)] on (even, odd) pairs
    freqs = 1.0 / theta ** (torch.arange(0, hd, 4, dtype=torch.float64) / hd)
    x_col, y_row = pos[0, :, 1:].double(), pos[0, :, :1].double()  # STAR: x = t mod pn, y = t div pn
    angles = torch.cat([x_col * freqs, y_row * freqs], dim=-1)
    expected = torch.view_as_real(torch.view_as_complex(x[0, 0].unflatten(-1, (-1, 2)).contiguous()) * torch.polar(torch.ones_like(angles), angles)).flatten(-2)
    torch.testing.assert_close(ours[0, 0], expected)


def rotate(x, cos, sin, interleaved):
    return apply_rope(x, cos.double(), sin.double(), interleaved)


def test_star_and_text_tables_are_rotations_that_see_only_offsets():
    """Where the layout pairs each dimension with one angle, RoPE is a rotation: norms are kept and
    the score between a rotated q and k depends on their positions only through the offset (up to the
    float32 tables)."""
    g = torch.Generator().manual_seed(0)
    hd, theta = 16, 100.0
    q, k = (torch.randn(1, 1, 1, hd, generator=g, dtype=torch.float64) for _ in range(2))

    def star(pos):
        cos, sin = image_rope(torch.tensor([[pos]], dtype=torch.float64), hd, theta, interleaved=True)
        return cos, sin

    def score(table, pos_q, pos_k, interleaved):
        return float((rotate(q, *table(pos_q), interleaved) * rotate(k, *table(pos_k), interleaved)).sum())

    base = score(star, (1.5, 3.0), (4.0, 0.5), True)
    assert math.isclose(base, score(star, (11.5, -2.0), (14.0, -4.5), True), rel_tol=1e-5)  # both moved by (10, -5)
    assert not math.isclose(base, score(star, (1.5, 3.0), (4.0, 1.5), True), rel_tol=1e-3)  # offset changed
    x = torch.randn(1, 1, 5, hd, generator=g, dtype=torch.float64)
    cos, sin = image_rope(torch.rand(1, 5, 2, generator=g, dtype=torch.float64) * 30, hd, theta, interleaved=True)
    torch.testing.assert_close(rotate(x, cos, sin, True).norm(dim=-1), x.norm(dim=-1))

    for interleaved in (False, True):  # text: HART's rotate_half layout and STAR's interleaved pairs
        def text(pos):
            return text_rope(torch.tensor([[pos]]), hd, theta, interleaved)

        base = score(text, 3, 7, interleaved)
        assert math.isclose(base, score(text, 20, 24, interleaved), rel_tol=1e-5)
        assert not math.isclose(base, score(text, 3, 8, interleaved), rel_tol=1e-3)
        cos, sin = text_rope(torch.arange(6)[None], hd, theta, interleaved)
        torch.testing.assert_close(rotate(x[:, :, :1].expand(1, 1, 6, hd), cos, sin, interleaved).norm(dim=-1),
                                   x[:, :, :1].norm(dim=-1).expand(1, 1, 6))


def test_hart_2d_table_is_a_rotation_on_the_diagonal_only():
    """The released layout pairs a row angle with a column angle (dims j, j + hd/2 for j < hd/4): with
    row == col both angles agree and the map is a rotation; off the diagonal it is not."""
    g = torch.Generator().manual_seed(1)
    hd = 16
    x = torch.randn(1, 1, 2, hd, generator=g, dtype=torch.float64)
    pos = torch.tensor([[[5.0, 5.0], [5.0, 9.0]]], dtype=torch.float64)
    out = rotate(x, *image_rope(pos, hd, 10000.0, interleaved=False), False)
    assert math.isclose(float(out[0, 0, 0].norm()), float(x[0, 0, 0].norm()), rel_tol=1e-6)  # fp32 tables
    assert abs(float(out[0, 0, 1].norm() - x[0, 0, 1].norm())) > 1e-4
    # the second half (j >= hd/4 paired with j + hd/2 >= 3hd/4) holds row with row and col with col
    cos, sin = image_rope(pos, hd, 10000.0, interleaved=False)
    assert torch.equal(cos[0, 1, hd // 4 : hd // 2], cos[0, 0, hd // 4 : hd // 2])  # row angle, same row 5
    assert not torch.equal(cos[0, 1, 3 * hd // 4 :], cos[0, 0, 3 * hd // 4 :])  # column angle, 9 vs 5


def test_rotate_pairs_is_a_quarter_turn_per_pair():
    x = torch.arange(1.0, 7.0)
    assert rotate_pairs(x).tolist() == [-2, 1, -4, 3, -6, 5]
    assert torch.equal(rotate_pairs(rotate_pairs(x)), -x)


def test_scale_coordinates_span_the_same_range_per_scale():
    patch_nums = (1, 2, 3, 4, 6, 8)
    star = star_scale_coords(patch_nums, rope_norm=16.0)
    hart = hart_scale_coords(patch_nums, pn_max=8)
    start = 0
    for pn in patch_nums:
        s, h = star[start : start + pn * pn], hart[start : start + pn * pn]
        start += pn * pn
        if pn > 1:  # STAR: every scale from 0 to rope_norm on both axes, evenly spaced
            assert s.min() == 0 and s.max() == 16.0
            assert torch.allclose(s[:, 1].unique().diff(), torch.full((pn - 1,), 16.0 / (pn - 1)))
        else:
            assert s.tolist() == [[0.0, 0.0]]
        # HART: (i, j) / pn * pn_max, so every scale starts at 0 and stays below pn_max
        assert h.min() == 0 and float(h.max()) == pytest.approx((pn - 1) / pn * 8)
        if pn > 1:  # row-major: (0, 1) then, after a row, (1, 0)
            assert h[1].tolist() == pytest.approx([0.0, 8 / pn]) and h[pn].tolist() == pytest.approx([8 / pn, 0.0])
    assert start == star.shape[0] == hart.shape[0]


def test_rope_builder_positions_per_mode():
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    pos_text = text_positions(mask)
    assert pos_text.tolist() == [[0, 1, 2, 3, 3, 3], [0, 1, 2, 3, 4, 5]]
    hart = RopeBuilder((1, 2, 4), head_dim=8, theta=10000.0, mode="hart", rope_norm=32.0)
    pos = hart.image_positions([1, 2], pos_text)
    assert pos.shape == (2, 4 + 16, 2)
    assert pos[0, 0].tolist() == [3, 3] and pos[1, 0].tolist() == [5, 5]  # offset by the last text id
    assert pos[0, 3].tolist() == [3 + 2, 3 + 2]  # 2x2 scale, (1, 1) / 2 * 4
    star = RopeBuilder((1, 2, 4), head_dim=8, theta=10000.0, mode="star", rope_norm=32.0)
    pos = star.image_positions([1, 2], pos_text)
    assert torch.equal(pos[0], pos[1]) and pos[0, 3].tolist() == [32, 32]  # no text offset in STAR
    assert not hart.interleaved and star.interleaved
    cos, sin = star.image(pos)
    assert cos.shape == sin.shape == (2, 20, 8)
    cos_t, _ = hart.text(pos_text)
    assert cos_t.shape == (2, 6, 8) and torch.equal(cos_t[0, 4], cos_t[0, 3])  # pads repeat the last id
