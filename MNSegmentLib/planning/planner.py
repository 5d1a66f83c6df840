"""The experiment planner: target spacing, patch shape and slice axis from the dataset and the compute budget.

In the spirit of nnU-Net v2's ExperimentPlanner: the data's median spacing (a fine percentile along the coarse
axis of strongly anisotropic data), a patch shaped like the median image within the preset's voxel budget, and a
coarser, low-resolution spacing when the full-resolution patch would see too little of the structure. Settings
given explicitly (``--set``) always win; the plan says what it chose and why, in words a user can act on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from MNSegmentLib.planning.fingerprint import Fingerprint

ANISOTROPY = 3.0  # coarsest / finest spacing above which a volume is a stack of slices (nnU-Net's threshold)
SLICE_SPACING_PERCENTILE = 10  # target for the coarse axis of anisotropic data: keeps most scans' slices
MIN_COVERAGE = 0.5  # a patch must span this share of the structure's extent along every axis
MIN_VOXELS_ACROSS = 32  # coarsening stops before the thinnest class is fewer voxels across than this
COARSEN_STEP = 1.05  # spacing grows by this factor per step of the low-resolution search
PLANNED_KEYS = ("data.target_spacing", "sampling.patch_size", "data.slice_axis")
AXES = "xyz"


@dataclass(frozen=True)
class Budget:
    patch_voxels: int  # voxels in one patch: what the preset's patch costs per batch item
    batch_size: int
    divisor: int  # every patch side is a multiple of the 3D network's total downsampling factor
    memory_bytes: float | None = None  # device memory available for training, if known
    bytes_per_voxel: float | None = None  # training memory per patch voxel and batch item (memory.py)

    def voxel_cap(self) -> int:
        """The preset's patch voxels, lowered when the device memory cannot hold a batch of them."""
        if self.memory_bytes is None or self.bytes_per_voxel is None:
            return self.patch_voxels
        fits = int(self.memory_bytes / (self.bytes_per_voxel * self.batch_size))
        return max(min(self.patch_voxels, fits), self.divisor**3)


@dataclass
class ExperimentPlan:
    target_spacing: list[float]  # mm, canonical (x, y, z)
    patch_size: list[int]  # voxels
    slice_axis: int  # the axis across which the 2D network sees slices
    low_resolution: bool  # the spacing is coarser than the data's own
    full_resolution_spacing: list[float]
    field_of_view: list[float]  # mm, median over all images
    structure_extent: list[float]  # mm, median bounding box of the labeled structure (field of view if none)
    structure_coverage: list[float]  # patch extent / structure extent, per axis
    field_of_view_coverage: list[float]  # patch extent / field of view, per axis
    why: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ExperimentPlan:
        return cls(**data)


def downsampling_factor(model3d: dict) -> int:
    """Total stride of the 3D network from its configuration: the product of MONAI UNet/DynUNet ``strides``."""
    strides = model3d.get("kwargs", {}).get("strides")
    if not strides:
        return 32  # networks without explicit strides (SwinUNETR, BasicUNet, SegResNet) accept multiples of 32
    return int(np.prod([max(s) if isinstance(s, (list, tuple)) else s for s in strides]))


def budget_from_config(config: dict, memory_bytes: float | None = None,
                       bytes_per_voxel: float | None = None) -> Budget:
    """The budget a preset stands for: its patch voxels (``sampling.patch_size``) and batch size."""
    sampling = config["sampling"]
    return Budget(int(np.prod(sampling["patch_size"])), int(sampling["batch_size"]),
                  downsampling_factor(config["model3d"]), memory_bytes, bytes_per_voxel)


def explicit_settings(overrides: dict[str, Any]) -> dict[str, Any]:
    """The planner's settings among ``--set`` overrides: these are used as given, never planned."""
    return {key: value for key, value in overrides.items() if key in PLANNED_KEYS and value is not None}


def _mm(values: Sequence[float]) -> str:
    return "×".join(f"{v:.3g}" for v in values) + " mm"


def _voxels(values: Sequence[int]) -> str:
    return "×".join(str(v) for v in values)


