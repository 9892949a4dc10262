"""HARTForT2I: sizes and key layout of the 0.7B preset, masks, RoPE quirk, KV cache, checkpoints."""

from __future__ import annotations

import json
import math

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from configuration.loader import replace
from hart.config import TRANSFORMER_PRESETS
from hart.layers.rope import apply_rope, hart_scale_coords, image_rope, text_positions
from hart.transformer.model import HARTForT2I
from hart.weights import load_weight_folder, save_weight_file

TSV = str(Path(__file__).resolve().parents[2] / "assets/reference/hart_llm_keys_d16_c1536.tsv")
TINY = TRANSFORMER_PRESETS["tiny"]
VARIANTS = {
    "tiny": TINY,
    "l2norm-avgpool": replace(TINY, attn_l2_norm=True, sep_aln_pooling_mode="avg"),
    "gpt2": replace(TINY, attn_type="gpt2", mlp_type="gpt2", use_timestep_embed=False),
    "star-crossattn": replace(TINY, rope_mode="star", rope_norm=16.0, use_cross_attn=True, use_context_norm=True),
}


def make_model(config=TINY, seed=0) -> HARTForT2I:
    torch.manual_seed(seed)
    model = HARTForT2I(config)
    model.init_weights()
    # Non-trivial gammas/biases so every path contributes to the outputs.
    with torch.no_grad():
        for block in model.blocks:
            if hasattr(block, "ada_lin"):
                block.ada_lin[-1].bias.normal_(0, 0.3)
            block.attn.q_bias.normal_(0, 0.1)
            if block.cross_attn is not None:
                block.cross_attn.proj.weight.normal_(0, 0.05)
    return model.eval()


def make_batch(config=TINY, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(B, config.context_token, config.context_dim, generator=g)
    mask = torch.ones(B, config.context_token, dtype=torch.bool)
    mask[1, 5:] = False  # right padding
    tf = torch.randn(B, config.num_image_tokens() - 1, config.token_dim, generator=g)
    return ctx, mask, tf


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
def test_block_causal_mask(name):
    config = VARIANTS[name]
    model = make_model(config)
    ctx, mask, tf = make_batch(config)
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


def test_segment_attention_equals_dense_mask():
    model = make_model()
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
def test_kv_cache_sampling_matches_full_forward(name):
    config = VARIANTS[name]
    model = make_model(config)
    ctx, mask, tf = make_batch(config)
    with torch.no_grad():
        full = model(ctx, mask, tf)
        cond, caches, first = model.start_sampling(ctx, mask)
        steps = [first]
        bounds = scale_bounds(config)
        for si in range(1, len(config.patch_nums)):
            start, end = bounds[si]
            logits, _ = model.sampling_step(si, tf[:, start - 1 : end - 1], cond, caches)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=1e-5)


def test_static_kv_cache_is_bit_identical_to_concatenation():
    from hart.layers.attention import KVCache

    model = make_model()
    ctx, mask, tf = make_batch()
    runs = {}
    with torch.no_grad():
        for static in (False, True):
            cond, caches, first = model.start_sampling(ctx, mask, static_cache=static)
            steps = [first]
            for si, (start, end) in enumerate(scale_bounds(TINY)[1:], start=1):
                steps.append(model.sampling_step(si, tf[:, start - 1 : end - 1], cond, caches)[0])
            runs[static] = torch.cat(steps, 1)
            assert caches[0].length == TINY.seq_len()
    assert torch.equal(runs[True], runs[False])
    cache = KVCache(capacity=4)
    cache.append(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))
    with pytest.raises(ValueError, match="overflows"):
        cache.append(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))


def test_subsampled_forward_matches_full_on_kept_tokens():
    model = make_model()
    ctx, mask, tf = make_batch()
    last = TINY.patch_nums[-1] ** 2
    keep = torch.stack([torch.arange(0, last, 2), torch.arange(1, last, 2)])
    with torch.no_grad():
        full = model(ctx, mask, tf)
        sub = model(ctx, mask, tf, keep_last_Bk=keep)
    n_prev = full.shape[1] - last
    torch.testing.assert_close(sub[:, :n_prev], full[:, :n_prev])
    # kept last-scale tokens attend to each other only, so their logits change but stay finite
    assert sub.shape[1] == n_prev + keep.shape[1] and torch.isfinite(sub).all()


