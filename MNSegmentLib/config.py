"""Presets, dotted-key overrides and the resolved configuration saved in every run folder."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from MNSegmentLib.errors import InputError

# Values shared by every preset; each preset below overrides a few of them.
_BASE: dict[str, Any] = {
    "seed": 0,
    # an image whose current prediction training writes to RUN/preview.nii.gz at each checkpoint
    # (MNSegmentLib.training.preview)
    "preview": None,
    "data": {
        "target_spacing": None,  # [x, y, z] in mm; None = median spacing of the labeled cases (nnU-Net style)
        "normalization": "auto",  # auto | ct | mr | none
        "ct_window": None,  # [low, high] HU; None = 0.5/99.5 percentiles of labeled foreground
        "slice_axis": 2,  # axis of the canonical (x, y, z) array along which the 2D model sees slices
        # preset: the three settings above and sampling.patch_size as configured (null spacing = median labeled
        # spacing); auto: the experiment planner (planning/) chooses them from the dataset within the preset's
        # patch budget. Opt-in until its accuracy is measured on the benchmark tasks.
        "planning": "preset",
    },
    "sampling": {
        "patch_size": [96, 96, 48],
        "batch_size": 4,
        "foreground_fraction": 0.5,  # share of crops centred on (pseudo-)foreground
        "scale_jitter": 0.1,  # isotropic scale in [1 - j, 1 + j]
        "intensity_aug": True,
    },
    "model2d": {
        "name": "tf_efficientnet_lite0",
        "weights": "imagenet",  # imagenet | none | /path/to/weights.pth
        "adaptation": "lora",  # lora | frozen | full
        "lora_rank": 16,
        "lora_alpha": 16,
        "lora_dropout": 0.1,
        "decoder_channels": 64,
        "decoder_norm": "group",  # group | batch (BatchNorm: only for run folders made before 2026-11-28)
        "chunk_slices": 128,  # slices per 2D forward pass; bounds memory on large patches
    },
    "model3d": {
        "name": "UNet",
        "kwargs": {
            "channels": [32, 64, 128, 256, 512],
            "strides": [2, 2, 2, 2],
            "num_res_units": 2,
            "norm": "instance",
        },
    },
    "train": {
        "steps": 12000,
        "warmup_fraction": 0.125,  # stage 1 (labeled only) as a share of all steps
        "lr_warmup_fraction": 0.1,  # linear LR warm-up as a share of stage 1
        "lr_2d": 1e-3,
        "lr_3d": 1e-4,
        "weight_decay": 1e-2,
        "alternate_every": 8,  # stage 2 switches student every this many steps (the reference's "epoch")
        "refresh_at": [0.25, 0.375, 0.5, 0.75],  # pseudo-mask refresh points, shares of all steps
        "checkpoint_every": 500,  # steps
        "validate_every": 500,  # steps; only when the datalist has validation cases
        "amp": True,  # mixed precision on CUDA (ignored on CPU)
        # CUDA only: reproducible kernels (slower; cuDNN benchmark off). Off = fastest kernels, so a CUDA run (and a
        # resumed one) matches another only approximately. CPU runs are reproducible either way.
        "deterministic": False,
        "prefetch": True,  # draw the next step's patches on a background thread (same patches as without)
        "micro_batch": None,  # patches per forward/backward; None = the whole batch (halved on CUDA out-of-memory)
        "suggest": True,  # after training, rank the unlabeled volumes to label next (inference.suggestions)
    },
    "lrg": {
        "mode": "lr",  # lr | linear | fixed | off
        "share": 0.5,  # the constant share for mode "fixed"
        "cap": 0.8,
        # add: unlabeled patches come on top of a full labeled batch; replace: they take labeled places (the
        # reference code). add beat both replace and labeled-only at 1000 steps (docs/BENCHMARKS.md §2b).
        "unlabeled": "add",
    },
    "teacher": {  # how the frozen network of stage 2 makes the student's targets on unlabeled patches
        "temperature": 1.0,  # softmax(logits / T): 1 = the reference's soft targets, < 1 sharper, 0 = hard labels
        "input": "augmented",  # augmented: the student's own patch (reference); clean: before intensity aug
        # The candidates below are off (the reference's teacher) unless a preset turns one on by evidence
        # (docs/BENCHMARKS.md, sections 12-13).
        "ema": 0.0,  # > 0: the teacher is an EMA copy of the other network with this decay (e.g. 0.99)
        # the 2D network trains on slices of every near-isotropic axis and, as teacher and predictor, averages them
        "triplanar": False,
        "weighting": "none",  # none | confidence: weight unlabeled voxels by the teacher's top probability
        "student_view": "same",  # same | strong: the student's unlabeled patches get an extra, stronger augmentation
        # both: each network teaches the other (reference); 2d_to_3d: the 2D network keeps learning from labels
        # only, so a weaker from-scratch 3D network cannot pull it down (docs/BENCHMARKS.md section 13); auto:
        # 2d_to_3d, reversed while the 2D network fails on the labeled patches, and only a network that has learnt
        # the structure teaches (training.teachers.LabeledFit)
        "directions": "both",
        # true: when the 2D network does not learn from the 3D one (2d_to_3d, auto), it learns on the unlabeled
        # patches from its own predictions along its other slice axes (needs triplanar; a network that has not
        # learnt the structure, or failed on it, does not teach itself). No gain at 200 quick steps on two tasks,
        # for 35 % more compute (docs/BENCHMARKS.md 13n)
        "cross_view": False,
    },
    "inference": {
        "network": "3d",  # 3d | 2d | ensemble
        "overlap": 0.5,
        "sw_batch_size": 2,
        "tta": False,  # average over flips along each spatial axis
        "largest_component": False,
    },
}

# Settings a preset keeps even with data.planning=auto (unless set with --set): the paper preset is the reference
# code's protocol, whose 160x160x64 crop is part of what is reproduced.
KEPT_BY_PRESET: dict[str, tuple[str, ...]] = {"paper": ("sampling.patch_size",)}

PRESETS: dict[str, dict[str, Any]] = {
    # The reference code's schedule (METHOD.md), batch 5 of 160x160x64. An "epoch" there is 8 iterations and
    # the 2D and 3D networks count epochs separately (4000 each):
    #   stage 1: 500 epochs x 8 = 4 000 steps, both networks every step;
    #   stage 2: 3 500 epochs x 8 per network, one network per step, switching every 8 steps
    #            = 2 x 28 000 = 56 000 steps;
    #   total 60 000 steps, stage 1 = 4 000 / 60 000 = 1/15; LR warm-up 50 epochs = 400 steps = 0.1 of stage 1.
    # Refreshes at per-network epochs 1000, 1500, 2000, 3000 = 500, 1000, 1500, 2500 stage-2 epochs of 16 steps
    # after step 4 000: steps 12 000, 20 000, 28 000, 44 000 = 1/5, 1/3, 7/15, 11/15 of 60 000.
    "paper": {
        "sampling": {"patch_size": [160, 160, 64], "batch_size": 5},
        "model2d": {"name": "resnet50", "lora_rank": 64, "lora_alpha": 64, "chunk_slices": 64},
        "train": {"steps": 60000, "warmup_fraction": 1 / 15, "refresh_at": [1 / 5, 1 / 3, 7 / 15, 11 / 15],
                  "checkpoint_every": 1000, "validate_every": 2000},
        "lrg": {"unlabeled": "replace"},
    },
    "default": {},
    # CPU-sized: small patches, a small 3D U-Net and few steps; a small dataset trains in a few minutes.
    "quick": {
        "sampling": {"patch_size": [48, 48, 32], "batch_size": 4},
        "model2d": {"decoder_channels": 32, "lora_rank": 8, "lora_alpha": 8, "lora_dropout": 0.0},
        "model3d": {
            "kwargs": {"channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 1, "norm": "instance"}
        },
        "train": {"steps": 400, "lr_3d": 2e-3, "checkpoint_every": 100, "validate_every": 100},
        # At these budgets the from-scratch 3D network is a weaker teacher than the pretrained 2D one: learning
        # from it lowered the 2D network on every seed; auto keeps the 2D network on labels (unless it fails on
        # them) and beat both-ways on every seed of 3 tasks, L = 1 and 2, 200 and 500 steps (BENCHMARKS 13c-13e)
        # triplanar: the 2D network trains on and predicts from the slices of all three axes of a near-isotropic
        # grid; its test Dice rose by +0.02 over one axis on two tasks at 200 steps, the delivered output's with it
        # (docs/BENCHMARKS.md section 13l). On an anisotropic grid only the acquisition axis is used.
        "teacher": {"directions": "auto", "triplanar": True},
        # After a few hundred CPU steps the from-scratch 3D network still lags the pretrained 2D one; averaging
        # both, every view one vote (a triplanar 2D network 3 : 1), stayed within 0.008 Dice of the best output at
        # 200, 400 and 1000 steps; 1 : 1 fell 0.023 behind, the 2D network alone 0.011 (docs/BENCHMARKS.md 13m).
        "inference": {"network": "ensemble", "overlap": 0.25, "sw_batch_size": 4},
    },
}


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "kwargs":
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def preset(name: str) -> dict[str, Any]:
    """The full configuration of a named preset."""
    if name not in PRESETS:
        raise InputError(f"unknown preset '{name}': choose one of {', '.join(PRESETS)}")
    return _merge(_BASE, PRESETS[name])


def parse_value(text: str) -> Any:
    """A --set value: JSON when it parses (numbers, lists, true/false/null), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Sets dotted keys (``train.steps``); a key that the configuration lacks is an error, not a silent no-op."""
    out = copy.deepcopy(config)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = out
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                if isinstance(node, dict) and i == len(parts) - 1 and parts[i - 1 : i] == ["kwargs"]:
                    break  # model3d.kwargs.X may add a new network argument
                raise InputError(
                    f"unknown setting '{dotted}': see the configuration keys in README.md "
                    f"or config.json of a run folder"
                )
            if i < len(parts) - 1:
                node = node[part]
        node[parts[-1]] = value
    validate(out)
    return out


def parse_set_args(items: list[str]) -> dict[str, Any]:
    """``["train.steps=100", ...]`` -> ``{"train.steps": 100}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set expects KEY=VALUE, got '{item}'")
        out[key.strip()] = parse_value(value.strip())
    return out


