"""Typed configuration for the HART model library, with named presets.

Design: every component takes one small frozen dataclass. Presets are plain dicts of
name -> instance (`TOKENIZER_PRESETS`, `TRANSFORMER_PRESETS`); `tiny` is the CPU test size
and the other names match released checkpoints. `tokenizer_config` / `transformer_config`
resolve a preset name or a `{preset: ..., field: value}` mapping through `configuration.loader`,
the one loader of the tree, which rejects unknown fields and wrong types with a `ValueError`
naming the field. Derived sizes (downsampling factor, token counts) are methods, not fields.

The scale list (`patch_nums`) has one owner: the tokenizer's config. The transformer (and STAR's)
config carries a copy only because its released `llm/config.json` records one: its default is the
tokenizer config's, its presets take theirs from the tokenizer presets they pair with, and
`transformer_config(value, tokenizer)` fills it from the run's tokenizer config
(`with_tokenizer_scales`); a mapping that sets it is refused. The released lists are named
once, in `RELEASED_SCALE_LISTS`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

from configuration.loader import preset_or_dict
from hart.scale_grid import ScaleGrid, validate_patch_nums

# Scale lists (patch_nums) of the released models. The 512 list is VAR's and HART's
# inferred one (docs/design/tokenizer.md, "Scale lists"); any custom increasing list ending at the latent size works.
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
PATCH_NUMS_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)
# The released lists by image side (their tokenizers downsample 16x): what benchmarks and presets read.
RELEASED_SCALE_LISTS: dict[int, tuple[int, ...]] = {256: PATCH_NUMS_256, 512: PATCH_NUMS_512, 1024: PATCH_NUMS_1024}


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizerConfig:
    """VAR/HART multi-scale VQ autoencoder (docs/design/tokenizer.md, "Encoder and decoder")."""

    vocab_size: int = 4096  # codebook entries
    z_channels: int = 32  # latent channels (codebook vector width)
    ch: int = 160  # base conv width; ch * each ch_mult must be a multiple of norm_groups
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # width multiplier per level; factor = 2**(len-1)
    num_res_blocks: int = 2  # encoder blocks per level (decoder uses +1); 0 = the shallowest net (demo)
    dropout: float = 0.0
    using_sa: bool = True  # self-attention at the lowest-resolution level
    using_mid_sa: bool = True  # self-attention in the middle block
    beta: float = 0.25  # commitment weight of the VQ loss
    quant_resi: float = 0.5  # Phi(h) = (1-q) h + q conv(h)
    share_quant_resi: int = 4  # number of partially shared Phi convs
    patch_nums: tuple[int, ...] = PATCH_NUMS_256  # scale side lengths, last = latent side
    in_channels: int = 3
    # GroupNorm groups of the conv net. The released nets use 32. Why it is a field: with
    # 32 groups on 32 channels every group is one channel, so each norm erases that
    # channel's spatial mean, and a plain-colour image then reaches the decoder's output
    # only through padding artefacts (measured: a 32-channel net barely learns the
    # background colour of the shapes corpus in 100 steps; with 8 groups it does).
    norm_groups: int = 32

    def __post_init__(self) -> None:
        validate_patch_nums(self.patch_nums)
        if self.norm_groups < 1:
            raise ValueError(f"norm_groups must be >= 1, got {self.norm_groups}")
        if self.ch % self.norm_groups or any((self.ch * m) % self.norm_groups for m in self.ch_mult):
            raise ValueError(f"ch * ch_mult must be multiples of norm_groups={self.norm_groups} (GroupNorm), "
                             f"got ch={self.ch}, ch_mult={self.ch_mult}")
        if not 0.0 <= self.quant_resi <= 1.0:
            raise ValueError(f"quant_resi must be in [0, 1], got {self.quant_resi}")
        if self.share_quant_resi < 1:
            raise ValueError(f"share_quant_resi must be >= 1, got {self.share_quant_resi}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.num_res_blocks < 0:
            raise ValueError(f"num_res_blocks must be >= 0 (0: no encoder blocks, one per decoder level), "
                             f"got {self.num_res_blocks}")

    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def image_size(self) -> int:
        """Image side length whose latent grid equals the last scale."""
        return self.patch_nums[-1] * self.downsample_factor()

    @property
    def grid(self) -> ScaleGrid:
        """Token counts, offsets, levels and residual shape of this scale list (the one owner of them)."""
        return ScaleGrid(self.patch_nums)

    def num_tokens(self) -> int:
        return self.grid.num_tokens


TOKENIZER_PRESETS: dict[str, TokenizerConfig] = {
    # CPU tests and the demo: 64px images -> 8x8 latent, 6 scales, 130 tokens.
    "tiny": TokenizerConfig(
        vocab_size=256, z_channels=16, ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1,
        patch_nums=(1, 2, 3, 4, 6, 8), norm_groups=8,  # 32 groups on 32 channels erase colour
    ),
    # VAR's released vae_ch160v4096z32.pth (256px, 10 scales).
    "var-d16-f16": TokenizerConfig(patch_nums=PATCH_NUMS_256),
    "hart-512": TokenizerConfig(patch_nums=PATCH_NUMS_512),
    # HART's released tokenizer/ (1024px, 14 scales).
    "hart-1024": TokenizerConfig(patch_nums=PATCH_NUMS_1024),
}


# --------------------------------------------------------------------------------------
# Transformer (+ residual diffusion head)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransformerConfig:
    """HART text-to-image transformer and its residual diffusion head
    (docs/design/transformer.md, "Blocks" and "Residual diffusion head").

    Field names follow the official `HARTForT2IConfig` where one exists, so `llm/config.json`
    maps one to one.
    """

    context_token: int = 300  # text tokens, all used as prefix tokens
    context_dim: int = 1536  # text-encoder feature width
    depth: int = 16
    embed_dim: int = 1536
    num_heads: int = 24
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    cond_drop_rate: float = 0.1  # CFG text dropout probability in training
    cond_drop_randn_quirk: bool = False  # released code drops where randn < p (~54% at 0.1)
    attn_l2_norm: bool = False  # VAR's L2-normalised attention with learned scale
    # The tokenizer's scale list, never set apart from it (module docstring): `llm/config.json` records it.
    patch_nums: tuple[int, ...] = TokenizerConfig.patch_nums
    mlp_type: str = "llama"  # "llama" (SwiGLU) | "gpt2" (GELU-tanh)
    attn_type: str = "llama"  # "llama" (RMSNorm + RoPE) | "gpt2" (LayerNorm + absolute PE)
    disable_aln: bool = False
    use_timestep_embed: bool = True  # level embedding by sinusoidal timestep embedder
    sep_aln_pooling_mode: str = "max"  # block AdaLN condition pooling: "max" | "avg"
    # Cross-attention after STAR: each block also attends to the C-dim text prefix tokens (raw x as
    # query, SDPA's default scale). It is not STAR's cross-attention, whose query is a non-affine
    # LayerNorm of x, whose keys/values are the raw text-encoder features through their own
    # projection, and which L2-normalises q and k with a learned per-head scale: that one is
    # `hart.star` (`TextCrossAttention`). This option keeps HART's prefix and AdaLN as well.
    use_cross_attn: bool = False
    rope_theta: float = 10000.0  # STAR's released configs use 10000 too (their code default is 100)
    # "hart": the released HART 2-D RoPE. "star": STAR-style normalized RoPE (docs/design/star.md,
    # "Normalized RoPE"): every scale's grid spans [0, rope_norm]^2, so positions are comparable across
    # scales; the formula equals STAR's, but here it rotates HART's image tokens after a text prefix in
    # HART's pair layout. Both need attn_type "llama" (the "gpt2" blocks use absolute position tables).
    rope_mode: str = "hart"
    rope_norm: float = 64.0  # span of the "star" mode: STAR's released configs (their code default is 32)
    use_context_norm: bool = False
    context_norm_scale: float = 1.0
    vocab_size: int = 4096  # codebook size of the tokenizer
    token_dim: int = 32  # tokenizer z_channels (Cvae)
    # residual diffusion head
    diff_width: int = 1024
    diff_depth: int = 6
    num_sampling_steps: str = "8"
    diffusion_batch_mul: int = 4
    diffusion_target_scale: float = 0.6  # residual is divided by this for the head
    # initialisation (HART init_weights)
    init_std: float = -1.0  # < 0 -> sqrt(1 / (3 C))
    init_head: float = 0.02
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-5

    def __post_init__(self) -> None:
        validate_patch_nums(self.patch_nums)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if (self.embed_dim // self.num_heads) % 4:
            raise ValueError("head_dim must be a multiple of 4 for the 2-D RoPE")
        for name, value, allowed in (
            ("mlp_type", self.mlp_type, ("llama", "gpt2")),
            ("attn_type", self.attn_type, ("llama", "gpt2")),
            ("sep_aln_pooling_mode", self.sep_aln_pooling_mode, ("max", "avg")),
            ("rope_mode", self.rope_mode, ("hart", "star")),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not 0.0 <= self.cond_drop_rate <= 1.0:
            raise ValueError(f"cond_drop_rate must be in [0, 1], got {self.cond_drop_rate}")
        if self.rope_mode == "star" and self.attn_type != "llama":
            raise ValueError('rope_mode "star" needs attn_type "llama": the "gpt2" blocks use absolute position '
                             "tables and apply no RoPE, so the option would do nothing")
        if self.rope_norm <= 0 or self.rope_theta <= 0:
            raise ValueError(f"rope_norm and rope_theta must be > 0, got {self.rope_norm}, {self.rope_theta}")

    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def grid(self) -> ScaleGrid:
        return ScaleGrid(self.patch_nums)

    def num_image_tokens(self) -> int:
        return self.grid.num_tokens

    def seq_len(self) -> int:
        """Text prefix + every scale but the 1x1 one (that one is predicted from the last text position)."""
        return self.context_token + self.num_image_tokens() - 1


TRANSFORMER_PRESETS: dict[str, TransformerConfig] = {
    "tiny": TransformerConfig(
        context_token=16, context_dim=384, depth=2, embed_dim=64, num_heads=4,
        patch_nums=TOKENIZER_PRESETS["tiny"].patch_nums, vocab_size=256, token_dim=16,
        diff_width=64, diff_depth=2, diffusion_batch_mul=2,
    ),
    # Inferred config of mit-han-lab/hart-0.7b-1024px: 732.5M params, 36.6M head
    # (docs/design/transformer.md, "Released 0.7B configuration").
    # attn_l2_norm: the reference key list (hart_llm_keys_d16_c1536.tsv) has blocks.N.attn.scale_mul_1H11.
    "hart-0.7b": TransformerConfig(attn_l2_norm=True, patch_nums=TOKENIZER_PRESETS["hart-1024"].patch_nums),
}


def tokenizer_config(value: str | dict[str, Any] = "tiny") -> TokenizerConfig:
    """`tokenizer_config("hart-1024")` or `tokenizer_config({"preset": "tiny", "vocab_size": 64})`."""
    return preset_or_dict(TokenizerConfig, TOKENIZER_PRESETS, value, "tokenizer")


# VAR's `VQVAE(...)` keyword arguments and their defaults in its released code (models/vqvae.py).
VAR_VQVAE_DEFAULTS: dict[str, Any] = {
    "vocab_size": 4096, "z_channels": 32, "ch": 128, "dropout": 0.0, "beta": 0.25, "using_znorm": False,
    "quant_conv_ks": 3, "quant_resi": 0.5, "share_quant_resi": 4, "default_qresi_counts": 0,
    "v_patch_nums": PATCH_NUMS_256, "test_mode": True,
}


def tokenizer_config_from_var(**vqvae_kwargs: Any) -> TokenizerConfig:
    """The `TokenizerConfig` of the net VAR's `VQVAE(**vqvae_kwargs)` builds, e.g. its released one:
    `tokenizer_config_from_var(vocab_size=4096, z_channels=32, ch=160, share_quant_resi=4,
    v_patch_nums=PATCH_NUMS_256)`. VAR fixes the rest of the net (levels (1, 1, 2, 2, 4), 2 blocks per
    level, attention, 32 norm groups): the `TokenizerConfig` defaults. ValueError on an unknown
    argument or an option this library does not build."""
    unknown = sorted(set(vqvae_kwargs) - set(VAR_VQVAE_DEFAULTS))
    if unknown:
        raise ValueError(f"not arguments of VAR's VQVAE: {unknown} (known: {sorted(VAR_VQVAE_DEFAULTS)})")
    args = {**VAR_VQVAE_DEFAULTS, **vqvae_kwargs}
    if args["using_znorm"]:
        raise ValueError("using_znorm=True (cosine nearest code) is not supported: the released VAR and HART use L2")
    if args["quant_conv_ks"] != 3:
        raise ValueError(f"quant_conv_ks={args['quant_conv_ks']} is not supported (only 3, as released)")
    if args["share_quant_resi"] < 1:
        raise ValueError("share_quant_resi=0 (one Phi per scale) is not supported; use >= 1 (released: 4)")
    # test_mode (frozen eval mode) and default_qresi_counts (read only when share_quant_resi=0) do not
    # change the net.
    return TokenizerConfig(vocab_size=args["vocab_size"], z_channels=args["z_channels"], ch=args["ch"],
                           dropout=args["dropout"], beta=args["beta"], quant_resi=args["quant_resi"],
                           share_quant_resi=args["share_quant_resi"], patch_nums=tuple(args["v_patch_nums"]))


ModelConfig = TypeVar("ModelConfig")


def with_tokenizer_scales(config: ModelConfig, value: str | dict[str, Any], tokenizer: TokenizerConfig | None,
                          where: str) -> ModelConfig:
    """`config`, resolved from `value`, with the scale list of `tokenizer` (when given; else the preset's,
    which is that of the tokenizer preset it pairs with). ValueError when `value` sets `patch_nums`:
    the list belongs to the tokenizer config, and a second place to set it would be a second owner."""
    if isinstance(value, dict) and "patch_nums" in value:
        raise ValueError(f"{where}.patch_nums: the scale list is the tokenizer config's (its one owner); set "
                         f"patch_nums there, e.g. {{preset: tiny, patch_nums: [...]}}")
    return config if tokenizer is None else dataclasses.replace(config, patch_nums=tokenizer.patch_nums)


def transformer_config(value: str | dict[str, Any] = "tiny", tokenizer: TokenizerConfig | None = None) -> TransformerConfig:
    """`transformer_config("hart-0.7b", tokenizer_config("hart-1024"))`: the preset or mapping with the
    tokenizer's scale list (`with_tokenizer_scales`)."""
    config = preset_or_dict(TransformerConfig, TRANSFORMER_PRESETS, value, "transformer")
    return with_tokenizer_scales(config, value, tokenizer, "transformer")


__all__ = [
    "PATCH_NUMS_256", "PATCH_NUMS_512", "PATCH_NUMS_1024", "RELEASED_SCALE_LISTS",
    "TokenizerConfig", "TransformerConfig", "TOKENIZER_PRESETS", "TRANSFORMER_PRESETS",
    "tokenizer_config", "tokenizer_config_from_var", "transformer_config", "with_tokenizer_scales", "VAR_VQVAE_DEFAULTS",
]
