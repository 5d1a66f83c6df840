"""The experiment planner (MNSegmentLib/planning): fingerprints of real-shaped datasets and of small real files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MNSegmentLib.config import preset
from MNSegmentLib.data import realdata
from MNSegmentLib.data.datalist import Case, Datalist, load_datalist
from MNSegmentLib.data.io import array_xyz
from MNSegmentLib.data.preprocess import canonical
from MNSegmentLib.errors import InputError
from MNSegmentLib.planning.fingerprint import CaseFingerprint, Fingerprint, fingerprint_datalist, lps_axes, read_case
from MNSegmentLib.planning.planner import (
    MIN_COVERAGE,
    MIN_VOXELS_ACROSS,
    Budget,
    ExperimentPlan,
    budget_from_config,
    downsampling_factor,
    explicit_settings,
    fit_patch,
    plan_experiment,
)

QUICK = budget_from_config(preset("quick"))  # 48×48×32 voxels, 3D U-Net with total stride 8
PAPER = budget_from_config(preset("paper"))  # 160×160×64 voxels, total stride 16


def dataset(size, spacing, extent, n=6, classes=None, spacings=None) -> Fingerprint:
    """``n`` labeled cases of one shape (``spacings`` varies the spacing per case)."""
    spacings = spacings or [spacing] * n
    return Fingerprint([CaseFingerprint(f"case{i}", list(size), list(s), list(extent),
                                        classes or {"1": list(extent)}, 0.1) for i, s in enumerate(spacings)])


BRAIN = dataset((182, 218, 182), (1.0, 1.0, 1.0), (140, 170, 130))  # 1 mm whole-head T1, brain mask
CARDIAC = dataset((256, 256, 12), (0.6, 0.6, 2.5), (100, 100, 30))  # short-axis cine MR, heart
ABDOMEN = dataset((512, 512, 60), (0.8, 0.8, 5.0), (200, 150, 150))  # portal-venous CT, liver
LOW_RES = dataset((57, 69, 61), (3.0, 3.0, 3.0), (135, 170, 120))  # the benchmark's 3 mm white-matter task
REAL_SHAPES = {"brain": BRAIN, "cardiac": CARDIAC, "abdomen": ABDOMEN, "low_res": LOW_RES}


def patch_mm(plan: ExperimentPlan) -> list[float]:
    return [p * s for p, s in zip(plan.patch_size, plan.target_spacing)]


def test_budgets_come_from_the_presets():
    assert (QUICK.patch_voxels, QUICK.batch_size, QUICK.divisor) == (48 * 48 * 32, 4, 8)
    assert (PAPER.patch_voxels, PAPER.divisor) == (160 * 160 * 64, 16)
    assert downsampling_factor(preset("default")["model3d"]) == 16
    assert downsampling_factor({"name": "DynUNet", "kwargs": {"strides": [1, [2, 2, 1], 2, 2]}}) == 8
    assert downsampling_factor({"name": "SwinUNETR", "kwargs": {}}) == 32


def test_whole_head_at_1mm_gets_a_low_resolution_plan():
    full = fit_patch(BRAIN.median_field_of_view(), [1.0, 1.0, 1.0], QUICK.patch_voxels, QUICK.divisor)
    assert min(p / e for p, e in zip(full, [140, 170, 130])) < MIN_COVERAGE  # the problem of issue 11

    plan = plan_experiment(BRAIN, QUICK)

    assert plan.low_resolution and plan.full_resolution_spacing == [1.0, 1.0, 1.0]
    assert plan.target_spacing[0] == plan.target_spacing[1] == plan.target_spacing[2] > 1.5  # stays isotropic
    assert min(plan.structure_coverage) >= MIN_COVERAGE
    assert plan.structure_coverage == [round(m / e, 3) for m, e in zip(patch_mm(plan), [140, 170, 130])]
    assert all(e / s >= MIN_VOXELS_ACROSS for e, s in zip([140, 170, 130], plan.target_spacing))
    assert plan.slice_axis == 2
    assert "would span only" in plan.why[-1] and "low-resolution" in plan.why[-1], plan.why


def test_a_larger_budget_keeps_the_brain_at_full_resolution():
    plan = plan_experiment(BRAIN, PAPER)
    assert plan.target_spacing == [1.0, 1.0, 1.0] and not plan.low_resolution
    assert min(plan.structure_coverage) >= MIN_COVERAGE
    assert "full resolution kept" in plan.why[-1]


def test_a_small_structure_in_a_1mm_head_keeps_full_resolution():
    hippocampus = dataset((182, 218, 182), (1.0, 1.0, 1.0), (20, 40, 20))
    plan = plan_experiment(hippocampus, QUICK)
    assert plan.target_spacing == [1.0, 1.0, 1.0] and min(plan.structure_coverage) >= 1
    assert "all of the structure along every axis: full resolution kept" in plan.why[-1]


def test_cardiac_mr_is_planned_as_a_stack_of_thick_slices():
    plan = plan_experiment(CARDIAC, QUICK)
    assert plan.target_spacing == [0.6, 0.6, 2.5] and not plan.low_resolution
    assert plan.slice_axis == 2
    assert plan.patch_size[2] < plan.patch_size[0] and plan.patch_size[2] < plan.patch_size[1]  # flat
    assert plan.patch_size[2] <= 12
    assert "slices are thick" in plan.why[1]


def test_the_slice_axis_follows_the_thick_axis():
    sagittal = dataset((12, 256, 256), (2.5, 0.6, 0.6), (30, 100, 100))
    plan = plan_experiment(sagittal, QUICK)
    assert plan.slice_axis == 0
    assert plan.patch_size[0] < min(plan.patch_size[1:])


def test_mixed_slice_thickness_plans_a_fine_percentile_along_the_slice_axis():
    z = [2.5, 5.0, 5.0, 5.0, 5.0, 10.0]
    mixed = dataset((256, 256, 20), None, (100, 100, 40), spacings=[(0.7, 0.7, s) for s in z])
    plan = plan_experiment(mixed, PAPER)
    assert plan.full_resolution_spacing[2] == pytest.approx(np.percentile(z, 10))
    assert plan.full_resolution_spacing[2] < np.median(z)
    assert plan.full_resolution_spacing[:2] == [0.7, 0.7]


def test_abdominal_ct_coarsens_in_plane_first_and_keeps_its_slices():
    plan = plan_experiment(ABDOMEN, QUICK)
    assert plan.slice_axis == 2 and plan.low_resolution
    assert plan.target_spacing[2] == 5.0  # the thick axis is not coarsened before the in-plane axes catch up
    assert 0.8 < plan.target_spacing[0] == plan.target_spacing[1] <= 2.5
    assert min(plan.structure_coverage) >= MIN_COVERAGE


def test_the_3mm_benchmark_task_keeps_full_resolution():
    plan = plan_experiment(LOW_RES, QUICK)
    assert plan.target_spacing == [3.0, 3.0, 3.0] and not plan.low_resolution
    assert min(plan.structure_coverage) >= MIN_COVERAGE


@pytest.mark.parametrize("name", sorted(REAL_SHAPES))
@pytest.mark.parametrize("budget", [QUICK, PAPER], ids=["quick", "paper"])
def test_every_plan_fits_the_network_the_images_and_the_budget(name, budget):
    fingerprint = REAL_SHAPES[name]
    plan = plan_experiment(fingerprint, budget)
    shape = [f / s for f, s in zip(fingerprint.median_field_of_view(), plan.target_spacing)]
    assert all(p % budget.divisor == 0 for p in plan.patch_size)
    assert all(p <= max(n, budget.divisor) for p, n in zip(plan.patch_size, shape))
    assert math.prod(plan.patch_size) <= budget.patch_voxels
    # Deterministic and JSON-serialisable, as plan.json needs.
    assert plan_experiment(fingerprint, budget) == plan
    assert ExperimentPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan


def test_fit_patch_spends_the_budget_in_the_image_aspect():
    patch = fit_patch([300.0, 300.0, 150.0], [1.0, 1.0, 1.0], 64 * 64 * 32, 8)
    assert patch == [64, 64, 32]
    assert fit_patch([20.0, 20.0, 20.0], [1.0, 1.0, 1.0], 10**6, 8) == [16, 16, 16]  # capped at the image
    assert fit_patch([20.0, 20.0, 5.0], [1.0, 1.0, 1.0], 10**6, 8) == [16, 16, 8]  # one divisor; the sampler pads


def test_a_thin_class_bounds_the_coarsening():
    classes = {"1": [140, 170, 130], "2": [20, 20, 40]}  # e.g. a small nucleus next to the whole brain
    fingerprint = dataset((182, 218, 182), (1.0, 1.0, 1.0), (140, 170, 130), classes=classes)
    plan = plan_experiment(fingerprint, QUICK)
    assert plan.target_spacing == [1.0, 1.0, 1.25]  # 40 mm / 32 voxels; x and y are already at their limit
    assert min(plan.structure_coverage) < MIN_COVERAGE
    assert "no coarser" in plan.why[-1] and "sampling.patch_size" in plan.why[-1]


def test_unlabeled_only_plans_for_the_field_of_view():
    fingerprint = Fingerprint([CaseFingerprint("a", [182, 218, 182], [1.0, 1.0, 1.0])])
    plan = plan_experiment(fingerprint, QUICK)
    assert plan.structure_extent == plan.field_of_view == [182.0, 218.0, 182.0]
    assert plan.structure_coverage == plan.field_of_view_coverage
    assert min(plan.structure_coverage) >= MIN_COVERAGE


def test_device_memory_lowers_the_patch_budget():
    small = Budget(QUICK.patch_voxels, 4, 8, memory_bytes=0.5 * 2**30, bytes_per_voxel=4096)
    assert small.voxel_cap() == int(0.5 * 2**30 / (4096 * 4)) < QUICK.patch_voxels
    plan = plan_experiment(LOW_RES, small)
    assert math.prod(plan.patch_size) <= small.voxel_cap()
    assert "0.5 GiB" in plan.why[1]
    roomy = Budget(QUICK.patch_voxels, 4, 8, memory_bytes=80 * 2**30, bytes_per_voxel=4096)
    assert roomy.voxel_cap() == QUICK.patch_voxels  # memory never raises the preset's compute per step


def test_explicit_settings_win():
    overrides = {"sampling.patch_size": [64, 64, 64], "data.target_spacing": [1.5, 1.5, 1.5], "data.slice_axis": 0,
                 "train.steps": 10}
    explicit = explicit_settings(overrides)
    assert explicit == {k: v for k, v in overrides.items() if k != "train.steps"}
    plan = plan_experiment(BRAIN, QUICK, explicit)
    assert (plan.patch_size, plan.target_spacing, plan.slice_axis) == ([64, 64, 64], [1.5, 1.5, 1.5], 0)
    assert plan.structure_coverage == [round(96 / e, 3) for e in [140, 170, 130]]  # what the user's choice sees
    assert sum("set explicitly" in w for w in plan.why) == 3
    assert explicit_settings({"data.target_spacing": None}) == {}  # null = automatic


def test_an_explicit_patch_still_gets_a_planned_spacing():
    large = plan_experiment(BRAIN, QUICK, {"sampling.patch_size": [128, 128, 128]})
    assert large.target_spacing == [1.0, 1.0, 1.0]  # 128 mm covers more than half of the brain
    small = plan_experiment(BRAIN, QUICK, {"sampling.patch_size": [32, 32, 32]})
    assert small.patch_size == [32, 32, 32] and small.low_resolution
    assert min(small.structure_coverage) >= MIN_COVERAGE


# ---- the fingerprint, from real files ----

def _write(array_xyz_: np.ndarray, path, spacing, direction) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz_.transpose(2, 1, 0)))
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    image.SetOrigin((10.0, -5.0, 3.0))
    sitk.WriteImage(image, str(path))
    return image


# Image axis i runs along S, j along -L (right), k along P: an unusual but valid orientation.
DIRECTION = (0.0, -1.0, 0.0,
             0.0, 0.0, 1.0,
             1.0, 0.0, 0.0)
SPACING = (3.0, 0.7, 0.9)


def test_fingerprint_of_real_files_matches_the_lps_arrays_of_preprocessing(tmp_path):
    size = (10, 14, 12)
    label = np.zeros(size, np.uint8)
    label[2:7, 3:9, 4:6] = 1
    label[5:8, 10:12, 1:3] = 3
    image = _write(np.random.default_rng(0).normal(size=size).astype(np.float32), tmp_path / "img.nii.gz",
                   SPACING, DIRECTION)
    _write(label, tmp_path / "lab.nii.gz", SPACING, DIRECTION)

    case = read_case(tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz")

    lps = canonical(image)  # what preprocessing does
    assert case.size == list(lps.GetSize()) and case.spacing == pytest.approx(lps.GetSpacing())
    assert case.spacing == pytest.approx([0.7, 0.9, 3.0])
    lab_lps = canonical(sitk.ReadImage(str(tmp_path / "lab.nii.gz")))
    values = array_xyz(lab_lps, dtype=None)

    def extent(mask):
        where = np.argwhere(mask)
        return list((where.max(0) - where.min(0) + 1) * np.array(lps.GetSpacing()))

    assert case.foreground_extent == pytest.approx(extent(values > 0))
    assert case.class_extents == {"1": pytest.approx(extent(values == 1)), "3": pytest.approx(extent(values == 3))}
    assert case.foreground_share == pytest.approx(np.count_nonzero(label) / label.size)
    assert case.name == "img"


def test_unlabeled_images_are_described_from_their_header_alone(tmp_path):
    _write(np.zeros((8, 9, 10), np.int16), tmp_path / "img.mhd", SPACING, DIRECTION)
    (tmp_path / "img.raw").unlink()  # no voxel data left: only a header reader can still describe it
    with pytest.raises(RuntimeError):
        sitk.ReadImage(str(tmp_path / "img.mhd"))
    case = read_case(tmp_path / "img.mhd")
    assert (case.size, case.spacing, case.foreground_extent) == ([9, 10, 8], [0.7, 0.9, 3.0], None)


def test_fingerprint_of_a_datalist_reuses_labels_already_read_and_round_trips(tmp_path):
    label = np.zeros((10, 10, 6), np.uint8)
    label[2:5, 2:8, 1:4] = 1
    for name in ("a", "b"):
        _write(np.zeros(label.shape, np.float32), tmp_path / f"{name}.nii.gz", (1.0, 1.0, 2.0), np.eye(3).ravel())
    _write(label, tmp_path / "a_label.nii.gz", (1.0, 1.0, 2.0), np.eye(3).ravel())
    datalist = Datalist([Case(tmp_path / "a.nii.gz", tmp_path / "a_label.nii.gz")], [Case(tmp_path / "b.nii.gz")])
    read = fingerprint_datalist(datalist)
    reused = fingerprint_datalist(datalist, {tmp_path / "a.nii.gz": label})
    assert read == reused
    assert [c.foreground_extent for c in read.cases] == [[3.0, 6.0, 6.0], None]
    assert Fingerprint.from_json(json.loads(json.dumps(read.to_json()))) == read


def test_a_label_on_another_grid_is_refused_by_name(tmp_path):
    _write(np.zeros((10, 10, 6), np.float32), tmp_path / "a.nii.gz", (1.0, 1.0, 2.0), np.eye(3).ravel())
    _write(np.ones((10, 10, 5), np.uint8), tmp_path / "a_label.nii.gz", (1.0, 1.0, 2.0), np.eye(3).ravel())
    with pytest.raises(InputError, match="a_label.nii.gz"):
        read_case(tmp_path / "a.nii.gz", tmp_path / "a_label.nii.gz")


def test_oblique_directions_still_map_to_a_permutation():
    c = math.cos(math.radians(45))
    oblique = (c, -c, 0.0, c, c, 0.0, 0.0, 0.0, 1.0)  # rotated 45 degrees about S
    assert sorted(lps_axes(oblique)) == [0, 1, 2]
    assert lps_axes(DIRECTION) == [1, 2, 0]


# ---- the memory a patch voxel costs ----

def test_saved_activations_are_counted_once_per_storage():
    from torch import nn

    from MNSegmentLib.planning.memory import saved_activation_bytes

    # Conv3d keeps its input (the caller's) and weight (a parameter): neither counts. ReLU keeps its 4-channel
    # float32 output, which the second convolution keeps again as its input: counted once, 16 bytes per voxel.
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1))
    x = torch.zeros(2, 1, 8, 8, 8, requires_grad=True)
    assert saved_activation_bytes(model, x) == 16 * x.numel()


def test_activation_memory_per_voxel_of_the_quick_network_does_not_depend_on_the_probe():
    from MNSegmentLib.models.network3d import build_model3d
    from MNSegmentLib.planning.memory import activation_bytes_per_voxel, saved_activation_bytes

    model = build_model3d(preset("quick")["model3d"], 2).eval()
    per_voxel = activation_bytes_per_voxel(model, QUICK.divisor)
    assert not model.training  # the probe leaves the model's mode as it was
    other = saved_activation_bytes(model.train(), torch.zeros(1, 1, 48, 48, 32, requires_grad=True)) / (48 * 48 * 32)
    assert per_voxel == pytest.approx(other, rel=0.05)
    budget = Budget(QUICK.patch_voxels, QUICK.batch_size, QUICK.divisor, 2**30, per_voxel)
    assert budget.voxel_cap() == QUICK.patch_voxels  # the quick preset fits 1 GiB


@pytest.mark.skipif(not realdata.nilearn_available(), reason="nilearn (demo extra) not installed")
def test_the_benchmark_task_from_real_anatomy_keeps_its_resolution(tmp_path):
    """The accuracy benchmark's kind of task (MNI152 white matter at 3 mm), written to disk with varied
    orientations and one coarser axis: the fingerprint agrees with preprocessing's LPS images and the quick budget
    keeps the data's own spacing."""
    datalist = load_datalist(realdata.make_t1_task(tmp_path / "task", n_labeled=2, n_unlabeled=1, n_test=0,
                                                   structure="wm", resolution_mm=3.0, vary_geometry=True))
    fingerprint = fingerprint_datalist(datalist)
    for case, described in zip(datalist.labeled + datalist.unlabeled, fingerprint.cases):
        image = canonical(sitk.ReadImage(str(case.image)))
        assert (described.size, described.spacing) == (list(image.GetSize()), list(image.GetSpacing()))
        if case.label is not None:
            where = np.argwhere(array_xyz(canonical(sitk.ReadImage(str(case.label))), dtype=None) > 0)
            extent = (where.max(0) - where.min(0) + 1) * np.array(image.GetSpacing())
            assert described.foreground_extent == pytest.approx(extent.tolist())
    plan = plan_experiment(fingerprint, QUICK)
    assert plan.target_spacing == fingerprint.median_spacing() and not plan.low_resolution
    assert min(plan.structure_coverage) >= MIN_COVERAGE
