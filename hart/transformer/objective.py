"""Training objective of the HART transformer + residual diffusion head (joint or head-only).

HART's training code was never released; this builds the training forward from the
released model's `forward` and the paper (docs/design/transformer.md, "Classifier-free guidance in training",
"Last-scale token subsampling" and "Head training loss"):

1. CFG text dropout: a row's text features are zeroed (mask and positions untouched, as
   released) with probability `cond_drop_rate` (Bernoulli). `cond_drop_randn_quirk=True`
   reproduces the released `randn(B) < p` test instead (about 54 % at p = 0.1).
2. Teacher forcing input from the frozen quantizer (`tokens_to_teacher_forcing_input`).
3. Last-scale token subsampling (MAR-style): one mask rate per batch from a normal
   N(1, 0.25) truncated to [0.5, 1]; `ceil(rate * l_last)` last-scale tokens are masked but
   at least 32 are kept (all of them when the last scale has <= 32); each row masks its own
   random subset. Masked tokens are removed from the sequence (input, positions, attention).
   With `kept_bucket` > 0 (not in HART) the kept count is then rounded to a neighbouring rung
   of the ladder {32, multiples of kept_bucket, l_last}, up with probability proportional to
   its distance from the lower rung: the mean kept count stays HART's, its spread grows by
   at most one rung, and a compiled model sees one sequence length per rung (17 at 1024px
   with 128) instead of up to ~2000.
4. CE over every kept token (label smoothing optional), uniformly weighted (VAR's recipe).
5. Diffusion loss on the kept last-scale tokens (`HARTForT2I.diffusion_terms`, run inside the
   model's forward): the discrete token is sampled from the model's own logits (top-k 600
   clipped to V, top-p 0.96, no CFG, no gradient; ground truth if sampling fails); the
   target is `f_rest_before_last - E[idx_sampled]` with `f_rest_before_last = residual +
   E[idx_gt]`, the condition `decoder_norm(h + word_embed(E[idx_sampled]))`, and the rows are
   repeated `diffusion_batch_mul` times.

Everything random draws from `generator` (on the model's device) so a step is reproducible.
Returned metrics are detached except "loss". "acc_mean" is the accuracy over all kept tokens.

Shape legend: B batch, T text tokens, D text dim, l tokens of a scale, k kept last-scale
tokens, L' all kept image tokens, V vocab, Cv token dim, H latent side.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hart.tokenizer.quantizer import MultiScaleQuantizer
from hart.transformer.model import HARTForT2I

MIN_KEPT_LAST = 32
MASK_RATE_MIN, MASK_RATE_MEAN, MASK_RATE_STD = 0.5, 1.0, 0.25


def _rand(shape, generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device)


def sample_mask_rate(generator: torch.Generator | None, device) -> float:
    """Truncated normal N(1, 0.25) on [0.5, 1] by inverse CDF (scipy's truncnorm, without scipy)."""
    lo = torch.special.ndtr(torch.tensor((MASK_RATE_MIN - MASK_RATE_MEAN) / MASK_RATE_STD, dtype=torch.float64))
    hi = torch.tensor(0.5, dtype=torch.float64)  # ndtr(0): the upper bound is the mean
    u = lo + (hi - lo) * _rand((), generator, device).double().cpu()
    return float(MASK_RATE_MEAN + MASK_RATE_STD * torch.special.ndtri(u))


def num_kept_last(last_l: int, mask_rate: float) -> int:
    if last_l <= MIN_KEPT_LAST:
        return last_l
    num_masked = min(int(math.ceil(last_l * mask_rate)), last_l - MIN_KEPT_LAST)
    return last_l - num_masked


def kept_ladder(last_l: int, bucket: int) -> list[int]:
    """The kept counts `bucketed_kept` rounds to: the minimum, every multiple of `bucket` above it, l_last."""
    low = min(MIN_KEPT_LAST, last_l)
    return sorted({low, last_l, *range(bucket * (low // bucket + 1), last_l, bucket)})


def bucketed_kept(k: int, ladder: list[int], u: float) -> int:
    """k rounded to the rung below or above it, up with probability (k - below) / (above - below),
    so that the expected result is k itself; `u` is a uniform draw in [0, 1)."""
    above = next(rung for rung in ladder if rung >= k)
    below = max(rung for rung in ladder if rung <= k)
    if above == below:
        return k
    return above if u < (k - below) / (above - below) else below


def choose_kept_last(B: int, last_l: int, num_keep: int, generator, device) -> torch.Tensor:
    """(B, num_keep) sorted random last-scale positions per row."""
    order = _rand((B, last_l), generator, device).argsort(dim=1)
    return order[:, :num_keep].sort(dim=1).values


def drop_text(context_BTD: torch.Tensor, p: float, randn_quirk: bool, generator) -> tuple[torch.Tensor, torch.Tensor]:
    B, device = context_BTD.shape[0], context_BTD.device
    if randn_quirk:
        drop_B = torch.randn(B, generator=generator, device=device) < p
    else:
        drop_B = _rand(B, generator, device) < p
    return context_BTD * (~drop_B).to(context_BTD.dtype)[:, None, None], drop_B


def t2i_losses(
    model: HARTForT2I,
    quantizer: MultiScaleQuantizer,
    context_BTD: torch.Tensor,
    context_mask_BT: torch.Tensor,
    tokens: list[torch.Tensor],
    residual_BChw: torch.Tensor | None,
    *,
    ce_weight: float = 1.0,
    diffusion_weight: float = 1.0,
    use_diffusion: bool = True,
    generator: torch.Generator | None = None,
    label_smoothing: float = 0.0,
    subsample_last: bool = True,
    drop_text_condition: bool | None = None,
    kept_bucket: int = 0,
) -> dict[str, torch.Tensor]:
    """Losses and metrics of one batch; see the module docstring for the recipe.

    `subsample_last=False` keeps every last-scale token; `drop_text_condition` defaults to
    `model.training` (no CFG dropout in eval); `kept_bucket` > 0 rounds the kept count to few
    values (see the module docstring; 0 draws nothing extra from `generator`).
    """
    if kept_bucket < 0:
        raise ValueError(f"kept_bucket must be >= 0, got {kept_bucket}")
    cfg = model.config
    grid = cfg.grid  # the quantizer's too: they are checked where they are paired (hart.scale_grid.check_compatible)
    if len(tokens) != grid.num_scales:
        raise ValueError(f"expected {grid.num_scales} token scales, got {len(tokens)}")
    tokens = [t.long() for t in tokens]
    B, device = context_BTD.shape[0], context_BTD.device
    if any(t.shape[0] != B for t in tokens) or context_mask_BT.shape[0] != B:
        raise ValueError(
            f"batch sizes differ: context {B}, mask {context_mask_BT.shape[0]}, tokens {[t.shape[0] for t in tokens]}"
        )
    if use_diffusion and residual_BChw is None:
        raise ValueError("use_diffusion=True needs the continuous residual (residual_BChw)")

    if drop_text_condition is None:
        drop_text_condition = model.training
    drop_B = torch.zeros(B, dtype=torch.bool, device=device)
    context = context_BTD.float()
    if drop_text_condition and cfg.cond_drop_rate > 0:
        context, drop_B = drop_text(context, cfg.cond_drop_rate, cfg.cond_drop_randn_quirk, generator)

    with torch.no_grad():
        tf_input = quantizer.tokens_to_teacher_forcing_input(tokens)
    last_l = grid.token_counts[-1]
    keep_Bk = None
    k = last_l
    if subsample_last:
        k = num_kept_last(last_l, sample_mask_rate(generator, device))
        if kept_bucket:
            k = bucketed_kept(k, kept_ladder(last_l, kept_bucket), float(_rand((), generator, device)))
        if k < last_l:
            keep_Bk = choose_kept_last(B, last_l, k, generator, device)

    last_gt_Bk = tokens[-1] if keep_Bk is None else torch.gather(tokens[-1], 1, keep_Bk)
    reference_BkCv = codebook_VCv = None
    if use_diffusion:
        codebook_VCv = quantizer.embedding.weight.detach()
        with torch.no_grad():  # f_rest_before_last = residual + E[idx_gt] of the kept last-scale tokens
            H = grid.side
            residual = residual_BChw.float().reshape(B, cfg.token_dim, H * H).transpose(1, 2)
            reference_BkCv = residual + F.embedding(tokens[-1], codebook_VCv)
            if keep_Bk is not None:
                reference_BkCv = torch.gather(reference_BkCv, 1, keep_Bk.unsqueeze(-1).expand(-1, -1, cfg.token_dim))
    # One model call computes logits and (inside the same forward) the diffusion terms: wrappers
    # such as DDP/FSDP see every parameter use.
    result = model(
        context, context_mask_BT, tf_input, keep_last_Bk=keep_Bk, diffusion_reference=reference_BkCv,
        codebook=codebook_VCv, generator=generator, fallback_idx_Bk=last_gt_Bk,
    )
    logits_BLV, terms = result if use_diffusion else (result, None)
    targets_BL = torch.cat(tokens[:-1] + [last_gt_Bk], dim=1)
    ce = F.cross_entropy(logits_BLV.flatten(0, 1), targets_BL.flatten(), label_smoothing=label_smoothing)

    out: dict[str, torch.Tensor] = {"ce": ce.detach()}
    with torch.no_grad():
        correct = (logits_BLV.argmax(-1) == targets_BL).float()
        out["acc_mean"] = correct.mean() * 100
        for si, start in enumerate(grid.offsets[:-1]):  # the last scale holds only its k kept tokens
            n = grid.token_counts[si] if si < grid.num_scales - 1 else k
            out[f"acc_scale_{si}"] = correct[:, start : start + n].mean() * 100
    out["cond_drop_frac"] = drop_B.float().mean()
    out["num_kept_last"] = torch.tensor(float(k))
    loss = ce_weight * ce

    if use_diffusion:
        out["diffusion"] = terms["loss"].detach()
        out["diffusion_mse"] = terms["mse"].detach()
        out["diffusion_vb"] = terms["vb"].detach()
        loss = loss + diffusion_weight * terms["loss"]
    out["loss"] = loss
    return out
