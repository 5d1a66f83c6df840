"""Nodes of a scene by class (and name), without keeping them alive.

``vtkMRMLScene.GetNodesByClass`` / ``GetNodesByClassByName`` return a new ``vtkCollection`` that the caller must
delete (vtkMRMLScene.h); Python adds its own reference on top, so the collection, and through it every node it
holds, is never freed: a volume the user deletes would stay in memory. Slicer's ``slicer.util.getNodesByClass``
calls ``UnRegister`` for that reason, but it always searches ``slicer.mrmlScene``; this walks any scene with
``GetNthNodeByClass``, which returns borrowed references.
"""

from __future__ import annotations


def nodes_by_class(scene, class_name: str, name: str | None = None) -> list:
    """The nodes of ``scene`` that are ``class_name`` (or a subclass), in scene order; only those named ``name``
    if given."""
    nodes = (scene.GetNthNodeByClass(i, class_name) for i in range(scene.GetNumberOfNodesByClass(class_name)))
    return [n for n in nodes if name is None or n.GetName() == name]
