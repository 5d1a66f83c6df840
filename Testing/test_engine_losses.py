"""Soft Dice + KL loss (losses.py) with soft (teacher) targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from MNSegmentLib.training.losses import dice_kl_loss, one_hot


def _soft_target(shape=(2, 3, 4, 5, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(*shape, generator=g), 1)


def _hand_loss(logits, target, eps=1e-5):
    """Soft Dice (per sample and channel, soft-label form |p|+|t|-|p-t| for 2*TP) + KL(target || softmax)."""
    p = torch.softmax(logits, 1)
    dims = tuple(range(2, logits.dim()))
    sp, st, diff = p.sum(dims), target.sum(dims), (p - target).abs().sum(dims)
    dice = (1 - (sp + st - diff + eps) / (sp + st + eps)).mean()
    logq = torch.log_softmax(logits, 1)
    kl = (torch.where(target > 0, target * (target.log() - logq), torch.zeros_like(target))).sum(1).mean()
    return dice, kl


def test_matching_prediction_gives_near_zero_loss():
    target = _soft_target()
    assert not torch.all((target == 0) | (target == 1))  # really soft
    loss = dice_kl_loss(target.log(), target)
    assert float(loss) < 1e-4
    dice, kl = _hand_loss(target.log(), target)
    assert float(kl) < 1e-6


def test_wrong_prediction_costs_more():
    target = _soft_target()
    right = dice_kl_loss(target.log() * 1.0, target)
    wrong = dice_kl_loss(target.flip(1).log(), target)  # mass on the wrong classes
    uniform = dice_kl_loss(torch.zeros_like(target), target)
    assert float(wrong) > float(uniform) > float(right) + 0.05


def test_kl_part_and_total_match_hand_computation():
    target = _soft_target(seed=3)
    logits = torch.randn(target.shape, generator=torch.Generator().manual_seed(4))
    dice, kl = _hand_loss(logits, target)
    kl_torch = F.kl_div(F.log_softmax(logits, 1), target, reduction="none").sum(1).mean()
    torch.testing.assert_close(kl, kl_torch)
    total = dice_kl_loss(logits, target)
    torch.testing.assert_close(total, dice + kl, rtol=1e-5, atol=1e-6)
    # the two parts are weighted 1:1: KL alone is clearly part of it
    assert float(kl) > 0.1 and float(total) > float(kl)


def test_one_hot_targets_and_gradient_flow():
    label = torch.randint(0, 3, (2, 1, 4, 5, 3), generator=torch.Generator().manual_seed(5))
    target = one_hot(label, 3)
    assert target.shape == (2, 3, 4, 5, 3)
    assert torch.equal(target.argmax(1, keepdim=True), label) and torch.all(target.sum(1) == 1)
    logits = torch.zeros(2, 3, 4, 5, 3, requires_grad=True)
    loss = dice_kl_loss(logits, target)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # a gradient step lowers the loss
    with torch.no_grad():
        stepped = logits - 5.0 * logits.grad
    assert float(dice_kl_loss(stepped, target)) < float(loss.detach())


def test_half_precision_logits_are_accepted():
    target = _soft_target()
    loss = dice_kl_loss(target.log().to(torch.bfloat16), target)
    assert loss.dtype == torch.float32 and float(loss) < 0.05
