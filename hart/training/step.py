"""Pure training machinery: parameter groups, AdamW, LR schedule, EMA, and one optimizer step.

Design: everything here is plain single-process PyTorch so it can be unit-tested without
Ray, MLflow or a process group. `trainer/worker.py` wraps it; `hart/training/parallelize.py` wraps the
model (DDP/FSDP2) from the outside. `train_step` only duck-types the wrapper to skip
gradient all-reduce on all but the last micro-batch (`no_sync` for DDP,
`set_requires_gradient_sync` for FSDP2).

Recipe (VAR's released trainer; HART's own recipe is unpublished; docs/design/training-recipe.md,
"Optimizer and schedule"):
- AdamW, betas (0.9, 0.95); weight decay on matrices only. No decay on 1-D params
  (biases, norms, gains) and on embedding-like tensors, matched by name (VAR's list:
  positional tables, level embedding, AdaLN gains, attention scale) and by module type
  (`nn.Embedding`, which covers the codebook).
- LR schedule `lin0`: linear warmup from `warmup_start_ratio` of the peak, a short
  plateau, then linear decay to `end_ratio`; `cosine` is offered as well.
- Gradient clipping (VAR: 2.0), bf16 autocast (no GradScaler needed), EMA of weights.

Non-finite handling: the loss and the (already all-reduced) gradient norm are checked
after backward and before `optimizer.step()`. Under DDP the gradient norm is identical on
every rank, so all ranks raise `NonFiniteLossError` at the same step and none of them
applies the poisoned update; the caller keeps the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

# Name fragments of parameters that VAR trains without weight decay (besides 1-D params).
NO_DECAY_NAME_FRAGMENTS = (
    "pos_start", "pos_1LC", "lvl_embed", "ada_gss", "scale_mul", "cls_token", "class_emb", "embedding",
)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SCHEDULES = ("lin0", "cosine", "constant")


class NonFiniteLossError(RuntimeError):
    """Raised before the optimizer step when the loss or the gradient norm is NaN/inf."""

    def __init__(self, step: int, what: str, value: float):
        super().__init__(f"non-finite {what} ({value}) at step {step}; the update was not applied")
        self.step = step
        self.what = what


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW and schedule hyper-parameters (VAR defaults)."""

    lr: float = 1e-4  # peak learning rate (already scaled for the global batch)
    betas: tuple[float, ...] = (0.9, 0.95)
    weight_decay: float = 0.05
    eps: float = 1e-8
    schedule: str = "lin0"  # "lin0" (VAR) | "cosine" | "constant"
    warmup_steps: int = 0
    warmup_start_ratio: float = 0.005  # VAR's wp0: warmup starts at this fraction of lr
    plateau_fraction: float = 0.05  # lin0: flat share of the post-warmup steps
    end_ratio: float = 0.1  # final lr as a fraction of the peak (VAR's wpe)
    clip_grad_norm: float = 2.0  # <= 0 disables clipping (the norm is still measured)
    fused: bool = False  # torch fused AdamW (GPU)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if len(self.betas) != 2:
            raise ValueError(f"betas must have two values, got {self.betas}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


# --------------------------------------------------------------------------------------
# Parameter groups and optimizer
# --------------------------------------------------------------------------------------


def parameter_groups(
    model: nn.Module, weight_decay: float, extra_no_decay: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """Split trainable params into decay / no-decay groups (VAR's rule); frozen ones are left out."""
    fragments = NO_DECAY_NAME_FRAGMENTS + tuple(extra_no_decay)
    embedding_params = {
        id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)
    }
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or id(param) in embedding_params or any(f in name for f in fragments):
            no_decay.append(param)
            no_decay_names.append(name)
        else:
            decay.append(param)
            decay_names.append(name)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "names": decay_names})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "names": no_decay_names})
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.AdamW:
    groups = parameter_groups(model, config.weight_decay)
    for group in groups:
        group.pop("names")  # torch keeps unknown keys in state_dict; names stay out of it
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, fused=config.fused or None
    )


def lr_factor(step: int, total_steps: int, config: OptimizerConfig) -> float:
    """Multiplier of the peak LR at `step` (0-based) of `total_steps`."""
    warmup = config.warmup_steps
    if step < warmup:
        start = config.warmup_start_ratio
        return start + (1.0 - start) * step / warmup
    if config.schedule == "constant":
        return 1.0
    remaining = max(total_steps - warmup, 1)
    progress = min((step - warmup) / remaining, 1.0)
    end = config.end_ratio
    if config.schedule == "cosine":
        return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # lin0: flat for plateau_fraction of the remainder, then linear down to end_ratio
    plateau = config.plateau_fraction
    if progress <= plateau:
        return 1.0
    return 1.0 - (1.0 - end) * (progress - plateau) / (1.0 - plateau)


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, config: OptimizerConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over `lr_factor`; its state_dict holds only the step counter, so resume is exact."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, config))


def restore_scheduler(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    scheduler_state: Mapping[str, Any] | None,
) -> None:
    """Load the scheduler's step counter and set each group's lr to the scheduled value."""
    if scheduler is not None and scheduler_state is not None:
        scheduler.load_state_dict(dict(scheduler_state))
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr


