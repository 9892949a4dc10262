"""Tests of hart/tokenizer/model.py: shapes, the hybrid identity, input validation, parameter counts and
checkpoint compatibility with the official key layout (the conv nets alone: test_vae.py; the PatchGAN
alone: test_discriminator.py).

The official key list (`hart_tokenizer_keys.tsv`, HART's released `tokenizer/` folder) is
committed under tests/assets/reference/, so the key-set test always runs.

Run: .venv/bin/pytest tests/hart/tokenizer/test_model.py -q
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from configuration.loader import replace
from hart.config import TOKENIZER_PRESETS
from hart.tokenizer.discriminator import NLayerDiscriminator
from hart.tokenizer.model import HybridTokenizer, load_discriminator
from hart.weights import save_weight_file

TINY = TOKENIZER_PRESETS["tiny"]
REPO = Path(__file__).resolve().parents[3]


def reference_tsv() -> Path:
    return REPO / "tests/assets/reference/hart_tokenizer_keys.tsv"


def read_tsv(path: Path) -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in path.read_text().splitlines():
        if line.strip():
            name, shape = line.split("\t")
            keys[name] = tuple(int(d) for d in re.findall(r"\d+", shape))
    return keys


def shapes(state) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def official_state(tokenizer: HybridTokenizer, discriminator: NLayerDiscriminator | None = None):
    state = {f"vae.{k}": v for k, v in tokenizer.state_dict().items()}
    if discriminator is not None:
        state.update({f"disc.{k}": v for k, v in discriminator.state_dict().items()})
    return state


def natural_images(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    p = torch.rand(batch, 3, 3, generator=g)
    images = torch.sin(3 * (p[..., 0, None, None] + 0.5) * xs + 4 * p[..., 1, None, None] * ys + 6 * p[..., 2, None, None])
    return images.clamp(-1, 1)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return HybridTokenizer(TINY).eval()


def test_released_parameter_counts():
    with torch.device("meta"):
        model = HybridTokenizer(TOKENIZER_PRESETS["var-d16-f16"])

    def millions(module):
        return sum(p.numel() for p in module.parameters()) / 1e6

    assert round(millions(model.encoder), 1) == 44.1
    assert round(millions(model.decoder), 2) == 64.65
    assert round(millions(model.quantize), 2) == 0.17


def test_state_dict_equals_official_key_list():
    path = reference_tsv()
    official = read_tsv(path)
    with torch.device("meta"):
        ours = official_state(HybridTokenizer(TOKENIZER_PRESETS["hart-1024"]), NLayerDiscriminator())
    ours = shapes(ours)
    assert sorted(set(official) - set(ours)) == [] and sorted(set(ours) - set(official)) == []
    assert {k: v for k, v in ours.items() if official[k] != v} == {}
    # The tiny test preset uses the same key *patterns* (indices abstracted), so a tiny
    # checkpoint written with official names exercises the same loading code.
    def pattern(name):
        return re.sub(r"\.\d+(?=\.)", ".N", name)

    tiny_patterns = {pattern(k) for k in official_state(HybridTokenizer(TINY), NLayerDiscriminator())}
    assert tiny_patterns == {pattern(k) for k in official}


def test_round_trip_shapes_and_hybrid_identity(tiny):
    images = natural_images()
    tokens, residual = tiny.encode(images)
    assert [t.shape for t in tokens] == [(2, pn * pn) for pn in TINY.patch_nums]
    assert residual.shape == (2, TINY.z_channels, 8, 8)
    with torch.no_grad():
        f = tiny.encode_latent(images)
        # The decoder's input in hybrid mode is the encoder latent itself.
        torch.testing.assert_close(tiny.tokens_to_latent(tokens, residual), f, rtol=0, atol=1e-5)
        hybrid = tiny.decode(tokens, residual)
        torch.testing.assert_close(hybrid, tiny.decode_latent(f), rtol=0, atol=1e-4)
        discrete = tiny.decode(tokens)
    assert hybrid.shape == discrete.shape == images.shape
    assert hybrid.min() >= -1 and hybrid.max() <= 1
    assert tiny.tokens_to_teacher_forcing_input(tokens).shape == (2, TINY.num_tokens() - 1, TINY.z_channels)


def test_shallowest_layout_builds_round_trips_and_reloads(tmp_path):
    """The demo's net: no encoder blocks, one decoder block per level, no attention."""
    config = replace(TINY, num_res_blocks=0, using_sa=False, using_mid_sa=False, norm_groups=1)
    tok = HybridTokenizer(config).eval()
    assert not any("attn" in key or "down.0.block" in key for key in tok.state_dict())
    assert "decoder.up.0.block.0.conv1.weight" in tok.state_dict()
    images = natural_images()
    with torch.no_grad():
        tokens, residual = tok.encode(images)
        assert tok.decode(tokens, residual).shape == images.shape
    tok.save_pretrained(tmp_path / "tok")
    loaded = HybridTokenizer.from_pretrained(tmp_path / "tok").eval()
    assert loaded.config == config
    with torch.no_grad():
        assert torch.equal(loaded.decode(tokens, residual), tok.decode(tokens, residual))
    with pytest.raises(ValueError, match="num_res_blocks must be >= 0"):
        replace(TINY, num_res_blocks=-1)


def test_bad_images_raise(tiny):
    ok = natural_images(1)
    tiny.encode(ok * (1 + 1e-4))  # tiny float slack is fine
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        tiny.encode(ok * 1.5)
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 8"):
        tiny.encode(torch.zeros(1, 3, 60, 60))
    with pytest.raises(ValueError, match="last scale must equal the latent size"):
        tiny.encode(torch.zeros(1, 3, 128, 128))
    with pytest.raises(ValueError, match="square"):
        tiny.encode(torch.zeros(1, 3, 64, 128))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny.encode(torch.zeros(3, 64, 64))
    tokens, residual = tiny.encode(ok)
    with pytest.raises(ValueError, match="residual shape"):
        tiny.decode(tokens, residual[:, :, :4])


