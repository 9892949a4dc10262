"""HART and STAR present one face: `sample` and `generate` of both families return
`hart.layers.sampling.Samples` with the same fields and types on the tiny presets, the guided
logits only on request (and asking for them changes no sample), `generate` is `sample` + decode
with the same seed, and the loaders have the same shape (`Model.from_pretrained(path, config=...)`).

Shape legend: B prompts, T text tokens, D text width, V vocabulary, R image side.

Run: PYTHONPATH=. python -m pytest tests/hart/test_families.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from configuration.loader import replace
from hart.config import TOKENIZER_PRESETS, TRANSFORMER_PRESETS
from hart.layers.sampling import Samples
from hart.star import generate as star_generate
from hart.star.config import STAR_PRESETS
from hart.star.checkpoint import save_star
from hart.star.model import STARForT2I, TextFeatures
from hart.tokenizer.model import HybridTokenizer
from hart.transformer import generate as hart_generate
from hart.transformer.model import HARTForT2I

TOKENIZER = TOKENIZER_PRESETS["tiny"]
HART = TRANSFORMER_PRESETS["tiny"]
STAR = replace(STAR_PRESETS["tiny"], patch_nums=TOKENIZER.patch_nums, vocab_size=TOKENIZER.vocab_size,
               token_dim=TOKENIZER.z_channels)
PROMPTS = ["a red cat", "a blue dog"]
SIDE = TOKENIZER.patch_nums[-1] * 2 ** (len(TOKENIZER.ch_mult) - 1)


def rows(prompts, T, D, salt):
    """Deterministic per-prompt features (T, D) and a mask with a prompt-dependent length."""
    features, masks = [], []
    for prompt in prompts:
        g = torch.Generator().manual_seed(sum(map(ord, prompt)) + salt)
        features.append(torch.randn(T, D, generator=g))
        mask = torch.zeros(T, dtype=torch.bool)
        mask[: 2 + len(prompt) % (T - 2)] = True
        masks.append(mask)
    return torch.stack(features), torch.stack(masks)


class HartEncoder:
    dim, max_length = HART.context_dim, HART.context_token

    def __call__(self, prompts):
        return rows(prompts, self.max_length, self.dim, 0)


class StarEncoder:
    def __call__(self, prompts):
        tokens_BTD, mask_BT = rows(prompts, 6, STAR.text_dim, 1)
        return TextFeatures(tokens_BTD, mask_BT, tokens_BTD.mean(dim=1))


@pytest.fixture(scope="module")
def families():
    torch.manual_seed(0)
    hart = HARTForT2I(HART)
    hart.init_weights()
    with torch.no_grad():  # a residual head with a real function
        for p in hart.diffloss.net.final_layer.parameters():
            p.normal_(0, 0.1)
    star = STARForT2I(STAR)
    with torch.no_grad():
        star.head_logits.weight.normal_(0, 0.3)
    tokenizer = HybridTokenizer(TOKENIZER).eval()
    return {"hart": (hart_generate, hart.eval(), HartEncoder()), "star": (star_generate, star.eval(), StarEncoder())}, tokenizer


def features(family, encoder, prompts):
    """What each family's `sample` takes after the model and quantizer: HART (features, mask), STAR (text, null)."""
    return encoder(prompts) if family == "hart" else (encoder(prompts), encoder([""]))


def check_fields(samples: Samples, B: int, images: bool, logits: bool) -> None:
    assert isinstance(samples, Samples) and len(samples) == B
    assert isinstance(samples.tokens_Bl, tuple) and len(samples.tokens_Bl) == len(TOKENIZER.patch_nums)
    for idx_Bl, pn in zip(samples.tokens_Bl, TOKENIZER.patch_nums):
        assert idx_Bl.dtype == torch.int64 and idx_Bl.shape == (B, pn * pn)
    assert samples.f_hat_BCvHH.dtype == torch.float32
    assert samples.f_hat_BCvHH.shape == (B, TOKENIZER.z_channels, TOKENIZER.patch_nums[-1], TOKENIZER.patch_nums[-1])
    if images:
        assert isinstance(samples.images_BRR3, np.ndarray) and samples.images_BRR3.dtype == np.uint8
        assert samples.images_BRR3.shape == (B, SIDE, SIDE, 3)
    else:
        assert samples.images_BRR3 is None
    if logits:
        assert len(samples.guided_logits_BlV) == len(TOKENIZER.patch_nums)
        for logits_BlV, pn in zip(samples.guided_logits_BlV, TOKENIZER.patch_nums):
            assert logits_BlV.dtype == torch.float32 and logits_BlV.shape == (B, pn * pn, TOKENIZER.vocab_size)
    else:
        assert samples.guided_logits_BlV is None


