"""Helpers shared by the Slicer-module tests (test_slicer_*.py): import path and tiny MRML scenes."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "MNSegment"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

import slicer  # noqa: E402  (slicer-core)
import vtk  # noqa: E402


def new_scene():
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    # Keep the logic alive as long as the scene.
    scene._mnsegment_test_logic = logic  # type: ignore[attr-defined]
    return scene


def rotation(angle_deg: float) -> list[list[float]]:
    a = math.radians(angle_deg)
    return [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]]


def add_volume(scene, name: str, array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
               directions=None):
    """Scalar volume from a (k, j, i) array."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    node.SetIJKToRASDirections(directions or [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    node.CreateDefaultDisplayNodes()
    return node


def add_segmentation(scene, volume, label: np.ndarray, names: dict[int, str], colors=None, name=None):
    """Segmentation node (reference geometry = volume) with one segment per label value, named by ``names``."""
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "tmp")
    slicer.util.updateVolumeFromArray(labelmap, np.ascontiguousarray(label.astype(np.int16)))
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    labelmap.SetIJKToRASMatrix(matrix)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or f"{volume.GetName()} labels")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for value, segment_name in names.items():
        single = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "tmp1")
        slicer.util.updateVolumeFromArray(single, np.ascontiguousarray((label == value).astype(np.uint8)))
        single.SetIJKToRASMatrix(matrix)
        before = seg.GetSegmentation().GetNumberOfSegments()
        assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(single, seg)
        segment = seg.GetSegmentation().GetNthSegment(before)
        segment.SetName(segment_name)
        if colors and value in colors:
            segment.SetColor(*colors[value])
        scene.RemoveNode(single)
    scene.RemoveNode(labelmap)
    return seg


def ellipsoid_case(rng, shape=(32, 40, 40), center=None, radii=None, noise=0.15):
    """(image, label) arrays (k, j, i): a bright ellipsoid on a darker background, plus noise."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    center = center if center is not None else [n / 2 + rng.uniform(-3, 3) for n in shape]
    radii = radii if radii is not None else [rng.uniform(6, 9), rng.uniform(8, 12), rng.uniform(8, 12)]
    inside = ((k - center[0]) / radii[0]) ** 2 + ((j - center[1]) / radii[1]) ** 2 + (
        (i - center[2]) / radii[2]) ** 2 <= 1.0
    image = 0.2 + 0.6 * inside + rng.normal(0, noise, shape)
    return (100 * image).astype(np.float32), inside.astype(np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)
