"""Stronger stage-2 teachers (teachers.py, losses.py): EMA copies, the triplanar 2D teacher, confidence-weighted
unlabeled loss. Each is checked on real training steps of the tiny trained run; each test fails without its
feature (the reference teacher: the raw other network, one slice axis, unweighted loss)."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from engine_fixtures import states_equal, trained_run

from MNSegmentLib.config import apply_overrides, preset
from MNSegmentLib.data.datalist import load_datalist
from MNSegmentLib.data.preprocess import Plan
from MNSegmentLib.errors import InputError
from MNSegmentLib.evaluation.network_choice import validation_scores
from MNSegmentLib.events import Events
from MNSegmentLib.inference.predict import predict_array, predictor
from MNSegmentLib.models import slicing
from MNSegmentLib.training import distributed
from MNSegmentLib.training.losses import confidence_weight, dice_kl_loss
from MNSegmentLib.training.teachers import EmaCopy, LabeledFit, soft_dice_sums, unlabeled_unused
from MNSegmentLib.training.trainer import Trainer


def _trainer(run_dir: Path, **teacher) -> Trainer:
    """A Trainer on ``run_dir`` (the tiny run's checkpoint), all-unlabeled stage-2 batches from step 2, students
    alternating every step (2D at even steps), with ``teacher.*`` settings (by default the reference's: each
    network teaches the other along one slice axis, whatever the tiny run's quick preset chose)."""
    config = json.loads((run_dir / "config.json").read_text())
    config["train"].update(steps=8, warmup_fraction=0.25, alternate_every=1)
    config["lrg"].update(mode="fixed", share=1.0, cap=1.0, unlabeled="replace")
    config["teacher"].update({"directions": "both", "triplanar": False, **teacher})
    plan = Plan.from_json(json.loads((run_dir / "plan.json").read_text()))
    datalist = load_datalist(run_dir / "datalist.json", check_files=False)
    return Trainer(run_dir, config, plan, datalist, torch.device("cpu"), Events(False))


def _patch(trainer: Trainer) -> torch.Tensor:
    import numpy as np

    return trainer.unlabeled.sample(1, np.random.default_rng(0))[0]


def _perturb(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * p.abs().mean() * torch.randn(p.shape, generator=generator))


# -- settings ------------------------------------------------------------------------------------------------
def test_candidates_are_off_by_default_and_in_the_paper_preset():
    reference = {"temperature": 1.0, "input": "augmented", "ema": 0.0, "triplanar": False, "weighting": "none",
                 "student_view": "same", "directions": "both", "cross_view": False}
    for name in ("paper", "default"):
        assert preset(name)["teacher"] == reference, name
    # measured: docs/BENCHMARKS.md sections 13e (directions) and 13l (triplanar)
    assert preset("quick")["teacher"] == {**reference, "directions": "auto", "triplanar": True}


@pytest.mark.parametrize("key, value", [("teacher.ema", 1.0), ("teacher.ema", -0.1), ("teacher.triplanar", 1),
                                        ("teacher.weighting", "entropy"), ("teacher.student_view", "weak"),
                                        ("teacher.directions", "3d_to_2d"), ("teacher.directions", "Auto"),
                                        ("teacher.cross_view", 1)])
def test_bad_teacher_settings_are_refused(key, value):
    with pytest.raises(InputError, match=key):
        apply_overrides(preset("quick"), {key: value})


@pytest.mark.parametrize("spacing, expected", [
    ((1.0, 1.0, 1.0), (2, 0, 1)),  # 1 mm brain: all three directions
    ((3.0, 3.0, 3.0), (2, 0, 1)),
    ((0.625, 0.625, 2.5), (2,)),  # cardiac MR: sagittal/coronal slices are 4x anisotropic
    ((0.8, 0.8, 5.0), (2,)),  # abdominal CT
    ((1.0, 1.0, 2.0), (2, 0, 1)),  # at the limit (2x)
])
def test_triplanar_axes_follow_the_spacing(spacing, expected):
    assert slicing.slice_axes(spacing, 2, triplanar=True) == expected
    assert slicing.slice_axes(spacing, 2, triplanar=False) == (2,)


# -- losses --------------------------------------------------------------------------------------------------
def _soft(shape=(2, 3, 6, 5, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(*shape, generator=g), 1)


def test_unit_weights_give_monai_loss_and_zero_weight_ignores_a_voxel():
    logits, target = torch.randn(2, 3, 6, 5, 4), _soft()
    ones = torch.ones(2, 1, 6, 5, 4)
    assert torch.allclose(dice_kl_loss(logits, target, ones), dice_kl_loss(logits, target), atol=1e-6)
    weight = ones.clone()
    weight[0, 0, 1, 2, 3] = 0
    changed = logits.clone()
    changed[0, :, 1, 2, 3] = torch.tensor([9.0, -9.0, 0.0])
    assert torch.allclose(dice_kl_loss(logits, target, weight), dice_kl_loss(changed, target, weight), atol=1e-6)
    assert not torch.allclose(dice_kl_loss(logits, target), dice_kl_loss(changed, target), atol=1e-4)


def test_confidence_weight_spans_uncertain_to_certain():
    uniform = torch.full((1, 4, 2, 2, 2), 0.25)
    certain = torch.nn.functional.one_hot(torch.zeros(1, 2, 2, 2, dtype=torch.long), 4).movedim(-1, 1).float()
    assert torch.allclose(confidence_weight(uniform), torch.zeros(1, 1, 2, 2, 2))
    assert torch.allclose(confidence_weight(certain), torch.ones(1, 1, 2, 2, 2))
    w = confidence_weight(_soft())
    assert w.shape == (2, 1, 6, 5, 4) and 0 < float(w.mean()) < 1


# -- EMA teacher ---------------------------------------------------------------------------------------------
def test_ema_copy_follows_the_model_by_its_decay():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    model[1].weight.requires_grad_(False)
    ema = EmaCopy(model, 0.9)
    before = copy.deepcopy(ema.state_dict())
    _perturb(model)
    model[1].weight.data.add_(1.0)  # frozen: an EMA copy never follows it (it cannot train)
    ema.update(model)
    assert torch.allclose(ema.model[0].weight, 0.9 * before["0.weight"] + 0.1 * model[0].weight)
    assert torch.equal(ema.model[1].weight, before["1.weight"])
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_ema_teacher_makes_the_targets_and_follows_its_network(tmp_path_factory, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run(tmp_path_factory).run_dir, run_dir)
    trainer = _trainer(run_dir, ema=0.9)
    x = _patch(trainer)
    steady = trainer._teacher_targets("3d", x)
    _perturb(trainer.model3d)  # the live network moves; its EMA copy has not been updated yet
    assert torch.equal(trainer._teacher_targets("3d", x), steady)
    reference = _trainer(run_dir)  # teacher.ema = 0: the raw network teaches, so the move shows
    _perturb(reference.model3d)
    assert not torch.allclose(reference._teacher_targets("3d", x), steady, atol=1e-4)

    # a 3D-student step (step 3) updates the 3D copy only
    ema2d, ema3d = (copy.deepcopy(trainer.ema[n].state_dict()) for n in ("2d", "3d"))
    trainer.step = 3
    trainer.train_step()
    assert states_equal(ema2d, trainer.ema["2d"].state_dict())
    name, value = next((k, v) for k, v in trainer.model3d.state_dict().items() if v.is_floating_point())
    assert torch.allclose(trainer.ema["3d"].state_dict()[name], 0.9 * ema3d[name] + 0.1 * value, atol=1e-6)

    # the copies are in the checkpoint and come back on resume
    trainer.save_checkpoint()
    resumed = _trainer(run_dir, ema=0.9)
    assert states_equal(resumed.ema["3d"].state_dict(), trainer.ema["3d"].state_dict())
    assert states_equal(resumed.ema["2d"].state_dict(), trainer.ema["2d"].state_dict())


# -- triplanar 2D teacher ------------------------------------------------------------------------------------
def test_triplanar_teacher_averages_the_three_slice_directions(tmp_path_factory):
    run_dir = trained_run(tmp_path_factory).run_dir
    trainer = _trainer(run_dir, triplanar=True)
    assert trainer.axes_2d == (2, 0, 1)  # the tiny set's 1 x 1 x 2 mm grid
    x = _patch(trainer)
    model = trainer.model2d.eval()
    with torch.no_grad():
        per_axis = [torch.softmax(slicing.apply_2d(model, x, axis, 128), 1) for axis in (0, 1, 2)]
    model.train()
    targets = trainer._teacher_targets("2d", x)
    assert torch.allclose(targets, sum(per_axis) / 3, atol=1e-5)
    single = _trainer(run_dir)._teacher_targets("2d", x)
    assert torch.allclose(single, per_axis[2], atol=1e-5) and not torch.allclose(targets, single, atol=1e-3)


def test_triplanar_2d_student_trains_on_each_axis_in_turn(tmp_path_factory, monkeypatch):
    trainer = _trainer(trained_run(tmp_path_factory).run_dir, triplanar=True)
    axes = []
    original = slicing.apply_2d

    def recording(model, x, axis, chunk, recompute=False):
        if recompute:  # the student's pass (teachers run without it)
            axes.append(axis)
        return original(model, x, axis, chunk, recompute)

    monkeypatch.setattr("MNSegmentLib.training.trainer.apply_2d", recording)
    for step in (2, 4, 6):  # 2D-student steps
        trainer.step = step
        trainer.train_step()
    assert sorted(axes) == [0, 1, 2]


def test_a_triplanar_2d_network_predicts_along_its_three_slice_directions(tmp_path_factory):
    trainer = _trainer(trained_run(tmp_path_factory).run_dir)
    model2d, model3d = trainer.model2d.eval(), trainer.model3d.eval()
    x = _patch(trainer)
    with torch.no_grad():
        per_axis = [torch.softmax(slicing.apply_2d(model2d, x, axis, 128), 1) for axis in (2, 0, 1)]
        p3d = torch.softmax(model3d(x), 1)
        p2d = predictor("2d", model2d, model3d, (2, 0, 1), 128)(x)
        ensemble = predictor("ensemble", model2d, model3d, (2, 0, 1), 128)(x)
        single = predictor("2d", model2d, model3d, (2,), 128)(x)
    assert torch.allclose(p2d, sum(per_axis) / 3, atol=1e-5)
    assert torch.allclose(ensemble, (p3d + sum(per_axis)) / 4, atol=1e-5)  # every view one vote: 3 : 1
    assert torch.allclose(single, per_axis[0], atol=1e-5) and not torch.allclose(p2d, single, atol=1e-3)


def test_the_validation_choice_scores_the_ensemble_that_predict_writes(tmp_path_factory):
    """validation_scores weighs the two networks' volumes as the ensemble predictor weighs its views (3 : 1 for a
    network trained along three axes), so the choice is made on what ``predict --network ensemble`` would write."""
    trainer = _trainer(trained_run(tmp_path_factory).run_dir)
    model2d, model3d = trainer.model2d.eval(), trainer.model3d.eval()
    _perturb(model3d)  # the two networks disagree, so the weighting decides voxels
    config, axes, cpu = trainer.config, (2, 0, 1), torch.device("cpu")
    image = _patch(trainer)[0, 0].numpy()

    def volume(network: str) -> torch.Tensor:
        return predict_array(image, predictor(network, model2d, model3d, axes, 128),
                             config["sampling"]["patch_size"], cpu)

    with torch.no_grad():
        label = volume("ensemble").argmax(0).numpy()
        equal_weights = ((volume("2d") + volume("3d")) / 2).argmax(0).numpy()
    scores = validation_scores(model2d, model3d, [(image, label)], config, axes, trainer.num_classes, cpu)
    assert scores["ensemble"] == pytest.approx(1.0, abs=1e-4)
    assert (label != equal_weights).mean() > 0.001  # a 1 : 1 ensemble would have scored below 1


@pytest.mark.parametrize("triplanar, expected", [(False, {2}), (True, {0, 1, 2})])
def test_predict_slices_along_the_directions_the_2d_network_was_trained_on(tmp_path_factory, tmp_path, monkeypatch,
                                                                           triplanar, expected):
    from MNSegmentLib.workflow import predict

    run = trained_run(tmp_path_factory)
    run_dir = tmp_path / "run"
    shutil.copytree(run.run_dir, run_dir, ignore=shutil.ignore_patterns("cache", "pseudo", "suggestions"))
    config = json.loads((run_dir / "config.json").read_text())
    config["teacher"]["triplanar"] = triplanar
    (run_dir / "config.json").write_text(json.dumps(config))
    axes = set()
    original = slicing.apply_2d

    def recording(model, x, axis, chunk, recompute=False):
        axes.add(axis)
        return original(model, x, axis, chunk, recompute)

    monkeypatch.setattr("MNSegmentLib.inference.predict.apply_2d", recording)
    image = json.loads((run_dir / "datalist.json").read_text())["labeled"][0]["image"]
    written = predict(run_dir, [image], tmp_path / "out", network="2d", device="cpu")
    assert axes == expected and written[0].is_file()


# -- confidence-weighted unlabeled loss ----------------------------------------------------------------------
@pytest.mark.parametrize("weighting", ["none", "confidence"])
def test_confidence_weighting_ignores_an_unsure_teacher(tmp_path_factory, monkeypatch, weighting):
    """An all-unlabeled batch whose teacher is maximally unsure (uniform probabilities): weighted, it teaches
    nothing (zero loss and gradients); unweighted, the student is pulled towards the uniform targets."""
    trainer = _trainer(trained_run(tmp_path_factory).run_dir, weighting=weighting)
    monkeypatch.setattr(trainer, "_teacher_targets",
                        lambda teacher, x: torch.full((len(x), trainer.num_classes, *x.shape[2:]),
                                                      1.0 / trainer.num_classes))
    trainer.step = 3  # 3D student
    record = trainer.train_step()
    grads = [p.grad for p in trainer.model3d.parameters() if p.grad is not None]
    if weighting == "confidence":
        assert record["loss_3d"] == 0.0 and all(float(g.abs().max()) == 0.0 for g in grads)
    else:
        assert record["loss_3d"] > 0.0 and any(float(g.abs().max()) > 0.0 for g in grads)


# -- a stronger augmentation on the student's view than on the teacher's ------------------------------------
@pytest.mark.parametrize("teacher_input", ["augmented", "clean"])
def test_strong_student_view_perturbs_only_the_students_patch(tmp_path_factory, teacher_input):
    trainer = _trainer(trained_run(tmp_path_factory).run_dir, input=teacher_input)
    usual = trainer.draw_batch(trainer.stage2, trainer.masks_version)
    trainer.config["teacher"]["student_view"] = "strong"
    strong = trainer.draw_batch(trainer.stage2, trainer.masks_version)
    assert len(strong.x_u) and torch.equal(strong.x_l, usual.x_l)  # the same draws up to the extra augmentation
    teacher_view = usual.x_u if teacher_input == "augmented" else usual.x_clean
    assert torch.equal(strong.x_clean, teacher_view)  # the teacher's view is unchanged ...
    assert not torch.allclose(strong.x_u, usual.x_u, atol=1e-3)  # ... the student's is perturbed further
    assert float((strong.x_u - usual.x_u).std()) > 0.05


def test_strong_student_view_is_the_same_whichever_rank_draws_a_patch(tmp_path_factory):
    """Split over 2 ranks, the strong views of a step's unlabeled patches are the single process's, patch for
    patch (each patch has its own random stream, as its crop does)."""
    trainer = _trainer(trained_run(tmp_path_factory).run_dir, student_view="strong")
    trainer.config["sampling"]["batch_size"] = 4
    whole = trainer.draw_batch(trainer.stage2, trainer.masks_version)
    shares = []
    for rank in range(2):
        trainer.ranks = distributed.Ranks(rank, 2)
        shares.append(trainer.draw_batch(trainer.stage2, trainer.masks_version))
    assert len(whole.x_u) == 4 and [len(b.x_u) for b in shares] == [2, 2]
    assert torch.equal(torch.cat([b.x_u for b in shares]), whole.x_u)
    assert torch.equal(torch.cat([b.x_clean for b in shares]), whole.x_clean)


# -- one direction: the 2D network learns from labels only ---------------------------------------------------
def test_one_way_keeps_the_2d_network_on_labels_and_the_3d_student_unchanged(tmp_path_factory):
    """teacher.directions=2d_to_3d: at a 2D-student step the 2D gradient is that of the labeled patches alone
    (the unlabeled ones in the same batch change nothing); at a 3D-student step nothing differs from the
    reference. Without the setting the unlabeled patches do move the 2D network."""
    run_dir = trained_run(tmp_path_factory).run_dir

    def grads(network: str, step: int, directions: str, labels_only: bool = False) -> list[torch.Tensor]:
        trainer = _trainer(run_dir, directions=directions)  # every trainer starts from the same checkpoint
        trainer.config["lrg"]["unlabeled"] = "add"  # labeled and unlabeled patches in one batch
        batch = trainer.draw_batch(step, trainer.masks_version)
        assert len(batch.x_l) and len(batch.x_u)
        if labels_only:
            batch = dataclasses.replace(batch, x_u=batch.x_u[:0], x_clean=None, n_unlabeled=0)
        trainer.step = step
        trainer.train_step(batch)
        model = trainer.model2d if network == "2d" else trainer.model3d
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return len(a) == len(b) and all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b))

    labels = grads("2d", 2, "both", labels_only=True)  # step 2: the 2D network is the student
    assert same(grads("2d", 2, "2d_to_3d"), labels)
    assert not same(grads("2d", 2, "both"), labels)
    assert same(grads("3d", 3, "2d_to_3d"), grads("3d", 3, "both"))  # step 3: the 3D student, as before


# -- cross-view: the 2D network's slice directions teach each other ------------------------------------------
def test_cross_view_needs_the_triplanar_2d_network():
    with pytest.raises(InputError, match="teacher.cross_view.*teacher.triplanar"):
        apply_overrides(preset("default"), {"teacher.cross_view": True})
    assert apply_overrides(preset("quick"), {"teacher.cross_view": True})["teacher"]["cross_view"] is True


def test_cross_view_teaches_the_2d_network_only_when_the_3d_one_does_not_and_it_has_learnt():
    fit = LabeledFit({"2d": 0.6, "3d": 0.7})
    assert fit.teacher("auto", "2d", cross_view=True) == "views"
    assert fit.teacher("auto", "2d", cross_view=False) is None  # the setting off: labels only, as before
    assert fit.teacher("2d_to_3d", "2d", cross_view=True) == "views"
    assert fit.teacher("both", "2d", cross_view=True) == "3d"  # the 3D network teaches it: no change
    assert fit.teacher("auto", "3d", cross_view=True) == "2d"  # the 3D student is unchanged
    assert LabeledFit({"2d": 0.2, "3d": 0.22}).teacher("auto", "2d", True) is None  # not learnt: does not teach
    assert LabeledFit({"2d": 0.05, "3d": 0.3}).teacher("auto", "2d", True) == "3d"  # failed: the 3D one teaches
    assert LabeledFit({"2d": 0.05, "3d": 0.2}).teacher("auto", "2d", True) is None  # failed, 3D not learnt


def test_the_views_teacher_is_the_2d_network_along_its_other_slice_axes(tmp_path_factory):
    trainer = _trainer(trained_run(tmp_path_factory).run_dir, triplanar=True, cross_view=True)
    x = _patch(trainer)
    model = trainer.model2d.eval()
    with torch.no_grad():
        per_axis = {axis: torch.softmax(slicing.apply_2d(model, x, axis, 128), 1) for axis in (0, 1, 2)}
    model.train()
    for step in (2, 3, 4):  # the student trains along axes 2, 0, 1 (trainer.axes_2d in turn)
        trainer.step = step
        student = trainer._student_axis()
        others = [per_axis[a] for a in (0, 1, 2) if a != student]
        assert torch.allclose(trainer._teacher_targets("views", x), sum(others) / 2, atol=1e-5)
    assert not torch.allclose(trainer._teacher_targets("views", x), trainer._teacher_targets("2d", x), atol=1e-3)


def test_cross_view_moves_the_2d_network_with_the_unlabeled_patches_and_records_it(tmp_path_factory):
    """At a 2D-student step under 2d_to_3d, cross_view adds the unlabeled patches (taught by the other slice
    directions) to the 2D gradient; without it the gradient is the labeled patches' alone."""
    run_dir = trained_run(tmp_path_factory).run_dir

    def step(cross_view: bool, labels_only: bool = False) -> tuple[list[torch.Tensor], dict]:
        trainer = _trainer(run_dir, directions="2d_to_3d", triplanar=True, cross_view=cross_view)
        trainer.config["lrg"]["unlabeled"] = "add"
        trainer.fit = LabeledFit({"2d": 0.6, "3d": 0.7})  # both have learnt the structure (the tiny run has not)
        batch = trainer.draw_batch(2, trainer.masks_version)
        assert len(batch.x_l) and len(batch.x_u)
        if labels_only:
            batch = dataclasses.replace(batch, x_u=batch.x_u[:0], x_clean=None, n_unlabeled=0)
        trainer.step = 2
        record = trainer.train_step(batch)
        return [p.grad.clone() for p in trainer.model2d.parameters() if p.grad is not None], record

    labels, _ = step(False, labels_only=True)
    without, record_without = step(False)
    with_views, record_with = step(True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(without, labels))
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(with_views, labels))
    assert record_without["taught"] == [] and record_with["taught"] == ["2d"]


