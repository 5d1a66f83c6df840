"""TensorBoard scalars in ``RUN/tensorboard`` when ``tensorboard`` is installed (the optional ``tensorboard``
extra), so a training on a server can be watched from a browser (``tensorboard --logdir RUN``).

Written from the training history at the trainer's report cadence, never inside a step.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("mnsegment")

FOLDER = "tensorboard"
# history key -> TensorBoard tag
TAGS = {"loss_2d": "loss/2d", "loss_3d": "loss/3d", "lr_2d": "lr/2d", "lr_3d": "lr/3d",
        "unlabeled_share": "lrg/unlabeled_share", "val_dice": "val/dice", "train_dice_2d": "train/labeled_dice_2d",
        "train_dice_3d": "train/labeled_dice_3d"}
STEP_TIME_TAG = "time/step_s"


class Scalars:
    """Writes history records (and step times) as scalars at x = the step's index; a no-op without
    tensorboard."""

    def __init__(self, run_dir: Path, written: int, enabled: bool = True):
        """``written``: how many history records earlier processes wrote already (a resumed run's step).
        ``enabled=False``: writes nothing (the ranks other than rank 0 of a distributed run)."""
        self.written = written
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the optional extra is not installed: no scalars, training is unaffected
            return
        self.writer = SummaryWriter(str(run_dir / FOLDER), flush_secs=10)
        log.info("TensorBoard scalars: tensorboard --logdir %s", run_dir / FOLDER)

    def write(self, history: list[dict], timings: list[tuple[float, float]]) -> None:
        """Writes the records of ``history`` not yet written; ``timings`` (the Trainer's (waited, step
        seconds) of this process) ends with their steps'."""
        new = history[self.written:]
        if self.writer is None or not new:
            return
        times = [took for _, took in timings[-len(new):]] if len(timings) >= len(new) else [None] * len(new)
        for record, seconds in zip(new, times):
            for key, tag in TAGS.items():
                if record.get(key) is not None:
                    self.writer.add_scalar(tag, record[key], record["step"])
            if seconds is not None:
                self.writer.add_scalar(STEP_TIME_TAG, seconds, record["step"])
        self.written = len(history)

    def close(self, history: list[dict], timings: list[tuple[float, float]]) -> None:
        self.write(history, timings)
        if self.writer is not None:
            self.writer.close()
