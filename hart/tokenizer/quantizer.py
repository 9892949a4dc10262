"""Multi-scale residual vector quantizer (VAR's VectorQuantizer2, HART's hybrid variant).

Design: the latent f (B, C, H, W) is explained coarse-to-fine. At scale k the remaining
residual is area-downsampled to pn_k x pn_k, each position takes its nearest codebook
vector (plain L2), and the chosen vectors are bicubic-upsampled back to H x W, passed
through a "Phi" conv and subtracted. Phi is one of `share_quant_resi` partially shared
3x3 convs, picked per scale by the tick rule (docs/design/tokenizer.md, "Tick rule").

Two accumulation rules exist and both matter for checkpoint compatibility:
- VAR rule (`hart_last=False`): Phi at every scale. Used by VAR's decoder, by the
  discrete training path of the tokenizer, and by `tokens_to_latent` for discrete decode.
- HART rule (`hart_last=True`): no Phi at the last scale (which is already full size).
  The continuous residual is defined against it: residual = f - sum_k e'_k, so
  tokens + residual reproduce f exactly. Teacher forcing only uses scales < last, where
  the two rules agree.

Module attribute names (`embedding`, `quant_resi.qresi_ls.N`, `ema_vocab_hit_SV`) are the
official state-dict keys.

Shape legend: B batch, C latent channels (z_channels), H/W latent grid (= last pn),
pn side of one scale, l = pn*pn tokens of one scale, L = sum of l over scales, S scales,
V vocabulary size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hart.config import TokenizerConfig


class Phi(nn.Conv2d):
    """h -> (1 - q) h + q conv3x3(h): a residual refinement of an upsampled code map."""

    def __init__(self, channels: int, quant_resi: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw.mul(1 - self.resi_ratio) + super().forward(h_BChw).mul(self.resi_ratio)


class PhiPartiallyShared(nn.Module):
    """K Phi convs shared across scales; scale si of S uses the one whose tick is nearest si/(S-1)."""

    def __init__(self, channels: int, quant_resi: float, num_convs: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(channels, quant_resi) for _ in range(num_convs))
        k = num_convs
        # VAR's tick rule; K == 4 uses a narrower spread (docs/design/tokenizer.md, "Tick rule"). Ticks are float64
        # (numpy linspace) on purpose: several scales sit exactly between two ticks and VAR's
        # float64 rounding decides which conv they get (256px: scales 2 and 7).
        margin = 1 / 3 / k if k == 4 else 1 / 2 / k
        self.ticks = np.linspace(margin, 1 - margin, k)

    def index_for(self, si: int, num_scales: int) -> int:
        return int(np.argmin(np.abs(self.ticks - si / (num_scales - 1))))

    def forward(self, h_BChw: torch.Tensor, si: int, num_scales: int) -> torch.Tensor:
        return self.qresi_ls[self.index_for(si, num_scales)](h_BChw)


class MultiScaleQuantizer(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
        self.patch_nums = tuple(config.patch_nums)
        self.vocab_size = config.vocab_size
        self.channels = config.z_channels
        self.beta = config.beta
        self.embedding = nn.Embedding(config.vocab_size, config.z_channels)
        self.quant_resi = PhiPartiallyShared(config.z_channels, config.quant_resi, config.share_quant_resi)
        # Codebook usage per scale (an EMA of hit counts); a statistic, not used by the math.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), config.vocab_size))

    # ---------------------------------------------------------------- helpers
    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    def phi_indices(self) -> list[int]:
        return [self.quant_resi.index_for(si, self.num_scales) for si in range(self.num_scales)]

    def _check_latent(self, f_BChw: torch.Tensor) -> None:
        if f_BChw.ndim != 4 or f_BChw.shape[1] != self.channels:
            raise ValueError(f"latent must be (B, {self.channels}, H, W), got {tuple(f_BChw.shape)}")
        H, W = f_BChw.shape[-2:]
        if H != W or H != self.patch_nums[-1]:
            raise ValueError(
                f"latent grid {H}x{W} does not match the last scale {self.patch_nums[-1]} of patch_nums "
                f"{self.patch_nums}; use patch_nums ending in {H} for this image size"
            )

    def nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook vector by squared L2: |z|^2 + |e|^2 - 2 z.e."""
        weight_VC = self.embedding.weight.detach().to(z_NC.dtype)
        dist_NV = z_NC.square().sum(1, keepdim=True) + weight_VC.square().sum(1)
        dist_NV = dist_NV.addmm(z_NC, weight_VC.T, alpha=-2, beta=1)
        return dist_NV.argmin(dim=1)

    def embed_tokens(self, idx_Bl: torch.Tensor, pn: int) -> torch.Tensor:
        """Token ids of one scale (B, pn*pn) -> code map (B, C, pn, pn)."""
        B = idx_Bl.shape[0]
        # nn.Embedding only takes int32/int64; the token cache stores int16.
        return self.embedding(idx_Bl.long()).transpose(1, 2).reshape(B, self.channels, pn, pn)

    def _quantize_scale(self, f_rest_BChw: torch.Tensor, si: int) -> torch.Tensor:
        pn, H = self.patch_nums[si], f_rest_BChw.shape[-1]
        z_BChw = f_rest_BChw if pn == H else F.interpolate(f_rest_BChw, size=(pn, pn), mode="area")
        B = z_BChw.shape[0]
        z_NC = z_BChw.permute(0, 2, 3, 1).reshape(-1, self.channels)
        return self.nearest_code(z_NC).view(B, pn * pn)

    def _code_to_full(self, idx_Bl: torch.Tensor, si: int, H: int, apply_phi: bool) -> torch.Tensor:
        """Embed scale si, upsample to H x W (bicubic) and apply its Phi conv if asked."""
        pn = self.patch_nums[si]
        h_BChw = self.embed_tokens(idx_Bl, pn)
        if pn != H:
            h_BChw = F.interpolate(h_BChw, size=(H, H), mode="bicubic")
        return self.quant_resi(h_BChw, si, self.num_scales) if apply_phi else h_BChw

    # ---------------------------------------------------------------- inference paths
    @torch.no_grad()
    def latent_to_tokens(self, f_BChw: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """f -> ([idx_Bl per scale], continuous residual f - sum_k e'_k under the HART rule)."""
        self._check_latent(f_BChw)
        H = f_BChw.shape[-1]
        f_rest = f_BChw.clone()
        tokens = []
        last = self.num_scales - 1
        for si in range(self.num_scales):
            idx_Bl = self._quantize_scale(f_rest, si)
            tokens.append(idx_Bl)
            f_rest -= self._code_to_full(idx_Bl, si, H, apply_phi=si < last)
        return tokens, f_rest

    def tokens_to_latent(self, tokens: list[torch.Tensor], hart_last: bool = False) -> torch.Tensor:
        """Sum of the scales' code maps (f_hat), VAR rule by default, HART rule with hart_last."""
        self._check_tokens(tokens)
        H = self.patch_nums[-1]
        last = self.num_scales - 1
        f_hat = None
        for si, idx_Bl in enumerate(tokens):
            h = self._code_to_full(idx_Bl, si, H, apply_phi=not (hart_last and si == last))
            f_hat = h if f_hat is None else f_hat + h
        return f_hat

    def tokens_to_teacher_forcing_input(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """VAR's idxBl_to_var_input: the transformer's inputs for scales 1..S-1, (B, L-1, C).

        Input of scale k+1 = area-downsample of the accumulated f_hat after scales 0..k.
        """
        self._check_tokens(tokens)
        H = self.patch_nums[-1]
        f_hat = None
        inputs = []
        for si in range(self.num_scales - 1):
            h = self._code_to_full(tokens[si], si, H, apply_phi=True)
            f_hat = h if f_hat is None else f_hat + h
            pn_next = self.patch_nums[si + 1]
            nxt = f_hat if pn_next == H else F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")
            inputs.append(nxt.flatten(2).transpose(1, 2))
        return torch.cat(inputs, dim=1)

    def next_autoregressive_input(
        self, si: int, f_hat_BChw: torch.Tensor | None, h_BChw: torch.Tensor, phi_last: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampling step: add scale si's code map h (B, C, pn, pn) to f_hat.

        HART rule by default (no Phi at the last scale, where HART's residual follows);
        `phi_last=True` is the VAR rule, for discrete-only samplers (VAR, STAR) whose f_hat is
        decoded as is. Returns (new f_hat, input for scale si+1 as (B, C, pn_next, pn_next));
        at the last scale the second item is f_hat itself.
        """
        H = self.patch_nums[-1]
        last = self.num_scales - 1
        if si < last:
            h = h_BChw if h_BChw.shape[-1] == H else F.interpolate(h_BChw, size=(H, H), mode="bicubic")
            h = self.quant_resi(h, si, self.num_scales)
        elif phi_last:
            h = self.quant_resi(h_BChw, si, self.num_scales)
        else:
            h = h_BChw
        f_hat = h if f_hat_BChw is None else f_hat_BChw + h
        if si == last:
            return f_hat, f_hat
        pn_next = self.patch_nums[si + 1]
        nxt = f_hat if pn_next == H else F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")
        return f_hat, nxt

    def _check_tokens(self, tokens: list[torch.Tensor]) -> None:
        if len(tokens) != self.num_scales:
            raise ValueError(f"expected {self.num_scales} token scales, got {len(tokens)}")
        for si, (idx, pn) in enumerate(zip(tokens, self.patch_nums)):
            if idx.ndim != 2 or idx.shape[1] != pn * pn:
                raise ValueError(f"scale {si}: expected token shape (B, {pn * pn}), got {tuple(idx.shape)}")
            if idx.dtype not in (torch.int64, torch.int32, torch.int16):
                raise ValueError(f"scale {si}: token ids must be integers, got {idx.dtype}")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.vocab_size):
                raise ValueError(f"scale {si}: token ids outside [0, {self.vocab_size})")

    # ---------------------------------------------------------------- codebook upkeep (training)
    @torch.no_grad()
    def search_inputs(self, f_BChw: torch.Tensor, residual: bool = True) -> torch.Tensor:
        """Every vector the nearest-code search sees for latent f (VAR rule), all scales: (N, C).

        `residual=False` skips subtracting each scale's codes: the plain area means of f.
        """
        self._check_latent(f_BChw)
        H = f_BChw.shape[-1]
        f_rest = f_BChw.detach().to(self.embedding.weight.dtype).clone()
        B = f_rest.shape[0]
        vectors = []
        for si, pn in enumerate(self.patch_nums):
            z_BChw = f_rest if pn == H else F.interpolate(f_rest, size=(pn, pn), mode="area")
            z_NC = z_BChw.permute(0, 2, 3, 1).reshape(-1, self.channels)
            vectors.append(z_NC)
            if residual:  # the search `_quantize_scale` would make, on the vectors already at hand
                idx_Bl = self.nearest_code(z_NC).view(B, pn * pn)
                f_rest -= self._code_to_full(idx_Bl, si, H, apply_phi=True)
        return torch.cat(vectors)

    @torch.no_grad()
    def restart_codes(
        self, f_BChw: torch.Tensor, min_hit_fraction: float | None, generator: torch.Generator | None = None
    ) -> int:
        """Re-seed codes from the search inputs of latent f; returns how many were replaced.

        Why: a codebook trained from scratch collapses (measured on the demo corpus: ~1% of the
        codes in use after 200 steps), because codes that start far from the encoder's outputs
        never win a search and so never get a gradient. `min_hit_fraction=None` re-seeds every
        code (data-dependent initialisation, before the first step); otherwise codes whose
        hit-count EMA (summed over scales) is below `min_hit_fraction` x the mean are
        "dead" and get a random search input each, and their hit counts restart at the mean
        so they are not replaced again before they could be used.
        """
        if min_hit_fraction is None:
            codes = torch.arange(self.vocab_size, device=f_BChw.device)
            # Two passes: plain means first, so that the second pass's residual chain subtracts
            # codes that mean something and the finer scales get residual-sized codes too.
            self._reseed(codes, self.search_inputs(f_BChw, residual=False), generator)
            self._reseed(codes, self.search_inputs(f_BChw, residual=True), generator)
            return int(codes.numel())
        hits_V = self.ema_vocab_hit_SV.sum(0)
        codes = (hits_V < min_hit_fraction * hits_V.mean()).nonzero().flatten()
        if codes.numel() == 0:
            return 0
        self._reseed(codes, self.search_inputs(f_BChw), generator)
        self.ema_vocab_hit_SV[:, codes] = hits_V.mean() / self.num_scales
        return int(codes.numel())

    def _reseed(self, codes: torch.Tensor, vectors_NC: torch.Tensor, generator: torch.Generator | None) -> None:
        pick = torch.randint(0, vectors_NC.shape[0], (codes.numel(),), generator=generator, device="cpu")
        weight = self.embedding.weight
        weight[codes.to(weight.device)] = vectors_NC[pick.to(vectors_NC.device)].to(weight.dtype)

    # ---------------------------------------------------------------- training path
    def forward(
        self, f_BChw: torch.Tensor, continuous: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training quantization (VAR rule) -> (decoder latent, vq_loss, codebook usage in %).

        The VQ loss averages, over scales, beta * |sg(f_hat_k) - f|^2 + |f_hat_k - sg(f)|^2.
        The returned latent uses the straight-through estimator so gradients reach the
        encoder. With `continuous=True` (HART's alternating hybrid training) the remaining
        residual is added back, so the decoder sees the full continuous latent f.
        """
        self._check_latent(f_BChw)
        H = f_BChw.shape[-1]
        f_detached = f_BChw.detach()
        f_rest = f_detached.clone()
        f_hat = torch.zeros_like(f_BChw)
        vq_loss = f_BChw.new_zeros(())
        usage = []
        for si in range(self.num_scales):
            with torch.no_grad():
                idx_Bl = self._quantize_scale(f_rest, si)
            h = self._code_to_full(idx_Bl, si, H, apply_phi=True)
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            vq_loss = vq_loss + self.beta * F.mse_loss(f_hat.detach(), f_BChw) + F.mse_loss(f_hat, f_detached)
            if self.training:
                with torch.no_grad():
                    hits_V = torch.bincount(idx_Bl.flatten(), minlength=self.vocab_size).float()
                    old = self.ema_vocab_hit_SV[si]
                    self.ema_vocab_hit_SV[si] = hits_V if old.sum() == 0 else old.mul(0.99).add(hits_V, alpha=0.01)
                    usage.append((hits_V > 0).float().mean() * 100)
        vq_loss = vq_loss / self.num_scales
        if continuous:
            f_hat = f_hat + f_rest  # == f up to rounding: the decoder sees the continuous latent
        f_out = (f_hat.detach() - f_detached) + f_BChw  # straight-through: value f_hat, grad to f
        usage_pct = torch.stack(usage).mean() if usage else f_BChw.new_zeros(())
        return f_out, vq_loss, usage_pct