# -- auto: a network teaches only while it fits the labeled patches at least as well as its student ----------
def test_soft_dice_sums_add_up_over_micro_batches_and_reach_one_when_perfect():
    target = torch.nn.functional.one_hot(torch.randint(0, 3, (4, 6, 5, 4), generator=torch.Generator().manual_seed(1)),
                                         3).movedim(-1, 1).float()
    overlap, size = soft_dice_sums(40 * target - 20, target).tolist()  # confident and right: Dice 1
    assert abs(overlap / size - 1) < 1e-6
    logits = torch.randn(4, 3, 6, 5, 4)
    whole = soft_dice_sums(logits, target)
    assert torch.allclose(soft_dice_sums(logits[:1], target[:1]) + soft_dice_sums(logits[1:], target[1:]), whole)
    assert 0 < float(whole[0] / whole[1]) < 0.6  # random logits: a poor fit
    assert float(soft_dice_sums(-logits.abs() * 0 - 20 * target, target)[0]) < 1e-3  # wrong everywhere: no overlap


def test_labeled_fit_is_a_running_mean_and_decides_the_directions():
    fit = LabeledFit()
    auto = {net: fit.learns_from_teacher("auto", net) for net in ("2d", "3d")}
    assert auto == {"2d": False, "3d": True}  # no evidence yet: the pretrained 2D network teaches
    fit.update("3d", 0.0, 0.0)  # no labeled patch: nothing learnt
    assert fit.dice["3d"] is None
    fit.update("2d", 5.0, 10.0)
    fit.update("3d", 8.0, 10.0)
    assert fit.dice == {"2d": 0.5, "3d": 0.8}
    # fitting the training patches worse than the overfitting 3D network is no failure: the 2D network teaches
    assert fit.learns_from_teacher("auto", "3d") and not fit.learns_from_teacher("auto", "2d")
    assert not fit.failed("2d") and not fit.failed("3d")
    fit.update("2d", 0.0, 10.0)
    assert abs(fit.dice["2d"] - 0.9 * 0.5) < 1e-9
    for _ in range(10):  # the 2D network finds less and less of the structure: it fails and the 3D one teaches
        fit.update("2d", 0.0, 10.0)
    assert fit.failed("2d") and fit.dice["2d"] < 0.5 * fit.dice["3d"]
    assert fit.learns_from_teacher("auto", "2d") and not fit.learns_from_teacher("auto", "3d")
    assert fit.learns_from_teacher("both", "2d") and fit.learns_from_teacher("both", "3d")
    assert not fit.learns_from_teacher("2d_to_3d", "2d") and fit.learns_from_teacher("2d_to_3d", "3d")


