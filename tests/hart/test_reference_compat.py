"""Saved folders say whether the reference implementation can build them (hart/reference_compat.py).

The reference fixes some values in code (tokenizer: 2 resnet blocks per level, attention blocks,
32 GroupNorm groups; transformer: RoPE base 10000 and HART's 2-D RoPE, residual scale 0.6). A
folder whose config departs from them gets a note next to config.json and a console warning that
name each field with the reference value; a released-preset folder gets neither.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from configuration.loader import replace
from hart.config import TOKENIZER_PRESETS, TRANSFORMER_PRESETS, tokenizer_config
from hart.tokenizer.discriminator import NLayerDiscriminator
from hart.reference_compat import NOTE_FILE, ReferenceCompatibilityWarning
from hart.tokenizer.model import HybridTokenizer
from hart.tokenizer.model import reference_differences as tokenizer_differences
from hart.transformer.model import HARTForT2I
from hart.transformer.checkpoint import reference_differences as transformer_differences
from demo.config import demo_tokenizer

# The demo's tokenizer: the shallowest net, one norm group.
DEMO_TOKENIZER = tokenizer_config(demo_tokenizer())
# Small enough to save in a test, built with every value the reference fixes.
REFERENCE_SHAPED_TOKENIZER = replace(TOKENIZER_PRESETS["tiny"], num_res_blocks=2, norm_groups=32, ch_mult=(1, 2, 2, 2))


def test_released_presets_are_reference_buildable_and_tiny_ones_are_not():
    for name in ("var-d16-f16", "hart-512", "hart-1024"):
        assert tokenizer_differences(TOKENIZER_PRESETS[name]) == [], name
    assert transformer_differences(TRANSFORMER_PRESETS["hart-0.7b"], TOKENIZER_PRESETS["hart-1024"]) == []
    tiny = {(d.field, d.ours, d.reference) for d in tokenizer_differences(TOKENIZER_PRESETS["tiny"])}
    assert tiny == {("num_res_blocks", 1, 2), ("norm_groups", 8, 32)}
    # the tiny transformer's own fields are the reference's; the tiny tokenizer it is saved with is not
    assert transformer_differences(TRANSFORMER_PRESETS["tiny"]) == []
    paired = [d.field for d in transformer_differences(TRANSFORMER_PRESETS["tiny"], TOKENIZER_PRESETS["tiny"])]
    assert paired == ["tokenizer.num_res_blocks", "tokenizer.norm_groups"]


def test_demo_tokenizer_folder_gets_a_note_and_a_warning(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tokenizer = HybridTokenizer(DEMO_TOKENIZER)
    with pytest.warns(ReferenceCompatibilityWarning) as caught:
        tokenizer.save_pretrained(tmp_path / "tok")
    message = str(caught[0].message)
    for text in ("num_res_blocks=0 (reference: 2)", "using_sa=false (reference: true)",
                 "using_mid_sa=false (reference: true)", "norm_groups=1 (reference: 32)", NOTE_FILE):
        assert text in message
    note = (tmp_path / "tok" / NOTE_FILE).read_text()
    for field, ours, reference in (("num_res_blocks", "0", "2"), ("using_sa", "false", "true"),
                                   ("using_mid_sa", "false", "true"), ("norm_groups", "1", "32")):
        line = next(line for line in note.splitlines() if line.strip().startswith(field + " "))
        assert line.split()[1:] == ["ours", ours, "reference", reference]
    assert "ch " not in note and "vocab_size" not in note  # only the fields that differ
    # our loader reads the folder all the same
    assert HybridTokenizer.from_pretrained(tmp_path / "tok").config == DEMO_TOKENIZER


def test_released_preset_folder_has_no_note_and_a_stale_note_is_removed(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReferenceCompatibilityWarning)
        HybridTokenizer(DEMO_TOKENIZER).save_pretrained(tmp_path / "tok")
    assert (tmp_path / "tok" / NOTE_FILE).is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReferenceCompatibilityWarning)  # any such warning fails the test
        HybridTokenizer(TOKENIZER_PRESETS["hart-1024"]).save_pretrained(tmp_path / "tok")  # HART's released size
    assert not (tmp_path / "tok" / NOTE_FILE).exists()


def test_a_discriminator_of_another_size_is_named_and_loads_back(tmp_path):
    from hart.tokenizer.model import load_discriminator

    released = HybridTokenizer(TOKENIZER_PRESETS["hart-1024"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReferenceCompatibilityWarning)
        released.save_pretrained(tmp_path / "released", discriminator=NLayerDiscriminator())  # HART's own sizes
    assert not (tmp_path / "released" / NOTE_FILE).exists()
    with pytest.warns(ReferenceCompatibilityWarning, match=r"disc.ndf=16 \(reference: 64\)"):
        released.save_pretrained(tmp_path / "small-disc", discriminator=NLayerDiscriminator(ndf=16, num_layers=2))
    assert "disc.num_layers" in (tmp_path / "small-disc" / NOTE_FILE).read_text()
    loaded = load_discriminator(tmp_path / "small-disc")
    assert (loaded.ndf, loaded.num_layers) == (16, 2)


def transformer_for(tokenizer_cfg, **changes):
    config = replace(TRANSFORMER_PRESETS["tiny"], vocab_size=tokenizer_cfg.vocab_size,
                     token_dim=tokenizer_cfg.z_channels, patch_nums=tokenizer_cfg.patch_nums, **changes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return HARTForT2I(config)


def test_transformer_note_names_its_own_fields_and_the_tokenizer_beside_it(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReferenceCompatibilityWarning)
        transformer_for(REFERENCE_SHAPED_TOKENIZER).save_pretrained(tmp_path / "plain", tokenizer=REFERENCE_SHAPED_TOKENIZER)
    assert not (tmp_path / "plain" / NOTE_FILE).exists()

    model = transformer_for(REFERENCE_SHAPED_TOKENIZER, rope_theta=100.0)
    with pytest.warns(ReferenceCompatibilityWarning, match=r"rope_theta=100.0 \(reference: 10000.0\)"):
        model.save_pretrained(tmp_path / "theta")
    assert "rope_theta" in (tmp_path / "theta" / NOTE_FILE).read_text()

    # gpt2 attention has no RoPE (here or in the reference): its RoPE fields build nothing
    gpt2 = replace(TRANSFORMER_PRESETS["tiny"], attn_type="gpt2", mlp_type="gpt2", rope_theta=100.0)
    assert transformer_differences(gpt2) == []

    model = transformer_for(DEMO_TOKENIZER)
    with pytest.warns(ReferenceCompatibilityWarning) as caught:
        model.save_pretrained(tmp_path / "demo", tokenizer=DEMO_TOKENIZER)
    assert "tokenizer.norm_groups=1 (reference: 32)" in str(caught[0].message)
    note = (tmp_path / "demo" / NOTE_FILE).read_text()
    assert "tokenizer.num_res_blocks" in note and "tokenizer/ folder beside" in note
    assert HARTForT2I.from_pretrained(tmp_path / "demo").config == model.config
