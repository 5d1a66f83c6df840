"""Real training steps on tiny volumes: the co-training branch, determinism, offline 2D weights, lrg.mode=off."""

from __future__ import annotations

import copy
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from engine_fixtures import TINY_SET, make_dataset, model_state, states_equal, trained_run

from MNSegmentLib import workflow
from MNSegmentLib.data.datalist import load_datalist
from MNSegmentLib.data.preprocess import Plan
from MNSegmentLib.events import Events
from MNSegmentLib.models import pretrained
from MNSegmentLib.training.trainer import Prefetcher, Trainer


# -- the unlabeled branch (stage 2) really drives the student ------------------------------------------------
def _trainer(run_dir: Path) -> Trainer:
    """A Trainer on the shared run folder (it loads that run's checkpoint; nothing is written by train_step).
    Schedule: 8 steps, stage 2 from step 2, students alternate every step (2D at 2, 3D at 3); each network
    teaches the other (the reference's teacher.directions, not the quick preset's auto)."""
    config = json.loads((run_dir / "config.json").read_text())
    config["train"].update(steps=8, warmup_fraction=0.25, alternate_every=1)
    config["teacher"]["directions"] = "both"
    config["lrg"].update(share=1.0, cap=1.0, unlabeled="replace")  # share 1: an all-unlabeled batch
    plan = Plan.from_json(json.loads((run_dir / "plan.json").read_text()))
    datalist = load_datalist(run_dir / "datalist.json", check_files=False)
    return Trainer(run_dir, config, plan, datalist, torch.device("cpu"), Events(False))


def _snapshot(trainer: Trainer) -> dict:
    return copy.deepcopy({"2d": trainer.model2d.state_dict(), "3d": trainer.model3d.state_dict(),
                          "opt2d": trainer.opt2d.state_dict(), "opt3d": trainer.opt3d.state_dict()})


def _one_step(trainer: Trainer, snapshot: dict, step: int, mode: str, perturb_teacher: bool):
    """From the same state, one train_step at ``step`` with LRG ``mode``; optionally a different teacher."""
    snapshot = copy.deepcopy(snapshot)  # Optimizer.load_state_dict adopts (and later mutates) the tensors
    trainer.model2d.load_state_dict(snapshot["2d"])
    trainer.model3d.load_state_dict(snapshot["3d"])
    trainer.opt2d.load_state_dict(snapshot["opt2d"])
    trainer.opt3d.load_state_dict(snapshot["opt3d"])
    trainer.config["lrg"]["mode"] = mode
    trainer.step = step
    student, teacher = (trainer.model2d, trainer.model3d) if step % 2 == 0 else (trainer.model3d, trainer.model2d)
    if perturb_teacher:
        generator = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for p in teacher.parameters():
                p.add_(0.1 * p.abs().mean() * torch.randn(p.shape, generator=generator))
    before_student = {k: v.clone() for k, v in student.state_dict().items()}
    before_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
    record = trainer.train_step()
    # the teacher is only read: its weights and normalisation statistics (eval mode) are unchanged
    assert states_equal(before_teacher, teacher.state_dict())
    after = {k: v.clone() for k, v in student.state_dict().items()}
    assert not states_equal(before_student, after)  # the student did learn
    return after, record


@pytest.mark.parametrize("step,student", [(2, "2d"), (3, "3d")])
def test_student_update_depends_on_teacher_only_through_unlabeled_data(tmp_path_factory, step, student):
    run = trained_run(tmp_path_factory)
    trainer = _trainer(run.run_dir)
    assert trainer.stage2 == 2
    snapshot = _snapshot(trainer)
    other = "3d" if student == "2d" else "2d"
    # all-unlabeled batch: the student's update must change when only the teacher's weights change
    a, record = _one_step(trainer, snapshot, step, "fixed", perturb_teacher=False)
    b, _ = _one_step(trainer, snapshot, step, "fixed", perturb_teacher=True)
    assert record["stage"] == "cotrain" and record["unlabeled_share"] == 1.0
    assert record[f"loss_{student}"] is not None and record[f"loss_{other}"] is None
    assert not states_equal(a, b)
    # the same again gives the same result (so the difference above is the teacher's doing)
    a2, _ = _one_step(trainer, snapshot, step, "fixed", perturb_teacher=False)
    assert states_equal(a, a2)
    # labeled only: the teacher's weights do not matter at all
    c, record = _one_step(trainer, snapshot, step, "off", perturb_teacher=False)
    d, _ = _one_step(trainer, snapshot, step, "off", perturb_teacher=True)
    assert record["unlabeled_share"] == 0.0 and record[f"loss_{other}"] is None
    assert states_equal(c, d)
    assert not states_equal(a, c)


# -- determinism given a seed --------------------------------------------------------------------------------
COTRAIN_SET = {**TINY_SET, "train.steps": 3, "train.warmup_fraction": 0.34, "train.alternate_every": 1,
               "train.refresh_at": [0.99], "lrg.mode": "fixed", "lrg.share": 0.75}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("tiny") / "data", n_labeled=2, n_unlabeled=1, seed=5)


