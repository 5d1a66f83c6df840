"""Scene ⇄ files: export volumes and segmentations for the engine, load its label maps back as segmentations.

Uses MRML only (works with ``slicer-core``; no Qt). Export is split in two so that the GUI never waits on
compression and disk: :func:`snapshot_volume` / :func:`snapshot_labelmap` read the scene (main thread only:
MRML is not thread-safe) into plain arrays, :func:`write_snapshot` writes one with SimpleITK, which releases
the GIL while it compresses and writes, on any thread. Label values are assigned **by segment name**, in
first-seen order: the labeled cases are scanned in the order given, each segmentation's segments in their
order in the segmentation; the first new name gets value 1, the next 2, and so on. Names are matched ignoring
case and surrounding blanks, so "Liver" in one case and "liver " in another are the same class.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import slicer

# Colours for classes that have none (e.g. a model trained outside Slicer).
_PALETTE = [
    (0.90, 0.35, 0.30), (0.30, 0.70, 0.35), (0.25, 0.45, 0.85), (0.95, 0.75, 0.20), (0.65, 0.35, 0.80),
    (0.20, 0.75, 0.80), (0.90, 0.50, 0.70), (0.55, 0.45, 0.30), (0.60, 0.80, 0.30), (0.40, 0.40, 0.60),
]


def class_key(name: str) -> str:
    return " ".join(str(name).split()).casefold()


def default_color(value: int) -> list[float]:
    return list(_PALETTE[(int(value) - 1) % len(_PALETTE)])


def safe_stem(name: str, index: int) -> str:
    """File stem for a node: unique (numbered), no dots (the engine strips the extension), no path
    separators. Letters outside ASCII are kept: paths are handled as Unicode everywhere."""
    cleaned = re.sub(r"[^\w\-]+", "_", str(name), flags=re.UNICODE).strip("_")[:60] or "volume"
    return f"case{index:03d}_{cleaned}"


# --------------------------------------------------------------------------------------------------
# Segments and classes
# --------------------------------------------------------------------------------------------------
def segments_of(segmentation_node) -> list[tuple[str, str, list[float]]]:
    """(segment id, name, colour) of every segment, in order."""
    segmentation = segmentation_node.GetSegmentation()
    result = []
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        result.append((segmentation.GetNthSegmentID(i), segment.GetName(), list(segment.GetColor())))
    return result


def build_classes(segmentation_nodes) -> list[dict]:
    """Classes over all labeled segmentations: ``[{"value", "name", "color"}]`` in first-seen order."""
    classes: dict[str, dict] = {}
    for node in segmentation_nodes:
        for _sid, name, color in segments_of(node):
            key = class_key(name)
            if key and key not in classes:
                classes[key] = {"value": len(classes) + 1, "name": " ".join(str(name).split()), "color": color}
    return list(classes.values())


def classes_from_mapping(mapping: dict, colors: dict | None = None) -> list[dict]:
    """``{"1": "name"}`` (datalist / plan.json style) → class list, colours from ``colors`` by name."""
    colors = colors or {}
    result = []
    for value, name in sorted(((int(v), n) for v, n in mapping.items()), key=lambda item: item[0]):
        if value <= 0:
            continue
        color = colors.get(class_key(name)) or default_color(value)
        result.append({"value": value, "name": str(name), "color": list(color)})
    return result


def _color_table(scene, classes: list[dict], names: dict[int, str] | None = None):
    """Temporary colour table with the classes at their label values."""
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "MNSegment temporary colours")
    table.SetTypeToUser()
    table.SetHideFromEditors(True)
    top = max([c["value"] for c in classes], default=0)
    table.SetNumberOfColors(top + 1)
    table.SetColor(0, "Background", 0.0, 0.0, 0.0, 0.0)
    for value in range(1, top + 1):
        table.SetColor(value, "", 0.0, 0.0, 0.0, 0.0)
        table.SetColorDefined(value, False)
    for c in classes:
        name = (names or {}).get(c["value"], c["name"])
        r, g, b = c["color"][:3]
        table.SetColor(c["value"], name, r, g, b, 1.0)
        table.SetColorDefined(c["value"], True)
    return table


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------
#: Subclasses of vtkMRMLScalarVolumeNode that are not one scalar per voxel (or are labels): never offered.
NOT_SCALAR_3D = ("vtkMRMLLabelMapVolumeNode", "vtkMRMLVectorVolumeNode", "vtkMRMLDiffusionImageVolumeNode",
                 "vtkMRMLDiffusionWeightedVolumeNode", "vtkMRMLDiffusionTensorVolumeNode")


def is_scalar_3d_volume(node) -> bool:
    """A plain scalar volume (one component per voxel): what the engine can train on."""
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode") or any(node.IsA(c) for c in NOT_SCALAR_3D):
        return False
    image = node.GetImageData()
    return image is None or image.GetNumberOfScalarComponents() == 1


def check_volume(volume) -> None:
    if not is_scalar_3d_volume(volume):
        name = volume.GetName() if volume is not None else "A volume"
        raise ValueError(f"{name} is not a scalar volume (vector, diffusion and label map volumes cannot be used)")
    if volume.GetImageData() is None:
        raise ValueError(f"Volume {volume.GetName()} has no image data")
    if volume.GetParentTransformNode() is not None:
        raise ValueError(
            f"Volume {volume.GetName()} is under a transform: harden the transform first "
            "(Data module: right-click the transform column, Harden transform)."
        )


@dataclass
class Snapshot:
    """Voxels and geometry of a volume, copied out of the scene."""

    array: np.ndarray  #: (k, j, i), as ``slicer.util.arrayFromVolume``
    ijk_to_ras: np.ndarray  #: 4×4


def _ijk_to_ras(volume) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix).copy()


def snapshot_volume(volume) -> Snapshot:
    """Main thread: a copy of a scalar volume's voxels and geometry."""
    check_volume(volume)
    return Snapshot(np.array(slicer.util.arrayFromVolume(volume), copy=True), _ijk_to_ras(volume))


