"""hart/star/objective.py: STAR's cross-entropy over every teacher-forced token, its metrics, CFG
dropout through the null condition, and that a tiny STAR learns one batch of real tokenizer tokens.

Run: .venv/bin/pytest tests/hart/star/test_objective.py -q
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from configuration.loader import replace
from hart.config import TOKENIZER_PRESETS
from hart.star.config import STAR_PRESETS
from hart.star.model import STARForT2I, TextFeatures
from hart.star.objective import star_losses
from hart.tokenizer.model import HybridTokenizer

TOKENIZER = TOKENIZER_PRESETS["tiny"]
CFG = replace(STAR_PRESETS["tiny"], patch_nums=TOKENIZER.patch_nums, vocab_size=TOKENIZER.vocab_size,
              token_dim=TOKENIZER.z_channels, cond_drop_rate=0.5)
T = 5


def text_features(B, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, :3] = True
    return TextFeatures(torch.randn(B, T, CFG.text_dim, generator=g), mask, torch.randn(B, CFG.text_dim, generator=g))


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    tokenizer = HybridTokenizer(TOKENIZER).eval()
    images = torch.rand(4, 3, TOKENIZER.image_size(), TOKENIZER.image_size(), generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        tokens, _ = tokenizer.encode(images)
    return tokenizer.quantize, tokens, text_features(4, seed=1)


def test_token_dropping_keeps_drop_scale_length_tokens_and_takes_the_ce_over_them(batch):
    quantizer, tokens, text = batch
    torch.manual_seed(0)
    model = STARForT2I(CFG).eval()
    grid = CFG.grid
    last_start, last_l = grid.offsets[-2], grid.token_counts[-1]
    kept = last_start + 10
    out = star_losses(model, quantizer, text, tokens, drop_scale_length=kept, generator=torch.Generator().manual_seed(5))
    keep_K = torch.rand(last_l, generator=torch.Generator().manual_seed(5)).argsort()[:10].sort().values  # the same draw
    with torch.no_grad():
        logits_BLV = model(text.tokens_BTD, text.mask_BT, text.pooled_BD,
                           quantizer.tokens_to_teacher_forcing_input(tokens), keep_last_K=keep_K)
    targets_BL = torch.cat([*tokens[:-1], tokens[-1][:, keep_K]], dim=1)
    assert logits_BLV.shape[1] == kept == targets_BL.shape[1]
    torch.testing.assert_close(out["ce"], F.cross_entropy(logits_BLV.flatten(0, 1), targets_BL.flatten()))
    correct = (logits_BLV.argmax(-1) == targets_BL).float()
    assert out[f"acc_scale_{grid.num_scales - 1}"] == pytest.approx(float(correct[:, last_start:].mean() * 100))
    other = star_losses(model, quantizer, text, tokens, drop_scale_length=kept, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(other["ce"], out["ce"])  # another step, another kept set
    every = star_losses(model, quantizer, text, tokens, drop_scale_length=grid.num_tokens)
    torch.testing.assert_close(every["ce"], star_losses(model, quantizer, text, tokens)["ce"], rtol=0, atol=0)
    for bad in (last_start, grid.num_tokens + 1):
        with pytest.raises(ValueError, match=rf"drop_scale_length must keep part of the last scale: in \({last_start}, "):
            star_losses(model, quantizer, text, tokens, drop_scale_length=bad)


def test_ce_is_the_token_mean_over_every_scale(batch):
    quantizer, tokens, text = batch
    torch.manual_seed(0)
    model = STARForT2I(CFG).eval()
    out = star_losses(model, quantizer, text, tokens)
    with torch.no_grad():
        logits_BLV = model(text.tokens_BTD, text.mask_BT, text.pooled_BD, quantizer.tokens_to_teacher_forcing_input(tokens))
    targets_BL = torch.cat(tokens, dim=1)
    assert logits_BLV.shape[1] == CFG.grid.num_tokens == targets_BL.shape[1]
    torch.testing.assert_close(out["ce"], F.cross_entropy(logits_BLV.flatten(0, 1), targets_BL.flatten()))
    smoothed = star_losses(model, quantizer, text, tokens, label_smoothing=0.1)["ce"]
    assert not torch.equal(smoothed, out["ce"])
    correct = (logits_BLV.argmax(-1) == targets_BL).float()
    assert out["acc_mean"] == pytest.approx(float(correct.mean() * 100))
    assert out["acc_tail"] == pytest.approx(float(correct[:, -CFG.grid.token_counts[-1]:].mean() * 100))
    assert {f"acc_scale_{si}" for si in range(CFG.grid.num_scales)} <= set(out)
    assert out["loss"].requires_grad and not out["ce"].requires_grad


def test_cfg_dropout_needs_the_null_condition_and_training_mode(batch):
    quantizer, tokens, text = batch
    torch.manual_seed(0)
    model = STARForT2I(CFG).train()
    null = text_features(1, seed=9)
    plain = star_losses(model, quantizer, text, tokens, generator=torch.Generator().manual_seed(0))["ce"]
    again = star_losses(model, quantizer, text, tokens, generator=torch.Generator().manual_seed(0))["ce"]
    dropped = star_losses(model, quantizer, text, tokens, null_condition=null, generator=torch.Generator().manual_seed(0))["ce"]
    assert torch.equal(plain, again) and not torch.equal(plain, dropped)  # rate 0.5: some of 4 rows swapped
    model.eval()
    assert torch.equal(star_losses(model, quantizer, text, tokens, null_condition=null)["ce"],
                       star_losses(model, quantizer, text, tokens)["ce"])


def test_one_batch_is_learned(batch):
    quantizer, tokens, text = batch
    torch.manual_seed(0)
    model = STARForT2I(replace(CFG, cond_drop_rate=0.0)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for step in range(25):
        out = star_losses(model, quantizer, text, tokens, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        history.append(float(out["ce"]))
    assert history[-1] < 0.6 * history[0], history


def test_bad_inputs_are_refused(batch):
    quantizer, tokens, text = batch
    model = STARForT2I(CFG)
    with pytest.raises(ValueError, match="expected 6 token scales"):
        star_losses(model, quantizer, text, tokens[:-1])
    with pytest.raises(ValueError, match="batch sizes differ"):
        star_losses(model, quantizer, text_features(3, seed=1), tokens)
    with pytest.raises(ValueError, match="label_smoothing"):
        star_losses(model, quantizer, text, tokens, label_smoothing=1.0)
