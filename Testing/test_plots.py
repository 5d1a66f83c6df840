"""Tests for MNSegmentLib.plots: PNGs are written, readable, not blank, correctly oriented."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from MNSegmentLib.plots import plot_learning_curves, plot_overlay

BLUE_2D, RED_3D, PURPLE_DICE, GREEN_SHARE = "#1f77b4", "#d62728", "#9467bd", "#2ca02c"
PRED_1, PRED_2, REF_1 = "#ff3b30", "#ffb000", "#00e5ff"


def _read(path):
    image = imread(str(path))
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    return image[..., :3]


def _colour_mask(image: np.ndarray, colour: str, tol: float = 0.06) -> np.ndarray:
    return np.all(np.abs(image - np.array(to_rgb(colour))) < tol, axis=-1)


def _history(n: int = 120, boundary: int = 40, with_val: bool = True) -> list[dict]:
    rows = []
    for step in range(n):
        stage = "warmup" if step < boundary else "cotrain"
        lr = 0.5 * (1 + math.cos(math.pi * (step if step < boundary else step - boundary) / boundary))
        row = {
            "step": step,
            "stage": stage,
            "loss_2d": 1.0 / (1 + 0.05 * step),
            "loss_3d": 2.0 / (1 + 0.03 * step),
            "lr_2d": 1e-3 * lr,
            "lr_3d": 1e-4 * lr,
            "unlabeled_share": 0.0 if stage == "warmup" else min(0.8, (step - boundary) / (n - boundary)),
        }
        if stage == "cotrain":  # the models take turns: the other loss is missing on each step
            row["loss_2d" if step % 2 else "loss_3d"] = None if step % 4 < 2 else float("nan")
        if with_val and step % 20 == 19:
            row["val_dice"] = min(0.9, step / n)
        rows.append(row)
    rows[5]["lr_2d"] = float("nan")
    rows[6]["unlabeled_share"] = None
    return rows


def test_learning_curves_with_validation(tmp_path):
    out = plot_learning_curves(_history(), tmp_path / "sub" / "curves.png", title="run 1")
    assert out == tmp_path / "sub" / "curves.png"
    image = _read(out)
    for colour in (BLUE_2D, RED_3D, PURPLE_DICE, GREEN_SHARE):
        assert _colour_mask(image, colour).sum() > 50, colour
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temporary file left behind


def test_learning_curves_without_validation_and_gaps(tmp_path):
    rows = _history(with_val=False)
    for row in rows:
        row.pop("lr_2d")  # a key missing everywhere
        row["loss_2d"] = None  # a series missing everywhere
    with_val = _read(plot_learning_curves(_history(), tmp_path / "a.png"))
    image = _read(plot_learning_curves(rows, tmp_path / "b.png"))
    assert image.shape[0] < with_val.shape[0]  # one panel fewer
    assert _colour_mask(image, PURPLE_DICE).sum() == 0
    assert _colour_mask(image, BLUE_2D).sum() == 0  # nothing of the 2D model is drawn
    assert _colour_mask(image, RED_3D).sum() > 50


def test_learning_curves_degenerate_inputs(tmp_path):
    path = tmp_path / "empty.png"
    plot_learning_curves([], path)
    assert _read(path).std() > 0.01
    # overwrite an existing file; a single row; everything None
    plot_learning_curves([{"step": 0, "stage": "warmup", "loss_2d": None, "loss_3d": float("nan")}], path)
    assert _read(path).shape[0] > 100
    plot_learning_curves([{"step": 3, "stage": "cotrain", "loss_3d": 0.5, "val_dice": 0.7}], path)
    assert _colour_mask(_read(path), PURPLE_DICE).sum() > 5


def _volume(shape=(60, 40, 24), spacing=(0.7, 0.7, 2.0)):
    rng = np.random.default_rng(0)
    image = 50 + 10 * rng.standard_normal(shape)
    x, y, z = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing)), indexing="ij")
    organ = ((x - 18) / 10) ** 2 + ((y - 18) / 8) ** 2 + ((z - 24) / 14) ** 2 < 1
    image[organ] += 100
    return image, organ


def test_overlay_classes_and_reference(tmp_path):
    spacing = (0.7, 0.7, 2.0)
    image, organ = _volume(spacing=spacing)
    prediction = organ.astype(np.uint8)
    prediction[24:28, 24:28, 10:14] = 2
    reference = np.roll(organ, 3, axis=0).astype(np.int16)
    out = plot_overlay(
        image,
        prediction,
        spacing,
        tmp_path / "overlay.png",
        reference=reference,
        class_names={"1": "organ", 2: "lesion"},  # JSON-style string keys are accepted
        title="case 1",
    )
    rgb = _read(out)
    for colour in (PRED_1, PRED_2, REF_1):
        assert _colour_mask(rgb, colour).sum() > 30, colour
    assert rgb.std() > 0.05


def _panel_boxes(rgb: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (row0, row1, col0, col1) of the three dark image panels of an overlay."""
    dark = rgb.mean(axis=-1) < 0.2
    cols = dark.sum(axis=0) > 0.3 * dark.shape[0] * 0.25
    runs, start = [], None
    for i, flag in enumerate(np.append(cols, False)):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    boxes = []
    for c0, c1 in runs:
        rows = np.where(dark[:, c0:c1].mean(axis=1) > 0.8)[0]
        boxes.append((int(rows.min()), int(rows.max()) + 1, c0, c1))
    return boxes


