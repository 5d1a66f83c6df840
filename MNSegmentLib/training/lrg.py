"""Learning-rate-guided sampling (LRG): how much of a batch is unlabeled.

While the learning rate is high the models change fast and their pseudo-masks are unreliable, so batches are
mostly labeled; as the rate decays, the unlabeled share grows.
"""

from __future__ import annotations

import math

import numpy as np


def unlabeled_share(mode: str, step: int, stage2_start: int, total_steps: int, lr: float, lr_peak: float,
                    fixed_share: float = 0.5, cap: float = 0.8) -> float:
    """Share of unlabeled patches in the batch of ``step`` (0 in stage 1 and in mode ``off``).

    - ``lr``: 1 - lr / lr_peak of the current stage (the LR-guided reading of the paper);
    - ``linear``: (step - T) / (E - T), the reference code's rule;
    - ``fixed``: a constant share (ablation); ``off``: labeled only (the supervised baseline).
    The result is capped at ``cap``.
    """
    if mode == "off" or step < stage2_start:
        return 0.0
    if mode == "lr":
        share = 1.0 - lr / lr_peak
    elif mode == "linear":
        share = (step - stage2_start) / max(total_steps - stage2_start, 1)
    elif mode == "fixed":
        share = fixed_share
    else:
        raise ValueError(f"unknown LRG mode {mode!r}")
    return float(min(max(share, 0.0), cap))


def split_batch(share: float, batch_size: int, rng: np.random.Generator) -> int:
    """Number of unlabeled patches; stochastic rounding so the expected share is exactly ``share``.

    (Flooring, as the reference does, would give no unlabeled patch at all for most of training when the batch
    is small.)
    """
    expected = share * batch_size
    n = math.floor(expected)
    if rng.random() < expected - n:
        n += 1
    return min(n, batch_size)
