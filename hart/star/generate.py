"""Text -> image generation with STAR: next-scale sampling with classifier-free guidance, VAR decode.

Design (STAR-T2I `models/var_drop.py: autoregressive_infer_cfg`, called by `sample.py`):
- CFG rows are batched: the model runs on 2B rows, [:B] the prompts' text features, [B:] the
  null condition, which is the text encoder's encoding of "" (BOS, EOS, pads; its pooled EOS
  feature builds the null rows' start token), not zeros. One KV-cached transformer call per scale
  (`STARForT2I.start_sampling` / `sampling_step`).
- Guidance per scale si of S: `(1 + t) * cond - t * uncond` with `t = cfg * si / (S - 1)`, so the
  1x1 scale is unguided and the last scale gets the full `cfg`. (HART's loop keeps the previous
  ratio at its last scale; STAR's recomputes it at every scale, including the last.)
- Tokens: top-k, then top-p, then one multinomial draw per position (`hart.layers.sampling`,
  the same filtering rules as STAR's `sample_with_top_k_top_p_`), with one k and one p for all
  scales, as `sample.py` runs it. Its defaults are ours: cfg 4.5, top_k 600, top_p 0.8, seed 1.
  k is clipped to the vocabulary (the reference's `topk` would raise for k > V).
- `more_smooth`: Gumbel-softmax soft codes (tau = max(0.27 (1 - 0.95 r), 0.005) on logits
  scaled by 1 + r, r = si / (S - 1)), VAR's visualisation option; keep it False for FID. The
  token recorded for such a scale is its most-weighted code (the soft code is what is used).
- Next scale's input: the scale's code map is upsampled, passed through its Phi and added to
  f_hat with Phi at *every* scale, the last included (VAR's rule: STAR's tokenizer is VAR's VQVAE
  with no continuous residual; `MultiScaleQuantizer.next_autoregressive_input(phi_last=True)`);
  the area-downsampled f_hat is the next scale's input, which is the teacher-forcing input the
  model trained on. Both CFG halves get the same input.
- Decode: the tokenizer's decoder on f_hat (discrete mode), clamped to [-1, 1], then
  `hart.pixels.to_uint8`; the decoder runs in float32 outside any autocast.
The API is HART's (`hart.transformer.generate`; docs/models.md, "Sampling API"): `sample` runs the
loop on text features and returns `hart.layers.sampling.Samples` (tokens, f_hat, guided logits on
request); `generate(model, tokenizer, text_encoder, prompts)` encodes the prompts and the null
condition `text_encoder([""])`, samples and decodes, and returns the same type with uint8 images.
All randomness comes from one `torch.Generator` seeded with `seed` on the model's device, so a
seed reproduces its images on a given device.

Not reproduced: `sample.py` passes `w_mask=True, sample_version="1024"`, which from scale
`sample_from_idx` (9) on re-decodes each scale by confidence-masked iterations through the extra
modules of the separate "star-1024-sampler" release (`feat_extract_blocks`, `head_logits2`, ...).
`STARForT2I` does not build those modules (see `hart.star.config`); without them the reference
runs the plain loop above, which is what this module implements.

The released block gives every row batch row 0's cross-attention (`cross_attn_batch0_quirk`).
With one prompt per call (`sample.py`'s batch size 1) that only hands the unconditional row the
prompt's cross-attention; with more prompts, rows 1..B-1 get prompt 0's too, so this warns.

Shape legend: B prompts, T text tokens, D text width, l tokens of one scale (pn^2), V vocabulary,
Cv token width, H latent side (last pn), R image side.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import torch

from hart.layers.sampling import Samples, check_options, gumbel_softmax, sample_top_k_top_p
from hart.pixels import to_uint8
from hart.scale_grid import check_compatible
from hart.star.model import STARForT2I, TextFeatures


def _check_text(model: STARForT2I, text: TextFeatures, null: TextFeatures) -> None:
    D = model.config.text_dim
    for name, value in (("text_features", text), ("null_features", null)):
        if not isinstance(value, TextFeatures):
            raise ValueError(f"{name} must be a hart.star.model.TextFeatures, got {type(value).__name__}")
        if value.tokens_BTD.ndim != 3 or value.tokens_BTD.shape[2] != D:
            raise ValueError(f"{name}: token features must be (B, T, {D}), got {tuple(value.tokens_BTD.shape)}")
    if null.tokens_BTD.shape[0] != 1:
        raise ValueError(f"null_features must hold one row (the encoding of \"\"), got {null.tokens_BTD.shape[0]}")
    if null.tokens_BTD.shape[1] != text.tokens_BTD.shape[1]:
        raise ValueError(f"text and null features need the same token count, got {text.tokens_BTD.shape[1]} "
                         f"and {null.tokens_BTD.shape[1]}")


def cfg_batch(text: TextFeatures, null: TextFeatures) -> TextFeatures:
    """The 2B-row sampling batch: the prompts' rows, then the null condition repeated B times."""
    B = text.tokens_BTD.shape[0]
    return TextFeatures(
        torch.cat([text.tokens_BTD.float(), null.tokens_BTD.float().expand(B, -1, -1)]),
        torch.cat([text.mask_BT.bool(), null.mask_BT.bool().expand(B, -1)]),
        torch.cat([text.pooled_BD.float(), null.pooled_BD.float().expand(B, -1)]),
    )


