"""data.planning (the experiment planner wired into `mnsegment train`) and the evidence-based choice of the output
network (model.json), on real tiny trainings run as `mnsegment` subprocesses."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from engine_fixtures import make_dataset, parse_events, run_cli, set_args, to_image, trained_run

from MNSegmentLib import config as configuration
from MNSegmentLib.data.datalist import load_datalist
from MNSegmentLib.data.preprocess import Plan
from MNSegmentLib.errors import InputError
from MNSegmentLib.evaluation.metrics import case_metrics
from MNSegmentLib.evaluation.network_choice import CANDIDATES, VALIDATION_STOPPED, choose_network, dice_per_class
from MNSegmentLib.events import Events
from MNSegmentLib.training.teachers import LabeledFit
from MNSegmentLib.workflow import plan_settings, train

QUICK_PATCH = [48, 48, 32]  # the quick preset's patch; the tiny volumes (32x32x20 voxels) are smaller
SMALL = {"sampling.batch_size": 2, "model2d.weights": "none", "train.warmup_fraction": 0.5, "data.planning": "auto"}


def _with_validation(datalist: Path) -> Path:
    """The last labeled case becomes a validation case."""
    data = json.loads(datalist.read_text())
    data["validation"] = [data["labeled"].pop()]
    datalist.write_text(json.dumps(data))
    return datalist


def _train(datalist: Path, output: Path, overrides: dict):
    result = run_cli("train", datalist, "--output", output, "--preset", "quick", "--device", "cpu", "--events",
                     *set_args(overrides), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return parse_events(result.stdout)


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    """planning=auto, no patch given, one validation case."""
    root = tmp_path_factory.mktemp("auto")
    datalist = _with_validation(make_dataset(root / "data", n_labeled=3, n_unlabeled=2))
    events = _train(datalist, root / "run", {**SMALL, "train.steps": 12})
    return root / "run", datalist, events


def test_auto_planning_is_recorded_and_used(auto_run):
    run_dir, _, events = auto_run
    experiment = _json(run_dir / "plan.json")["experiment"]
    config = _json(run_dir / "config.json")
    assert experiment["planning"] == "auto" and experiment["why"]
    assert set(experiment["sources"].values()) == {"planned"}
    # The planned patch fits the 32x32x20 volumes (sides multiples of the quick 3D U-Net's stride 8), not the
    # preset's 48x48x32; it is what training used (config.json) and what resume/predict read.
    assert experiment["patch_size"] == config["sampling"]["patch_size"] == [32, 32, 16]
    assert experiment["target_spacing"] == config["data"]["target_spacing"] == [1.0, 1.0, 2.0]
    assert experiment["slice_axis"] == config["data"]["slice_axis"] == 2
    assert config["data"]["planning"] == "auto"
    fingerprint = _json(run_dir / "fingerprint.json")
    assert len(fingerprint["cases"]) == 5
    assert sum(c["foreground_extent"] is not None for c in fingerprint["cases"]) == 3  # 2 labeled + 1 validation
    start = events[0]
    assert start["event"] == "start" and start["plan"] == experiment["why"]


def test_model_json_holds_three_scores_and_the_best(auto_run):
    run_dir, _, events = auto_run
    choice = _json(run_dir / "model.json")
    assert set(choice["scores"]) == set(CANDIDATES)
    assert all(0 <= v <= 1 for v in choice["scores"].values())
    assert choice["scores"][choice["network"]] == max(choice["scores"].values())
    assert choice["validation_cases"] == 1 and "validation case" in choice["reason"]
    done = events[-1]
    assert done["event"] == "done"
    assert done["network"] == choice["network"] and done["network_reason"] == choice["reason"]


def test_predict_without_network_uses_model_json(auto_run, tmp_path):
    run_dir, datalist, _ = auto_run
    image = datalist.parent / "images" / "case2.nii.gz"  # the validation case
    chosen = _json(run_dir / "model.json")["network"]
    default = run_cli("predict", image, "--model", run_dir, "--output", tmp_path / "default", "--device", "cpu")
    explicit = run_cli("predict", image, "--model", run_dir, "--output", tmp_path / "explicit", "--device", "cpu",
                       "--network", chosen)
    assert default.returncode == 0 and explicit.returncode == 0, default.stderr[-2000:] + explicit.stderr[-2000:]
    assert f"network {chosen} (model.json" in default.stderr
    arrays = [sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f / "case2.nii.gz")))
              for f in ("default", "explicit")]
    assert np.array_equal(*arrays)
    # An explicit --network wins over model.json.
    other = next(n for n in CANDIDATES if n != chosen)
    result = run_cli("predict", image, "--model", run_dir, "--output", tmp_path / "other", "--device", "cpu",
                     "--network", other)
    assert result.returncode == 0 and "model.json" not in result.stderr


def test_explicit_patch_wins_and_no_validation_keeps_the_presets_network(tmp_path):
    datalist = make_dataset(tmp_path / "data", n_labeled=2, n_unlabeled=1)
    events = _train(datalist, tmp_path / "run", {**SMALL, "train.steps": 2, "sampling.patch_size": [16, 16, 16]})
    run_dir = tmp_path / "run"
    experiment = _json(run_dir / "plan.json")["experiment"]
    assert _json(run_dir / "config.json")["sampling"]["patch_size"] == [16, 16, 16] == experiment["patch_size"]
    assert experiment["sources"]["sampling.patch_size"] == "--set"
    assert "patch 16×16×16 set explicitly" in experiment["why"]
    choice = _json(run_dir / "model.json")
    fit = choice.pop("labeled_fit")  # both networks' running Dice on the labeled patches, measured in training
    assert set(fit) == {"2d", "3d"} and all(0 <= value <= 1 for value in fit.values())
    assert {**choice, "labeled_fit": fit} == choose_network(None, 0, "ensemble", fit)
    if all(LabeledFit(fit).usable(net) for net in fit):  # quick preset: ensemble, unless a network has not learnt
        assert choice == {"network": "ensemble", "reason": "no validation cases: the preset's inference.network",
                          "scores": None, "validation_cases": 0}
    assert events[-1]["network"] == choice["network"]


def test_a_stop_after_training_skips_the_validation_and_keeps_the_model(tmp_path):
    """Stop asked on the final checkpoint (training has ended, the validation has not begun): the run ends at once
    as a finished one, with the preset's network and a reason and a warning that say the choice was skipped."""
    datalist = _with_validation(make_dataset(tmp_path / "data", n_labeled=3, n_unlabeled=2))
    stop, seen = threading.Event(), []
    events = Events(False)

    def listen(event: str, fields: dict) -> None:
        seen.append((event, fields))
        if event == "checkpoint" and fields["step"] == 4:
            stop.set()

    events.listeners.append(listen)
    train(datalist, tmp_path / "run", "quick", "cpu", {**SMALL, "train.steps": 4, "train.validate_every": 100},
          events=events, stop=stop)
    choice = _json(tmp_path / "run" / "model.json")
    assert choice["scores"] is None and choice["reason"].startswith(VALIDATION_STOPPED)
    assert (tmp_path / "run" / "model.pt").exists()
    warnings = [f["message"] for e, f in seen if e == "warning"]
    assert any(m.startswith(VALIDATION_STOPPED) for m in warnings)
    assert any("no suggestions" in m for m in warnings)  # the suggestions after training honour the stop too
    assert seen[-1][0] == "done" and seen[-1][1]["network"] == choice["network"]


