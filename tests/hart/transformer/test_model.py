"""HARTForT2I: sizes and key layout of the 0.7B preset, masks, attention paths, KV cache, subsampling.

The `llm/` folder is tested in test_checkpoint.py, RoPE tables in tests/hart/layers/test_rope.py, norms and
blocks in tests/hart/layers/test_blocks.py; the tiny model and batch are conftest fixtures.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from configuration.loader import replace
from hart.config import TRANSFORMER_PRESETS
from hart.layers.rope import apply_rope, text_positions
from hart.transformer.model import HARTForT2I

TSV = str(Path(__file__).resolve().parents[2] / "assets/reference/hart_llm_keys_d16_c1536.tsv")
TINY = TRANSFORMER_PRESETS["tiny"]
VARIANTS = {
    "tiny": TINY,
    "l2norm-avgpool": replace(TINY, attn_l2_norm=True, sep_aln_pooling_mode="avg"),
    "gpt2": replace(TINY, attn_type="gpt2", mlp_type="gpt2", use_timestep_embed=False),
    "star-crossattn": replace(TINY, rope_mode="star", rope_norm=16.0, use_cross_attn=True, use_context_norm=True),
}


def scale_bounds(config):
    """(start, end) of every scale in the logits sequence (logit i predicts image token i)."""
    bounds, start = [], 0
    for pn in config.patch_nums:
        bounds.append((start, start + pn * pn))
        start += pn * pn
    return bounds


def test_0p7b_preset_sizes_on_meta_device():
    with torch.device("meta"):
        model = HARTForT2I(TRANSFORMER_PRESETS["hart-0.7b"])
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.diffloss.parameters())
    assert round(total / 1e6, 1) == 732.5
    assert round(head / 1e6, 1) == 36.6


def test_0p7b_key_set_equals_reference_tsv():
    reference = {}
    with open(TSV) as fh:
        for line in fh:
            key, shape, _ = line.rstrip("\n").split("\t")
            reference[key] = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
    with torch.device("meta"):
        model = HARTForT2I(TRANSFORMER_PRESETS["hart-0.7b"])
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    L = model.lvl_1L.shape[1]
    ours["attn_bias_for_masking"] = (1, 1, L, L)  # written on save, derived on load (documented rule)
    assert set(ours) == set(reference)
    assert {k: ours[k] for k in reference} == reference


@pytest.mark.parametrize("name", list(VARIANTS))
def test_block_causal_mask(name, make_transformer, make_transformer_batch):
    config = VARIANTS[name]
    model = make_transformer(config)
    ctx, mask, tf = make_transformer_batch(config)
    base = model(ctx, mask, tf)
    bounds = scale_bounds(config)
    for changed in (2, len(config.patch_nums) - 1):
        # teacher forcing input position p feeds image token p + 1
        start, end = bounds[changed]
        tf2 = tf.clone()
        tf2[:, start - 1 : end - 1] += torch.randn_like(tf2[:, start - 1 : end - 1])
        out = model(ctx, mask, tf2)
        assert torch.equal(out[:, :start], base[:, :start]), "an earlier scale saw a later one"
        assert not torch.allclose(out[:, start:end], base[:, start:end]), "a scale ignored its own input"
    ctx2 = ctx.clone()
    ctx2[:, 3] += 1.0
    assert not torch.allclose(model(ctx2, mask, tf)[:, 0], base[:, 0]), "the first scale ignored the text"


def test_segment_attention_equals_dense_mask(make_transformer):
    model = make_transformer()
    attn = model.blocks[0].attn
    levels = model.lvl_1L[0]
    L = levels.shape[0]
    x = torch.randn(2, L, TINY.embed_dim)
    allowed = levels[:, None] >= levels[None, :]
    ends = [int((levels <= lv).sum()) for lv in range(int(levels.max()) + 1)]
    pos = text_positions(torch.ones(2, TINY.context_token, dtype=torch.bool))
    rope_t = model.rope.text(pos)
    rope_i = model.rope.image(model.rope.image_positions(list(range(1, len(TINY.patch_nums))), pos))
    rope = (torch.cat([rope_t[0], rope_i[0]], 1), torch.cat([rope_t[1], rope_i[1]], 1), False)
    with torch.no_grad():
        fast = attn(x, rope, segment_ends=ends)
        dense = attn(x, rope, attn_mask=allowed)
    torch.testing.assert_close(fast, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("autocast", [False, True])
def test_segment_attention_gradients_equal_plain_slicing(autocast):
    """Gradients are bit-identical to autograd over plain slices (also under bf16 autocast, with q and k
    in fp32 and v in bf16 as attn_l2_norm leaves them), and match the dense mask."""
    from hart.layers.attention import segmented_attention

    ends = [16, 17, 21, 30, 46, 82, 105]  # text, then scales; the last segment is a subsampled one
    q, k = (torch.randn(3, 4, ends[-1], 8, requires_grad=True) for _ in range(2))
    v = torch.randn(3, 4, ends[-1], 8, dtype=torch.bfloat16 if autocast else torch.float32, requires_grad=True)
    grad_out = torch.randn(3, 4, ends[-1], 8)

    def grads(attend):
        q.grad = k.grad = v.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = attend()
        out.backward(grad_out.to(out.dtype))
        return [t.grad.clone() for t in (q, k, v)]

    def sliced():
        outs, start = [], 0
        for end in ends:
            outs.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end], scale=0.3))
            start = end
        return torch.cat(outs, dim=2)

    levels = torch.repeat_interleave(torch.arange(len(ends)), torch.tensor([ends[0], *torch.tensor(ends).diff()]))
    allowed = levels[:, None] >= levels[None, :]
    fast = grads(lambda: segmented_attention(q, k, v, ends, 0.3))
    assert [g.dtype for g in fast] == [q.dtype, k.dtype, v.dtype]
    for name, a, b in zip("qkv", fast, grads(sliced)):
        assert torch.equal(a, b), f"d{name} differs from plain slicing"
    tolerance = 2e-2 if autocast else 1e-5
    for a, b in zip(fast, grads(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.3))):
        torch.testing.assert_close(a, b, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("name", ["tiny", "gpt2", "star-crossattn"])
def test_kv_cache_sampling_matches_full_forward(name, make_transformer, make_transformer_batch):
    config = VARIANTS[name]
    model = make_transformer(config)
    ctx, mask, tf = make_transformer_batch(config)
    with torch.no_grad():
        full = model(ctx, mask, tf)
        state, first = model.start_sampling(ctx, mask)
        steps = [first]
        bounds = scale_bounds(config)
        for si in range(1, len(config.patch_nums)):
            start, end = bounds[si]
            logits, _ = model.sampling_step(si, tf[:, start - 1 : end - 1], state)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=1e-5)


def test_static_kv_cache_is_bit_identical_to_concatenation(make_transformer, make_transformer_batch):
    from hart.layers.attention import KVCache

    model = make_transformer()
    ctx, mask, tf = make_transformer_batch()
    runs = {}
    with torch.no_grad():
        for static in (False, True):
            state, first = model.start_sampling(ctx, mask, static_cache=static)
            steps = [first]
            for si, (start, end) in enumerate(scale_bounds(TINY)[1:], start=1):
                steps.append(model.sampling_step(si, tf[:, start - 1 : end - 1], state)[0])
            runs[static] = torch.cat(steps, 1)
            assert state.caches[0].length == TINY.seq_len()
    assert torch.equal(runs[True], runs[False])
    cache = KVCache(capacity=4)
    cache.append(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))
    with pytest.raises(ValueError, match="overflows"):
        cache.append(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))


def test_subsampled_forward_matches_full_on_kept_tokens(make_transformer, make_transformer_batch):
    model = make_transformer()
    ctx, mask, tf = make_transformer_batch()
    last = TINY.patch_nums[-1] ** 2
    keep = torch.stack([torch.arange(0, last, 2), torch.arange(1, last, 2)])
    with torch.no_grad():
        full = model(ctx, mask, tf)
        sub = model(ctx, mask, tf, keep_last_Bk=keep)
    n_prev = full.shape[1] - last
    torch.testing.assert_close(sub[:, :n_prev], full[:, :n_prev])
    # kept last-scale tokens attend to each other only, so their logits change but stay finite
    assert sub.shape[1] == n_prev + keep.shape[1] and torch.isfinite(sub).all()


def test_gradient_checkpointing_gives_the_same_gradients(make_transformer, make_transformer_batch):
    import copy

    from hart.training.parallelize import apply_activation_checkpointing

    model = make_transformer()
    model.train()
    checkpointed = copy.deepcopy(model)
    assert apply_activation_checkpointing(checkpointed) == len(model.blocks)
    ctx, mask, tf = make_transformer_batch()
    grads = []
    for m in (model, checkpointed):
        m(ctx, mask, tf).square().mean().backward()
        grads.append(m.blocks[0].attn.proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_project_qkv_normalises_rotates_and_casts_q_and_k_once_under_autocast():
    """q and k leave `project_qkv` in v's dtype (bf16 under autocast), each normalised and rotated as
    separately, with k at q's precision: the scaled q is fp32, and k rides in the same tensor."""
    from hart.layers.attention import SelfAttention

    torch.manual_seed(0)
    attn = SelfAttention(64, 4, attn_l2_norm=True)
    with torch.no_grad():
        attn.scale_mul_1H11.uniform_(-1, 1)
    x = torch.randn(2, 9, 64)
    cos, sin = torch.randn(2, 9, 16), torch.randn(2, 9, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = attn.project_qkv(x, (cos, sin, False))
        qkv = torch.nn.functional.linear(x, attn.qkv_proj.weight, torch.cat([attn.q_bias, attn.zero_k_bias, attn.v_bias]))
        q_ref, k_ref, _ = qkv.view(2, 9, 3, 4, 16).permute(2, 0, 3, 1, 4).unbind(0)
        scale = attn.scale_mul_1H11.clamp(max=attn.max_scale_mul).exp()
        q_ref = apply_rope(F.normalize(q_ref, dim=-1) * scale, cos, sin, False)
        k_ref = apply_rope(F.normalize(k_ref, dim=-1).float(), cos, sin, False)
    assert q.dtype == k.dtype == v.dtype == torch.bfloat16
    assert torch.equal(q, q_ref.bfloat16()) and torch.equal(k, k_ref.bfloat16())
