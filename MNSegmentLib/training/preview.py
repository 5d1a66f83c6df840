"""The training preview: at each checkpoint, the current prediction of one chosen volume, written on that volume's
own grid, so a viewer (the Slicer module) can show the structure appear while training runs.

Kept cheap: the volume is read and preprocessed once, when training starts; each preview then costs one
sliding-window pass of the network ``inference.network`` names (no test-time augmentation), a resampling to the
input grid and one atomic file write (docs/BENCHMARKS.md §9 measures it against the training time). And kept
within a budget whatever the checkpoint density: a checkpoint skips its preview when, at the last preview's cost,
the previews would take more than :data:`BUDGET_SHARE` of the time since training started (the first and the
final preview are always written).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from MNSegmentLib.data.io import read_image, write_image
from MNSegmentLib.data.preprocess import Plan, preprocess_image
from MNSegmentLib.errors import InputError
from MNSegmentLib.events import Events
from MNSegmentLib.inference.predict import label_image, predict_array, predictor, to_input_grid
from MNSegmentLib.models.slicing import network_axes

log = logging.getLogger("mnsegment")

PREVIEW_FILE = "preview.nii.gz"  # in the run folder

#: The most of the training time the previews may take (issue 12: under 5 %). At 5x quick's checkpoint density
#: on a 2-vCPU machine a preview every checkpoint took 7 % (docs/BENCHMARKS.md §9).
BUDGET_SHARE = 0.05


def _grid(image: sitk.Image) -> sitk.Image:
    """A one-byte image with ``image``'s grid: all that resampling onto (or from) it needs."""
    grid = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    grid.CopyInformation(image)
    return grid


class Preview:
    def __init__(self, image: Path, array: np.ndarray, preprocessed: sitk.Image, original: sitk.Image, out: Path,
                 clock: Callable[[], float] = time.monotonic):
        self.image, self.array, self.out = image, array, out
        self.preprocessed, self.original = preprocessed, original
        self.clock, self.opened = clock, clock()
        self.spent = self.last = 0.0  # seconds of all previews written, and of the last one

    def due(self, final: bool = False) -> bool:
        """Whether this checkpoint's preview fits :data:`BUDGET_SHARE`: the first and the ``final`` one always do,
        any other if the previews, this one at the last one's cost, stay within the share of the time since
        training started."""
        if final or not self.spent:
            return True
        return self.spent + self.last <= BUDGET_SHARE * (self.clock() - self.opened + self.last)

    def spend(self, seconds: float) -> None:
        self.spent += seconds
        self.last = seconds

    @classmethod
    def open(cls, config: dict, plan: Plan, run_dir: Path, events: Events) -> Preview | None:
        """The preview of ``config["preview"]`` (an image path), or None without one. An image that cannot be
        read any more (a resumed run whose file moved) costs the preview, with a warning, never the training."""
        image = config.get("preview")
        if not image:
            return None
        try:
            original = read_image(image)
        except InputError as error:
            message = f"no training preview: {error}"
            log.warning(message)
            events.emit("warning", message=message)
            return None
        array, preprocessed = preprocess_image(original, plan)
        return cls(Path(image), array, _grid(preprocessed), _grid(original), run_dir / PREVIEW_FILE)

    def write(self, model2d: torch.nn.Module, model3d: torch.nn.Module, config: dict, plan: Plan,
              device: torch.device, autocast_dtype: torch.dtype | None, step: int, events: Events) -> Path:
        """Predicts the volume with the networks as they are now, writes it atomically (a reader never sees a
        half-written file) and emits a ``preview`` event naming it."""
        started = self.clock()
        network = config["inference"]["network"]
        models = [m for m, used in ((model2d, network in ("2d", "ensemble")), (model3d, network in ("3d", "ensemble")))
                  if used]
        for model in models:
            model.eval()
        try:
            predict = predictor(network, model2d, model3d, network_axes(config, plan.target_spacing),
                                config["model2d"]["chunk_slices"])
            inference = config["inference"]
            probabilities = predict_array(self.array, predict, config["sampling"]["patch_size"], device,
                                          inference["overlap"], inference["sw_batch_size"],
                                          autocast_dtype=autocast_dtype)
        finally:
            for model in models:
                model.train()
        indices = to_input_grid(probabilities, self.preprocessed, self.original)
        write_image(label_image(indices, plan, self.original, largest_component=False), self.out)
        seconds = self.clock() - started
        self.spend(seconds)
        log.info("preview of %s at step %d written in %.1f s", self.image.name, step, seconds)
        events.emit("preview", path=str(self.out), image=str(self.image), step=step, network=network,
                    seconds=round(seconds, 3))
        return self.out