def test_default_planning_keeps_the_presets_patch_and_median_labeled_spacing(tmp_path_factory):
    run = trained_run(tmp_path_factory)  # the shared run: planning left at its default
    experiment = _json(run.run_dir / "plan.json")["experiment"]
    assert experiment["planning"] == "preset" and experiment["why"] == []
    assert experiment["sources"] == {"data.target_spacing": "median spacing of the labeled cases",
                                     "sampling.patch_size": "--set", "data.slice_axis": "quick preset"}
    assert experiment["patch_size"] == [32, 32, 16] and experiment["target_spacing"] == [1.0, 1.0, 2.0]
    assert not (run.run_dir / "fingerprint.json").exists()
    assert run.events[0]["plan"] == []


def _settings(preset: str, datalist: Path, overrides: dict) -> tuple[dict, dict]:
    config = configuration.apply_overrides(configuration.preset(preset), overrides)
    config["preset"] = preset
    record, _ = plan_settings(config, load_datalist(datalist), overrides)
    return config, record


def test_preset_planning_leaves_the_configuration_as_it_is(tmp_path):
    datalist = make_dataset(tmp_path / "data", n_labeled=2, n_unlabeled=1)
    config, record = _settings("quick", datalist, {})
    assert config["sampling"]["patch_size"] == QUICK_PATCH and config["data"]["target_spacing"] is None
    assert record["sources"]["sampling.patch_size"] == "quick preset"
    config, _ = _settings("quick", datalist, {"data.planning": "auto"})
    assert config["sampling"]["patch_size"] == [32, 32, 16]  # the same data, planned


