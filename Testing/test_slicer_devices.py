"""The module's device setting: "all" GPUs only on a machine with several, and what each job phase then asks the
engine for (slicer-core, no Qt). No GPU here: the engine is not started, the phases' command lines are checked
(that ``--gpus all`` runs is covered by the engine's own tests with CPU ranks, Testing/test_distributed.py)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import slicer_test_utils  # noqa: F401  (puts MNSegment/ on sys.path)
from MNSegmentSlicerLib.logic import ALL_GPUS, MNSegmentLogic, device_argument, device_choices, engine_device_args
from slicer_test_utils import add_segmentation, add_volume, ellipsoid_case, new_scene

GPU = {"index": 0, "name": "Stand-in GPU", "memory_gb": 24.0}


def test_all_gpus_is_offered_only_with_several_gpus():
    assert device_choices([]) == ["auto", "gpu", "cpu"]
    assert device_choices([GPU]) == ["auto", "gpu", "cpu"]
    assert device_choices([GPU, {**GPU, "index": 1}]) == ["auto", "gpu", "cpu", ALL_GPUS]


def test_device_choice_to_engine_options():
    assert device_argument("All") == ALL_GPUS
    assert engine_device_args(ALL_GPUS) == ["--device", "cuda", "--gpus", "all"]
    assert engine_device_args(device_argument("gpu")) == ["--device", "cuda"]  # one GPU: as before
    assert engine_device_args("cpu") == ["--device", "cpu"]
    with pytest.raises(ValueError, match="all"):
        device_argument("every")


@pytest.mark.parametrize("device, gpus", [(ALL_GPUS, ["--gpus", "all"]), ("gpu", [])])
def test_train_resume_and_predict_phases_ask_for_all_gpus(tmp_path, monkeypatch, device, gpus):
    scene = new_scene()
    image, label = ellipsoid_case(np.random.default_rng(0), shape=(16, 20, 20))
    volume = add_volume(scene, "CT 1", image)
    segmentation = add_segmentation(scene, volume, label, {1: "Lesion"})
    unlabeled = add_volume(scene, "CT 2", image)
    logic = MNSegmentLogic(scene)
    started = []
    monkeypatch.setattr(logic, "_run", lambda phases, *args, **kwargs: started.append(phases))  # no engine start
    logic.train([(volume, segmentation)], [unlabeled], output_dir=tmp_path / "job", device=device)
    train, predict = started[0][1], started[0][2]
    assert train.args[train.args.index("--device"):][:2 + len(gpus)] == ["--device", "cuda", *gpus]
    started[0][0].run(threading.Event())  # the export phase writes job.json, which resume and predict read
    predict_args = predict.before()
    assert predict_args[:1] == ["predict"] and ("--gpus" in predict_args) == bool(gpus)
    logic.resume(tmp_path / "job")
    resume = started[1][0]
    assert resume.args[:1] == ["resume"] and (resume.args[-2:] == ["--gpus", "all"]) == bool(gpus)
