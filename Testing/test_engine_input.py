"""Reading user input in-process: label maps (integer dtype kept), non-finite voxels, failing writes."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from engine_fixtures import sphere_arrays, to_image

from MNSegmentLib.data.datalist import Case
from MNSegmentLib.data.preprocess import read_label
from MNSegmentLib.errors import InputError


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


# -- atomic checkpoints ---------------------------------------------------------------------------------------------
def test_a_failed_checkpoint_write_keeps_the_last_one_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import errno

    import torch

    from MNSegmentLib.training import checkpoint

    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic({"step": 1, "w": torch.ones(3)}, path)
    good = path.read_bytes()
    real_save = torch.save

    def disk_full_half_way(state, f):  # writes part of the file, then the disk is full
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full_half_way)
    with pytest.raises(InputError, match=f"{path}: could not be written \\(No space left on device"):
        checkpoint.save_atomic({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == good and checkpoint.load(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    # a temp file left by a process killed during a save is removed on resume
    (tmp_path / ".checkpoint.pt.abc123.part").write_bytes(b"half")
    checkpoint.remove_partial(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_nan_voxels_are_refused_with_counts(tmp_path):
    from MNSegmentLib.data.io import read_image

    values = np.zeros((4, 5, 6), np.float32)
    values[0, 0, 0] = np.nan
    values[1, 1, 1] = -np.inf
    sitk.WriteImage(sitk.GetImageFromArray(values), str(tmp_path / "scan.mha"))
    with pytest.raises(InputError, match="scan.mha: 1 NaN and 1 infinite voxel"):
        read_image(tmp_path / "scan.mha")
    sitk.WriteImage(sitk.GetImageFromArray(np.nan_to_num(values, neginf=0)), str(tmp_path / "fixed.mha"))
    assert read_image(tmp_path / "fixed.mha").GetSize() == (6, 5, 4)
