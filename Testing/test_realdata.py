"""Tests of MNSegmentLib.data.realdata: few-label tasks made from the MNI152 template bundled with nilearn."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from MNSegmentLib.data import realdata

needs_nilearn = pytest.mark.skipif(
    not realdata.nilearn_available(), reason="nilearn (demo extra) not installed"
)

RES = 3.0  # the fast resolution
COUNTS = {"n_labeled": 2, "n_unlabeled": 1, "n_test": 2}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Generation must work offline: any connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("realdata tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return realdata.make_t1_task(tmp_path_factory.mktemp("rd") / "task", resolution_mm=RES, seed=0, **COUNTS)


def _read(path: Path) -> tuple[sitk.Image, np.ndarray]:
    img = sitk.ReadImage(str(path))
    return img, sitk.GetArrayFromImage(img)


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing())
        and np.allclose(a.GetOrigin(), b.GetOrigin())
        and np.allclose(a.GetDirection(), b.GetDirection())
    )


def _template_on(img: sitk.Image) -> np.ndarray:
    """The undeformed template T1 resampled onto a subject's grid."""
    t1 = realdata._load_template()["t1"]
    return sitk.GetArrayFromImage(sitk.Resample(t1, img, sitk.Transform(), sitk.sitkLinear, 0.0))


@needs_nilearn
def test_layout_and_contents(task: Path):
    root = task.parent
    assert task.name == "datalist.json"
    datalist = json.loads(task.read_text())
    test = json.loads((root / "test.json").read_text())["test"]
    assert datalist["classes"] == {"1": "brain"}
    assert len(datalist["labeled"]) == 2 and len(test) == 2
    # transductive: the test images are in the unlabeled pool, after the genuinely unlabeled subject
    unl = [u["image"] for u in datalist["unlabeled"]]
    assert len(unl) == 3 and all(t["image"] in unl for t in test)
    assert all(set(u) == {"image"} for u in datalist["unlabeled"])
    assert (root / "README.txt").read_text().count("seed = 0") == 1
    assert json.loads((root / "task.json").read_text())["params"]["resolution_mm"] == RES
    assert not list(root.parent.glob(".task.tmp-*")), "temporary folder left behind"

    images = []
    for case in datalist["labeled"] + test:
        img, x = _read(root / case["image"])
        lab, y = _read(root / case["label"])
        assert _same_grid(img, lab)
        assert np.allclose(img.GetSpacing(), (RES,) * 3)
        assert lab.GetPixelID() == sitk.sitkUInt8 and set(np.unique(y)) == {0, 1}
        assert 0.15 < y.mean() < 0.5, y.mean()  # brain in a bounding box with margin
        assert np.isfinite(x).all() and x.min() >= 0
        # label aligned with the image: brain is bright on T1, background is dark
        assert x[y == 1].mean() > 3 * x[y == 0].mean()
        # real anatomy: correlated with the undeformed template, but not a copy of it
        corr = np.corrcoef(x.ravel(), _template_on(img).ravel())[0, 1]
        assert 0.5 < corr < 0.99, corr
        images.append(x)
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert images[i].shape == images[j].shape
            assert not np.array_equal(images[i], images[j])
            assert np.corrcoef(images[i].ravel(), images[j].ravel())[0, 1] < 0.99


@needs_nilearn
def test_second_call_reuses_task(task: Path):
    root = task.parent
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    again = realdata.make_t1_task(root, resolution_mm=RES, seed=0, **COUNTS)
    assert again == task
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes


@needs_nilearn
def test_deterministic_in_seed(task: Path, tmp_path: Path):
    same = realdata.make_t1_task(tmp_path / "same", resolution_mm=RES, seed=0, **COUNTS).parent
    other = realdata.make_t1_task(tmp_path / "other", resolution_mm=RES, seed=1, **COUNTS).parent
    for rel in ("imagesTr/s000.nii.gz", "labelsTr/s000.nii.gz", "imagesTs/s004.nii.gz"):
        a, b, c = (_read(r / rel)[1] for r in (task.parent, same, other))
        assert np.array_equal(a, b)
        assert not np.array_equal(a, c)
        assert (task.parent / rel).read_bytes() == (same / rel).read_bytes()


