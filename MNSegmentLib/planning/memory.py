"""What a patch voxel costs in training memory, for the planner's optional device-memory budget.

Counted, not guessed: one forward pass records the tensors autograd keeps for the backward pass (the activations,
which grow with the patch), each storage once. Like nnU-Net's feature-map count, it is an estimate: float32 (mixed
precision keeps about half), without the allocator's slack or cuDNN workspaces, so leave headroom.
"""

from __future__ import annotations

import math

import torch
from torch import nn

PROBE_STRIDES = 4  # probe patch side, in multiples of the network's total stride: every level keeps > 1 voxel


def saved_activation_bytes(model: nn.Module, inputs: torch.Tensor) -> int:
    """Bytes of the distinct storages one forward pass keeps for backward, parameters and input excluded."""
    fixed = {p.untyped_storage().data_ptr() for p in model.parameters()} | {inputs.untyped_storage().data_ptr()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in fixed:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(inputs)
    return sum(kept.values())


def activation_bytes_per_voxel(model3d: nn.Module, divisor: int) -> float:
    """Training memory of the 3D network per patch voxel and batch item, measured on a small probe patch on
    the CPU (seconds at most; the memory per voxel of a fully convolutional network hardly depends on the size)."""
    probe = [PROBE_STRIDES * divisor] * 3
    inputs = torch.zeros(1, 1, *probe, requires_grad=True)
    was_training = model3d.training
    model3d.train()
    try:
        return saved_activation_bytes(model3d, inputs) / math.prod(probe)
    finally:
        model3d.train(was_training)
