"""Text -> image generation with HART: scale-by-scale sampling, CFG, residual diffusion, decode.

Design (docs/design/transformer.md, "Sampling"): the batch is doubled for classifier-free guidance
(rows [:B] conditional, [B:] the null condition: zero features, mask with only position 0
on, text positions all 0). One transformer call per scale with a KV cache: the text step
predicts the 1x1 scale from the last text position, then each scale's input is the
area-downsampled running latent f_hat (`quantizer.next_autoregressive_input`). Per scale
the guided logits are `(1 + t) * cond - t * uncond` with `t = cfg * si / (S - 1)`; top-k is
`top_k[0]` for scales < 7 and `top_k[1]` after (HART: 600 / 300), optionally with top-p.
The last scale is predicted in one pass (HART's single maskgit iteration); its discrete
tokens get a continuous residual from the diffusion head conditioned on
`decoder_norm(h + word_embed(E[idx]))` with `eps = (1 + t) eps_c - t eps_u`, and are added to
f_hat without Phi. The tokenizer decodes f_hat.

Released-code quirk kept for parity: the last scale reuses the guidance ratio of the scale
before it, `t = cfg * (S - 2) / (S - 1)` (the reference never updates `ratio` for the last
stage), and a guidance weight of exactly 1.0 disables guidance in the diffusion head.
`more_smooth` (Gumbel-softmax soft embeddings, tau = max(0.27 (1 - 0.95 r), 0.005)) is for
visualisation; keep it False for FID. All randomness (tokens, Gumbel, diffusion noise) comes
from one generator seeded with `seed`, so a seed gives the same images on CPU.

The API is STAR's (`hart.star.generate`; docs/models.md, "Sampling API"): `sample` runs the loop on
text features and returns `hart.layers.sampling.Samples` (tokens, f_hat, guided logits on request);
`generate` encodes prompts, samples and decodes, and returns the same type with uint8 images.
With `autocast_dtype` the decoder runs under the same autocast as the transformer (as released).

Shape legend: B prompts, T text tokens, D text dim, l tokens of a scale, V vocab,
Cv token dim, C width, H latent side, R image side.
"""

from __future__ import annotations

import contextlib

import torch

from hart.pixels import to_uint8
from hart.layers.sampling import Samples, check_options, gumbel_softmax, sample_top_k_top_p
from hart.scale_grid import check_compatible
from hart.text_encoder import TextEncoder
from hart.transformer.model import HARTForT2I

LATE_SCALE_INDEX = 7  # scales >= this use top_k[1]


def _check(model: HARTForT2I, tokenizer, text_encoder: TextEncoder, prompts) -> None:
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("every prompt must be a string")
    mc = model.config
    check_compatible(mc, tokenizer.config)
    if getattr(text_encoder, "dim", mc.context_dim) != mc.context_dim:
        raise ValueError(f"text encoder dim {text_encoder.dim} != transformer context_dim {mc.context_dim}")
    if getattr(text_encoder, "max_length", mc.context_token) != mc.context_token:
        raise ValueError(f"text encoder max_length {text_encoder.max_length} != transformer context_token {mc.context_token}")


