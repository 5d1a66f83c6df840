"""Pictures of a training run: learning curves and a three-plane overlay of a segmentation.

Matplotlib is used through its object API with the Agg canvas only (``matplotlib.figure.Figure``); nothing
touches pyplot's global state, so these functions are safe in worker threads and inside 3D Slicer. PNGs are
written atomically: to a temporary file in the destination folder, then ``os.replace``.

Display convention of :func:`plot_overlay` (arrays are indexed ``[x, y, z]``, ``spacing`` is in mm per axis in
the same order, z is the slice axis):

* axial (a slice at fixed z): x runs left to right, y runs top to bottom;
* coronal (fixed y): x runs left to right, z runs bottom to top;
* sagittal (fixed x): y runs left to right, z runs bottom to top.

Each pixel is drawn with its physical size, so images are neither transposed nor stretched. For an image with
an identity direction matrix in LPS (the ITK / SimpleITK convention) this gives the radiological view in the
axial plane (patient left on the viewer's right, anterior at the top) and superior at the top in the coronal
and sagittal planes; other direction matrices are shown in index order, not reoriented.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

try:  # optional: only pictures need it (pip install "mnsegment[plots]")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter
except ImportError as error:
    raise ImportError(f"matplotlib is needed to draw pictures: pip install matplotlib ({error})") from error

__all__ = ["plot_learning_curves", "plot_overlay"]

_PRED_COLOURS = ("#ff3b30", "#ffb000", "#ff2fd0", "#ff7a00", "#c8ff00", "#ff6f91", "#ffe14d", "#b388ff")
_REF_COLOURS = ("#00e5ff", "#2bff88", "#4d8bff", "#00ffd5", "#9dff3b", "#7df9ff", "#3dd9ff", "#62ffb0")
_WARMUP_SHADE = "#e8eef7"
_DPI = 110


# ----------------------------------------------------------------------------------------------------------
# shared helpers


def _save_atomic(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            fig.savefig(handle, format="png", dpi=_DPI)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _as_float(value: object) -> float:
    """float(value), or NaN for None / missing / non-numeric values."""
    if value is None or isinstance(value, (str, bytes)):
        return math.nan
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    return out if math.isfinite(out) else math.nan


# ----------------------------------------------------------------------------------------------------------
# learning curves


def _column(rows: Sequence[Mapping[str, object]], key: str) -> np.ndarray:
    return np.array([_as_float(r.get(key)) for r in rows], dtype=float)


def _smooth(x: np.ndarray, y: np.ndarray, log: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """Centred moving average over the finite points (in log space for log axes); None if too few."""
    ok = np.isfinite(y) & (y > 0 if log else True)
    if ok.sum() < 30:
        return None
    xs, ys = x[ok], y[ok]
    values = np.log(ys) if log else ys
    window = max(3, round(len(values) / 40) | 1)
    kernel = np.ones(window) / window
    padded = np.pad(values, window // 2, mode="edge")
    smooth = np.convolve(padded, kernel, mode="valid")
    return xs, (np.exp(smooth) if log else smooth)


def _plot_series(ax, x: np.ndarray, y: np.ndarray, label: str, colour: str, log: bool = False) -> bool:
    ok = np.isfinite(y) & (y > 0 if log else True)
    if not ok.any():
        return False
    smoothed = _smooth(x, y, log)
    if smoothed is None:
        ax.plot(x[ok], y[ok], color=colour, lw=1.4, marker="o" if ok.sum() < 15 else None, ms=3, label=label)
    else:
        ax.plot(x[ok], y[ok], color=colour, lw=0.7, alpha=0.3)
        ax.plot(*smoothed, color=colour, lw=1.6, label=label)
    return True


def _plain_log_ticks(ax) -> None:
    """Decimal tick labels on a log y axis; minor ticks labelled only as far as they stay readable."""
    lo, hi = ax.dataLim.intervaly
    decades = math.log10(hi / lo) if lo > 0 and hi > lo else 0.0
    keep = {2, 5} if decades < 2.5 else set()

    def minor(value: float, _pos: int) -> str:
        if value <= 0:
            return ""
        if decades < 0.8:
            return f"{value:g}"
        mantissa = round(value / 10 ** math.floor(math.log10(value) + 1e-9))
        return f"{value:g}" if mantissa in keep else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _no_data(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.5")


def plot_learning_curves(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Plot training progress and write it as a PNG to ``path`` (atomically); returns the path.

    ``history`` rows hold ``step``, ``stage`` (``"warmup"``/``"cotrain"``), ``loss_2d``, ``loss_3d``,
    ``lr_2d``, ``lr_3d``, ``unlabeled_share`` and optionally ``val_dice``; missing/None/NaN values are
    skipped.
    Panels: losses (log scale; raw values faint, moving average solid), learning rates (log scale),
    unlabeled share of the batch, and validation Dice when any row has one. The warm-up stage is shaded."""
    rows = [r for r in history if isinstance(r, Mapping)]
    steps = np.array(
        [_as_float(r.get("step")) if r.get("step") is not None else float(i) for i, r in enumerate(rows)],
        dtype=float,
    )
    order = np.argsort(steps, kind="stable")
    rows = [rows[i] for i in order]
    steps = steps[order]
    stages = [str(r.get("stage") or "") for r in rows]
    val_dice = _column(rows, "val_dice")
    has_val = bool(np.isfinite(val_dice).any())

    n_panels = 4 if has_val else 3
    fig = Figure(figsize=(8.5, 2.1 * n_panels + 0.6), layout="constrained")
    axes = fig.subplots(n_panels, 1, sharex=True, squeeze=False)[:, 0]
    if title:
        fig.suptitle(title, fontsize=12)

    for ax, name in zip(axes, ("loss", "learning rate", "unlabeled\nshare of batch", "validation\nDice")):
        ax.set_ylabel(name)
    if not rows:
        for ax in axes:
            _no_data(ax, "no training progress recorded yet")
        axes[-1].set_xlabel("step")
        return _save_atomic(fig, path)

    ax_loss, ax_lr, ax_share = axes[0], axes[1], axes[2]

    # stages: warm-up shaded from its first step up to the first co-training step, names on the top panel
    warm = [s for s, st in zip(steps, stages) if st == "warmup" and math.isfinite(s)]
    cot = [s for s, st in zip(steps, stages) if st == "cotrain" and math.isfinite(s)]
    boundary = min(cot) if cot else None
    label_style = {"transform": ax_loss.get_xaxis_transform(), "va": "bottom", "fontsize": 8, "color": "0.3"}
    if warm and boundary is not None and boundary > min(warm):
        for ax in axes:
            ax.axvspan(min(warm), boundary, color=_WARMUP_SHADE, zorder=0, lw=0)
            ax.axvline(boundary, color="0.45", ls="--", lw=1.0, zorder=1)
        ax_loss.text(min(warm), 1.01, "warm-up", ha="left", **label_style)
        ax_loss.text(boundary, 1.01, " co-training", ha="left", **label_style)
    elif warm or cot:
        label_style["transform"] = ax_loss.transAxes
        ax_loss.text(0.0, 1.01, "warm-up" if warm else "co-training", ha="left", **label_style)

    drawn = _plot_series(ax_loss, steps, _column(rows, "loss_2d"), "2D model", "#1f77b4", log=True)
    drawn |= _plot_series(ax_loss, steps, _column(rows, "loss_3d"), "3D model", "#d62728", log=True)
    if drawn:
        ax_loss.set_yscale("log")
        _plain_log_ticks(ax_loss)
    else:
        _no_data(ax_loss)

    drawn = False
    peaks, lows = [], []
    for key, label, colour in (("lr_2d", "2D model", "#1f77b4"), ("lr_3d", "3D model", "#d62728")):
        y = _column(rows, key)
        ok = np.isfinite(y) & (y > 0)
        if ok.any():
            ax_lr.plot(steps[ok], y[ok], color=colour, lw=1.4, label=label)
            peaks.append(float(y[ok].max()))
            lows.append(float(y[ok].min()))
            drawn = True
    if drawn:
        ax_lr.set_yscale("log")
        ax_lr.set_ylim(bottom=max(min(peaks) * 1e-3, min(lows) / 2.0, 1e-12), top=max(peaks) * 2.0)
    else:
        _no_data(ax_lr)

    share = _column(rows, "unlabeled_share")
    if not _plot_series(ax_share, steps, share, "unlabeled share", "#2ca02c"):
        _no_data(ax_share)
    ax_share.set_ylim(-0.03, 1.03)

    if has_val:
        ax_val = axes[3]
        ok = np.isfinite(val_dice)
        ax_val.plot(steps[ok], val_dice[ok], color="#9467bd", lw=1.4, marker="o", ms=3.5, label="val Dice")
        best = int(np.argmax(np.where(ok, val_dice, -np.inf)))
        ax_val.plot(
            [steps[best]],
            [val_dice[best]],
            marker="*",
            ms=11,
            color="#9467bd",
            mec="k",
            mew=0.6,
            ls="none",
            label=f"best {val_dice[best]:.3f} (step {steps[best]:g})",
        )
        ax_val.set_ylim(0.0, 1.02)

    for ax in axes:
        ax.grid(True, which="major", color="0.88", lw=0.6)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8, framealpha=0.85)
    axes[-1].set_xlabel("step")
    finite_steps = steps[np.isfinite(steps)]
    if finite_steps.size and finite_steps.max() > finite_steps.min():
        axes[-1].set_xlim(finite_steps.min(), finite_steps.max())
    return _save_atomic(fig, path)


