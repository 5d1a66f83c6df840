"""Random training patches: foreground-biased crops with scale jitter and intensity augmentation.

Crops stay inside the volume wherever the volume is larger than the crop (a foreground centre near the border
gives an off-centre crop, as MONAI's ``RandCropByPosNegLabel`` does), so padding only happens along axes where
the volume is smaller than the crop. There, image *and* label continue their border voxel (edge padding): every
padded voxel is a copy of a real (image, label) pair, so the label never contradicts the image. (Zero labels
next to edge-padded intensities would call a foreground-looking voxel background wherever the structure touches
the border.) Prediction pads the same way (:func:`inference.predict_array`).

Scale jitter resamples the image trilinearly and the label by ``nearest-exact``; both are centre-aligned
(``align_corners=False`` geometry), so labels stay on their voxels. (Plain ``nearest`` is not centre-aligned and
shifts labels by up to half an input voxel.)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandScaleIntensity,
    RandShiftIntensity,
)

_MAX_COORDS = 20000  # foreground coordinates kept per class and case: enough to sample from, small in memory


def foreground_coords(mask: np.ndarray | None, rng: np.random.Generator) -> list[np.ndarray]:
    """Per foreground class, up to ``_MAX_COORDS`` voxel coordinates (int32, (n, 3)); empty classes dropped.

    Precomputed once per (pseudo-)mask so choosing a crop centre is O(1), instead of scanning the volume
    for every patch as a generic crop transform would.
    """
    if mask is None:
        return []
    coords = []
    for value in np.unique(mask):
        if value == 0:
            continue
        where = np.argwhere(mask == value).astype(np.int32)
        if len(where) > _MAX_COORDS:
            where = where[rng.choice(len(where), _MAX_COORDS, replace=False)]
        coords.append(where)
    return coords


def intensity_augmentation() -> Compose:
    """Applied to every patch image (labels untouched); MONAI array transforms, seeded per step."""
    return Compose([
        RandScaleIntensity(factors=0.1, prob=0.5),
        RandShiftIntensity(offsets=0.1, prob=0.5),
        RandAdjustContrast(prob=0.3, gamma=(0.7, 1.5)),
        RandGaussianSmooth(sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.15),
        RandGaussianNoise(prob=0.3, std=0.05),
    ])


def strong_augmentation() -> Compose:
    """The student-only extra perturbation of unlabeled patches (``teacher.student_view=strong``): always a
    contrast change and noise, sometimes blur, each stronger than :func:`intensity_augmentation`'s."""
    return Compose([
        RandAdjustContrast(prob=1.0, gamma=(0.5, 2.0)),
        RandGaussianSmooth(sigma_x=(0.5, 1.5), sigma_y=(0.5, 1.5), sigma_z=(0.5, 1.5), prob=0.3),
        RandGaussianNoise(prob=1.0, std=0.1),
    ])


class PatchSampler:
    """Draws patches from preprocessed volumes (in memory or memory-mapped from the cache)."""

    def __init__(self, images: list[np.ndarray], labels: list[np.ndarray | None], patch_size: list[int],
                 foreground_fraction: float, scale_jitter: float, intensity_aug: bool):
        self.images = images
        self.labels = labels
        self.patch_size = np.array(patch_size)
        self.foreground_fraction = foreground_fraction
        self.scale_jitter = scale_jitter
        self.augment = intensity_augmentation() if intensity_aug else None
        self.strong = strong_augmentation()
        self.coords = [foreground_coords(label, np.random.default_rng(0)) for label in labels]

    def __len__(self) -> int:
        return len(self.images)

    def set_masks(self, masks: list[np.ndarray]) -> None:
        """Crop-centre masks for volumes without labels (the latest hard pseudo-masks)."""
        self.coords = [foreground_coords(mask, np.random.default_rng(0)) for mask in masks]

    def _start(self, index: int, size: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """First voxel of a crop of ``size``: inside the volume along every axis where the volume is at least
        as large as the crop, the volume centred in the crop along the others."""
        shape = np.array(self.images[index].shape)
        coords = self.coords[index]
        if coords and rng.random() < self.foreground_fraction:
            chosen = coords[rng.integers(len(coords))]  # classes equally likely: small structures get seen
            start = chosen[rng.integers(len(chosen))] - size // 2
        else:  # every crop position inside the volume equally likely
            start = np.array([rng.integers(max(s - c, 0) + 1) for s, c in zip(shape, size)])
        return np.where(shape >= size, np.clip(start, 0, np.maximum(shape - size, 0)), (shape - size) // 2)

    @staticmethod
    def _crop(array: np.ndarray, start: np.ndarray, size: np.ndarray) -> np.ndarray:
        """A copy of ``array[start:start + size]``, edge-padded where it extends beyond the volume."""
        lo = np.maximum(start, 0)
        hi = np.minimum(start + size, array.shape)
        patch = np.array(array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])  # a copy: the cache is read-only
        pad = [(int(a), int(b)) for a, b in zip(lo - start, start + size - hi)]
        if any(a or b for a, b in pad):  # only along axes where the volume is smaller than the crop
            patch = np.pad(patch, pad, mode="edge")
        return patch

    def crop(self, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``n`` patches (n, 1, X, Y, Z) float, before intensity augmentation, and, for labeled volumes, their
        labels (n, 1, X, Y, Z) long."""
        if n == 0:
            return torch.zeros((0, 1, *self.patch_size)), None
        images, labels = [], []
        size = tuple(int(v) for v in self.patch_size)
        for _ in range(n):
            index = int(rng.integers(len(self.images)))
            scale = 1 + rng.uniform(-self.scale_jitter, self.scale_jitter)
            crop = np.maximum(np.round(self.patch_size * scale).astype(int), 1)
            start = self._start(index, crop, rng)
            image = torch.from_numpy(self._crop(self.images[index], start, crop))[None, None]
            images.append(F.interpolate(image, size=size, mode="trilinear", align_corners=False)[0]
                          if tuple(crop) != size else image[0])
            if self.labels[index] is not None:
                label = torch.from_numpy(self._crop(self.labels[index], start, crop))[None, None]
                labels.append(F.interpolate(label.float(), size=size, mode="nearest-exact")[0].long()
                              if tuple(crop) != size else label[0].long())
        return torch.stack(images).float(), (torch.stack(labels) if labels else None)

    def augment_batch(self, batch: torch.Tensor, rng: np.random.Generator, strong: bool = False) -> torch.Tensor:
        """Intensity augmentation of every patch (a no-op when disabled or for an empty batch); ``strong``: the
        student-only extra perturbation instead (:func:`strong_augmentation`, applied even without
        ``sampling.intensity_aug``)."""
        augment = self.strong if strong else self.augment
        if augment is None or not len(batch):
            return batch
        augment.set_random_state(seed=int(rng.integers(2**31)))
        return torch.stack([torch.as_tensor(augment(patch)) for patch in batch]).float()

    def sample(self, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cropped and augmented patches with their labels (see :meth:`crop`)."""
        images, labels = self.crop(n, rng)
        return self.augment_batch(images, rng), labels
