"""Reading user input in-process: label maps (integer dtype kept), non-finite voxels, failing writes."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from engine_fixtures import sphere_arrays, to_image

from MNSegmentLib.datalist import Case
from MNSegmentLib.errors import InputError
from MNSegmentLib.preprocess import read_label


def _case(tmp_path, label_array: np.ndarray, dtype) -> tuple[Case, sitk.Image]:
    image, _ = sphere_arrays(np.random.default_rng(0))
    sitk.WriteImage(to_image(image), str(tmp_path / "image.nii.gz"))
    sitk.WriteImage(to_image(label_array.astype(dtype)), str(tmp_path / "label.nii.gz"))
    return Case(tmp_path / "image.nii.gz", tmp_path / "label.nii.gz"), sitk.ReadImage(str(tmp_path / "image.nii.gz"))


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.float64])
def test_label_maps_are_read_as_compact_integers(tmp_path, dtype):
    """Integer label maps keep their type; integral floats become the smallest integer type (was int64/float64:
    8 bytes per voxel)."""
    _, ball = sphere_arrays(np.random.default_rng(1))
    labels = ball * 3
    case, image = _case(tmp_path, labels, dtype)
    values = read_label(case, image)
    assert np.issubdtype(values.dtype, np.integer)
    assert values.dtype.itemsize <= np.dtype(dtype).itemsize and values.dtype.itemsize <= 2
    assert np.array_equal(values, labels)


def test_fractional_label_values_are_refused(tmp_path):
    _, ball = sphere_arrays(np.random.default_rng(1))
    case, image = _case(tmp_path, ball * 0.5, np.float32)
    with pytest.raises(InputError, match="integer values"):
        read_label(case, image)
