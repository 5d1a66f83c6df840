"""Watching a training in Slicer (issue 12.2): the live chart in plot nodes and the preview segmentation, on real
MRML scenes (slicer-core); the last test drives the real engine through the module's logic."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
from slicer_test_utils import add_segmentation, add_volume, ellipsoid_case, new_scene, rotation

# isort: split
from MNSegmentSlicerLib import export
from MNSegmentSlicerLib import job as jobs
from MNSegmentSlicerLib.livechart import LOSSES, QUANTITIES, RATES, LiveChart
from MNSegmentSlicerLib.livepreview import PREVIEW_ATTRIBUTE, LivePreview
from MNSegmentSlicerLib.logic import MNSegmentLogic


def _rows(chart: LiveChart, field: str) -> list[tuple[float, float]]:
    quantity = next(q for q in QUANTITIES if q.field == field)
    table = chart.table(quantity).GetTable()
    steps, values = table.GetColumnByName("step"), table.GetColumnByName(field)
    return [(steps.GetValue(i), values.GetValue(i)) for i in range(table.GetNumberOfRows())]


def _voxels(node, volume) -> np.ndarray:
    """The segmentation as a label map on ``volume``'s grid, (k, j, i)."""
    scene = volume.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    segmentation = node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        node, ids, labelmap, volume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    array = slicer.util.arrayFromVolume(labelmap).copy()
    scene.RemoveNode(labelmap)
    return array


def _count(scene, class_name: str) -> int:
    return scene.GetNodesByClass(class_name).GetNumberOfItems()


def _progress(step: int, **fields) -> dict:
    """A progress event as the engine sends it (trainer.Trainer._report)."""
    return {"event": "progress", "step": step, "total_steps": 40, "stage": "cotrain", "unlabeled_share": 0.5,
            "lr_2d": 1e-3, "lr_3d": 2e-3, "loss_2d": None, "loss_3d": None, "eta_s": 10.0, **fields}


def test_live_chart_has_a_series_per_quantity_fed_by_progress_events():
    scene = new_scene()
    chart = LiveChart(scene)
    # no validation Dice at step 1, and the 2D network's labeled-patch Dice not yet measured
    assert chart.add(_progress(1, loss_2d=1.2, loss_3d=1.4, train_dice_2d=None, train_dice_3d=0.3)) == 8 - 2
    losses, rates = chart.chart(LOSSES), chart.chart(RATES)
    names = {losses.GetNthPlotSeriesNode(i).GetName() for i in range(losses.GetNumberOfPlotSeriesNodes())}
    assert names == {"loss 2D", "loss 3D", "unlabeled share", "validation Dice", "labeled-patch Dice 2D",
                     "labeled-patch Dice 3D"}
    assert _rows(chart, "train_dice_3d") == [(1.0, 0.3)] and _rows(chart, "train_dice_2d") == []
    assert rates.GetNumberOfPlotSeriesNodes() == 2
    series = losses.GetNthPlotSeriesNode(0)
    assert series.GetTableNode().GetID() == chart.table(QUANTITIES[0]).GetID() and series.GetXColumnName() == "step"
    nodes = {c: _count(scene, c) for c in ("vtkMRMLTableNode", "vtkMRMLPlotSeriesNode", "vtkMRMLPlotChartNode")}
    assert nodes == {"vtkMRMLTableNode": 8, "vtkMRMLPlotSeriesNode": 8, "vtkMRMLPlotChartNode": 2}

    # Stage 2 trains one network per step: each loss only on its own steps; a validation Dice now and then.
    chart.add(_progress(2, loss_2d=1.0))
    chart.add(_progress(3, loss_3d=1.1, val_dice=0.4))
    chart.add(_progress(3, loss_3d=1.1, val_dice=0.4, activity="pseudo-masks 1/2"))  # re-reported step: no new row
    chart.add(_progress(4, loss_2d=float("nan"), lr_2d=5e-4))  # not finite: no point
    assert _rows(chart, "loss_2d") == [(1, 1.2), (2, 1.0)]
    assert _rows(chart, "loss_3d") == [(1, 1.4), (3, 1.1)]
    assert _rows(chart, "val_dice") == [(3, 0.4)]
    assert _rows(chart, "lr_2d") == [(1, 1e-3), (2, 1e-3), (3, 1e-3), (4, 5e-4)]
    assert chart.add({"event": "progress", "activity": "no step"}) == 0
    # Reused across updates: no node was added, the charts are the same nodes.
    assert {c: _count(scene, c) for c in nodes} == nodes
    assert chart.chart(LOSSES) is losses

    # A new job: the same nodes, emptied.
    chart.reset()
    assert all(_rows(chart, q.field) == [] for q in QUANTITIES)
    chart.add(_progress(1, loss_3d=0.9))
    assert _rows(chart, "loss_3d") == [(1, 0.9)] and chart.chart(LOSSES) is losses
    assert {c: _count(scene, c) for c in nodes} == nodes
    # A module reloaded on the same scene finds the nodes; a node the user deleted is made again.
    again = LiveChart(scene)
    scene.RemoveNode(again.table(QUANTITIES[1]))
    again.add(_progress(2, loss_3d=0.8))
    assert again.chart(LOSSES) is losses and _rows(again, "loss_3d") == [(2, 0.8)]
    assert {c: _count(scene, c) for c in nodes} == nodes


