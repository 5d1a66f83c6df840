"""``mnsegment train --init-from RUN``: a new run that starts from a finished run's networks instead of from
scratch (after adding labels). Only the weights carry over; optimisers, schedule and pseudo-masks start fresh. A
short continued run (the default) fine-tunes: its schedule peaks at a tenth of the preset's learning rates.

The new run inherits what the weights depend on: the networks' architecture and the input distribution they
learnt on (target spacing, normalisation, CT window of RUN's plan). An explicit ``--set`` of a data key wins; an
explicit architecture change is refused, as is a different set of label values.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from MNSegmentLib import config as configuration
from MNSegmentLib.data.preprocess import Plan
from MNSegmentLib.errors import InputError
from MNSegmentLib.models.network2d import build_model2d
from MNSegmentLib.models.network3d import build_model3d, check_patch_size
from MNSegmentLib.training.trainer import MODEL

# model2d keys that change the 2D network's tensors or its function (not: weights, dropout, chunking)
ARCHITECTURE_2D = ("name", "adaptation", "lora_rank", "lora_alpha", "decoder_channels", "decoder_norm")
# A continued run's default length, as a share of RUN's steps: it starts from trained networks, so a short
# schedule is the point. docs/BENCHMARKS.md §8b (3 seeds): a quarter, fine-tuning (below), was level with 200 steps
# from scratch.
DEFAULT_STEPS_SHARE = 0.25
# A continued run shorter than FINE_TUNE_BELOW of RUN's steps peaks at FINE_TUNE_LR_SHARE of the preset's learning
# rates (unless they are set). docs/BENCHMARKS.md §8b (3 seeds): at the preset's rates the restarted schedule
# (fresh optimiser state, two restarts to the peak) first undid RUN's training (3D Dice 0.790 -> 0.745 after 25
# steps, 0.760 after 50); a tenth kept it (0.787, 0.785), 6/6 paired. At half RUN's steps the preset's rates had
# time to recover and did better (0.804 against 0.792, 2/3), so longer runs keep them.
FINE_TUNE_BELOW = 0.5
FINE_TUNE_LR_SHARE = 0.1


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class SourceRun:
    """A finished run folder whose networks start a new run."""

    run_dir: Path
    config: dict
    plan: Plan
    model_sha256: str

    @classmethod
    def open(cls, run_dir: str | Path) -> SourceRun:
        run_dir = Path(run_dir).absolute()
        if not (run_dir / MODEL).is_file():
            raise InputError(f"--init-from {run_dir}: not a finished MNSegment run folder (no {MODEL}); "
                             "give the folder of a run trained to the end")
        config = configuration.load_run_config(run_dir / "config.json")
        plan = Plan.from_json(configuration.load(run_dir / "plan.json"))
        return cls(run_dir, config, plan, sha256(run_dir / MODEL))

    def record(self) -> dict:
        """What config.json and the start event say about the source (the hash pins the exact weights)."""
        return {"run": str(self.run_dir), "model_sha256": self.model_sha256}

    def inherited(self, overrides: dict, steps_set: bool) -> dict:
        """Overrides that make a preset continue this run; the user's own ``overrides`` come last and win."""
        c = self.config
        out = {"data.target_spacing": self.plan.target_spacing, "data.normalization": self.plan.normalization,
               "data.ct_window": self.plan.ct_window, "data.slice_axis": c["data"]["slice_axis"],
               **{f"model2d.{k}": c["model2d"][k] for k in ARCHITECTURE_2D},
               "model3d.name": c["model3d"]["name"], "model3d.kwargs": c["model3d"]["kwargs"]}
        if not steps_set:
            out["train.steps"] = max(2, round(c["train"]["steps"] * DEFAULT_STEPS_SHARE))
        return {**out, **overrides}

    def fine_tune(self, config: dict, overrides: dict) -> None:
        """Lowers ``config``'s peak learning rates for a short continued run (see FINE_TUNE_BELOW), except those
        ``overrides`` set."""
        if config["train"]["steps"] >= FINE_TUNE_BELOW * self.config["train"]["steps"]:
            return
        for key in ("lr_2d", "lr_3d"):
            if f"train.{key}" not in overrides:
                config["train"][key] *= FINE_TUNE_LR_SHARE

    def check_config(self, config: dict) -> None:
        """An explicit ``--set`` that changes the architecture cannot take RUN's weights."""
        differences = [f"model2d.{k}: {self.config['model2d'][k]!r} there, {config['model2d'][k]!r} here"
                       for k in ARCHITECTURE_2D if config["model2d"][k] != self.config["model2d"][k]]
        differences += [f"model3d.{k}: {self.config['model3d'][k]!r} there, {config['model3d'][k]!r} here"
                        for k in ("name", "kwargs") if config["model3d"][k] != self.config["model3d"][k]]
        if differences:
            raise InputError(f"--init-from {self.run_dir}: its networks differ from this run's ("
                             + "; ".join(differences) + "); drop those --set options")

    def check_label_values(self, label_values: list[int]) -> None:
        """The class heads carry over, so the new labels must have exactly RUN's classes (0 = background)."""
        if list(label_values) != list(self.plan.label_values):
            raise InputError(
                f"--init-from {self.run_dir}: it was trained for {len(self.plan.label_values)} classes with label "
                f"values {self.plan.label_values}, the new labels have {len(label_values)} classes with values "
                f"{list(label_values)}; continue only with the same structures (or train from scratch)")

    def load_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """RUN's network tensors, checked against the hash recorded when the new run was made."""
        path = self.run_dir / MODEL
        if not path.is_file() or sha256(path) != self.model_sha256:
            raise InputError(f"--init-from {self.run_dir}: {MODEL} has changed or gone since this run was made")
        state = torch.load(path, map_location="cpu", weights_only=True)
        return {"model2d": state["model2d"], "model3d": state["model3d"]}

    def check_networks(self, config: dict) -> dict[str, dict[str, torch.Tensor]]:
        """Builds the new run's networks (no pretrained 2D weights: RUN's replace them) and loads RUN's tensors
        into them, so any mismatch is refused before preprocessing. Returns those tensors for the Trainer."""
        num_classes = len(self.plan.label_values)
        model2d, _ = build_model2d(config["model2d"], num_classes, load_weights=False)
        model3d = build_model3d(config["model3d"], num_classes)
        check_patch_size(model3d, config["model3d"], config["sampling"]["patch_size"])
        state = self.load_state()
        try:
            model2d.load_state_dict(state["model2d"])
            model3d.load_state_dict(state["model3d"])
        except RuntimeError as err:
            raise InputError(f"--init-from {self.run_dir}: its {MODEL} does not fit the configured networks "
                             f"({str(err).splitlines()[0]})") from None
        return state


def source_of(config: dict) -> SourceRun | None:
    """The source run recorded in a run's config.json (to reload its weights when resuming a run that was
    stopped before its first checkpoint)."""
    record = config.get("init_from")
    if not record:
        return None
    run_dir = Path(record["run"])
    try:
        plan = Plan.from_json(configuration.load(run_dir / "plan.json"))
        source_config = configuration.load_run_config(run_dir / "config.json")
    except InputError:
        raise InputError(f"this run starts from {run_dir}, which is gone; start a new run") from None
    return SourceRun(run_dir, source_config, plan, record["model_sha256"])
