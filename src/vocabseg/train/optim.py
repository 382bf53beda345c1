"""Optimiser, learning-rate schedule and mixed precision, all chosen by name from a recipe.

Optimisers and schedules are looked up in small tables (never ``if`` chains), so adding one is one
entry. Each of the model's named parameter groups gets ``lr × lr_mult[group]`` and
``weight_decay × wd_mult[group]``, which is how recipes give a fine-tuned CLIP a smaller rate than a
head trained from scratch.

Mixed precision runs only on CUDA: on CPU, a recipe asking for ``bf16``/``fp16`` is refused with a
:class:`~vocabseg.train.model.TrainingError` rather than silently trained in float32, so a recipe never
means two different things.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from .model import TrainingError

if TYPE_CHECKING:
    from .recipe import OptimConfig, Recipe, ScheduleConfig

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "AMP_DTYPES",
    "build_optimizer",
    "build_scheduler",
    "lr_factor",
    "check_amp",
    "autocast",
    "grad_scaler",
]


def _adamw(groups: list[dict[str, Any]], c: OptimConfig) -> Optimizer:
    return torch.optim.AdamW(groups, lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay)


def _adam(groups: list[dict[str, Any]], c: OptimConfig) -> Optimizer:
    return torch.optim.Adam(groups, lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay)


def _sgd(groups: list[dict[str, Any]], c: OptimConfig) -> Optimizer:
    return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)


#: optimiser name -> factory(param groups, config)
OPTIMIZERS: dict[str, Callable[[list[dict[str, Any]], OptimConfig], Optimizer]] = {
    "adamw": _adamw,
    "adam": _adam,
    "sgd": _sgd,
}

#: schedule name -> shape(t, config) in [0, 1] for progress t in [0, 1] after warm-up
SCHEDULES: dict[str, Callable[[float, ScheduleConfig], float]] = {
    "cosine": lambda t, s: 0.5 * (1.0 + math.cos(math.pi * t)),
    "poly": lambda t, s: (1.0 - t) ** s.power,
    "constant": lambda t, s: 1.0,
}

#: recipe ``amp`` value -> autocast dtype (``None``: full precision)
AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_optimizer(model: nn.Module, config: OptimConfig) -> Optimizer:
    """The recipe's optimiser over ``model.param_groups()``, one torch param group per named group."""
    names = {id(p): n for n, p in model.named_parameters()}
    owner: dict[int, str] = {}
    groups: list[dict[str, Any]] = []
    declared = model.param_groups()
    for group, params in declared.items():
        params = list(params)
        if not params:
            continue
        for p in params:
            label = names.get(id(p), f"a parameter of shape {tuple(p.shape)}")
            if not p.requires_grad:
                raise TrainingError(f"Parameter group {group!r} holds {label}, which does not require grad.")
            if id(p) in owner:
                raise TrainingError(f"{label} appears twice in param_groups() (in {owner[id(p)]!r} and {group!r}).")
            owner[id(p)] = group
        groups.append(
            {
                "params": params,
                "name": group,
                "lr": config.lr * config.lr_mult.get(group, 1.0),
                "weight_decay": config.weight_decay * config.wd_mult.get(group, 1.0),
            }
        )
    if not groups:
        raise TrainingError(f"{type(model).__name__} has no trainable parameters: param_groups() is empty.")
    left_out = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owner]
    if left_out:
        raise TrainingError(
            f"{len(left_out)} trainable parameter(s) are in no group of param_groups(), e.g. "
            f"{', '.join(left_out[:4])}; freeze them (requires_grad_(False)) or put them in a group."
        )
    unused = sorted((set(config.lr_mult) | set(config.wd_mult)) - set(declared))
    if unused:
        warnings.warn(
            f"optim.lr_mult/wd_mult name group(s) {unused} that the model does not have "
            f"(groups: {sorted(declared)}); they have no effect.",
            stacklevel=2,
        )
    return OPTIMIZERS[config.name](groups, config)


def lr_factor(schedule: ScheduleConfig, step: int, max_iters: int, base_lr: float) -> float:
    """The factor on every group's learning rate before optimiser step ``step + 1``.

    Linear warm-up from ``warmup_start_factor`` to 1 over ``warmup_iters`` steps, then the schedule's
    shape from 1 down to ``min_lr / base_lr`` at ``max_iters`` (so the recipe's ``lr`` ends at
    ``min_lr`` and a group with ``lr_mult`` m ends at ``m × min_lr``).
    """
    warm = schedule.warmup_iters
    if step < warm:
        return schedule.warmup_start_factor + (1.0 - schedule.warmup_start_factor) * step / warm
    t = min(1.0, (step - warm) / max(1, max_iters - warm))
    floor = schedule.min_lr / base_lr
    return floor + (1.0 - floor) * SCHEDULES[schedule.name](t, schedule)


def build_scheduler(optimizer: Optimizer, recipe: Recipe) -> LambdaLR:
    """Per-iteration ``LambdaLR`` of :func:`lr_factor` (step it once per optimiser step)."""
    schedule, max_iters, base_lr = recipe.schedule, recipe.max_iters, recipe.optim.lr

    def factor(step: int) -> float:
        return lr_factor(schedule, step, max_iters, base_lr)

    return LambdaLR(optimizer, factor)


def check_amp(amp: str, device: torch.device | str) -> None:
    """Refuse mixed precision off CUDA (a recipe must train the same way wherever it is allowed to run)."""
    if amp != "none" and torch.device(device).type != "cuda":
        raise TrainingError(
            f"The recipe asks for amp={amp!r}, which vocabseg only runs on CUDA, but the device is "
            f"{torch.device(device)}. Train on a GPU, or override amp=none."
        )


def autocast(amp: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in the recipe's precision on CUDA; a no-op for ``amp="none"``."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    check_amp(amp, device)
    return torch.autocast(device_type="cuda", dtype=dtype)


def grad_scaler(amp: str, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 (bf16 has float32's range and needs none)."""
    if amp != "fp16":
        return None
    check_amp(amp, device)
    return torch.amp.GradScaler("cuda")