def test_save_load_bit_identical(tiny, tmp_path):
    images = natural_images()
    discriminator = NLayerDiscriminator()
    tiny.save_pretrained(tmp_path / "tok", discriminator=discriminator)
    config = json.loads((tmp_path / "tok/config.json").read_text())
    assert config["model_type"] == "hart_autoencoder_with_disc" and config["v_patch_nums"] == list(TINY.patch_nums)
    loaded = HybridTokenizer.from_pretrained(tmp_path / "tok").eval()
    assert loaded.config == TINY
    with torch.no_grad():
        tokens, residual = tiny.encode(images)
        tokens2, residual2 = loaded.encode(images)
        assert all(torch.equal(a, b) for a, b in zip(tokens, tokens2)) and torch.equal(residual, residual2)
        assert torch.equal(tiny.decode(tokens, residual), loaded.decode(tokens, residual))
    disc = load_discriminator(tmp_path / "tok")
    assert all(torch.equal(a, b) for a, b in zip(disc.state_dict().values(), discriminator.state_dict().values()))


def test_loads_official_layout_folder_strictly(tiny, tmp_path):
    """A folder as HART's release writes it: HF config.json, pytorch_model.bin, vae./disc. keys."""
    folder = tmp_path / "tokenizer"
    config = {
        "_name_or_path": "hart-0.7b-1024px/tokenizer", "architectures": ["HARTAutoEncoderWithDisc"],
        "model_type": "hart_autoencoder_with_disc", "torch_dtype": "float32", "transformers_version": "4.42.2",
        "vocab_size": TINY.vocab_size, "z_channels": TINY.z_channels, "ch": TINY.ch, "dropout": 0.0, "beta": 0.25,
        "using_znorm": False, "quant_conv_ks": 3, "quant_resi": 0.5, "share_quant_resi": 4, "default_qresi_counts": 0,
        "v_patch_nums": list(TINY.patch_nums), "test_mode": False, "ch_mult": list(TINY.ch_mult),
        "levels": [8, 8, 8, 6, 5], "quantizer_type": "var_hybrid", "hybrid": True, "disable_quant_resi": False,
        "freeze_codebook_for_hybrid": True, "double_decoder": False,
        "num_res_blocks": TINY.num_res_blocks,  # the one field the tiny net needs beyond HART's
    }
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    state = official_state(tiny, NLayerDiscriminator())
    save_weight_file(state, folder / "pytorch_model.bin")
    loaded = HybridTokenizer.from_pretrained(folder)
    assert all(torch.equal(v, loaded.state_dict()[k[4:]]) for k, v in state.items() if k.startswith("vae."))
    assert loaded.config.norm_groups == 32  # HART's config.json has no norm_groups: the released GroupNorm(32)

    # A missing key, an unexpected key and a wrong shape are each named.
    broken = dict(state)
    broken.pop("vae.decoder.conv_out.bias")
    broken["vae.decoder.extra.weight"] = torch.zeros(1)
    broken["vae.quant_conv.weight"] = torch.zeros(3, 3)
    save_weight_file(broken, folder / "pytorch_model.bin")
    with pytest.raises(ValueError) as info:
        HybridTokenizer.from_pretrained(folder)
    message = str(info.value)
    assert "missing keys (1): decoder.conv_out.bias" in message
    assert "unexpected keys (1): decoder.extra.weight" in message
    assert "quant_conv.weight: checkpoint (3, 3)" in message

    # Options we do not implement, and unknown fields, are refused rather than ignored.
    for change in ({"using_znorm": True}, {"double_decoder": True}, {"vocab_sizee": 3}):
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=next(iter(change))):
            HybridTokenizer.from_pretrained(folder)


def test_var_pth_and_scale_list_change(tiny, tmp_path):
    path = tmp_path / "vae_tiny.pth"
    save_weight_file(tiny.state_dict(), path)  # VAR layout: no prefix, no config
    loaded = HybridTokenizer.from_pretrained(path, config=TINY)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in tiny.state_dict().items())
    with pytest.raises(ValueError, match="wrong shapes"):
        HybridTokenizer.from_pretrained(path, config=replace(TINY, z_channels=8))

    # Another scale list: weights load, the per-scale usage statistic is reset with a warning.
    tiny.quantize.ema_vocab_hit_SV.fill_(3.0)
    save_weight_file(tiny.state_dict(), path)
    tiny.quantize.ema_vocab_hit_SV.zero_()
    with pytest.warns(UserWarning, match="ema_vocab_hit_SV has 6 scale rows but this tokenizer has 4"):
        other = HybridTokenizer.from_pretrained(path, config=TINY, patch_nums=(1, 2, 4, 8))
    assert other.quantize.ema_vocab_hit_SV.shape == (4, TINY.vocab_size)
    assert other.quantize.ema_vocab_hit_SV.abs().sum() == 0
    assert torch.equal(other.decoder.conv_out.weight, tiny.decoder.conv_out.weight)
    with pytest.raises(ValueError, match="not found"):
        HybridTokenizer.from_pretrained(tmp_path / "absent.pth")


def test_save_without_discriminator(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "tok")
    loaded = HybridTokenizer.from_pretrained(tmp_path / "tok")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in tiny.state_dict().items())
    with pytest.raises(ValueError, match=r"no `disc\.\*` keys"):
        load_discriminator(tmp_path / "tok")
    with pytest.raises(ValueError, match="do not pass config"):
        HybridTokenizer.from_pretrained(tmp_path / "tok", config=TINY)
