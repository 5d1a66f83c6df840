"""The two-stage learning-rate schedule: warm-up -> cosine over stage 1, restarted cosine over stage 2."""

from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, stage2_start: int, warmup_steps: int) -> float:
    """Multiplier of the peak LR at ``step``.

    Stage 1 (``step < stage2_start``): linear warm-up from 1 % over ``warmup_steps``, then cosine to 0 at the
    end of stage 1. Stage 2: restart at 1 and cosine to 0 at ``total_steps``.
    """
    if step < stage2_start:
        if step < warmup_steps:
            return 0.01 + 0.99 * step / warmup_steps
        span = max(stage2_start - warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / span))
    span = max(total_steps - stage2_start, 1)
    return 0.5 * (1 + math.cos(math.pi * (step - stage2_start) / span))


def stage_bounds(config: dict) -> tuple[int, int, int]:
    """(total steps, first step of stage 2, LR warm-up steps) from the configuration."""
    train = config["train"]
    total = int(train["steps"])
    stage2 = min(max(round(total * train["warmup_fraction"]), 1), total)
    warmup = round(stage2 * train["lr_warmup_fraction"])
    return total, stage2, warmup
