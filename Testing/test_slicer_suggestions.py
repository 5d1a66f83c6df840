"""What to label next, in a real MRML scene (slicer-core): suggestions read from a job folder and matched to the
scene's volumes, sorted by score, shown with the disagreement overlay at the most uncertain slice, and a new
segmentation started for the Segment Editor.

The job folder is made for real: the module exports the scene's volumes (``export_cases``) and the engine's own
suggestion code scores them with two thresholding networks that disagree on one volume only (as in
test_engine_suggestions.py); no training is needed for what is tested here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import slicer
import torch
import vtk
from slicer_test_utils import add_volume, ellipsoid_case, new_scene, rotation
from test_engine_suggestions import Threshold

from MNSegmentLib import config as configuration
from MNSegmentLib.data.preprocess import Plan
from MNSegmentLib.inference.suggestions import Scorer, suggest_files

# isort: split
from MNSegmentSlicerLib import suggestions
from MNSegmentSlicerLib.logic import MNSegmentLogic

BRIGHTNESS = {"Scan A": 300.0, "Scan B": 150.0, "Scan C": 400.0}  # B lies between the two networks' thresholds
VIEWS = ("Red", "Yellow", "Green")  # slice view nodes as Slicer's layout makes them


def _matrix(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


@pytest.fixture
def job(tmp_path):
    """A scene with slice views and three volumes, and a job folder holding suggestions for them."""
    scene = new_scene()
    colors = slicer.vtkSlicerColorLogic()  # Slicer's default colour nodes (the heat map of the overlay)
    colors.SetMRMLScene(scene)
    scene._mnsegment_colors = colors  # type: ignore[attr-defined]
    for name in VIEWS:
        scene.AddNewNodeByClass("vtkMRMLSliceNode", f"{name} view").SetLayoutName(name)
        scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode").SetLayoutName(name)
    rng = np.random.default_rng(3)
    volumes, labels = [], {}
    for i, (name, value) in enumerate(BRIGHTNESS.items()):
        _image, label = ellipsoid_case(rng)
        volume = add_volume(scene, name, label * value, (1.0, 1.0, 1.5), (4.0 * i, -6.0, 3.0), rotation(25 * i))
        volumes.append(volume)
        labels[volume.GetID()] = label

    folder = tmp_path / "job"
    logic = MNSegmentLogic(scene)
    meta = logic.export_cases([], volumes, folder)
    plan = Plan([1.0, 1.0, 1.5], "none", None, [0, 1], {"1": "Lesion"})
    (folder / "run").mkdir()
    (folder / "run" / "plan.json").write_text(json.dumps(plan.to_json()))
    (folder / "run" / "config.json").write_text("{}")
    config = configuration.apply_overrides(configuration.preset("quick"), {"sampling.patch_size": [16, 16, 8]})
    scorer = Scorer(Threshold(200.0), Threshold(100.0), config, (config["data"]["slice_axis"],), torch.device("cpu"))
    suggest_files([folder / c["image"] for c in meta["cases"]], folder / "run" / "suggestions", plan, scorer)
    return scene, logic, folder, volumes, labels


def test_suggestions_are_matched_to_the_scene_volumes_and_sorted_by_score(job):
    scene, logic, folder, volumes, _labels = job
    ranked = logic.suggestions(folder)
    assert [s.volume_name for s in ranked][0] == "Scan B"
    assert [s.rank for s in ranked] == [1, 2, 3]
    assert {s.volume_id for s in ranked} == {v.GetID() for v in volumes}
    assert suggestions.read_suggestions(folder / "run") == ranked  # the run folder works as well

    newcomer = add_volume(scene, "Not scored", np.zeros((8, 8, 8), np.float32))
    order = suggestions.rank_volumes([newcomer, *volumes], ranked)
    assert [v.GetName() for v, _s in order] == [s.volume_name for s in ranked] + ["Not scored"]
    assert order[-1][1] is None
    assert [s.score for _v, s in order[:-1]] == sorted((s.score for s in ranked), reverse=True)
    assert "score" in order[0][1].label() and "Scan B" in order[0][1].label()
    assert suggestions.read_suggestions(folder / "data") == []  # no suggestions there: nothing to show


def test_showing_a_suggestion_overlays_its_map_and_centres_the_views_on_the_uncertain_slice(job):
    scene, logic, folder, volumes, labels = job
    top = logic.suggestions(folder)[0]
    volume, overlay = logic.show_suggestion(top)
    assert volume.GetName() == "Scan B" and volume.GetID() == top.volume_id

    assert overlay.GetAttribute(suggestions.OVERLAY_ATTRIBUTE) == str(top.map)
    assert np.allclose(_matrix(overlay), _matrix(volume), atol=1e-4)  # on the volume's own grid
    assert slicer.util.arrayFromVolume(overlay).shape == slicer.util.arrayFromVolume(volume).shape
    percent = slicer.util.arrayFromVolume(overlay)
    inside = labels[volume.GetID()] > 0
    assert percent[inside].mean() > 80 and percent[~inside].mean() < 10
    display = overlay.GetDisplayNode()
    assert display.GetColorNodeID() == suggestions.HEAT_COLOR_ID and display.GetApplyThreshold()

    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for i in range(composites.GetNumberOfItems()):
        composite = composites.GetItemAsObject(i)
        assert composite.GetBackgroundVolumeID() == volume.GetID()
        assert composite.GetForegroundVolumeID() == overlay.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(suggestions.OVERLAY_OPACITY)
    for name in VIEWS:
        slice_to_ras = scene.GetFirstNodeByName(f"{name} view").GetSliceToRAS()
        assert [slice_to_ras.GetElement(r, 3) for r in range(3)] == pytest.approx(top.point_ras, abs=1e-3)

    ras_to_ijk = vtk.vtkMatrix4x4()
    volume.GetRASToIJKMatrix(ras_to_ijk)
    i, j, k, _ = (round(v) for v in ras_to_ijk.MultiplyPoint([*top.point_ras, 1.0]))
    assert inside[k, j, i]  # the point to look at is in the structure the networks disagree on

    assert logic.show_suggestion(top)[1] is overlay  # shown again: the map is not loaded twice


def test_label_next_starts_a_segmentation_on_the_volumes_grid_in_the_segment_editor(job):
    scene, logic, folder, volumes, _labels = job
    top = logic.suggestions(folder)[0]
    volume, segmentation = logic.label_next(top, folder)
    assert segmentation.GetName() == "Scan B segmentation"
    segment = segmentation.GetSegmentation().GetNthSegment(0)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 1 and segment.GetName() == "Lesion"

    geometry = slicer.vtkOrientedImageData()  # the segmentation's reference grid: where painting happens
    converter = slicer.vtkSegmentationConverter
    serialized = segmentation.GetSegmentation().GetConversionParameter(
        converter.GetReferenceImageGeometryParameterName())
    assert converter.DeserializeImageGeometry(serialized, geometry)
    to_world = vtk.vtkMatrix4x4()
    geometry.GetImageToWorldMatrix(to_world)
    assert np.allclose([[to_world.GetElement(r, c) for c in range(4)] for r in range(4)], _matrix(volume), atol=1e-4)
    assert geometry.GetDimensions() == volume.GetImageData().GetDimensions()

    editor = scene.GetSingletonNode(suggestions.SEGMENT_EDITOR_TAG, "vtkMRMLSegmentEditorNode")
    assert editor.GetSegmentationNode() is segmentation and editor.GetSourceVolumeNode() is volume


def test_a_suggestion_whose_volume_left_the_scene_is_read_from_the_job(job):
    scene, logic, folder, volumes, labels = job
    top = logic.suggestions(folder)[0]
    original = scene.GetNodeByID(top.volume_id)
    expected = slicer.util.arrayFromVolume(original).copy()
    scene.RemoveNode(original)
    volume, _overlay = logic.show_suggestion(top)
    assert volume.GetName() == "Scan B" and np.array_equal(slicer.util.arrayFromVolume(volume), expected)


def test_a_shown_disagreement_map_is_never_offered_as_a_volume_to_train_on(job):
    scene, logic, folder, volumes, _labels = job
    _volume, overlay = logic.show_suggestion(logic.suggestions(folder)[0])
    assert overlay.IsA("vtkMRMLScalarVolumeNode")  # a plain scalar volume to MRML, so it must be filtered
    assert logic.scalar_volumes() == volumes


def test_scene_queries_keep_no_node_alive(job):
    """``GetNodesByClass`` returns a collection Python never frees, which holds every node it found; the
    module's queries must not, or a volume the user deletes stays in memory."""
    scene, logic, folder, volumes, _labels = job
    before = volumes[0].GetReferenceCount()
    for _ in range(3):
        logic.scalar_volumes()
        logic.pair_segmentations()
        logic.show_suggestion(logic.suggestions(folder)[0])
    assert volumes[0].GetReferenceCount() == before


def test_a_volume_that_cannot_be_read_leaves_nothing_in_the_scene(job, tmp_path):
    scene, _logic, _folder, _volumes, _labels = job
    count = scene.GetNumberOfNodes()
    broken = tmp_path / "broken.nrrd"
    broken.write_text("not an image")
    with pytest.raises(ValueError, match="broken.nrrd"):
        suggestions.read_volume(scene, broken, "Broken")
    assert scene.GetNumberOfNodes() == count
