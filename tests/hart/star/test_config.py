"""StarConfig: presets validate and resolve, bad values are refused, released parameter counts.

Run: PYTHONPATH=. python -m pytest tests/hart/star/test_config.py -q
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hart.config import RELEASED_SCALE_LISTS, tokenizer_config
from hart.star.config import STAR_PRESETS, star_config
from hart.star.model import STARForT2I


@pytest.mark.parametrize("name", sorted(STAR_PRESETS))
def test_presets_validate_and_resolve(name):
    preset = STAR_PRESETS[name]
    assert star_config(name) is preset
    assert star_config({"preset": name}) == preset
    assert dataclasses.replace(preset) == preset  # re-runs __post_init__


def test_released_presets_follow_build_vae_var():
    for name in ("star-d16-256", "star-d30-256", "star-d30-512", "star-d30-1024"):
        cfg = STAR_PRESETS[name]
        assert cfg.embed_dim == 64 * cfg.depth and cfg.num_heads == cfg.depth and cfg.head_dim() == 64
        assert (cfg.rope_theta, cfg.rope_norm, cfg.text_dim, cfg.vocab_size, cfg.token_dim) == (10000.0, 64.0, 1024, 4096, 32)
        assert cfg.attn_l2_norm and cfg.logit_norm and not cfg.cross_attn_batch0_quirk
    assert STAR_PRESETS["star-d30-512"].patch_nums == (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
    assert STAR_PRESETS["star-d30-1024"].patch_nums[-1] == 64 and len(STAR_PRESETS["star-d30-1024"].patch_nums) == 14


def test_the_scale_list_comes_from_the_tokenizer_config():
    tokenizer = tokenizer_config("hart-512")
    assert star_config("star-d30-1024", tokenizer).patch_nums == RELEASED_SCALE_LISTS[512]
    with pytest.raises(ValueError, match=r"star.patch_nums: the scale list is the tokenizer config's"):
        star_config({"preset": "tiny", "patch_nums": [1, 2, 4]})


@pytest.mark.parametrize("change", [
    {"embed_dim": 100, "num_heads": 3},  # not divisible
    {"embed_dim": 24, "num_heads": 4},  # head_dim 6: not a multiple of 4 (2-D RoPE)
    {"patch_nums": (2, 3)},  # must start at 1
    {"patch_nums": (1, 3, 2)},  # must increase
    {"cond_drop_rate": 1.5},
    {"drop_path_rate": 1.0},
    {"rope_norm": 0.0},
    {"rope_theta": -1.0},
    {"vocab_size": 1},
    {"depth": 0},
    {"num_classes": -1},
    {"depth": "two"},  # wrong type, through the loader
    {"no_such_field": 1},  # unknown field
])
def test_invalid_values_are_refused(change):
    with pytest.raises(ValueError):
        star_config({"preset": "tiny", **change})


def released_parameter_count(depth: int, num_scales: int) -> int:
    """Parameters of STAR-T2I's `VAR` as `build_vae_var` builds it (enable_adaptive_norm=False).

    Derived by hand from the layer shapes in the reference code, independently of our model:
    width C = 64 * depth, heads H = depth, text width 1024 (`in_dim_cross`), codebook V = 4096 of
    Cvae = 32, num_classes = 1000 (VAR's default), FFN hidden 4C.
    - `models/var_drop.py`: word_embed Linear(Cvae, C) = 32C + C; class_emb Embedding(1001, C);
      pos_start (1, 1, C); lvl_embed Embedding(S, C); encoder_proj Linear(1024, C) = 1024C + C;
      head_logits Linear(C, V) = CV + V; logit_norm LayerNorm without affine = 0.
    - `models/basic_var.py` per block: self-attn mat_qkv 3C*C (no bias) + q_bias C + v_bias C +
      scale_mul_1H11 H + proj C*C + C; cross-attn mat_kv 2C*1024 + mat_q C*C (no biases) + q_bias C +
      v_bias C + scale_mul_1H11 H + proj C*C + C; FFN fc1 4C*C + 4C, fc2 4C*C + C; ln_wo_grad
      non-affine = 0; zero_k_bias is a buffer, not a parameter.
    """
    C, H, V, Cvae, D = 64 * depth, depth, 4096, 32, 1024
    self_attn = 3 * C * C + C + C + H + C * C + C
    cross_attn = 2 * C * D + C * C + C + C + H + C * C + C
    ffn = 4 * C * C + 4 * C + 4 * C * C + C
    outside = (Cvae * C + C) + 1001 * C + C + num_scales * C + (D * C + C) + (C * V + V)
    return outside + depth * (self_attn + cross_attn + ffn)


@pytest.mark.parametrize("name, depth, expected", [
    ("star-d16-256", 16, 274_934_272),
    ("star-d30-256", 30, 1_678_731_016),
])
def test_parameter_counts_match_the_reference_shapes(name, depth, expected):
    assert released_parameter_count(depth, 10) == expected
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = STARForT2I(STAR_PRESETS[name])
    assert sum(p.numel() for p in model.parameters()) == expected