def spec_rope_2d(x, row, col, hd, theta=10000.0):
    """HART_SPEC §2.2 written out per dimension: layout [row f, row f, col f, col f], dim j paired with j + hd/2."""
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


def test_save_load_bit_identical(tmp_path):
    model = make_model(VARIANTS["l2norm-avgpool"])
    ema = {k: v.clone() + (0.01 if v.is_floating_point() and "zero_k_bias" not in k else 0) for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "llm", ema_state=ema)
    config_json = json.loads((tmp_path / "llm" / "config.json").read_text())
    assert config_json["model_type"] == "hart_transformer_t2i"
    loaded = HARTForT2I.from_pretrained(tmp_path / "llm")
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    ctx, mask, tf = make_batch()
    assert torch.equal(loaded.eval()(ctx, mask, tf), model(ctx, mask, tf))
    loaded_ema = HARTForT2I.from_pretrained(tmp_path / "llm", ema=True)
    for key, value in ema.items():
        assert torch.equal(loaded_ema.state_dict()[key], value), key
    saved = load_weight_folder(tmp_path / "llm")
    levels = model.lvl_1L[0]
    dense = torch.where(levels[:, None] >= levels[None, :], 0.0, -torch.inf)
    assert torch.equal(saved["attn_bias_for_masking"][0, 0], dense)


def official_state(model):
    """The state dict as the released code lays it out, mask buffer built independently."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    d = model.lvl_1L.view(1, -1, 1)
    state["attn_bias_for_masking"] = torch.where(d >= d.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, d.shape[1], d.shape[1])
    return state


def test_load_official_layout_strictly(tmp_path):
    config = replace(TINY, attn_l2_norm=True)
    model = make_model(config)
    folder = tmp_path / "llm"
    folder.mkdir()
    # An official-style config.json: HF fields and fields we ignore; depth/widths come from the weights.
    (folder / "config.json").write_text(json.dumps({
        "model_type": "hart_transformer_t2i", "architectures": ["HARTForT2I"], "num_heads": config.num_heads,
        "mlp_type": "llama", "attn_type": "llama", "use_timestep_embed": True, "sep_aln_pooling_mode": "max",
        "diffusion_batch_mul": config.diffusion_batch_mul, "num_sampling_steps": "8", "drop_path_rate": 0.0,
        "flash_if_available": True, "vae_path": None, "transformers_version": "4.42.2",
    }))
    state = official_state(model)
    save_weight_file(state, folder / "pytorch_model.bin")
    torch.save(state, folder / "ema_model.bin")
    loaded = HARTForT2I.from_pretrained(folder)
    assert (loaded.config.depth, loaded.config.embed_dim, loaded.config.patch_nums) == (config.depth, config.embed_dim, config.patch_nums)
    assert loaded.config.attn_l2_norm and loaded.config.vocab_size == config.vocab_size
    ctx, mask, tf = make_batch(config)
    assert torch.equal(loaded.eval()(ctx, mask, tf), model(ctx, mask, tf))
    HARTForT2I.from_pretrained(folder, ema=True)

    bad = dict(state)
    bad["attn_bias_for_masking"] = bad["attn_bias_for_masking"].clone()
    bad["attn_bias_for_masking"][0, 0, 0, -1] = 0.0  # a text token seeing the last scale
    save_weight_file(bad, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="attn_bias_for_masking"):
        HARTForT2I.from_pretrained(folder)
    bad = {k: v for k, v in state.items() if k != "head.bias"}
    bad["head.extra"] = torch.zeros(1)
    save_weight_file(bad, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="missing keys .*head.bias.*unexpected keys .*head.extra"):
        HARTForT2I.from_pretrained(folder)
    with pytest.raises(ValueError, match="not found"):
        HARTForT2I.from_pretrained(tmp_path / "nope")


def test_star_normalized_rope_values():
    from hart.layers.rope import star_scale_coords

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


def test_gradient_checkpointing_gives_the_same_gradients():
    import copy

    from hart.training.parallelize import apply_activation_checkpointing

    model = make_model()
    model.train()
    checkpointed = copy.deepcopy(model)
    assert apply_activation_checkpointing(checkpointed) == len(model.blocks)
    ctx, mask, tf = make_batch()
    grads = []
    for m in (model, checkpointed):
        m(ctx, mask, tf).square().mean().backward()
        grads.append(m.blocks[0].attn.proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


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
