"""The widget's lists with a real slicer-core scene: nodes removed between calls, only scalar 3D volumes
offered, the export never on the caller's thread, settings refused before anything is written, predictions
in class order, finished jobs not kept forever."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import slicer
from slicer_test_utils import add_segmentation, add_volume, new_scene

# isort: split
from MNSegmentSlicerLib import export, selection
from MNSegmentSlicerLib import job as jobs
from MNSegmentSlicerLib.logic import MNSegmentLogic


def _volume(scene, name, seed=0):
    rng = np.random.default_rng(seed)
    return add_volume(scene, name, rng.normal(50, 5, (10, 12, 14)).astype(np.float32))


def _labeled(scene, name, seed=0):
    volume = _volume(scene, name, seed)
    label = np.zeros((10, 12, 14), np.uint8)
    label[2:6, 3:8, 4:10] = 1
    return volume, add_segmentation(scene, volume, label, {1: "Lesion"})


def _stored(parameter_node, role, nodes):
    """Store a node list the way parameterNodeWrapper does (one node reference per element)."""
    for index, node in enumerate(nodes):
        parameter_node.SetNodeReferenceID(f"{role}{index}", node.GetID() if node is not None else None)
    return lambda: [parameter_node.GetNodeReference(f"{role}{i}") for i in range(len(nodes))]


def test_removed_nodes_read_back_as_none_and_are_filtered_everywhere():
    scene = new_scene()
    parameters = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "MNSegment")
    (v1, s1), (v2, s2) = _labeled(scene, "a"), _labeled(scene, "b", 1)
    half = _volume(scene, "half filled", 2)
    other = _volume(scene, "other", 3)
    volumes = _stored(parameters, "labeledVolumes", [v1, v2, half])
    segmentations = _stored(parameters, "labeledSegmentations", [s1, s2, None])
    unchecked = _stored(parameters, "uncheckedVolumes", [other])
    scene.RemoveNode(v2)
    scene.RemoveNode(s2)
    scene.RemoveNode(other)
    assert volumes()[1] is None and unchecked() == [None]  # what the widget gets after a deletion
    rows = selection.stored_rows(volumes(), segmentations())
    assert rows == [(v1, s1), (half, None)]  # the half-filled row survives, the deleted one is gone
    assert selection.complete_pairs(rows) == [(v1, s1)]
    assert selection.node_ids(unchecked()) == set()
    logic = MNSegmentLogic(scene)
    assert logic.unlabeled_candidates(rows) == []  # v1 and half are taken; v2 and other are gone
    scene.RemoveNode(s1)
    assert selection.stored_rows(volumes(), segmentations()) == [(v1, None), (half, None)]


def test_only_scalar_3d_volumes_are_offered():
    scene = new_scene()
    scalar = _volume(scene, "scalar")
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    slicer.util.updateVolumeFromArray(labelmap, np.zeros((4, 4, 4), np.uint8))
    vector = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    slicer.util.updateVolumeFromArray(vector, np.zeros((4, 4, 4, 3), np.uint8))
    dwi = scene.AddNewNodeByClass("vtkMRMLDiffusionWeightedVolumeNode", "dwi")
    dti = scene.AddNewNodeByClass("vtkMRMLDiffusionTensorVolumeNode", "dti")
    assert all(node.IsA("vtkMRMLScalarVolumeNode") for node in (vector, dwi, dti))  # why IsA was not enough
    logic = MNSegmentLogic(scene)
    assert logic.scalar_volumes() == [scalar]
    assert logic.unlabeled_candidates([]) == [scalar]
    for node in (labelmap, vector, dwi, dti):
        with pytest.raises(ValueError, match="not a scalar volume"):
            export.check_volume(node)


def test_train_returns_before_any_file_is_written_and_cancel_during_export(tmp_path, monkeypatch):
    scene = new_scene()
    labeled, unlabeled = _labeled(scene, "a"), _volume(scene, "b", 1)
    release, threads = threading.Event(), set()
    write = export.write_snapshot

    def slow_write(snapshot, path):  # the export step, held until the test lets it go
        threads.add(threading.get_ident())
        assert release.wait(30)
        return write(snapshot, path)

    monkeypatch.setattr(export, "write_snapshot", slow_write)
    logic = MNSegmentLogic(scene)
    job = logic.train([labeled], [unlabeled], output_dir=tmp_path, device="cpu", wait=False)
    assert job.status == jobs.RUNNING and job.phase == "export"
    assert not list(tmp_path.rglob("*.nrrd")) and not (tmp_path / "datalist.json").exists()
    job.cancel()
    assert job.status == jobs.CANCELLING
    release.set()
    assert job.wait(timeout=30) == jobs.CANCELLED
    assert threads and threading.get_ident() not in threads  # written on a worker thread
    assert not (tmp_path / "datalist.json").exists() and not (tmp_path / "run").exists()
    assert job.phases[1].returncode is None  # the engine never started


@pytest.mark.parametrize(("settings", "message"), [
    ({"steps": 0}, "Steps"), ({"batch_size": -1}, "Batch size"), ({"patch_size": [96, 96]}, "Patch size"),
])
def test_impossible_settings_are_refused_before_export(tmp_path, settings, message):
    scene = new_scene()
    labeled = _labeled(scene, "a")
    with pytest.raises(ValueError, match=message):
        MNSegmentLogic(scene).train([labeled], [], output_dir=tmp_path / "job", wait=False, **settings)
    assert not (tmp_path / "job").exists()


def test_prediction_segments_follow_class_order(tmp_path):
    import SimpleITK as sitk

    scene = new_scene()
    volume = _volume(scene, "v")
    path = tmp_path / "prediction.nii.gz"
    prediction = np.zeros((10, 12, 14), np.uint8)
    prediction[1:4, 1:4, 1:4] = 3  # only the last class was predicted, plus a value no class has
    prediction[5:7, 5:7, 5:7] = 7
    image = sitk.GetImageFromArray(prediction)
    image.CopyInformation(sitk.ReadImage(str(export.export_volume(volume, tmp_path / "v.nrrd"))))
    sitk.WriteImage(image, str(path))
    classes = [{"value": v, "name": n, "color": [0.5, 0.5, 0.5]} for v, n in ((1, "liver"), (2, "spleen"),
                                                                            (3, "kidney"))]
    node = export.load_labelmap_as_segmentation(path, volume, classes)
    assert [name for _sid, name, _c in export.segments_of(node)] == ["liver", "spleen", "kidney", "Label 7"]


def test_finished_jobs_are_not_kept_forever(tmp_path):
    scene = new_scene()
    logic = MNSegmentLogic(scene)
    for _ in range(3):
        job = logic._run([jobs.Phase("nothing", run=lambda stop: None)], tmp_path, scene, True, None, None,
                         None, None, None, load=False)
        assert job.status == jobs.DONE
    assert logic.jobs == [job]
