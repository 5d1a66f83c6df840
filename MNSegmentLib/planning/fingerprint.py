"""The dataset fingerprint: what the planner needs to know about every case, read cheaply.

Sizes, spacings and extents are given along the canonical axes that preprocessing produces (LPS, arrays in
(x, y, z) order; see preprocess.py), so the planner's numbers mean what the training arrays will hold. Images are
described from their headers alone; only label maps are read, for the extent of the labeled structure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from MNSegmentLib.data.datalist import Datalist
from MNSegmentLib.data.io import array_xyz, case_name, read_image
from MNSegmentLib.errors import InputError


@dataclass
class CaseFingerprint:
    name: str
    size: list[int]  # voxels along the canonical x, y, z axes
    spacing: list[float]  # mm along the canonical axes
    foreground_extent: list[float] | None = None  # mm, bounding box of every labeled voxel; None: unlabeled
    class_extents: dict[str, list[float]] | None = None  # label value -> mm, bounding box of that class
    foreground_share: float | None = None  # labeled voxels / all voxels

    @property
    def field_of_view(self) -> list[float]:
        return [n * s for n, s in zip(self.size, self.spacing)]


@dataclass
class Fingerprint:
    cases: list[CaseFingerprint]

    @property
    def labeled(self) -> list[CaseFingerprint]:
        return [c for c in self.cases if c.foreground_extent is not None]

    def median_spacing(self) -> list[float]:
        return [median(c.spacing[a] for c in self.cases) for a in range(3)]

    def median_field_of_view(self) -> list[float]:
        return [median(c.field_of_view[a] for c in self.cases) for a in range(3)]

    def median_foreground_extent(self) -> list[float] | None:
        labeled = self.labeled
        return [median(c.foreground_extent[a] for c in labeled) for a in range(3)] if labeled else None

    def smallest_class_extent(self) -> list[float] | None:
        """Per axis, the median extent of the class that is thinnest along it: the detail to keep resolvable."""
        per_class: dict[str, list[list[float]]] = {}
        for case in self.labeled:
            for value, extent in (case.class_extents or {}).items():
                per_class.setdefault(value, []).append(extent)
        if not per_class:
            return None
        return [min(median(e[a] for e in extents) for extents in per_class.values()) for a in range(3)]

    def to_json(self) -> dict:
        return {"cases": [asdict(c) for c in self.cases]}

    @classmethod
    def from_json(cls, data: dict) -> Fingerprint:
        return cls([CaseFingerprint(**c) for c in data["cases"]])


def lps_axes(direction: Sequence[float]) -> list[int]:
    """For each canonical axis (L, P, S), the image index axis that runs along it.

    The same rule as reorientation to LPS: each image axis goes to the physical axis its direction is closest to;
    the largest cosines are assigned first, so even a 45-degree oblique volume gets a permutation.
    """
    cosines = np.abs(np.asarray(direction, float).reshape(3, 3))  # [physical axis, image axis]
    axes = [-1, -1, -1]
    used: set[int] = set()
    for flat in np.argsort(-cosines, axis=None, kind="stable"):
        physical, image_axis = divmod(int(flat), 3)
        if axes[physical] < 0 and image_axis not in used:
            axes[physical] = image_axis
            used.add(image_axis)
    return axes


def _extent(slices: tuple[slice, ...], spacing: Sequence[float]) -> list[float]:
    return [round(float((s.stop - s.start) * d), 3) for s, d in zip(slices, spacing)]  # 0.001 mm: clean JSON


def describe_case(name: str, size: Sequence[int], spacing: Sequence[float], direction: Sequence[float],
                  label: np.ndarray | None = None) -> CaseFingerprint:
    """A case from its geometry (in the image's own index order) and, if labeled, its label values in (x, y, z)
    index order (as ``preprocess.read_label`` returns them)."""
    axes = lps_axes(direction)
    case = CaseFingerprint(name, [int(size[a]) for a in axes], [float(spacing[a]) for a in axes])
    if label is None:
        return case
    boxes = ndimage.find_objects(label.astype(np.int64, copy=False))  # one pass: box of value v at index v - 1
    classes = {str(v + 1): _extent(box, spacing) for v, box in enumerate(boxes) if box is not None}
    if classes:
        starts = np.min([[s.start for s in b] for b in boxes if b is not None], axis=0)
        stops = np.max([[s.stop for s in b] for b in boxes if b is not None], axis=0)
        overall = _extent(tuple(slice(a, b) for a, b in zip(starts, stops)), spacing)
    else:
        overall = [0.0, 0.0, 0.0]
    case.foreground_extent = [overall[a] for a in axes]
    case.class_extents = {v: [e[a] for a in axes] for v, e in classes.items()}
    case.foreground_share = float(np.count_nonzero(label)) / label.size
    return case


def _header(path: Path) -> tuple[list[int], list[float], list[float]]:
    """Size, spacing and direction of a 3D image without reading its voxels (a DICOM folder is read whole)."""
    if path.is_dir():
        image = read_image(path)
        return list(image.GetSize()), list(image.GetSpacing()), list(image.GetDirection())
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(f"{path}: cannot be read as an image; use NIfTI, NRRD, MHA or a DICOM folder") from None
    dimension = reader.GetDimension()
    if dimension not in (3, 4) or (dimension == 4 and reader.GetSize()[3] != 1):
        raise InputError(f"{path}: MNSegment needs a 3D image (this one is {dimension}D)")
    direction = np.asarray(reader.GetDirection()).reshape(dimension, dimension)[:3, :3]
    return list(reader.GetSize()[:3]), list(reader.GetSpacing()[:3]), direction.ravel().tolist()


def read_case(image: Path, label: Path | None = None, label_values: np.ndarray | None = None) -> CaseFingerprint:
    """Fingerprint of one case from its files; ``label_values`` (x, y, z) skips reading a label map again."""
    size, spacing, direction = _header(Path(image))
    if label is not None and label_values is None:
        label_values = array_xyz(read_image(label), dtype=None)
    if label_values is not None and list(label_values.shape) != size:
        raise InputError(f"{label}: size {list(label_values.shape)} differs from the image's {size}; export the "
                         "label map on the image's own grid")
    return describe_case(case_name(image), size, spacing, direction, label_values)


def fingerprint_datalist(datalist: Datalist, labels: dict[Path, np.ndarray] | None = None) -> Fingerprint:
    """Every case of the datalist: all images count for sizes and spacings (the network must fit the unlabeled
    and test volumes too), labeled and validation cases also for the structure's extent.

    ``labels`` are label arrays already read (``preprocess.make_plan`` returns them), keyed by image path.
    """
    labels = labels or {}
    return Fingerprint([read_case(c.image, c.label, labels.get(c.image))
                        for c in datalist.labeled + datalist.validation + datalist.unlabeled])
