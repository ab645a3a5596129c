"""Per-step lr schedules (`interval: step` in conf/scheduler/): each takes the optimizer and the run's number of
optimizer steps (`trainer.estimated_stepping_batches`), and scales every param group's own lr, so each named
group keeps its multiplier through warmup, decay and an unfreeze."""

from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR

from finetune.errors import ConfigError


def warmup_steps(warmup: float, total_steps: int) -> int:
    """`warmup` as a number of steps (>= 1) or a fraction of all steps (< 1)."""
    if warmup < 0 or (warmup >= 1 and warmup != int(warmup)):
        raise ConfigError(f"scheduler.warmup={warmup} must be a number of steps (>= 1) or a fraction in [0, 1)")
    steps = int(warmup) if warmup >= 1 else round(warmup * total_steps)
    if steps >= total_steps:
        raise ConfigError(f"scheduler.warmup={warmup} is {steps} steps, but the run has only {total_steps}")
    return steps


def warmup_cosine_factor(step: int, warmup: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup over `warmup` steps (step s at (s+1)/(warmup+1) of the lr, no step at 0), then cosine decay
    from the lr towards `min_lr_ratio` x lr at `total_steps`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / (total_steps - warmup))
    return min_lr_ratio + (1 - min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup: float = 0.0, min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warmup then cosine decay (BEiT's and timm's fine-tuning schedule), per optimizer step."""
    factor = partial(
        warmup_cosine_factor,
        warmup=warmup_steps(warmup, total_steps),
        total_steps=total_steps,
        min_lr_ratio=min_lr_ratio,
    )
    return LambdaLR(optimizer, factor)


def one_cycle(optimizer: Optimizer, total_steps: int, **kwargs: object) -> OneCycleLR:
    """PyTorch's OneCycleLR with each group's own lr as its peak (`max_lr` per group)."""
    return OneCycleLR(
        optimizer, max_lr=[group["lr"] for group in optimizer.param_groups], total_steps=total_steps, **kwargs
    )
