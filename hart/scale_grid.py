"""The scale grid: everything a scale list (`patch_nums`) implies, derived in one place.

Design: HART and VAR tokenise an image into token maps of sides `patch_nums = (1, 2, ..., side)`,
coarse to fine; the last side is the latent grid (image side / the tokenizer's downsampling).
Token counts, the offsets of each scale in the concatenated sequence, the level of every token,
the residual's shape and the split of a (B, L) token row all follow from that list. `ScaleGrid`
is the one place they are computed; the tokenizer's config owns the list itself, and the
transformer, the cache manifest, the trainer and the sampler read their numbers from its grid.
`check_compatible` is the one check that a tokenizer, a transformer and a token cache agree.

Shape legend: B batch, L tokens of all scales, S scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch only for the hints: the cache's writers and route tasks read the grid without it
    import torch


def validate_patch_nums(patch_nums: tuple[int, ...]) -> None:
    if len(patch_nums) < 2:
        raise ValueError(f"patch_nums needs at least 2 scales, got {patch_nums}")
    if patch_nums[0] != 1:
        raise ValueError(f"patch_nums must start at 1 (the 1x1 scale), got {patch_nums}")
    if any(b <= a for a, b in zip(patch_nums, patch_nums[1:])):
        raise ValueError(f"patch_nums must be strictly increasing, got {patch_nums}")


@dataclass(frozen=True)
class ScaleGrid:
    patch_nums: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        validate_patch_nums(self.patch_nums)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def side(self) -> int:
        """The last (finest) scale's side = the latent grid's side."""
        return self.patch_nums[-1]

    @cached_property
    def token_counts(self) -> tuple[int, ...]:
        return tuple(pn * pn for pn in self.patch_nums)

    @property
    def num_tokens(self) -> int:
        return self.offsets[-1]

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Start of every scale in the concatenated (coarse to fine) sequence, then its length (S + 1 values)."""
        offsets = [0]
        for count in self.token_counts:
            offsets.append(offsets[-1] + count)
        return tuple(offsets)

    def levels(self) -> list[int]:
        """The scale index of every token of the concatenated sequence (L values)."""
        return [si for si, count in enumerate(self.token_counts) for _ in range(count)]

    def residual_shape(self, z_channels: int) -> tuple[int, int, int]:
        """(z, h, w) of the continuous residual at the last scale."""
        return (z_channels, self.side, self.side)

    def split(self, tokens_BL: torch.Tensor) -> list[torch.Tensor]:
        """(B, L) -> [(B, pn*pn) per scale], coarse to fine."""
        if tokens_BL.shape[1] != self.num_tokens:
            raise ValueError(f"tokens have length {tokens_BL.shape[1]}, the scale list {self.patch_nums} needs {self.num_tokens}")
        return list(tokens_BL.split(list(self.token_counts), dim=1))


def compatibility_problems(transformer: Any, tokenizer: Any = None, cache: dict[str, Any] | None = None) -> list[str]:
    """Every disagreement of a transformer config with a tokenizer config and/or a token cache's
    manifest (scale list, vocabulary, latent width), one line each. Configs are
    `hart.config.TransformerConfig` / `TokenizerConfig` (duck-typed: this module imports neither)."""
    sources = []
    if tokenizer is not None:
        sources.append(("tokenizer", tuple(tokenizer.patch_nums), tokenizer.vocab_size, tokenizer.z_channels))
    if cache is not None:
        cached = cache.get("tokenizer_config", {})
        sources.append(("cache", tuple(cache.get("patch_nums", ())), cached.get("vocab_size"), cached.get("z_channels")))
    problems = []
    for name, patch_nums, vocab_size, z_channels in sources:
        if patch_nums != tuple(transformer.patch_nums):
            problems.append(f"patch_nums: {name} {patch_nums}, transformer {tuple(transformer.patch_nums)}")
        if vocab_size != transformer.vocab_size:
            problems.append(f"vocabulary: {name} vocab_size {vocab_size}, transformer vocab_size {transformer.vocab_size}")
        if z_channels != transformer.token_dim:
            problems.append(f"latent width: {name} z_channels {z_channels}, transformer token_dim {transformer.token_dim}")
    return problems


def check_compatible(transformer: Any, tokenizer: Any = None, cache: dict[str, Any] | None = None, what: str = "") -> None:
    """ValueError naming every problem `compatibility_problems` finds (used by training, export and generation)."""
    problems = compatibility_problems(transformer, tokenizer, cache)
    if problems:
        raise ValueError(f"{what or 'the tokenizer and the transformer'} do not match: " + "; ".join(problems))


__all__ = ["ScaleGrid", "check_compatible", "compatibility_problems", "validate_patch_nums"]