def test_same_seed_same_weights_other_seed_different(tmp_path, tiny_data):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        runs[name] = workflow.train(tiny_data, tmp_path / name, "quick", "cpu", {**COTRAIN_SET, "seed": seed})
    history = torch.load(runs["a"] / "checkpoint.pt", weights_only=True)["history"]
    assert [r["stage"] for r in history] == ["warmup", "cotrain", "cotrain"]
    assert any(r["unlabeled_share"] > 0 for r in history)  # the co-training path was exercised
    assert states_equal(model_state(runs["a"]), model_state(runs["b"]))
    assert not states_equal(model_state(runs["a"]), model_state(runs["c"]))


# -- lrg.mode=off: no unlabeled data, students still alternate ----------------------------------------------
def test_lrg_off_never_draws_unlabeled_but_students_alternate(tmp_path, tiny_data):
    stream = io.StringIO()
    overrides = {**TINY_SET, "train.steps": 6, "train.warmup_fraction": 0.34, "train.alternate_every": 1,
                 "lrg.mode": "off"}
    run = workflow.train(tiny_data, tmp_path / "off", "quick", "cpu", overrides, Events(True, stream))
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and all(e["unlabeled_share"] == 0 for e in progress)
    history = torch.load(run / "checkpoint.pt", weights_only=True)["history"]
    assert len(history) == 6 and all(r["unlabeled_share"] == 0 for r in history)
    turns = [(r["stage"], r["loss_2d"] is not None, r["loss_3d"] is not None) for r in history]
    assert turns == [("warmup", True, True)] * 2 + [("cotrain", True, False), ("cotrain", False, True)] * 2
    assert not (run / "pseudo").exists()  # no pseudo-masks are computed when nothing unlabeled is drawn
    assert json.loads((run / "config.json").read_text())["lrg"]["mode"] == "off"


# -- offline 2D weights from a local file --------------------------------------------------------------------
def test_2d_weights_from_a_local_file(tmp_path, tiny_data, monkeypatch):
    torch.manual_seed(7)
    encoder = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True)
    weights = tmp_path / "my encoder.pth"
    torch.save(encoder.state_dict(), weights)
    loads = []  # the file is read once: when the settings are checked, not again by the Trainer
    original = pretrained.load_encoder_weights
    monkeypatch.setattr(pretrained, "load_encoder_weights", lambda *a: loads.append(a) or original(*a))
    stream = io.StringIO()
    overrides = {**TINY_SET, "train.steps": 2, "train.warmup_fraction": 1.0, "model2d.weights": str(weights)}
    run = workflow.train(tiny_data, tmp_path / "run", "quick", "cpu", overrides, Events(True, stream))
    assert len(loads) == 1
    start = json.loads(stream.getvalue().splitlines()[0])
    assert start["event"] == "start" and str(weights) in start["weights_2d"]
    assert json.loads((run / "config.json").read_text())["model2d"]["weights"] == str(weights)
    # LoRA keeps the pretrained convolutions frozen: the trained model still holds the file's tensors
    trained = torch.load(run / "model.pt", weights_only=True)["model2d"]
    source = encoder.state_dict()
    compared = 0
    for key, value in trained.items():
        plain = key.removeprefix("encoder.").replace(".base_layer", "")
        if key.startswith("encoder.") and "conv" in plain and plain.endswith("weight") and plain in source:
            assert torch.equal(value, source[plain]), key
            compared += 1
    assert compared >= 10


# -- batch composition: unlabeled patches replace labeled ones (reference) or come on top -------------------
@pytest.mark.parametrize("composition, expected", [("replace", (1, 1)), ("add", (2, 1))])
def test_unlabeled_patches_replace_or_add_to_the_labeled_batch(tmp_path_factory, composition, expected):
    trainer = _trainer(trained_run(tmp_path_factory).run_dir)
    trainer.config["lrg"].update(mode="fixed", share=0.5, cap=1.0, unlabeled=composition)
    drawn = {"labeled": 0, "unlabeled": 0}
    for name in ("labeled", "unlabeled"):  # record what the real samplers are asked for (patch by patch)
        sampler = getattr(trainer, name)

        def counting(n, rng, original=sampler.crop, name=name):
            drawn[name] += n
            return original(n, rng)

        sampler.crop = counting
    trainer.step = trainer.stage2  # batch 2, share 0.5: exactly one unlabeled patch
    record = trainer.train_step()
    assert (drawn["labeled"], drawn["unlabeled"]) == expected
    assert record["unlabeled_share"] == pytest.approx(expected[1] / sum(expected))


