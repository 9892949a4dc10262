"""hart/scale_grid.py: the numbers a scale list implies, and the one compatibility check.

The expected values are written out by hand from the released scale lists (not recomputed with
the module's own formulas)."""

from __future__ import annotations

import pytest
import torch

from configuration.loader import replace
from hart.config import PATCH_NUMS_1024, PATCH_NUMS_256, tokenizer_config, transformer_config
from hart.scale_grid import ScaleGrid, check_compatible, compatibility_problems


def test_released_lists():
    grid = ScaleGrid(PATCH_NUMS_256)  # 1, 2, 3, 4, 5, 6, 8, 10, 13, 16
    assert grid.num_scales == 10 and grid.side == 16 and grid.num_tokens == 680
    assert grid.token_counts[:4] == (1, 4, 9, 16) and grid.offsets[:5] == (0, 1, 5, 14, 30)
    assert grid.offsets[-2:] == (680 - 256, 680)
    assert grid.residual_shape(32) == (32, 16, 16)
    assert ScaleGrid(PATCH_NUMS_1024).num_tokens == 9451


def test_levels_and_split():
    grid = ScaleGrid((1, 2, 3))
    assert grid.levels() == [0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2]
    tokens_BL = torch.arange(2 * 14).reshape(2, 14)
    parts = grid.split(tokens_BL)
    assert [tuple(p.shape) for p in parts] == [(2, 1), (2, 4), (2, 9)]
    assert torch.equal(torch.cat(parts, dim=1), tokens_BL)
    with pytest.raises(ValueError, match="length 13"):
        grid.split(tokens_BL[:, :13])


@pytest.mark.parametrize("bad", [(1,), (2, 3), (1, 3, 3), (1, 4, 2)])
def test_bad_lists_are_refused(bad):
    with pytest.raises(ValueError, match="patch_nums"):
        ScaleGrid(bad)


def test_configs_read_their_grid():
    tokenizer, transformer = tokenizer_config("tiny"), transformer_config("tiny")
    assert tokenizer.num_tokens() == transformer.num_image_tokens() == 1 + 4 + 9 + 16 + 36 + 64
    assert transformer.seq_len() == transformer.context_token + 130 - 1


def test_one_check_names_every_mismatch():
    tokenizer, transformer = tokenizer_config("tiny"), transformer_config("tiny")
    check_compatible(transformer, tokenizer)  # the presets agree
    other = replace(tokenizer, patch_nums=(1, 2, 4, 8), vocab_size=512)
    cache = {"patch_nums": [1, 2, 3, 4, 6, 8], "tokenizer_config": {"vocab_size": 256, "z_channels": 8}}
    problems = compatibility_problems(transformer, other, cache)
    assert problems == [
        "patch_nums: tokenizer (1, 2, 4, 8), transformer (1, 2, 3, 4, 6, 8)",
        "vocabulary: tokenizer vocab_size 512, transformer vocab_size 256",
        "latent width: cache z_channels 8, transformer token_dim 16",
    ]
    with pytest.raises(ValueError, match="export do not match: patch_nums"):
        check_compatible(transformer, other, what="export")
