"""The training preview in the scene: one segmentation node showing a running training's current prediction of one
volume (the engine's ``train --preview``). Each ``preview`` event names a file on the volume's grid, written
atomically by the engine; its segments replace the node's, so the node, its display and its place in the scene
stay while the structure appears. Qt-free: runs with slicer-core.
"""

from __future__ import annotations

from pathlib import Path

from . import export

#: set on the preview node; such a node is never offered as a label (it is replaced at every checkpoint)
PREVIEW_ATTRIBUTE = "MNSegment.Preview"


class LivePreview:
    def __init__(self, volume, classes: list[dict]):
        self.volume, self.classes = volume, classes
        self.node = None
        self.step: int | None = None

    @property
    def name(self) -> str:
        return f"{self.volume.GetName()} training preview"

    def update(self, path: str | Path, step: int | None = None):
        """Shows the label map at ``path``: in the preview node, made on the first call (or again when the user
        deleted it), updated in place after. Returns the node."""
        scene = self.volume.GetScene()
        node = self.node if self.node is not None and scene.GetNodeByID(self.node.GetID()) is self.node else None
        self.node = export.load_labelmap_as_segmentation(Path(path), self.volume, self.classes, name=self.name,
                                                         into=node)
        self.node.SetAttribute(PREVIEW_ATTRIBUTE, "" if step is None else str(step))
        self.step = step
        return self.node