# --------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------


class ExponentialMovingAverage:
    """Shadow copy of a model's state dict: params are averaged, buffers are copied.

    The shadow holds every persistent state-dict entry (HART's `ema_model.bin` is loaded
    strictly, buffers included), kept in float32 on the parameters' device.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {
            name: value.detach().clone().float() if value.is_floating_point() else value.detach().clone()
            for name, value in model.state_dict().items()
        }
        self.param_names = {name for name, _ in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Trained parameters: shadow += (1 - decay) (value - shadow); everything else is copied.

        Two multi-tensor calls instead of one lerp or copy per entry (~360 dispatches a step for the
        small 256px preset, each a kernel launch on a GPU); same arithmetic, bit for bit. The live
        tensors are read (`keep_vars`, no detach: grad is off here) and cast only when not fp32, so no
        other op runs per entry.
        """
        params = dict(model.named_parameters())
        averaged, averaged_values, copied, copied_values = [], [], [], []
        for name, value in model.state_dict(keep_vars=True).items():
            if name in self.param_names and params[name].requires_grad:
                averaged.append(self.shadow[name])
                averaged_values.append(value if value.dtype == torch.float32 else value.float())
            else:
                copied.append(self.shadow[name])
                copied_values.append(value)
        if averaged:
            torch._foreach_lerp_(averaged, averaged_values, 1.0 - self.decay)
        if copied:
            torch._foreach_copy_(copied, copied_values)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks keys: {sorted(missing)[:10]}")
        for name, value in state.items():
            if name in self.shadow:
                self.shadow[name].copy_(value)

    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into `model` (cast to its dtypes)."""
        model.load_state_dict(
            {k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()}, strict=True
        )


# --------------------------------------------------------------------------------------
# One optimizer step
# --------------------------------------------------------------------------------------


def _gradient_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip gradient all-reduce for accumulation micro-batches (DDP / FSDP2 by duck typing)."""
    if enabled:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DistributedDataParallel
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2 FSDPModule

        @contextlib.contextmanager
        def fsdp_no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return fsdp_no_sync()
    return contextlib.nullcontext()


def autocast(device_type: str, precision: str) -> contextlib.AbstractContextManager:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


LossFunction = Callable[[nn.Module, Any], Mapping[str, torch.Tensor]]


def train_step(
    model: nn.Module,
    loss_fn: LossFunction,
    micro_batches: Sequence[Any],
    optimizer: torch.optim.Optimizer,
    *,
    step: int,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    clip_grad_norm: float = 0.0,
    precision: str = "fp32",
    device_type: str = "cpu",
    parameters: Iterable[torch.Tensor] | None = None,
    weights: Sequence[float] | None = None,
) -> dict[str, float]:
    """Forward/backward over `micro_batches` (gradient accumulation), clip, check, step.

    `loss_fn(model, batch)` returns a dict with a differentiable "loss" plus any scalar
    metrics; metrics are averaged over micro-batches. `weights` (default all 1) scale each
    micro-batch's loss and metrics inside that average: micro-batches of unequal sizes weighted by
    their rows (size x count / total) average to the loss of all their rows. Returns floats: the
    averaged metrics, "grad_norm" (before clipping) and "lr" (the one used for this update).
    Raises NonFiniteLossError without touching the weights if loss or grad norm is
    NaN/inf.
    """
    if not micro_batches:
        raise ValueError("train_step needs at least one micro-batch")
    num_micro = len(micro_batches)
    weights = [1.0] * num_micro if weights is None else [float(w) for w in weights]
    assert len(weights) == num_micro, "one weight per micro-batch"
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, torch.Tensor] = {}
    for index, batch in enumerate(micro_batches):
        with _gradient_sync(model, enabled=index == num_micro - 1):
            with autocast(device_type, precision):
                out = loss_fn(model, batch)
            (out["loss"].float() * weights[index] / num_micro).backward()
        for key, value in out.items():
            if torch.is_tensor(value) and value.numel() == 1:
                sums[key] = sums.get(key, 0.0) + value.detach().float() * weights[index]
    metrics = {key: float(value) / num_micro for key, value in sums.items()}
    # The norm first: under FSDP2 it is a collective, so every rank must reach it before any raises.
    params = [p for p in (parameters if parameters is not None else model.parameters()) if p.grad is not None]
    max_norm = clip_grad_norm if clip_grad_norm > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    if not math.isfinite(metrics["loss"]):
        raise NonFiniteLossError(step, "loss", metrics["loss"])
    if not math.isfinite(grad_norm):
        raise NonFiniteLossError(step, "gradient norm", grad_norm)
    metrics["grad_norm"] = grad_norm
    metrics["lr"] = optimizer.param_groups[0]["lr"]
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return metrics


__all__ = [
    "NonFiniteLossError", "OptimizerConfig", "parameter_groups", "build_optimizer", "lr_factor",
    "build_scheduler", "restore_scheduler", "ExponentialMovingAverage", "train_step", "autocast", "PRECISIONS",
]
