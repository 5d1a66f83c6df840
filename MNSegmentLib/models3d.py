"""The 3D network: any MONAI network, chosen by name with keyword arguments."""

from __future__ import annotations

import inspect

from monai.networks import nets
from torch import nn

from .errors import InputError


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