def _percent(share: float) -> str:
    return f"{100 * share:.0f} %"


def _seen(coverage: Sequence[float], target: str) -> str:
    """How much of the target the patch spans along its worst axis, in words."""
    if min(coverage) >= 1:
        return f"all of the {target} along every axis"
    return f"at least {_percent(min(coverage))} of the {target} along every axis"


def full_resolution_spacing(fingerprint: Fingerprint) -> tuple[list[float], bool]:
    """The median spacing; for strongly anisotropic data the coarse axis takes a low percentile instead, so
    the scans with thinner slices are not blurred by interpolation (nnU-Net's rule). Also returns whether the
    data is anisotropic."""
    spacing = fingerprint.median_spacing()
    coarse = int(np.argmax(spacing))
    others = max(s for a, s in enumerate(spacing) if a != coarse)
    anisotropic = spacing[coarse] > ANISOTROPY * min(spacing)
    if anisotropic:
        low = float(np.percentile([c.spacing[coarse] for c in fingerprint.cases], SLICE_SPACING_PERCENTILE))
        spacing[coarse] = max(low, others)
    return spacing, anisotropic


def fit_patch(field_of_view: Sequence[float], spacing: Sequence[float], voxel_cap: int, divisor: int) -> list[int]:
    """The patch that sees the largest share of the median image along its worst axis, with at most
    ``voxel_cap`` voxels, every side a multiple of ``divisor`` and no larger than the image (rounded down to the
    divisor; a side never goes below one divisor, the sampler pads thinner images).

    Grown one divisor at a time on the axis that sees the least of the image, while the budget allows: this keeps
    the patch in the image's aspect and spends what rounding to the divisor leaves over on the other axes.
    """
    shape = [fov / s for fov, s in zip(field_of_view, spacing)]
    upper = [max(divisor, int(n // divisor) * divisor) for n in shape]
    patch = [divisor] * 3
    while True:
        grow = [a for a in range(3) if patch[a] + divisor <= upper[a]
                and math.prod(patch) // patch[a] * (patch[a] + divisor) <= voxel_cap]
        if not grow:
            return patch
        patch[min(grow, key=lambda a: patch[a] / shape[a])] += divisor


def _coverage(patch: Sequence[int], spacing: Sequence[float], extent: Sequence[float]) -> list[float]:
    return [round(float(p * s / e), 3) if e > 0 else 1.0 for p, s, e in zip(patch, spacing, extent)]


def _coarser(spacing: list[float], limit: Sequence[float]) -> list[float] | None:
    """One step of the low-resolution search, or None at the limit. Axes much finer than the coarsest go first
    (towards isotropy, as nnU-Net's low-resolution search does); no axis passes its limit."""
    free = [a for a in range(3) if spacing[a] < limit[a]]
    if not free:
        return None
    finest = [a for a in free if max(spacing) / spacing[a] > 2]
    out = list(spacing)
    for a in finest or free:
        out[a] = min(round(spacing[a] * COARSEN_STEP, 3), limit[a])  # 3 decimals: readable in plan.json
    return out


def plan_experiment(fingerprint: Fingerprint, budget: Budget, explicit: dict[str, Any] | None = None,
                    min_coverage: float = MIN_COVERAGE, given_by: dict[str, str] | None = None) -> ExperimentPlan:
    """Chooses target spacing, patch size and slice axis; values in ``explicit`` (``explicit_settings``) win.

    ``given_by`` says where an explicit value came from, in the plan's words (default "set explicitly").
    """
    if not fingerprint.cases:
        raise ValueError("an empty fingerprint: plan from at least one image")
    explicit = explicit or {}

    def given(key: str) -> str:
        return (given_by or {}).get(key, "set explicitly")
    full, anisotropic = full_resolution_spacing(fingerprint)
    fov = fingerprint.median_field_of_view()
    structure = fingerprint.median_foreground_extent()
    labeled = structure is not None
    structure = structure if labeled else fov  # nothing labeled: aim to see the field of view
    cap = budget.voxel_cap()

    why = [f"{len(fingerprint.cases)} images ({len(fingerprint.labeled)} labeled): median spacing "
           f"{_mm(fingerprint.median_spacing())}, field of view {_mm(fov)}"
           + (f", labeled structure {_mm(structure)} (median bounding box)" if labeled else "")]
    coarse = int(np.argmax(full))
    if anisotropic:
        why.append(f"slices are thick ({AXES[coarse]} {full[coarse]:.3g} mm vs {min(full):.3g} mm in-plane, "
                   f"more than {ANISOTROPY:g}×): {AXES[coarse]} keeps {full[coarse]:.3g} mm (the "
                   f"{SLICE_SPACING_PERCENTILE}th percentile over images) and the 2D network sees slices across "
                   f"{AXES[coarse]} (slice axis {coarse})")
    budget_words = f"patch budget {cap} voxels, sides multiples of {budget.divisor} (the 3D network's total stride)"
    if cap < budget.patch_voxels:
        budget_words += f", lowered from the preset's {budget.patch_voxels} so a batch of {budget.batch_size} fits " \
                        f"in {budget.memory_bytes / 2**30:.1f} GiB"
    if "sampling.patch_size" not in explicit:
        why.append(budget_words)

    def patch_for(spacing: Sequence[float]) -> list[int]:
        if "sampling.patch_size" in explicit:
            return [int(v) for v in explicit["sampling.patch_size"]]
        return fit_patch(fov, spacing, cap, budget.divisor)

    spacing = [float(v) for v in explicit.get("data.target_spacing", full)]
    patch = patch_for(spacing)
    coverage = _coverage(patch, spacing, structure)
    target = "structure" if labeled else "field of view"
    if "data.target_spacing" in explicit:
        why.append(f"target spacing {_mm(spacing)} {given('data.target_spacing')}: patch {_voxels(patch)} spans "
                   f"{_seen(coverage, target)}")
    elif min(coverage) >= min_coverage:
        why.append(f"patch {_voxels(patch)} at {_mm(spacing)} spans {_mm([p * s for p, s in zip(patch, spacing)])}"
                   f", {_seen(coverage, target)}: full resolution kept")
    else:
        axis = int(np.argmin(coverage))
        before = (f"patch {_voxels(patch)} at {_mm(spacing)} would span only {_percent(coverage[axis])} of the "
                  f"{target} along {AXES[axis]}")
        # Never so coarse that the thinnest class is fewer than MIN_VOXELS_ACROSS voxels thick, nor finer than full.
        thinnest = fingerprint.smallest_class_extent() or structure
        limit = [max(f, round(t / MIN_VOXELS_ACROSS, 3)) for f, t in zip(full, thinnest)]
        while min(coverage) < min_coverage and (step := _coarser(spacing, limit)) is not None:
            spacing = step
            patch = patch_for(spacing)
            coverage = _coverage(patch, spacing, structure)
        after = (f"planned a low-resolution {_mm(spacing)}, where patch {_voxels(patch)} spans "
                 f"{_mm([p * s for p, s in zip(patch, spacing)])}, {_seen(coverage, target)}")
        if min(coverage) >= min_coverage:
            why.append(f"{before}; {after} ({_percent(min_coverage)} wanted)")
        else:
            why.append(f"{before}; {after}, and no coarser: the thinnest labeled class would be fewer than "
                       f"{MIN_VOXELS_ACROSS} voxels across. A larger sampling.patch_size (more memory) sees more")

    if "data.slice_axis" in explicit:
        slice_axis = int(explicit["data.slice_axis"])
        why.append(f"slice axis {slice_axis} {given('data.slice_axis')}")
    else:
        slice_axis = coarse if anisotropic else 2
    if "sampling.patch_size" in explicit:
        why.append(f"patch {_voxels(patch)} {given('sampling.patch_size')}")
    return ExperimentPlan(
        target_spacing=[float(s) for s in spacing], patch_size=patch, slice_axis=slice_axis,
        low_resolution=any(s > f * 1.001 for s, f in zip(spacing, full)), full_resolution_spacing=full,
        field_of_view=fov, structure_extent=structure, structure_coverage=coverage,
        field_of_view_coverage=_coverage(patch, spacing, fov), why=why)