@needs_nilearn
def test_parameters_change_regenerates_and_foreign_folder_is_kept(task: Path, tmp_path: Path):
    out = tmp_path / "t"
    realdata.make_t1_task(out, resolution_mm=RES, n_labeled=1, n_unlabeled=0, n_test=0)
    dl = realdata.make_t1_task(
        out, resolution_mm=RES, n_labeled=1, n_unlabeled=0, n_test=1, test_in_unlabeled=False
    )
    assert json.loads(dl.read_text())["unlabeled"] == []
    assert len(json.loads((out / "test.json").read_text())["test"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # nothing left beside it
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        realdata.make_t1_task(foreign, resolution_mm=RES)
    assert (foreign / "keep.txt").read_text() == "user data"
    with pytest.raises(ValueError):
        realdata.make_t1_task(tmp_path / "bad", structure="liver")


@needs_nilearn
def test_vary_geometry_keeps_anatomy(tmp_path: Path):
    kw = {"n_labeled": 3, "n_unlabeled": 0, "n_test": 0, "structure": "wm", "resolution_mm": RES}
    plain = realdata.make_t1_task(tmp_path / "plain", **kw).parent
    varied = realdata.make_t1_task(tmp_path / "varied", vary_geometry=True, **kw).parent
    directions, spacings = [], []
    for case in ("s000", "s001", "s002"):
        img, x = _read(varied / f"imagesTr/{case}.nii.gz")
        lab, y = _read(varied / f"labelsTr/{case}.nii.gz")
        assert _same_grid(img, lab)
        directions.append(np.round(img.GetDirection(), 6))
        spacings.append(img.GetSpacing())
        # white matter is the brightest tissue on T1
        brain = _template_on(img) > 0.2
        assert x[y == 1].mean() > 1.15 * x[brain & (y == 0)].mean()
        # same subject as without vary_geometry: only the sampling grid differs
        ref_lab = sitk.ReadImage(str(plain / f"labelsTr/{case}.nii.gz"))
        on_ref = sitk.GetArrayFromImage(
            sitk.Resample(lab, ref_lab, sitk.Transform(), sitk.sitkNearestNeighbor)
        )
        ref = sitk.GetArrayFromImage(ref_lab)
        dice = 2 * (on_ref & ref).sum() / (on_ref.sum() + ref.sum())
        assert dice > 0.8, (case, dice)  # thin structure, 1.5x coarser axis: ~0.9, misaligned: << 0.8
    assert any(not np.allclose(d, np.eye(3).ravel()) for d in directions)
    assert any(len(set(s)) > 1 for s in spacings)


@needs_nilearn
def test_strong_bias_changes_only_every_third_subject(tmp_path: Path):
    kw = {"n_labeled": 3, "n_unlabeled": 0, "n_test": 0, "structure": "wm", "resolution_mm": RES}
    plain = realdata.make_t1_task(tmp_path / "plain", **kw).parent
    strong = realdata.make_t1_task(tmp_path / "strong", strong_bias=True, **kw).parent
    draws = {s["case"]: s["bias_strength"] for s in json.loads((strong / "task.json").read_text())["subjects"]}
    assert 1.0 <= draws["s002"] <= 2.0 and max(draws["s000"], draws["s001"]) <= 0.2
    for case in ("s000", "s001"):  # untouched, bit for bit
        assert np.array_equal(_read(plain / f"imagesTr/{case}.nii.gz")[1], _read(strong / f"imagesTr/{case}.nii.gz")[1])

    def wm_spread(task: Path) -> float:  # white matter's intensity spread: a bias field widens it
        x, y = _read(task / "imagesTr/s002.nii.gz")[1], _read(task / "labelsTr/s002.nii.gz")[1]
        return float(x[y == 1].std() / x[y == 1].mean())

    assert np.array_equal(_read(plain / "labelsTr/s002.nii.gz")[1], _read(strong / "labelsTr/s002.nii.gz")[1])
    assert wm_spread(strong) > 1.5 * wm_spread(plain)
    assert "strong_bias" in (strong / "README.txt").read_text()


@needs_nilearn
@pytest.mark.parametrize("structure, lo, hi", [("gm", 0.08, 0.3), ("wm", 0.04, 0.25)])
def test_tissue_structures(tmp_path: Path, structure: str, lo: float, hi: float):
    dl = realdata.make_t1_task(
        tmp_path / structure, n_labeled=1, n_unlabeled=0, n_test=0, structure=structure, resolution_mm=RES
    )
    assert json.loads(dl.read_text())["classes"] == {"1": realdata.STRUCTURES[structure]}
    y = _read(dl.parent / "labelsTr/s000.nii.gz")[1]
    assert lo < y.mean() < hi, y.mean()


@needs_nilearn
def test_ventricles_task_is_two_small_dark_deep_regions(tmp_path: Path):
    dl = realdata.make_t1_task(tmp_path / "v", n_labeled=1, n_unlabeled=0, n_test=0, structure="ventricles",
                               resolution_mm=RES)
    assert json.loads(dl.read_text())["classes"] == {"1": "lateral_ventricles"}
    img, x = _read(dl.parent / "imagesTr/s000.nii.gz")
    y = _read(dl.parent / "labelsTr/s000.nii.gz")[1]
    assert 0.001 < y.mean() < 0.01, y.mean()  # ~11 ml in a ~1.7 l field of view
    components, n = ndi.label(y)
    sizes = sorted(ndi.sum_labels(y, components, range(1, n + 1)), reverse=True)
    assert len(sizes) >= 2 and sizes[1] > 0.5 * sizes[0], sizes  # left and right, the template is symmetric
    brain = _template_on(img) > 0.2
    assert (brain[y == 1]).mean() > 0.95  # inside the brain...
    assert x[y == 1].mean() < 0.8 * x[brain & (y == 0)].mean()  # ...and darker than it (CSF on T1)


@needs_nilearn
def test_grey_and_white_matter_task_has_two_classes(tmp_path: Path):
    dl = realdata.make_t1_task(tmp_path / "tissue", n_labeled=1, n_unlabeled=0, n_test=0, structure="tissue",
                               resolution_mm=RES)
    assert json.loads(dl.read_text())["classes"] == {"1": "grey_matter", "2": "white_matter"}
    y = _read(dl.parent / "labelsTr/s000.nii.gz")[1]
    # the same subject's one-class tasks: grey matter is class 1 except where white matter wins, white is class 2
    gm = _read(realdata.make_t1_task(tmp_path / "gm", n_labeled=1, n_unlabeled=0, n_test=0, structure="gm",
                                     resolution_mm=RES).parent / "labelsTr/s000.nii.gz")[1]
    wm = _read(realdata.make_t1_task(tmp_path / "wm", n_labeled=1, n_unlabeled=0, n_test=0, structure="wm",
                                     resolution_mm=RES).parent / "labelsTr/s000.nii.gz")[1]
    assert set(np.unique(y)) == {0, 1, 2}
    assert np.array_equal(y == 2, wm == 1) and np.array_equal(y == 1, (gm == 1) & (wm == 0))
    assert 0.05 < (y == 1).mean() and 0.04 < (y == 2).mean()


def test_missing_nilearn_raises_import_error(monkeypatch, tmp_path: Path):
    monkeypatch.setitem(sys.modules, "nilearn.datasets", None)  # makes the import fail
    assert not realdata.nilearn_available()
    with pytest.raises(ImportError, match=r"mnsegment\[demo\]"):
        realdata.make_t1_task(tmp_path / "task")
    assert not (tmp_path / "task").exists()
