"""What to label next, in the scene (Qt-free, tested in CI with slicer-core; usable from Slicer's Python console).

The engine ranks the unlabeled volumes after training (``run/suggestions/suggestions.json``, see
``MNSegmentLib/inference/suggestions.py``). Here that ranking is matched to the scene's volumes, a suggestion is shown
(its volume in the background, its disagreement map as a foreground overlay, every slice view centred on the
most uncertain slice) and a new segmentation is started for it, set up in the Segment Editor's parameter node.

Example, in Slicer's Python console::

    from MNSegmentSlicerLib import suggestions
    ranked = suggestions.read_suggestions("~/MNSegment/jobs/job-20261128-141500")
    volume, overlay = suggestions.show(ranked[0], slicer.mrmlScene)
    segmentation = suggestions.start_segmentation(volume, classes=[{"value": 1, "name": "Liver", "color": [1, 0, 0]}])
    slicer.util.selectModule("SegmentEditor")
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import slicer

from .scenenodes import nodes_by_class

SUGGESTIONS_FILE = "suggestions.json"
SUGGESTIONS_DIR = "suggestions"
JOB_FILE = "job.json"
OVERLAY_ATTRIBUTE = "MNSegment.Disagreement"
HEAT_COLOR_ID = "vtkMRMLPETProceduralColorNodePET-Heat"  # one of Slicer's default colour nodes
MIN_SHOWN_PERCENT = 10  # map voxels below this disagreement stay transparent in the overlay
OVERLAY_OPACITY = 0.5
SEGMENT_EDITOR_TAG = "SegmentEditor"  # the Segment Editor module's singleton parameter node


@dataclass
class Suggestion:
    """One ranked volume of ``suggestions.json``; ``volume_id``/``volume_name``: the scene volume it was exported
    from (a job made by this module), else the engine's case name."""

    rank: int
    name: str
    score: float
    disagreement: float
    uncertainty: float
    image: Path
    map: Path
    slice: dict
    volume_id: str | None
    volume_name: str

    @property
    def point_ras(self) -> list[float]:
        return list(self.slice["point_ras"])

    def label(self) -> str:
        """How the unlabeled list shows it."""
        return f"{self.volume_name}  —  score {self.score:.2f} (#{self.rank})"


def suggestions_file(folder) -> Path | None:
    """``suggestions.json`` of a job folder, a run folder, a suggestions folder, or the file itself."""
    path = Path(folder).expanduser()
    if path.is_file():
        return path
    candidates = [path / SUGGESTIONS_FILE, path / SUGGESTIONS_DIR / SUGGESTIONS_FILE]
    if (path / JOB_FILE).is_file():
        run_dir = json.loads((path / JOB_FILE).read_text(encoding="utf-8")).get("run_dir", "run")
        candidates.append(path / run_dir / SUGGESTIONS_DIR / SUGGESTIONS_FILE)
    return next((c for c in candidates if c.is_file()), None)


def read_suggestions(folder) -> list[Suggestion]:
    """The ranked suggestions of a job or run folder (best first); empty when it has none."""
    path = suggestions_file(folder)
    if path is None:
        return []
    record = json.loads(path.read_text(encoding="utf-8"))
    cases = _job_cases(path)
    out = []
    for v in record["volumes"]:
        case = cases.get(v["name"], {})
        out.append(Suggestion(int(v["rank"]), v["name"], float(v["score"]), float(v["disagreement"]),
                              float(v["uncertainty"]), Path(v["image"]), path.parent / v["map"], dict(v["slice"]),
                              case.get("volume_id"), case.get("volume_name", v["name"])))
    return sorted(out, key=lambda s: s.rank)


def _job_cases(path: Path) -> dict[str, dict]:
    """Cases of the job that wrote ``path`` (job/run/suggestions/suggestions.json), by the engine's case name."""
    job = path.parent.parent.parent / JOB_FILE
    if not job.is_file():
        return {}
    return {c["stem"]: c for c in json.loads(job.read_text(encoding="utf-8")).get("cases", [])}


def find_volume(scene, suggestion: Suggestion):
    """The scene's scalar volume of ``suggestion`` (same node, else same name), or None."""
    node = scene.GetNodeByID(suggestion.volume_id) if suggestion.volume_id else None
    if node is not None and node.IsA("vtkMRMLScalarVolumeNode") and node.GetName() == suggestion.volume_name:
        return node
    return next((n for n in nodes_by_class(scene, "vtkMRMLScalarVolumeNode", suggestion.volume_name)
                 if not n.IsA("vtkMRMLLabelMapVolumeNode")), None)


