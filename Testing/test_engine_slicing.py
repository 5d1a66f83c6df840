"""2D <-> 3D slicing (slicing.py): round trips, channel changes, chunking and recomputation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from MNSegmentLib.models.slicing import apply_2d, from_slices, to_slices


def _volume(channels=3):
    torch.manual_seed(0)
    return torch.randn(2, channels, 5, 6, 7)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_to_slices_takes_every_slice_along_axis(axis):
    x = _volume()
    slices = to_slices(x, axis)
    n_slices = x.shape[2 + axis]
    other = [s for i, s in enumerate(x.shape[2:]) if i != axis]
    assert slices.shape == (2 * n_slices, 3, *other)
    for n in range(2):
        for s in range(n_slices):
            assert torch.equal(slices[n * n_slices + s], x[n].select(1 + axis, s))
    assert torch.equal(from_slices(slices, 2, axis), x)


class Counting(nn.Module):
    """A spatial 2D network changing the channel count (3 -> 4); counts its forward calls."""

    def __init__(self, cin=3, cout=4):
        super().__init__()
        torch.manual_seed(1)
        self.conv1 = nn.Conv2d(cin, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, cout, 3, padding=1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.conv2(torch.tanh(self.conv1(x)))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_apply_2d_equals_slice_by_slice_loop(axis):
    x = _volume()
    model = Counting()
    with torch.no_grad():
        out = apply_2d(model, x, axis, chunk=1000)
        expected = torch.stack([torch.stack([model(x[n:n + 1].select(2 + axis, s))[0]
                                             for s in range(x.shape[2 + axis])], dim=1 + axis)
                                for n in range(2)])
    assert out.shape == (2, 4, *x.shape[2:])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("cout", [1, 2, 5])
def test_chunked_equals_unchunked(axis, cout):
    x = _volume()
    model = Counting(cout=cout)
    with torch.no_grad():
        whole = apply_2d(model, x, axis, chunk=10_000)
        calls = model.calls
        chunked = apply_2d(model, x, axis, chunk=3)
    n_slices = 2 * x.shape[2 + axis]
    assert model.calls - calls == -(-n_slices // 3)  # really chunked
    assert whole.shape == (2, cout, *x.shape[2:])
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis", [0, 2])
def test_recompute_gives_the_same_gradients(axis):
    grads = {}
    for recompute in (False, True):
        model = Counting()
        x = _volume().requires_grad_(True)
        weight = torch.linspace(-1, 1, 4 * 5 * 6 * 7).reshape(1, 4, 5, 6, 7)
        out = apply_2d(model, x, axis, chunk=4, recompute=recompute)
        forward_calls = model.calls
        (out * weight).sum().backward()
        # with recompute, every chunk runs forward again in the backward pass
        assert model.calls == (2 * forward_calls if recompute else forward_calls)
        grads[recompute] = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
