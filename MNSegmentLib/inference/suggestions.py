"""Which unlabeled volume to label next: where the 2D and the 3D networks disagree, and the ensemble is unsure.

M&N already has two different networks looking at every unlabeled volume; where they disagree, one of them is
wrong, so a label there teaches the most. Each volume is predicted once by each network (the engine's own
sliding-window inference, :mod:`inference`) and scored on the preprocessed grid the networks work on:

- ``disagreement`` = 1 − Dice between the two networks' hard predictions (foreground classes, averaged);
- ``uncertainty`` = the ensemble's (mean of both networks' probabilities) entropy, divided by log(classes) so it
  lies in [0, 1], averaged over the voxels that either network calls foreground (0 when neither finds any);
- ``score`` = (disagreement + uncertainty) / 2, in [0, 1]; the volumes are ranked by it, highest first.

The voxel-wise disagreement map is the total-variation distance between the two networks' class probabilities,
½ Σ_k |p2D_k − p3D_k| (0 where they agree, 1 where each is sure of a different class). It is written on each
input image's own grid in percent (``<name>_disagreement.nii.gz``, uint8 0-100: small, and a Slicer overlay as
is), and the slice with the highest mean disagreement (axis and index of the input grid) is reported with a
point in it (the disagreement-weighted centre of that slice, in LPS and RAS millimetres) to jump to.

A volume both networks miss with confidence scores low: the score finds doubt, not every error.

At the pseudo-mask refreshes during training only the 3D network predicts the unlabeled volumes (the 2D
network's prediction is never made there), so scores are not free at that point; they are computed once after
training (``train.suggest``) and by ``mnsegment suggest``.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from MNSegmentLib.data.io import array_xyz, case_name, image_from_xyz, read_image, write_image, write_json_atomic
from MNSegmentLib.data.preprocess import Plan, preprocess_image
from MNSegmentLib.errors import InputError
from MNSegmentLib.evaluation.network_choice import dice_per_class
from MNSegmentLib.inference.predict import predict_array, predictor

SUGGESTIONS_DIR = "suggestions"
SUGGESTIONS_FILE = "suggestions.json"
MAP_SUFFIX = "_disagreement.nii.gz"
SCORE_DEFINITION = ("score = (disagreement + uncertainty) / 2; disagreement = 1 - Dice between the 2D and 3D "
                    "networks' foreground predictions; uncertainty = mean normalised entropy of the ensemble over "
                    "the voxels either network calls foreground")
AXIS_NAMES = ("I", "J", "K")  # index axes of the input image (x, y, z of its voxel array)


@dataclass
class VolumeScores:
    disagreement: float
    uncertainty: float
    score: float


def score_probabilities(p2d: torch.Tensor, p3d: torch.Tensor) -> tuple[VolumeScores, np.ndarray]:
    """Scores of one volume from both networks' class probabilities (K, X, Y, Z), and the disagreement map."""
    num_classes = p2d.shape[0]
    hard2d, hard3d = p2d.argmax(0), p3d.argmax(0)
    disagreement = 1.0 - float(np.mean(dice_per_class(hard2d, hard3d.numpy(), num_classes)))
    ensemble = (p2d + p3d) / 2
    entropy = -(ensemble * torch.log(ensemble.clamp_min(1e-8))).sum(0) / math.log(num_classes)
    union = (hard2d > 0) | (hard3d > 0)
    uncertainty = float(entropy[union].mean()) if union.any() else 0.0
    voxel_map = 0.5 * (p2d - p3d).abs().sum(0)
    return VolumeScores(disagreement, uncertainty, (disagreement + uncertainty) / 2), voxel_map.numpy()


def most_disagreeing_slice(voxel_map: np.ndarray, image: sitk.Image) -> dict:
    """The slice (any index axis) with the highest mean disagreement, and its disagreement-weighted centre."""
    best = None
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        means = voxel_map.mean(axis=others)
        index = int(means.argmax())
        if best is None or means[index] > best[2]:
            best = (axis, index, float(means[index]))
    axis, index, mean = best
    plane = np.take(voxel_map, index, axis=axis)
    weights = plane.sum()
    coords = np.indices(plane.shape).reshape(2, -1)
    centre = (coords @ plane.ravel() / weights) if weights > 0 else (np.array(plane.shape) - 1) / 2
    continuous = np.insert(centre.astype(float), axis, float(index))
    lps = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in continuous])
    return {"axis": axis, "axis_name": AXIS_NAMES[axis], "index": index, "mean_disagreement": round(mean, 4),
            "point_lps": [round(v, 3) for v in lps], "point_ras": [round(-lps[0], 3), round(-lps[1], 3),
                                                                   round(lps[2], 3)]}


