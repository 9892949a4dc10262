"""Tests of hart/config.py: presets, preset-or-mapping resolution, the configs' own validation, files.

Run: .venv/bin/pytest tests/hart/test_config.py -q
"""

from __future__ import annotations

import pytest

from configuration.loader import apply_overrides, config_from_dict, config_to_dict, read_config_file, replace
from hart.config import (
    PATCH_NUMS_256, PATCH_NUMS_1024, RELEASED_SCALE_LISTS, TOKENIZER_PRESETS, TRANSFORMER_PRESETS, TokenizerConfig,
    TransformerConfig, tokenizer_config, tokenizer_config_from_var, transformer_config,
)


def test_presets_have_the_released_shapes():
    var = TOKENIZER_PRESETS["var-d16-f16"]
    assert (var.ch, var.ch_mult, var.z_channels, var.vocab_size) == (160, (1, 1, 2, 2, 4), 32, 4096)
    assert var.patch_nums == PATCH_NUMS_256 and var.image_size() == 256 and var.num_tokens() == 680
    hart = TOKENIZER_PRESETS["hart-1024"]
    assert hart.patch_nums == PATCH_NUMS_1024 and hart.image_size() == 1024 and hart.num_tokens() == 9451
    tiny = TOKENIZER_PRESETS["tiny"]
    assert tiny.image_size() == 64 and tiny.downsample_factor() == 8
    assert TRANSFORMER_PRESETS["tiny"].patch_nums == tiny.patch_nums
    assert TRANSFORMER_PRESETS["hart-0.7b"].patch_nums == hart.patch_nums


def test_the_scale_list_has_one_owner():
    """The tokenizer config owns the scale list: the transformer's default is its default, the resolver
    copies a given tokenizer's, and a transformer mapping may not name one."""
    assert TransformerConfig().patch_nums == TokenizerConfig().patch_nums
    assert {side: scales[-1] * 16 for side, scales in RELEASED_SCALE_LISTS.items()} == {256: 256, 512: 512, 1024: 1024}
    lower = tokenizer_config({"preset": "hart-1024", "patch_nums": [1, 2, 3, 4, 6, 9, 13, 18, 24, 32]})
    config = transformer_config("hart-0.7b", lower)
    assert config.patch_nums == RELEASED_SCALE_LISTS[512] and config.depth == TRANSFORMER_PRESETS["hart-0.7b"].depth
    assert transformer_config({"preset": "tiny", "depth": 3}, lower).patch_nums == lower.patch_nums
    assert transformer_config("tiny") is TRANSFORMER_PRESETS["tiny"]  # no tokenizer: the preset's (its tokenizer preset's)
    with pytest.raises(ValueError, match=r"transformer.patch_nums: the scale list is the tokenizer config's"):
        transformer_config({"preset": "tiny", "patch_nums": [1, 2, 4]})


def test_yaml_and_toml_files_load_the_same(tmp_path):
    yaml_file = tmp_path / "tok.yaml"
    yaml_file.write_text("preset: tiny\nvocab_size: 64\npatch_nums: [1, 2, 4, 8]\n")
    toml_file = tmp_path / "tok.toml"
    toml_file.write_text('preset = "tiny"\nvocab_size = 64\npatch_nums = [1, 2, 4, 8]\n')
    from_yaml = tokenizer_config(read_config_file(yaml_file))
    from_toml = tokenizer_config(read_config_file(toml_file))
    assert from_yaml == from_toml
    assert from_yaml.vocab_size == 64 and from_yaml.patch_nums == (1, 2, 4, 8)
    assert from_yaml.ch == TOKENIZER_PRESETS["tiny"].ch  # untouched fields keep the preset's value


def test_unknown_and_badly_typed_fields_raise():
    with pytest.raises(ValueError, match="vocab_sise: unknown field; valid fields: .*vocab_size"):
        config_from_dict(TokenizerConfig, {"vocab_sise": 10})
    with pytest.raises(ValueError, match="vocab_size: Input should be a valid integer"):
        config_from_dict(TokenizerConfig, {"vocab_size": "4096"})
    with pytest.raises(ValueError, match="using_sa: Input should be a valid boolean"):
        config_from_dict(TokenizerConfig, {"using_sa": 1})
    with pytest.raises(ValueError, match=r"patch_nums\[1\]: Input should be a valid integer"):
        config_from_dict(TokenizerConfig, {"patch_nums": [1, 2.5, 4]})
    with pytest.raises(ValueError, match="unknown preset"):
        tokenizer_config("huge")
    with pytest.raises(ValueError, match="mlp_type"):
        transformer_config({"preset": "tiny", "mlp_type": "moe"})


def test_validation_in_post_init():
    with pytest.raises(ValueError, match="strictly increasing"):
        TokenizerConfig(patch_nums=(1, 4, 2))
    with pytest.raises(ValueError, match="multiples of norm_groups=32"):
        TokenizerConfig(ch=48)
    assert TokenizerConfig(ch=48, norm_groups=16).norm_groups == 16
    with pytest.raises(ValueError, match="norm_groups must be >= 1"):
        TokenizerConfig(norm_groups=0)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        TransformerConfig(embed_dim=100, num_heads=3)


def test_overrides_and_replace():
    data = apply_overrides({"tokenizer": {"preset": "tiny"}}, ["tokenizer.vocab_size=128", "tokenizer.patch_nums=[1,2,8]"])
    config = tokenizer_config(data["tokenizer"])
    assert config.vocab_size == 128 and config.patch_nums == (1, 2, 8)
    with pytest.raises(ValueError, match="key.subkey=value"):
        apply_overrides({}, ["novalue"])
    changed = replace(config, z_channels=8)
    assert changed.z_channels == 8 and changed.vocab_size == 128
    with pytest.raises(ValueError):
        replace(config, z_channels="eight")
    assert config_from_dict(TokenizerConfig, config_to_dict(config)) == config


def test_star_style_options_default_to_stars_released_constants_and_refuse_a_silent_combination():
    config = TransformerConfig(rope_mode="star")
    assert (config.rope_theta, config.rope_norm) == (10000.0, 64.0)  # STAR-T2I's released configs
    with pytest.raises(ValueError, match='rope_mode "star" needs attn_type "llama"'):
        TransformerConfig(rope_mode="star", attn_type="gpt2")
    with pytest.raises(ValueError, match="rope_norm and rope_theta must be > 0"):
        TransformerConfig(rope_mode="star", rope_norm=0.0)
    assert TransformerConfig(attn_type="gpt2").rope_mode == "hart"  # the default stays buildable


def test_a_tokenizer_config_from_vars_vqvae_arguments():
    # VAR's released tokenizer, as its trainer builds it: the var-d16-f16 preset.
    released = tokenizer_config_from_var(vocab_size=4096, z_channels=32, ch=160, test_mode=True, share_quant_resi=4,
                                         v_patch_nums=PATCH_NUMS_256)
    assert released == TOKENIZER_PRESETS["var-d16-f16"]
    assert tokenizer_config_from_var().ch == 128  # VQVAE's own default width
    with pytest.raises(ValueError, match=r"not arguments of VAR's VQVAE: \['ch_mult'\]"):
        tokenizer_config_from_var(ch_mult=(1, 2))
    with pytest.raises(ValueError, match="using_znorm"):
        tokenizer_config_from_var(using_znorm=True)
    with pytest.raises(ValueError, match="share_quant_resi=0"):
        tokenizer_config_from_var(share_quant_resi=0)
