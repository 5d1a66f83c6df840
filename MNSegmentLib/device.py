"""Choosing the device and the mixed-precision policy (pure logic, testable without a GPU)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from MNSegmentLib.errors import InputError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> first CUDA GPU if there is one, else CPU; ``cuda[:N]`` must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"--device {name}: no CUDA GPU is usable here (torch {torch.__version__} "
                             f"{'has no CUDA support' if torch.version.cuda is None else 'sees none'}); "
                             "use --device cpu or install a CUDA build of torch")
        if (device.index or 0) >= count:
            raise InputError(f"--device {name}: only {count} GPU(s) present (cuda:0..cuda:{count - 1})")
    elif device.type != "cpu":
        raise InputError(f"--device {name}: use auto, cpu, cuda or cuda:N")
    return device


@dataclass(frozen=True)
class AmpPolicy:
    dtype: torch.dtype | None  # autocast dtype; None = full precision
    use_scaler: bool  # float16 needs loss scaling; bfloat16 does not


def amp_policy(device_type: str, enabled: bool, bf16_supported: bool) -> AmpPolicy:
    """Mixed precision only on CUDA: bfloat16 where the GPU has it (Ampere and newer), else float16."""
    if not enabled or device_type != "cuda":
        return AmpPolicy(None, False)
    return AmpPolicy(torch.bfloat16, False) if bf16_supported else AmpPolicy(torch.float16, True)


def native_bf16(capability: tuple[int, int]) -> bool:
    """bfloat16 tensor cores from compute capability 8.0 (Ampere). ``torch.cuda.is_bf16_supported()`` also
    counts emulation (T4 7.5, V100 7.0), where bfloat16 is slow, and looks at the current device, not ours."""
    return tuple(capability) >= (8, 0)


def amp_for(device: torch.device, enabled: bool) -> AmpPolicy:
    bf16 = device.type == "cuda" and native_bf16(torch.cuda.get_device_capability(device))
    return amp_policy(device.type, enabled, bf16)


def configure_kernels(device: torch.device, deterministic: bool) -> None:
    """On CUDA, either reproducible kernels (``train.deterministic``: slower, and warns where CUDA has none) or
    the fastest ones, chosen once per shape by cuDNN's benchmark (training patches have one fixed shape).
    CPU kernels are reproducible as they are: nothing to set."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = not deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
