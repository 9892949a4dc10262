"""HybridTokenizer: the VAR/HART multi-scale VQ autoencoder with a continuous residual.

Design (docs/design/tokenizer.md, "Hybrid tokenizer"): image -> `encoder` -> `quant_conv` ->
latent f (B, z, h, w). The `quantize` module (hart.tokenizer.quantizer.MultiScaleQuantizer)
explains f with one token map per scale and leaves a continuous residual, so that
`tokens + residual` give back f exactly; the decoder is `post_quant_conv` -> `decoder`.
Decoding therefore has two modes:
- hybrid (HART): decode(tokens, residual) decodes f_hat(HART rule, no Phi at the last scale)
  + residual = f, i.e. the continuous latent;
- discrete-only (VAR): decode(tokens) decodes f_hat(VAR rule, Phi at every scale).
Attribute names equal VAR's module names, so our state dict *is* VAR's key layout.

Checkpoints (all reads and writes go through hart.weights, loads are strict):
- HART `tokenizer/` folder: config.json (HART's `HARTAutoEncoderWithDiscConfig` fields,
  model_type `hart_autoencoder_with_disc`) + `model.safetensors` or `pytorch_model.bin` with
  keys `vae.*` (this module) and `disc.*` (the PatchGAN, loaded by `load_discriminator`);
  model_type `hart_autoencoder` folders (no prefix) are read too.
- VAR `.pth` (e.g. vae_ch160v4096z32.pth): the same keys without the `vae.` prefix and no config;
  the architecture comes from `config=` (default: the `var-d16-f16` preset).
`save_pretrained` writes the HART folder layout. The official code reads it when the config
uses the values it fixes in code (`REFERENCE_FIXED`: the released presets do, `tiny` does not);
otherwise the folder gets a note saying so (hart.reference_compat).

`quantize.ema_vocab_hit_SV` is a usage statistic with one row per scale. A checkpoint made for
another scale list has another row count; as VAR does, we then keep our zero-initialised buffer,
but with a warning instead of silently.

Shape legend: B batch, z latent channels, H/W image size, h/w latent size (= last scale),
l = pn*pn tokens of one scale, L tokens of all scales.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from configuration.loader import config_from_dict, config_to_dict, replace
from hart.config import PATCH_NUMS_256, TOKENIZER_PRESETS, TokenizerConfig
from hart.tokenizer.discriminator import NLayerDiscriminator
from hart.tokenizer.quantizer import MultiScaleQuantizer
from hart.reference_compat import Difference, differences, record
from hart.tokenizer.vae import Decoder, Encoder
from hart.weights import load_weight_file, load_weight_folder, match_state_dict, save_weight_file

MODEL_TYPE = "hart_autoencoder_with_disc"
MODEL_TYPES = (MODEL_TYPE, "hart_autoencoder")
IMAGE_RANGE_SLACK = 1e-3  # accept [-1 - slack, 1 + slack]: float rounding of normalisation
# Fields of HART's config.json that carry no architecture we need; accepted and not used.
HART_TRAINING_FIELDS = ("levels", "test_mode", "hybrid", "freeze_codebook_for_hybrid", "default_qresi_counts")
# What the reference HARTAutoEncoder fixes in code instead of reading config.json. We write these
# fields into config.json too (the reference ignores them); absent from a folder -> these values.
REFERENCE_FIXED = {"num_res_blocks": 2, "using_sa": True, "using_mid_sa": True, "in_channels": 3, "norm_groups": 32}
# Its discriminator (the `disc.*` keys) is always built at the released size.
REFERENCE_DISCRIMINATOR = {"in_channels": 3, "ndf": 64, "num_layers": 3}


class HybridTokenizer(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        z = config.z_channels
        self.quant_conv = nn.Conv2d(z, z, kernel_size=3, stride=1, padding=1)
        self.post_quant_conv = nn.Conv2d(z, z, kernel_size=3, stride=1, padding=1)
        self.quantize = MultiScaleQuantizer(config)

    # ------------------------------------------------------------------ checks
    def check_images(self, images_B3HW: torch.Tensor) -> None:
        """ValueError unless images are (B, C, H, W) floats in [-1, 1] whose latent grid is the last scale."""
        c = self.config
        if not torch.is_tensor(images_B3HW) or images_B3HW.ndim != 4 or images_B3HW.shape[1] != c.in_channels:
            shape = tuple(images_B3HW.shape) if torch.is_tensor(images_B3HW) else type(images_B3HW).__name__
            raise ValueError(f"images must be a (B, {c.in_channels}, H, W) tensor, got {shape}")
        if not images_B3HW.is_floating_point():
            raise ValueError(f"images must be floating point in [-1, 1], got dtype {images_B3HW.dtype}")
        H, W = images_B3HW.shape[-2:]
        factor = c.downsample_factor()
        if H % factor or W % factor:
            raise ValueError(f"image size {H}x{W} is not divisible by the downsampling factor {factor}")
        if H != W:
            raise ValueError(f"images must be square, got {H}x{W}")
        if H // factor != c.patch_nums[-1]:
            raise ValueError(
                f"scale list {c.patch_nums} ends at {c.patch_nums[-1]} but {H}x{W} images give a "
                f"{H // factor}x{W // factor} latent (factor {factor}); the last scale must equal the latent size"
            )
        if images_B3HW.numel():
            low, high = float(images_B3HW.min()), float(images_B3HW.max())
            if not (low >= -1 - IMAGE_RANGE_SLACK and high <= 1 + IMAGE_RANGE_SLACK):
                raise ValueError(f"images must lie in [-1, 1]; got values in [{low:.4g}, {high:.4g}]")

    # ------------------------------------------------------------------ encode / decode
    def encode_latent(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> continuous latent f (B, z, h, w). Differentiable."""
        self.check_images(images_B3HW)
        return self.quant_conv(self.encoder(images_B3HW))

    @torch.no_grad()
    def encode(self, images_B3HW: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Images -> ([token ids (B, pn*pn) per scale], residual (B, z, h, w)).

        The nearest-code search runs in fp32 even under autocast: bf16 distances flip argmins.
        """
        f_BzHW = self.encode_latent(images_B3HW)
        with torch.autocast(device_type=f_BzHW.device.type, enabled=False):
            return self.quantize.latent_to_tokens(f_BzHW.float())

    def decode_latent(self, f_hat_BzHW: torch.Tensor) -> torch.Tensor:
        """Latent -> images clamped to [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat_BzHW)).clamp(-1, 1)

    def tokens_to_latent(self, tokens: list[torch.Tensor], residual_BzHW: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder input: HART rule + residual when a residual is given, VAR rule otherwise."""
        if residual_BzHW is None:
            return self.quantize.tokens_to_latent(tokens, hart_last=False)
        f_hat = self.quantize.tokens_to_latent(tokens, hart_last=True)
        if residual_BzHW.shape != f_hat.shape:
            raise ValueError(f"residual shape {tuple(residual_BzHW.shape)} does not match the latent {tuple(f_hat.shape)}")
        return f_hat + residual_BzHW.to(f_hat.dtype)

    def decode(self, tokens: list[torch.Tensor], residual_BzHW: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens (+ optional continuous residual) -> images in [-1, 1]."""
        return self.decode_latent(self.tokens_to_latent(tokens, residual_BzHW))

    def tokens_to_teacher_forcing_input(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """Transformer inputs for scales 1..S-1, (B, L-1, z)."""
        return self.quantize.tokens_to_teacher_forcing_input(tokens)

    # ------------------------------------------------------------------ checkpoints
    def load_checkpoint_state(self, state: dict[str, torch.Tensor], what: str) -> None:
        """Strictly load a state dict with our (VAR) key names."""
        state = dict(state)
        key = "quantize.ema_vocab_hit_SV"
        ours = self.quantize.ema_vocab_hit_SV
        if key in state and state[key].shape != ours.shape and state[key].shape[1:] == ours.shape[1:]:
            warnings.warn(
                f"{what}: {key} has {state[key].shape[0]} scale rows but this tokenizer has "
                f"{ours.shape[0]} scales; the codebook-usage statistic is reset to zeros (weights are unaffected)",
                stacklevel=3,
            )
            state[key] = torch.zeros_like(ours)
        match_state_dict(self.state_dict(), state, what=what)
        self.load_state_dict(state, strict=True)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        config: TokenizerConfig | None = None,
        patch_nums: tuple[int, ...] | None = None,
    ) -> "HybridTokenizer":
        """Load a HART `tokenizer/` folder or a VAR `.pth`/`.safetensors` file.

        `config` is required for single files unless they are the VAR released shape
        (default `var-d16-f16`); for folders it must be None (config.json decides).
        `patch_nums` replaces the scale list (the conv nets do not depend on it).
        """
        path = Path(path)
        if path.is_dir():
            if config is not None:
                raise ValueError(f"{path} is a folder with its own config.json; do not pass config=")
            config = config_from_hart_json(path / "config.json")
            state = load_weight_folder(path)
        elif path.is_file():
            config = config or TOKENIZER_PRESETS["var-d16-f16"]
            state = load_weight_file(path)
        else:
            raise ValueError(f"tokenizer checkpoint not found: {path}")
        if patch_nums is not None:
            config = replace(config, patch_nums=tuple(patch_nums))
        vae_state, _ = split_tokenizer_state(state)
        model = cls(config)
        model.load_checkpoint_state(vae_state, what=f"tokenizer {path}")
        return model

    def save_pretrained(self, path: str | Path, discriminator: NLayerDiscriminator | None = None) -> None:
        """Write a HART `tokenizer/` folder: config.json + model.safetensors (`vae.*`, `disc.*` keys).

        Without a discriminator no `disc.*` keys are written; the official loader then
        initialises a fresh one (it loads non-strictly), and ours does not need it.
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise ValueError(f"save_pretrained needs a folder path, {path} is a file")
        path.mkdir(parents=True, exist_ok=True)
        state = {f"vae.{k}": v for k, v in self.state_dict().items()}
        if discriminator is not None:
            state.update({f"disc.{k}": v for k, v in discriminator.state_dict().items()})
        save_weight_file(state, path / "model.safetensors")
        (path / "config.json").write_text(json.dumps(config_to_hart_json(self.config), indent=2) + "\n")
        record(path, "tokenizer", reference_differences(self.config, discriminator),
               "hart.tokenizer.model.HybridTokenizer.from_pretrained")


def reference_differences(config: TokenizerConfig, discriminator: NLayerDiscriminator | None = None,
                          prefix: str = "") -> list[Difference]:
    """Fields the reference implementation would build differently (empty: it can load this config),
    including those of a discriminator saved with it (`disc.*`)."""
    found = differences(config_to_dict(config), REFERENCE_FIXED, prefix)
    if discriminator is not None:
        sizes = {name: getattr(discriminator, name) for name in REFERENCE_DISCRIMINATOR}
        found += differences(sizes, REFERENCE_DISCRIMINATOR, f"{prefix}disc.")
    return found


def split_tokenizer_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a checkpoint into (tokenizer keys without `vae.`, discriminator keys without `disc.`).

    A HART folder prefixes every tokenizer key with `vae.`; a VAR file has no prefix. Mixing the
    two (some `vae.` keys, some bare ones) is reported rather than guessed.
    """
    disc = {k[len("disc."):]: v for k, v in state.items() if k.startswith("disc.")}
    rest = {k: v for k, v in state.items() if not k.startswith("disc.")}
    prefixed = [k for k in rest if k.startswith("vae.")]
    if prefixed and len(prefixed) != len(rest):
        bare = sorted(k for k in rest if not k.startswith("vae."))
        raise ValueError(f"checkpoint mixes `vae.`-prefixed and bare keys; bare keys: {bare[:10]}")
    vae = {k[len("vae."):]: v for k, v in rest.items()} if prefixed else rest
    return vae, disc


def load_discriminator(path: str | Path) -> NLayerDiscriminator:
    """The PatchGAN saved beside a tokenizer (`disc.*` keys of a HART folder), loaded strictly."""
    path = Path(path)
    state = load_weight_folder(path) if path.is_dir() else load_weight_file(path)
    _, disc_state = split_tokenizer_state(state)
    if not disc_state:
        raise ValueError(f"{path} holds no `disc.*` keys (no discriminator was saved with this tokenizer)")
    # Its size from the weights (the first conv is ndf x in_channels, one BatchNorm per hidden layer);
    # without them the released size, and the strict match below lists what is missing.
    first = disc_state.get("main.0.weight")
    ndf, in_channels = (int(first.shape[0]), int(first.shape[1])) if first is not None else (64, 3)
    num_layers = sum(1 for key in disc_state if key.endswith(".running_mean")) or 3
    discriminator = NLayerDiscriminator(in_channels=in_channels, ndf=ndf, num_layers=num_layers)
    match_state_dict(discriminator.state_dict(), disc_state, what=f"discriminator {path}")
    discriminator.load_state_dict(disc_state, strict=True)
    return discriminator


# ---------------------------------------------------------------------- config.json <-> TokenizerConfig


def config_to_hart_json(config: TokenizerConfig) -> dict[str, Any]:
    """HART's HARTAutoEncoderWithDiscConfig fields (+ our extra architecture fields)."""
    ours = config_to_dict(config)
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["HARTAutoEncoderWithDisc"],
        "vocab_size": config.vocab_size,
        "z_channels": config.z_channels,
        "ch": config.ch,
        "dropout": config.dropout,
        "beta": config.beta,
        "using_znorm": False,
        "quant_conv_ks": 3,
        "quant_resi": config.quant_resi,
        "share_quant_resi": config.share_quant_resi,
        "default_qresi_counts": 0,
        "v_patch_nums": list(config.patch_nums),
        "test_mode": False,
        "ch_mult": list(config.ch_mult),
        "levels": [8, 8, 8, 6, 5],  # unused by the VQ quantizer; HART's default value
        "quantizer_type": "var_hybrid",
        "hybrid": True,
        "disable_quant_resi": False,
        "freeze_codebook_for_hybrid": True,
        "double_decoder": False,
        # REFERENCE_FIXED: the official code ignores these keys and builds with its own values
        **{name: ours[name] for name in REFERENCE_FIXED},
    }