def rank_volumes(volumes, suggestions: list[Suggestion]) -> list[tuple]:
    """``(volume, suggestion or None)`` for each volume, the scored ones first, highest score first; the others
    keep their order after them."""
    scene = next((v.GetScene() for v in volumes if v is not None and v.GetScene() is not None), None)
    found = {}
    for suggestion in suggestions:
        node = find_volume(scene, suggestion) if scene is not None else None
        if node is not None and node.GetID() not in found:
            found[node.GetID()] = suggestion
    scored = sorted((v for v in volumes if v.GetID() in found), key=lambda v: -found[v.GetID()].score)
    return [(v, found[v.GetID()]) for v in scored] + [(v, None) for v in volumes if v.GetID() not in found]


def read_volume(scene, path: Path, name: str):
    """A scalar volume node read from ``path`` with a storage node (what Slicer's volume reader does); on failure
    a ValueError naming the file, and nothing left in the scene."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        scene.RemoveNode(storage)
        scene.RemoveNode(node)
        raise ValueError(f"Could not read {path}")
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def load_overlay(scene, suggestion: Suggestion):
    """The disagreement map (percent) as a scalar volume, shown with a heat colour map from 10 % up; loaded once
    per map file."""
    for node in nodes_by_class(scene, "vtkMRMLScalarVolumeNode"):
        if node.GetAttribute(OVERLAY_ATTRIBUTE) == str(suggestion.map):
            return node
    if not suggestion.map.is_file():
        raise ValueError(f"The disagreement map of {suggestion.volume_name} is missing ({suggestion.map}).")
    node = read_volume(scene, suggestion.map, f"{suggestion.volume_name} disagreement")
    node.SetAttribute(OVERLAY_ATTRIBUTE, str(suggestion.map))
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0, 100)
    display.SetThreshold(MIN_SHOWN_PERCENT, 100)
    display.ApplyThresholdOn()
    if scene.GetNodeByID(HEAT_COLOR_ID) is not None:
        display.SetAndObserveColorNodeID(HEAT_COLOR_ID)
    return node


def show(suggestion: Suggestion, scene):
    """Shows ``suggestion``: its volume in the background of every slice view (read from its file if the scene
    lacks it), the disagreement map in the foreground, and every view centred on the most uncertain slice.

    Sets the slice composite nodes as ``slicer.util.setSliceViewerLayers`` does, but on ``scene`` (that helper
    always uses ``slicer.mrmlScene``); jumps as the Markups logic's ``JumpSlicesToLocation`` does
    (``vtkMRMLSliceNode.JumpAllSlices``, centred). Returns (volume, overlay)."""
    volume = find_volume(scene, suggestion)
    if volume is None:
        volume = read_volume(scene, suggestion.image, suggestion.volume_name)
        volume.CreateDefaultDisplayNodes()
    overlay = load_overlay(scene, suggestion)
    for composite in nodes_by_class(scene, "vtkMRMLSliceCompositeNode"):
        composite.SetBackgroundVolumeID(volume.GetID())
        composite.SetForegroundVolumeID(overlay.GetID())
        composite.SetForegroundOpacity(OVERLAY_OPACITY)
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, *suggestion.point_ras, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
    return volume, overlay


def start_segmentation(volume, classes: list[dict], name: str | None = None):
    """A new segmentation of ``volume`` (its geometry), with one empty segment per class ({"name", "color"}),
    made the Segment Editor's segmentation with ``volume`` as its source volume: selecting the Segment Editor
    module then opens it ready to paint (its widget reads that parameter node when entered)."""
    scene = volume.GetScene()
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or f"{volume.GetName()} segmentation")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for c in classes:
        segmentation.GetSegmentation().AddEmptySegment("", c["name"], list(c["color"])[:3])
    editor = scene.GetSingletonNode(SEGMENT_EDITOR_TAG, "vtkMRMLSegmentEditorNode")
    if editor is None:
        editor = slicer.vtkMRMLSegmentEditorNode()
        editor.SetSingletonTag(SEGMENT_EDITOR_TAG)
        editor = scene.AddNode(editor)
    editor.SetAndObserveSegmentationNode(segmentation)
    editor.SetAndObserveSourceVolumeNode(volume)
    return segmentation
