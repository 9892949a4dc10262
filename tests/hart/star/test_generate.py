"""STAR's sampler on a tiny random STAR and the tiny VAR-style tokenizer: image shapes, seeds,
greedy decoding, the cached loop against the training forward, VAR's decode rule, and the released
row-0 cross-attention switch under guidance.

Run: PYTHONPATH=. python -m pytest tests/hart/star/test_generate.py -q
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from configuration.loader import replace
from hart.config import TOKENIZER_PRESETS
from hart.star.config import STAR_PRESETS
from hart.star.generate import cfg_batch, generate, sample
from hart.star.model import STARForT2I, TextFeatures
from hart.tokenizer.model import HybridTokenizer

TOKENIZER = TOKENIZER_PRESETS["tiny"]
# The tiny STAR resized to the tiny tokenizer: its scale list, codebook and code width.
CFG = replace(STAR_PRESETS["tiny"], patch_nums=TOKENIZER.patch_nums, vocab_size=TOKENIZER.vocab_size,
              token_dim=TOKENIZER.z_channels)
T = 6


def make_model(config=CFG, seed=0):
    torch.manual_seed(seed)
    model = STARForT2I(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-zero q/v biases so every parameter takes part
            if p.ndim == 1 and not p.any():
                p.normal_(0, 0.02)
        # A head with peaked distributions, so guidance and the text visibly move the samples.
        model.head_logits.weight.normal_(0, 0.3)
    return model


def make_text(B, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for row in range(B):
        mask[row, : 3 + row % (T - 2)] = True
    return TextFeatures(torch.randn(B, T, CFG.text_dim, generator=g), mask, torch.randn(B, CFG.text_dim, generator=g))


def make_null(seed=2):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, T, dtype=torch.bool)
    mask[0, :2] = True  # "" encodes to BOS, EOS, then pads
    return TextFeatures(torch.randn(1, T, CFG.text_dim, generator=g), mask, torch.randn(1, CFG.text_dim, generator=g))


class RowEncoder:
    """A text encoder over fixed features: prompt "i" is row i of `text`, "" is `null`."""

    def __init__(self, text: TextFeatures, null: TextFeatures):
        self.text, self.null = text, null

    def __call__(self, prompts):
        if list(prompts) == [""]:
            return self.null
        rows = torch.tensor([int(p) for p in prompts])
        return TextFeatures(self.text.tokens_BTD[rows], self.text.mask_BT[rows], self.text.pooled_BD[rows])


def encoder(B=2):
    return RowEncoder(make_text(B), make_null()), [str(i) for i in range(B)]


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    return make_model(), HybridTokenizer(TOKENIZER).eval()


def images(*args, **kwargs):
    return generate(*args, **kwargs).images_BRR3


def test_images_shape_dtype_and_seeds(parts):
    model, tokenizer = parts
    enc, prompts = encoder(2)
    a = images(model, tokenizer, enc, prompts, seed=5)
    side = TOKENIZER.patch_nums[-1] * 2 ** (len(TOKENIZER.ch_mult) - 1)
    assert isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.shape == (2, side, side, 3)
    assert np.array_equal(a, images(model, tokenizer, enc, prompts, seed=5))
    assert not np.array_equal(a, images(model, tokenizer, enc, prompts, seed=6))
    smooth = images(model, tokenizer, enc, prompts, seed=5, more_smooth=True)
    assert smooth.shape == a.shape and not np.array_equal(smooth, a)
    assert np.array_equal(smooth, images(model, tokenizer, enc, prompts, seed=5, more_smooth=True))
    chunked = generate(model, tokenizer, enc, prompts, seed=5, batch_size=1)
    assert len(chunked) == 2 and [t.shape[0] for t in chunked.tokens_Bl] == [2] * len(TOKENIZER.patch_nums)
    assert np.array_equal(chunked.images_BRR3, images(model, tokenizer, enc, prompts, seed=5, batch_size=1))


def test_top_k_1_is_greedy_whatever_the_seed(parts):
    model, tokenizer = parts
    text, null = make_text(2), make_null()

    def greedy(seed):
        generator = torch.Generator().manual_seed(seed)
        return sample(model, tokenizer.quantize, text, null, top_k=1, generator=generator).tokens_Bl

    assert all(torch.equal(a, b) for a, b in zip(greedy(1), greedy(2)))
    enc, prompts = encoder(2)
    assert np.array_equal(*[images(model, tokenizer, enc, prompts, top_k=1, seed=s) for s in (1, 2)])


def test_cached_loop_matches_the_training_forward(parts):
    model, tokenizer = parts
    text, null = make_text(2), make_null()
    both = cfg_batch(text, null)
    # First scale: the loop's logits are the training forward's position 0 (t = 0 there, the
    # conditional rows alone).
    tokens = sample(model, tokenizer.quantize, text, null, cfg=0.0, top_k=1).tokens_Bl
    tf = tokenizer.tokens_to_teacher_forcing_input(tokens)
    with torch.no_grad():
        _, first_2B1V = model.start_sampling(both.tokens_BTD, both.mask_BT, both.pooled_BD)
        full_BLV = model(text.tokens_BTD, text.mask_BT, text.pooled_BD, tf)
    torch.testing.assert_close(first_2B1V[:2], full_BLV[:, :1], rtol=0, atol=1e-5)
    # Every scale: greedy, unguided sampling picks the argmax of the training forward fed with
    # the sampled tokens (teacher forcing), so the cached loop and the forward agree throughout.
    offsets = model.grid.offsets
    for si, idx_Bl in enumerate(tokens):
        assert torch.equal(full_BLV[:, offsets[si]:offsets[si + 1]].argmax(-1), idx_Bl)


def test_latent_is_var_discrete_decode_of_the_tokens(parts):
    model, tokenizer = parts
    samples = sample(model, tokenizer.quantize, make_text(2), make_null(), generator=torch.Generator().manual_seed(3))
    f_hat, tokens = samples.f_hat_BCvHH, samples.tokens_Bl
    # Phi at every scale, the last included (VAR's rule), not HART's hybrid rule.
    torch.testing.assert_close(f_hat, tokenizer.tokens_to_latent(tokens), rtol=0, atol=1e-5)
    assert (f_hat - tokenizer.quantize.tokens_to_latent(tokens, hart_last=True)).abs().max() > 1e-4


def test_batch0_quirk_matters_only_under_guidance(parts):
    model, tokenizer = parts
    quirky = STARForT2I(replace(CFG, cross_attn_batch0_quirk=True)).eval()
    quirky.load_state_dict(model.state_dict())
    text, null = make_text(1), make_null()  # one prompt, as sample.py runs: the quirk reaches the null row only

    def tokens(m, cfg):
        return sample(m, tokenizer.quantize, text, null, cfg=cfg, generator=torch.Generator().manual_seed(4)).tokens_Bl

    # cfg 0: the unconditional rows do not enter the logits, so the quirk changes nothing.
    assert all(torch.equal(a, b) for a, b in zip(tokens(model, 0.0), tokens(quirky, 0.0)))
    # Real guidance: the null row's cross-attention differs, so the samples do after the 1x1 scale
    # (whose guidance weight is 0 at any cfg).
    per_row, released = tokens(model, 4.5), tokens(quirky, 4.5)
    assert torch.equal(per_row[0], released[0])
    assert sum(int((a != b).sum()) for a, b in zip(per_row, released)) > 0
    enc, prompts = encoder(2)
    with pytest.warns(UserWarning, match="prompt 0"):
        generate(quirky, tokenizer, enc, prompts, cfg=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one prompt per call, as sample.py runs: nothing to warn about
        generate(quirky, tokenizer, enc, prompts, cfg=0.0, batch_size=1)


def test_bad_inputs_are_refused(parts):
    model, tokenizer = parts
    text, null = make_text(2), make_null()
    enc, prompts = encoder(2)
    with pytest.raises(ValueError, match="do not match"):
        generate(model, HybridTokenizer(replace(TOKENIZER, vocab_size=128)), enc, prompts)
    with pytest.raises(ValueError, match="one row"):
        sample(model, tokenizer.quantize, text, text)
    with pytest.raises(ValueError, match="same token count"):
        generate(model, tokenizer, RowEncoder(text, TextFeatures(null.tokens_BTD[:, :4], null.mask_BT[:, :4],
                                                                 null.pooled_BD)), prompts)
    with pytest.raises(ValueError, match="TextFeatures"):
        generate(model, tokenizer, lambda p: (text.tokens_BTD, text.mask_BT), prompts)
    with pytest.raises(ValueError, match="non-empty list"):
        generate(model, tokenizer, enc, [])
    for bad in ({"top_k": -1}, {"top_k": (600, 300)}, {"top_p": 1.5}, {"cfg": -1.0}, {"batch_size": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            generate(model, tokenizer, enc, prompts, **bad)
