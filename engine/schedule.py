"""Learning-rate schedules: linear warm-up, then linear or cosine decay to 0 (or constant).

`lr_at` is a pure function of the step, so resuming needs only the step count. The values
match Hugging Face's `get_{linear,cosine,constant}_schedule_with_warmup` at steps
0..total_steps-1, where `step` counts optimizer updates already taken. From
`total_steps` on, linear and cosine give 0 (HF's cosine would rise again past the end).
"""

import math

import torch

SCHEDULE_KINDS = ("linear", "cosine", "constant")


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, kind: str = "linear") -> float:
    """Learning rate for the update that follows `step` updates."""
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of {', '.join(SCHEDULE_KINDS)}")
    if step < 0 or warmup_steps < 0 or total_steps < 0:
        raise ValueError(f"step ({step}), warmup_steps ({warmup_steps}) and total_steps ({total_steps}) must be >= 0")
    if kind != "constant" and step >= total_steps:
        return 0.0
    return base_lr * _multiplier(step, warmup_steps, total_steps, kind)


def _multiplier(step: int, warmup_steps: int, total_steps: int, kind: str) -> float:
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return (total_steps - step) / max(1, total_steps - warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(
    optimizer: torch.optim.Optimizer, step: int, warmup_steps: int, total_steps: int, kind: str = "linear"
) -> list[float]:
    """Write the scheduled rate into every param group; returns the rates written.

    Each group's base rate is its `initial_lr` (the key torch's schedulers use), recorded from
    `lr` on the first call. It lives in the param group, so `optimizer.state_dict()` keeps it.
    """
    rates = []
    for group in optimizer.param_groups:
        base_lr = group.setdefault("initial_lr", group["lr"])
        group["lr"] = lr_at(step, base_lr, warmup_steps, total_steps, kind)
        rates.append(group["lr"])
    return rates