def write_snapshot(snapshot: Snapshot, path: Path) -> Path:
    """Any thread: write a snapshot as a compressed NRRD (LPS, like Slicer's own NRRD writer)."""
    import SimpleITK as sitk

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = snapshot.ijk_to_ras[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    image = sitk.GetImageFromArray(snapshot.array)
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection([float(v) for v in (ras_to_lps @ (columns / spacing)).ravel()])
    image.SetOrigin([float(v) for v in ras_to_lps @ snapshot.ijk_to_ras[:3, 3]])
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def export_volume(volume, path: Path) -> Path:
    """Write a scalar volume (NRRD, its own grid)."""
    return write_snapshot(snapshot_volume(volume), path)


def export_labelmap(segmentation_node, volume, classes: list[dict], path: Path) -> dict:
    """Write ``segmentation_node`` as a label map on ``volume``'s grid with the classes' values.

    Returns ``{name: voxel count}`` of the segments exported (names as in this segmentation)."""
    snapshot, counts = snapshot_labelmap(segmentation_node, volume, classes)
    write_snapshot(snapshot, path)
    return counts


def snapshot_labelmap(segmentation_node, volume, classes: list[dict]) -> tuple[Snapshot, dict]:
    """Main thread: ``segmentation_node`` as a label map on ``volume``'s grid with the classes' values, and
    ``{name: voxel count}`` of the segments exported (names as in this segmentation)."""
    scene = volume.GetScene()
    by_key = {class_key(c["name"]): c for c in classes}
    segment_ids, names = [], {}
    for sid, name, _color in segments_of(segmentation_node):
        c = by_key.get(class_key(name))
        if c is None:
            continue
        segment_ids.append(sid)
        names[c["value"]] = name  # this segmentation's own spelling, for the name lookup in the colour table
    if not segment_ids:
        raise ValueError(f"Segmentation {segmentation_node.GetName()} has no segments")
    segmentation_node.CreateBinaryLabelmapRepresentation()
    table = _color_table(scene, classes, names)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "MNSegment temporary labelmap")
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, segment_ids, labelmap, volume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, table
        )
        if not ok:
            raise ValueError(f"Could not export {segmentation_node.GetName()} on the grid of {volume.GetName()}")
        array = np.array(slicer.util.arrayFromVolume(labelmap), copy=True)
        counts = {names[v]: int((array == v).sum()) for v in names}
        if not np.any(array):
            raise ValueError(
                f"Segmentation {segmentation_node.GetName()} is empty on the grid of {volume.GetName()} "
                "(does it belong to this volume?)"
            )
        snapshot = Snapshot(array, _ijk_to_ras(volume))
    finally:
        scene.RemoveNode(labelmap)
        scene.RemoveNode(table)
    return snapshot, counts