def _check_top_k(top_k) -> None:
    if isinstance(top_k, (tuple, list)):  # HART's (early, late) pair has no meaning in STAR's loop
        raise ValueError(f"top_k must be an int >= 0 (0 disables it; STAR uses one k for all scales), got {top_k!r}")


@torch.no_grad()
def sample(
    model: STARForT2I,
    quantizer,
    text: TextFeatures,
    null: TextFeatures,
    *,
    cfg: float = 4.5,
    top_k: int = 600,
    top_p: float | None = 0.8,
    more_smooth: bool = False,
    generator: torch.Generator | None = None,
    return_logits: bool = False,
) -> Samples:
    """Samples (images None): the token ids (B, l) of every scale and f_hat (B, Cv, H, H) under VAR's
    rule, from the prompts' text features and the null condition (the encoding of "", one row), and
    with `return_logits` the guided logits of every scale.

    `quantizer` is the tokenizer's `MultiScaleQuantizer` (its codebook and Phi convs are used).
    """
    _check_text(model, text, null)
    check_options(cfg, top_k, top_p)
    _check_top_k(top_k)
    top_k, top_p = int(top_k), float(top_p or 0.0)
    B = text.tokens_BTD.shape[0]
    S = model.grid.num_scales
    both = cfg_batch(text, null)
    state, logits_2BlV = model.start_sampling(both.tokens_BTD, both.mask_BT, both.pooled_BD)
    codebook_VCv = quantizer.embedding.weight
    f_hat, tokens, guided = None, [], []
    for si, pn in enumerate(model.patch_nums):
        ratio = si / (S - 1)
        t = cfg * ratio
        logits_BlV = (1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]
        if return_logits:
            guided.append(logits_BlV)
        if more_smooth:
            tau = max(0.27 * (1 - ratio * 0.95), 0.005)
            weights_BlV = gumbel_softmax(logits_BlV * (1 + ratio), tau, generator)
            tokens.append(weights_BlV.argmax(dim=-1))
            h_BlCv = weights_BlV @ codebook_VCv
        else:
            idx_Bl = sample_top_k_top_p(logits_BlV, top_k, top_p, generator=generator)
            tokens.append(idx_Bl)
            h_BlCv = codebook_VCv[idx_Bl]
        h_BCvhw = h_BlCv.transpose(1, 2).reshape(B, -1, pn, pn)
        f_hat, next_BCvhw = quantizer.next_autoregressive_input(si, f_hat, h_BCvhw, phi_last=True)
        if si < S - 1:
            next_BlCv = next_BCvhw.flatten(2).transpose(1, 2)
            logits_2BlV, _ = model.sampling_step(si + 1, torch.cat([next_BlCv, next_BlCv]), state)
    return Samples(tuple(tokens), f_hat, guided_logits_BlV=tuple(guided) if return_logits else None)


