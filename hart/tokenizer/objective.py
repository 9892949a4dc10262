"""Training objective of the hybrid tokenizer: pure loss functions, no optimiser, no loop.

Design (docs/design/tokenizer.md, "Training objective"). Two modes, chosen by `TokenizerObjectiveConfig.mode`:

- "decoder_finetune" (HART's released recipe, `freeze_codebook_for_hybrid`): encoder,
  quant_conv and the quantizer (codebook + Phi convs) are frozen; only `decoder` and
  `post_quant_conv` learn. Each step the decoder sees, with probability `continuous_prob`, the
  continuous latent f (tokens + residual) and otherwise the discrete-only sum of the scales,
  so one decoder serves both (paper Fig. 7: alternating beats a second decoder).
- "full": the VQVAE objective to train a tokenizer from scratch. Everything learns; the
  quantizer's loss (commitment beta, codebook term) is added and the straight-through
  estimator carries the reconstruction gradient to the encoder. `continuous_prob` still
  applies (0 gives VAR's pure VQVAE). `vq_warmup_steps` first trains a plain autoencoder:
  before that step the decoder always sees the continuous latent and the quantizer's loss is
  weighted 0. Why: from random weights the VQ loss pulls the unnormalised latent towards the
  (random) codes and shrinks its spatial variation, and the tokenizer settles at "right
  background, shape a blob". Warmed-up latents are worth seeding the codebook from (the job
  does that at the warm-up's end, `trainer.stages.codebook_upkeep`).

`set_trainable(tokenizer, mode)` sets requires_grad accordingly and returns the parameters
to optimise. The generator side (`generator_losses`) and the discriminator side
(`discriminator_losses`) are separate functions; each returns a dict whose "loss" is
differentiable and whose other entries are detached scalars to log. The generator terms:
  reconstruction = l1_weight * |x - x'| + l2_weight * (x - x')^2     (means)
  + perceptual_weight * LPIPS(x', x)                                  (if a metric is given)
  + vq_weight * vq_loss                              ("full" only; 0 before vq_warmup_steps)
  + gan_weight * lambda * hinge_G(D(x'))                             (from gan_start_step on)
with lambda the VQGAN adaptive weight |grad_last(nll)| / (|grad_last(G)| + 1e-4), measured on
the decoder's output conv, which balances the two gradients at the layer they share.
The discriminator uses the hinge loss 0.5 (relu(1 - D(x)) + relu(1 + D(x'))).

Shape legend: B batch, z latent channels, H/W image size, h/w latent size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hart.tokenizer.discriminator import NLayerDiscriminator
from hart.tokenizer.perceptual import PerceptualLoss
from hart.tokenizer.model import HybridTokenizer

MODES = ("decoder_finetune", "full")


@dataclass(frozen=True)
class TokenizerObjectiveConfig:
    mode: str = "decoder_finetune"  # "decoder_finetune" (HART) | "full" (VQVAE from scratch)
    continuous_prob: float = 0.5  # per step: decode the continuous latent with this probability
    l1_weight: float = 1.0
    l2_weight: float = 0.0  # HART's released compute_loss uses MSE; VQGAN uses L1
    vq_weight: float = 1.0  # quantizer loss weight, "full" mode only
    vq_warmup_steps: int = 0  # "full" only: steps before this are a plain autoencoder (no VQ term)
    perceptual_weight: float = 0.0  # needs a PerceptualLoss built from user-supplied weights
    gan_weight: float = 0.0  # 0 disables the adversarial term
    gan_start_step: int = 0  # the discriminator and the G term start at this step
    adaptive_gan_weight: bool = True  # VQGAN's gradient-norm balancing
    max_adaptive_weight: float = 1e4

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 0.0 <= self.continuous_prob <= 1.0:
            raise ValueError(f"continuous_prob must be in [0, 1], got {self.continuous_prob}")
        for name in ("l1_weight", "l2_weight", "vq_weight", "perceptual_weight", "gan_weight", "max_adaptive_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.l1_weight == 0 and self.l2_weight == 0:
            raise ValueError("at least one of l1_weight and l2_weight must be > 0")
        if self.gan_start_step < 0:
            raise ValueError(f"gan_start_step must be >= 0, got {self.gan_start_step}")
        if self.vq_warmup_steps < 0:
            raise ValueError(f"vq_warmup_steps must be >= 0, got {self.vq_warmup_steps}")
        if self.vq_warmup_steps and self.mode != "full":
            raise ValueError("vq_warmup_steps needs mode 'full' (decoder_finetune freezes the quantizer)")


def set_trainable(tokenizer: HybridTokenizer, mode: str) -> list[nn.Parameter]:
    """Set requires_grad for `mode` and return the parameters to optimise, in module order."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "full":
        tokenizer.requires_grad_(True)
    else:
        tokenizer.requires_grad_(False)
        tokenizer.decoder.requires_grad_(True)
        tokenizer.post_quant_conv.requires_grad_(True)
    return [p for p in tokenizer.parameters() if p.requires_grad]


