"""Text for the module's progress display and parsing of its settings (Qt-free, so it is tested in CI)."""

from __future__ import annotations

import math
import re

STAGES = {"warmup": "warm-up (labeled only)", "cotrain": "co-training"}
LRG_MODES = ("preset", "lr", "linear", "fixed", "off")


def format_eta(seconds) -> str:
    if seconds is None or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        return "unknown"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def _number(value, fmt: str) -> str:
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return format(value, fmt)


def describe_progress(event: dict) -> tuple[str, str, int, int]:
    """(status line, metrics line, step, total) for a ``progress`` event."""
    step = int(event.get("step") or 0)
    total = int(event.get("total_steps") or 0)
    stage = STAGES.get(event.get("stage"), str(event.get("stage") or "training"))
    status = f"Training, {stage}: step {step}/{total}"
    eta = format_eta(event.get("eta_s"))
    if eta != "unknown":
        status += f", about {eta} left"
    if event.get("activity"):  # e.g. the pseudo-mask refresh between steps
        status += f" ({event['activity']})"
    share = event.get("unlabeled_share")
    metrics = (
        f"loss 2D {_number(event.get('loss_2d'), '.4f')} · loss 3D {_number(event.get('loss_3d'), '.4f')} · "
        f"LR 2D {_number(event.get('lr_2d'), '.2e')} · LR 3D {_number(event.get('lr_3d'), '.2e')} · "
        f"unlabeled share {_number(None if share is None else 100 * share, '.0f')} %"
    )
    return status, metrics, step, total


def describe_warning(event: dict) -> str | None:
    """Text for a ``warning`` event of the engine (None for other events)."""
    if event.get("event") != "warning":
        return None
    return f"Warning: {str(event.get('message') or '').strip() or 'see the log'}"


def describe_chosen_network(events: list[dict], used: str | None = None) -> str | None:
    """Which network the training chose for its output and why (the engine's ``done`` event of ``train``), and,
    when the segmentations were made with another one (the module's Network setting), which; None before that
    event (or from engines that did not choose)."""
    done = [e for e in events if e.get("event") == "done" and e.get("network")]
    if not done:
        return None
    network, reason = done[-1]["network"], str(done[-1].get("network_reason") or "").strip()
    text = f"Chosen network: {network}" + (f" ({reason})" if reason else "") + "."
    if used and used != network:
        text += f" These segmentations used the {used} network (the Network setting)."
    return text


def parse_patch_size(text: str) -> list[int] | None:
    """``"96, 96, 48"`` → ``[96, 96, 48]``; empty → None (preset default)."""
    text = (text or "").strip()
    if not text:
        return None
    parts = [p for p in re.split(r"[\s,x×]+", text) if p]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3 or min(values) < 8:
        raise ValueError(f"Patch size must be three voxel counts of at least 8, like 96,96,48 (got {text!r}).")
    return values


def settings_overrides(steps: int = 0, batch_size: int = 0, patch_size: str = "", lrg_mode: str = "preset",
                       backbone_2d: str = "", weights_2d: str = "", network_3d: str = "") -> dict:
    """The module's settings → ``train(**overrides)`` keywords; empty/zero means "the preset's value"."""
    out: dict = {}
    if steps:
        out["steps"] = int(steps)
    if batch_size:
        out["batch_size"] = int(batch_size)
    patch = parse_patch_size(patch_size)
    if patch:
        out["patch_size"] = patch
    if lrg_mode and lrg_mode != "preset":
        if lrg_mode not in LRG_MODES:
            raise ValueError(f"Unknown LRG mode {lrg_mode!r}")
        out["lrg_mode"] = lrg_mode
    if backbone_2d.strip():
        out["backbone_2d"] = backbone_2d.strip()
    if weights_2d.strip():
        out["weights_2d"] = weights_2d.strip()
    if network_3d.strip():
        out["network_3d"] = network_3d.strip()
    return out
