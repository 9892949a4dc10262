"""Typed configuration of the STAR text-to-image transformer, with the released models as presets.

Design: one frozen dataclass, validated in `__post_init__` (ValueError on a bad value), and a dict
of named presets. `tiny` is the CPU test size; the other names are the checkpoints published with
STAR-T2I (HF `taocrayon/STAR`). Their hyperparameters come from three places of the reference
code, since no single file holds them:
- `models/__init__.py: build_vae_var` fixes width = depth * 64, heads = depth, a 4096-entry
  codebook of 32-dim tokens, `cond_drop_rate` 0.1 and stochastic depth 0.1 * depth / 24; the
  unset `num_classes` keeps `VAR`'s default 1000 (an unused `class_emb` the checkpoints carry);
- `train.py` / `sample.py` pass `attn_l2_norm` (config key `anorm`), `rope_theta`, `rope_norm`,
  `logit_norm` and the scale list from the run config;
- `configs/*.json` give those per run (named next to each preset below).
`star_config` resolves a preset name or `{preset: ..., field: value}` through `configuration.loader`,
like `hart.config.transformer_config`, and like it takes the scale list from the tokenizer config, its
one owner (`hart.config.with_tokenizer_scales`). Derived sizes are methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from configuration.loader import preset_or_dict
from hart.config import RELEASED_SCALE_LISTS, TokenizerConfig, with_tokenizer_scales
from hart.scale_grid import ScaleGrid, validate_patch_nums


@dataclass(frozen=True)
class StarConfig:
    """STAR's transformer (docs/design/star.md, "Architecture"): GPT-2 blocks with cross-attention to the text,
    normalized 2-D RoPE."""

    depth: int = 16
    embed_dim: int = 1024  # width C; the releases use depth * 64
    num_heads: int = 16  # the releases use depth (head_dim 64)
    mlp_ratio: float = 4.0  # FFN hidden = round(C * mlp_ratio)
    norm_eps: float = 1e-6
    attn_l2_norm: bool = True  # L2-normalised q, k with a learned per-head scale (on in every release)
    text_dim: int = 1024  # width of the text features used as cross-attention keys/values (`in_dim_cross`)
    context_token: int = 77  # text tokens per prompt (CLIP pads to 77); training checks cached features against it
    # The tokenizer's scale list, never set apart from it (hart.config): the trainer dict of the checkpoint records it.
    patch_nums: tuple[int, ...] = TokenizerConfig.patch_nums
    rope_theta: float = 10000.0  # the reference code's default is 100; every released config says 10000
    rope_norm: float = 64.0  # every scale's positions span [0, rope_norm] (code default 32, releases 64)
    vocab_size: int = 4096  # tokenizer codebook entries
    token_dim: int = 32  # tokenizer code width (Cvae): the teacher-forcing input width
    num_classes: int = 1000  # rows of the unused class embedding minus one; kept for the checkpoint layout
    logit_norm: bool = True  # non-affine LayerNorm before the head (`enable_logit_norm`)
    cond_drop_rate: float = 0.1  # CFG: probability that a training row gets the null (empty-prompt) condition
    drop_path_rate: float = 0.0  # stochastic depth of the last block (linear from 0 at the first)
    # The released block adds `cross_attn(...)[0]`, batch row 0's cross-attention output, to every
    # row (STAR-T2I `models/basic_var.py:363`). In the released sampler that gives the unconditional
    # CFG rows the prompt's cross-attention, so its images differ from a per-row model's at guidance
    # > 0. Off (per row, the correct function) by default; on reproduces the released samples.
    cross_attn_batch0_quirk: bool = False

    def __post_init__(self) -> None:
        validate_patch_nums(self.patch_nums)
        for name in ("depth", "embed_dim", "num_heads", "text_dim", "token_dim", "context_token"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim() % 4:
            raise ValueError(f"head_dim {self.head_dim()} must be a multiple of 4 (2-D RoPE: hd/4 frequencies per axis)")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        if self.mlp_ratio <= 0 or self.norm_eps <= 0:
            raise ValueError(f"mlp_ratio and norm_eps must be > 0, got {self.mlp_ratio}, {self.norm_eps}")
        if self.rope_theta <= 0 or self.rope_norm <= 0:
            raise ValueError(f"rope_theta and rope_norm must be > 0, got {self.rope_theta}, {self.rope_norm}")
        if not 0.0 <= self.cond_drop_rate <= 1.0:
            raise ValueError(f"cond_drop_rate must be in [0, 1], got {self.cond_drop_rate}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def context_dim(self) -> int:
        """`text_dim` under the name the pipeline's text-feature checks read (HART's field name)."""
        return self.text_dim

    def ffn_hidden(self) -> int:
        return round(self.embed_dim * self.mlp_ratio)

    @property
    def grid(self) -> ScaleGrid:
        return ScaleGrid(self.patch_nums)

    def num_tokens(self) -> int:
        """Tokens of all scales; the training sequence has exactly this many positions (start token included)."""
        return self.grid.num_tokens


def _released(depth: int, resolution: int) -> StarConfig:
    """The shape `build_vae_var` gives a depth (width 64 per level of depth, one head per 64 channels), with
    the released scale list of its resolution (that of VAR's tokenizer at that size)."""
    return StarConfig(
        depth=depth, embed_dim=depth * 64, num_heads=depth, patch_nums=RELEASED_SCALE_LISTS[resolution],
        rope_theta=10000.0, rope_norm=64.0, attn_l2_norm=True, logit_norm=True,
        drop_path_rate=0.1 * depth / 24,
    )


STAR_PRESETS: dict[str, StarConfig] = {
    "tiny": StarConfig(
        depth=2, embed_dim=64, num_heads=4, text_dim=32, patch_nums=(1, 2, 3, 4),
        vocab_size=64, token_dim=8, num_classes=4,
    ),
    # configs/config_d16_ab.json: depth 16, 256px scales, rope 10000 / 64, anorm, logit_norm.
    "star-d16-256": _released(16, 256),
    # configs/config_d30.json (and its continuation config_d30_stage2_256.json): same constants at depth 30.
    "star-d30-256": _released(30, 256),
    # configs/config_d30_512.json: the 512px scale list.
    "star-d30-512": _released(30, 512),
    # configs/config_d30_1024.json, and sample.py, which builds the released 1024 model with
    # enable_adaptive_norm=False and loads it strictly: the main 1024 checkpoint has no sampler modules.
    # (That run trained with drop_scale_length=8800, token dropping of the 64x64 scale: a training
    # option, not part of the weights: `star_losses(drop_scale_length=)`, `objective.drop_scale_length`.) The separate "star-1024-sampler" release adds
    # feat_extract_blocks, head_logits2, encoder_proj2, head_proj, word_embed_head, pos_start_last and
    # lvl_embed_2 (enable_adaptive_norm=True) for its masked last-scale refinement; it has no preset
    # here because this model does not build those modules.
    "star-d30-1024": _released(30, 1024),
}


def star_config(value: str | dict[str, Any] = "tiny", tokenizer: TokenizerConfig | None = None) -> StarConfig:
    """`star_config("star-d30-512")` or `star_config({"preset": "tiny", "depth": 3}, tokenizer_config)`:
    with `tokenizer`, its scale list (`hart.config.with_tokenizer_scales`)."""
    return with_tokenizer_scales(preset_or_dict(StarConfig, STAR_PRESETS, value, "star"), value, tokenizer, "star")


__all__ = ["StarConfig", "STAR_PRESETS", "star_config"]
