"""frequency_split on every backend that runs here, against an independent float64 model, from one set of case
builders; then the reference's own exactness, the front end's checks and dispatch, and the Triton op's machinery.

The model: dense matrices A_H, A_W built from the definition (A[o, c] = sum_k g_k [reflect(o + k) == c], reflect
written out index by index, taps from math.exp), so that low = A_H x A_W^T and the gradient is grad_high + A_H^T
(grad_low - grad_high) A_W.

Backends (tests/backends.py): "reference" (F.pad and two depthwise conv2d, torch_medloss.reference.frequency_split)
and "triton" (kernels/frequency_split.py through torch_medloss.ops.frequency_split: on a GPU when there is one, else
on CPU tensors through Triton's interpreter, which conftest.py switches on). Tolerances against the model: float64
1e-12 (the reference); float32 2e-5 (absolute and relative; the images are O(1), the error a few float32 ulps from
another summation order); bfloat16 and float16 one ulp of the output (eps relative), since low is the float32 blur
rounded once. ``high == x - low`` is always checked bit for bit. Shapes are tiny; some Triton cases shrink the
window (kernel._TILE) so that an image has several windows per axis, and the programs wanted
(kernel._TARGET_PROGRAMS) so that a program walks several planes.

The ahead-of-time compile for sm_90 runs in the one subprocess that compiles every op's kernels
(helpers.compile_check), started in the background when its test is selected.
"""

from __future__ import annotations

import functools
import importlib
import math
import warnings
from typing import NamedTuple

import backends
import pytest
import torch

import helpers
from torch_medloss import _contract as K
from torch_medloss import functional
from torch_medloss.functional.frequency_split import frequency_split, gaussian_radius, gaussian_taps
from torch_medloss.ops import frequency_split as op
from torch_medloss.reference import frequency_split as reference

IDENTITY_SIGMA = K.FREQUENCY_SPLIT_IDENTITY_SIGMA
TRITON_MAX_RADIUS = K.FREQUENCY_SPLIT_TRITON_MAX_RADIUS
FP32 = dict(rtol=2e-5, atol=2e-5)
# Tiny convolutions and interpreted kernels in a loop: one torch thread (conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=backends.params("reference", "triton"))
def backend(request):
    return request.param


TRITON_ONLY = pytest.mark.parametrize("backend", backends.params("triton"))
CUDA = pytest.mark.skipif(not (backends.HAS_CUDA and backends.HAS_TRITON), reason="needs a CUDA device and triton")
COMPILED = pytest.mark.skipif(backends.INTERPRETING, reason="runs the compiled kernels, not the interpreter")


def on_backends(values, ids, runs_on=lambda backend, value: True) -> list:
    """pytest params (backend, value): every value on each backend (with the backend's skip marks) that takes it."""
    return [pytest.param(p.values[0], value, marks=p.marks, id=f"{p.id}-{ident}")
            for p in backends.params("reference", "triton") for value, ident in zip(values, ids, strict=True)
            if runs_on(p.values[0], value)]


def _no_float64_on_triton(backend: str, dtype: torch.dtype) -> bool:
    return not (backend == "triton" and dtype == torch.float64)  # the Triton kernels take no float64


def _has_nvidia_backend() -> bool:
    if not backends.HAS_TRITON:
        return False
    import triton.backends

    return "nvidia" in triton.backends.backends


@pytest.fixture(scope="module", autouse=True)
def _compile_in_background(request):
    """Start the shared sm_90 compile subprocess now when its test is selected: it compiles on the other core while
    the interpreted tests run (helpers.compile_result)."""
    if any(item.name.startswith("test_triton_compiles_for_sm90") for item in request.session.items) and \
            _has_nvidia_backend():
        helpers.start_compile_checks()


def _kernels():
    """kernels/frequency_split.py, its ops registered and given autograd (torch_medloss.ops.frequency_split)."""
    op._triton_ops()
    return importlib.import_module("torch_medloss.kernels.frequency_split")


