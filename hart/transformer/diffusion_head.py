"""Residual diffusion head: MAR's SimpleMLPAdaLN network and the DiffLoss wrapper.

Design: a small per-token MLP denoiser predicts (epsilon, variance logits) of the
continuous residual token (Cvae channels) given a diffusion step and a condition vector
z (width C) from the transformer. Parameter names are the checkpoint's
(`diffloss.net.res_blocks.k.adaLN_modulation.1`, ...). `DiffLoss` owns two diffusion
processes over the same cosine schedule: the 1000-step training one and the respaced
sampling one ("8" steps), plus HART's target normalisation: the head models
`residual / 0.6` and samples are multiplied back by 0.6, with x0 clipped to [-1, 1].

Classifier-free guidance follows HART (not MAR): rows [:N/2] are conditional and
[N/2:] unconditional, both halves share one noise, and
eps = (1 + cfg) * eps_cond - cfg * eps_uncond.

Shape legend: N rows (tokens x diffusion_batch_mul), D target channels (Cvae),
W head width, Z condition width (transformer C).
"""

from __future__ import annotations

import torch
from torch import nn

from hart.layers.blocks import TimestepEmbedder
from hart.transformer.diffusion import GaussianDiffusion


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x_NW: torch.Tensor, y_NW: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y_NW).chunk(3, dim=-1)
        return x_NW + gate * self.mlp(_modulate(self.in_ln(x_NW), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x_NW: torch.Tensor, y_NW: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y_NW).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x_NW), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    def __init__(self, in_channels: int, width: int, z_channels: int, depth: int):
        super().__init__()
        self.in_channels = in_channels
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(z_channels, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, 2 * in_channels)  # epsilon + variance logits
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAR init: xavier linears, N(0, .02) time MLP, zero adaLN and output layers."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x_ND: torch.Tensor, t_N: torch.Tensor, z_NZ: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(x_ND)
        y = self.time_embed(t_N) + self.cond_embed(z_NZ)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)

    def forward_with_cfg(self, x_ND: torch.Tensor, t_N: torch.Tensor, z_NZ: torch.Tensor, cfg: float) -> torch.Tensor:
        half = x_ND[: x_ND.shape[0] // 2]
        out = self.forward(torch.cat([half, half]), t_N, z_NZ)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels :]
        eps_cond, eps_uncond = eps.chunk(2)
        guided = eps_cond * (1 + cfg) - cfg * eps_uncond
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


class DiffLoss(nn.Module):
    """The diffusion head as a module: `forward` = training loss, `sample` = residual tokens."""

    def __init__(
        self,
        target_channels: int,
        z_channels: int,
        width: int,
        depth: int,
        num_sampling_steps: str = "8",
        target_scale: float = 0.6,
        num_train_steps: int = 1000,
    ):
        super().__init__()
        self.in_channels = target_channels
        self.target_scale = target_scale
        self.net = SimpleMLPAdaLN(target_channels, width, z_channels, depth)
        self.train_diffusion = GaussianDiffusion.cosine(num_train_steps)
        self.gen_diffusion = GaussianDiffusion.cosine(num_train_steps, respacing=num_sampling_steps)

    def initialize_weights(self) -> None:
        self.net.initialize_weights()

    def forward(
        self, target_ND: torch.Tensor, z_NZ: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Mean losses over rows: "loss" (MSE + VB), "mse", "vb"; t ~ U{0..T-1} per row."""
        N, device = target_ND.shape[0], target_ND.device
        t_N = torch.randint(0, self.train_diffusion.num_timesteps, (N,), device=device, generator=generator)
        noise = torch.randn(target_ND.shape, device=device, dtype=target_ND.dtype, generator=generator)
        terms = self.train_diffusion.training_losses(
            lambda x, t: self.net(x, t, z_NZ), target_ND / self.target_scale, t_N, noise
        )
        return {k: v.mean() for k, v in terms.items()}

    @torch.no_grad()
    def sample(
        self,
        z_NZ: torch.Tensor,
        cfg: float | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        on_step=None,
    ) -> torch.Tensor:
        """Residual tokens (N, D). With `cfg` the rows are [cond; uncond] and both halves get the cond result."""
        N, device = z_NZ.shape[0], z_NZ.device
        dtype = self.net.input_proj.weight.dtype
        if cfg is not None:
            half = torch.randn((N // 2, self.in_channels), generator=generator, device=device, dtype=dtype)
            noise = torch.cat([half, half])
            model = lambda x, t: self.net.forward_with_cfg(x, t, z_NZ, cfg)  # noqa: E731
        else:
            noise = torch.randn((N, self.in_channels), generator=generator, device=device, dtype=dtype)
            model = lambda x, t: self.net(x, t, z_NZ)  # noqa: E731
        x0 = self.gen_diffusion.p_sample_loop(
            model, noise, clip_denoised=True, temperature=temperature, generator=generator, on_step=on_step
        )
        return x0 * self.target_scale