@torch.no_grad()
def sample(
    model: HARTForT2I,
    quantizer,
    text_BTD: torch.Tensor,
    text_mask_BT: torch.Tensor,
    *,
    cfg: float = 4.5,
    top_k: int | tuple[int, int] = (600, 300),
    top_p: float | None = None,
    more_smooth: bool = False,
    generator: torch.Generator | None = None,
    return_logits: bool = False,
    use_diffusion: bool = True,
    temperature: float = 1.0,
    head_cfg: float | None = None,
) -> Samples:
    """Samples (images None): the tokens per scale and f_hat (B, Cv, H, H) from text features
    (the text encoder's features and mask; the null condition is built here), and with
    `return_logits` the guided logits of every scale.

    `quantizer` is the tokenizer's `MultiScaleQuantizer` (its codebook and Phi convs are used).
    `top_k`: one k, or (k for scales < 7, k after). HART's own options: `use_diffusion` (the residual
    head on the last scale), its `temperature`, and `head_cfg`, the head's guidance: None = the
    released behaviour (the last scale's token guidance, unguided when that is 1); a number = that
    scale (1.0 = unguided).
    """
    check_options(cfg, top_k, top_p)
    if isinstance(top_k, int):
        top_k = (top_k, top_k)
    B = text_BTD.shape[0]
    S = len(model.patch_nums)
    null_mask = torch.zeros_like(text_mask_BT, dtype=torch.bool)
    null_mask[:, 0] = True
    context2 = torch.cat([text_BTD.float(), torch.zeros_like(text_BTD, dtype=torch.float32)])
    mask2 = torch.cat([text_mask_BT.bool(), null_mask])
    positions2 = torch.cat([torch.cumsum(text_mask_BT.long(), 1) - 1, torch.zeros_like(text_mask_BT, dtype=torch.long)])
    state, logits_2BlV = model.start_sampling(context2, mask2, positions2)
    codebook_VCv = quantizer.embedding.weight
    f_hat, tokens, guided, ratio = None, [], [], 0.0
    hidden_2BlC = None
    for si, pn in enumerate(model.patch_nums):
        if si < S - 1:
            ratio = si / (S - 1)  # the last scale keeps the previous ratio (released behaviour)
        t = cfg * ratio
        logits_BlV = (1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]
        if return_logits:
            guided.append(logits_BlV)
        k = top_k[0] if si < LATE_SCALE_INDEX else top_k[1]
        idx_Bl = sample_top_k_top_p(logits_BlV, k, top_p or 0.0, generator=generator)
        tokens.append(idx_Bl)
        if more_smooth:
            tau = max(0.27 * (1 - ratio * 0.95), 0.005)
            h_BlCv = gumbel_softmax(logits_BlV * (1 + ratio), tau, generator) @ codebook_VCv
        else:
            h_BlCv = codebook_VCv[idx_Bl]
        if si == S - 1 and use_diffusion:
            z = model.diffusion_condition(hidden_2BlC, torch.cat([idx_Bl, idx_Bl]), codebook_VCv)
            z_NC = z.reshape(-1, z.shape[-1])
            guidance = t if head_cfg is None else head_cfg
            residual = model.diffloss.sample(z_NC, cfg=None if guidance == 1.0 else guidance, temperature=temperature,
                                             generator=generator)
            h_BlCv = h_BlCv + residual.view(2 * B, pn * pn, -1)[:B].to(h_BlCv.dtype)
        h_BCvhw = h_BlCv.transpose(1, 2).reshape(B, -1, pn, pn)
        f_hat, next_BCvhw = quantizer.next_autoregressive_input(si, f_hat, h_BCvhw)
        if si < S - 1:
            next_BlCv = next_BCvhw.flatten(2).transpose(1, 2)
            logits_2BlV, hidden_2BlC = model.sampling_step(si + 1, torch.cat([next_BlCv, next_BlCv]), state)
    return Samples(tuple(tokens), f_hat, guided_logits_BlV=tuple(guided) if return_logits else None)


@torch.no_grad()
def generate(
    model: HARTForT2I,
    tokenizer,
    text_encoder: TextEncoder,
    prompts: list[str],
    *,
    cfg: float = 4.5,
    top_k: int | tuple[int, int] = (600, 300),
    top_p: float | None = None,
    more_smooth: bool = False,
    seed: int = 0,
    batch_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    return_logits: bool = False,
    use_diffusion: bool = True,
    temperature: float = 1.0,
    head_cfg: float | None = None,
) -> Samples:
    """Samples of `prompts`, one row per prompt, images included (uint8 (B, R, R, 3)).

    `tokenizer` is a `HybridTokenizer` (its `quantize` and `decode_latent` are used);
    `text_encoder` returns (features, mask) with `dim == context_dim`, `max_length == context_token`.
    `batch_size` splits long prompt lists (one generator runs through the chunks in order);
    the other options are `sample`'s.
    """
    _check(model, tokenizer, text_encoder, prompts)
    check_options(cfg, top_k, top_p)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(top_k, int):
        top_k = (top_k, top_k)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(int(seed))
    model.eval()
    parts: list[Samples] = []
    step = batch_size or len(prompts)
    for start in range(0, len(prompts), step):
        chunk = list(prompts[start : start + step])
        features_BTD, mask_BT = text_encoder(chunk)
        if features_BTD.shape[0] != len(chunk) or mask_BT.shape[0] != len(chunk):
            raise ValueError(
                f"text encoder returned {features_BTD.shape[0]} features / {mask_BT.shape[0]} masks for {len(chunk)} prompts"
            )
        autocast = (
            torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        )
        with autocast:
            samples = sample(
                model, tokenizer.quantize, features_BTD.to(device), mask_BT.to(device), cfg=cfg, top_k=tuple(top_k),
                top_p=top_p, more_smooth=more_smooth, generator=generator, return_logits=return_logits,
                use_diffusion=use_diffusion, temperature=temperature, head_cfg=head_cfg,
            )
            images_B3HW = tokenizer.decode_latent(samples.f_hat_BCvHH.float())
        parts.append(samples.with_images(to_uint8(images_B3HW)))
    return Samples.concat(parts)


def load_models(llm: str, tokenizer: str, text_encoder: str, ema: bool = False, device: str | torch.device = "cpu"):
    """(transformer, tokenizer, text encoder) from an official-layout `llm/` and `tokenizer/` folder and a
    text encoder name or folder (`hart.text_encoder.build_text_encoder`), in eval mode on `device`:
    what `generate` takes."""
    from hart.text_encoder import build_text_encoder
    from hart.tokenizer.model import HybridTokenizer

    model = HARTForT2I.from_pretrained(llm, ema=ema).to(device).eval()
    tok = HybridTokenizer.from_pretrained(tokenizer).to(device).eval()
    encoder = build_text_encoder(text_encoder, max_length=model.config.context_token)
    return model, tok, encoder


__all__ = ["generate", "sample", "load_models"]
