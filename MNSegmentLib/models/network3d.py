"""The 3D network: any MONAI network, chosen by name with keyword arguments."""

from __future__ import annotations

import copy
import inspect

import torch
from monai.networks import nets
from torch import nn

from MNSegmentLib.errors import InputError


def build_model3d(model3d: dict, num_classes: int) -> nn.Module:
    name = model3d["name"]
    network = getattr(nets, name, None)
    if not (inspect.isclass(network) and issubclass(network, nn.Module)):
        raise InputError(f"model3d.name={name}: not a network in monai.networks.nets (e.g. UNet, DynUNet, "
                         "SwinUNETR, SegResNet, BasicUNet)")
    accepted = inspect.signature(network).parameters
    args = {key: value for key, value in (("spatial_dims", 3), ("in_channels", 1), ("out_channels", num_classes))
            if key in accepted}
    args.update(model3d.get("kwargs", {}))
    try:
        return network(**args)
    except (TypeError, ValueError, AssertionError, KeyError) as err:
        raise InputError(f"model3d: {name}({', '.join(f'{k}={v!r}' for k, v in args.items())}) failed: {err}; "
                         "fix model3d.kwargs") from None


def check_patch_size(model: nn.Module, model3d: dict, patch_size: list[int]) -> None:
    """Refuses a patch size the network cannot take (e.g. not divisible by its total stride).

    Runs on PyTorch's "meta" device: shapes only, no memory or compute, so it is instant even for large nets.
    """
    meta = copy.deepcopy(model).to("meta")
    try:
        with torch.no_grad():
            out = meta(torch.zeros(1, 1, *patch_size, device="meta"))
    except RuntimeError as err:
        raise InputError(f"sampling.patch_size={patch_size} does not fit model3d {model3d['name']} "
                         f"({str(err).splitlines()[0]}); use sizes divisible by the network's total stride "
                         "(e.g. multiples of 16)") from None
    out = out[0] if isinstance(out, (list, tuple)) else out
    if tuple(out.shape[2:]) != tuple(patch_size):
        raise InputError(f"model3d {model3d['name']} returns {tuple(out.shape[2:])} for a {tuple(patch_size)} patch;"
                         " choose a patch size divisible by the network's total stride")
