"""Tests of the frequency_split front end and its reference (torch_medloss.reference.frequency_split).

The reference is checked against an independent float64 computation: dense matrices A_H, A_W built from the
definition (A[o, c] = sum_k g_k [reflect(o + k) == c], reflect written out index by index, taps from math.exp), so
that low = A_H x A_W^T and the gradient is grad_high + A_H^T (grad_low - grad_high) A_W. The Triton kernels are
tested in test_frequency_split_triton.py against this reference.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

from torch_medloss import functional
from torch_medloss.functional.frequency_split import (
    IDENTITY_SIGMA,
    TRITON_MAX_RADIUS,
    frequency_split,
    gaussian_radius,
    gaussian_taps,
)
from torch_medloss.reference import frequency_split as reference

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------------ independent float64 model


def _reflect(index: int, size: int) -> int:
    """F.pad(mode="reflect") on one index: mirror about the edge pixel, which is not repeated."""
    if index < 0:
        return -index
    if index > size - 1:
        return 2 * (size - 1) - index
    return index


def blur_matrix(size: int, sigma: float) -> torch.Tensor:
    """(size, size) float64 matrix of the 1-D reflect-padded Gaussian, straight from the definition."""
    radius = math.ceil(3 * sigma)
    taps = [math.exp(-(k * k) / (2 * sigma * sigma)) for k in range(-radius, radius + 1)]
    total = math.fsum(taps)
    matrix = torch.zeros(size, size, dtype=torch.float64)
    for out in range(size):
        for k in range(-radius, radius + 1):
            matrix[out, _reflect(out + k, size)] += taps[k + radius] / total
    return matrix


def split_float64(x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    a_h = blur_matrix(x.shape[-2], sigma)
    a_w = blur_matrix(x.shape[-1], sigma)
    low = a_h @ x.double() @ a_w.T
    return low, x.double() - low


def grad_float64(grad_low: torch.Tensor, grad_high: torch.Tensor, sigma: float) -> torch.Tensor:
    a_h = blur_matrix(grad_low.shape[-2], sigma)
    a_w = blur_matrix(grad_low.shape[-1], sigma)
    return grad_high.double() + a_h.T @ (grad_low.double() - grad_high.double()) @ a_w


def _image(shape, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 0.5).to(dtype)


# (B, C, H, W, sigma): odd and prime sizes, H = r + 1 (the smallest image reflect padding allows) on each axis,
# non-square images, several channels and images.
SHAPES = [
    (1, 1, 5, 7, 0.5),
    (2, 3, 11, 13, 0.5),
    (1, 2, 4, 9, 1.0),  # r = 3: H = r + 1
    (2, 1, 17, 4, 1.0),  # W = r + 1
    (1, 3, 23, 19, 1.3),
    (3, 2, 9, 31, 2.0),  # r = 6
    (1, 1, 9, 9, 2.5),  # r = 8: H = W = r + 1
    (2, 2, 29, 13, 4.0),  # r = 12: W = r + 1
    (1, 1, 40, 33, 4.0),
]


def _ids(case):
    return "B{}C{}H{}W{}s{}".format(*case)


# ------------------------------------------------------------------------------------------------ values


@pytest.mark.parametrize("case", SHAPES, ids=_ids)
def test_reference_matches_independent_float64(case):
    *shape, sigma = case
    x = _image(shape, torch.float64, seed=sum(shape))
    low, high = reference.frequency_split(x, sigma)
    expected_low, expected_high = split_float64(x, sigma)
    torch.testing.assert_close(low, expected_low, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(high, expected_high, rtol=1e-12, atol=1e-12)
    # float32 in, float32 out, accumulated in float32.
    low32, high32 = frequency_split(x.float(), sigma, backend="reference")
    assert low32.dtype == high32.dtype == torch.float32
    torch.testing.assert_close(low32.double(), split_float64(x.float(), sigma)[0], rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", SHAPES[1::3], ids=_ids)
def test_high_is_x_minus_low_bitwise(case, dtype):
    *shape, sigma = case
    x = _image(shape, dtype, seed=1)
    low, high = frequency_split(x, sigma)
    assert low.dtype == high.dtype == dtype and low.shape == high.shape == x.shape
    assert torch.equal(high, x - low)
    # low + high gives x back up to the rounding of one sum (and of high) at this dtype.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close((low + high).double(), x.double(), rtol=2 * eps, atol=4 * eps)
    # Half precision: low is the float32 blur rounded once.
    if dtype in (torch.bfloat16, torch.float16):
        expected = split_float64(x.float(), sigma)[0]
        torch.testing.assert_close(low.double(), expected, rtol=eps, atol=eps)


def test_hand_values():
    """A constant image stays constant; an impulse in the middle gives the outer product of the taps; one at pixel
    (1, 1) gives the folded taps: output o gets g_(1-o) directly and g_(1+o) through the mirror at pixel 0."""
    x = torch.full((1, 1, 9, 11), 3.0, dtype=torch.float64)
    low, high = frequency_split(x, 1.0)
    torch.testing.assert_close(low, x, rtol=1e-15, atol=1e-15)
    assert high.abs().max() < 1e-14

    taps = gaussian_taps(1.0)  # r = 3
    impulse = torch.zeros(1, 1, 9, 11, dtype=torch.float64)
    impulse[0, 0, 4, 5] = 1.0
    low, _ = frequency_split(impulse, 1.0)
    expected = torch.zeros(9, 11, dtype=torch.float64)
    expected[1:8, 2:9] = taps[:, None] * taps[None, :]
    torch.testing.assert_close(low[0, 0], expected, rtol=1e-14, atol=1e-16)

    corner = torch.zeros(1, 1, 9, 11, dtype=torch.float64)
    corner[0, 0, 1, 1] = 1.0
    low, _ = frequency_split(corner, 1.0)
    g0, g1, g2, g3 = taps[3:].tolist()
    folded = torch.tensor([2 * g1, g0 + g2, g1 + g3, g2, g3], dtype=torch.float64)  # outputs 0..4
    torch.testing.assert_close(low[0, 0, :5, :5], folded[:, None] * folded[None, :], rtol=1e-14, atol=1e-16)
    assert low[0, 0, 5:].abs().max() == 0 and low[0, 0, :, 5:].abs().max() == 0


@pytest.mark.parametrize("sigma", [0.1, 0.5, 0.9, 1.0, 2.2, 4.0, 10.0])
def test_taps(sigma):
    radius = gaussian_radius(sigma)
    assert radius == math.ceil(3 * sigma)
    taps = gaussian_taps(sigma)
    assert taps.dtype == torch.float64 and taps.shape == (2 * radius + 1,)
    assert abs(taps.sum().item() - 1.0) < 1e-15
    assert torch.equal(taps, taps.flip(0))
    assert torch.all(taps[1 : radius + 1] > taps[:radius])  # rises to the centre
    raw = [math.exp(-(k * k) / (2 * sigma * sigma)) for k in range(-radius, radius + 1)]
    torch.testing.assert_close(taps, torch.tensor(raw, dtype=torch.float64) / math.fsum(raw), rtol=1e-15, atol=0)
    assert abs(gaussian_taps(sigma, torch.float32).sum().item() - 1.0) < 1e-6


@pytest.mark.parametrize("sigma", [5e-324, 1e-200, 1e-162, 1e-20, 1e-3, 0.02])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_tiny_sigma_is_the_identity(sigma, dtype):
    """sigma <= IDENTITY_SIGMA: taps [0, 1, 0], low = x and high = 0 exactly (no NaN where sigma^2 underflows), the
    gradient grad_low, and the same result as sigma = IDENTITY_SIGMA bit for bit."""
    assert sigma <= IDENTITY_SIGMA and gaussian_radius(sigma) == 1
    assert torch.equal(gaussian_taps(sigma), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    x = _image((2, 3, 5, 4), dtype, seed=7).requires_grad_()
    low, high = frequency_split(x, sigma)
    assert torch.equal(low, x) and torch.equal(high, torch.zeros_like(x))
    assert torch.equal(low, frequency_split(x, IDENTITY_SIGMA)[0])
    grad_low, grad_high = _image(x.shape, dtype, seed=8), _image(x.shape, dtype, seed=9)
    (grad_x,) = torch.autograd.grad((low, high), x, (grad_low, grad_high))
    # grad_high + (grad_low - grad_high): two roundings in x's dtype, a few ulps of the larger gradient in bfloat16.
    scale = 4 * torch.finfo(dtype).eps * max(grad_low.abs().max().item(), grad_high.abs().max().item())
    torch.testing.assert_close(grad_x, grad_low, rtol=0, atol=scale)


def test_sigma_whose_radius_overflows():
    """3 sigma = inf: no OverflowError from ceil, the too-small-image ValueError."""
    with pytest.raises(ValueError, match=r"x is too small for sigma=1e\+308: r = ceil\(3 sigma\) is infinite"):
        frequency_split(torch.zeros(1, 1, 8, 8), 1e308)


def test_layouts_and_functional():
    """channels_last and strided inputs give the contiguous result; functional.frequency_split is this op."""
    assert functional.frequency_split is frequency_split
    x = _image((2, 3, 12, 10), seed=5)
    low, high = frequency_split(x, 1.2)
    for variant in (x.contiguous(memory_format=torch.channels_last), x.transpose(-1, -2).contiguous().mT):
        low_v, high_v = frequency_split(variant, 1.2)
        torch.testing.assert_close(low_v, low, rtol=1e-6, atol=1e-6)
        assert torch.equal(high_v, variant - low_v)


# ------------------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("case", SHAPES[:6:2] + SHAPES[7:8], ids=_ids)
def test_reference_gradient_is_the_adjoint(case):
    """Autograd of the reference equals grad_high + A_H^T (grad_low - grad_high) A_W from the dense matrices (the
    formula the Triton backward implements), also next to the border, where A^T is not the blur."""
    *shape, sigma = case
    x = _image(shape, torch.float64, seed=2).requires_grad_()
    grad_low = _image(shape, torch.float64, seed=3)
    grad_high = _image(shape, torch.float64, seed=4)
    low, high = reference.frequency_split(x, sigma)
    (grad_x,) = torch.autograd.grad((low, high), x, (grad_low, grad_high), retain_graph=True)
    torch.testing.assert_close(grad_x, grad_float64(grad_low, grad_high, sigma), rtol=1e-12, atol=1e-12)
    # Not the blur again: the transpose differs from A at the border for every sigma here.
    a_h = blur_matrix(shape[-2], sigma)
    assert not torch.allclose(a_h, a_h.T)
    # The loss scaled by 2 scales the gradient by 2, exactly.
    (twice,) = torch.autograd.grad((low, high), x, (2 * grad_low, 2 * grad_high))
    assert torch.equal(twice, 2 * grad_x)


@pytest.mark.parametrize("layout, seed", [("contiguous", 0), ("channels_last", 1)])
def test_gradcheck_float64(layout, seed):
    x = _image((1, 2, 5, 6), torch.float64, seed=seed)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    for sigma in (0.5, 1.1):
        assert torch.autograd.gradcheck(lambda t, s=sigma: frequency_split(t, s, backend="reference"), (x,))
    assert torch.autograd.gradgradcheck(lambda t: frequency_split(t, 0.7, backend="reference"), (x,), fast_mode=True)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "args, error, match",
    [
        (([[1.0]], 1.0), TypeError, "x must be a torch.Tensor, got list"),
        ((torch.zeros(1, 1, 8, 8, dtype=torch.int64), 1.0), TypeError, "x must be a floating tensor.*int64"),
        ((torch.zeros(1, 1, 8, 8, dtype=torch.bool), 1.0), TypeError, "x must be a floating tensor.*bool"),
        ((torch.zeros(1, 8, 8), 1.0), ValueError, r"x must have shape \(B, C, H, W\), got \(1, 8, 8\)"),
        ((torch.zeros(1, 1, 1, 8, 8), 1.0), ValueError, r"x must have shape \(B, C, H, W\)"),
        ((torch.zeros(1, 1, 8, 8), 0.0), ValueError, "sigma must be a finite number > 0, got 0.0"),
        ((torch.zeros(1, 1, 8, 8), -1.0), ValueError, "sigma must be a finite number > 0, got -1.0"),
        ((torch.zeros(1, 1, 8, 8), float("nan")), ValueError, "sigma must be a finite number > 0, got nan"),
        ((torch.zeros(1, 1, 8, 8), float("inf")), ValueError, "sigma must be a finite number > 0, got inf"),
        ((torch.zeros(1, 1, 8, 8), True), TypeError, "sigma must be a real number, got bool"),
        ((torch.zeros(1, 1, 8, 8), "1.0"), TypeError, "sigma must be a real number, got str"),
        ((torch.zeros(1, 1, 8, 8), torch.tensor(1.0)), TypeError, "sigma must be a real number, got Tensor"),
        ((torch.zeros(1, 1, 3, 8), 1.0), ValueError, r"r = ceil\(3 sigma\) = 3 needs H and W > 3, got H=3, W=8"),
        ((torch.zeros(1, 1, 8, 4), 1.1), ValueError, r"r = ceil\(3 sigma\) = 4 needs H and W > 4, got H=8, W=4"),
    ],
)
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        frequency_split(*args)


def test_bad_backend():
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        frequency_split(x, 1.0, backend="cpp_fast")
    with pytest.raises(TypeError, match="backend must be a str"):
        frequency_split(x, 1.0, backend=None)
    with pytest.raises(ValueError, match="frequency_split has no 'cpp' backend"):
        frequency_split(x, 1.0, backend="cpp")


@pytest.mark.skipif(INTERPRETED, reason="TRITON_INTERPRET=1 lets the Triton backend run on CPU tensors")
def test_triton_backend_on_cpu_raises():
    with pytest.raises(ValueError, match="backend='triton' cannot run frequency_split: Triton kernels need CUDA"):
        frequency_split(torch.zeros(1, 1, 8, 8), 1.0, backend="triton")


def test_fusion_blockers():
    """float64 and r > TRITON_MAX_RADIUS: a named "triton" raises; "auto" on CPU runs the reference without a
    warning (it would not have run Triton anyway)."""
    with pytest.raises(ValueError, match="cannot run frequency_split: the Triton kernels take float32, bfloat16"):
        frequency_split(torch.zeros(1, 1, 8, 8, dtype=torch.float64), 1.0, backend="triton")
    big = TRITON_MAX_RADIUS + 1
    sigma = big / 3
    assert gaussian_radius(sigma) == big
    with pytest.raises(ValueError, match=f"take r = ceil\\(3 sigma\\) <= {TRITON_MAX_RADIUS}, got r = {big}"):
        frequency_split(torch.zeros(1, 1, big + 1, big + 1), sigma, backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        low, high = frequency_split(torch.ones(1, 1, 8, 8, dtype=torch.float64), 1.0)
    assert low.dtype == torch.float64 and torch.equal(high, torch.ones_like(low) - low)


def test_empty_batch():
    low, high = frequency_split(torch.zeros(0, 3, 8, 8), 1.0)
    assert low.shape == high.shape == (0, 3, 8, 8)


@pytest.mark.parametrize("shape", [(2, 0, 8, 8), (0, 0, 8, 8), (0, 3, 8, 8)])
@pytest.mark.parametrize("dtype, layout", [(torch.float32, "contiguous"), (torch.float64, "channels_last"),
                                           (torch.bfloat16, "contiguous")])
def test_empty_channels_and_batch(shape, dtype, layout):
    """C = 0 (F.pad used to raise from inside) and B = 0: empty low and high of x's shape, dtype and layout, and an
    empty gradient; the size check still applies."""
    x = torch.zeros(shape, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    low, high = frequency_split(x, 1.0)
    for out in (low, high):
        assert out.shape == shape and out.dtype == dtype and out.stride() == x.stride()
    (grad,) = torch.autograd.grad((low, high), x, (torch.ones_like(low), torch.ones_like(high)))
    assert grad.shape == shape
    with pytest.raises(ValueError, match=r"needs H and W > 3, got H=3, W=8"):
        frequency_split(torch.zeros(shape[0], shape[1], 3, 8, dtype=dtype), 1.0)
