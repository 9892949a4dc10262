"""Training objective of the STAR transformer: next-scale cross-entropy with CFG dropout.

STAR's trainer (STAR-T2I `trainer.py`) teacher-forces all scales at once and takes a
cross-entropy over every token, uniformly weighted (1/L per token, then the batch mean: the
token mean), with optional label smoothing (0 in every released config). The inputs are VAR's:
the quantizer's upsampled code maps of scales 1..S-1 (`tokens_to_teacher_forcing_input`; the Phi
rule at the last scale does not matter here, the last scale is never an input). CFG dropout
replaces a row's text, mask and pooled feature with the null condition (the text encoder's
encoding of "") inside the model's forward (`STARForT2I`, `drop_condition`).

Token dropping (`drop_scale_length`, STAR's 1024px recipe: 8800 of 9451 tokens): the sequence keeps
that many tokens by leaving out a random set of last-scale tokens, one set for the whole batch as
STAR draws it (`var_drop.py: drop_scale`), so a step attends over a shorter sequence. The dropped
tokens are neither queries nor keys, and they have no loss; the CE is the mean over the kept tokens.
The release draws from the last scale (`drop_start_idx` 13 of its 14 scales) with torch's global
RNG; here the draw comes from `generator`.

Everything random draws from `generator`, so a step is reproducible. Returned metrics are
detached except "loss"; accuracies are in percent.

Shape legend: B batch, T text tokens, D text width, L tokens of all scales, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hart.scale_grid import ScaleGrid
from hart.star.model import STARForT2I, TextFeatures
from hart.tokenizer.quantizer import MultiScaleQuantizer


def check_drop_scale_length(grid: ScaleGrid, drop_scale_length: int) -> None:
    """ValueError unless `drop_scale_length` keeps every earlier scale and part of the last one."""
    if not grid.offsets[-2] < drop_scale_length <= grid.num_tokens:
        raise ValueError(f"drop_scale_length must keep part of the last scale: in ({grid.offsets[-2]}, "
                         f"{grid.num_tokens}] for the scale list {grid.patch_nums}, got {drop_scale_length}")


def star_losses(
    model: STARForT2I,
    quantizer: MultiScaleQuantizer,
    text: TextFeatures,
    tokens: list[torch.Tensor],
    *,
    null_condition: TextFeatures | None = None,
    generator: torch.Generator | None = None,
    label_smoothing: float = 0.0,
    drop_scale_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Loss and metrics of one batch. `null_condition` (batch 1) enables CFG dropout in training
    mode at the model's `cond_drop_rate`; without it every row keeps its text. `drop_scale_length`
    (tokens kept per sequence) drops the rest of the last scale (module docstring). `generator`, if
    given, lives on the model's device (the draws are made there)."""
    grid = model.config.grid  # the quantizer's too: they are checked where they are paired (hart.scale_grid.check_compatible)
    if len(tokens) != grid.num_scales:
        raise ValueError(f"expected {grid.num_scales} token scales, got {len(tokens)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    tokens = [t.long() for t in tokens]
    B = text.tokens_BTD.shape[0]
    if any(t.shape[0] != B for t in tokens):
        raise ValueError(f"batch sizes differ: text {B}, tokens {[t.shape[0] for t in tokens]}")
    keep_last_K = None  # every token
    if drop_scale_length is not None:
        check_drop_scale_length(grid, drop_scale_length)
        device = next(model.parameters()).device
        order = torch.rand(grid.token_counts[-1], generator=generator, device=device).argsort()
        keep_last_K = order[: drop_scale_length - grid.offsets[-2]].sort().values

    with torch.no_grad():
        tf_input_BLC = quantizer.tokens_to_teacher_forcing_input(tokens)
    logits_BLV = model(text.tokens_BTD, text.mask_BT, text.pooled_BD, tf_input_BLC,
                       null_condition=null_condition, generator=generator, keep_last_K=keep_last_K)
    if keep_last_K is not None:
        tokens = [*tokens[:-1], tokens[-1][:, keep_last_K]]
    targets_BL = torch.cat(tokens, dim=1)
    ce = F.cross_entropy(logits_BLV.flatten(0, 1).float(), targets_BL.flatten(), label_smoothing=label_smoothing)

    out: dict[str, torch.Tensor] = {"loss": ce, "ce": ce.detach()}
    with torch.no_grad():
        correct_BL = (logits_BLV.argmax(-1) == targets_BL).float()
        out["acc_mean"] = correct_BL.mean() * 100
        out["acc_tail"] = correct_BL[:, grid.offsets[-2]:].mean() * 100  # the last scale, as STAR logs it
        for si, (start, n) in enumerate(zip(grid.offsets, (t.shape[1] for t in tokens))):  # kept tokens only
            out[f"acc_scale_{si}"] = correct_BL[:, start : start + n].mean() * 100
    return out


__all__ = ["star_losses", "check_drop_scale_length"]