# ------------------------------------------------------------------------------------ independent float64 model


def _reflect(index: int, size: int) -> int:
    """F.pad(mode="reflect") on one index: mirror about the edge pixel, which is not repeated."""
    if index < 0:
        return -index
    if index > size - 1:
        return 2 * (size - 1) - index
    return index


@functools.cache
def blur_matrix(size: int, sigma: float) -> torch.Tensor:
    """(size, size) float64 matrix of the 1-D reflect-padded Gaussian, straight from the definition (read only)."""
    radius = math.ceil(3 * sigma)
    taps = [math.exp(-(k * k) / (2 * sigma * sigma)) for k in range(-radius, radius + 1)]
    total = math.fsum(taps)
    matrix = torch.zeros(size, size, dtype=torch.float64)
    for out in range(size):
        for k in range(-radius, radius + 1):
            matrix[out, _reflect(out + k, size)] += taps[k + radius] / total
    return matrix


def split_float64(x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().double().cpu()
    low = blur_matrix(x.shape[-2], sigma) @ x @ blur_matrix(x.shape[-1], sigma).T
    return low, x - low


def grad_float64(grad_low: torch.Tensor, grad_high: torch.Tensor, sigma: float) -> torch.Tensor:
    grad_low, grad_high = grad_low.double().cpu(), grad_high.double().cpu()
    a_h, a_w = blur_matrix(grad_low.shape[-2], sigma), blur_matrix(grad_low.shape[-1], sigma)
    return grad_high + a_h.T @ (grad_low - grad_high) @ a_w


# ---------------------------------------------------------------------------------------------------- case builders


def _image(shape, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 0.5).to(dtype)


def make(shape, dtype, layout, generator, device="cpu"):
    """2 N(0, 1) + 0.5 in ``dtype`` and ``layout``: "contiguous", "channels_last", "transposed" (H stride 1: a
    (B, C, W, H) tensor viewed transposed) or "strided" (every other row and column of a bigger tensor)."""
    x = (2 * torch.randn(shape, generator=generator) + 0.5).to(dtype).to(device)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":
        tall = torch.zeros(shape[0], shape[1], 2 * shape[2], 2 * shape[3], dtype=dtype, device=device)
        tall[:, :, ::2, ::2] = x
        return tall[:, :, ::2, ::2]
    return x


def tolerance(dtype: torch.dtype) -> dict:
    if dtype == torch.float64:
        return dict(rtol=1e-12, atol=1e-12)
    if dtype == torch.float32:
        return FP32
    return dict(rtol=torch.finfo(dtype).eps, atol=1e-5)


def check_split(backend, x, sigma, generator):
    """frequency_split of x on ``backend`` against the model: dtypes, shapes and a channels_last layout kept; high ==
    x - low bit for bit; low (and high in float32) within the tolerance; low + high gives x back up to the rounding
    of one sum; the gradient under random upstream gradients. Returns (low, high, grad_x)."""
    dtype, tol = x.dtype, tolerance(x.dtype)
    leaf = x.detach().requires_grad_()  # the strides of x (clone() would make a strided view dense)
    low, high = frequency_split(leaf, sigma, backend=backend)
    assert low.dtype == high.dtype == dtype and low.shape == high.shape == x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert low.is_contiguous(memory_format=torch.channels_last), (low.stride(), x.stride())
        assert high.is_contiguous(memory_format=torch.channels_last), (high.stride(), x.stride())
    assert torch.equal(high, x - low), "high != x - low"
    want_low, want_high = split_float64(x, sigma)
    torch.testing.assert_close(low.detach().double().cpu(), want_low, **tol)
    if dtype == torch.float32:
        torch.testing.assert_close(high.detach().double().cpu(), want_high, **tol)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close((low + high).detach().double(), x.double(), rtol=2 * eps, atol=4 * eps)

    grad_low = torch.randn(x.shape, generator=generator).to(dtype).to(x.device)
    grad_high = torch.randn(x.shape, generator=generator).to(dtype).to(x.device)
    (grad_x,) = torch.autograd.grad((low, high), leaf, (grad_low, grad_high))
    assert grad_x.dtype == dtype and grad_x.shape == x.shape
    want_grad = grad_float64(grad_low, grad_high, sigma)
    if backend == "reference" and dtype in (torch.bfloat16, torch.float16):
        # The reference's half-precision gradient rounds twice: grad_high + (the blurred difference, rounded).
        scale = 4 * eps * max(grad_low.abs().max().item(), grad_high.abs().max().item())
        tol = dict(rtol=eps, atol=scale)
    torch.testing.assert_close(grad_x.double().cpu(), want_grad, **tol)
    return low.detach(), high.detach(), grad_x


class Case(NamedTuple):
    shape: tuple[int, int, int, int]
    sigma: float
    dtype: torch.dtype
    layout: str
    tile: int | None = None  # Triton's window side (kernel._TILE); None: the default, 32
    target: int | None = None  # Triton's programs wanted (kernel._TARGET_PROGRAMS); None: the default, 1024


def _grid() -> list[Case]:
    """Sizes from r + 1 to 40 (odd, prime, non-square), sigma 0.5 to 3, B <= 2, C <= 3, float32/bfloat16/float16,
    contiguous, channels_last, transposed and strided inputs; on Triton with three window settings: windows of 64
    (up to the image), then of 16 (several per axis) with several planes per program and with one plane per program
    (the default window, 32, is the other cases')."""
    sigmas = [0.5, 0.8, 1.0, 1.7, 2.3, 3.0]
    layouts = ["contiguous", "channels_last", "transposed", "strided"]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float16]
    cases = []
    for tile, target in [(64, 1024), (16, 1024), (16, 1)]:
        for i, sigma in enumerate(sigmas):
            radius = math.ceil(3 * sigma)
            sizes = [(radius + 1, 2 * radius + 3), (17 + i, radius + 1), (37, 29 + 2 * i)]
            for j, (height, width) in enumerate(sizes):
                k = i + j + tile
                cases.append(Case((1 + k % 2, 1 + k % 3, height, width), sigma, dtypes[k % 4],
                                  layouts[(k // 2) % 4], tile, target))
    return cases


# The grid, then the default window (32) with several windows per axis and r = 12 (sigma 4) at H = r + 1 and
# beyond, then odd and prime sizes (H = r + 1 on each axis) in every half-precision dtype.
CASES = _grid() + [
    Case((1, 2, 70, 131), 1.0, torch.float32, "contiguous"),
    Case((2, 1, 13, 45), 4.0, torch.float32, "channels_last"),
    Case((1, 1, 50, 41), 4.0, torch.bfloat16, "contiguous"),
] + [Case(shape, sigma, dtype, "contiguous") for shape, sigma in (((2, 3, 11, 13), 0.5), ((2, 1, 17, 4), 1.0),
                                                                  ((1, 1, 9, 9), 2.5))
     for dtype in (torch.float32, torch.bfloat16, torch.float16)]


def _case_id(case: Case) -> str:
    window = "" if case.tile is None else f"-T{case.tile}-P{case.target}"
    return "B{}C{}H{}W{}".format(*case.shape) + f"-s{case.sigma}-{str(case.dtype)[6:]}-{case.layout}{window}"


# ------------------------------------------------------------------------------------------------- values and grads


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_float64_model(backend, case, monkeypatch):
    if backend == "triton" and case.tile is not None:
        kernel = _kernels()
        monkeypatch.setattr(kernel, "_TILE", case.tile)
        monkeypatch.setattr(kernel, "_TARGET_PROGRAMS", case.target)
    generator = torch.Generator().manual_seed(sum(case.shape))
    x = make(case.shape, case.dtype, case.layout, generator, backends.device(backend))
    check_split(backend, x, case.sigma, generator)


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


@pytest.mark.parametrize("case", SHAPES, ids=_ids)
def test_reference_matches_independent_float64(case):
    """The reference in float64 is the model to 1e-12, high == x - low bit for bit and low + high gives x back;
    float32 in, float32 out, accumulated in float32."""
    *shape, sigma = case
    x = _image(shape, torch.float64, seed=sum(shape))
    low, high = reference.frequency_split(x, sigma)
    expected_low, expected_high = split_float64(x, sigma)
    torch.testing.assert_close(low, expected_low, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(high, expected_high, rtol=1e-12, atol=1e-12)
    low, high = frequency_split(x, sigma)  # "auto": the reference on CPU tensors
    assert low.dtype == high.dtype == torch.float64 and torch.equal(high, x - low)
    eps = torch.finfo(torch.float64).eps
    torch.testing.assert_close(low + high, x, rtol=2 * eps, atol=4 * eps)
    low32, high32 = frequency_split(x.float(), sigma, backend="reference")
    assert low32.dtype == high32.dtype == torch.float32
    torch.testing.assert_close(low32.double(), split_float64(x.float(), sigma)[0], rtol=1e-5, atol=2e-6)


def test_hand_values(backend):
    """A constant image stays constant; an impulse in the middle gives the outer product of the taps; one at pixel
    (1, 1) gives the folded taps: output o gets g_(1-o) directly and g_(1+o) through the mirror at pixel 0. In
    float64 on the reference (to 1e-15), in float32 on Triton (to a few ulps)."""
    if backend == "reference":
        dtype, constant, rtol, atol = torch.float64, 1e-15, 1e-14, 1e-16
    else:
        dtype, constant, rtol, atol = torch.float32, 1e-6, 2e-6, 1e-7
    device = backends.device(backend)
    x = torch.full((1, 1, 9, 11), 3.0, dtype=dtype, device=device)
    low, high = frequency_split(x, 1.0, backend=backend)
    torch.testing.assert_close(low, x, rtol=constant, atol=constant)
    assert high.abs().max() < 10 * constant

    taps = gaussian_taps(1.0)  # r = 3, float64
    impulse = torch.zeros(1, 1, 9, 11, dtype=dtype, device=device)
    impulse[0, 0, 4, 5] = 1.0
    low, _ = frequency_split(impulse, 1.0, backend=backend)
    expected = torch.zeros(9, 11, dtype=torch.float64)
    expected[1:8, 2:9] = taps[:, None] * taps[None, :]
    torch.testing.assert_close(low[0, 0].double().cpu(), expected, rtol=rtol, atol=atol)

    corner = torch.zeros(1, 1, 9, 11, dtype=dtype, device=device)
    corner[0, 0, 1, 1] = 1.0
    low, _ = frequency_split(corner, 1.0, backend=backend)
    g0, g1, g2, g3 = taps[3:].tolist()
    folded = torch.tensor([2 * g1, g0 + g2, g1 + g3, g2, g3], dtype=torch.float64)  # outputs 0..4
    torch.testing.assert_close(low[0, 0, :5, :5].double().cpu(), folded[:, None] * folded[None, :], rtol=rtol,
                               atol=atol)
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


_TINY = [(sigma, dtype) for sigma in (5e-324, 1e-200, 1e-162, 1e-20, 1e-3, 0.02)
         for dtype in (torch.float64, torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("backend, sigma_dtype", on_backends(
    _TINY, [f"{s}-{str(d)[6:]}" for s, d in _TINY], lambda backend, value: _no_float64_on_triton(backend, value[1])))
def test_tiny_sigma_is_the_identity(backend, sigma_dtype):
    """sigma <= IDENTITY_SIGMA: taps [0, 1, 0], low = x and high = 0 exactly (no NaN where sigma^2 underflows: the
    Triton kernels' fp32 log2_scale overflowed to -inf below ~5e-20 and divided by zero below ~1e-162), the gradient
    grad_low, and the same result as sigma = IDENTITY_SIGMA bit for bit; contiguous and channels_last."""
    sigma, dtype = sigma_dtype
    assert sigma <= IDENTITY_SIGMA and gaussian_radius(sigma) == 1
    assert torch.equal(gaussian_taps(sigma), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    device = backends.device(backend)
    for layout in ("contiguous", "channels_last"):
        x = _image((1, 2, 5, 4), dtype, seed=7).to(device)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        low, high = frequency_split(x, sigma, backend=backend)
        assert torch.equal(low, x) and torch.equal(high, torch.zeros_like(x))
        assert torch.equal(low, frequency_split(x, IDENTITY_SIGMA, backend=backend)[0])
        grad_low, grad_high = _image(x.shape, dtype, seed=8).to(device), _image(x.shape, dtype, seed=9).to(device)
        (grad_x,) = torch.autograd.grad((low, high), x, (grad_low, grad_high))
        # grad_high + (grad_low - grad_high): two roundings in x's dtype, a few ulps of the larger gradient in bf16.
        scale = 4 * torch.finfo(dtype).eps * max(grad_low.abs().max().item(), grad_high.abs().max().item())
        torch.testing.assert_close(grad_x, grad_low, rtol=0, atol=scale)


def test_sigma_whose_radius_overflows():
    """3 sigma = inf: no OverflowError from ceil, the too-small-image ValueError."""
    with pytest.raises(ValueError, match=r"x is too small for sigma=1e\+308: r = ceil\(3 sigma\) is infinite"):
        frequency_split(torch.zeros(1, 1, 8, 8), 1e308)


def test_layouts_and_functional(backend):
    """channels_last and transposed inputs give the contiguous input's result; functional.frequency_split is this
    front end."""
    assert functional.frequency_split is frequency_split
    device = backends.device(backend)
    x = _image((2, 3, 12, 10), seed=5).to(device)
    low, high = frequency_split(x, 1.2, backend=backend)
    for variant in (x.contiguous(memory_format=torch.channels_last), x.transpose(-1, -2).contiguous().mT):
        low_v, high_v = frequency_split(variant, 1.2, backend=backend)
        torch.testing.assert_close(low_v, low, rtol=1e-6, atol=1e-6)
        assert torch.equal(high_v, variant - low_v)


def test_front_end_runs_the_op(backend):
    """The front end runs torch_medloss.ops.frequency_split on the backend it resolves: the same values bit for
    bit; the op names a backend it lacks."""
    x = _image((2, 2, 12, 14), seed=6).to(backends.device(backend))
    low, high = frequency_split(x, 1.0, backend=backend)
    op_low, op_high = op.frequency_split(backend, x, 1.0)
    assert torch.equal(low, op_low) and torch.equal(high, op_high) and torch.equal(high, x - low)
    assert op.BACKENDS == ("triton", "reference")
    with pytest.raises(ValueError, match="frequency_split has no 'cpp' backend"):
        op.frequency_split("cpp", x, 1.0)


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
def test_reference_gradcheck_float64(layout, seed):
    """float64 gradcheck and gradgradcheck of the reference (the Triton kernels take no float64)."""
    x = _image((1, 2, 5, 6), torch.float64, seed=seed)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    for sigma in (0.5, 1.1):
        assert torch.autograd.gradcheck(lambda t, s=sigma: frequency_split(t, s, backend="reference"), (x,))
    assert torch.autograd.gradgradcheck(lambda t: frequency_split(t, 0.7, backend="reference"), (x,), fast_mode=True)


def test_double_backward_is_the_forward_split(backend):
    """The backward is linear in (grad_low, grad_high); its own gradient under v is the forward split of v, (A_H v
    A_W^T, v - A_H v A_W^T) (on Triton: the backward op's autograd formula)."""
    device = backends.device(backend)
    generator = torch.Generator().manual_seed(1)
    x = make((1, 2, 11, 9), torch.float32, "contiguous", generator, device).requires_grad_()
    grads = [torch.randn(x.shape, generator=generator).to(device).requires_grad_() for _ in range(2)]
    v = torch.randn(x.shape, generator=generator).to(device)
    (gx,) = torch.autograd.grad(frequency_split(x, 1.2, backend=backend), x, grads, create_graph=True)
    got = torch.autograd.grad(gx, grads, v)
    for g, want in zip(got, split_float64(v, 1.2), strict=True):
        torch.testing.assert_close(g.double().cpu(), want, **FP32)


def test_bitwise_deterministic(backend, monkeypatch):
    """Run to run: bitwise identical values and gradients (no atomics; a fixed summation order), on Triton with
    windows of 16 (several per axis)."""
    if backend == "triton":
        monkeypatch.setattr(_kernels(), "_TILE", 16)
    x = make((2, 3, 23, 19), torch.float32, "contiguous", torch.Generator().manual_seed(1), backends.device(backend))
    first = check_split(backend, x, 1.0, torch.Generator().manual_seed(5))
    again = check_split(backend, x, 1.0, torch.Generator().manual_seed(5))
    for a, b, what in zip(first, again, ("low", "high", "grad"), strict=True):
        assert torch.equal(a, b), f"{what} differs between two runs"


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


def test_triton_backend_on_cpu_raises(monkeypatch):
    """Without TRITON_INTERPRET=1 (conftest.py sets it on a machine without a GPU), Triton needs CUDA tensors."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
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


_EMPTY = [(shape, dtype, layout) for shape in ((2, 0, 8, 8), (0, 0, 8, 8), (0, 3, 8, 8))
          for dtype, layout in ((torch.float32, "contiguous"), (torch.float64, "channels_last"),
                                (torch.bfloat16, "contiguous"), (torch.float32, "channels_last"))]


@pytest.mark.parametrize("backend, empty", on_backends(
    _EMPTY, ["{}x{}x{}x{}".format(*s) + f"-{str(d)[6:]}-{layout}" for s, d, layout in _EMPTY],
    lambda backend, value: _no_float64_on_triton(backend, value[1])))
def test_empty_channels_and_batch(backend, empty):
    """C = 0 (F.pad used to raise from inside) and B = 0: empty low and high of x's shape, dtype and layout, and an
    empty gradient; the size check still applies."""
    shape, dtype, layout = empty
    x = torch.zeros(shape, dtype=dtype, device=backends.device(backend))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    low, high = frequency_split(x, 1.0, backend=backend)
    for out in (low, high):
        assert out.shape == shape and out.dtype == dtype and out.stride() == x.stride()
    (grad,) = torch.autograd.grad((low, high), x, (torch.ones_like(low), torch.ones_like(high)))
    assert grad.shape == shape
    with pytest.raises(ValueError, match=r"needs H and W > 3, got H=3, W=8"):
        frequency_split(torch.zeros(shape[0], shape[1], 3, 8, dtype=dtype, device=x.device), 1.0, backend=backend)


# ------------------------------------------------------------------------------------------- the Triton op itself


@TRITON_ONLY
def test_triton_launch_sizes(backend):
    """The launch heuristic: windows of 32 up to r = 8, then next_power_of_2(4 r); never above what the image needs;
    the grid covers every pixel and every plane exactly once."""
    kernel = _kernels()
    for shape, radius, expected in [
        ((16, 3, 512, 512), 3, (32, 32, 8)), ((16, 3, 512, 512), 12, (64, 64, 16)),
        ((2, 1, 512, 300), 17, (128, 128, 16)), ((1, 1, 5, 7), 2, (16, 16, 4)), ((1, 1, 40, 33), 3, (32, 32, 8)),
    ]:
        tile_h, tile_w, warps, per_program, stride_h, stride_w, grid = kernel._launch_sizes(shape, radius)
        assert (tile_h, tile_w, warps) == expected, (shape, radius)
        assert stride_h == tile_h - 2 * radius and grid[1] * stride_h >= shape[2] > (grid[1] - 1) * stride_h
        assert grid[0] * stride_w >= shape[3] > (grid[0] - 1) * stride_w
        assert grid[2] * per_program >= shape[0] * shape[1] > (grid[2] - 1) * per_program, (grid, per_program)


@TRITON_ONLY
def test_triton_op_checks(backend):
    """The launchers' own checks, and an empty input."""
    device = backends.device(backend)
    ops = op._triton_ops()
    low, high = ops.frequency_split_triton(torch.zeros(0, 2, 8, 8, device=device), 1.0)
    assert low.shape == high.shape == (0, 2, 8, 8)
    split, bwd = ops.frequency_split_triton, ops.frequency_split_bwd_triton
    zeros = torch.zeros(1, 1, 8, 8, device=device)
    for pattern, fn, args in [
        (r"x must be float32, bfloat16 or float16, got torch.float64", split, (zeros.double(), 1.0)),
        (r"x must have shape \(B, C, H, W\), got \(8, 8\)", split, (zeros[0, 0], 1.0)),
        (r"sigma must be a finite number > 0, got -1.0", split, (zeros, -1.0)),
        (r"needs H and W > 3, got H=3, W=8", split, (zeros[..., :3, :], 1.0)),
        (r"r = ceil\(3 sigma\) = 51 exceeds the kernels' limit 16", split,
         (torch.zeros(1, 1, 60, 60, device=device), 17.0)),
        (r"grad_high has shape \(1, 1, 8, 9\), grad_low has \(1, 1, 8, 8\)", bwd,
         (zeros, torch.zeros(1, 1, 8, 9, device=device), 1.0, torch.float32)),
        (r"dtype must be float32, bfloat16 or float16, got torch.int32", bwd, (zeros, zeros, 1.0, torch.int32)),
    ]:
        with pytest.raises(ValueError, match=pattern):
            fn(*args)


@TRITON_ONLY
def test_opcheck(backend):
    """The schemas and the autograd registration of both ops; on a GPU the full opcheck (fake tensors,
    torch.compile's checks). Under the interpreter the kernels would run on fake tensors: schema and autograd
    registration only."""
    device = backends.device(backend)
    ops = op._triton_ops()
    generator = torch.Generator().manual_seed(7)
    if device.type == "cpu":
        runs = [((1, 2, 9, 10), torch.float32, 1.0, {"test_utils": ("test_schema", "test_autograd_registration")})]
    else:
        runs = [((2, 3, 40, 37), dtype, sigma, {}) for dtype in (torch.float32, torch.bfloat16) for sigma in (1.0, 4.0)]
    for shape, dtype, sigma, utils in runs:
        x = make(shape, dtype, "contiguous", generator, device)
        torch.library.opcheck(ops.frequency_split_triton.default, (x, sigma), **utils)
        torch.library.opcheck(ops.frequency_split_bwd_triton.default,
                              (torch.randn_like(x), torch.randn_like(x), sigma, dtype), **utils)


# ------------------------------------------------------------------------------------------ compiled for sm_90, CPU

helpers.compile_check("frequency_split", """
    kernel = load_kernel("frequency_split")

    def compile_and_count(fn, types, radius, precision):
        tile_h, tile_w, num_warps, *_ = kernel._launch_sizes((16, 3, 512, 512), radius)
        constants = dict(TILE_H=tile_h, TILE_W=tile_w, DOT_PRECISION=precision)
        # The usual specialisation of a contiguous layout: unit W strides become constants.
        constants.update({name: 1 for name in fn.arg_names if name.startswith("stride") and name.endswith("_w")})
        registers, spills = ptxas_report(fn, types, constants, num_warps, float_args=("log2_scale", "inv_norm"))
        print(fn.__name__, types, f"r={radius}", precision, f"T={tile_h}x{tile_w}", f"warps={num_warps}",
              "registers", registers, "spills", spills)

    for dtype in ("*fp32", "*bf16"):
        for radius, precision in [(3, "ieee"), (12, "ieee"), (3, "tf32x3")]:
            compile_and_count(kernel._frequency_split_fwd_kernel,
                              {"x_ptr": dtype, "low_ptr": dtype, "high_ptr": dtype}, radius, precision)
            compile_and_count(kernel._frequency_split_bwd_kernel,
                              {"grad_x_ptr": dtype, "grad_low_ptr": dtype, "grad_high_ptr": dtype}, radius,
                              precision)
""")


@pytest.mark.skipif(not _has_nvidia_backend(), reason="triton has no NVIDIA backend")
def test_triton_compiles_for_sm90():
    """Compile both kernels ahead of time for an H100 (sm_90a) at the heuristic's sizes; no GPU needed.

    The interpreter is lax about types; the compiler is not (branch results, loop-carried values, pointer dtypes).
    ptxas -v reports registers and spills, printed for the GPU session (not asserted: no timing backs a limit yet).
    """
    output, failures = helpers.compile_result("frequency_split")
    print(output)
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------------- CUDA


@CUDA
@COMPILED
@pytest.mark.parametrize("sigma", [1.0, 4.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_realistic_shapes_match_model(dtype, sigma):
    """512^2 images, contiguous, channels_last and transposed: values, high == x - low bitwise, gradients; "auto"
    runs Triton on CUDA tensors."""
    generator = torch.Generator().manual_seed(int(10 * sigma))
    for shape, layout in [
        ((2, 3, 512, 512), "contiguous"),
        ((2, 1, 512, 512), "channels_last"),
        ((1, 3, 509, 263), "transposed"),
    ]:
        x = make(shape, dtype, layout, generator, device="cuda")
        check_split("triton", x, sigma, generator)
    low, _ = frequency_split(x, sigma)
    assert torch.equal(low, op._triton_ops().frequency_split_triton(x, sigma)[0])


@CUDA
@COMPILED
def test_cuda_compile_fullgraph_and_float64_fallback():
    """torch.compile(fullgraph=True) traces the op; float64 under "auto" falls back to the reference with a warning."""
    ops = op._triton_ops()
    x = torch.randn(2, 3, 64, 48, device="cuda", requires_grad=True)
    compiled = torch.compile(lambda t: ops.frequency_split_triton(t, 1.5), fullgraph=True)
    low, high = compiled(x)
    expected_low, _ = reference.frequency_split(x, 1.5)
    torch.testing.assert_close(low, expected_low, **FP32)
    assert torch.equal(high, x - low)
    (low + 2 * high).sum().backward()
    with pytest.warns(UserWarning, match="not float64"):
        frequency_split(x.detach().double(), 1.5)


@CUDA
@COMPILED
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_bandwidth_report(dtype):
    """Prints the forward's bandwidth (one read of x, two writes) against a copy's for B16 C1/C3 512^2; no assert
    (the target, >= 70% of copy bandwidth, is for the benchmark session to judge)."""
    import triton.testing

    split = op._triton_ops().frequency_split_triton
    for channels in (1, 3):
        x = torch.randn(16, channels, 512, 512, device="cuda").to(dtype)
        out = torch.empty_like(x)
        copy_ms = triton.testing.do_bench(lambda out=out, x=x: out.copy_(x))
        for sigma in (1.0, 2.0, 4.0):
            ms = triton.testing.do_bench(lambda s=sigma, x=x: split(x, s))
            bytes_moved = 3 * x.numel() * x.element_size()
            copy_rate = 2 * x.numel() * x.element_size() / copy_ms / 1e6
            rate = bytes_moved / ms / 1e6
            print(
                f"B16 C{channels} 512^2 {dtype} sigma={sigma}: {ms * 1e3:.1f} us, {rate:.0f} GB/s, "
                f"{100 * rate / copy_rate:.0f}% of copy ({copy_rate:.0f} GB/s)"
            )
