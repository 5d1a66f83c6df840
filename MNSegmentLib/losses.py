"""The M&N loss: soft Dice + KL divergence against a target distribution (one-hot label or teacher softmax)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

# Per sample, all channels including background, soft targets allowed.
_dice = DiceLoss(softmax=True, include_background=True, batch=False, soft_label=True)


def dice_kl_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``logits`` (N, K, ...) and ``target`` probabilities (N, K, ...) summing to 1 over K; weighted 1:1."""
    logits = logits.float()
    target = target.float()
    kl = F.kl_div(F.log_softmax(logits, dim=1), target, reduction="none").sum(1).mean()
    return _dice(logits, target) + kl


def one_hot(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, 1, ...) or (N, ...) integer classes -> (N, K, ...) float."""
    if label.dim() >= 2 and label.shape[1] == 1:
        label = label[:, 0]
    return F.one_hot(label.long(), num_classes).movedim(-1, 1).float()
