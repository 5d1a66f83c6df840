"""The Slicer module's logic driving the real engine (``python -m MNSegmentLib.cli``) on a tiny scene."""

from __future__ import annotations

import time

import numpy as np
import psutil
import pytest
import slicer
from slicer_test_utils import add_segmentation, add_volume, dice, ellipsoid_case, new_scene, rotation

# isort: split
from MNSegmentSlicerLib import EngineError
from MNSegmentSlicerLib import job as jobs
from MNSegmentSlicerLib.logic import MNSegmentLogic

# Small enough for ~1-2 minutes on 2 CPU cores, enough for a bright ellipsoid.
TINY = {"train.steps": 120, "sampling.batch_size": 2, "sampling.patch_size": [32, 32, 16]}


def _segment_array(scene, seg, reference):
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    ids = [seg.GetSegmentation().GetNthSegmentID(i) for i in range(seg.GetSegmentation().GetNumberOfSegments())]
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        seg, ids, labelmap, reference, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    array = slicer.util.arrayFromVolume(labelmap).copy()
    scene.RemoveNode(labelmap)
    return array


def _tiny_scene(n_labeled=3, n_unlabeled=3):
    scene = new_scene()
    rng = np.random.default_rng(7)
    labeled, unlabeled, truth = [], [], {}
    for i in range(n_labeled + n_unlabeled):
        image, label = ellipsoid_case(rng)
        spacing = (1.0, 1.0, 1.5)
        vol = add_volume(scene, f"Scan {i + 1} ü", image, spacing, (3.0 * i, -5.0, 2.0), rotation(20 * i))
        if i < n_labeled:
            seg = add_segmentation(scene, vol, label, {1: "Lesion"}, colors={1: (0.9, 0.6, 0.1)})
            labeled.append((vol, seg))
        else:
            unlabeled.append(vol)
            truth[vol.GetID()] = label
    return scene, labeled, unlabeled, truth


def test_train_on_tiny_scene_segments_unlabeled_volumes(tmp_path):
    scene, labeled, unlabeled, truth = _tiny_scene()
    logic = MNSegmentLogic(scene)
    progress = []
    t0 = time.monotonic()
    job = logic.train(labeled, unlabeled, output_dir=tmp_path / "job with spaces é", preset="quick", wait=True,
                      device="cpu", on_progress=lambda job, e: progress.append(e), **TINY)
    elapsed = time.monotonic() - t0
    assert job.status == jobs.DONE, job.error
    assert progress and progress[-1]["step"] == progress[-1]["total_steps"]
    assert {"stage", "step", "total_steps", "unlabeled_share", "eta_s"} <= set(progress[-1])
    nodes = job.result
    assert len(nodes) == len(unlabeled)
    for node, vol in zip(nodes, unlabeled, strict=False):
        assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is vol
        segment = node.GetSegmentation().GetNthSegment(0)
        assert segment.GetName() == "Lesion"
        assert np.allclose(segment.GetColor(), (0.9, 0.6, 0.1), atol=0.01)
        score = dice(_segment_array(scene, node, vol) > 0, truth[vol.GetID()])
        print(f"{vol.GetName()}: Dice {score:.3f} ({elapsed:.0f} s)")
        assert score > 0.8, f"{vol.GetName()}: Dice {score:.3f} after {elapsed:.0f} s"
    # The trained model is reusable on a volume it never saw.
    rng = np.random.default_rng(99)
    image, label = ellipsoid_case(rng)
    new = add_volume(scene, "New scan", image, (1.0, 1.0, 1.5), (0.0, 0.0, 0.0), rotation(-40))
    segs = logic.segment([new], job.folder, device="cpu")
    assert len(segs) == 1 and segs[0].GetSegmentation().GetNthSegment(0).GetName() == "Lesion"
    assert dice(_segment_array(scene, segs[0], new) > 0, label) > 0.8


def test_cancel_real_engine_leaves_no_process_then_resume(tmp_path):
    """Cancel the way it works on Windows, where Ctrl+Break may not reach a worker without a console: the
    stop file alone (no signal is sent). The worker saves a checkpoint; Resume continues from it."""
    scene, labeled, unlabeled, _ = _tiny_scene(2, 1)
    logic = MNSegmentLogic(scene)
    # enough steps that the stop lands in training even when a loaded machine delays the first progress event
    job = logic.train(labeled, unlabeled, output_dir=tmp_path, preset="quick", device="cpu",
                      **{**TINY, "train.steps": 80})
    job.signal_stop = False
    deadline = time.monotonic() + 240
    while job.poll() == jobs.RUNNING and not job.last_progress and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job.status == jobs.RUNNING and job.last_progress, job.error
    tree = [job.pid] + [p.pid for p in psutil.Process(job.pid).children(recursive=True)]
    t0 = time.monotonic()
    job.cancel(grace_s=60.0)  # a loaded machine may need more than the default 10 s before the kill
    assert time.monotonic() - t0 < 0.5 and job.status == jobs.CANCELLING
    assert job.wait(timeout=120) == jobs.CANCELLED
    log = "\n".join(job.log)
    assert "stop requested" in log and "SIGTERM" not in log  # the stop file did it, not a signal
    assert job.returncode == 3
    left = [pid for pid in tree if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert left == []
    assert job.result is None
    assert any(e["event"] == "checkpoint" for e in job.events)
    # Resume continues from the checkpoint, then segments the unlabeled volume.
    resumed = logic.resume(tmp_path, wait=True)
    assert resumed.status == jobs.DONE
    assert len(resumed.result) == 1
    node = resumed.result[0]
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is unlabeled[0]


def test_engine_bad_input_surfaces_message(tmp_path):
    scene, labeled, unlabeled, _ = _tiny_scene(1, 1)
    logic = MNSegmentLogic(scene)
    with pytest.raises(EngineError) as info:
        logic.train(labeled, unlabeled, output_dir=tmp_path, wait=True, device="cpu", **{"train.no_such_key": 1})
    message = str(info.value)
    assert "no_such_key" in message
    assert "Traceback" not in message and "\n" not in message
    assert info.value.job.returncode == 2


def test_train_more_starts_from_a_finished_job(tmp_path):
    """"Train more": a new job initialised from a finished job's networks (``train --init-from``), with one
    more labeled volume; an unfinished folder is refused before anything starts."""
    import json

    scene, labeled, unlabeled, _ = _tiny_scene(3, 1)
    logic = MNSegmentLogic(scene)
    short = {**TINY, "train.steps": 4}
    first = logic.train(labeled[:2], unlabeled, output_dir=tmp_path / "first", device="cpu", wait=True, **short)
    assert first.status == jobs.DONE, first.error
    with pytest.raises(ValueError, match="no finished training"):
        logic.train(labeled, unlabeled, output_dir=tmp_path / "bad", init_from=tmp_path, **short)
    assert not (tmp_path / "bad").exists()
    more = logic.train(labeled, unlabeled, output_dir=tmp_path / "more", device="cpu", wait=True,
                       init_from=tmp_path / "first", **short)
    assert more.status == jobs.DONE, more.error
    source = (tmp_path / "first" / "run").absolute()
    start = next(e for e in more.events if e["event"] == "start")
    assert start["init_from"]["run"] == str(source)
    assert json.loads((tmp_path / "more" / "run" / "config.json").read_text())["init_from"]["run"] == str(source)
    assert start["labeled"] == 3 and len(more.result) == 1
