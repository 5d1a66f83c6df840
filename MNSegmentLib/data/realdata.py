"""Few-label segmentation tasks built from real anatomy that ships inside an installed package.

The nilearn wheel carries the MNI152 (ICBM 2009c nonlinear symmetric) T1 template at 1 mm together with its
grey- and white-matter probability maps. :func:`make_t1_task` turns them into a small population of synthetic
"subjects" -- each one a random smooth deformation of the real template with its own bias field, contrast and
noise -- and writes them as a task in the engine's datalist format. Nothing is downloaded: only the files inside
the installed nilearn package are read (no ``fetch_*`` function is ever called).

Layout written to ``out_dir``::

    datalist.json   {"labeled": [{"image", "label"}...], "unlabeled": [{"image"}...], "classes": {"1": name}}
    test.json       {"test": [{"image", "label"}...]}   held-out cases with their ground truth
    task.json       generation parameters (used to reuse an existing task) and per-subject random draws
    README.txt      how the subjects were generated
    imagesTr/ labelsTr/ imagesTs/ labelsTs/

Used by ``mnsegment demo`` and by the accuracy benchmark.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

__all__ = ["CLASSES", "GENERATOR_VERSION", "STRUCTURES", "make_t1_task", "nilearn_available"]

#: Bump when the generation procedure changes, so cached tasks on disk are regenerated.
GENERATOR_VERSION = 1

#: Structures that can be segmented, with the class name written in the datalist.
STRUCTURES = {"brain": "brain", "gm": "grey_matter", "wm": "white_matter", "tissue": "grey_and_white_matter",
              "ventricles": "lateral_ventricles"}
#: The label values and class names of each structure's task (``tissue`` is the one multi-class task).
CLASSES = {name: {"1": cls} for name, cls in STRUCTURES.items() if name != "tissue"} | {
    "tissue": {"1": "grey_matter", "2": "white_matter"}}

_INSTALL_HINT = 'install the optional demo dependency: pip install "mnsegment[demo]" (nilearn)'

# ---- generation parameters (documented in README.txt and in the benchmark doc) ----
_MARGIN_MM = 12.0  # field of view = brain bounding box of the template + this margin on every side
_DEFORM_MAX_MM = (4.0, 6.0)  # maximum displacement of the smooth field, drawn per subject
_DEFORM_SIGMA_MM = (15.0, 20.0)  # Gaussian smoothing of the displacement noise, drawn per subject
_DEFORM_GRID_MM = 4.0  # spacing of the grid the displacement field is stored on (linearly interpolated)
_ROT_MAX_DEG = 10.0  # per-axis rotation, uniform in +-
_SCALE_MAX = 0.08  # per-axis scaling, uniform in 1 +- this
_TRANS_MAX_MM = 5.0  # per-axis translation, uniform in +-
_BIAS_MAX = (0.10, 0.20)  # bias field spans [1/(1+b), 1+b]; b drawn per subject
_BIAS_DEGREE = 3  # total degree of the random polynomial whose exp is the bias field
_GAMMA = (0.7, 1.4)  # gamma on the min-max normalised intensities (log-uniform)
_NOISE_FRAC = (0.01, 0.04)  # Rician noise sigma as a fraction of the normalised intensity range
_SCALE_RANGE = (200.0, 2000.0)  # final intensity scale (log-uniform): intensity = offset + scale * x
_OFFSET_FRAC = (0.0, 0.1)  # final offset as a fraction of the scale
_PSF_SIGMA_FRAC = 0.4  # image is Gaussian-smoothed with sigma = this * resolution before sampling
_BRAIN_THRESHOLD = 0.2  # brain mask = template / max > 0.2 (nilearn's load_mni152_brain_mask rule)
_PROB_THRESHOLD = 0.5  # grey / white matter = probability map > 0.5
# lateral ventricles = the two largest connected regions of dark (CSF) brain voxels deeper than this below the
# brain surface (the template is symmetric: left and right, ~5.5 ml each); checked by eye on the three mid-planes
_CSF_THRESHOLD = 0.35
_VENTRICLE_DEPTH_MM = 8.0
_ANISO_FACTOR = 1.5  # vary_geometry: the coarse axis has spacing resolution * this
_STRONG_BIAS = (1.0, 2.0)  # strong_bias: b of subjects 2 (mod 3); up to 9x across the field of view (coil-like)


def _template_paths() -> tuple[Path, Path, Path]:
    """Paths of the T1, grey-matter and white-matter files shipped in the nilearn wheel, or ImportError."""
    try:
        from nilearn.datasets import GM_MNI152_FILE_PATH, MNI152_FILE_PATH, WM_MNI152_FILE_PATH
    except Exception as exc:  # nilearn missing, or too old to ship the tissue maps
        raise ImportError(f"The real-anatomy demo data needs nilearn: {_INSTALL_HINT}. ({exc})") from exc
    paths = tuple(Path(p) for p in (MNI152_FILE_PATH, GM_MNI152_FILE_PATH, WM_MNI152_FILE_PATH))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ImportError(
            f"nilearn is installed but its bundled MNI152 files are missing ({', '.join(missing)}); "
            f"{_INSTALL_HINT}."
        )
    return paths  # type: ignore[return-value]


def nilearn_available() -> bool:
    """True if nilearn is installed and its bundled MNI152 template files can be read offline."""
    try:
        _template_paths()
    except ImportError:
        return False
    return True


@lru_cache(maxsize=1)
def _load_template() -> dict[str, Any]:
    """The 1 mm template (T1 scaled to [0, 1]) and the three label maps as float32 SimpleITK images."""
    t1_path, gm_path, wm_path = _template_paths()
    try:
        t1 = sitk.ReadImage(str(t1_path), sitk.sitkFloat32)
        gm = sitk.ReadImage(str(gm_path), sitk.sitkFloat32)
        wm = sitk.ReadImage(str(wm_path), sitk.sitkFloat32)
    except RuntimeError as exc:
        raise ImportError(f"Could not read nilearn's bundled MNI152 files ({exc}); {_INSTALL_HINT}.") from exc
    t1_arr = sitk.GetArrayFromImage(t1)
    t1_arr /= max(float(t1_arr.max()), 1e-6)
    brain = (t1_arr > _BRAIN_THRESHOLD).astype(np.float32)
    maps = {"brain": brain, "ventricles": _lateral_ventricles(t1_arr, brain > 0, t1.GetSpacing())}
    for name, img in (("gm", gm), ("wm", wm)):
        arr = sitk.GetArrayFromImage(img)
        maps[name] = (arr / max(float(arr.max()), 1e-6) > _PROB_THRESHOLD).astype(np.float32)

    def to_img(arr: np.ndarray) -> sitk.Image:
        img = sitk.GetImageFromArray(arr.astype(np.float32))
        img.CopyInformation(t1)
        return img

    # Physical bounding box of the brain (+ margin) = the field of view of every subject.
    idx = np.argwhere(brain > 0)  # (z, y, x)
    lo_i, hi_i = idx.min(0)[::-1], idx.max(0)[::-1]
    corners = [
        t1.TransformIndexToPhysicalPoint([int(c) for c in (a, b, d)])
        for a in (lo_i[0], hi_i[0])
        for b in (lo_i[1], hi_i[1])
        for d in (lo_i[2], hi_i[2])
    ]
    corners = np.asarray(corners)
    return {
        "t1": to_img(t1_arr),
        "labels": {k: to_img(v) for k, v in maps.items()},
        "box_lo": corners.min(0) - _MARGIN_MM,
        "box_hi": corners.max(0) + _MARGIN_MM,
        "center": corners.mean(0),
    }


def _lateral_ventricles(t1: np.ndarray, brain: np.ndarray, spacing_xyz: tuple[float, ...]) -> np.ndarray:
    """Lateral ventricles of the template: dark brain voxels deep inside the brain, two largest components.

    Depth keeps out the sulci and the interhemispheric fissure, which are as dark but open to the surface.
    """
    depth = ndi.distance_transform_edt(brain, sampling=spacing_xyz[::-1])
    csf = brain & (t1 < _CSF_THRESHOLD) & (depth > _VENTRICLE_DEPTH_MM)
    components, n = ndi.label(csf)
    sizes = ndi.sum_labels(csf, components, range(1, n + 1))
    return np.isin(components, np.argsort(sizes)[::-1][:2] + 1).astype(np.float32)


@lru_cache(maxsize=4)
def _smoothed_t1(resolution_mm: float) -> sitk.Image:
    """Template T1 blurred by an approximate acquisition PSF for the target resolution (anti-aliasing)."""
    return sitk.SmoothingRecursiveGaussian(_load_template()["t1"], _PSF_SIGMA_FRAC * resolution_mm)


def _grid(spacing: tuple[float, float, float], direction: np.ndarray) -> sitk.Image:
    """An empty image whose grid covers the template field of view with the given spacing and direction."""
    tpl = _load_template()
    lo, hi = tpl["box_lo"], tpl["box_hi"]
    center = (lo + hi) / 2.0
    size = []
    for i in range(3):
        k = int(np.argmax(np.abs(direction[:, i])))
        size.append(math.ceil((hi[k] - lo[k]) / spacing[i]) + 1)
    # origin such that the grid centre falls on the box centre
    half = direction @ (np.asarray(spacing) * (np.asarray(size) - 1) / 2.0)
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing([float(s) for s in spacing])
    ref.SetDirection([float(v) for v in direction.ravel()])
    ref.SetOrigin([float(v) for v in center - half])
    return ref


_DIRECTIONS = {
    "identity": np.eye(3),
    # what a NIfTI stored in RAS+ looks like to SimpleITK (LPS)
    "ras": np.diag([-1.0, -1.0, 1.0]),
    # a coronal acquisition: rows along x, columns along -z, slices along y (proper rotation)
    "coronal": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]),
}


def _geometry(index: int, resolution_mm: float, vary: bool) -> tuple[str, tuple[float, float, float]]:
    """Direction name and spacing of subject ``index`` (a fixed cycle, so any task of >= 2 subjects varies)."""
    r = float(resolution_mm)
    if not vary or index % 3 == 0:
        return "identity", (r, r, r)
    if index % 3 == 1:
        return "ras", (r, r, r * _ANISO_FACTOR)
    return "coronal", (r, r * _ANISO_FACTOR, r)


def _random_transform(rng: np.random.Generator) -> tuple[sitk.Transform, dict[str, Any]]:
    """Random small affine + smooth displacement field (maps subject space to template space)."""
    tpl = _load_template()
    center = tpl["center"]
    # ---- smooth displacement field on a coarse axis-aligned grid covering the field of view ----
    max_disp = float(rng.uniform(*_DEFORM_MAX_MM))
    sigma_mm = float(rng.uniform(*_DEFORM_SIGMA_MM))
    pad = 2.0 * sigma_mm
    lo, hi = tpl["box_lo"] - pad, tpl["box_hi"] + pad
    shape = [math.ceil((hi[k] - lo[k]) / _DEFORM_GRID_MM) + 1 for k in range(3)]  # x, y, z
    noise = rng.standard_normal((3, shape[2], shape[1], shape[0]))  # component, z, y, x
    field = np.stack([ndi.gaussian_filter(c, sigma_mm / _DEFORM_GRID_MM, mode="reflect") for c in noise])
    magnitude = np.sqrt((field**2).sum(0))
    field *= max_disp / max(float(magnitude.max()), 1e-12)
    # minimum Jacobian determinant of x -> x + d(x) (a sanity figure: > 0 means no folding)
    grads = [np.gradient(field[c], _DEFORM_GRID_MM) for c in range(3)]  # grads[c][a]: d field_c / d axis a
    jac = np.empty((3, 3) + field.shape[1:])
    for c in range(3):  # component c is physical axis c (x, y, z); array axes are (z, y, x)
        for a in range(3):
            jac[c, a] = grads[c][2 - a] + (1.0 if c == a else 0.0)
    min_jac = float(np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1))).min())
    disp_img = sitk.GetImageFromArray(np.moveaxis(field, 0, -1).astype(np.float64), isVector=True)
    disp_img.SetOrigin([float(v) for v in lo])
    disp_img.SetSpacing([_DEFORM_GRID_MM] * 3)
    disp = sitk.DisplacementFieldTransform(disp_img)
    # ---- small affine about the brain centre ----
    angles = rng.uniform(-_ROT_MAX_DEG, _ROT_MAX_DEG, 3)
    scales = rng.uniform(1.0 - _SCALE_MAX, 1.0 + _SCALE_MAX, 3)
    trans = rng.uniform(-_TRANS_MAX_MM, _TRANS_MAX_MM, 3)
    rot = sitk.Euler3DTransform()
    rot.SetRotation(*[float(math.radians(a)) for a in angles])
    matrix = np.asarray(rot.GetMatrix()).reshape(3, 3) @ np.diag(scales)
    affine = sitk.AffineTransform(3)
    affine.SetCenter([float(c) for c in center])
    affine.SetMatrix([float(v) for v in matrix.ravel()])
    affine.SetTranslation([float(t) for t in trans])
    transform = sitk.CompositeTransform([affine, disp])
    info = {
        "deform_max_mm": round(max_disp, 3),
        "deform_sigma_mm": round(sigma_mm, 3),
        "deform_min_jacobian": round(min_jac, 3),
        "rotation_deg": [round(float(a), 3) for a in angles],
        "scale": [round(float(s), 4) for s in scales],
        "translation_mm": [round(float(t), 3) for t in trans],
    }
    return transform, info


def _bias_field(rng: np.random.Generator, shape: tuple[int, ...], strength: float) -> np.ndarray:
    """exp of a random polynomial of total degree _BIAS_DEGREE, scaled to span [1/(1+b), 1+b], b = strength."""
    coords = np.meshgrid(*[np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape], indexing="ij")
    poly = np.zeros(shape, np.float32)
    for i in range(_BIAS_DEGREE + 1):
        for j in range(_BIAS_DEGREE + 1 - i):
            for k in range(_BIAS_DEGREE + 1 - i - j):
                if i + j + k == 0:
                    continue
                poly += float(rng.standard_normal()) * coords[0] ** i * coords[1] ** j * coords[2] ** k
    pmin, pmax = float(poly.min()), float(poly.max())
    poly = (poly - (pmax + pmin) / 2.0) / max((pmax - pmin) / 2.0, 1e-12)
    return np.exp(poly * math.log1p(strength)).astype(np.float32)


def _make_subject(
    index: int, seed: int, structure: str, resolution_mm: float, vary_geometry: bool, strong_bias: bool = False
) -> tuple[sitk.Image, sitk.Image, dict[str, Any]]:
    """Generate subject ``index``: (image float32, label uint8 {0,1}, record of its random draws)."""
    rng = np.random.default_rng([int(seed), int(index)])  # own stream per subject
    tpl = _load_template()
    direction_name, spacing = _geometry(index, resolution_mm, vary_geometry)
    ref = _grid(spacing, _DIRECTIONS[direction_name])
    transform, info = _random_transform(rng)
    # (a) deformation, identical for image (linear, PSF-blurred source) and label (linear on the binary
    #     map then > 0.5, i.e. a nearest-like resampling with sub-voxel-smooth boundaries)
    img = sitk.Resample(_smoothed_t1(resolution_mm), ref, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    x = np.clip(sitk.GetArrayFromImage(img), 0.0, None)
    y = np.zeros(x.shape, np.uint8)
    # tissue: 1 = grey, 2 = white matter (white wins where both maps pass the threshold); else one class, 1
    for value, name in ((1, "gm"), (2, "wm")) if structure == "tissue" else ((1, structure),):
        lab = sitk.Resample(tpl["labels"][name], ref, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        y[sitk.GetArrayFromImage(lab) > 0.5] = value
    # scalar draws first, arrays from a child stream: a subject's parameters do not depend on the resolution
    strength = float(rng.uniform(*_BIAS_MAX))
    if strong_bias and index % 3 == 2:  # the same draw moved into the strong range: the other draws stay as they are
        strength = _STRONG_BIAS[0] + (strength - _BIAS_MAX[0]) / (_BIAS_MAX[1] - _BIAS_MAX[0]) * (
            _STRONG_BIAS[1] - _STRONG_BIAS[0])
    gamma = float(np.exp(rng.uniform(math.log(_GAMMA[0]), math.log(_GAMMA[1]))))
    noise_sigma = float(rng.uniform(*_NOISE_FRAC))
    scale = float(np.exp(rng.uniform(math.log(_SCALE_RANGE[0]), math.log(_SCALE_RANGE[1]))))
    offset = float(rng.uniform(*_OFFSET_FRAC)) * scale
    arr_rng = np.random.default_rng(rng.integers(0, 2**63))
    # (b) multiplicative smooth bias field
    x = x * _bias_field(arr_rng, x.shape, strength)
    # (c) contrast: gamma on the min-max normalised intensities
    x = (x - x.min()) / max(float(x.max() - x.min()), 1e-12)
    x = x**gamma
    # (d) Rician noise (magnitude of complex Gaussian noise), sigma a fraction of the [0, 1] range
    real = x + noise_sigma * arr_rng.standard_normal(x.shape, dtype=np.float32)
    imag = noise_sigma * arr_rng.standard_normal(x.shape, dtype=np.float32)
    x = np.sqrt(real * real + imag * imag)
    # ... then a random linear rescale to scanner-like units
    x = (offset + scale * x).astype(np.float32)

    out_img = sitk.GetImageFromArray(x)
    out_img.CopyInformation(ref)
    out_lab = sitk.GetImageFromArray(y)
    out_lab.CopyInformation(ref)
    info.update(
        {
            "direction": direction_name,
            "spacing_mm": [float(s) for s in spacing],
            "size_xyz": list(ref.GetSize()),
            "bias_strength": round(strength, 4),
            "gamma": round(gamma, 4),
            "noise_sigma_frac": round(noise_sigma, 4),
            "intensity_scale": round(scale, 3),
            "intensity_offset": round(offset, 3),
            "foreground_fraction": round(float((y > 0).mean()), 5),
        }
    )
    return out_img, out_lab, info


def _readme(params: dict[str, Any], roles: dict[str, list[str]]) -> str:
    structure = params["structure"]
    label_rule = {
        "brain": f"MNI152 T1 / max > {_BRAIN_THRESHOLD} (nilearn's load_mni152_brain_mask rule)",
        "gm": f"MNI152 grey-matter probability map > {_PROB_THRESHOLD}",
        "wm": f"MNI152 white-matter probability map > {_PROB_THRESHOLD}",
        "tissue": f"1 where the grey-matter, 2 where the white-matter probability map > {_PROB_THRESHOLD} (white "
                  "wins)",
        "ventricles": f"the two largest connected regions of MNI152 T1 / max < {_CSF_THRESHOLD} inside the brain "
                      f"mask and deeper than {_VENTRICLE_DEPTH_MM:g} mm below its surface (left and right lateral "
                      "ventricle)",
    }[structure]
    lines = [
        "MNSegment real-anatomy few-label task (generated by MNSegmentLib.data.realdata.make_t1_task)",
        "",
        "Source anatomy: the MNI152 ICBM 2009c nonlinear symmetric 1 mm T1 template (skull-stripped) and its",
        "grey/white-matter probability maps, as bundled in the nilearn package (read offline, not downloaded).",
        f"Target structure: {structure} ({STRUCTURES[structure]}); label = {label_rule}; uint8.",
        "",
        "Parameters:",
        *[f"  {k} = {v!r}" for k, v in params.items()],
        "",
        "Every subject is the template seen through its own random draws (numpy default_rng([seed, index])):",
        f"  (a) deformation: a smooth displacement field (Gaussian noise on a {_DEFORM_GRID_MM:g} mm grid,",
        f"      smoothed with sigma U{_DEFORM_SIGMA_MM} mm, scaled to a maximum displacement of",
        f"      U{_DEFORM_MAX_MM} mm) composed with an affine about the brain centre: rotation",
        f"      U(+-{_ROT_MAX_DEG:g}) deg and scaling U(1 +- {_SCALE_MAX:g}) per axis, translation",
        f"      U(+-{_TRANS_MAX_MM:g}) mm per axis. SimpleITK Resample straight onto the output grid: the image",
        f"      linearly from the T1 blurred with a Gaussian PSF (sigma = {_PSF_SIGMA_FRAC:g} x resolution), the",
        "      label linearly from the binary 1 mm mask then thresholded at 0.5 (same transform).",
        f"      Field of view: template brain bounding box + {_MARGIN_MM:g} mm (outside the template = 0).",
        f"  (b) bias field: exp of a random polynomial of total degree {_BIAS_DEGREE} in normalised voxel",
        f"      coordinates, spanning [1/(1+b), 1+b] with b ~ U{_BIAS_MAX}"
        + (f"; b ~ U{_STRONG_BIAS} for subjects 2 (mod 3) (strong_bias)." if params["strong_bias"] else "."),
        f"  (c) contrast: min-max normalisation to [0, 1], then gamma ~ log-U{_GAMMA}.",
        f"  (d) Rician noise: |x + n1 + i n2|, n ~ N(0, s^2), s ~ U{_NOISE_FRAC} of the [0, 1] range; then",
        f"      intensity = offset + scale * x with scale ~ log-U{_SCALE_RANGE}, offset ~ U{_OFFSET_FRAC} x scale.",
        f"Resolution: {params['resolution_mm']:g} mm isotropic, identity direction"
        + (
            "; vary_geometry cycles subjects through (identity, isotropic), (RAS+ direction diag(-1,-1,1),"
            f" third axis x{_ANISO_FACTOR:g}), (coronal permutation, second axis x{_ANISO_FACTOR:g})."
            if params["vary_geometry"]
            else "."
        ),
        "",
        "Roles (case ids):",
        *[f"  {role}: {', '.join(ids) if ids else '-'}" for role, ids in roles.items()],
        "Test cases' labels are held out in labelsTs/ (test.json);"
        + (
            " their images are also in the unlabeled pool (transductive protocol)."
            if params["test_in_unlabeled"]
            else " their images are not in the unlabeled pool."
        ),
        "Per-subject draws are recorded in task.json.",
        "",
    ]
    return "\n".join(lines)


def _existing_task(out_dir: Path, params: dict[str, Any]) -> Path | None:
    """datalist.json of a complete task in ``out_dir`` made with ``params``, else None."""
    try:
        meta = json.loads((out_dir / "task.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("params") != params:
        return None
    if not all((out_dir / f).is_file() for f in meta.get("files", [])):
        return None
    datalist = out_dir / "datalist.json"
    return datalist if datalist.is_file() else None


def make_t1_task(
    out_dir: str | Path,
    n_labeled: int = 2,
    n_unlabeled: int = 4,
    n_test: int = 4,
    structure: str = "brain",
    seed: int = 0,
    resolution_mm: float = 2.0,
    test_in_unlabeled: bool = True,
    vary_geometry: bool = False,
    strong_bias: bool = False,
) -> Path:
    """Write a few-label segmentation task made from the real MNI152 T1 template; return its datalist.json.

    Subjects are random smooth deformations of the template with a random bias field, contrast and Rician
    noise (see the module docstring and the README.txt written with the task). Case ids ``s000, s001, ...``
    run over labeled, then unlabeled, then test subjects; subject ``i`` depends only on ``(seed, i)`` and the
    parameters, so the output is deterministic.

    Args:
        out_dir: task folder. Written atomically (built beside it, then renamed). If it already holds a
            complete task made with the same parameters it is returned as is; a task made with other
            parameters is replaced; any other non-empty folder raises ``FileExistsError``.
        n_labeled: subjects with a label in ``datalist.json["labeled"]`` (>= 1).
        n_unlabeled: subjects without a label in ``datalist.json["unlabeled"]`` (>= 0).
        n_test: held-out subjects in ``test.json`` (>= 0), ground truth in ``labelsTs/``.
        structure: ``"brain"``, ``"gm"`` (grey matter), ``"wm"`` (white matter), ``"tissue"`` (two classes:
            1 grey, 2 white matter) or ``"ventricles"`` (the lateral ventricles: small, deep, dark).
        seed: random seed.
        resolution_mm: output voxel size in mm (2 mm: ~ 85x103x90 voxels; 3 mm: ~ 57x69x60).
        test_in_unlabeled: also list the test images in ``"unlabeled"`` (the transductive protocol of the
            reference method).
        vary_geometry: give subjects 1, 2 (mod 3) a non-identity direction and one axis 1.5x coarser, to
            exercise geometry handling.
        strong_bias: give subjects 2 (mod 3) a strong bias field (b ~ U(1, 2) instead of U(0.1, 0.2)): a
            pool with a kind of volume its first two subjects do not show.

    Returns:
        Path of ``out_dir/datalist.json`` (paths inside are relative to its folder).

    Raises:
        ImportError: nilearn or its bundled template files are unavailable (``pip install "mnsegment[demo]"``).
        ValueError: invalid arguments.
        FileExistsError: ``out_dir`` is a non-empty folder that is not a task made by this function.
    """
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {sorted(STRUCTURES)}, got {structure!r}")
    if int(n_labeled) < 1 or int(n_unlabeled) < 0 or int(n_test) < 0:
        raise ValueError("need n_labeled >= 1, n_unlabeled >= 0 and n_test >= 0")
    if not (0.5 <= float(resolution_mm) <= 8.0):
        raise ValueError(f"resolution_mm must be within [0.5, 8] mm, got {resolution_mm}")
    out_dir = Path(out_dir).expanduser().absolute()
    params = {
        "generator_version": GENERATOR_VERSION,
        "n_labeled": int(n_labeled),
        "n_unlabeled": int(n_unlabeled),
        "n_test": int(n_test),
        "structure": structure,
        "seed": int(seed),
        "resolution_mm": float(resolution_mm),
        "test_in_unlabeled": bool(test_in_unlabeled),
        "vary_geometry": bool(vary_geometry),
        "strong_bias": bool(strong_bias),
    }
    found = _existing_task(out_dir, params)
    if found is not None:
        return found
    foreign = out_dir.exists() and not (out_dir / "task.json").is_file()
    if foreign and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not a task made by make_t1_task; not overwriting")
    _template_paths()  # ImportError early, before creating anything

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (tmp / sub).mkdir()
        labeled, unlabeled, test, subjects, files = [], [], [], [], []
        roles: dict[str, list[str]] = {"labeled": [], "unlabeled": [], "test": []}
        n_total = params["n_labeled"] + params["n_unlabeled"] + params["n_test"]
        for index in range(n_total):
            case = f"s{index:03d}"
            role = (
                "labeled"
                if index < params["n_labeled"]
                else "unlabeled"
                if index < params["n_labeled"] + params["n_unlabeled"]
                else "test"
            )
            img, lab, info = _make_subject(
                index, params["seed"], structure, params["resolution_mm"], params["vary_geometry"],
                params["strong_bias"]
            )
            img_rel = f"{'imagesTs' if role == 'test' else 'imagesTr'}/{case}.nii.gz"
            lab_rel = f"{'labelsTs' if role == 'test' else 'labelsTr'}/{case}.nii.gz"
            sitk.WriteImage(img, str(tmp / img_rel), useCompression=True)
            files.append(img_rel)
            if role != "unlabeled":  # unlabeled subjects' ground truth is not written at all
                sitk.WriteImage(lab, str(tmp / lab_rel), useCompression=True)
                files.append(lab_rel)
            if role == "labeled":
                labeled.append({"image": img_rel, "label": lab_rel})
            elif role == "unlabeled":
                unlabeled.append({"image": img_rel})
            else:
                test.append({"image": img_rel, "label": lab_rel})
            roles[role].append(case)
            subjects.append({"case": case, "role": role, **info})
        if params["test_in_unlabeled"]:
            unlabeled.extend({"image": t["image"]} for t in test)
        datalist = {"labeled": labeled, "unlabeled": unlabeled, "classes": CLASSES[structure]}
        (tmp / "datalist.json").write_text(json.dumps(datalist, indent=1) + "\n")
        (tmp / "test.json").write_text(json.dumps({"test": test}, indent=1) + "\n")
        (tmp / "README.txt").write_text(_readme(params, roles))
        files += ["datalist.json", "test.json", "README.txt"]
        meta = {"params": params, "files": files, "subjects": subjects}
        (tmp / "task.json").write_text(json.dumps(meta, indent=1) + "\n")  # last: marks the task complete
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700

        old = None
        if out_dir.exists():  # an empty folder or a task with other parameters: move it aside first
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            out_dir.rename(old / "task")
        try:
            tmp.rename(out_dir)
        except OSError:
            found = _existing_task(out_dir, params)  # another process finished the same task first
            if found is None:
                raise
            return found
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / "datalist.json"
