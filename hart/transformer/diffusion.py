"""Gaussian diffusion math for the residual head (IDDPM as used by MAR and HART): no weights.

Design: one `GaussianDiffusion` holds a beta schedule and its derived float64 tables
(numpy, like the reference, so the respaced tables match to the last bit); tensors are
gathered per row and cast to float32. A respaced process keeps a subset of the original
steps, recomputes betas from the kept alpha-bar values and maps its step index back to
the original step number before calling the network (the network was trained on 0..999).

What the head uses (docs/design/transformer.md, "Diffusion process"):
- cosine schedule alpha_bar(t) = cos^2((t + 0.008) / 1.008 * pi / 2), beta capped at 0.999,
  1000 training steps;
- epsilon prediction with a learned variance interpolated between the posterior variance
  and beta ("learned range"); loss = MSE(eps) + VLB term in bits, the VLB computed on a
  detached mean so it only trains the variance;
- sampling with a respaced schedule (8 steps -> original steps {0,143,...,999}), x0
  clipped to [-1, 1], `temperature` scaling the injected noise.
Randomness comes from an explicit `torch.Generator` so sampling is reproducible.

Shape legend: N rows (tokens), D channels.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_ND, t_N) -> (N, 2D)


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)],
        dtype=np.float64,
    )


def space_timesteps(num_steps: int, section_counts: str | list[int]) -> list[int]:
    """Original steps kept by a respaced sampler ("8" -> 8 evenly spread steps; "ddimN" strides)."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            wanted = int(section_counts[4:])
            for stride in range(1, num_steps):
                if len(range(0, num_steps, stride)) == wanted:
                    return list(range(0, num_steps, stride))
            raise ValueError(f"cannot make {wanted} steps from {num_steps} with an integer stride")
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ValueError(f"num_sampling_steps must be like '8' or '10,5' or 'ddim8', got {section_counts!r}") from None
    size_per, extra = divmod(num_steps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1 or size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        steps += [start + round(stride * j) for j in range(count)]
        start += size
    return sorted(set(steps))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """Log-likelihood of x under a Gaussian discretised to 8-bit bins on [-1, 1] (IDDPM decoder term)."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class GaussianDiffusion:
    """Epsilon-prediction diffusion with learned-range variance over `betas`.

    `timestep_map[i]` is the original step number of step i (identity unless respaced).
    """

    def __init__(self, betas: np.ndarray, timestep_map: list[int] | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all()
        self.betas = betas
        self.num_timesteps = len(betas)
        self.timestep_map = list(timestep_map) if timestep_map is not None else list(range(len(betas)))
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t=0; its log is clipped to the t=1 value.
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if len(betas) > 1 else np.array([np.log(betas[0])])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        # The tables as float64 tensors, per device, made on first use: gathering from them then costs
        # one index and one cast, not a table upload per call (a host-to-device copy on a GPU).
        self._tables_on_device: dict[tuple[int, torch.device], torch.Tensor] = {}

    @classmethod
    def cosine(cls, num_steps: int = 1000, respacing: str | None = None) -> "GaussianDiffusion":
        """The cosine schedule, optionally respaced ("8" keeps 8 of the original steps)."""
        betas = cosine_betas(num_steps)
        if not respacing:
            return cls(betas)
        keep = space_timesteps(num_steps, respacing)
        base_alphas_cumprod = np.cumprod(1.0 - betas)
        new_betas, last = [], 1.0
        for i in keep:
            new_betas.append(1 - base_alphas_cumprod[i] / last)
            last = base_alphas_cumprod[i]
        return cls(np.array(new_betas), timestep_map=keep)

    def _gather(self, table: np.ndarray, t_N: torch.Tensor, ndim: int) -> torch.Tensor:
        key = (id(table), t_N.device)  # the tables are attributes of self, never replaced: ids are stable
        if key not in self._tables_on_device:
            self._tables_on_device[key] = torch.from_numpy(table).to(t_N.device)
        values = self._tables_on_device[key][t_N].float()
        return values.view(-1, *([1] * (ndim - 1)))

    def _model(self, model: ModelFn, x: torch.Tensor, t_N: torch.Tensor) -> torch.Tensor:
        mapped = torch.tensor(self.timestep_map, device=t_N.device, dtype=t_N.dtype)[t_N]
        return model(x, mapped)

    # ---------------------------------------------------------------- forward process
    def q_sample(self, x0: torch.Tensor, t_N: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._gather(self.sqrt_alphas_cumprod, t_N, x0.ndim) * x0 + self._gather(
            self.sqrt_one_minus_alphas_cumprod, t_N, x0.ndim
        ) * noise

    def q_posterior(self, x0, xt, t_N):
        mean = self._gather(self.posterior_mean_coef1, t_N, xt.ndim) * x0 + self._gather(
            self.posterior_mean_coef2, t_N, xt.ndim
        ) * xt
        return mean, self._gather(self.posterior_log_variance_clipped, t_N, xt.ndim)

    # ---------------------------------------------------------------- reverse process
    def p_mean_variance(self, output_N2D: torch.Tensor, xt: torch.Tensor, t_N: torch.Tensor, clip_denoised: bool):
        """Mean, log-variance and x0 estimate of p(x_{t-1} | x_t) from the raw network output."""
        eps, var_values = output_N2D.split(xt.shape[1], dim=1)
        min_log = self._gather(self.posterior_log_variance_clipped, t_N, xt.ndim)
        max_log = self._gather(self.log_betas, t_N, xt.ndim)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        x0 = self._gather(self.sqrt_recip_alphas_cumprod, t_N, xt.ndim) * xt - self._gather(
            self.sqrt_recipm1_alphas_cumprod, t_N, xt.ndim
        ) * eps
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _ = self.q_posterior(x0, xt, t_N)
        return mean, log_variance, x0

    def training_losses(
        self, model: ModelFn, x0: torch.Tensor, t_N: torch.Tensor, noise: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-row losses: "mse" (epsilon), "vb" (bits; trains only the variance), "loss" = sum."""
        xt = self.q_sample(x0, t_N, noise)
        output = self._model(model, xt, t_N)
        D = x0.shape[1]
        eps = output[:, :D]
        frozen = torch.cat([eps.detach(), output[:, D:]], dim=1)
        true_mean, true_log_var = self.q_posterior(x0, xt, t_N)
        mean, log_var, _ = self.p_mean_variance(frozen, xt, t_N, clip_denoised=False)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).flatten(1).mean(1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).flatten(1).mean(1) / math.log(2.0)
        vb = torch.where(t_N == 0, nll, kl)
        mse = (noise - eps).pow(2).flatten(1).mean(1)
        return {"mse": mse, "vb": vb, "loss": mse + vb}

    @torch.no_grad()
    def p_sample_loop(
        self,
        model: ModelFn,
        noise: torch.Tensor,
        clip_denoised: bool = True,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Ancestral sampling from `noise` over all steps of this (respaced) process."""
        x = noise
        for i in reversed(range(self.num_timesteps)):
            if on_step is not None:
                on_step(self.timestep_map[i])
            t_N = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            mean, log_var, _ = self.p_mean_variance(self._model(model, x, t_N), x, t_N, clip_denoised)
            if i > 0:
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = mean + torch.exp(0.5 * log_var) * z * temperature
            else:
                x = mean
        return x
