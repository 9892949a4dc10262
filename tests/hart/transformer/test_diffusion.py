"""Tests of hart/transformer/diffusion.py: the Gaussian diffusion math of the residual head (no weights).

Covered: the cosine schedule (against its formula, monotone, capped), respacing (which original
steps are kept for "8", "10,5" and "ddimN", and the respaced tables), the forward process q_sample,
the learned-range variance and x0 estimate of p_mean_variance, the training losses, and the
ancestral sampler (seeded, temperature, the original step numbers it hands the network).

Run: .venv/bin/pytest tests/hart/transformer/test_diffusion.py -q
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hart.transformer.diffusion import GaussianDiffusion, cosine_betas, space_timesteps


def test_cosine_schedule():
    betas = cosine_betas(1000)
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert betas.shape == (1000,) and betas.max() <= 0.999
    assert math.isclose(betas[10], 1 - alpha_bar(11 / 1000) / alpha_bar(10 / 1000), rel_tol=1e-12)
    assert betas[-1] == 0.999  # capped


def test_vb_at_t0_is_decoder_nll():
    diffusion = GaussianDiffusion.cosine(1000)
    x0 = torch.rand(5, 3) * 1.8 - 0.9
    t = torch.zeros(5, dtype=torch.long)
    out = torch.zeros(5, 6)
    terms = diffusion.training_losses(lambda x, tt: out, x0, t, torch.randn(5, 3))
    assert torch.isfinite(terms["vb"]).all() and (terms["vb"] > 0).all()


def test_bad_respacing_is_value_error():
    with pytest.raises(ValueError):
        space_timesteps(10, "20")
    with pytest.raises(ValueError):
        space_timesteps(1000, "eight")


def test_schedule_is_monotone_and_variance_preserving():
    diffusion = GaussianDiffusion.cosine(1000)
    assert (np.diff(diffusion.betas) >= 0).all() and 0 < diffusion.betas[0] < 1e-4
    assert (np.diff(diffusion.alphas_cumprod) < 0).all()  # noise only grows with t
    assert diffusion.alphas_cumprod[0] > 0.9999 and diffusion.alphas_cumprod[-1] < 1e-6
    np.testing.assert_allclose(diffusion.sqrt_alphas_cumprod**2 + diffusion.sqrt_one_minus_alphas_cumprod**2, 1.0)
    # the posterior variance is 0 at t=0; its log is clipped to the t=1 value
    assert diffusion.posterior_variance[0] == 0
    assert diffusion.posterior_log_variance_clipped[0] == diffusion.posterior_log_variance_clipped[1]


def test_respacing_keeps_the_right_steps():
    assert space_timesteps(1000, "8") == [0, 143, 285, 428, 571, 714, 856, 999]
    # two sections of 500 steps: 4 spread over the first, 2 at the ends of the second
    assert space_timesteps(1000, "4,2") == [0, 166, 333, 499, 500, 999]
    assert space_timesteps(1000, [4, 2]) == space_timesteps(1000, "4,2")
    assert space_timesteps(10, "ddim4") == [0, 3, 6, 9]  # the integer stride giving 4 steps
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(10, "ddim11")
    respaced = GaussianDiffusion.cosine(1000, "4,2")
    base = GaussianDiffusion.cosine(1000)
    assert respaced.num_timesteps == 6 and respaced.timestep_map == [0, 166, 333, 499, 500, 999]
    np.testing.assert_allclose(respaced.alphas_cumprod, base.alphas_cumprod[respaced.timestep_map], rtol=1e-7)


def test_q_sample_moves_from_data_to_noise():
    diffusion = GaussianDiffusion.cosine(1000)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    at = lambda t: diffusion.q_sample(x0, torch.full((4,), t), noise)  # noqa: E731
    torch.testing.assert_close(at(0), x0, atol=1e-2, rtol=0)
    torch.testing.assert_close(at(999), noise, atol=1e-3, rtol=0)
    mid = at(500)
    a = float(diffusion.sqrt_alphas_cumprod[500])
    torch.testing.assert_close(mid, a * x0 + math.sqrt(1 - a * a) * noise)
    per_row = diffusion.q_sample(x0, torch.tensor([0, 999, 0, 999]), noise)  # each row its own step
    assert torch.equal(per_row[1], at(999)[1]) and torch.equal(per_row[2], at(0)[2])


def test_exact_noise_prediction_recovers_x0_and_the_variance_interpolates():
    diffusion = GaussianDiffusion.cosine(1000)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.rand(5, 3, generator=g) * 1.6 - 0.8, torch.randn(5, 3, generator=g)
    t = torch.tensor([1, 10, 200, 600, 950])
    xt = diffusion.q_sample(x0, t, noise)
    low, high = torch.full((5, 3), -1.0), torch.full((5, 3), 1.0)
    mean, log_var, x0_hat = diffusion.p_mean_variance(torch.cat([noise, low], 1), xt, t, clip_denoised=False)
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=1e-4)
    true_mean, true_log_var = diffusion.q_posterior(x0, xt, t)
    torch.testing.assert_close(mean, true_mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(log_var, true_log_var.expand(5, 3))  # v = -1: the posterior variance
    _, log_beta, _ = diffusion.p_mean_variance(torch.cat([noise, high], 1), xt, t, clip_denoised=False)
    torch.testing.assert_close(log_beta[:, 0], torch.log(torch.from_numpy(diffusion.betas[t.numpy()])).float())
    _, _, clipped = diffusion.p_mean_variance(torch.cat([-noise * 50, low], 1), xt, t, clip_denoised=True)
    assert clipped.abs().max() <= 1.0


def test_training_losses_with_a_perfect_and_a_wrong_model():
    diffusion = GaussianDiffusion.cosine(1000, "8")
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.rand(6, 2, generator=g) - 0.5, torch.randn(6, 2, generator=g)
    t = torch.arange(1, 7)  # respaced step indices
    seen = []

    def perfect(x, t_mapped):
        seen.append(t_mapped.tolist())
        return torch.cat([noise, torch.zeros_like(noise)], dim=1)

    terms = diffusion.training_losses(perfect, x0, t, noise)
    assert seen == [[143, 285, 428, 571, 714, 856]]  # the network sees the original step numbers
    assert torch.equal(terms["mse"], torch.zeros(6))
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    wrong = diffusion.training_losses(lambda x, tt: torch.zeros(6, 4), x0, t, noise)
    torch.testing.assert_close(wrong["mse"], noise.pow(2).mean(1))
    assert (wrong["vb"] > terms["vb"]).all()  # a wrong mean costs bits too


def test_sampler_is_seeded_and_reports_the_original_steps():
    diffusion = GaussianDiffusion.cosine(1000, "8")
    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    steps, network_steps = [], []

    def model(x, t_mapped):  # a fixed, smooth "network": predicts half the input as noise
        network_steps.append(int(t_mapped[0]))
        return torch.cat([0.5 * x, torch.zeros_like(x)], dim=1)

    a = diffusion.p_sample_loop(model, noise, generator=torch.Generator().manual_seed(7), on_step=steps.append)
    assert steps == network_steps == [999, 856, 714, 571, 428, 285, 143, 0]
    b = diffusion.p_sample_loop(model, noise, generator=torch.Generator().manual_seed(7))
    c = diffusion.p_sample_loop(model, noise, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    cold = [diffusion.p_sample_loop(model, noise, temperature=0.0, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert torch.equal(cold[0], cold[1])  # no injected noise: the seed no longer matters
    assert a.shape == noise.shape and a.abs().max() <= 1.0  # the last step returns the clipped x0's mean