@torch.no_grad()
def generate(
    model: STARForT2I,
    tokenizer,
    text_encoder: Callable[[list[str]], TextFeatures],
    prompts: list[str],
    *,
    cfg: float = 4.5,
    top_k: int = 600,
    top_p: float | None = 0.8,
    more_smooth: bool = False,
    seed: int = 1,
    batch_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    return_logits: bool = False,
) -> Samples:
    """Samples of `prompts`, one row per prompt, images included (uint8 (B, R, R, 3)).

    `tokenizer` is a `HybridTokenizer` used in discrete mode (VAR's VQVAE); `text_encoder` maps
    prompts to `TextFeatures` (`hart.text_encoder.build_star_text_encoder`: CLIP's, or any encoder
    through `PooledTextEncoder`), and its encoding of "" is the null condition. `batch_size` splits
    long prompt lists (one generator runs through the chunks in order). `autocast_dtype` (e.g.
    torch.float16, as `sample.py` runs on GPU) autocasts the transformer; the decoder always runs
    in float32. The other options are `sample`'s.
    """
    check_compatible(model.config, tokenizer.config, what="the tokenizer and the STAR transformer")
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0 or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    check_options(cfg, top_k, top_p)
    _check_top_k(top_k)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    step = batch_size or len(prompts)
    if model.config.cross_attn_batch0_quirk and min(step, len(prompts)) > 1:
        warnings.warn(
            f"cross_attn_batch0_quirk with {min(step, len(prompts))} prompts per call: as in the released sampler, "
            "every row gets prompt 0's cross-attention (the call's first); use batch_size=1 to reproduce sample.py",
            stacklevel=2,
        )
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(int(seed))
    model.eval()
    null = _encode(text_encoder, [""]).to(device)
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    )
    parts: list[Samples] = []
    for start in range(0, len(prompts), step):
        chunk = list(prompts[start : start + step])
        text = _encode(text_encoder, chunk).to(device)
        with autocast:
            samples = sample(model, tokenizer.quantize, text, null, cfg=cfg, top_k=top_k, top_p=top_p,
                             more_smooth=more_smooth, generator=generator, return_logits=return_logits)
        with torch.autocast(device_type=device.type, enabled=False):
            images_B3RR = tokenizer.decode_latent(samples.f_hat_BCvHH.float())
        parts.append(samples.with_images(to_uint8(images_B3RR)))
    return Samples.concat(parts)


def _encode(text_encoder, prompts: list[str]) -> TextFeatures:
    features = text_encoder(prompts)
    if not isinstance(features, TextFeatures) or features.tokens_BTD.shape[0] != len(prompts):
        got = type(features).__name__ if not isinstance(features, TextFeatures) else f"{features.tokens_BTD.shape[0]} rows"
        raise ValueError(f"the text encoder must return hart.star.model.TextFeatures with one row per prompt "
                         f"({len(prompts)}), got {got}")
    return features


def load_models(checkpoint: str, tokenizer: str, text_encoder: str, device: str | torch.device = "cpu"):
    """(transformer, tokenizer, text encoder) from STAR's `.pth` (`STARForT2I.from_pretrained`), a tokenizer
    folder or VAR `.pth`, and a text encoder name or folder (`hart.text_encoder.build_star_text_encoder`),
    in eval mode on `device`: what `generate` takes."""
    from hart.text_encoder import build_star_text_encoder
    from hart.tokenizer.model import HybridTokenizer

    model = STARForT2I.from_pretrained(checkpoint).to(device).eval()
    tok = HybridTokenizer.from_pretrained(tokenizer).to(device).eval()
    encoder = build_star_text_encoder(text_encoder, model.config.context_token).to(device)
    return model, tok, encoder


__all__ = ["generate", "sample", "load_models", "cfg_batch"]
