"""HART's generate() and sample(): determinism, batching, CFG/diffusion paths, input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from configuration.loader import replace
from hart.config import TOKENIZER_PRESETS, TRANSFORMER_PRESETS
from hart.transformer.generate import generate, sample
from hart.tokenizer.model import HybridTokenizer
from hart.transformer.model import HARTForT2I

TINY = TRANSFORMER_PRESETS["tiny"]


class HashTextEncoder:
    """A deterministic stand-in text encoder for generation tests (real encoders: test_text_encoder.py)."""

    def __init__(self, dim=TINY.context_dim, max_length=TINY.context_token, extra_rows=0):
        self.dim, self.max_length, self.extra_rows = dim, max_length, extra_rows

    def __call__(self, prompts):
        rows = []
        for prompt in prompts:
            g = torch.Generator().manual_seed(sum(map(ord, prompt)))
            rows.append(torch.randn(self.max_length, self.dim, generator=g))
        features = torch.stack(rows + rows[: self.extra_rows])
        mask = torch.zeros(features.shape[:2], dtype=torch.bool)
        mask[:, :5] = True
        return features, mask


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    model = HARTForT2I(TINY)
    model.init_weights()
    with torch.no_grad():  # a head with a real function, so the diffusion residual is not ~0
        for p in model.diffloss.net.final_layer.parameters():
            p.normal_(0, 0.1)
    tokenizer = HybridTokenizer(TOKENIZER_PRESETS["tiny"]).eval()
    return model.eval(), tokenizer, HashTextEncoder()


def test_deterministic_for_a_seed_and_batched(parts):
    model, tokenizer, encoder = parts
    prompts = ["a red cat", "a blue dog", "a green bird"]
    a = generate(model, tokenizer, encoder, prompts, seed=5)
    b = generate(model, tokenizer, encoder, prompts, seed=5)
    c = generate(model, tokenizer, encoder, prompts, seed=6)
    assert len(a) == 3 and a.images_BRR3.shape == (3, 64, 64, 3) and a.images_BRR3.dtype == np.uint8
    assert np.array_equal(a.images_BRR3, b.images_BRR3)
    assert not np.array_equal(a.images_BRR3, c.images_BRR3)
    chunked = generate(model, tokenizer, encoder, prompts, seed=5, batch_size=2)
    assert len(chunked) == 3 and [t.shape[0] for t in chunked.tokens_Bl] == [3] * len(TINY.patch_nums)


def test_diffusion_residual_and_options_change_the_latent(parts):
    model, tokenizer, encoder = parts
    features, mask = encoder(["a red cat"])
    runs = {}
    for name, kwargs in {
        "full": {}, "discrete": {"use_diffusion": False}, "smooth": {"more_smooth": True}, "top_p": {"top_p": 0.5},
    }.items():
        samples = sample(model, tokenizer.quantize, features, mask, generator=torch.Generator().manual_seed(0), **kwargs)
        runs[name] = (samples.f_hat_BCvHH, samples.tokens_Bl)
    f_full, tokens_full = runs["full"]
    f_disc, tokens_disc = runs["discrete"]
    assert [t.shape[1] for t in tokens_full] == [pn * pn for pn in TINY.patch_nums]
    # same tokens (same random stream up to the last scale), the difference is the residual
    assert all(torch.equal(x, y) for x, y in zip(tokens_full, tokens_disc))
    residual = f_full - f_disc
    assert residual.abs().max() > 0 and residual.abs().max() <= 0.6 + 1e-5
    torch.testing.assert_close(f_disc, tokenizer.quantize.tokens_to_latent(tokens_disc, hart_last=True))
    assert not torch.equal(runs["smooth"][0], f_full) and not torch.equal(runs["top_p"][0], f_full)


def test_validation_errors(parts):
    model, tokenizer, encoder = parts
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, tokenizer, encoder, [])
    with pytest.raises(ValueError, match="string"):
        generate(model, tokenizer, encoder, ["ok", 3])
    other = HybridTokenizer(replace(TOKENIZER_PRESETS["tiny"], patch_nums=(1, 2, 4, 8)))
    with pytest.raises(ValueError, match="patch_nums"):
        generate(model, other, encoder, ["a cat"])
    with pytest.raises(ValueError, match="2 features .* 1 prompts"):
        generate(model, tokenizer, HashTextEncoder(extra_rows=1), ["a cat"])
    with pytest.raises(ValueError, match="context_dim"):
        generate(model, tokenizer, HashTextEncoder(dim=8), ["a cat"])
    with pytest.raises(ValueError, match="context_token"):
        generate(model, tokenizer, HashTextEncoder(max_length=4), ["a cat"])
    for bad in ({"top_k": -1}, {"top_k": (600, -1)}, {"top_p": 1.5}, {"cfg": -1.0}, {"batch_size": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            generate(model, tokenizer, encoder, ["a cat"], **bad)


def test_long_prompt_is_truncated_with_a_warning(parts):
    from hart.text_encoder import build_text_encoder

    model, tokenizer, _ = parts
    encoder = build_text_encoder("minilm", max_length=TINY.context_token)
    with pytest.warns(UserWarning, match="truncated"):
        images = generate(model, tokenizer, encoder, ["a very long prompt about a cat " * 5], seed=1)
    assert len(images) == 1


@pytest.mark.parametrize("head_cfg, expected", [(None, "token guidance"), (1.0, None), (2.0, 2.0)])
def test_head_cfg_sets_the_diffusion_heads_guidance(parts, head_cfg, expected, monkeypatch):
    """None keeps the released schedule (the last scale's token guidance); a number overrides it, 1.0 = unguided."""
    model, tokenizer, encoder = parts
    features, mask = encoder(["a red cat"])
    seen, head_sample = [], model.diffloss.sample

    def recording_sample(z_NZ, cfg=None, **kwargs):  # the real sampler, with its guidance argument recorded
        seen.append(cfg)
        return head_sample(z_NZ, cfg=cfg, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(model.diffloss, "sample", recording_sample)
        f_hat = sample(model, tokenizer.quantize, features, mask, cfg=3.0, head_cfg=head_cfg,
                       generator=torch.Generator().manual_seed(0)).f_hat_BCvHH
    S = len(TINY.patch_nums)
    token_guidance = 3.0 * (S - 2) / (S - 1)  # the last scale keeps the previous scale's ratio
    assert seen == [pytest.approx(token_guidance) if expected == "token guidance" else expected]
    unguided = sample(model, tokenizer.quantize, features, mask, cfg=3.0, head_cfg=1.0,
                      generator=torch.Generator().manual_seed(0)).f_hat_BCvHH
    assert torch.equal(f_hat, unguided) == (head_cfg == 1.0)