# ----------------------------------------------------------------------------------------------------------
# overlay


def _centre_index(masks: Iterable[np.ndarray | None], shape: tuple[int, int, int]) -> tuple[int, int, int]:
    for mask in masks:
        if mask is not None and mask.any():
            idx = np.argwhere(mask)
            centre = np.rint(idx.mean(axis=0)).astype(int)
            # a non-convex structure's centroid may lie outside it: take the nearest foreground voxel
            if not mask[tuple(centre)]:
                centre = idx[np.argmin(((idx - centre) ** 2).sum(axis=1))]
            return tuple(int(c) for c in centre)  # type: ignore[return-value]
    return tuple(s // 2 for s in shape)  # type: ignore[return-value]


def _window(image: np.ndarray) -> tuple[float, float]:
    sample = image.ravel()[:: max(1, image.size // 2_000_000)]  # a regular subsample is plenty
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [1.0, 99.0])
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def _labels(volume: np.ndarray | None) -> np.ndarray | None:
    if volume is None:
        return None
    arr = np.asarray(volume)
    if arr.dtype.kind == "f":
        arr = np.rint(np.nan_to_num(arr, nan=0.0))
    return arr.astype(np.int64, copy=False)


def _draw_contours(ax, label_slice: np.ndarray, xc: np.ndarray, yc: np.ndarray, colours: dict, style) -> None:
    for value, colour in colours.items():
        mask = label_slice == value
        if mask.any() and not mask.all():
            ax.contour(
                xc, yc, mask.T.astype(float), levels=[0.5], colors=[colour], linewidths=1.5, linestyles=style
            )


def plot_overlay(
    image: np.ndarray,
    prediction: np.ndarray,
    spacing: tuple[float, float, float],
    path: str | Path,
    reference: np.ndarray | None = None,
    class_names: dict[int, str] | None = None,
    title: str = "",
) -> Path:
    """Three orthogonal slices of ``image`` with the contours of ``prediction`` (solid, one colour per class)
    and optionally ``reference`` (dashed, a second colour set), written as a PNG to ``path`` (atomically).

    Arrays are 3D in (x, y, z) index order with ``spacing`` in mm per axis in that order; label volumes hold
    integer class values (0 = background). The slices pass through the centroid of the predicted foreground
    (else of the reference, else the volume centre). Grey window: 1st-99th percentile of the image. Pixels
    keep their physical aspect ratio; see the module docstring for the display orientation."""
    img = np.asarray(image, dtype=float)
    pred = _labels(prediction)
    ref = _labels(reference)
    if img.ndim != 3:
        raise ValueError(f"plot_overlay needs a 3D image in (x, y, z) order, got shape {img.shape}")
    for name, arr in (("prediction", pred), ("reference", ref)):
        if arr is not None and arr.shape != img.shape:
            raise ValueError(f"{name} shape {arr.shape} differs from image shape {img.shape}")
    sx, sy, sz = (float(s) for s in spacing)
    if not all(math.isfinite(s) and s > 0 for s in (sx, sy, sz)):
        raise ValueError(f"spacing must be three positive numbers, got {spacing}")

    names = {}
    for key, name in (class_names or {}).items():  # keys may arrive as strings from JSON
        try:
            names[int(key)] = str(name)
        except (TypeError, ValueError):
            continue
    values = sorted({int(v) for v in np.unique(pred) if v != 0})
    ref_values = sorted({int(v) for v in np.unique(ref) if v != 0}) if ref is not None else []
    all_values = sorted(set(values) | set(ref_values))
    pred_colours = {v: _PRED_COLOURS[i % len(_PRED_COLOURS)] for i, v in enumerate(all_values) if v in values}
    ref_colours = {
        v: _REF_COLOURS[i % len(_REF_COLOURS)] for i, v in enumerate(all_values) if v in ref_values
    }

    centre_masks = [pred > 0, None if ref is None else ref > 0]
    cx, cy, cz = _centre_index(centre_masks, img.shape)  # type: ignore[arg-type]
    lo, hi = _window(img)
    nx, ny, nz = img.shape

    # (title, index giving a 2D [horizontal, vertical] slice, their spacings, axis names, flip vertical)
    views = [
        (f"axial  z = {cz}", (slice(None), slice(None), cz), (sx, sy), ("x", "y"), True),
        (f"coronal  y = {cy}", (slice(None), cy, slice(None)), (sx, sz), ("x", "z"), False),
        (f"sagittal  x = {cx}", (cx, slice(None), slice(None)), (sy, sz), ("y", "z"), False),
    ]
    widths = [nx * sx, nx * sx, ny * sy]
    heights = [ny * sy, nz * sz, nz * sz]
    fig_h = 4.6
    panel_w = [w / max(h, 1e-9) for w, h in zip(widths, heights)]
    fig_w = min(max(sum(panel_w) * (fig_h - 1.3) + 1.0, 7.0), 16.0)
    fig = Figure(figsize=(fig_w, fig_h), layout="constrained")
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": panel_w})
    fig.set_facecolor("white")

    for ax, (panel_title, index, (dh, dv), (hname, vname), flip) in zip(axes, views, strict=True):
        sl = img[index]
        nh, nv = sl.shape
        extent = (0.0, nh * dh, 0.0, nv * dv)
        ax.imshow(
            np.nan_to_num(sl.T, nan=lo),
            cmap="gray",
            vmin=lo,
            vmax=hi,
            origin="lower",
            extent=extent,
            interpolation="nearest",
            aspect="equal",
        )
        xc = (np.arange(nh) + 0.5) * dh
        yc = (np.arange(nv) + 0.5) * dv
        _draw_contours(ax, pred[index], xc, yc, pred_colours, "solid")
        if ref is not None:  # on top, dashed: both stay visible where they coincide
            _draw_contours(ax, ref[index], xc, yc, ref_colours, "dashed")
        if flip:
            ax.invert_yaxis()
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel(f"{hname} \u2192", fontsize=9)
        ax.set_ylabel(f"{vname} \u2193" if flip else f"{vname} \u2192", fontsize=9)

    def label(v: int) -> str:
        return names.get(v, f"class {v}")

    handles = [
        Line2D([], [], color=c, lw=2, label=f"prediction: {label(v)}") for v, c in pred_colours.items()
    ]
    handles += [
        Line2D([], [], color=c, lw=2, ls="--", label=f"reference: {label(v)}") for v, c in ref_colours.items()
    ]
    if not values:
        handles.insert(0, Line2D([], [], color="none", label="prediction: empty"))
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncol=min(max(len(handles), 1), 4),
        fontsize=9,
        frameon=False,
    )
    caption = f"spacing {sx:g} x {sy:g} x {sz:g} mm, window [{lo:.4g}, {hi:.4g}]"
    fig.suptitle(f"{title}\n{caption}" if title else caption, fontsize=11 if title else 9)
    return _save_atomic(fig, path)