def test_under_auto_a_network_that_has_not_learnt_the_structure_never_teaches():
    def auto(fit: dict) -> dict[str, bool]:
        return {net: LabeledFit(fit).learns_from_teacher("auto", net) for net in ("2d", "3d")}

    assert auto({"2d": 0.3, "3d": 0.4}) == {"2d": False, "3d": True}  # both learnt: the 2D network teaches
    assert auto({"2d": 0.2, "3d": 0.22}) == {"2d": False, "3d": False}  # neither learnt: labels only
    assert auto({"2d": 0.05, "3d": 0.2}) == {"2d": False, "3d": False}  # 2D failed, but the 3D has not learnt
    assert auto({"2d": 0.05, "3d": 0.3}) == {"2d": True, "3d": False}  # 2D failed, the learnt 3D teaches
    fit = LabeledFit({"2d": 0.2, "3d": 0.4})
    assert not fit.learnt("2d") and fit.learnt("3d") and not fit.usable("2d") and fit.usable("3d")
    # the reference's directions do not look at the fit
    assert fit.learns_from_teacher("both", "2d") and fit.learns_from_teacher("2d_to_3d", "3d")


def test_a_run_whose_unlabeled_volumes_taught_nothing_says_so():
    fit = LabeledFit({"2d": 0.04, "3d": 0.12})
    warmup = [{"stage": "warmup", "unlabeled_share": 0.0, "taught": []}]
    idle = warmup + [{"stage": "cotrain", "unlabeled_share": 0.5, "taught": []}] * 3
    message = unlabeled_unused(idle, fit)
    assert message and "unlabeled volumes were not used" in message and "2D 0.04, 3D 0.12" in message
    assert "Train longer" in message
    assert unlabeled_unused(idle[:-1] + [{"stage": "cotrain", "unlabeled_share": 0.5, "taught": ["3d"]}], fit) is None
    assert unlabeled_unused(warmup, fit) is None  # stopped before co-training: nothing to say
    labeled_only = warmup + [{"stage": "cotrain", "unlabeled_share": 0.0, "taught": []}] * 3  # lrg.mode=off
    assert unlabeled_unused(labeled_only, fit) is None
    older = warmup + [{"stage": "cotrain", "unlabeled_share": 0.5}]  # a history from before "taught" existed
    assert unlabeled_unused(older, fit) is None


