"""Tests of hart/transformer/checkpoint.py: the official `llm/` folder of HARTForT2I.

Covered: a bit-identical save/load round trip (weights, EMA, the derived `attn_bias_for_masking`),
strict loading of an official-style folder (HF config.json, pytorch_model.bin, the mask verified and
dropped), the config read off the weights when config.json is silent, and every refusal: a wrong
mask, missing/unexpected keys, a foreign model type, options not implemented, an EMA state that
does not match the model.

Run: .venv/bin/pytest tests/hart/transformer/test_checkpoint.py -q
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from configuration.loader import replace
from hart.config import TRANSFORMER_PRESETS
from hart.transformer.checkpoint import (
    MASK_KEY, check_mask, config_from_official, derived_mask_chunks, full_mask, infer_config_fields, read_transformer,
)
from hart.transformer.model import HARTForT2I
from hart.weights import load_weight_folder, save_weight_file

TINY = TRANSFORMER_PRESETS["tiny"]
L2NORM_AVGPOOL = replace(TINY, attn_l2_norm=True, sep_aln_pooling_mode="avg")


def test_save_load_bit_identical(tmp_path, make_transformer, make_transformer_batch):
    model = make_transformer(L2NORM_AVGPOOL)
    ema = {k: v.clone() + (0.01 if v.is_floating_point() and "zero_k_bias" not in k else 0) for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "llm", ema_state=ema)
    config_json = json.loads((tmp_path / "llm" / "config.json").read_text())
    assert config_json["model_type"] == "hart_transformer_t2i"
    loaded = HARTForT2I.from_pretrained(tmp_path / "llm")
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    ctx, mask, tf = make_transformer_batch()
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


def test_load_official_layout_strictly(tmp_path, make_transformer, make_transformer_batch):
    config = replace(TINY, attn_l2_norm=True)
    model = make_transformer(config)
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
    ctx, mask, tf = make_transformer_batch(config)
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


def test_config_fields_are_read_off_the_weights():
    """Depth, widths, vocabulary, scale list and variants come from the state dict alone."""
    for config in (replace(TINY, attn_l2_norm=True), replace(TINY, attn_type="gpt2", mlp_type="gpt2", mlp_ratio=2.0,
                                                              use_timestep_embed=False, use_cross_attn=True)):
        with torch.device("meta"):
            state = HARTForT2I(config).state_dict()
        fields = infer_config_fields(state)
        expected = {
            "embed_dim": config.embed_dim, "token_dim": config.token_dim, "context_dim": config.context_dim,
            "vocab_size": config.vocab_size, "depth": config.depth, "context_token": config.context_token,
            "patch_nums": config.patch_nums, "attn_l2_norm": config.attn_l2_norm, "attn_type": config.attn_type,
            "mlp_type": config.mlp_type, "use_timestep_embed": config.use_timestep_embed,
            "use_cross_attn": config.use_cross_attn, "use_context_norm": config.use_context_norm,
            "disable_aln": config.disable_aln, "diff_width": config.diff_width, "diff_depth": config.diff_depth,
        }
        assert {k: fields[k] for k in expected} == expected
        if config.mlp_type == "gpt2":
            assert fields["mlp_ratio"] == 2.0
        else:
            assert fields["num_heads"] == config.num_heads  # from scale_mul_1H11
    bad = {"lvl_1L": torch.tensor([[0, 0, 1, 2, 2, 2]])}  # three tokens cannot be a square scale
    with pytest.raises(ValueError, match="square scales"):
        infer_config_fields(bad)


def test_config_json_wins_and_foreign_options_are_refused():
    with torch.device("meta"):
        state = HARTForT2I(TINY).state_dict()
    with pytest.warns(UserWarning, match="assuming head_dim 64"):  # neither config.json nor the weights name it
        guessed = config_from_official({}, state)
    assert guessed.num_heads == TINY.embed_dim // 64
    config = config_from_official({"num_heads": 4, "num_sampling_steps": 8, "rope_theta": 500.0}, state)
    assert (config.num_heads, config.num_sampling_steps, config.rope_theta) == (4, "8", 500.0)
    with pytest.warns(UserWarning, match=r"not used by HARTForT2I: \['brand_new_field'\]"):
        config_from_official({"num_heads": 4, "brand_new_field": 1}, state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # official HF-only fields are ignored by name, silently
        config_from_official({"num_heads": 4, "transformers_version": "4.42.2", "drop_path_rate": 0.1}, state)
    with pytest.raises(ValueError, match="shared_aln"):
        config_from_official({"num_heads": 4, "shared_aln": True}, state)
    with pytest.raises(ValueError, match="sampler 'ddim'"):
        config_from_official({"num_heads": 4, "sampler": "ddim"}, state)


def test_mask_rule_chunks_and_refusals():
    levels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2])
    mask = full_mask(levels)
    allowed = levels[:, None] >= levels[None, :]
    assert torch.equal(mask[0, 0] == 0, allowed) and torch.isinf(mask[0, 0][~allowed]).all()
    rows = torch.cat([chunk for _, chunk in derived_mask_chunks(levels, rows=3)])  # chunked = whole
    assert torch.equal(rows, mask[0, 0])
    check_mask(mask, levels)
    with pytest.raises(ValueError, match=r"shape \(1, 1, 7, 7\), expected \(1, 1, 8, 8\)"):
        check_mask(mask[..., 1:, 1:], levels)
    wrong = mask.clone()
    wrong[0, 0, 6, 7] = 0.0  # a level-1 token seeing level 2
    with pytest.raises(ValueError, match=r"rows 0\.\."):
        check_mask(wrong, levels)


def test_folder_refusals(tmp_path, make_transformer):
    model = make_transformer()
    with pytest.raises(ValueError, match="EMA state"):
        model.save_pretrained(tmp_path / "llm", ema_state={k: v for k, v in model.state_dict().items() if k != "head.bias"})
    model.save_pretrained(tmp_path / "llm")
    assert MASK_KEY in load_weight_folder(tmp_path / "llm")
    with pytest.raises(ValueError, match="weight file not found"):
        read_transformer(tmp_path / "llm", ema=True)  # saved without EMA
    # An explicit config replaces the one read from the folder, and must then agree with the weights.
    with pytest.raises(ValueError, match="wrong shapes"):
        HARTForT2I.from_pretrained(tmp_path / "llm", config=replace(TINY, vocab_size=128))
    config_path = tmp_path / "llm" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama' is not 'hart_transformer_t2i'"):
        read_transformer(tmp_path / "llm")
