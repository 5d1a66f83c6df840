"""Presets and dotted --set overrides (config.py)."""

from __future__ import annotations

import json

import pytest

from MNSegmentLib.config import (
    PRESETS,
    apply_overrides,
    load_run_config,
    parse_set_args,
    parse_value,
    preset,
    validate,
)
from MNSegmentLib.errors import InputError
from MNSegmentLib.training.schedule import stage_bounds
from MNSegmentLib.training.trainer import refresh_steps


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_resolve_and_validate(name):
    config = preset(name)
    validate(config)
    for section in ("data", "sampling", "model2d", "model3d", "train", "lrg", "teacher", "inference"):
        assert section in config

# the reference's teacher: the raw other network's soft targets on the student's view, one slice axis, unweighted
REFERENCE_TEACHER = {"temperature": 1.0, "input": "augmented", "ema": 0.0, "triplanar": False, "weighting": "none",
                     "student_view": "same", "directions": "both", "cross_view": False}


def test_preset_values():
    paper, quick, default = preset("paper"), preset("quick"), preset("default")
    assert paper["sampling"]["patch_size"] == [160, 160, 64] and paper["sampling"]["batch_size"] == 5
    assert paper["train"]["lr_2d"] == 1e-3 and paper["train"]["lr_3d"] == 1e-4
    assert paper["train"]["alternate_every"] == 8 and paper["lrg"]["cap"] == 0.8
    # the reference's batch composition and soft targets in paper; unlabeled patches on top elsewhere
    assert paper["lrg"]["unlabeled"] == "replace" and paper["teacher"] == REFERENCE_TEACHER
    assert quick["lrg"]["unlabeled"] == default["lrg"]["unlabeled"] == "add"
    # quick's short budgets: the pretrained 2D network teaches, the 3D one only when the 2D one fails (BENCHMARKS 13e),
    # and the 2D network works on the slices of all three axes (13l)
    assert quick["teacher"] == {**REFERENCE_TEACHER, "directions": "auto", "triplanar": True}
    assert default["teacher"] == REFERENCE_TEACHER
    assert quick["model3d"]["kwargs"]["channels"] == [16, 32, 64, 128]
    assert quick["model3d"]["kwargs"]["strides"] == [2, 2, 2]
    assert quick["train"]["steps"] == 400
    assert default["train"]["steps"] == 12000
    quick["train"]["steps"] = 1  # presets are independent copies
    assert preset("quick")["train"]["steps"] == 400
    with pytest.raises(InputError, match="unknown preset"):
        preset("fast")


def test_paper_preset_matches_the_reference_schedule():
    """Reference: 4000 epochs of 8 iterations per network, counted separately; stage 1 = 500 epochs with both
    networks per step, then one network per step, switching every epoch; refreshes at epochs 1000/1500/2000/3000."""
    config = preset("paper")
    total, stage2, lr_warmup = stage_bounds(config)
    assert (total, stage2, lr_warmup) == (60000, 4000, 400)  # 500 + 2 x 3500 epochs of 8; warm-up 50 epochs
    every = config["train"]["alternate_every"]
    turns_2d = sum(((step - stage2) // every) % 2 == 0 for step in range(stage2, total))
    assert every == 8 and turns_2d == total - stage2 - turns_2d == 3500 * 8
    epoch_steps = [stage2 + (epoch - 500) * 2 * every for epoch in (1000, 1500, 2000, 3000)]
    assert refresh_steps(config) == [stage2, *epoch_steps] == [4000, 12000, 20000, 28000, 44000]


def test_parse_set_args():
    parsed = parse_set_args(["train.steps=100", "sampling.patch_size=[32, 32, 16]", "lrg.mode=off",
                             "data.target_spacing=null", "train.amp=false", "model2d.weights=/a/b=c.pth"])
    assert parsed == {"train.steps": 100, "sampling.patch_size": [32, 32, 16], "lrg.mode": "off",
                      "data.target_spacing": None, "train.amp": False, "model2d.weights": "/a/b=c.pth"}
    assert parse_value("1e-3") == 1e-3
    for bad in ("train.steps", "=3"):
        with pytest.raises(InputError, match="KEY=VALUE"):
            parse_set_args([bad])


def test_apply_overrides():
    base = preset("quick")
    out = apply_overrides(base, {"train.steps": 7, "lrg.mode": "linear", "model3d.kwargs.dropout": 0.1})
    assert out["train"]["steps"] == 7 and out["lrg"]["mode"] == "linear"
    assert out["model3d"]["kwargs"]["dropout"] == 0.1
    assert base["train"]["steps"] == 400  # input untouched
    for key in ("train.stepz", "nosuch.section", "train.steps.inner", "model3d.kwargs.a.b"):
        with pytest.raises(InputError, match="unknown setting"):
            apply_overrides(base, {key: 1})


@pytest.mark.parametrize("key,value", [
    ("sampling.batch_size", 0), ("sampling.patch_size", [32, 32]), ("sampling.patch_size", [32, 32, 4]),
    ("train.steps", 1), ("train.steps", 2.5), ("lrg.mode", "sometimes"), ("lrg.cap", 1.5),
    ("model2d.adaptation", "qlora"), ("data.slice_axis", 3), ("inference.network", "4d"),
    ("data.target_spacing", [1, 1]), ("train.warmup_fraction", 0), ("sampling.scale_jitter", 0.7),
    ("lrg.unlabeled", "both"), ("teacher.temperature", -0.5), ("teacher.temperature", "sharp"),
    ("teacher.input", "raw"), ("train.deterministic", "yes"), ("train.amp", 1),
])
def test_invalid_values_are_input_errors(key, value):
    with pytest.raises(InputError, match=key.split(".")[0]):
        apply_overrides(preset("quick"), {key: value})


def test_run_config_from_an_older_engine_gets_the_new_keys_defaults(tmp_path):
    old = preset("quick")
    del old["teacher"]  # a run folder made before teacher.* existed
    del old["train"]["deterministic"]
    old["lrg"]["unlabeled"] = "replace"
    (tmp_path / "config.json").write_text(json.dumps(old))
    loaded = load_run_config(tmp_path / "config.json")
    assert loaded["teacher"] == REFERENCE_TEACHER  # the behaviour it was trained with
    assert loaded["train"]["deterministic"] is True and preset("quick")["train"]["deterministic"] is False
    assert loaded["lrg"]["unlabeled"] == "replace" and loaded["model3d"] == old["model3d"]  # its own values win
    validate(loaded)
