"""Small synthetic datasets for the demo and the tests: blobs in noisy volumes, with label maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from MNSegmentLib.data.io import write_json_atomic


def blob_volume(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An MR-like volume: a smooth 'body', a brighter ellipsoidal 'organ' (label 1) of random size, position
    and orientation, a distracting dark sphere, a bias field and noise. Arrays in (x, y, z) order."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), -1)
    centre = np.array(shape) * rng.uniform(0.35, 0.65, 3)
    radii = np.array(shape) * rng.uniform(0.12, 0.22, 3)
    angle = rng.uniform(0, np.pi)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    local = (grid - centre) @ rotation
    organ = (((local / radii) ** 2).sum(-1) <= 1.0)
    body = (((grid - np.array(shape) / 2) / (np.array(shape) * 0.46)) ** 2).sum(-1) <= 1.0
    distractor_c = np.array(shape) * rng.uniform(0.25, 0.75, 3)
    distractor = (((grid - distractor_c) / (np.array(shape) * 0.08)) ** 2).sum(-1) <= 1.0
    image = 0.2 + 0.8 * body + 0.9 * organ - 0.5 * (distractor & ~organ)
    image = gaussian_filter(image.astype(np.float32), 1.0)
    bias = 1 + 0.15 * np.sin(grid[..., 0] / shape[0] * np.pi * rng.uniform(0.5, 2))
    image = image * bias + rng.normal(0, 0.12, shape)
    return (image * 400).astype(np.float32), organ.astype(np.uint8)


def make_blob_dataset(out_dir: str | Path, n_labeled: int = 3, n_unlabeled: int = 5, shape=(40, 40, 32),
                      spacing=(1.5, 1.5, 2.0), seed: int = 0) -> Path:
    """Writes images/, labels/ and ``datalist.json`` (all non-labeled cases listed as unlabeled, their labels
    kept as hidden ground truth in labels/). Returns the datalist path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labeled, unlabeled = [], []
    for i in range(n_labeled + n_unlabeled):
        image, label = blob_volume(shape, rng)
        for array, folder in ((image, "images"), (label, "labels")):
            itk = sitk.GetImageFromArray(array.transpose(2, 1, 0))
            itk.SetSpacing(spacing)
            sitk.WriteImage(itk, str(out / folder / f"case{i:02d}.nii.gz"))
        entry = {"image": f"images/case{i:02d}.nii.gz"}
        if i < n_labeled:
            labeled.append({**entry, "label": f"labels/case{i:02d}.nii.gz"})
        else:
            unlabeled.append(entry)
    return write_json_atomic(out / "datalist.json",
                             {"labeled": labeled, "unlabeled": unlabeled, "classes": {"1": "organ"}})
