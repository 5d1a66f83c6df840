"""The M&N loss: soft Dice + KL divergence against a target distribution (one-hot label or teacher softmax),
optionally weighted per voxel (``teacher.weighting``: trust confident teacher voxels more)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

# Per sample, all channels including background, soft targets allowed.
_SMOOTH = 1e-5  # MONAI DiceLoss's smooth_nr and smooth_dr defaults, so both paths agree on unit weights
_dice = DiceLoss(softmax=True, include_background=True, batch=False, soft_label=True, smooth_nr=_SMOOTH,
                 smooth_dr=_SMOOTH)


def dice_kl_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``logits`` (N, K, ...) and ``target`` probabilities (N, K, ...) summing to 1 over K; weighted 1:1.

    ``weight`` (N, 1, ...) in [0, 1], optional: each voxel's share in both terms (KL: weighted mean over all
    voxels, so low-trust voxels lower the loss instead of being renormalised away; Dice: weighted sums).
    """
    logits = logits.float()
    target = target.float()
    kl = F.kl_div(F.log_softmax(logits, dim=1), target, reduction="none").sum(1, keepdim=True)
    if weight is None:
        return _dice(logits, target) + kl.mean()
    # MONAI's DiceLoss has class weights only; a per-voxel weight needs the sums written out (same smoothing).
    weight = weight.float()
    probabilities = torch.softmax(logits, 1)
    dims = tuple(range(2, logits.dim()))
    total = (weight * (probabilities + target)).sum(dims)
    overlap = total - (weight * (probabilities - target).abs()).sum(dims)  # 2·TP in soft-label form, as MONAI
    dice = 1.0 - (overlap + _SMOOTH) / (total + _SMOOTH)
    return dice.mean() + (weight * kl).mean()


def confidence_weight(probabilities: torch.Tensor) -> torch.Tensor:
    """(N, K, ...) -> (N, 1, ...): the teacher's top probability rescaled from [1/K, 1] to [0, 1], so a voxel
    where the teacher is unsure counts for nothing and one where it is certain counts fully."""
    k = probabilities.shape[1]
    top = probabilities.max(1, keepdim=True).values
    return ((top - 1.0 / k) / (1.0 - 1.0 / k)).clamp(0.0, 1.0)


def one_hot(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, 1, ...) or (N, ...) integer classes -> (N, K, ...) float."""
    if label.dim() >= 2 and label.shape[1] == 1:
        label = label[:, 0]
    return F.one_hot(label.long(), num_classes).movedim(-1, 1).float()
