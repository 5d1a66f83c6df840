"""Sliding-window prediction with the 3D model, the 2D model slice by slice, or both; written on the input grid."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference
from monai.transforms import KeepLargestConnectedComponent

from MNSegmentLib.data.io import case_name, image_from_xyz, read_image, write_image
from MNSegmentLib.data.preprocess import Plan, preprocess_image
from MNSegmentLib.models.slicing import apply_2d


def predictor(network: str, model2d: torch.nn.Module | None, model3d: torch.nn.Module | None,
              axes_2d: Sequence[int], chunk: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function patch batch -> class probabilities for ``network`` in 3d | 2d | ensemble: the mean over the
    views it has. The 2D network has a view per slice direction in ``axes_2d`` (:func:`slicing.network_axes`: one,
    or three for a network trained along three), the 3D network one; so in the ensemble the 2D network weighs
    1 : 1 against the 3D network when it slices along one axis and 3 : 1 along three (:func:`ensemble_mean`)."""

    def probabilities(x: torch.Tensor) -> torch.Tensor:
        if network != "2d":
            p3d = torch.softmax(model3d(x).float(), 1)
            if network == "3d":
                return p3d
        p2d = sum(torch.softmax(apply_2d(model2d, x, axis, chunk).float(), 1) for axis in axes_2d) / len(axes_2d)
        return p2d if network == "2d" else ensemble_mean(p2d, p3d, len(axes_2d))

    return probabilities


def ensemble_mean(p2d: torch.Tensor, p3d: torch.Tensor, views_2d: int) -> torch.Tensor:
    """The ensemble's probabilities, every view one vote, from the 2D network's (the mean of its ``views_2d`` slice
    directions) and the 3D network's: the one definition, for :func:`predictor` and the validation choice."""
    return (views_2d * p2d + p3d) / (views_2d + 1)


@torch.no_grad()
def predict_array(array: np.ndarray, predict: Callable[[torch.Tensor], torch.Tensor], patch_size: list[int],
                  device: torch.device, overlap: float = 0.5, sw_batch_size: int = 2, tta: bool = False,
                  autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Class probabilities (K, X, Y, Z) on the CPU for a preprocessed (X, Y, Z) array.

    Overlapping windows are blended with Gaussian weights; with ``tta``, also averaged over flips of each axis.
    Windows stay inside the volume; along an axis where the volume is smaller than the patch, it is edge-padded,
    as training crops are (:mod:`sampling`; zero would be average tissue in a z-scored MR).
    """
    x = torch.tensor(np.asarray(array, dtype=np.float32))[None, None]  # a copy: cached arrays are read-only
    flips = [()] + ([(2,), (3,), (4,)] if tta else [])
    total = None
    for dims in flips:
        inputs = torch.flip(x, dims) if dims else x
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            # Windows run on ``device``; the full-volume accumulator stays on the CPU for large scans.
            out = sliding_window_inference(inputs, patch_size, sw_batch_size, predict, overlap=overlap,
                                           mode="gaussian", padding_mode="replicate", sw_device=device,
                                           device="cpu")
        out = torch.flip(out.float(), dims) if dims else out.float()
        total = out if total is None else total + out
    return (total / len(flips))[0]


def to_input_grid(probabilities: torch.Tensor, geometry: sitk.Image, original: sitk.Image) -> np.ndarray:
    """Resamples class probabilities from the preprocessed grid onto ``original``'s grid; returns class indices
    in (x, y, z) order of the original image."""
    best, argmax = None, None
    for k, channel in enumerate(probabilities.numpy()):
        moved = sitk.Resample(image_from_xyz(channel.astype(np.float32), like=geometry), original,
                              sitk.Transform(), sitk.sitkLinear, 0.0 if k else 1.0, sitk.sitkFloat32)
        values = sitk.GetArrayViewFromImage(moved)
        if best is None:
            best, argmax = values.copy(), np.zeros(values.shape, np.uint8)
        else:
            better = values > best
            best[better] = values[better]
            argmax[better] = k
    return argmax.transpose(2, 1, 0)


def label_image(indices: np.ndarray, plan: Plan, original: sitk.Image, largest_component: bool) -> sitk.Image:
    if largest_component:
        keep = KeepLargestConnectedComponent(applied_labels=list(range(1, len(plan.label_values))),
                                             independent=True)
        indices = np.asarray(keep(torch.from_numpy(indices)[None]))[0].astype(np.uint8)
    values = np.array(plan.label_values)[indices]
    dtype = np.uint8 if max(plan.label_values) < 256 else np.uint16
    image = image_from_xyz(values.astype(dtype))
    image.CopyInformation(original)
    return image


def predict_files(paths: list[Path], output_dir: Path, plan: Plan, predict: Callable, config: dict,
                  device: torch.device, autocast_dtype: torch.dtype | None = None,
                  on_case: Callable[[int, Path, Path], None] | None = None) -> list[Path]:
    """Predicts each file and writes ``output_dir/<name>.nii.gz`` on the input's exact grid."""
    output_dir.mkdir(parents=True, exist_ok=True)
    inference = config["inference"]
    written = []
    for i, path in enumerate(paths):
        original = read_image(path)
        array, geometry = preprocess_image(original, plan)
        probabilities = predict_array(array, predict, config["sampling"]["patch_size"], device,
                                      inference["overlap"], inference["sw_batch_size"], inference["tta"],
                                      autocast_dtype)
        indices = to_input_grid(probabilities, geometry, original)
        out = write_image(label_image(indices, plan, original, inference["largest_component"]),
                          output_dir / f"{case_name(path)}.nii.gz")
        written.append(out)
        if on_case:
            on_case(i, path, out)
    return written
