"""Which network's output the user gets: 3D, 2D or their ensemble, chosen on the validation cases after training.

Each candidate predicts every validation case through the engine's own prediction path (sliding window on the
preprocessed arrays, as in-training validation does); its score is the foreground Dice per class, averaged over
classes and cases. The choice and its evidence are written to ``model.json`` in the run folder, which
``mnsegment predict`` follows unless ``--network`` is given.

Without validation cases the preset's network is used, except that an ensemble is not made with a network that
has not learnt the structure: one whose running Dice on the labeled training patches is below
``teachers.FAILED_FIT_SHARE`` of the other's or below ``teachers.LEARNT_FIT`` (a 2D network that segments nothing of
a small structure after a short training dragged the ensemble's Dice from 0.45, the 3D network's, to 0.10 in
docs/BENCHMARKS.md section 13b). When neither network has learnt it, the one that fits the labeled patches better is
used alone, and the reason says to train longer: averaging in a network that finds nothing only removes structure.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_dice

from MNSegmentLib.errors import Cancelled
from MNSegmentLib.inference.predict import ensemble_mean, predict_array, predictor
from MNSegmentLib.training.teachers import LEARNT_FIT, LabeledFit, other_network

CANDIDATES = ("3d", "2d", "ensemble")
MODEL_CHOICE = "model.json"
NO_VALIDATION = "no validation cases"
VALIDATION_STOPPED = "the validation was stopped before its end"


def dice_per_class(prediction: torch.Tensor, label: np.ndarray, num_classes: int) -> list[float]:
    """Foreground Dice of each class between class-index volumes (1 when both lack the class)."""
    classes = torch.arange(1, num_classes)[:, None, None, None]
    p = (prediction[None] == classes)[None].float()
    t = (torch.from_numpy(np.asarray(label, dtype=np.int64))[None] == classes)[None].float()
    return compute_dice(p, t, include_background=True, ignore_empty=False)[0].tolist()


def validation_scores(model2d: torch.nn.Module, model3d: torch.nn.Module,
                      cases: list[tuple[np.ndarray, np.ndarray]], config: dict, axes_2d: Sequence[int],
                      num_classes: int, device: torch.device, autocast_dtype: torch.dtype | None = None,
                      stop: threading.Event | None = None) -> dict[str, float]:
    """Mean foreground Dice of each candidate over ``cases`` (preprocessed image and label arrays); raises
    Cancelled between two cases once ``stop`` is set."""
    inference = config["inference"]
    scores: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    model2d.eval()
    model3d.eval()
    for image, label in cases:
        if stop is not None and stop.is_set():
            raise Cancelled()
        probabilities = {}
        for name in ("3d", "2d"):
            predict = predictor(name, model2d, model3d, axes_2d, config["model2d"]["chunk_slices"])
            probabilities[name] = predict_array(image, predict, config["sampling"]["patch_size"], device,
                                                inference["overlap"], inference["sw_batch_size"], inference["tta"],
                                                autocast_dtype)
        # The ensemble predictor averages the views' probabilities in every window, and sliding-window blending is
        # a weighted average: weighing the two volumes the same way gives the same result without a third pass.
        probabilities["ensemble"] = ensemble_mean(probabilities["2d"], probabilities["3d"], len(axes_2d))
        for name in CANDIDATES:
            scores[name] += dice_per_class(probabilities[name].argmax(0), label, num_classes)
    return {name: float(np.mean(values)) for name, values in scores.items()}


def choose_network(scores: dict[str, float] | None, n_cases: int, preset_network: str,
                   labeled_fit: dict[str, float | None] | None = None, no_scores: str = NO_VALIDATION) -> dict:
    """The record for model.json: the best-scoring candidate (on a tie, the preset's network, then the order of
    CANDIDATES), or without validation cases the preset's ``inference.network``, unless that is the ensemble and
    ``labeled_fit`` (each network's running soft Dice on the labeled patches) shows a network has not learnt the
    structure (``LabeledFit.usable``). ``no_scores`` says why there are no scores (the reason's opening)."""
    if not scores or n_cases == 0:
        record = {"network": preset_network, "reason": f"{no_scores}: the preset's inference.network",
                  "scores": None, "validation_cases": 0, "labeled_fit": labeled_fit}
        fit = LabeledFit(labeled_fit)
        unusable = [net for net in ("2d", "3d") if not fit.usable(net)]
        if preset_network != "ensemble" or not unusable:
            return record
        if len(unusable) == 1:
            worse = unusable[0]
            better = other_network(worse)
        else:  # both measured (an unmeasured network is usable): the one that found more of the structure
            better = max(("2d", "3d"), key=lambda net: fit.dice[net])
            worse = other_network(better)
        found = f"Dice {fit.dice[worse]:.2f}" + (f" against {fit.dice[better]:.2f}" if fit.dice[better] is not None
                                                  else "")
        record["network"] = better
        if len(unusable) == 2:
            record["reason"] = (f"{no_scores}; neither network has learnt the structure on the labeled patches "
                                f"({found}; {LEARNT_FIT} or more is learnt): the {better.upper()} network alone, "
                                f"which found more of it. Train longer, or give validation cases")
        else:
            record["reason"] = (f"{no_scores}; the {worse.upper()} network has not learnt the structure on the "
                                f"labeled patches ({found}), so the {better.upper()} network alone rather than "
                                f"the ensemble")
        return record
    order = [preset_network] + [name for name in CANDIDATES if name != preset_network]
    best = max(order, key=lambda name: scores[name])  # max keeps the first of equals
    listed = ", ".join(f"{name} {scores[name]:.3f}" for name in CANDIDATES)
    return {"network": best, "scores": scores, "validation_cases": n_cases,
            "reason": f"highest mean Dice on {n_cases} validation case{'s' * (n_cases != 1)} ({listed})"}


def read_choice(run_dir: Path) -> dict | None:
    """model.json of a run folder; None for folders trained before it existed (or whose training did not end)."""
    path = Path(run_dir) / MODEL_CHOICE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
