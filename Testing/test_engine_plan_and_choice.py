"""data.planning (the experiment planner wired into `mnsegment train`), on real tiny trainings run as `mnsegment`
subprocesses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from engine_fixtures import make_dataset, parse_events, run_cli, set_args, to_image, trained_run

from MNSegmentLib import config as configuration
from MNSegmentLib.datalist import load_datalist
from MNSegmentLib.errors import InputError
from MNSegmentLib.preprocess import Plan
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
    return json.loads(path.read_text())


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


def test_explicit_patch_wins_over_auto_planning(tmp_path):
    datalist = make_dataset(tmp_path / "data", n_labeled=2, n_unlabeled=1)
    _train(datalist, tmp_path / "run", {**SMALL, "train.steps": 2, "sampling.patch_size": [16, 16, 16]})
    run_dir = tmp_path / "run"
    experiment = _json(run_dir / "plan.json")["experiment"]
    assert _json(run_dir / "config.json")["sampling"]["patch_size"] == [16, 16, 16] == experiment["patch_size"]
    assert experiment["sources"]["sampling.patch_size"] == "--set"
    assert "patch 16×16×16 set explicitly" in experiment["why"]


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
