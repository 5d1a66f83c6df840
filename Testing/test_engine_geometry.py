"""Prediction geometry: the written label map is on the input's exact grid and the structure lands in the right
physical place, for anisotropic, rotated, permuted and flipped inputs, NRRD/MHA files and a DICOM series.

Uses the session's tiny trained run (bright balls; engine_fixtures.trained_run) and one `mnsegment predict`
subprocess for all inputs, then `mnsegment evaluate` on the results.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from engine_fixtures import parse_events, run_cli, to_image, trained_run

from MNSegmentLib.evaluation.metrics import evaluate

BASE_SPACING = (0.9, 1.2, 2.4)  # not the training spacing (1, 1, 2): predictions are resampled back
BASE_SHAPE = (36, 30, 18)
BASE_ORIGIN = (-20.0, 13.0, 40.0)
# the ball: off-centre along every axis so that a wrong flip or permutation moves it by several mm
BALL_OFFSET = np.array([-5.0, 4.0, 6.0])  # mm from the volume's centre
BALL_RADIUS = 6.5


def _rotation_z(degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])


def _base() -> tuple[sitk.Image, sitk.Image, np.ndarray]:
    """Image, truth and the ball centre (physical, mm) on an identity-direction anisotropic grid."""
    spacing = np.array(BASE_SPACING)
    centre_of_volume = np.array(BASE_ORIGIN) + (np.array(BASE_SHAPE) - 1) * spacing / 2
    ball = centre_of_volume + BALL_OFFSET
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in BASE_SHAPE], indexing="ij"), -1) * spacing + BASE_ORIGIN
    inside = np.linalg.norm(grid - ball, axis=-1) <= BALL_RADIUS
    rng = np.random.default_rng(42)
    image = (100.0 + 250.0 * inside + rng.normal(0, 15, BASE_SHAPE)).astype(np.float32)
    return (to_image(image, spacing, BASE_ORIGIN), to_image(inside.astype(np.uint8), spacing, BASE_ORIGIN), ball)


def _regrid(image: sitk.Image, size, spacing, direction: np.ndarray, interpolator, default: float) -> sitk.Image:
    """Physically resamples ``image`` onto a grid with ``direction`` centred on the same point."""
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()]))
    origin = centre - direction @ ((np.array(size) - 1) * np.array(spacing) / 2)
    return sitk.Resample(image, [int(s) for s in size], sitk.Transform(), interpolator, origin.tolist(),
                         [float(v) for v in spacing], direction.ravel().tolist(), default, image.GetPixelID())


def _variants(base: sitk.Image, truth: sitk.Image) -> dict[str, tuple[sitk.Image, sitk.Image]]:
    out = {"aniso": (base, truth)}
    grids = {
        "rot30": ((44, 44, 18), BASE_SPACING, _rotation_z(30)),
        # axes permuted: index i runs along physical y, j along x, k along -z
        "perm": ((25, 30, 18), (1.2, 1.1, 2.4), np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1]], float)),
        "flip": (BASE_SHAPE, BASE_SPACING, np.diag([-1.0, 1.0, -1.0])),
        # oblique about x as well (a tilted acquisition), for the MHA file
        "oblique": ((40, 36, 22), (1.0, 1.0, 2.0), _rotation_z(-20) @ np.array(
            [[1, 0, 0], [0, math.cos(0.3), -math.sin(0.3)], [0, math.sin(0.3), math.cos(0.3)]])),
    }
    for name, (size, spacing, direction) in grids.items():
        out[name] = (_regrid(base, size, spacing, direction, sitk.sitkLinear, 100.0),
                     _regrid(truth, size, spacing, direction, sitk.sitkNearestNeighbor, 0))
    return out


def _write_dicom_series(image: sitk.Image, folder) -> None:
    """One file per slice with the geometry tags that GDCM reads back (position, orientation, spacing)."""
    folder.mkdir(parents=True)
    image = sitk.Cast(sitk.RescaleIntensity(image, 0, 2000), sitk.sitkInt16)
    direction = image.GetDirection()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.4242"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_k = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "MR", "0008|0016": "1.2.840.10008.5.1.4.1.1.4",
            "0008|0018": f"{series_uid}.{k + 1}", "0020|000d": "1.2.826.0.1.3680043.2.1125.1.4241",
            "0020|000e": series_uid, "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (direction[0], direction[3], direction[6],
                                                        direction[1], direction[4], direction[7])),
            "0028|0030": f"{image.GetSpacing()[1]:.6f}\\{image.GetSpacing()[0]:.6f}",
            "0018|0050": f"{image.GetSpacing()[2]:.6f}", "0018|0088": f"{image.GetSpacing()[2]:.6f}",
        }
        for tag, value in tags.items():
            slice_k.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_k)


def _centroid_mm(label: sitk.Image) -> np.ndarray:
    indices = np.argwhere(sitk.GetArrayFromImage(label) > 0)[:, ::-1]  # (x, y, z) indices
    assert len(indices), "empty segmentation"
    return np.array(label.TransformContinuousIndexToPhysicalPoint(indices.mean(0).tolist()))


@pytest.fixture(scope="module")
def predictions(tmp_path_factory):
    run = trained_run(tmp_path_factory)
    root = tmp_path_factory.mktemp("geometry")
    (root / "in").mkdir()
    (root / "truth").mkdir()
    base, truth, ball = _base()
    inputs, truths = {}, {}
    files = {"aniso": "aniso.nii.gz", "rot30": "rot30.nii.gz", "perm": "perm.nii.gz", "flip": "flip.nrrd",
             "oblique": "oblique.mha"}
    for name, (image, label) in _variants(base, truth).items():
        path = root / "in" / files[name]
        sitk.WriteImage(image, str(path))
        sitk.WriteImage(label, str(root / "truth" / f"{name}.nii.gz"))
        inputs[name], truths[name] = path, label
    dicom = root / "in" / "dicom_rot30"
    _write_dicom_series(_variants(base, truth)["rot30"][0], dicom)
    inputs["dicom_rot30"] = dicom
    truths["dicom_rot30"] = truths["rot30"]
    result = run_cli("predict", *[str(p) for p in inputs.values()], "--model", str(run.run_dir), "--output",
                     str(root / "pred"), "--device", "cpu", "--events", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, inputs, truths, ball, result


def _read_input(path) -> sitk.Image:
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        return reader.Execute()
    return sitk.ReadImage(str(path))


def test_predict_exits_0_with_one_event_per_image(predictions):
    root, inputs, _, _, result = predictions
    events = parse_events(result.stdout)
    written = [e for e in events if e["event"] == "prediction"]
    assert [e["index"] for e in written] == list(range(len(inputs)))
    assert all(e["total"] == len(inputs) for e in written)
    assert events[-1]["event"] == "done"
    expected = sorted(str(root / "pred" / f"{name}.nii.gz") for name in inputs)
    assert sorted(events[-1]["outputs"]) == expected
    assert sorted(p.name for p in (root / "pred").iterdir()) == sorted(f"{n}.nii.gz" for n in inputs)


@pytest.mark.parametrize("name", ["aniso", "rot30", "perm", "flip", "oblique", "dicom_rot30"])
def test_label_map_has_the_input_geometry_and_the_ball_in_place(predictions, name):
    root, inputs, truths, ball, _ = predictions
    source = _read_input(inputs[name])
    label = sitk.ReadImage(str(root / "pred" / f"{name}.nii.gz"))
    assert label.GetSize() == source.GetSize()
    if inputs[name].name.endswith(".nii.gz"):  # same format: bit-exact
        assert label.GetSpacing() == source.GetSpacing()
        assert label.GetOrigin() == source.GetOrigin()
        assert label.GetDirection() == source.GetDirection()
    else:  # label maps are written as NIfTI, whose header stores geometry in float32
        np.testing.assert_allclose(label.GetSpacing(), source.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(label.GetOrigin(), source.GetOrigin(), rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(label.GetDirection(), source.GetDirection(), atol=1e-6)
    assert label.GetNumberOfComponentsPerPixel() == 1
    assert set(np.unique(sitk.GetArrayFromImage(label))) <= {0, 1}
    # the ball is where it physically is: predicted centroid within 2 mm of the true centre
    assert np.linalg.norm(_centroid_mm(label) - ball) < 2.0, (_centroid_mm(label), ball)
    # and the voxels agree with the correspondingly transformed truth
    truth = truths[name]
    pred, ref = sitk.GetArrayFromImage(label) > 0, sitk.GetArrayFromImage(truth) > 0
    dice = 2 * (pred & ref).sum() / (pred.sum() + ref.sum())
    assert dice > 0.5, dice


def test_evaluate_cli_on_the_predictions(predictions):
    root, inputs, _, _, _ = predictions
    result = run_cli("evaluate", "--prediction", str(root / "pred"), "--reference", str(root / "truth"), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    names = {"aniso", "rot30", "perm", "flip", "oblique"}  # dicom_rot30 has no file of that name in truth/
    assert set(report["cases"]) == names
    assert report == json.loads(json.dumps(evaluate(root / "pred", root / "truth")))
    for name in names:
        assert report["cases"][name]["1"]["dice"] > 0.5
        assert report["cases"][name]["1"]["hd95_mm"] is not None