def test_overlay_orientation_and_physical_aspect(tmp_path):
    # black image; a cube at small x, large y, middle z; anisotropic spacing
    shape, spacing = (50, 30, 20), (1.0, 2.0, 3.0)
    image = np.zeros(shape)
    prediction = np.zeros(shape, dtype=np.uint8)
    prediction[5:11, 20:26, 8:12] = 1
    rgb = _read(plot_overlay(image, prediction, spacing, tmp_path / "o.png"))
    boxes = _panel_boxes(rgb)
    assert len(boxes) == 3, boxes
    physical = [(50 * 1.0, 30 * 2.0), (50 * 1.0, 20 * 3.0), (30 * 2.0, 20 * 3.0)]  # (width, height) mm
    red = _colour_mask(rgb, PRED_1, tol=0.15)
    centres = []
    for (r0, r1, c0, c1), (w_mm, h_mm) in zip(boxes, physical):
        assert (c1 - c0) / (r1 - r0) == pytest.approx(w_mm / h_mm, rel=0.06)
        rr, cc = np.nonzero(red[r0:r1, c0:c1])
        assert rr.size > 10
        centres.append((rr.mean() / (r1 - r0), cc.mean() / (c1 - c0)))  # (down, right) fractions
    axial, coronal, sagittal = centres
    assert axial[1] == pytest.approx(8 / 50, abs=0.05)  # x to the right
    assert axial[0] == pytest.approx(23 / 30, abs=0.05)  # y downwards
    assert coronal[1] == pytest.approx(8 / 50, abs=0.05)
    assert coronal[0] == pytest.approx(1 - 10 / 20, abs=0.06)  # z upwards
    assert sagittal[1] == pytest.approx(23 / 30, abs=0.05)  # y to the right


def test_overlay_empty_prediction_uses_reference(tmp_path):
    image, organ = _volume()
    empty = np.zeros(organ.shape, dtype=np.uint8)
    rgb = _read(plot_overlay(image, empty, (0.7, 0.7, 2.0), tmp_path / "e.png", reference=organ))
    assert _colour_mask(rgb, PRED_1).sum() == 0
    assert _colour_mask(rgb, REF_1).sum() > 30
    # nothing at all: still a picture, slices through the centre
    rgb = _read(plot_overlay(image, empty, (0.7, 0.7, 2.0), tmp_path / "n.png"))
    assert rgb.std() > 0.05 and _colour_mask(rgb, REF_1).sum() == 0


def test_overlay_rejects_mismatched_shapes(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        plot_overlay(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
