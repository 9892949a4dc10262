"""hart/layers/sampling.py: top-k / top-p filtering, seeded draws, Gumbel-softmax (VAR/HART semantics)."""

from __future__ import annotations

import math

import torch

from hart.layers.sampling import filter_top_k_top_p, gumbel_softmax, sample_top_k_top_p


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs]).view(1, 1, -1)


def kept(logits_BlV: torch.Tensor) -> list[int]:
    return torch.isfinite(logits_BlV).view(-1).nonzero().view(-1).tolist()


def test_top_k_keeps_the_k_largest_with_ties_and_clips_k():
    logits = torch.tensor([1.0, 3.0, 3.0, 2.0, 0.0]).view(1, 1, -1)
    assert kept(filter_top_k_top_p(logits, top_k=2)) == [1, 2]
    assert kept(filter_top_k_top_p(logits, top_k=3)) == [1, 2, 3]
    assert kept(filter_top_k_top_p(logits, top_k=600)) == [0, 1, 2, 3, 4]  # HART's 600 on a 5-entry vocabulary
    assert kept(filter_top_k_top_p(logits, top_k=0)) == [0, 1, 2, 3, 4]


def test_top_p_drops_the_tail_but_never_the_most_likely_token():
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    assert kept(filter_top_k_top_p(logits, top_p=0.8)) == [0, 1]  # tail mass 0.2 <= 1 - 0.8 goes
    assert kept(filter_top_k_top_p(logits, top_p=0.9)) == [0, 1, 2]
    assert kept(filter_top_k_top_p(logits, top_p=0.01)) == [0]


def test_filtering_copies_and_draws_are_seeded_and_stay_in_the_kept_set():
    logits = torch.randn(2, 50, 16, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    draws = [sample_top_k_top_p(logits, top_k=3, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(logits, before)
    assert torch.equal(draws[0], draws[1]) and draws[0].shape == (2, 50) and draws[0].dtype == torch.int64
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == draws[0].unsqueeze(-1)).any(-1).all()


def test_gumbel_softmax_is_a_seeded_distribution():
    logits = torch.randn(4, 10)
    a = gumbel_softmax(logits, tau=0.5, generator=torch.Generator().manual_seed(1))
    b = gumbel_softmax(logits, tau=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.allclose(a.sum(-1), torch.ones(4)) and (a >= 0).all()
