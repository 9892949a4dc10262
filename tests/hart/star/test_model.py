"""STARForT2I on the tiny preset: RoPE positions, cross-attention masking and math, start token,
block causality, KV-cached sampling, CFG dropout, and the released row-0 cross-attention switch.

Run: PYTHONPATH=. python -m pytest tests/hart/star/test_model.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from configuration.loader import replace
from hart.layers.attention import TextCrossAttention, text_key_mask
from hart.layers.rope import star_scale_coords
from hart.star.config import STAR_PRESETS
from hart.star.model import STARForT2I, TextFeatures, drop_condition

CFG = STAR_PRESETS["tiny"]
B, T = 3, 6


def make_model(config=CFG, seed=0):
    torch.manual_seed(seed)
    model = STARForT2I(config).eval()
    with torch.no_grad():  # non-zero q/v biases so every parameter takes part
        for p in model.parameters():
            if p.ndim == 1 and not p.any():
                p.normal_(0, 0.02)
    return model


def make_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(B, T, CFG.text_dim, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 2:] = False
    pooled = torch.randn(B, CFG.text_dim, generator=g)
    tf = torch.randn(B, CFG.num_tokens() - 1, CFG.token_dim, generator=g)
    return text, mask, pooled, tf


def test_normalized_positions_span_zero_to_rope_norm_on_every_scale():
    coords = star_scale_coords(CFG.patch_nums, CFG.rope_norm)
    offsets = CFG.grid.offsets
    assert torch.equal(coords[0], torch.zeros(2))  # the 1x1 scale sits at the origin
    for si, pn in enumerate(CFG.patch_nums[1:], start=1):
        scale = coords[offsets[si]:offsets[si + 1]]
        for axis in range(2):
            assert scale[:, axis].min() == 0 and scale[:, axis].max() == CFG.rope_norm
        # row-major: column (x) varies fastest, in steps of rope_norm / (pn - 1)
        assert torch.allclose(scale[1, 1] - scale[0, 1], torch.tensor(CFG.rope_norm / (pn - 1)))


def test_rope_table_matches_the_star_formula():
    """Independent restatement of (docs/design/star.md, "Normalized RoPE"): x = t mod pn, y = t div pn,
    scaled by norm/(pn-1); angles [x*f, y*f] with f = theta^(-arange(0, hd, 4)/hd), applied to interleaved pairs."""
    model = make_model()
    hd = CFG.head_dim()
    freqs = 1.0 / CFG.rope_theta ** (torch.arange(0, hd, 4).float() / hd)
    angles = []
    for pn in CFG.patch_nums:
        t = torch.arange(pn * pn, dtype=torch.float32)
        x, y = t % pn, torch.div(t, pn, rounding_mode="floor")
        if pn > 1:
            x, y = x / (pn - 1) * CFG.rope_norm, y / (pn - 1) * CFG.rope_norm
        angles.append(torch.cat([torch.outer(x, freqs), torch.outer(y, freqs)], dim=-1))
    angles_LF = torch.cat(angles)  # one angle per complex pair (hd / 2)
    torch.testing.assert_close(model.rope_cos_1Ld[0, :, 0::2], angles_LF.cos())
    torch.testing.assert_close(model.rope_cos_1Ld[0, :, 1::2], angles_LF.cos())
    torch.testing.assert_close(model.rope_sin_1Ld[0, :, 0::2], angles_LF.sin())


def test_cross_attention_matches_its_definition():
    """LN-free check of `TextCrossAttention` against softmax(exp(s) * q^ . k^) v with pads masked."""
    torch.manual_seed(0)
    C, D, H = 16, 12, 2
    attn = TextCrossAttention(C, D, H, attn_l2_norm=True)
    with torch.no_grad():
        attn.q_bias.normal_(); attn.v_bias.normal_(); attn.scale_mul_1H11.copy_(torch.tensor([0.3, 9.0]).view(1, 2, 1, 1))
    x, text = torch.randn(2, 5, C), torch.randn(2, 4, D)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    q = (x @ attn.mat_q.weight.T + attn.q_bias).view(2, 5, H, 8).transpose(1, 2)
    kv = text @ attn.mat_kv.weight.T
    k = kv[..., :C].view(2, 4, H, 8).transpose(1, 2)
    v = (kv[..., C:] + attn.v_bias).view(2, 4, H, 8).transpose(1, 2)
    scale = torch.tensor([0.3, math.log(100)]).exp().view(1, 2, 1, 1)  # the second head is clamped at log 100
    logits = (q / q.norm(dim=-1, keepdim=True) * scale) @ (k / k.norm(dim=-1, keepdim=True)).transpose(-1, -2)
    logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    expected = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, C))
    torch.testing.assert_close(attn(x, text, text_key_mask(mask)), expected)


def test_cross_attention_ignores_padded_text_positions():
    model = make_model()
    text, mask, pooled, tf = make_inputs()
    with torch.no_grad():
        before = model(text, mask, pooled, tf)
        changed = text.clone()
        changed[~mask] = 100.0 * torch.randn(int((~mask).sum()), CFG.text_dim)
        after = model(changed, mask, pooled, tf)
        changed[0, 0] += 1.0  # a real token does matter
        real = model(changed, mask, pooled, tf)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    assert (real[0] - before[0]).abs().max() > 1e-4


def test_start_token_is_projected_pooled_text_plus_pos_start_plus_level_zero():
    model = make_model()
    text, mask, pooled, tf = make_inputs()
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    with torch.no_grad():
        model(text, mask, pooled, tf)
        expected = model.encoder_proj(pooled) + model.pos_start[0] + model.lvl_embed.weight[0]
        second_scale = model.word_embed(tf[:, :4]) + model.lvl_embed.weight[1]
    torch.testing.assert_close(seen["x"][:, 0], expected)
    torch.testing.assert_close(seen["x"][:, 1:5], second_scale)  # no text prefix: scale 2 follows at once


def test_logits_of_a_scale_ignore_later_scales():
    model = make_model()
    text, mask, pooled, tf = make_inputs()
    offsets = CFG.grid.offsets
    with torch.no_grad():
        before = model(text, mask, pooled, tf)
        for si in range(1, CFG.grid.num_scales):
            changed = tf.clone()
            changed[:, offsets[si] - 1:] = torch.randn_like(changed[:, offsets[si] - 1:])  # inputs of scales >= si
            after = model(text, mask, pooled, changed)
            torch.testing.assert_close(after[:, :offsets[si]], before[:, :offsets[si]], rtol=0, atol=1e-6)
            assert (after[:, offsets[si]:] - before[:, offsets[si]:]).abs().max() > 1e-4


def test_token_dropping_removes_the_dropped_last_scale_tokens_from_the_sequence():
    """keep_last_K: earlier scales are untouched, the kept tokens neither see the dropped ones nor move
    (their RoPE positions are their own), and keeping every token is the plain forward."""
    model = make_model()
    text, mask, pooled, tf = make_inputs()
    last_start, last_l = CFG.grid.offsets[-2], CFG.grid.token_counts[-1]
    kept = torch.tensor([1, 4, 6, 9, 15])
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda block, args, kwargs: seen.append((args[1], kwargs)),
                                              with_kwargs=True)
    with torch.no_grad():
        full = model(text, mask, pooled, tf)
        dropped = model(text, mask, pooled, tf, keep_last_K=kept)
        assert dropped.shape == (B, last_start + len(kept), CFG.vocab_size)
        torch.testing.assert_close(dropped[:, :last_start], full[:, :last_start], rtol=0, atol=1e-6)
        positions = torch.cat([torch.arange(last_start), last_start + kept])
        (cos, sin, _), kwargs = seen[-1]
        assert torch.equal(cos, model.rope_cos_1Ld[:, positions]) and torch.equal(sin, model.rope_sin_1Ld[:, positions])
        assert kwargs["segment_ends"][-1] == last_start + len(kept)
        others = torch.tensor([i for i in range(last_l) if i not in kept.tolist()])
        changed = tf.clone()
        changed[:, last_start - 1 + others] = torch.randn(B, len(others), CFG.token_dim)  # the dropped tokens' inputs
        torch.testing.assert_close(model(text, mask, pooled, changed, keep_last_K=kept), dropped, rtol=0, atol=0)
        changed[:, last_start - 1 + kept[2]] += 1.0  # a kept token's input reaches the kept logits
        assert (model(text, mask, pooled, changed, keep_last_K=kept)[:, last_start:] - dropped[:, last_start:]).abs().max() > 1e-4
        torch.testing.assert_close(model(text, mask, pooled, tf, keep_last_K=torch.arange(last_l)), full, rtol=0, atol=0)
        with pytest.raises(ValueError, match="keep_last_K must be 1-D with 1..16 indices"):
            model(text, mask, pooled, tf, keep_last_K=torch.arange(17))
        with pytest.raises(ValueError, match="keep_last_K must hold integer indices, got torch.bool"):
            model(text, mask, pooled, tf, keep_last_K=torch.arange(16) % 2 == 0)


def test_kv_cached_steps_reproduce_the_training_forward():
    model = make_model()
    text, mask, pooled, tf = make_inputs()
    offsets = CFG.grid.offsets
    with torch.no_grad():
        full = model(text, mask, pooled, tf)
        state, logits = model.start_sampling(text, mask, pooled)
        steps = [logits]
        for si in range(1, CFG.grid.num_scales):
            steps.append(model.sampling_step(si, tf[:, offsets[si] - 1:offsets[si + 1] - 1], state)[0])
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_cfg_dropout_replaces_the_text_with_the_null_condition():
    g = torch.Generator().manual_seed(0)
    text = TextFeatures(torch.randn(B, T, CFG.text_dim, generator=g), torch.ones(B, T, dtype=torch.bool),
                        torch.randn(B, CFG.text_dim, generator=g))
    null_mask = torch.zeros(1, T, dtype=torch.bool)
    null_mask[0, :2] = True  # "" encodes to BOS, EOS, then pads
    null = TextFeatures(torch.randn(1, T, CFG.text_dim, generator=g), null_mask, torch.randn(1, CFG.text_dim, generator=g))
    kept, drop = drop_condition(text, null, 0.0)
    assert not drop.any() and torch.equal(kept.tokens_BTD, text.tokens_BTD) and torch.equal(kept.mask_BT, text.mask_BT)
    dropped, drop = drop_condition(text, null, 1.0)
    assert drop.all()
    assert torch.equal(dropped.tokens_BTD, null.tokens_BTD.expand(B, -1, -1))
    assert torch.equal(dropped.mask_BT, null_mask.expand(B, -1))
    assert torch.equal(dropped.pooled_BD, null.pooled_BD.expand(B, -1))

    # Inside the model: in training mode with rate 1 every row sees the null condition; eval never drops.
    model = make_model(replace(CFG, cond_drop_rate=1.0))
    _, _, _, tf = make_inputs()
    with torch.no_grad():
        expected = model(dropped.tokens_BTD, dropped.mask_BT, dropped.pooled_BD, tf)
        unconditioned = model(text.tokens_BTD, text.mask_BT, text.pooled_BD, tf)
        model.train()
        trained = model(text.tokens_BTD, text.mask_BT, text.pooled_BD, tf, null_condition=null)
        model.eval()
        evaluated = model(text.tokens_BTD, text.mask_BT, text.pooled_BD, tf, null_condition=null)
    torch.testing.assert_close(trained, expected)
    torch.testing.assert_close(evaluated, unconditioned)


def test_batch0_quirk_changes_rows_after_the_first_only():
    model = make_model()
    quirky = STARForT2I(replace(CFG, cross_attn_batch0_quirk=True)).eval()
    quirky.load_state_dict(model.state_dict())
    text, mask, pooled, tf = make_inputs()
    with torch.no_grad():
        per_row, released = model(text, mask, pooled, tf), quirky(text, mask, pooled, tf)
    torch.testing.assert_close(released[0], per_row[0], rtol=0, atol=0)
    for row in range(1, B):
        assert (released[row] - per_row[row]).abs().max() > 1e-4
    # The switch is read at every forward: changing a built model's config takes effect, both ways.
    model.config = replace(model.config, cross_attn_batch0_quirk=True)
    with torch.no_grad():
        torch.testing.assert_close(model(text, mask, pooled, tf), released, rtol=0, atol=0)
    quirky.config = replace(quirky.config, cross_attn_batch0_quirk=False)
    with torch.no_grad():
        torch.testing.assert_close(quirky(text, mask, pooled, tf), per_row, rtol=0, atol=0)


def test_wrong_input_shapes_are_refused():
    model = make_model()
    text, mask, pooled, tf = make_inputs()
    with pytest.raises(ValueError, match="teacher-forcing input"):
        model(text, mask, pooled, tf[:, 1:])
    with pytest.raises(ValueError, match="text features"):
        model(text[..., 1:], mask, pooled, tf)
    with pytest.raises(ValueError, match="sampling_step takes scales"):
        model.sampling_step(0, tf[:, :1], None)


def test_pooled_at_eos_is_the_last_kept_position():
    """CLIP's pooled output is the final hidden state at the end-of-text token, the last position its
    mask keeps: cached features without the pooled vector give it back."""
    from hart.star.model import pooled_at_eos

    tokens_BTD = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    mask_BT = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    pooled_BD = pooled_at_eos(tokens_BTD, mask_BT)
    assert torch.equal(pooled_BD, torch.stack([tokens_BTD[0, 2], tokens_BTD[1, 4]]))