@pytest.mark.parametrize("family", ["hart", "star"])
def test_sample_and_generate_return_samples_with_the_same_fields(families, family):
    parts, tokenizer = families
    module, model, encoder = parts[family]
    plain = module.sample(model, tokenizer.quantize, *features(family, encoder, PROMPTS),
                          generator=torch.Generator().manual_seed(0))
    check_fields(plain, len(PROMPTS), images=False, logits=False)
    generated = module.generate(model, tokenizer, encoder, PROMPTS, seed=3)
    check_fields(generated, len(PROMPTS), images=True, logits=False)
    with_logits = module.generate(model, tokenizer, encoder, PROMPTS, seed=3, return_logits=True)
    check_fields(with_logits, len(PROMPTS), images=True, logits=True)
    # Asking for the logits changes no draw.
    assert np.array_equal(with_logits.images_BRR3, generated.images_BRR3)
    assert all(torch.equal(a, b) for a, b in zip(with_logits.tokens_Bl, generated.tokens_Bl))
    assert torch.equal(with_logits.f_hat_BCvHH, generated.f_hat_BCvHH)


@pytest.mark.parametrize("family", ["hart", "star"])
def test_generate_is_sample_then_decode_with_the_same_seed(families, family):
    parts, tokenizer = families
    module, model, encoder = parts[family]
    generated = module.generate(model, tokenizer, encoder, PROMPTS, seed=4, cfg=2.0)
    sampled = module.sample(model, tokenizer.quantize, *features(family, encoder, PROMPTS), cfg=2.0,
                            generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(a, b) for a, b in zip(generated.tokens_Bl, sampled.tokens_Bl))
    assert torch.equal(generated.f_hat_BCvHH, sampled.f_hat_BCvHH)
    from hart.pixels import to_uint8

    with torch.no_grad():
        assert np.array_equal(generated.images_BRR3, to_uint8(tokenizer.decode_latent(sampled.f_hat_BCvHH)))


@pytest.mark.parametrize("family", ["hart", "star"])
def test_guided_logits_are_the_ones_the_tokens_come_from(families, family):
    """top-k 1 is greedy: every token is the argmax of the guided logits returned for its scale."""
    parts, tokenizer = families
    module, model, encoder = parts[family]
    samples = module.sample(model, tokenizer.quantize, *features(family, encoder, PROMPTS), cfg=3.0, top_k=1,
                            return_logits=True, generator=torch.Generator().manual_seed(0))
    for idx_Bl, logits_BlV in zip(samples.tokens_Bl, samples.guided_logits_BlV):
        assert torch.equal(logits_BlV.argmax(dim=-1), idx_Bl)


@pytest.mark.parametrize("family", ["hart", "star"])
def test_batch_size_chunks_concatenate_in_order(families, family):
    parts, tokenizer = families
    module, model, encoder = parts[family]
    prompts = PROMPTS + ["a green bird"]
    chunked = module.generate(model, tokenizer, encoder, prompts, seed=2, batch_size=2, return_logits=True)
    check_fields(chunked, 3, images=True, logits=True)


def test_samples_refuse_images_of_another_batch_or_type():
    samples = Samples((torch.zeros(2, 1, dtype=torch.long),), torch.zeros(2, 4, 1, 1))
    with pytest.raises(ValueError, match="uint8"):
        samples.with_images(np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        samples.with_images(np.zeros((3, 8, 8, 3), dtype=np.uint8))
    assert Samples.concat([samples]) is samples
    with pytest.raises(ValueError, match="nothing"):
        Samples.concat([])


def test_both_families_load_with_from_pretrained(tmp_path):
    """`Model.from_pretrained(path, config=...)` in both families, each in its released layout; STAR's
    `save_pretrained` writes what `hart.star.checkpoint.save_star` writes."""
    star = STARForT2I(STAR)
    star.save_pretrained(tmp_path / "star.pth")
    save_star(star, tmp_path / "saved.pth")
    for loaded in (STARForT2I.from_pretrained(tmp_path / "star.pth"), STARForT2I.from_pretrained(tmp_path / "saved.pth")):
        assert loaded.config == STAR
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in star.state_dict().items())
    with pytest.raises(ValueError, match="patch_nums"):
        STARForT2I.from_pretrained(tmp_path / "star.pth", patch_nums=(1, 2, 3))
    hart = HARTForT2I(HART)
    hart.save_pretrained(tmp_path / "llm")
    assert HARTForT2I.from_pretrained(tmp_path / "llm", config=HART).config == HART