def test_paper_preset_keeps_its_reference_crop_with_auto_unless_set(tmp_path):
    datalist = make_dataset(tmp_path / "data", n_labeled=2, n_unlabeled=1)
    config, record = _settings("paper", datalist, {"data.planning": "auto"})
    assert config["sampling"]["patch_size"] == [160, 160, 64]
    assert record["sources"]["sampling.patch_size"] == "paper preset"
    assert any("kept from the paper preset" in reason for reason in record["why"])
    assert record["sources"]["data.target_spacing"] == "planned"
    config, record = _settings("paper", datalist, {"data.planning": "auto", "sampling.patch_size": [32, 32, 16]})
    assert config["sampling"]["patch_size"] == [32, 32, 16] and record["sources"]["sampling.patch_size"] == "--set"


def test_planning_value_is_validated():
    with pytest.raises(InputError, match="data.planning"):
        configuration.apply_overrides(configuration.preset("quick"), {"data.planning": "nnunet"})


def test_plan_json_from_before_planning_still_loads():
    plan = Plan.from_json({"target_spacing": [1.0, 1.0, 1.0], "normalization": "mr", "ct_window": None,
                           "label_values": [0, 1], "classes": {"1": "ball"}})
    assert plan.experiment is None




@pytest.mark.parametrize("label", ["other size", "fractions"])
def test_bad_label_with_auto_planning_is_one_clear_error_and_leaves_nothing(tmp_path, label):
    datalist = make_dataset(tmp_path / "data", n_labeled=2, n_unlabeled=1)
    path = datalist.parent / "labels" / "case1.nii.gz"
    if label == "other size":
        sitk.WriteImage(to_image(np.ones((20, 20, 10), np.uint8)), str(path))
    else:
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32) * 0.5
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(sitk.ReadImage(str(path)))
        sitk.WriteImage(image, str(path))
    with pytest.raises(InputError, match="case1.nii.gz"):
        train(datalist, tmp_path / "run", "quick", "cpu", {**SMALL, "train.steps": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no run folder, no partial folder


def test_choice_is_the_best_score_and_a_tie_keeps_the_presets_network():
    assert choose_network({"3d": 0.7, "2d": 0.8, "ensemble": 0.75}, 2, "3d")["network"] == "2d"
    tie = choose_network({"3d": 0.8, "2d": 0.8, "ensemble": 0.8}, 1, "ensemble")
    assert tie["network"] == "ensemble" and "1 validation case " in tie["reason"]
    assert choose_network(None, 0, "3d")["reason"].startswith("no validation cases")


def test_without_validation_the_ensemble_leaves_out_a_network_that_failed_on_the_labels():
    assert choose_network(None, 0, "ensemble", {"2d": 0.6, "3d": 0.4})["network"] == "ensemble"  # both learnt
    failed = choose_network(None, 0, "ensemble", {"2d": 0.05, "3d": 0.7})
    assert failed["network"] == "3d" and "2D network has not learnt the structure" in failed["reason"]
    assert failed["labeled_fit"] == {"2d": 0.05, "3d": 0.7}
    # below LEARNT_FIT a network is left out even when it is not far behind the other
    assert choose_network(None, 0, "ensemble", {"2d": 0.22, "3d": 0.3})["network"] == "3d"
    neither = choose_network(None, 0, "ensemble", {"2d": 0.09, "3d": 0.1})  # the one that found more, alone
    assert neither["network"] == "3d" and "neither network has learnt" in neither["reason"]
    assert "Train longer" in neither["reason"]
    assert choose_network(None, 0, "ensemble", {"2d": 0.12, "3d": 0.08})["network"] == "2d"
    assert choose_network(None, 0, "ensemble", {"2d": 0.8, "3d": 0.3})["network"] == "2d"
    assert choose_network(None, 0, "3d", {"2d": 0.8, "3d": 0.3})["network"] == "3d"  # the user's own choice stays
    assert choose_network(None, 0, "ensemble", {"2d": None, "3d": 0.3})["network"] == "ensemble"  # no evidence
    # with validation cases, their Dice decides, whatever the fit on the labeled patches
    assert choose_network({"3d": 0.5, "2d": 0.1, "ensemble": 0.6}, 1, "ensemble", {"2d": 0.05, "3d": 0.7})[
        "network"] == "ensemble"


def test_selection_dice_agrees_with_the_reported_metric():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, (12, 10, 8)).astype(np.uint8)
    prediction = np.where(rng.random(label.shape) < 0.3, rng.integers(0, 3, label.shape), label).astype(np.uint8)
    ours = dice_per_class(torch.from_numpy(prediction.astype(np.int64)), label, 3)
    reported = case_metrics(to_image(prediction), to_image(label))
    assert ours == pytest.approx([reported[1]["dice"], reported[2]["dice"]])
    assert dice_per_class(torch.zeros(4, 4, 4, dtype=torch.int64), np.zeros((4, 4, 4)), 2) == [1.0]  # both empty
