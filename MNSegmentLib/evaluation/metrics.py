"""Dice, Jaccard, HD95 and ASD per class, distances in millimetres (MONAI metrics)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
)

from MNSegmentLib.data.io import IMAGE_SUFFIXES, array_xyz, case_name, read_image
from MNSegmentLib.errors import InputError


def _one_hot(values: np.ndarray, classes: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.stack([values == c for c in classes]))[None].float()


def case_metrics(prediction: sitk.Image, reference: sitk.Image, name: str = "") -> dict[int, dict[str, float]]:
    """{label value: {dice, jaccard, hd95_mm, asd_mm}} for every foreground value in either image."""
    if prediction.GetSize() != reference.GetSize() or not np.allclose(
            prediction.GetSpacing(), reference.GetSpacing(), rtol=1e-3):
        raise InputError(f"{name}: prediction and reference are on different grids (size {prediction.GetSize()} vs "
                         f"{reference.GetSize()}); compare label maps of the same image")
    pred = array_xyz(prediction, dtype=np.int64)
    ref = array_xyz(reference, dtype=np.int64)
    classes = sorted(int(v) for v in set(np.unique(pred)) | set(np.unique(ref)) if v != 0)
    if not classes:
        return {}
    p, r = _one_hot(pred, classes), _one_hot(ref, classes)
    spacing = list(prediction.GetSpacing())
    dice = compute_dice(p, r, include_background=True, ignore_empty=False)[0]
    iou = compute_iou(p, r, include_background=True, ignore_empty=False)[0]
    hd95 = compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=spacing)[0]
    asd = compute_average_surface_distance(p, r, include_background=True, symmetric=True, spacing=spacing)[0]
    out = {}
    for i, value in enumerate(classes):
        out[value] = {"dice": float(dice[i]), "jaccard": float(iou[i]),
                      "hd95_mm": _finite(hd95[i]), "asd_mm": _finite(asd[i])}
    return out


def _finite(value: torch.Tensor) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None  # one of the masks is empty: no surface distance


def image_files(folder: Path) -> dict[str, Path]:
    return {case_name(p): p for p in sorted(folder.iterdir())
            if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)}


def pair_files(prediction: Path, reference: Path) -> list[tuple[str, Path, Path]]:
    """Files, or folders matched by file name (without extension)."""
    if prediction.is_file() and reference.is_file():
        return [(case_name(reference), prediction, reference)]
    if prediction.is_dir() and reference.is_dir():
        preds, refs = image_files(prediction), image_files(reference)
        common = sorted(set(preds) & set(refs))
        if not common:
            raise InputError(f"no file names in common between {prediction} and {reference}; predictions are "
                             "matched to references by file name without extension")
        return [(name, preds[name], refs[name]) for name in common]
    for path in (prediction, reference):
        if not path.exists():
            raise InputError(f"{path}: not found")
    raise InputError(f"--prediction {prediction} and --reference {reference} must both be files or both folders")


def evaluate(prediction: str | Path, reference: str | Path) -> dict:
    """Per-case and mean metrics per class; cases with an empty class get null distances."""
    prediction, reference = Path(prediction), Path(reference)
    cases = {}
    for name, pred_path, ref_path in pair_files(prediction, reference):
        cases[name] = case_metrics(read_image(pred_path), read_image(ref_path), name)
    summary: dict[str, dict[str, float | None]] = {}
    values = sorted({v for per_case in cases.values() for v in per_case})
    for value in values:
        summary[str(value)] = {}
        for metric in ("dice", "jaccard", "hd95_mm", "asd_mm"):
            found = [c[value][metric] for c in cases.values() if value in c and c[value][metric] is not None]
            summary[str(value)][metric] = float(np.mean(found)) if found else None
    return {"cases": {n: {str(v): m for v, m in c.items()} for n, c in cases.items()}, "mean": summary}
