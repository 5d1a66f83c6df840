"""What the user picked, as the parameter node keeps it (Qt-free, so it is tested in CI with slicer-core).

``parameterNodeWrapper`` stores a list of nodes as one node reference per element; a node removed from the
scene then reads back as ``None``. Every list the widget reads goes through here, so a deleted volume or
segmentation never reaches ``GetID()``.
"""

from __future__ import annotations


def present(nodes) -> list:
    """The nodes that still exist (not ``None``, still in a scene)."""
    return [n for n in (nodes or []) if n is not None and n.GetScene() is not None]


def node_ids(nodes) -> set[str]:
    return {n.GetID() for n in present(nodes)}


def stored_rows(volumes, segmentations) -> list[tuple]:
    """Rows of the labeled table from the parameter node's two parallel lists. Half-filled rows (a volume
    picked, its segmentation not drawn yet) are kept; rows whose nodes are all gone are dropped."""
    volumes, segmentations = list(volumes or []), list(segmentations or [])
    length = max(len(volumes), len(segmentations))
    volumes += [None] * (length - len(volumes))
    segmentations += [None] * (length - len(segmentations))
    rows = []
    for volume, segmentation in zip(volumes, segmentations):
        volume = volume if present([volume]) else None
        segmentation = segmentation if present([segmentation]) else None
        if volume is not None or segmentation is not None:
            rows.append((volume, segmentation))
    return rows


def complete_pairs(rows) -> list[tuple]:
    """The rows with both a volume and a segmentation (what training uses)."""
    return [(v, s) for v, s in rows if v is not None and s is not None]
