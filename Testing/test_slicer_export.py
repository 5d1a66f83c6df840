"""Scene ⇄ files of the Slicer module, with a real slicer-core MRML scene (no engine involved)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk
from slicer_test_utils import add_segmentation, add_volume, new_scene, rotation

# isort: split
from MNSegmentSlicerLib import dependencies, export
from MNSegmentSlicerLib.job import EngineError
from MNSegmentSlicerLib.logic import PREDICTION_ATTRIBUTE, MNSegmentLogic

SPACING = (0.7, 1.3, 2.5)
ORIGIN = (12.0, -30.5, 7.25)


def _ijk_to_ras(node):
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def _sitk_ijk_to_ras(img):
    """4x4 IJK→RAS of a SimpleITK image (SimpleITK is LPS)."""
    d = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    m = np.eye(4)
    m[:3, :3] = d
    m[:3, 3] = img.GetOrigin()
    return np.diag([-1, -1, 1, 1]) @ m


@pytest.fixture()
def scene():
    return new_scene()


def _case(scene, name, shape=(12, 14, 16), seed=0, directions=None):
    rng = np.random.default_rng(seed)
    image = rng.normal(50, 5, shape).astype(np.float32)
    vol = add_volume(scene, name, image, SPACING, ORIGIN, directions or rotation(30))
    label = np.zeros(shape, np.uint8)
    label[2:6, 3:8, 4:10] = 1
    label[7:10, 8:12, 2:6] = 2
    return vol, label


def test_volume_and_labelmap_round_trip_geometry(scene, tmp_path):
    vol, label = _case(scene, "Brain é 1")
    seg = add_segmentation(scene, vol, label, {1: "tumour", 2: "oedema"})
    folder = tmp_path / "job folder ü"
    meta = MNSegmentLogic(scene).export_cases([(vol, seg)], [], folder)
    case = meta["cases"][0]
    image = sitk.ReadImage(str(folder / case["image"]))
    labels = sitk.ReadImage(str(folder / case["label"]))
    for img in (image, labels):
        assert img.GetSize() == (16, 14, 12)
        assert np.allclose(_sitk_ijk_to_ras(img), _ijk_to_ras(vol), atol=1e-4)
    assert np.allclose(sitk.GetArrayFromImage(image), slicer.util.arrayFromVolume(vol))
    exported = sitk.GetArrayFromImage(labels)
    assert np.issubdtype(exported.dtype, np.integer)
    assert np.array_equal(exported, label)  # first-seen order: tumour=1, oedema=2
    datalist = json.loads((folder / "datalist.json").read_text(encoding="utf-8"))
    assert datalist["classes"] == {"1": "tumour", "2": "oedema"}
    assert datalist["labeled"] == [{"image": case["image"], "label": case["label"]}]
    assert not any(p.startswith("/") for p in (case["image"], case["label"]))  # relative to the datalist


def test_segmentation_on_other_grid_is_resampled_to_volume(scene, tmp_path):
    vol, label = _case(scene, "ct")
    # The segmentation was drawn on a coarser volume covering the same space.
    coarse = add_volume(scene, "coarse", np.zeros((6, 7, 8), np.float32), tuple(2 * s for s in SPACING),
                        ORIGIN, rotation(30))
    coarse_label = label[::2, ::2, ::2]
    seg = add_segmentation(scene, coarse, coarse_label, {1: "a", 2: "b"})
    meta = MNSegmentLogic(scene).export_cases([(vol, seg)], [], tmp_path)
    labels = sitk.ReadImage(str(tmp_path / meta["cases"][0]["label"]))
    assert labels.GetSize() == (16, 14, 12)
    assert np.allclose(_sitk_ijk_to_ras(labels), _ijk_to_ras(vol), atol=1e-4)
    assert set(np.unique(sitk.GetArrayFromImage(labels))) == {0, 1, 2}


def test_label_values_consistent_by_segment_name(scene, tmp_path):
    vol1, label1 = _case(scene, "case one", seed=1)
    vol2, label2 = _case(scene, "case two", seed=2, directions=rotation(-15))
    vol3, _ = _case(scene, "unlabeled", seed=3)
    seg1 = add_segmentation(scene, vol1, label1, {1: "Liver", 2: "spleen"},
                            colors={1: (0.8, 0.2, 0.2), 2: (0.1, 0.6, 0.1)})
    # Other order, other spelling, one new class.
    label2b = label2.copy()
    label2b[0:2, 0:2, 0:2] = 3
    seg2 = add_segmentation(scene, vol2, label2b, {2: " liver", 1: "Spleen", 3: "kidney"})
    logic = MNSegmentLogic(scene)
    meta = logic.export_cases([(vol1, seg1), (vol2, seg2)], [vol3], tmp_path)
    assert [(c["value"], c["name"]) for c in meta["classes"]] == [(1, "Liver"), (2, "spleen"), (3, "kidney")]
    assert np.allclose(meta["classes"][0]["color"], (0.8, 0.2, 0.2))
    out1 = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / meta["cases"][0]["label"])))
    out2 = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / meta["cases"][1]["label"])))
    assert np.array_equal(out1, label1)
    expected2 = np.zeros_like(label2b)
    expected2[label2b == 2] = 1  # " liver" → Liver = 1
    expected2[label2b == 1] = 2  # "Spleen" → spleen = 2
    expected2[label2b == 3] = 3
    assert np.array_equal(out2, expected2)
    assert [c["role"] for c in meta["cases"]] == ["labeled", "labeled", "unlabeled"]
    datalist = json.loads((tmp_path / "datalist.json").read_text(encoding="utf-8"))
    assert len(datalist["unlabeled"]) == 1 and "label" not in datalist["unlabeled"][0]
    stems = [c["stem"] for c in meta["cases"]]
    assert len(set(stems)) == 3 and all("." not in s and " " not in s for s in stems)


def test_export_rejects_bad_input(scene, tmp_path):
    vol, label = _case(scene, "v")
    seg = add_segmentation(scene, vol, label, {1: "a"})
    logic = MNSegmentLogic(scene)
    with pytest.raises(ValueError, match="listed twice"):
        logic.export_cases([(vol, seg)], [vol], tmp_path)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    vol.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(ValueError, match="harden"):
        logic.export_cases([(vol, seg)], [], tmp_path)


def _fake_prediction(folder, meta, scene, stem_case, array):
    vol = scene.GetNodeByID(stem_case["volume_id"])
    ref = sitk.ReadImage(str(folder / stem_case["image"]))
    img = sitk.GetImageFromArray(array.astype(np.uint8))
    img.CopyInformation(ref)
    out = folder / "run" / "predictions"
    out.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(out / f"{stem_case['stem']}.nii.gz"))
    return vol


def test_predictions_load_as_segmentations(scene, tmp_path):
    vol1, label1 = _case(scene, "labeled")
    seg1 = add_segmentation(scene, vol1, label1, {1: "tumour", 2: "oedema"},
                            colors={1: (0.9, 0.1, 0.1), 2: (0.1, 0.1, 0.9)})
    vol2, label2 = _case(scene, "Patient 2 ä", directions=rotation(75))
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 2")
    study = sh.CreateStudyItem(patient, "Study")
    sh.CreateItem(study, vol2)
    logic = MNSegmentLogic(scene)
    folder = tmp_path / "jöb"
    meta = logic.export_cases([(vol1, seg1)], [vol2], folder)
    label2[0:2, 0:2, 0:2] = 5  # a value the classes do not know
    _fake_prediction(folder, meta, scene, meta["cases"][1], label2)
    nodes = logic.load_predictions(folder)
    assert len(nodes) == 1
    node = nodes[0]
    assert node.IsA("vtkMRMLSegmentationNode") and vol2.GetName() in node.GetName()
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is vol2
    assert node.GetAttribute(PREDICTION_ATTRIBUTE)
    segments = {name: color for _sid, name, color in export.segments_of(node)}
    assert set(segments) == {"tumour", "oedema", "Label 5"}
    assert np.allclose(segments["tumour"], (0.9, 0.1, 0.1), atol=0.01)
    assert np.allclose(segments["oedema"], (0.1, 0.1, 0.9), atol=0.01)
    for _sid, name, _color in export.segments_of(node):
        value = {"tumour": 1, "oedema": 2, "Label 5": 5}[name]
        array = _segment_array(scene, node, _sid, vol2)
        assert np.array_equal(array.astype(bool), label2 == value), name
    assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study
    # Loading again later, in a new scene, finds the volume by name or loads it from the job folder.
    other = new_scene()
    again = MNSegmentLogic(other).load_predictions(folder)
    assert len(again) == 1
    loaded_vol = again[0].GetNodeReference(again[0].GetReferenceImageGeometryReferenceRole())
    assert loaded_vol.GetName() == vol2.GetName()
    assert np.allclose(_ijk_to_ras(loaded_vol), _ijk_to_ras(vol2), atol=1e-4)


def _segment_array(scene, seg, segment_id, reference):
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        seg, [segment_id], labelmap, reference, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    array = slicer.util.arrayFromVolume(labelmap).copy()
    scene.RemoveNode(labelmap)
    return array


def test_prediction_on_wrong_grid_is_refused(scene, tmp_path):
    vol1, label1 = _case(scene, "a")
    seg1 = add_segmentation(scene, vol1, label1, {1: "x"})
    vol2, _ = _case(scene, "b")
    meta = MNSegmentLogic(scene).export_cases([(vol1, seg1)], [vol2], tmp_path)
    out = tmp_path / "run" / "predictions"
    out.mkdir(parents=True)
    sitk.WriteImage(sitk.Image(5, 5, 5, sitk.sitkUInt8), str(out / f"{meta['cases'][1]['stem']}.nii.gz"))
    with pytest.raises(ValueError, match="not on the grid"):
        MNSegmentLogic(scene).load_predictions(tmp_path)


def test_a_job_whose_predictions_cannot_all_be_loaded_leaves_no_segmentation_behind(scene, tmp_path):
    vol1, label1 = _case(scene, "a")
    seg1 = add_segmentation(scene, vol1, label1, {1: "x"})
    vol2, label2 = _case(scene, "b")
    vol3, _ = _case(scene, "c")
    logic = MNSegmentLogic(scene)
    meta = logic.export_cases([(vol1, seg1)], [vol2, vol3], tmp_path)
    _fake_prediction(tmp_path, meta, scene, meta["cases"][1], label2)  # b predicted, c missing
    count = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    with pytest.raises(EngineError, match="No prediction for c"):
        logic.load_predictions(tmp_path)
    out = tmp_path / "run" / "predictions"
    sitk.WriteImage(sitk.Image(5, 5, 5, sitk.sitkUInt8), str(out / f"{meta['cases'][2]['stem']}.nii.gz"))
    with pytest.raises(ValueError, match="not on the grid"):  # c's file on a wrong grid, after b loaded
        logic.load_predictions(tmp_path)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == count


def test_pairing_and_unlabeled_candidates(scene):
    vol1, label1 = _case(scene, "v1")
    vol2, _ = _case(scene, "v2")
    seg1 = add_segmentation(scene, vol1, label1, {1: "x"})
    scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "a label map is not a volume to segment")
    predicted = add_segmentation(scene, vol2, label1, {1: "x"})
    predicted.SetAttribute(PREDICTION_ATTRIBUTE, "somewhere")
    logic = MNSegmentLogic(scene)
    pairs = logic.pair_segmentations()
    assert pairs == [(vol1, seg1)]
    assert len(logic.pair_segmentations(include_predictions=True)) == 2
    assert logic.unlabeled_candidates(pairs) == [vol2]


def test_dependencies_never_touch_simpleitk():
    present = {"torch", "numpy", "SimpleITK", "scipy", "psutil"}
    missing = dependencies.missing_packages(installed=lambda module: module in present)
    names = [r.name for r in missing]
    assert {"monai", "timm", "peft", "torchvision"} <= set(names)
    assert "SimpleITK" not in names
    versions = {"SimpleITK": "2.4.0", "numpy": "1.26.4", "torch": "2.5.1"}
    lines = dependencies.constraints(version=versions.get)
    assert "SimpleITK==2.4.0" in lines and "numpy==1.26.4" in lines and "torch==2.5.1" in lines
    args = dependencies.pip_arguments(missing + [r for r in dependencies.REQUIREMENTS if r.via == "slicer"],
                                      "c.txt")
    assert args[-2:] == ["--constraint", "c.txt"]
    assert not any(a.lower().startswith(("simpleitk", "torch", "numpy")) for a in args[:-2])
    assert "torch" in dependencies.describe(missing).lower()
    assert dependencies.missing_packages() == []  # the test environment has everything the engine needs


def test_train_refuses_a_folder_that_already_holds_a_training(scene, tmp_path):
    vol, label = _case(scene, "v")
    seg = add_segmentation(scene, vol, label, {1: "a"})
    (tmp_path / "run").mkdir()
    with pytest.raises(ValueError, match="already holds a training"):
        MNSegmentLogic(scene).train([(vol, seg)], [], output_dir=tmp_path)
    with pytest.raises(ValueError, match="Unknown preset"):
        MNSegmentLogic(scene).train([(vol, seg)], [], output_dir=tmp_path / "new", preset="huge")
