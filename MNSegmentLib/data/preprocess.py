"""Planning (target spacing, normalisation) and preprocessing of cases into cached arrays.

Every image is brought to one canonical orientation (LPS, the identity direction), resampled to the planned
spacing and normalised. Arrays are in (x, y, z) index order, so axis 2 is the through-plane axis of an axial
acquisition. The plan is saved in the run folder; prediction applies exactly the same steps and then resamples
the probabilities back onto the input's own grid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from MNSegmentLib.data.datalist import Case, Datalist
from MNSegmentLib.data.io import array_xyz, read_image
from MNSegmentLib.errors import InputError

ORIENTATION = "LPS"


@dataclass
class Plan:
    target_spacing: list[float]
    normalization: str  # "ct" or "mr" or "none"
    ct_window: list[float] | None
    label_values: list[int]  # original label value of each class index; index 0 is background (0)
    classes: dict[str, str]  # str(label value) -> name
    # How target spacing, patch size and slice axis were chosen (workflow.plan_settings); None: made before
    # data.planning existed
    experiment: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Plan:
        return cls(**data)


def canonical(image: sitk.Image) -> sitk.Image:
    """Reorients by axis permutation/flip only (no interpolation)."""
    return sitk.DICOMOrient(image, ORIENTATION)


def resample(image: sitk.Image, spacing: list[float], interpolator: int) -> sitk.Image:
    """Resamples onto a grid with the given spacing covering the same physical extent and direction."""
    old_spacing = np.array(image.GetSpacing())
    old_size = np.array(image.GetSize())
    new_spacing = np.array(spacing, dtype=float)
    if np.allclose(old_spacing, new_spacing, rtol=1e-3):
        return image
    new_size = np.maximum(np.round(old_size * old_spacing / new_spacing), 1).astype(int)
    # Keep the physical centre of the volume fixed.
    direction = np.array(image.GetDirection()).reshape(3, 3)
    centre = np.array(image.GetOrigin()) + direction @ ((old_size - 1) * old_spacing / 2)
    origin = centre - direction @ ((new_size - 1) * new_spacing / 2)
    return sitk.Resample(image, [int(v) for v in new_size], sitk.Transform(), interpolator, origin.tolist(),
                         new_spacing.tolist(), image.GetDirection(), 0.0, image.GetPixelID())


def _check_label(image: sitk.Image, label: sitk.Image, case: Case) -> None:
    where = f"{case.label} (label of {case.image.name})"
    if image.GetSize() != label.GetSize():
        raise InputError(f"{where}: size {label.GetSize()} differs from the image's {image.GetSize()}; "
                         "export the label map on the image's own grid")
    for what, a, b in (("spacing", image.GetSpacing(), label.GetSpacing()),
                       ("origin", image.GetOrigin(), label.GetOrigin()),
                       ("direction", image.GetDirection(), label.GetDirection())):
        scale = max(1.0, float(np.max(np.abs(a))))
        if not np.allclose(a, b, atol=1e-3 * scale):
            raise InputError(f"{where}: {what} {tuple(round(v, 4) for v in b)} differs from the image's "
                             f"{tuple(round(v, 4) for v in a)}; export the label map on the image's own grid")


def read_label(case: Case, image: sitk.Image) -> np.ndarray:
    """Reads a label map, checks it against its image, returns integer values in (x, y, z) order."""
    label = read_image(case.label)
    _check_label(image, label, case)
    values = array_xyz(label, dtype=None)
    if not np.issubdtype(values.dtype, np.integer):
        if not np.all(np.equal(np.mod(values, 1), 0)):
            raise InputError(f"{case.label}: label maps must hold integer values (found fractions); "
                             "save it as an integer label map, not a probability map")
    if values.min() < 0:
        raise InputError(f"{case.label}: negative label values; use 0 for background and 1, 2, ... for classes")
    if not np.issubdtype(values.dtype, np.integer):  # integral floats: the smallest integer type (1 byte/voxel)
        values = values.astype(np.min_scalar_type(int(values.max())))
    if not values.any():
        raise InputError(f"{case.label}: contains no labeled voxel (all 0); segment the structure or move "
                         "the image to 'unlabeled'")
    return values


def make_plan(datalist: Datalist, config: dict) -> tuple[Plan, dict[Path, sitk.Image], dict[Path, np.ndarray]]:
    """Reads and checks every labeled case and plans spacing, normalisation and label values.

    Returns the plan and the images and labels read, so preprocessing does not read them twice.
    """
    images, labels = {}, {}
    spacings, values = [], set()
    for case in datalist.labeled + datalist.validation:
        image = read_image(case.image)
        labels[case.image] = read_label(case, image)
        images[case.image] = image
        values.update(int(v) for v in np.unique(labels[case.image]) if v)
        if case in datalist.labeled:
            spacings.append(canonical(image).GetSpacing())
    if datalist.classes:
        for case in datalist.labeled + datalist.validation:
            unknown = {int(v) for v in np.unique(labels[case.image]) if v} - set(datalist.classes)
            if unknown:
                raise InputError(f"{case.label}: label value(s) {sorted(unknown)} are not in the datalist's "
                                 f"'classes' {datalist.classes}; add them there or fix the label map")
        label_values = sorted(datalist.classes)
    else:
        label_values = sorted(values)
    classes = {str(v): datalist.classes.get(v, f"class {v}") for v in label_values}

    data = config["data"]
    spacing = data["target_spacing"] or [float(v) for v in np.median(np.array(spacings), axis=0)]
    mode = data["normalization"]
    window = data["ct_window"]
    if mode in ("auto", "ct"):
        samples = [array_xyz(images[c.image]) for c in datalist.labeled]
        if mode == "auto":
            # Air is about -1000 HU: only CT in Hounsfield units has large negative values.
            mode = "ct" if min(float(np.percentile(a, 1)) for a in samples) < -500 else "mr"
        if mode == "ct" and window is None:
            fg = np.concatenate([a[labels[c.image] > 0] for a, c in zip(samples, datalist.labeled)])
            window = [float(np.percentile(fg, 0.5)), float(np.percentile(fg, 99.5))]
    plan = Plan([float(v) for v in spacing], mode, window, [0] + label_values, classes)
    return plan, images, labels


def _otsu_threshold(array: np.ndarray) -> float:
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.Execute(sitk.GetImageFromArray(array))
    return float(otsu.GetThreshold())


def normalize(array: np.ndarray, plan: Plan) -> np.ndarray:
    if plan.normalization == "ct":
        low, high = plan.ct_window
        return ((np.clip(array, low, high) - low) / max(high - low, 1e-6)).astype(np.float32)
    if plan.normalization == "mr":
        # z-score over the body (voxels above the Otsu threshold), so background air does not dominate.
        body = array > _otsu_threshold(array)
        if body.mean() < 0.05:
            body = np.ones_like(array, dtype=bool)
        mean, std = float(array[body].mean()), float(array[body].std())
        return ((array - mean) / max(std, 1e-6)).astype(np.float32)
    return array.astype(np.float32)


def preprocess_image(image: sitk.Image, plan: Plan) -> tuple[np.ndarray, sitk.Image]:
    """Canonical orientation, planned spacing, normalised intensities.

    Returns the array and an image carrying its geometry (used to map predictions back).
    """
    image = resample(canonical(sitk.Cast(image, sitk.sitkFloat32)), plan.target_spacing, sitk.sitkLinear)
    return normalize(array_xyz(image), plan), image


def preprocess_label(values: np.ndarray, like: sitk.Image, plan: Plan) -> np.ndarray:
    """Maps label values to class indices and applies the image's orientation and resampling."""
    lookup = {v: i for i, v in enumerate(plan.label_values)}
    indices = np.zeros(values.shape, np.uint8)
    for value, index in lookup.items():
        indices[values == value] = index
    label = sitk.GetImageFromArray(indices.transpose(2, 1, 0))
    label.CopyInformation(like)
    # Label-wise linear interpolation: smoother than nearest neighbour when the spacing changes a lot.
    label = resample(canonical(label), plan.target_spacing, sitk.sitkLabelLinear)
    return array_xyz(label, dtype=np.uint8)


def preprocess_datalist(datalist: Datalist, config: dict, cache_dir: Path, should_stop=lambda: False) -> Plan:
    """Plans, then writes every case to ``cache_dir`` as ``<name>_image.npy`` (+ ``_label.npy``)."""
    plan, images, labels = make_plan(datalist, config)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for case in datalist.labeled + datalist.validation + datalist.unlabeled:
        if should_stop():
            break
        image = images.pop(case.image) if case.image in images else read_image(case.image)
        array, _ = preprocess_image(image, plan)
        np.save(cache_dir / f"{case.name}_image.npy", array)
        if case.label is not None:
            np.save(cache_dir / f"{case.name}_label.npy", preprocess_label(labels.pop(case.image), image, plan))
    return plan


def load_cached(cache_dir: Path, case: Case) -> tuple[np.ndarray, np.ndarray | None]:
    """A cached case, memory-mapped read-only: pages are read on demand and shared between processes through
    the OS page cache, so a large dataset need not fit in RAM (patches are copied out; see :mod:`sampling`)."""
    image = np.load(cache_dir / f"{case.name}_image.npy", mmap_mode="r")
    label_path = cache_dir / f"{case.name}_label.npy"
    return image, (np.load(label_path, mmap_mode="r") if case.label is not None else None)
