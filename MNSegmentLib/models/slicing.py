"""Moving between 3D patches and the 2D slices a 2D network sees."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


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