def test_auto_directions_follow_the_labeled_fit_on_real_steps(tmp_path_factory, tmp_path):
    """teacher.directions=auto on real steps: the 3D student learns from the 2D teacher and the 2D student from
    labels only, unless the 2D network failed on the labeled patches; then the reverse. Each step measures the
    student's soft Dice on its labeled patches (the value a separate forward pass gives), and the running values
    are in the history and the checkpoint."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run(tmp_path_factory).run_dir, run_dir)

    def grads(network: str, step: int, directions: str, fit: dict | None = None,
              labels_only: bool = False) -> tuple[list[torch.Tensor], Trainer, dict]:
        trainer = _trainer(run_dir, directions=directions)
        trainer.config["lrg"]["unlabeled"] = "add"  # labeled and unlabeled patches in one batch
        if fit:
            trainer.fit = LabeledFit(fit)
        batch = trainer.draw_batch(step, trainer.masks_version)
        if labels_only:
            batch = dataclasses.replace(batch, x_u=batch.x_u[:0], x_clean=None, n_unlabeled=0)
        trainer.step = step
        record = trainer.train_step(batch)
        model = trainer.model2d if network == "2d" else trainer.model3d
        return [p.grad.clone() for p in model.parameters() if p.grad is not None], trainer, record

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return len(a) == len(b) and all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b))

    learnt, failed_2d = {"2d": 0.5, "3d": 0.8}, {"2d": 0.3, "3d": 0.8}
    labels_2d, both_2d = grads("2d", 2, "both", labels_only=True)[0], grads("2d", 2, "both")[0]
    assert not same(labels_2d, both_2d)
    assert same(grads("2d", 2, "auto", learnt)[0], labels_2d)  # step 2: the 2D student
    assert same(grads("2d", 2, "auto", failed_2d)[0], both_2d)
    labels_3d, both_3d = grads("3d", 3, "both", labels_only=True)[0], grads("3d", 3, "both")[0]
    assert not same(labels_3d, both_3d)
    assert same(grads("3d", 3, "auto", learnt)[0], both_3d)  # step 3: the 3D student
    assert same(grads("3d", 3, "auto", failed_2d)[0], labels_3d)
    neither = {"2d": 0.1, "3d": 0.15}  # no network has learnt the structure: both students from labels only
    assert same(grads("2d", 2, "auto", neither)[0], labels_2d)
    gradients, _, record = grads("3d", 3, "auto", neither)
    assert same(gradients, labels_3d) and record["taught"] == []  # the history says who learnt from pseudo-labels
    assert grads("3d", 3, "auto", learnt)[2]["taught"] == ["3d"]

    # the measured fit: with no running values yet, a 3D step records the 3D network's soft Dice on the batch's
    # labeled patches, as a separate forward pass with the step's random state finds it
    trainer = _trainer(run_dir, directions="auto")
    assert None not in trainer.fit.dice.values()  # the tiny run's checkpoint holds both running values
    trainer.config["lrg"]["unlabeled"] = "add"
    trainer.fit = LabeledFit()
    trainer.step = 3
    batch = trainer.draw_batch(3, trainer.masks_version)
    before = copy.deepcopy(trainer.model3d)
    torch.manual_seed(batch.torch_seed)
    with torch.no_grad():
        overlap, size = soft_dice_sums(before(batch.x_l), torch.nn.functional.one_hot(
            batch.y_l[:, 0].long(), trainer.num_classes).movedim(-1, 1).float()).tolist()
    record = trainer.train_step(batch)
    assert record["train_dice_2d"] is None and abs(record["train_dice_3d"] - overlap / size) < 1e-4
    assert 0 < record["train_dice_3d"] < 1
    trainer.save_checkpoint()
    assert _trainer(run_dir, directions="auto").fit.dice == trainer.fit.dice