# -- the teacher's targets: temperature and which view of the patch it sees ------------------------------------
def test_teacher_temperature_sharpens_the_targets(tmp_path_factory):
    trainer = _trainer(trained_run(tmp_path_factory).run_dir)
    x, _ = trainer.unlabeled.sample(1, np.random.default_rng(0))
    trainer.model3d.eval()
    with torch.no_grad():
        logits = trainer.model3d(x).float()
    trainer.model3d.train()
    targets = {}
    for temperature in (1.0, 0.5, 0):
        trainer.config["teacher"]["temperature"] = temperature
        targets[temperature] = trainer._teacher_targets("3d", x)
        assert torch.allclose(targets[temperature].sum(1), torch.ones(1)), temperature
    assert torch.allclose(targets[1.0], torch.softmax(logits, 1), atol=1e-6)  # the reference's soft targets
    assert torch.allclose(targets[0.5], torch.softmax(2 * logits, 1), atol=1e-6)
    assert float(targets[0.5].max(1).values.mean()) > float(targets[1.0].max(1).values.mean())
    hard = targets[0]
    assert set(hard.unique().tolist()) <= {0.0, 1.0} and torch.equal(hard.argmax(1), logits.argmax(1))


@pytest.mark.parametrize("view", ["augmented", "clean"])
def test_teacher_sees_the_augmented_patch_or_the_clean_crop(tmp_path_factory, view):
    trainer = _trainer(trained_run(tmp_path_factory).run_dir)
    trainer.config["lrg"].update(mode="fixed", share=1.0)
    trainer.config["teacher"]["input"] = view
    seen = {"crop": [], "augment": [], "teacher": []}  # every call (patches are drawn one at a time)
    crop, augment, targets = trainer.unlabeled.crop, trainer.unlabeled.augment_batch, trainer._teacher_targets

    def record(name, function):
        def wrapper(*args):
            out = function(*args)
            seen[name].append((args, out))
            return out
        return wrapper

    trainer.unlabeled.crop = record("crop", crop)
    trainer.unlabeled.augment_batch = record("augment", augment)
    trainer._teacher_targets = record("teacher", targets)
    trainer.step = trainer.stage2
    trainer.train_step()
    clean = torch.cat([out[0] for _, out in seen["crop"]])
    augmented = torch.cat([out for _, out in seen["augment"]])
    assert not torch.equal(clean, augmented)  # the augmentation did change this batch
    teacher_input = torch.cat([args[1] for args, _ in seen["teacher"]])
    assert torch.equal(teacher_input, clean if view == "clean" else augmented)


# -- prefetching the next batch on a background thread -------------------------------------------------------
def test_prefetching_trains_exactly_as_drawing_in_place_across_refreshes(tmp_path, tiny_data, monkeypatch):
    """Bit-identical weights and losses with and without prefetch, over pseudo-mask refreshes at steps 2 and 4
    (the unlabeled crops are centred on those masks: foreground_fraction 1, all-unlabeled batches)."""
    drawn = []
    draw = Trainer.draw_batch

    def recording(self, step, masks_version):
        drawn.append((step, masks_version, threading.current_thread() is threading.main_thread()))
        return draw(self, step, masks_version)

    monkeypatch.setattr(Trainer, "draw_batch", recording)
    overrides = {**TINY_SET, "train.steps": 6, "train.warmup_fraction": 0.34, "train.alternate_every": 1,
                 "train.refresh_at": [0.67], "lrg.mode": "fixed", "lrg.share": 1.0, "lrg.cap": 1.0,
                 "sampling.foreground_fraction": 1.0}
    runs, draws = {}, {}
    for prefetch in (True, False):
        drawn.clear()
        runs[prefetch] = workflow.train(tiny_data, tmp_path / f"prefetch_{prefetch}", "quick", "cpu",
                                        {**overrides, "train.prefetch": prefetch})
        draws[prefetch] = list(drawn)
    # every step drawn once, for the masks in force at that step; ahead of time on the background thread except
    # the first step and the refresh steps (their masks do not exist yet)
    assert [d[:2] for d in draws[False]] == [(0, -1), (1, -1), (2, 0), (3, 0), (4, 1), (5, 1)]
    assert draws[True] == [(0, -1, True), (1, -1, False), (2, 0, True), (3, 0, False), (4, 1, True), (5, 1, False)]
    assert states_equal(model_state(runs[True]), model_state(runs[False]))
    histories = [torch.load(runs[p] / "checkpoint.pt", weights_only=True)["history"] for p in (True, False)]
    assert histories[0] == histories[1] and all(r["unlabeled_share"] == 0.5 for r in histories[0][2:])


def test_a_prefetched_batch_drawn_for_older_masks_is_drawn_again():
    calls = []

    def draw(step, masks_version):
        calls.append((step, masks_version))
        return (step, masks_version)

    prefetch = Prefetcher(draw)
    prefetch.ahead(5, 0)
    assert prefetch.take(5, 1) == (5, 1)  # the masks were refreshed in between
    prefetch.ahead(6, 1)
    assert prefetch.take(6, 1) == (6, 1)
    prefetch.close()
    assert calls == [(5, 0), (5, 1), (6, 1)]
    in_place = Prefetcher(draw, enabled=False)
    in_place.ahead(7, 1)  # nothing is drawn ahead
    assert in_place.take(7, 1) == (7, 1) and calls[-1] == (7, 1) and len(calls) == 4