def _check(condition: bool, key: str, what: str) -> None:
    if not condition:
        raise InputError(f"invalid setting {key}: {what}")


def validate(config: dict[str, Any]) -> None:
    """Refuses values that would fail later, deep inside training, with an unclear error."""
    s, t, lrg, m2 = config["sampling"], config["train"], config["lrg"], config["model2d"]
    _check(
        isinstance(s["patch_size"], list) and len(s["patch_size"]) == 3 and all(
            isinstance(v, int) and v >= 8 for v in s["patch_size"]),
        "sampling.patch_size", "three integers >= 8, e.g. [96,96,48]",
    )
    _check(isinstance(s["batch_size"], int) and s["batch_size"] >= 1, "sampling.batch_size", "an integer >= 1")
    _check(0 <= s["foreground_fraction"] <= 1, "sampling.foreground_fraction", "a number in [0, 1]")
    _check(0 <= s["scale_jitter"] < 0.5, "sampling.scale_jitter", "a number in [0, 0.5)")
    _check(t["micro_batch"] is None or (isinstance(t["micro_batch"], int) and t["micro_batch"] >= 1),
           "train.micro_batch", "null or an integer >= 1")
    _check(isinstance(t["steps"], int) and t["steps"] >= 2, "train.steps", "an integer >= 2")
    _check(isinstance(t["deterministic"], bool), "train.deterministic", "true or false")
    _check(isinstance(t["amp"], bool), "train.amp", "true or false")
    _check(isinstance(t["prefetch"], bool), "train.prefetch", "true or false")
    _check(isinstance(t["suggest"], bool), "train.suggest", "true or false")
    _check(0 < t["warmup_fraction"] <= 1, "train.warmup_fraction", "a number in (0, 1]")
    _check(0 <= t["lr_warmup_fraction"] < 1, "train.lr_warmup_fraction", "a number in [0, 1)")
    _check(t["lr_2d"] > 0 and t["lr_3d"] > 0, "train.lr_2d/lr_3d", "positive numbers")
    _check(isinstance(t["alternate_every"], int) and t["alternate_every"] >= 1, "train.alternate_every",
           "an integer >= 1")
    _check(all(0 < f < 1 for f in t["refresh_at"]), "train.refresh_at", "shares of all steps in (0, 1)")
    _check(lrg["mode"] in ("lr", "linear", "fixed", "off"), "lrg.mode", "one of lr, linear, fixed, off")
    _check(lrg["unlabeled"] in ("replace", "add"), "lrg.unlabeled", "replace or add")
    _check(0 <= lrg["share"] <= 1 and 0 <= lrg["cap"] <= 1, "lrg.share/lrg.cap", "numbers in [0, 1]")
    teacher = config["teacher"]
    _check(isinstance(teacher["temperature"], (int, float)) and teacher["temperature"] >= 0,
           "teacher.temperature", "a number >= 0 (1 = soft targets, 0 = hard labels)")
    _check(teacher["input"] in ("augmented", "clean"), "teacher.input", "augmented or clean")
    _check(isinstance(teacher["ema"], (int, float)) and 0 <= teacher["ema"] < 1, "teacher.ema",
           "a decay in [0, 1) (0 = the raw other network teaches)")
    _check(isinstance(teacher["triplanar"], bool), "teacher.triplanar", "true or false")
    _check(teacher["weighting"] in ("none", "confidence"), "teacher.weighting", "none or confidence")
    _check(teacher["student_view"] in ("same", "strong"), "teacher.student_view", "same or strong")
    _check(teacher["directions"] in ("both", "2d_to_3d", "auto"), "teacher.directions", "both, 2d_to_3d or auto")
    _check(isinstance(teacher["cross_view"], bool), "teacher.cross_view", "true or false")
    _check(not teacher["cross_view"] or teacher["triplanar"], "teacher.cross_view",
           "false unless teacher.triplanar is true (the slice directions that teach each other)")
    _check(m2["adaptation"] in ("lora", "frozen", "full"), "model2d.adaptation", "one of lora, frozen, full")
    _check(m2["decoder_norm"] in ("group", "batch"), "model2d.decoder_norm", "group or batch")
    _check(config["data"]["normalization"] in ("auto", "ct", "mr", "none"), "data.normalization",
           "one of auto, ct, mr, none")
    _check(config["data"]["slice_axis"] in (0, 1, 2), "data.slice_axis", "0, 1 or 2")
    _check(config["data"]["planning"] in ("preset", "auto"), "data.planning",
           "preset (the preset's patch, median labeled spacing) or auto (planned from the dataset)")
    _check(config["inference"]["network"] in ("3d", "2d", "ensemble"), "inference.network",
           "one of 3d, 2d, ensemble")
    _check(config["preview"] is None or isinstance(config["preview"], str), "preview", "null or an image path")
    spacing = config["data"]["target_spacing"]
    _check(spacing is None or (isinstance(spacing, list) and len(spacing) == 3 and all(v > 0 for v in spacing)),
           "data.target_spacing", "null (automatic) or three positive numbers in mm")


def save(config: dict[str, Any], path: Path) -> None:
    from MNSegmentLib.data.io import write_json_atomic

    write_json_atomic(path, config)


def load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path} not found: is this an MNSegment run folder?") from None


def load_run_config(path: Path) -> dict[str, Any]:
    """A run folder's config.json. Keys added to the engine after the run was made take their defaults, so a
    new key's default must reproduce the engine's earlier behaviour (as ``teacher.*`` does)."""
    saved = load(path)
    config = _merge(_BASE, saved)
    if "deterministic" not in saved.get("train", {}):
        config["train"]["deterministic"] = True  # before the key existed, CUDA runs always were
    if "decoder_norm" not in saved.get("model2d", {}):
        config["model2d"]["decoder_norm"] = "batch"  # before the key existed, the 2D decoder used BatchNorm
    return config