# Generic keys any transformers PretrainedConfig may write (bookkeeping and generation defaults,
# across 4.x versions). They say nothing about the tokenizer; listed here to avoid importing
# transformers (seconds) just to read a json file. Any other unknown key raises.
HF_GENERIC_CONFIG_KEYS = frozenset(
    """_name_or_path _commit_hash _attn_implementation_autoset architectures transformers_version
    torch_dtype dtype return_dict output_hidden_states output_attentions torchscript use_bfloat16
    tf_legacy_loss pruned_heads tie_word_embeddings chunk_size_feed_forward is_encoder_decoder
    is_decoder cross_attention_hidden_size add_cross_attention tie_encoder_decoder max_length
    min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty temperature
    top_k top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size
    encoder_no_repeat_ngram_size bad_words_ids num_return_sequences output_scores
    return_dict_in_generate forced_bos_token_id forced_eos_token_id remove_invalid_values
    exponential_decay_length_penalty suppress_tokens begin_suppress_tokens finetuning_task id2label
    label2id tokenizer_class prefix bos_token_id pad_token_id eos_token_id sep_token_id
    decoder_start_token_id task_specific_params problem_type""".split()
)


def config_from_hart_json(path: Path) -> TokenizerConfig:
    """Read an official (or our) tokenizer config.json; unsupported options raise ValueError."""
    if not path.is_file():
        raise ValueError(f"tokenizer folder has no config.json: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"cannot parse {path}: {exc}") from None
    if data.get("model_type") not in MODEL_TYPES:
        raise ValueError(f"{path}: model_type {data.get('model_type')!r} is not one of {MODEL_TYPES}")
    unsupported = {
        "using_znorm": (False,), "quant_conv_ks": (3,), "disable_quant_resi": (False,),
        "double_decoder": (False,), "quantizer_type": ("var", "var_hybrid"),
    }
    for name, allowed in unsupported.items():
        if name in data and data[name] not in allowed:
            raise ValueError(f"{path}: {name}={data[name]!r} is not supported (supported: {allowed})")
    fields = {
        "vocab_size": data.get("vocab_size", 4096), "z_channels": data.get("z_channels", 32),
        "ch": data.get("ch", 160), "ch_mult": data.get("ch_mult", [1, 1, 2, 2, 4]),
        "dropout": data.get("dropout", 0.0), "beta": data.get("beta", 0.25),
        "quant_resi": data.get("quant_resi", 0.5), "share_quant_resi": data.get("share_quant_resi", 4),
        "patch_nums": data.get("v_patch_nums", list(PATCH_NUMS_256)),
    }
    fields.update({name: data.get(name, value) for name, value in REFERENCE_FIXED.items()})
    known = set(fields) | set(unsupported) | set(HART_TRAINING_FIELDS) | {"v_patch_nums", "model_type"}
    unknown = sorted(set(data) - known - HF_GENERIC_CONFIG_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown tokenizer config field(s) {unknown}")
    base = config_to_dict(TokenizerConfig())
    base.update(fields)
    return config_from_dict(TokenizerConfig, base, where=str(path))


__all__ = [
    "HybridTokenizer", "load_discriminator", "split_tokenizer_state", "reference_differences", "REFERENCE_FIXED",
    "config_to_hart_json", "config_from_hart_json", "MODEL_TYPE",
]
