"""Tests of hart/training/start_weights.py: which weights a training stage starts from, and the strict
load that lets only the scale-derived buffers differ.

Covered: `read_start_weights` on every supported layout (a training checkpoint with and without EMA,
an official `llm/` folder with and without `ema_model.bin`, a `tokenizer/` folder, a single file, a
missing path), and `load_compatible_weights` on the transformer and the tokenizer: the same scale
list loads exactly, another one keeps the model's own `lvl_1L` / `ema_vocab_hit_SV`, and a
parameter that does not match is refused.

Run: .venv/bin/pytest tests/hart/training/test_start_weights.py -q
"""

from __future__ import annotations

import json

import pytest
import torch

from configuration.loader import replace
from hart.config import TOKENIZER_PRESETS, TRANSFORMER_PRESETS
from hart.tokenizer.discriminator import NLayerDiscriminator
from hart.tokenizer.model import HybridTokenizer
from hart.training.checkpoint import save_training_state
from hart.training.start_weights import load_compatible_weights, read_start_weights
from hart.weights import save_weight_file

TINY = TRANSFORMER_PRESETS["tiny"]
LONGER = replace(TINY, patch_nums=(1, 2, 3, 4, 6, 8, 10))  # one more scale: another lvl_1L and mask


def shifted(state, by=0.01):
    return {k: v + by if v.is_floating_point() else v for k, v in state.items()}


def same_state(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_training_checkpoint_prefers_its_ema(tmp_path):
    weights = {"w": torch.arange(3.0)}
    save_training_state(tmp_path / "with_ema", meta={"step": 1}, model=weights, ema=shifted(weights))
    save_training_state(tmp_path / "plain", meta={"step": 1}, model=weights)
    assert same_state(read_start_weights(tmp_path / "with_ema"), shifted(weights))
    assert same_state(read_start_weights(tmp_path / "plain"), weights)
    meta = tmp_path / "plain" / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "format_version": 99}))
    with pytest.raises(ValueError, match="newer"):
        read_start_weights(tmp_path / "plain")


def test_llm_folder_prefers_ema_model_bin(tmp_path, make_transformer):
    model = make_transformer()
    ema = shifted(model.state_dict())
    model.save_pretrained(tmp_path / "release" / "llm", ema_state=ema)
    model.save_pretrained(tmp_path / "plain" / "llm")
    start = read_start_weights(tmp_path / "release" / "llm")
    assert same_state({k: start[k] for k in ema}, ema) and "attn_bias_for_masking" in start
    plain = read_start_weights(tmp_path / "plain" / "llm")
    assert same_state({k: plain[k] for k in ema}, model.state_dict())


def test_tokenizer_folder_single_file_and_missing_path(tmp_path):
    torch.manual_seed(0)
    tokenizer = HybridTokenizer(TOKENIZER_PRESETS["tiny"])
    tokenizer.save_pretrained(tmp_path / "tokenizer", discriminator=NLayerDiscriminator(ndf=8))
    start = read_start_weights(tmp_path / "tokenizer")
    assert same_state(start, tokenizer.state_dict())  # `vae.` stripped, the discriminator left out
    save_weight_file(tokenizer.state_dict(), tmp_path / "vae.pth")
    assert same_state(read_start_weights(tmp_path / "vae.pth"), tokenizer.state_dict())
    with pytest.raises(ValueError, match="model.init_from not found: s3://bucket/run"):
        read_start_weights(tmp_path / "absent", "s3://bucket/run")


def test_transformer_start_from_another_scale_list(tmp_path, make_transformer):
    short = make_transformer()
    short.save_pretrained(tmp_path / "llm", ema_state=shifted(short.state_dict()))
    start = read_start_weights(tmp_path / "llm")  # with the 130-token model's attn_bias_for_masking

    same = make_transformer(seed=1)
    assert load_compatible_weights(same, start, "same scales") == []
    assert same_state(same.state_dict(), {k: v for k, v in start.items() if k != "attn_bias_for_masking"})

    longer = make_transformer(LONGER, seed=1)
    own_levels = longer.lvl_1L.clone()
    assert load_compatible_weights(longer, start, "another scale list") == ["lvl_1L"]
    assert torch.equal(longer.lvl_1L, own_levels) and longer.lvl_1L.shape[1] > short.lvl_1L.shape[1]
    params = {k: v for k, v in start.items() if k not in ("lvl_1L", "attn_bias_for_masking")}
    assert all(torch.equal(longer.state_dict()[k], v) for k, v in params.items())

    missing = {k: v for k, v in start.items() if k != "head.bias"}
    with pytest.raises(ValueError, match="missing keys.*head.bias"):
        load_compatible_weights(make_transformer(LONGER), missing, "incomplete")


def test_a_scale_list_with_the_same_token_count_keeps_its_own_levels(tmp_path, make_transformer):
    """(1,2,3,4,6,8) and (1,2,5,6,8) both have 130 tokens: equal shapes, other levels. The started
    model keeps its own levels, so it saves and reloads consistently."""
    start = read_start_weights(_saved(make_transformer(), tmp_path / "llm"))
    other = make_transformer(replace(TINY, patch_nums=(1, 2, 5, 6, 8)), seed=1)
    own_levels = other.lvl_1L.clone()
    assert own_levels.shape == start["lvl_1L"].shape and not torch.equal(own_levels, start["lvl_1L"])
    assert load_compatible_weights(other, start, "same length, other scales") == ["lvl_1L"]
    assert torch.equal(other.lvl_1L, own_levels)
    other.save_pretrained(tmp_path / "other")
    reloaded = type(other).from_pretrained(tmp_path / "other")
    assert reloaded.config.patch_nums == (1, 2, 5, 6, 8) and torch.equal(reloaded.lvl_1L, own_levels)


def _saved(model, folder):
    model.save_pretrained(folder)
    return folder


def test_tokenizer_start_rebuilds_the_usage_statistic():
    torch.manual_seed(0)
    source = HybridTokenizer(TOKENIZER_PRESETS["tiny"])
    source.quantize.ema_vocab_hit_SV.fill_(3.0)
    target = HybridTokenizer(replace(TOKENIZER_PRESETS["tiny"], patch_nums=(1, 2, 4, 8)))
    assert load_compatible_weights(target, source.state_dict(), "tokenizer start") == ["quantize.ema_vocab_hit_SV"]
    assert target.quantize.ema_vocab_hit_SV.shape[0] == 4 and target.quantize.ema_vocab_hit_SV.abs().sum() == 0
    assert torch.equal(target.decoder.conv_out.weight, source.decoder.conv_out.weight)
    wider = HybridTokenizer(replace(TOKENIZER_PRESETS["tiny"], z_channels=8))
    with pytest.raises(ValueError, match="wrong shapes"):
        load_compatible_weights(wider, source.state_dict(), "tokenizer start")


def test_a_star_release_file_is_a_start(tmp_path):
    """STAR's released .pth (a trainer dict) is read like any weight file, so model.init_from takes it."""
    from hart.star.checkpoint import save_star
    from hart.star.config import STAR_PRESETS
    from hart.star.model import STARForT2I

    torch.manual_seed(0)
    saved = STARForT2I(STAR_PRESETS["tiny"])
    save_star(saved, tmp_path / "star.pth")
    fresh = STARForT2I(STAR_PRESETS["tiny"])
    assert load_compatible_weights(fresh, read_start_weights(tmp_path / "star.pth"), "star release") == []
    assert same_state(fresh.state_dict(), saved.state_dict())
