"""Start weights of a training stage: which file of a folder to read, and a strict load that lets
the scale-derived buffers differ (progressive training at another resolution).

Design: `read_start_weights` accepts every layout a run may start from: a training checkpoint
folder (its EMA when present), an official `llm/` folder (its `ema_model.bin` when present: the
weights the released model samples with), a `tokenizer/` folder, or a single weight file. Every
read goes through `hart.weights` (safetensors or weights_only torch.load). With RoPE no parameter
depends on the scale list, so `load_compatible_weights` requires every parameter to match and only
keeps the model's own values of the buffers derived from the scale list.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hart.training.checkpoint import read_meta
from hart.weights import load_weight_file, load_weight_folder, match_state_dict

# Buffers computed from the scale list: a start checkpoint made for another list has other shapes.
SCALE_DERIVED_KEYS = ("lvl_1L", "attn_bias_for_masking", "quantize.ema_vocab_hit_SV")


def read_start_weights(location: Path, name: str = "") -> dict[str, torch.Tensor]:
    """The state dict to start from at a local `location`; `name` (default: the location) in errors."""
    from hart.tokenizer.model import split_tokenizer_state
    from hart.transformer.checkpoint import EMA_FILE

    location = Path(location)
    if (location / "meta.json").is_file():
        read_meta(location)  # validates the format version
        file = "ema.safetensors" if (location / "ema.safetensors").is_file() else "model.safetensors"
        return load_weight_file(location / file)
    if (location / EMA_FILE).is_file():
        return load_weight_file(location / EMA_FILE)
    if location.is_dir():
        state = load_weight_folder(location)
        if any(k.startswith("vae.") for k in state):
            return split_tokenizer_state(state)[0]
        return state
    if location.is_file():
        return load_weight_file(location)
    raise ValueError(f"model.init_from not found: {name or location}")


def load_compatible_weights(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> list[str]:
    """Strict load except the scale-derived buffers, which keep the model's own values.

    Returns the names of the buffers that were rebuilt (different scale list). `lvl_1L` is the
    scale list itself (each position's level), so it is rebuilt whenever its values differ, even at an
    equal token count ((1,2,3,4,6,8) and (1,2,5,6,8) both have 130); the quantizer's per-scale usage
    counts are training state and are kept unless the number of scales differs.
    """
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k != "attn_bias_for_masking"}
    rebuilt = []
    for key in SCALE_DERIVED_KEYS:
        if key not in state or key not in own:
            continue
        differs = state[key].shape != own[key].shape or (key == "lvl_1L" and not torch.equal(state[key], own[key]))
        if differs:
            state[key] = own[key]
            rebuilt.append(key)
    match_state_dict(own, state, what)
    model.load_state_dict(state, strict=True)
    return rebuilt


__all__ = ["read_start_weights", "load_compatible_weights", "SCALE_DERIVED_KEYS"]