def adaptive_gan_weight(
    nll: torch.Tensor, generator_gan: torch.Tensor, last_layer: torch.Tensor, max_weight: float
) -> torch.Tensor:
    """VQGAN's lambda: ratio of gradient norms of the two losses at the last decoder layer (detached)."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(generator_gan, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def _draw_continuous(probability: float, generator: torch.Generator | None) -> bool:
    if probability <= 0.0:
        return False
    if probability >= 1.0:
        return True
    return bool(torch.rand((), generator=generator) < probability)


def generator_losses(
    tokenizer: HybridTokenizer,
    images_B3HW: torch.Tensor,
    config: TokenizerObjectiveConfig,
    *,
    step: int = 0,
    discriminator: NLayerDiscriminator | None = None,
    perceptual: PerceptualLoss | None = None,
    continuous: bool | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Autoencoder-side losses for one batch. `continuous=None` draws the decoding mode.

    Returns "loss" (differentiable) and detached logs: "reconstruction", "l1", "l2", "vq",
    "perceptual", "gan_generator", "gan_weight", "usage_pct", "continuous" (0/1), plus
    "reconstructions" (B, 3, H, W) detached, to feed `discriminator_losses`.
    """
    if config.perceptual_weight > 0 and perceptual is None:
        raise ValueError("perceptual_weight > 0 needs a PerceptualLoss (built from a local weights file)")
    if config.gan_weight > 0 and discriminator is None:
        raise ValueError("gan_weight > 0 needs a discriminator")
    tokenizer.check_images(images_B3HW)
    warming_up = config.mode == "full" and step < config.vq_warmup_steps
    if warming_up:
        continuous = True
    elif continuous is None:
        continuous = _draw_continuous(config.continuous_prob, generator)

    # Frozen encoder in fine-tuning: no graph through it (saves the activations' memory).
    with torch.set_grad_enabled(torch.is_grad_enabled() and config.mode == "full"):
        f_BzHW = tokenizer.quant_conv(tokenizer.encoder(images_B3HW))
    # Nearest-code search and the VQ loss in fp32 even under autocast.
    with torch.autocast(device_type=f_BzHW.device.type, enabled=False):
        f_decoder_BzHW, vq_loss, usage_pct = tokenizer.quantize(f_BzHW.float(), continuous=continuous)
    reconstructions = tokenizer.decoder(tokenizer.post_quant_conv(f_decoder_BzHW.to(f_BzHW.dtype)))

    reconstructions_f32, images_f32 = reconstructions.float(), images_B3HW.float()
    l1 = (reconstructions_f32 - images_f32).abs().mean()
    l2 = F.mse_loss(reconstructions_f32, images_f32)
    reconstruction = config.l1_weight * l1 + config.l2_weight * l2
    perceptual_term = l1.new_zeros(())
    if config.perceptual_weight > 0:
        perceptual_term = perceptual(reconstructions_f32, images_f32).mean()
    nll = reconstruction + config.perceptual_weight * perceptual_term
    loss = nll
    if config.mode == "full":
        # Weight 0 (not a dropped term) in warm-up: the quantizer stays in the graph, so DDP
        # sees a gradient for every parameter.
        loss = loss + (0.0 if warming_up else config.vq_weight) * vq_loss

    gan_term = l1.new_zeros(())
    gan_lambda = l1.new_zeros(())
    if config.gan_weight > 0 and step >= config.gan_start_step:
        # The discriminator is only a critic here: keep its parameters out of this graph.
        previous = [p.requires_grad for p in discriminator.parameters()]
        discriminator.requires_grad_(False)
        try:
            gan_term = -discriminator(reconstructions).float().mean()
        finally:
            for p, flag in zip(discriminator.parameters(), previous):
                p.requires_grad_(flag)
        last_layer = tokenizer.decoder.last_layer_weight()
        if config.adaptive_gan_weight and torch.is_grad_enabled() and last_layer.requires_grad:
            gan_lambda = adaptive_gan_weight(nll, gan_term, last_layer, config.max_adaptive_weight)
        else:
            gan_lambda = l1.new_ones(())
        loss = loss + config.gan_weight * gan_lambda * gan_term

    return {
        "loss": loss,
        "reconstruction": reconstruction.detach(),
        "l1": l1.detach(),
        "l2": l2.detach(),
        "vq": vq_loss.detach(),
        "perceptual": perceptual_term.detach(),
        "gan_generator": gan_term.detach(),
        "gan_weight": gan_lambda.detach(),
        "usage_pct": usage_pct.detach(),
        "continuous": torch.tensor(float(continuous)),
        "reconstructions": reconstructions.detach(),
    }


def discriminator_losses(
    discriminator: NLayerDiscriminator,
    images_B3HW: torch.Tensor,
    reconstructions_B3HW: torch.Tensor,
    config: TokenizerObjectiveConfig,
    *,
    step: int = 0,
) -> dict[str, torch.Tensor]:
    """Hinge loss of the PatchGAN on real images vs (detached) reconstructions.

    Before `gan_start_step` the loss is multiplied by 0 (still differentiable, no update).
    """
    logits_real = discriminator(images_B3HW.detach()).float()
    logits_fake = discriminator(reconstructions_B3HW.detach()).float()
    hinge = 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    factor = 1.0 if step >= config.gan_start_step else 0.0
    return {
        "loss": factor * hinge,
        "hinge": hinge.detach(),
        "logits_real": logits_real.mean().detach(),
        "logits_fake": logits_fake.mean().detach(),
    }
