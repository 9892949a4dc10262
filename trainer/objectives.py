"""The loss modules of the training stages: what DDP/FSDP wraps.

Design: each is an nn.Module whose forward(batch, step, generator) returns the loss dict of a hart
objective. All gradient traffic then goes through the data-parallel wrapper's forward, which plain
attribute calls such as `model.diffloss(...)` would bypass. Frozen helpers (the quantizer, the
LPIPS metric, the discriminator inside the generator's loss) are held in `_frozen` dicts, outside
the module tree, so the wrapper never waits for gradients they do not get. `trainer.stages` builds them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hart.star.model import TextFeatures, pooled_at_eos
from hart.star.objective import star_losses
from hart.tokenizer.objective import discriminator_losses, generator_losses
from hart.tokenizer.quantizer import MultiScaleQuantizer
from hart.transformer.objective import t2i_losses


class TransformerObjective(nn.Module):
    """t2i_losses around the transformer; the quantizer is frozen and kept out of the tree."""

    def __init__(self, model: nn.Module, quantizer: MultiScaleQuantizer, ce_weight: float, diffusion_weight: float,
                 use_diffusion: bool, kept_bucket: int = 0):
        super().__init__()
        self.model = model
        self._frozen = {"quantizer": quantizer}
        self.ce_weight, self.diffusion_weight, self.use_diffusion = ce_weight, diffusion_weight, use_diffusion
        self.kept_bucket = kept_bucket

    def forward(self, batch: dict[str, Any], step: int = 0, generator: torch.Generator | None = None):
        return t2i_losses(
            self.model, self._frozen["quantizer"], batch["context"], batch["context_mask"], batch["tokens"],
            batch["residual"] if self.use_diffusion else None, ce_weight=self.ce_weight,
            diffusion_weight=self.diffusion_weight, use_diffusion=self.use_diffusion, generator=generator,
            kept_bucket=self.kept_bucket,
        )


class TokenizerObjective(nn.Module):
    """generator_losses around the tokenizer; the discriminator (a critic here) and the LPIPS metric are frozen."""

    def __init__(self, tokenizer: nn.Module, objective_config, discriminator: nn.Module | None,
                 perceptual: nn.Module | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.objective_config = objective_config
        self._frozen = {"discriminator": discriminator, "perceptual": perceptual}

    def forward(self, batch: dict[str, Any], step: int = 0, generator: torch.Generator | None = None):
        return generator_losses(
            self.tokenizer, batch["images"], self.objective_config, step=step,
            discriminator=self._frozen["discriminator"], perceptual=self._frozen["perceptual"], generator=generator,
        )


class DiscriminatorObjective(nn.Module):
    def __init__(self, discriminator: nn.Module, objective_config):
        super().__init__()
        self.discriminator = discriminator
        self.objective_config = objective_config

    def forward(self, batch: dict[str, Any], step: int = 0, generator: torch.Generator | None = None):
        return discriminator_losses(
            self.discriminator, batch["images"], batch["reconstructions"], self.objective_config, step=step
        )


class StarObjective(nn.Module):
    """star_losses around a STAR transformer; the quantizer and the null condition are frozen and kept
    out of the tree. The pooled text vector comes from the batch's features (`pooled_at_eos`)."""

    def __init__(self, model: nn.Module, quantizer: MultiScaleQuantizer, null_condition,
                 drop_scale_length: int | None = None):
        super().__init__()
        self.model = model
        self.drop_scale_length = drop_scale_length  # tokens kept per sequence (STAR's token dropping); None: all
        self._frozen = {"quantizer": quantizer, "null": null_condition}

    def forward(self, batch: dict[str, Any], step: int = 0, generator: torch.Generator | None = None):
        context, mask = batch["context"], batch["context_mask"]
        text = TextFeatures(context, mask, pooled_at_eos(context, mask))
        return star_losses(self.model, self._frozen["quantizer"], text, batch["tokens"],
                           null_condition=self._frozen["null"], generator=generator,
                           drop_scale_length=self.drop_scale_length)

