"""Who teaches in stage 2, and along which slice directions the 2D network works.

Two optional strengthenings of the reference's teacher (the raw other network, on the student's slice axis):

- ``teacher.ema`` > 0: each network has an exponential-moving-average copy that follows it after every optimiser
  step; the student learns from the EMA copy of the other network (mean-teacher style steadier targets).
- ``teacher.triplanar``: the 2D network is trained on slices along every axis whose in-plane spacing is close to
  isotropic (one axis per step, in turn) and, as a teacher, averages its probabilities over those axes: an
  ensemble of three views of the same patch instead of one.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

#: Largest ratio between the two in-plane spacings of a slice direction the 2D network is given (2.5 mm slices
#: of a 0.6 mm in-plane scan are 4x anisotropic and are left out; a 1 mm or 3 mm isotropic volume keeps all 3).
MAX_INPLANE_ANISOTROPY = 2.0


def slice_axes(spacing: Sequence[float], slice_axis: int, triplanar: bool) -> tuple[int, ...]:
    """The slice directions of the 2D network: ``slice_axis`` first, then (``triplanar``) every other axis whose
    slices have near-isotropic pixels at ``spacing`` (the preprocessed grid's (x, y, z) spacing in mm)."""
    axes = [slice_axis]
    if triplanar:
        for axis in range(3):
            inplane = [s for a, s in enumerate(spacing) if a != axis]
            if axis != slice_axis and max(inplane) / min(inplane) <= MAX_INPLANE_ANISOTROPY:
                axes.append(axis)
    return tuple(axes)


class EmaCopy:
    """A frozen copy of ``model`` kept at ``decay · copy + (1 − decay) · model`` after every :meth:`update`.
    Buffers (normalisation statistics) are copied as they are."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        # only trainable tensors can differ from the copy (frozen encoder weights never move)
        pairs = [(e, p) for e, p in zip(self.model.parameters(), model.parameters()) if p.requires_grad]
        torch._foreach_lerp_([e for e, _ in pairs], [p.detach() for _, p in pairs], 1.0 - self.decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
