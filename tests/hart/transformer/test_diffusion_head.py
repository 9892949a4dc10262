"""Residual diffusion head (hart/transformer/diffusion_head.py): its respaced sampler, losses, CFG rule, seeded
sampling. The diffusion math alone (schedule, respacing, q_sample, losses, sampling loop) is in test_diffusion.py."""

from __future__ import annotations

import numpy as np
import torch

from hart.transformer.diffusion import cosine_betas, space_timesteps
from hart.transformer.diffusion_head import DiffLoss


def make_head(seed=0) -> DiffLoss:
    torch.manual_seed(seed)
    head = DiffLoss(target_channels=4, z_channels=8, width=32, depth=2, num_sampling_steps="8")
    with torch.no_grad():  # the MAR init zeroes the output layer; give it a function to test with
        for p in head.net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return head


def test_eight_step_sampler_hits_hart_timesteps():
    head = make_head()
    expected = [0, 143, 285, 428, 571, 714, 856, 999]
    assert space_timesteps(1000, "8") == expected
    assert head.gen_diffusion.timestep_map == expected
    seen = []
    original_forward = head.net.forward

    def recording_forward(x, t, z):
        seen.append(sorted(set(t.tolist())))
        return original_forward(x, t, z)

    head.net.forward = recording_forward
    head.sample(torch.randn(6, 8), cfg=None, generator=torch.Generator().manual_seed(0))
    assert seen == [[t] for t in reversed(expected)]
    # respaced betas come from the kept alpha-bar values
    base = np.cumprod(1 - cosine_betas(1000))
    np.testing.assert_allclose(head.gen_diffusion.alphas_cumprod, base[expected], rtol=1e-9)


def test_training_losses_terms():
    head = make_head()
    target = torch.randn(16, 4) * 0.3
    z = torch.randn(16, 8)
    terms = head(target, z, generator=torch.Generator().manual_seed(0))
    assert set(terms) == {"loss", "mse", "vb"}
    assert all(torch.isfinite(v) for v in terms.values())
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    terms["loss"].backward()
    assert head.net.final_layer.linear.weight.grad.abs().sum() > 0
    # the VB term trains only the variance half: with the epsilon half detached in the VB,
    # the epsilon rows of the output layer get gradient from the MSE alone
    head.zero_grad()
    terms = head(target, z, generator=torch.Generator().manual_seed(0))
    terms["vb"].backward()
    assert head.net.final_layer.linear.weight.grad[:4].abs().sum() == 0
    assert head.net.final_layer.linear.weight.grad[4:].abs().sum() > 0


def test_cfg_combination_rule():
    head = make_head()
    x = torch.randn(3, 4)
    z = torch.randn(6, 8)
    t = torch.full((6,), 500)
    cfg = 2.5
    out = head.net.forward_with_cfg(torch.cat([x, torch.randn(3, 4)]), t, z, cfg)
    # the unconditional rows' own state is ignored: only x[:N/2] enters (as released)
    torch.testing.assert_close(head.net.forward_with_cfg(torch.cat([x, torch.randn(3, 4)]), t, z, cfg), out)
    both = head.net(torch.cat([x, x]), t, z)
    eps_c, eps_u = both[:3, :4], both[3:, :4]
    torch.testing.assert_close(out[:3, :4], (1 + cfg) * eps_c - cfg * eps_u)
    torch.testing.assert_close(out[3:, :4], out[:3, :4])
    torch.testing.assert_close(out[:, 4:], both[:, 4:])


def test_sampler_is_seeded_and_clipped():
    head = make_head()
    z = torch.randn(10, 8) * 3
    a = head.sample(z, cfg=4.0, generator=torch.Generator().manual_seed(7))
    b = head.sample(z, cfg=4.0, generator=torch.Generator().manual_seed(7))
    c = head.sample(z, cfg=4.0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (10, 4)
    assert a.abs().max() <= 0.6 + 1e-6  # x0 clipped to [-1, 1], times the 0.6 target scale