def to_input_grid_map(voxel_map: np.ndarray, geometry: sitk.Image, original: sitk.Image) -> np.ndarray:
    """The disagreement map resampled (linearly) onto ``original``'s grid, (x, y, z) order."""
    moved = sitk.Resample(image_from_xyz(voxel_map.astype(np.float32), like=geometry), original, sitk.Transform(),
                          sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return array_xyz(moved)


class Scorer:
    """Scores preprocessed volumes with a run's two networks, as its configuration predicts (patch, overlap,
    TTA)."""

    def __init__(self, model2d: torch.nn.Module, model3d: torch.nn.Module, config: dict, axes_2d: Sequence[int],
                 device: torch.device, autocast_dtype: torch.dtype | None = None):
        """``axes_2d``: the 2D network's slice directions (:func:`slicing.network_axes`)."""
        chunk = config["model2d"]["chunk_slices"]
        self.predict = {net: predictor(net, model2d, model3d, axes_2d, chunk) for net in ("2d", "3d")}
        self.models = (model2d, model3d)
        self.config, self.device, self.autocast_dtype = config, device, autocast_dtype

    def probabilities(self, array: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        inference = self.config["inference"]
        training = [m.training for m in self.models]
        for model in self.models:
            model.eval()
        try:
            return tuple(predict_array(array, self.predict[net], self.config["sampling"]["patch_size"], self.device,
                                       inference["overlap"], inference["sw_batch_size"], inference["tta"],
                                       self.autocast_dtype) for net in ("2d", "3d"))
        finally:
            for model, was in zip(self.models, training):
                model.train(was)


def suggest_files(paths: list[Path], output_dir: Path, plan: Plan, scorer: Scorer, run_dir: Path | None = None,
                  on_case: Callable[[int, Path, dict], None] | None = None) -> dict:
    """Scores every image, writes its disagreement map and ``suggestions.json`` into ``output_dir``; returns
    that record (``volumes`` ranked, highest score first).

    Everything is written into a hidden sibling folder that replaces ``output_dir`` at the end: an error or a
    cancel (raised by ``on_case``) leaves the previous suggestions, or none, never a half-written set.
    """
    started = time.monotonic()
    output_dir = Path(output_dir).absolute()
    partial = output_dir.parent / f".{output_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        volumes = []
        for i, path in enumerate(paths):
            original = read_image(path)
            array, geometry = preprocess_image(original, plan)
            scores, voxel_map = score_probabilities(*scorer.probabilities(array))
            on_input_grid = to_input_grid_map(voxel_map, geometry, original)
            percent = image_from_xyz(np.clip(np.round(on_input_grid * 100), 0, 100).astype(np.uint8))
            percent.CopyInformation(original)
            name = case_name(path)
            write_image(percent, partial / f"{name}{MAP_SUFFIX}")
            volume = {"name": name, "image": str(path), **{k: round(v, 4) for k, v in asdict(scores).items()},
                      "slice": most_disagreeing_slice(on_input_grid, original),
                      "map": f"{name}{MAP_SUFFIX}"}  # relative to suggestions.json: the folder may move
            volumes.append(volume)
            if on_case:
                on_case(i, path, volume)
        volumes.sort(key=lambda v: -v["score"])
        for rank, volume in enumerate(volumes, start=1):
            volume["rank"] = rank
        record = {"run": str(run_dir) if run_dir else None, "definition": SCORE_DEFINITION,
                  "seconds": round(time.monotonic() - started, 2), "volumes": volumes}
        write_json_atomic(partial / SUGGESTIONS_FILE, record)
        _replace_folder(partial, output_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return record


def check_output(output_dir: Path) -> None:
    """Suggestions replace a whole folder: refuse one that holds anything else, before any work is done."""
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or (any(output_dir.iterdir())
                                                            and not (output_dir / SUGGESTIONS_FILE).exists())):
        raise InputError(f"{output_dir} exists and holds something other than suggestions; choose a new or empty "
                         "--output folder")


def with_absolute_maps(record: dict, output_dir: Path) -> list[dict]:
    """The ranked volumes with each map's absolute path (for the ``done`` event and the Slicer module)."""
    return [{**v, "map": str(Path(output_dir).absolute() / v["map"])} for v in record["volumes"]]


def _replace_folder(new: Path, target: Path) -> None:
    """Puts ``new`` in ``target``'s place; the old folder is moved aside first and removed after."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def ranked_table(record: dict) -> str:
    """The printed table: rank, volume, score (disagreement, uncertainty), most-disagreeing slice."""
    lines = [f"{'rank':>4}  {'volume':<28}{'score':>7}{'1-Dice':>8}{'entropy':>9}  most disagreeing slice"]
    for v in record["volumes"]:
        s = v["slice"]
        lines.append(f"{v['rank']:>4}  {v['name']:<28}{v['score']:>7.3f}{v['disagreement']:>8.3f}"
                     f"{v['uncertainty']:>9.3f}  {s['axis_name']}={s['index']}")
    return "\n".join(lines)
