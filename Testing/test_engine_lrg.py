"""LRG sampling rule (lrg.py) and the two-stage LR schedule (schedule.py): pure functions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from MNSegmentLib.config import apply_overrides, preset
from MNSegmentLib.training.lrg import split_batch, unlabeled_share
from MNSegmentLib.training.schedule import lr_factor, stage_bounds

MODES = ("lr", "linear", "fixed", "off")


@pytest.mark.parametrize("mode", MODES)
def test_no_unlabeled_data_in_stage1(mode):
    for step in range(0, 100, 7):
        for lr in (0.01, 0.5, 1.0):
            assert unlabeled_share(mode, step, 100, 1000, lr, 1.0, fixed_share=0.6, cap=0.8) == 0.0


def test_off_is_always_zero():
    for step in range(100, 1000, 37):
        assert unlabeled_share("off", step, 100, 1000, lr=0.0, lr_peak=1.0, fixed_share=0.9, cap=1.0) == 0.0


def test_linear_matches_reference_formula():
    T, E = 500, 4000  # the reference code's epochs: stage 2 from 500, 4000 in all
    for epoch in range(T, E):
        share = unlabeled_share("linear", epoch, T, E, lr=0.123, lr_peak=1.0, cap=1.0)
        assert share == pytest.approx((epoch - T) / (E - T), abs=1e-12)


def test_linear_flooring_reproduces_reference_batches_of_five():
    """floor(share * 5) with the default cap 0.8 gives the reference's 0,1,2,3,4 unlabeled patches, switching
    at epochs 500, 1200, 1900, 2600, 3300, where the restarted cosine LR is ~1.0, 0.9, 0.65, 0.35, 0.1."""
    T, E, B = 500, 4000, 5
    counts = [math.floor(unlabeled_share("linear", e, T, E, 0.0, 1.0, cap=0.8) * B) for e in range(T, E)]
    reference = [(e - T) * B // (E - T) for e in range(T, E)]  # integer form of floor((e - T) / (E - T) * B)
    assert counts == reference
    switches = [T + counts.index(k) for k in range(5)]
    assert switches == [500, 1200, 1900, 2600, 3300]
    lrs = [lr_factor(e, E, T, 50) for e in switches]
    assert lrs == pytest.approx([1.0, 0.905, 0.655, 0.345, 0.095], abs=0.002)


def test_lr_mode_is_one_minus_relative_lr():
    for lr, peak, expected in ((1e-3, 1e-3, 0.0), (7e-4, 1e-3, 0.3), (0.25, 1.0, 0.75), (0.5, 2.0, 0.75)):
        assert unlabeled_share("lr", 10, 5, 100, lr, peak, cap=1.0) == pytest.approx(expected)
    # capped
    assert unlabeled_share("lr", 10, 5, 100, 0.05, 1.0, cap=0.8) == pytest.approx(0.8)
    # along the real schedule: 0 at the start of stage 2, growing as the restarted cosine decays
    total, stage2, warmup = 1000, 200, 20
    shares = [unlabeled_share("lr", s, stage2, total, lr_factor(s, total, stage2, warmup), 1.0, cap=1.0)
              for s in range(stage2, total)]
    assert shares[0] == pytest.approx(0.0)
    assert all(b >= a - 1e-12 for a, b in zip(shares, shares[1:]))
    assert shares[-1] > 0.99


def test_fixed_mode_and_cap():
    assert unlabeled_share("fixed", 50, 10, 100, 1.0, 1.0, fixed_share=0.4, cap=0.8) == pytest.approx(0.4)
    assert unlabeled_share("fixed", 50, 10, 100, 1.0, 1.0, fixed_share=0.95, cap=0.8) == pytest.approx(0.8)
    for mode in ("lr", "linear", "fixed"):
        for step in range(10, 100, 9):
            share = unlabeled_share(mode, step, 10, 100, lr=0.0, lr_peak=1.0, fixed_share=1.0, cap=0.6)
            assert 0.0 <= share <= 0.6
        assert unlabeled_share(mode, 99, 10, 100, 0.0, 1.0, fixed_share=1.0, cap=0.0) == 0.0


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError):
        unlabeled_share("sometimes", 50, 10, 100, 1.0, 1.0)


@pytest.mark.parametrize("share,batch", [(0.3, 2), (0.5, 3), (0.8, 4), (0.15, 5), (0.0, 4), (1.0, 3)])
def test_split_batch_stochastic_rounding(share, batch):
    rng = np.random.default_rng(1)
    draws = np.array([split_batch(share, batch, rng) for _ in range(20000)])
    expected = share * batch
    assert draws.min() >= math.floor(expected) and draws.max() <= math.ceil(expected)
    assert draws.mean() == pytest.approx(expected, abs=0.02)
    if expected != math.floor(expected):  # really random: both neighbours occur
        assert set(np.unique(draws)) == {math.floor(expected), math.ceil(expected)}


def test_schedule_shape():
    total, stage2, warmup = 1000, 125, 12
    f = [lr_factor(s, total, stage2, warmup) for s in range(total)]
    assert f[0] == pytest.approx(0.01)
    assert f[warmup] == pytest.approx(1.0)
    for s in range(warmup):  # linear warm-up
        assert f[s] == pytest.approx(0.01 + 0.99 * s / warmup)
        assert f[s + 1] > f[s]
    stage1_decay = f[warmup:stage2]
    assert all(b < a for a, b in zip(stage1_decay, stage1_decay[1:]))  # cosine, strictly decreasing
    mid = warmup + (stage2 - warmup) // 2
    assert f[mid] == pytest.approx(0.5 * (1 + math.cos(math.pi * (mid - warmup) / (stage2 - warmup))))
    assert f[stage2 - 1] < 0.01  # ~0 at the end of stage 1
    assert f[stage2] == pytest.approx(1.0)  # restart
    stage2_decay = f[stage2:]
    assert all(b < a for a, b in zip(stage2_decay, stage2_decay[1:]))
    assert f[total - 1] < 1e-3
    assert all(0.0 <= v <= 1.0 for v in f)


def test_stage_bounds_of_presets():
    # paper: 500 + 2 x 3500 epochs of 8 = 60000 steps, stage 2 from step 4000, LR warm-up 50 epochs (400 steps)
    assert stage_bounds(preset("paper")) == (60000, 4000, 400)
    assert stage_bounds(preset("quick")) == (400, 50, 5)
    custom = apply_overrides(preset("quick"), {"train.steps": 40, "train.warmup_fraction": 0.5})
    assert stage_bounds(custom) == (40, 20, 2)
    # stage 2 always starts at step >= 1 and never after the end
    tiny = apply_overrides(preset("quick"), {"train.steps": 2, "train.warmup_fraction": 0.01})
    assert stage_bounds(tiny)[1] == 1
    full = apply_overrides(preset("quick"), {"train.steps": 10, "train.warmup_fraction": 1.0})
    assert stage_bounds(full)[1] == 10
