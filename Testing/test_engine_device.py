"""Device choice and the mixed-precision policy (device.py) as pure logic on the CPU.

Not run here (no GPU on these machines): autocast on a real CUDA device, GradScaler stepping with float16, and
resolve_device for existing cuda:N devices.
"""

from __future__ import annotations

import pytest
import torch

from MNSegmentLib.device import AmpPolicy, amp_for, amp_policy, resolve_device
from MNSegmentLib.errors import InputError


def test_cpu_never_autocasts():
    for enabled in (True, False):
        for bf16 in (True, False):
            assert amp_policy("cpu", enabled, bf16) == AmpPolicy(None, False)


def test_cuda_with_bf16_uses_bfloat16_without_scaler():
    assert amp_policy("cuda", True, True) == AmpPolicy(torch.bfloat16, False)


def test_cuda_without_bf16_uses_float16_with_scaler():
    assert amp_policy("cuda", True, False) == AmpPolicy(torch.float16, True)


def test_disabled_means_full_precision():
    assert amp_policy("cuda", False, True) == AmpPolicy(None, False)
    assert amp_policy("cuda", False, False) == AmpPolicy(None, False)


def test_amp_for_cpu_device():
    assert amp_for(torch.device("cpu"), True) == AmpPolicy(None, False)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("banana", "tpu", "cuda:x"):
        with pytest.raises(InputError, match="--device"):
            resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_gpu_is_an_input_error():
    with pytest.raises(InputError, match="--device cuda"):
        resolve_device("cuda")
