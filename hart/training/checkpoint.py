"""Training-state checkpoints: weights, EMA, optimizer, scheduler, RNG and a versioned meta.json.

Design: a checkpoint is a plain directory of safetensors files plus JSON, so it can be
written by any storage layer (Ray Train uploads the directory to local disk or S3) and
read without unpickling anything:

    meta.json                 format_version, step, data_epoch, stage, run ids, config, ...
    model.safetensors         full (unsharded) state dict of the trained module
    ema.safetensors           EMA shadow (same keys), optional
    optimizer.safetensors     optimizer tensors, flattened as "state.<param>.<name>"
    optimizer.json            the non-tensor rest of the optimizer state (param_groups)
    scheduler.json            LR scheduler state (a step counter and lrs)
    extra_<name>.safetensors  other trained modules (e.g. the tokenizer's discriminator)
    optimizer_<name>.*        their optimizers, same flattening
    rng_rank<r>.safetensors   torch / numpy / python RNG state of rank r

Every file goes through `hart/weights.py` (safetensors only), so a hostile checkpoint
cannot run code. `upgrade_meta` is the one place that adapts older formats.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hart.weights import load_weight_file, save_weight_file

CHECKPOINT_FORMAT_VERSION = 1
META_FILE = "meta.json"


@dataclass
class TrainingState:
    """What `load_training_state` returns; absent parts are None / empty."""

    meta: dict[str, Any]
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None = None
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    extra: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    extra_optimizers: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.meta["step"])


# --------------------------------------------------------------------------------------
# Optimizer state <-> flat tensors + JSON
# --------------------------------------------------------------------------------------


def flatten_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into safetensors-able tensors and a JSON structure.

    Param keys are ints for a plain optimizer and FQN strings for a distributed full
    optimizer state; both are kept with their type so the round trip is exact.
    """
    tensors: dict[str, torch.Tensor] = {}
    structure: dict[str, Any] = {"param_groups": state_dict["param_groups"], "state": []}
    for param_key, entries in state_dict["state"].items():
        record = {"key": param_key, "tensors": [], "values": {}}
        for name, value in entries.items():
            if torch.is_tensor(value):
                flat_name = f"state.{param_key}.{name}"
                tensors[flat_name] = value.detach().cpu()
                record["tensors"].append(name)
            else:
                record["values"][name] = value
        structure["state"].append(record)
    return tensors, structure


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], structure: dict[str, Any]) -> dict[str, Any]:
    state: dict[Any, dict[str, Any]] = {}
    for record in structure["state"]:
        key = record["key"]
        entries = dict(record["values"])
        for name in record["tensors"]:
            entries[name] = tensors[f"state.{key}.{name}"]
        state[key] = entries
    return {"state": state, "param_groups": structure["param_groups"]}


# --------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------


def rng_state_tensors() -> dict[str, torch.Tensor]:
    version, python_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(list(python_state), dtype=torch.int64),
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_extra": torch.tensor([np_pos, np_has_gauss, np_gauss], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{index}"] = cuda_state
    return state


def set_rng_state_tensors(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), None))
    pos, has_gauss, gauss = state["numpy_extra"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    if torch.cuda.is_available():
        cuda_states = [state[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in state]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)


def save_rng_state(directory: str | Path, rank: int) -> None:
    save_weight_file(rng_state_tensors(), Path(directory) / f"rng_rank{rank}.safetensors")


def load_rng_state(directory: str | Path, rank: int) -> bool:
    """Restore this rank's RNG; returns False when the checkpoint has none for this rank."""
    path = Path(directory) / f"rng_rank{rank}.safetensors"
    if not path.is_file():
        return False
    set_rng_state_tensors(load_weight_file(path))
    return True


# --------------------------------------------------------------------------------------
# Whole state
# --------------------------------------------------------------------------------------


def upgrade_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """Bring an older meta.json to the current format; refuse newer ones."""
    version = int(meta.get("format_version", 0))
    if version > CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"checkpoint format {version} is newer than this code understands ({CHECKPOINT_FORMAT_VERSION})"
        )
    if "step" not in meta:
        raise ValueError("checkpoint meta.json has no 'step'")
    meta = dict(meta)
    meta.setdefault("data_epoch", 0)
    meta["format_version"] = CHECKPOINT_FORMAT_VERSION
    return meta


def save_training_state(
    directory: str | Path,
    *,
    meta: dict[str, Any],
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor] | None = None,
    optimizer: dict[str, Any] | None = None,
    scheduler: dict[str, Any] | None = None,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
    extra_optimizers: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write a checkpoint directory; meta.json is written last so it marks completeness."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if "step" not in meta:
        raise ValueError("meta must contain 'step'")
    save_weight_file(model, directory / "model.safetensors")
    if ema is not None:
        save_weight_file(ema, directory / "ema.safetensors")
    if optimizer is not None:
        tensors, structure = flatten_optimizer_state(optimizer)
        save_weight_file(tensors, directory / "optimizer.safetensors")
        (directory / "optimizer.json").write_text(json.dumps(structure))
    if scheduler is not None:
        (directory / "scheduler.json").write_text(json.dumps(scheduler))
    for name, state in (extra or {}).items():
        save_weight_file(state, directory / f"extra_{name}.safetensors")
    for name, state in (extra_optimizers or {}).items():
        tensors, structure = flatten_optimizer_state(state)
        save_weight_file(tensors, directory / f"optimizer_{name}.safetensors")
        (directory / f"optimizer_{name}.json").write_text(json.dumps(structure))
    full_meta = {**meta, "format_version": CHECKPOINT_FORMAT_VERSION}
    (directory / META_FILE).write_text(json.dumps(full_meta, indent=1, sort_keys=True))
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise ValueError(f"{directory} is not a training checkpoint (no {META_FILE})")
    return upgrade_meta(json.loads(path.read_text()))


def load_training_state(directory: str | Path) -> TrainingState:
    directory = Path(directory)
    meta = read_meta(directory)
    state = TrainingState(meta=meta, model=load_weight_file(directory / "model.safetensors"))
    if (directory / "ema.safetensors").is_file():
        state.ema = load_weight_file(directory / "ema.safetensors")
    if (directory / "optimizer.json").is_file():
        tensors = (
            load_weight_file(directory / "optimizer.safetensors")
            if (directory / "optimizer.safetensors").is_file() else {}
        )
        state.optimizer = unflatten_optimizer_state(tensors, json.loads((directory / "optimizer.json").read_text()))
    if (directory / "scheduler.json").is_file():
        state.scheduler = json.loads((directory / "scheduler.json").read_text())
    for path in sorted(directory.glob("extra_*.safetensors")):
        state.extra[path.stem[len("extra_"):]] = load_weight_file(path)
    for path in sorted(directory.glob("optimizer_*.json")):
        name = path.stem[len("optimizer_"):]
        tensors = load_weight_file(directory / f"optimizer_{name}.safetensors")
        state.extra_optimizers[name] = unflatten_optimizer_state(tensors, json.loads(path.read_text()))
    return state


__all__ = [
    "CHECKPOINT_FORMAT_VERSION", "TrainingState", "save_training_state", "load_training_state", "read_meta",
    "upgrade_meta", "save_rng_state", "load_rng_state", "flatten_optimizer_state", "unflatten_optimizer_state",
    "rng_state_tensors", "set_rng_state_tensors",
]
