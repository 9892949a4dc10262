"""STAR's released checkpoint layout (`.pth` trainer dict), read strictly and written back.

Layout (STAR-T2I `train.py` saves, `sample.py` loads with a strict `load_state_dict`):
    {"epoch": int, "iter": int,
     "trainer": {"config": {"patch_nums", "resos", "label_smooth", "prog_it", "last_prog_si", "first_prog"},
                 "var_wo_ddp": <model state dict>, "vae_local": ..., "var_opt": ...}}
`vae_local` (the tokenizer) and `var_opt` (optimizer) may be present; only `var_wo_ddp` is read.
A bare model state dict is accepted too. Files go through `hart.weights` (torch.load with
weights_only=True: plain data only, a pickle with code objects is refused).

Design: as `hart.transformer.checkpoint`, this module imports no model code at import time: reading
returns (state, trainer config) and `STARForT2I.from_pretrained` builds the model and loads it with
`load_state_into`, so the model file depends on this adapter and never the other way round. The key check is strict and total: one
ValueError lists every missing, unexpected and mis-shaped key (`hart.weights.match_state_dict`), so
a wrong checkpoint never loads half-way.
`config_from_state_dict` reads the architecture off the tensor shapes (depth, width, heads when
`attn_l2_norm`, text width, vocabulary, token width, class rows, scale count, FFN ratio); what
shapes cannot tell (the scale list beyond its length, RoPE constants, `logit_norm`) comes from
the trainer dict's `patch_nums` and a base config (default: the released preset of that shape).
Saving writes the trainer-dict layout with a config STAR's trainer accepts (`resos` = pn * 16).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from hart.star.config import STAR_PRESETS, StarConfig
from hart.weights import TRAINER_MODEL_KEY as MODEL_KEY
from hart.weights import load_torch_checkpoint, match_state_dict, save_torch_checkpoint

# STAR's tokenizer (VAR's VQVAE) downsamples 16x: the trainer records each scale's pixel size.
PATCH_SIZE = 16


def read_star_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(model state dict, trainer config or None) of a released-format `.pth` or a bare state dict."""
    obj = load_torch_checkpoint(path)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} does not hold a dict (got {type(obj).__name__})")
    trainer_config = None
    if "trainer" in obj:
        trainer = obj["trainer"]
        if not isinstance(trainer, Mapping) or MODEL_KEY not in trainer:
            raise ValueError(f"{path}: a trainer dict needs trainer[{MODEL_KEY!r}] (the model weights)")
        state, trainer_config = trainer[MODEL_KEY], trainer.get("config")
    else:
        state = obj
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: the model state holds entries that are not tensors: {bad[:10]}")
    return dict(state), trainer_config


def config_from_state_dict(
    state: Mapping[str, torch.Tensor], patch_nums: tuple[int, ...] | None = None, base: StarConfig | None = None
) -> StarConfig:
    """The config the tensor shapes imply, on top of `base` (default: the preset of that depth and scale list)."""
    try:
        width, token_dim = state["word_embed.weight"].shape
        vocab_size = state["head_logits.weight"].shape[0]
        text_dim = state["encoder_proj.weight"].shape[1]
        num_classes = state["class_emb.weight"].shape[0] - 1
        num_scales = state["lvl_embed.weight"].shape[0]
        ffn_hidden = state["blocks.0.ffn.fc1.weight"].shape[0]
    except KeyError as exc:
        raise ValueError(f"not a STAR state dict: no {exc.args[0]!r}") from None
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    scale_mul = state.get("blocks.0.attn.scale_mul_1H11")
    shape = {
        "depth": depth, "embed_dim": width, "token_dim": token_dim, "vocab_size": vocab_size, "text_dim": text_dim,
        "num_classes": num_classes, "mlp_ratio": ffn_hidden / width, "attn_l2_norm": scale_mul is not None,
    }
    if scale_mul is not None:
        shape["num_heads"] = scale_mul.shape[1]
    if patch_nums is not None:
        shape["patch_nums"] = tuple(int(p) for p in patch_nums)
    if base is None:
        base = _matching_preset(depth, width, shape.get("patch_nums"), num_scales)
    if "num_heads" not in shape:  # without attn_l2_norm no tensor records the head count: keep 64-wide heads
        shape["num_heads"] = max(1, width // base.head_dim())
    config = dataclasses.replace(base, **shape)
    if len(config.patch_nums) != num_scales:
        raise ValueError(f"the checkpoint has {num_scales} level embeddings but patch_nums {config.patch_nums} "
                         f"has {len(config.patch_nums)} scales")
    return config


def _matching_preset(depth: int, width: int, patch_nums: tuple[int, ...] | None, num_scales: int) -> StarConfig:
    """The released preset of this shape, or the plain defaults (released constants) with the scale list given."""
    for preset in STAR_PRESETS.values():
        if (preset.depth, preset.embed_dim) == (depth, width) and (
            preset.patch_nums == patch_nums or (patch_nums is None and len(preset.patch_nums) == num_scales)
        ):
            return preset
    if patch_nums is None:
        raise ValueError(f"no released STAR preset has depth {depth}, width {width} and {num_scales} scales; "
                         "pass patch_nums (or a base config)")
    return StarConfig(patch_nums=patch_nums)


def load_state_into(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Strict load: every key of the model present with its shape, nothing else."""
    match_state_dict(model.state_dict(), state, what)
    model.load_state_dict(state, strict=True)


def save_star(model: nn.Module, path: str | Path, epoch: int = 0, iteration: int = 0) -> None:
    """Write the trainer-dict layout STAR's `sample.py` and trainer read (model weights only)."""
    patch_nums = tuple(model.config.patch_nums)
    trainer_config = {
        "patch_nums": patch_nums, "resos": tuple(pn * PATCH_SIZE for pn in patch_nums), "label_smooth": 0.0,
        "prog_it": 0, "last_prog_si": -1, "first_prog": True,
    }
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_torch_checkpoint({"epoch": epoch, "iter": iteration, "trainer": {"config": trainer_config, MODEL_KEY: state}},
                          path)


__all__ = ["read_star_checkpoint", "config_from_state_dict", "load_state_into", "save_star"]