def test_live_preview_updates_one_node_in_place(tmp_path):
    scene = new_scene()
    rng = np.random.default_rng(3)
    image, label = ellipsoid_case(rng)
    volume = add_volume(scene, "Scan", image, (1.0, 0.8, 1.5), (4.0, -2.0, 7.0), rotation(25))
    classes = [{"value": 1, "name": "Lesion", "color": [0.9, 0.6, 0.1]}]
    first, second = tmp_path / "first.nii.gz", tmp_path / "second.nii.gz"
    grid = export.snapshot_volume(volume)
    small = np.zeros_like(label)
    small[10:14, 15:20, 15:20] = 1
    for array, path in ((small, first), (label, second)):  # on the volume's own grid, as the engine writes it
        export.write_snapshot(export.Snapshot(array, grid.ijk_to_ras), path)

    preview = LivePreview(volume, classes)
    node = preview.update(first, step=100)
    assert node.GetName() == "Scan training preview" and node.GetAttribute(PREVIEW_ATTRIBUTE) == "100"
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is volume
    np.testing.assert_array_equal(_voxels(node, volume) > 0, small > 0)

    assert preview.update(second, step=200) is node  # the same node, new content
    assert node.GetSegmentation().GetNumberOfSegments() == 1
    assert node.GetSegmentation().GetNthSegment(0).GetName() == "Lesion"
    np.testing.assert_array_equal(_voxels(node, volume) > 0, label > 0)
    assert _count(scene, "vtkMRMLSegmentationNode") == 1 and node.GetAttribute(PREVIEW_ATTRIBUTE) == "200"
    # Never offered as a label, even among predictions.
    assert MNSegmentLogic(scene).pair_segmentations(include_predictions=True) == []
    # A preview node the user deleted is made again.
    scene.RemoveNode(node)
    assert preview.update(first, step=300).GetID() != node.GetID()
    assert _count(scene, "vtkMRMLSegmentationNode") == 1
    # Only a volume of the training can be previewed: refused before anything is written.
    other = add_volume(scene, "Other", image)
    labeled = [(volume, add_segmentation(scene, volume, label, {1: "Lesion"}))]
    with pytest.raises(ValueError, match="Other is not one of this training's volumes"):
        MNSegmentLogic(scene).train(labeled, [], output_dir=tmp_path / "job", preview=other)
    assert not (tmp_path / "job").exists()


def test_training_shows_its_preview_and_chart_in_the_scene(tmp_path):
    """The real engine through the logic: ``train(preview=volume)`` writes the preview at each checkpoint, on
    the exported volume's grid, and every preview event updates the same segmentation node."""
    scene = new_scene()
    rng = np.random.default_rng(7)
    volumes, labeled = [], []
    for i in range(3):
        image, label = ellipsoid_case(rng)
        volumes.append(add_volume(scene, f"Scan {i}", image, (1.0, 1.0, 1.5), (3.0 * i, -5.0, 2.0), rotation(20 * i)))
        if i < 2:
            labeled.append((volumes[-1], add_segmentation(scene, volumes[-1], label, {1: "Lesion"})))
    logic, chart, shown = MNSegmentLogic(scene), LiveChart(scene), []

    def on_event(job, event):
        if event["event"] == "preview":
            node = logic.preview.node
            written = sitk.GetArrayFromImage(sitk.ReadImage(event["path"])) > 0
            in_scene = _voxels(node, volumes[2]) > 0
            shown.append((event["step"], node.GetID(), bool(np.array_equal(in_scene, written))))

    job = logic.train(labeled, [volumes[2]], output_dir=tmp_path / "job", device="cpu", wait=True,
                      preview=volumes[2], on_event=on_event, on_progress=lambda job, event: chart.add(event),
                      **{"train.steps": 4, "train.checkpoint_every": 2, "sampling.batch_size": 2,
                         "sampling.patch_size": [32, 32, 16], "model2d.weights": "none"})
    assert job.status == jobs.DONE, job.error
    assert [step for step, _, _ in shown] == [2, 4]
    assert len({node_id for _, node_id, _ in shown}) == 1  # one node, updated in place
    assert all(same for _, _, same in shown)  # the scene shows what the engine wrote at that checkpoint
    # The preview is on the grid of the image the engine was given (the volume exported from the scene).
    written = sitk.ReadImage(str(tmp_path / "job" / "run" / "preview.nii.gz"))
    exported = sitk.ReadImage(str(tmp_path / "job" / logic._case_of(_job_meta(tmp_path / "job"), volumes[2])["image"]))
    assert written.GetSize() == exported.GetSize()
    for what in ("GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(written, what)(), getattr(exported, what)(), atol=1e-5)
    assert _rows(chart, "unlabeled_share")[-1][0] == 4  # the last step's progress event reached the chart
    # Resume shows the same volume's preview (job.json names it). (This run has finished: nothing to wait for.)
    resumed = logic.resume(tmp_path / "job")
    assert logic.preview is not None and logic.preview.volume is volumes[2]
    resumed.cancel(wait=True)


def _job_meta(folder):
    import json

    return json.loads((folder / "job.json").read_text(encoding="utf-8"))
