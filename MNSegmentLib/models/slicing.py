"""Moving between 3D patches and the 2D slices a 2D network sees."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.checkpoint import checkpoint

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


def network_axes(config: dict, spacing: Sequence[float]) -> tuple[int, ...]:
    """The slice directions a run's 2D network trains along (``teacher.triplanar``) and so predicts along, at the
    preprocessed grid's ``spacing``: a network trained on the slices of three axes predicts each voxel from all
    three and averages them."""
    return slice_axes(spacing, config["data"]["slice_axis"], config["teacher"]["triplanar"])


def to_slices(x: torch.Tensor, axis: int) -> torch.Tensor:
    """(N, C, X, Y, Z) -> (N * S, C, A, B): every slice along spatial ``axis`` (0, 1 or 2) becomes an image."""
    x = x.movedim(2 + axis, 1)  # (N, S, C, A, B)
    return x.reshape(-1, *x.shape[2:])


def from_slices(y: torch.Tensor, batch: int, axis: int) -> torch.Tensor:
    """Inverse of :func:`to_slices` (the channel count may differ: (N * S, K, A, B) -> (N, K, X, Y, Z))."""
    y = y.reshape(batch, -1, *y.shape[1:])  # (N, S, K, A, B)
    return y.movedim(1, 2 + axis)


def apply_2d(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, axis: int, chunk: int,
             recompute: bool = False) -> torch.Tensor:
    """Runs a 2D model over every slice of a 3D batch, ``chunk`` slices at a time, and restacks the output.

    With ``recompute`` (training), each chunk's activations are recomputed in the backward pass instead of
    kept, so memory is bounded by one chunk, not the whole batch of slices.

    Chunked and recomputed results equal one pass over all slices only for a model whose normalisation does not
    depend on the batch, as :class:`models2d.SliceSegmenter`'s does. A BatchNorm layer in training mode would
    normalise each chunk with that chunk's statistics and update its running statistics once per chunk, and
    again in every recomputation.
    """
    slices = to_slices(x, axis)
    outputs = []
    for part in torch.split(slices, max(chunk, 1)):
        if recompute and torch.is_grad_enabled() and len(slices) > chunk:
            outputs.append(checkpoint(model, part, use_reentrant=False))
        else:
            outputs.append(model(part))
    return from_slices(torch.cat(outputs), x.shape[0], axis)
