"""Token sampling helpers (top-k / top-p filtering, multinomial draws, Gumbel-softmax) and `Samples`,
the one result type of both families' samplers.

Design: pure functions over logits (B, l, V) that take an explicit `torch.Generator`, so
generation and the training-time self-sampling are reproducible. Semantics follow VAR/HART:
- top-k keeps logits >= the k-th largest (ties kept); k is clipped to the vocabulary, so
  HART's 600/300 work with a 256-entry test codebook; k <= 0 disables it;
- top-p removes the low-probability tail whose cumulative mass is <= 1 - p (the most likely
  token always survives); p <= 0 disables it;
- Gumbel-softmax ("more_smooth") returns soft one-hot weights for a soft codebook embedding.
Inputs are not modified (the reference filters in place; we copy).

`Samples` is what HART's and STAR's `sample` / `generate` return (docs/models.md, "Sampling API"):
the tokens of every scale, the final latent f_hat, the images (from `generate`) and, only when asked
for, the guided logits. Images are uint8 RGB numpy arrays, channels last, because that is the one
form images enter and leave the project in (`hart.pixels`): PNG files, PIL, MLflow grids and the
evaluation's feature networks all start from it, and it is exact (no float range to agree on).
`check_options` is the one validation of the sampling settings the families share.

Shape legend: B batch, l tokens of one scale (pn^2), V vocabulary, Cv token width, H latent side,
R image side.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace

import numpy as np
import torch


@dataclass(frozen=True)
class Samples:
    """One sampler call's output, the same for both model families.

    tokens_Bl: per scale (coarse to fine) the sampled ids, (B, pn^2) int64 each.
    f_hat_BCvHH: the final latent the tokenizer decodes (HART: tokens + diffusion residual; STAR: tokens).
    images_BRR3: uint8 RGB, channels last, one per row; None from `sample` (latent only), set by `generate`.
    guided_logits_BlV: per scale the guided logits the tokens were drawn from, (B, pn^2, V) float32
        (before top-k / top-p); None unless the call had `return_logits=True` (they hold V floats per token).
    """

    tokens_Bl: tuple[torch.Tensor, ...]
    f_hat_BCvHH: torch.Tensor
    images_BRR3: np.ndarray | None = None
    guided_logits_BlV: tuple[torch.Tensor, ...] | None = None

    def __len__(self) -> int:
        return int(self.f_hat_BCvHH.shape[0])

    def with_images(self, images_BRR3: np.ndarray) -> Samples:
        if images_BRR3.dtype != np.uint8 or images_BRR3.ndim != 4 or images_BRR3.shape[0] != len(self):
            raise ValueError(f"images must be uint8 ({len(self)}, R, R, 3), got {images_BRR3.dtype} {images_BRR3.shape}")
        return replace(self, images_BRR3=images_BRR3)

    @staticmethod
    def concat(parts: list[Samples]) -> Samples:
        """The rows of several calls (a prompt list sampled in chunks), in order."""
        if not parts:
            raise ValueError("nothing to concatenate")
        if len(parts) == 1:
            return parts[0]
        images = [p.images_BRR3 for p in parts]
        logits = [p.guided_logits_BlV for p in parts]
        return Samples(
            tuple(torch.cat(scale) for scale in zip(*(p.tokens_Bl for p in parts))),
            torch.cat([p.f_hat_BCvHH for p in parts]),
            None if any(i is None for i in images) else np.concatenate(images),
            None if any(g is None for g in logits) else tuple(torch.cat(scale) for scale in zip(*logits)),
        )


def check_options(cfg: float, top_k: int | tuple[int, ...], top_p: float | None) -> None:
    """ValueError for settings no sampler accepts: cfg < 0, a top-k that is not an int >= 0 (or, where a
    family takes one per scale group, ints >= 0), a top-p outside [0, 1]. 0 (or None) disables top-k / top-p."""
    if isinstance(cfg, bool) or not isinstance(cfg, numbers.Real) or not cfg >= 0:
        raise ValueError(f"cfg must be a number >= 0, got {cfg!r}")
    values = top_k if isinstance(top_k, (tuple, list)) else (top_k,)
    if not values or any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0 for k in values):
        raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 <= top_p <= 1):
        raise ValueError(f"top_p must be in [0, 1] (0 or None disables it), got {top_p!r}")


def filter_top_k_top_p(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    logits = logits_BlV.clone()
    V = logits.shape[-1]
    if top_k > 0:
        k = min(int(top_k), V)
        kth = logits.topk(k, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits.masked_fill_(remove, -torch.inf)
    return logits


def sample_top_k_top_p(
    logits_BlV: torch.Tensor,
    top_k: int = 0,
    top_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per position, (B, l) int64."""
    B, l, V = logits_BlV.shape
    probs = filter_top_k_top_p(logits_BlV.float(), top_k, top_p).softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs, num_samples=1, replacement=True, generator=generator).view(B, l)


def gumbel_softmax(
    logits: torch.Tensor, tau: float, generator: torch.Generator | None = None, dim: int = -1
) -> torch.Tensor:
    """Soft (not hard) Gumbel-softmax sample with an explicit generator."""
    gumbels = -torch.empty_like(logits).exponential_(generator=generator).log()
    return ((logits + gumbels) / tau).softmax(dim)
