"""Reading and writing weight files safely, and strict state-dict matching.

Design: this is the only module that opens weight files. It accepts safetensors and
pickled torch files, the latter only through `torch.load(weights_only=True)`, which
refuses arbitrary Python objects (a malicious pickle raises instead of executing).
`match_state_dict` compares a checkpoint against a module's expected keys and shapes and
raises one `ValueError` that lists every missing, unexpected and mis-shaped key, so a
wrong checkpoint never loads half-way.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file as _load_safetensors
from safetensors.torch import save_file as _save_safetensors

# Where VAR-style trainer checkpoints (VAR's, STAR's released .pth) keep the model: ckpt["trainer"][TRAINER_MODEL_KEY].
TRAINER_MODEL_KEY = "var_wo_ddp"
# File names the HF `save_pretrained` layout uses, in the order we look for them.
WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin")
SHARD_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def load_weight_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load one weight file (.safetensors, or .bin/.pth/.pt via weights_only torch.load) on CPU."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        return _load_safetensors(str(path), device="cpu")
    state = load_torch_checkpoint(path)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    # Training checkpoints sometimes nest the weights (VAR, STAR: {"trainer": {"var_wo_ddp": ...}}; others: {"model": ...}).
    trainer = state.get("trainer")
    if isinstance(trainer, Mapping) and isinstance(trainer.get(TRAINER_MODEL_KEY), Mapping):
        state = trainer[TRAINER_MODEL_KEY]
    for key in ("state_dict", "model"):
        if key in state and isinstance(state[key], Mapping) and not isinstance(state[key], torch.Tensor):
            state = state[key]
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: entries that are not tensors: {bad[:10]}")
    return dict(state)


def load_torch_checkpoint(path: str | Path) -> object:
    """The object of a pickled torch file, through `torch.load(weights_only=True)` on CPU.

    For layouts that nest weights among other plain data (STAR's trainer dict: configs, optimizer
    state); `load_weight_file` is the flat-state-dict reader built on it.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weight file not found: {path}")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"refusing to load {path}: it is not a plain tensor state dict "
            f"(torch.load(weights_only=True) rejected it: {str(exc).splitlines()[0]})"
        ) from None


def save_torch_checkpoint(obj: object, path: str | Path) -> None:
    """torch.save of plain data (nested dicts of tensors, numbers, strings), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, str(tmp))
    tmp.replace(path)


def load_weight_folder(folder: str | Path) -> dict[str, torch.Tensor]:
    """Load the weights of an HF-style folder (single file or sharded with an index)."""
    folder = Path(folder)
    for name in SHARD_INDEX_NAMES:
        index = folder / name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_weight_file(folder / shard))
            return state
    for name in WEIGHT_FILE_NAMES:
        if (folder / name).is_file():
            return load_weight_file(folder / name)
    raise ValueError(f"no weights in {folder}: expected one of {WEIGHT_FILE_NAMES + SHARD_INDEX_NAMES}")


def save_weight_file(state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Save a state dict; the format follows the suffix (.safetensors or .bin/.pth)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared storage; clone so tied/viewed tensors are written independently.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    if path.suffix != ".safetensors":
        save_torch_checkpoint(tensors, path)
        return
    tmp = path.with_name(path.name + ".tmp")
    _save_safetensors(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)  # atomic: a reader never sees a half-written file


def match_state_dict(
    expected: Mapping[str, torch.Tensor],
    loaded: Mapping[str, torch.Tensor],
    what: str,
    ignore_unexpected_prefixes: tuple[str, ...] = (),
) -> None:
    """Raise ValueError naming every missing, unexpected and wrong-shape key."""
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(
        k for k in set(loaded) - set(expected) if not k.startswith(ignore_unexpected_prefixes)
    )
    wrong_shape = sorted(
        f"{k}: checkpoint {tuple(loaded[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(loaded)
        if tuple(expected[k].shape) != tuple(loaded[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_clip(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_clip(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes ({len(wrong_shape)}): {_clip(wrong_shape)}")
    if problems:
        raise ValueError(f"cannot load {what}: " + "; ".join(problems))


def _clip(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")
