"""Device choice and the mixed-precision policy (device.py) as pure logic on the CPU.

Not run here (no GPU on these machines): autocast on a real CUDA device, GradScaler stepping with float16, and
resolve_device for existing cuda:N devices.
"""

from __future__ import annotations

import pytest
import torch

from MNSegmentLib.device import AmpPolicy, amp_for, amp_policy, configure_kernels, native_bf16, resolve_device
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


# -- bfloat16 only where the chosen GPU has it natively ----------------------------------------------------------
@pytest.mark.parametrize("capability, dtype", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                               ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_amp_follows_the_chosen_gpus_compute_capability(monkeypatch, capability, dtype):
    """V100 (7.0) and T4 (7.5) emulate bfloat16 (``is_bf16_supported()`` says True there): float16 + scaler.
    Stand-in for the GPU: the capability query, which must be asked about the chosen device (cuda:1 here)."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts there
    policy = amp_for(torch.device("cuda:1"), True)
    assert policy == AmpPolicy(dtype, dtype == torch.float16)
    assert asked == [torch.device("cuda:1")]
    assert amp_for(torch.device("cuda:1"), False) == AmpPolicy(None, False)


def test_native_bf16():
    assert not native_bf16((7, 5)) and native_bf16((8, 0)) and native_bf16((8, 6)) and native_bf16((12, 0))


# -- train.deterministic ------------------------------------------------------------------------------------------
@pytest.fixture
def kernel_state():
    saved = torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled()
    yield
    torch.backends.cudnn.benchmark = saved[0]
    torch.use_deterministic_algorithms(saved[1])


def test_cuda_kernels_are_fast_unless_deterministic_is_asked(kernel_state):
    configure_kernels(torch.device("cuda"), deterministic=False)
    assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    configure_kernels(torch.device("cuda"), deterministic=True)
    assert not torch.backends.cudnn.benchmark and torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()  # warn, don't fail, where CUDA has none


def test_cpu_kernels_are_left_alone(kernel_state):
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(False)
    for deterministic in (True, False):
        configure_kernels(torch.device("cpu"), deterministic)
        assert not torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
