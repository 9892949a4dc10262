"""Token sampling helpers: top-k / top-p filtering, multinomial draws, Gumbel-softmax.

Design: pure functions over logits (B, l, V) that take an explicit `torch.Generator`, so
generation and the training-time self-sampling are reproducible. Semantics follow VAR/HART:
- top-k keeps logits >= the k-th largest (ties kept); k is clipped to the vocabulary, so
  HART's 600/300 work with a 256-entry test codebook; k <= 0 disables it;
- top-p removes the low-probability tail whose cumulative mass is <= 1 - p (the most likely
  token always survives); p <= 0 disables it;
- Gumbel-softmax ("more_smooth") returns soft one-hot weights for a soft codebook embedding.
Inputs are not modified (the reference filters in place; we copy).

Shape legend: B batch, l tokens, V vocabulary.
"""

from __future__ import annotations

import torch


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
