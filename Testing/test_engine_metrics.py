"""Dice, Jaccard, HD95 and ASD in millimetres (metrics.py), on real files where folders are involved."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from engine_fixtures import to_image

from MNSegmentLib.errors import InputError
from MNSegmentLib.evaluation.metrics import case_metrics, evaluate


def _cube(shape=(20, 20, 20), lo=(4, 4, 4), size=6, value=1):
    a = np.zeros(shape, np.uint8)
    a[lo[0]:lo[0] + size, lo[1]:lo[1] + size, lo[2]:lo[2] + size] = value
    return a


def test_identical_masks():
    mask = _cube()
    m = case_metrics(to_image(mask, (1, 1, 1)), to_image(mask, (1, 1, 1)))
    assert set(m) == {1}
    assert m[1]["dice"] == pytest.approx(1.0) and m[1]["jaccard"] == pytest.approx(1.0)
    assert m[1]["hd95_mm"] == pytest.approx(0.0) and m[1]["asd_mm"] == pytest.approx(0.0)


def test_offset_cubes_known_dice():
    # 6^3 cubes, one shifted by 2 voxels along x: overlap 4*6*6 = 144 of 216 each
    a, b = _cube(), _cube(lo=(6, 4, 4))
    m = case_metrics(to_image(a, (1, 1, 1)), to_image(b, (1, 1, 1)))[1]
    assert m["dice"] == pytest.approx(2 * 144 / (216 + 216), abs=1e-6)
    assert m["jaccard"] == pytest.approx(144 / (216 + 216 - 144), abs=1e-6)
    assert 0 < m["asd_mm"] < m["hd95_mm"] <= 2.0 + 1e-6


def _slab(z, shape=(16, 16, 12)):
    a = np.zeros(shape, np.uint8)
    a[2:14, 2:14, z] = 1
    return a


@pytest.mark.parametrize("spacing,expected", [((1.0, 1.0, 3.0), 6.0), ((3.0, 1.0, 1.0), 2.0), ((0.5, 0.7, 1.5), 3.0)])
def test_distances_honour_anisotropic_spacing(spacing, expected):
    # two one-voxel-thick slabs 2 slices apart along z: every surface point is exactly 2 * spacing_z away
    m = case_metrics(to_image(_slab(4), spacing), to_image(_slab(6), spacing))[1]
    assert m["dice"] == pytest.approx(0.0)
    assert m["hd95_mm"] == pytest.approx(expected, rel=1e-4)
    assert m["asd_mm"] == pytest.approx(expected, rel=1e-4)


def test_multiple_classes_and_empty_class():
    ref = _cube() + _cube(lo=(12, 12, 12), size=4, value=2)
    pred = _cube()  # class 2 missed
    m = case_metrics(to_image(pred, (1, 1, 1)), to_image(ref, (1, 1, 1)))
    assert m[1]["dice"] == pytest.approx(1.0)
    assert m[2]["dice"] == pytest.approx(0.0)
    assert m[2]["hd95_mm"] is None and m[2]["asd_mm"] is None


def test_different_grids_are_refused():
    with pytest.raises(InputError, match="different grids"):
        case_metrics(to_image(_cube(), (1, 1, 1)), to_image(_cube(shape=(20, 20, 21)), (1, 1, 1)), "x")


def test_evaluate_matches_folders_by_file_name(tmp_path):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    sitk.WriteImage(to_image(_cube(), (1, 1, 1)), str(pred / "alpha.nii.gz"))
    sitk.WriteImage(to_image(_cube(), (1, 1, 1)), str(ref / "alpha.nrrd"))  # another extension, same name
    sitk.WriteImage(to_image(_cube(lo=(6, 4, 4)), (1, 1, 1)), str(pred / "beta.nii.gz"))
    sitk.WriteImage(to_image(_cube(), (1, 1, 1)), str(ref / "beta.nii.gz"))
    sitk.WriteImage(to_image(_cube(), (1, 1, 1)), str(pred / "only_predicted.nii.gz"))
    (ref / "notes.txt").write_text("not an image")
    result = evaluate(pred, ref)
    assert set(result["cases"]) == {"alpha", "beta"}
    assert result["cases"]["alpha"]["1"]["dice"] == pytest.approx(1.0)
    assert result["cases"]["beta"]["1"]["dice"] == pytest.approx(2 / 3, abs=1e-6)
    assert result["mean"]["1"]["dice"] == pytest.approx((1 + 2 / 3) / 2, abs=1e-6)
    # single files work too
    single = evaluate(pred / "beta.nii.gz", ref / "beta.nii.gz")
    assert single["cases"]["beta"]["1"]["dice"] == pytest.approx(2 / 3, abs=1e-6)


def test_evaluate_folder_without_common_names(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "r").mkdir()
    sitk.WriteImage(to_image(_cube(), (1, 1, 1)), str(tmp_path / "p" / "a.nii.gz"))
    sitk.WriteImage(to_image(_cube(), (1, 1, 1)), str(tmp_path / "r" / "b.nii.gz"))
    with pytest.raises(InputError, match="no file names in common"):
        evaluate(tmp_path / "p", tmp_path / "r")