# --------------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------------
def _same_grid(a, b, tol: float = 1e-3) -> bool:
    import numpy as np
    import vtk

    if a.GetImageData().GetDimensions() != b.GetImageData().GetDimensions():
        return False
    ma, mb = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    a.GetIJKToRASMatrix(ma)
    b.GetIJKToRASMatrix(mb)
    return bool(
        np.allclose(slicer.util.arrayFromVTKMatrix(ma), slicer.util.arrayFromVTKMatrix(mb), atol=tol, rtol=tol)
    )


def place_in_hierarchy(node, like) -> None:
    """Put ``node`` under the subject-hierarchy parent of ``like`` (e.g. the patient/study of a volume)."""
    scene = node.GetScene()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        return
    like_item = sh.GetItemByDataNode(like)
    parent = sh.GetItemParent(like_item) if like_item else sh.GetSceneItemID()
    item = sh.GetItemByDataNode(node)
    if not item:
        sh.CreateItem(parent, node)
    else:
        sh.SetItemParent(item, parent)


def load_labelmap_as_segmentation(path: Path, volume, classes: list[dict], name: str | None = None, into=None):
    """Load an engine label map (on ``volume``'s grid) as a new segmentation node referencing ``volume``, or
    ``into`` an existing one, whose segments it replaces (the training preview: one node, updated in place)."""
    scene = volume.GetScene()
    path = Path(path)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "MNSegment temporary prediction")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    table = None
    try:
        storage.SetFileName(str(path))
        if not storage.ReadData(labelmap):
            raise OSError(f"Could not read the prediction {path}")
        if not _same_grid(labelmap, volume):
            raise ValueError(f"The prediction {path.name} is not on the grid of {volume.GetName()}")
        import numpy as np

        present = {int(v) for v in np.unique(slicer.util.arrayFromVolume(labelmap))} - {0}
        known = {c["value"] for c in classes}
        extra = [{"value": v, "name": f"Label {v}", "color": default_color(v)} for v in sorted(present - known)]
        table = _color_table(scene, classes + extra)
        display = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeDisplayNode")
        display.SetAndObserveColorNodeID(table.GetID())
        labelmap.SetAndObserveDisplayNodeID(display.GetID())
        if into is None:
            segmentation = scene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", name or f"{volume.GetName()} segmentation"
            )
            segmentation.CreateDefaultDisplayNodes()
        else:
            segmentation = into
            segmentation.GetSegmentation().RemoveAllSegments()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation):
            if into is None:
                scene.RemoveNode(segmentation)
            raise ValueError(f"Could not import {path.name} as a segmentation")
        # Classes the model never predicted for this volume still get an (empty) segment, so every case has the
        # same segment list, in class order.
        segmentation_data = segmentation.GetSegmentation()
        existing = {class_key(n) for _sid, n, _c in segments_of(segmentation)}
        for c in sorted(classes, key=lambda c: c["value"]):
            if class_key(c["name"]) not in existing:
                segmentation_data.AddEmptySegment("", c["name"], c["color"][:3])
        order = {class_key(c["name"]): c["value"] for c in classes + extra}
        by_value = sorted(segments_of(segmentation), key=lambda s: order.get(class_key(s[1]), len(order) + 1))
        for index, (segment_id, _name, _color) in enumerate(by_value):
            segmentation_data.SetSegmentIndex(segment_id, index)
        place_in_hierarchy(segmentation, volume)
        return segmentation
    finally:
        display = labelmap.GetDisplayNode()
        scene.RemoveNode(labelmap)
        scene.RemoveNode(storage)
        if display is not None:
            scene.RemoveNode(display)
        if table is not None:
            scene.RemoveNode(table)
