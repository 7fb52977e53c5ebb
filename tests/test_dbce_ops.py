"""The DBCE op (torch_medloss.ops.dbce: the pieces ``dbce_masks`` and ``dbce_ce``, and the fused ``dbce_loss``) on
every backend that runs here, against its reference (torch_medloss.reference.dbce_ops), from one set of case
builders; then the op machinery (argument checks, opcheck, gradcheck, torch.compile) and what only one backend has.

Backends (tests/backends.py): "cpp" (csrc/cpu), "triton" (kernels/dbce.py: on a GPU when there is one, else on CPU
tensors through Triton's interpreter, which conftest.py switches on), "cuda" (csrc/cuda, on a GPU) and, where a case
has a value of its own rather than a comparison with the reference (hand-computed values, NaN for bad labels, a finite
loss for a -inf logit), "reference". The masks, counts, areas and invalid counts must equal the reference's bitwise.
The cross entropy and the loss are compared with the reference run in float64 on the same values: float64 at 1e-10,
float32 within float32 rounding, bfloat16 and float16 gradients within two roundings of their dtype (atol: the same
fraction of the largest expected magnitude); values and gradients under one random upstream gradient, and under
twice it (exactly twice the gradient, but in float16).

Sizes. The interpreter runs one program at a time in numpy, at a cost of about the programs times the window steps,
whatever the pixels of a program: the cases every backend runs are tiny, and the Triton-only tests shrink the launch
heuristic so that an image has several programs and a program several tiles. Cases sized for the compiled kernels'
own paths (several CUDA blocks per image, the 8/16/32-bit rank buffers, the C++ tasks' chunks and threads, GPU
volumes) carry ``COMPILED`` and do not run in the interpreter, whose kernels take the same code paths on the tiny
cases. What only one backend has is at the end: the C++ kernels' thread count and instruction sets, the Triton
kernels' int64 offsets and their ahead-of-time compile for sm_90 (in the one subprocess that compiles every op's
kernels, helpers.compile_check, started in the background when its test is selected), the CUDA kernels' launches.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import backends
import pytest
import torch
import torch.nn.functional as F

import helpers
from torch_medloss import _contract as K
from torch_medloss.ops import dbce as op
from torch_medloss.reference import dbce_ops as reference

BALL, CUBE = K.ELEMENT_BALL, K.ELEMENT_CUBE
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
ISOTROPIC, ANISOTROPIC = (1.0, 1.0, 1.0), (2.0, 1.0, 0.7)
REDUCTIONS = ("mean", "sum", "none")
# Against the float64 reference on the same values: sums and the loss accumulate in float32 (float64 for float64
# logits); gradients are rounded once to the logits' dtype.
SUMS_RTOL = {torch.float64: 1e-10, torch.float32: 2e-5}
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps,
             torch.float16: 2 * torch.finfo(torch.float16).eps}
LOSS_GRAD_RTOL = {**GRAD_RTOL, torch.float32: 2e-5}
CUDA_STEP = 4096  # pixels per block step of the CUDA kernels: longer images are summed from several partial rows
CPP_CHUNK = 8192  # pixels per task of csrc/cpu/dbce_kernel.cpp's cross entropy


# ------------------------------------------------------------------------------------------------------ backends


@pytest.fixture(params=backends.params("cpp", "triton", "cuda"))
def backend(request):
    """A fused backend (or, where a test says so, the reference); a compiled one is built or loaded here, never at
    import. The Triton interpreter skips the cases a ``thinned`` grid leaves out."""
    share, axes = getattr(request.function, "interpreted_share", (1, ()))
    if share > 1 and _interpreted(request.param):
        indices = request.node.callspec.indices
        if sum(indices[axis] for axis in axes) % share:
            pytest.skip(f"the Triton interpreter runs one case in {share} of this grid")
    backends.require(request.param)
    return request.param


def _interpreted(backend: str) -> bool:
    return backend == "triton" and backends.INTERPRETING


def thinned(share: int, *axes: str):
    """The Triton interpreter runs one case in ``share`` of this test's grid: those whose indices along ``axes`` (one
    parameter name per parametrize) add up to a multiple of ``share``, so that every value of every axis, and most
    pairs of values, still run. The compiled backends run the whole grid."""

    def mark(test):
        test.interpreted_share = (share, axes)
        return test

    return mark


def _params(names, compiled=False, gpu=False) -> list:
    """pytest params for ``backend`` (indirect): the named backends with their skip marks; ``compiled``: not the
    Triton interpreter (a case sized for compiled kernels); ``gpu``: on a GPU only (a case sized for one)."""
    out = []
    for param in backends.params(*names):
        marks = list(param.marks)
        if param.id == "triton" and compiled:
            marks.append(pytest.mark.skipif(backends.INTERPRETING, reason="sized for compiled kernels, not the "
                                                                          "Triton interpreter"))
        if gpu:
            marks.append(pytest.mark.skipif(not backends.HAS_CUDA or backends.INTERPRETING, reason="GPU-sized"))
        out.append(pytest.param(*param.values, marks=marks, id=param.id))
    return out


def on(*names, compiled=False, gpu=False):
    """Run the test on the named backends (instead of cpp, triton, cuda)."""
    return pytest.mark.parametrize("backend", _params(names, compiled, gpu), indirect=True)


WITH_REFERENCE = on("reference", "cpp", "triton", "cuda")
COMPILED = on("cpp", "triton", "cuda", compiled=True)
CPP = on("cpp")
TRITON = on("triton")
ON_GPU = on("triton", "cuda", gpu=True)


def takes(backend: str, dtype: torch.dtype) -> bool:
    """Float64 logits run on the reference and the C++ CPU kernels only (Triton and CUDA take fp32, bf16, fp16)."""
    return dtype != torch.float64 or backend in ("reference", "cpp")


def on_backends(names, values, ids, runs_on=lambda backend, value: True) -> list:
    """pytest params (backend, value), backend indirect: every value on each named backend that takes it."""
    values, ids = list(values), list(ids)
    return [pytest.param(p.values[0], value, marks=p.marks, id=f"{p.id}-{ident}")
            for p in _params(names) for value, ident in zip(values, ids, strict=True) if runs_on(p.values[0], value)]


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------------- case builders


def make_labels(shape, classes, dtype=torch.int64, ignore_index=-100, *, seed=0, blobs=True, invalid=True):
    """Labels (B, *S): blocky regions, nearest-upsampled from a grid a third of the size with 10% single pixels
    scattered (so that the dilation matters; class 1 is absent when C >= 3: an empty class), or noise; ~15%
    ignore_index where the dtype holds it; with ``invalid`` ~5% labels outside [0, C) on both sides (-3, C, C + 7,
    clamped to the dtype) and, in int64, 2**32 + 1 (which wraps onto class 1 if anything narrows it to int32)."""
    generator = torch.Generator().manual_seed(seed)
    batch, *spatial = shape
    if blobs:
        coarse = [max(1, math.ceil(n / 3)) for n in spatial]
        field = torch.randint(0, classes, (batch, 1, *coarse), generator=generator).double()
        labels = F.interpolate(field, size=spatial, mode="nearest")[:, 0].long()
        scatter = torch.rand(shape, generator=generator) < 0.1
        labels[scatter] = torch.randint(0, classes, (int(scatter.sum()),), generator=generator)
        if classes >= 3:
            labels[labels == 1] = 0
    else:
        labels = torch.randint(0, classes, shape, generator=generator)
    info = torch.iinfo(dtype)
    if info.min <= ignore_index <= info.max:
        labels[torch.rand(shape, generator=generator) < 0.15] = ignore_index
    if invalid:
        bad = torch.rand(shape, generator=generator) < 0.05
        values = torch.tensor([-3, classes, classes + 7])
        labels[bad] = values[torch.randint(0, 3, (int(bad.sum()),), generator=generator)]
        if dtype == torch.int64 and labels.numel() > 1:
            labels.view(-1)[1] = 2**32 + 1
    return labels.clamp(info.min, info.max).to(dtype)


def run_masks(backend, labels, classes, ignore_index, element, radius, spacing):
    """(masks, counts, areas, invalid) of ops.dbce.dbce_masks on the backend's device."""
    return op.dbce_masks(backend, labels.to(backends.device(backend)), classes, ignore_index, element, float(radius),
                         [float(s) for s in spacing])


def check_masks(backend, labels, classes, ignore_index, element, radius, spacing, what):
    """The masks, counts, areas and invalid counts against the reference on the same labels, bitwise; the masks
    contiguous in the mask dtype. Returns them on the CPU."""
    labels = labels.to(backends.device(backend))
    got = run_masks(backend, labels, classes, ignore_index, element, radius, spacing)
    expected = reference.dbce_masks(labels, classes, ignore_index, element, float(radius), [float(s) for s in spacing])
    for name, actual, wanted in zip(("masks", "counts", "areas", "invalid"), got, expected, strict=True):
        assert actual.dtype == wanted.dtype, f"{what}: {name} dtype {actual.dtype} != {wanted.dtype}"
        assert actual.shape == wanted.shape, f"{what}: {name} shape {tuple(actual.shape)} != {tuple(wanted.shape)}"
        actual, wanted = actual.cpu(), wanted.cpu()
        if not torch.equal(actual, wanted):
            where = (actual != wanted).nonzero()[:8].tolist()
            values = [(actual[tuple(i)].item(), wanted[tuple(i)].item()) for i in where]
            pytest.fail(f"{what}: {name} differ at {where}: (got, expected) = {values}")
    assert got[0].is_contiguous(), what
    return tuple(t.cpu() for t in got)


def make_ce_case(backend, batch, classes, pixels, *, dtype=torch.float32, label_dtype=torch.int64,
                 ignore_index=-100, write_map=True, seed=0):
    """(logits, labels, masks, class_weights, ignore_index, write_map) on the backend's device: logits 3 N(0, 1);
    noise labels with ignored and invalid ones; random mask bits, ~10% empty masks, bits >= C set too (the op must
    ignore them), in the mask dtype of C; class weights in [0.25, 2.25), float32 (float64 with float64 logits)."""
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn((batch, classes, pixels), generator=generator, dtype=torch.float64)).to(dtype)
    labels = make_labels((batch, pixels), classes, label_dtype, ignore_index, seed=seed, blobs=False)
    bits = torch.randint(0, 2, (batch, pixels, 64), generator=generator, dtype=torch.int64)
    bits[..., :classes] &= (torch.rand((batch, pixels, 1), generator=generator) < 0.9).long()
    masks = (bits << torch.arange(64)).sum(-1)  # int64: bit 63 wraps onto the sign bit, as intended
    mask_type = reference.mask_dtype(classes)
    masks = masks.to(mask_type) if mask_type != torch.uint8 else (masks & 0xFF).to(torch.uint8)
    weights = 0.25 + 2 * torch.rand((batch, classes), generator=generator, dtype=torch.float64)
    weights = weights.to(torch.float64 if dtype == torch.float64 else torch.float32)
    device = backends.device(backend)
    return logits.to(device), labels.to(device), masks.to(device), weights.to(device), ignore_index, write_map


def ce_pixels(backend, cpu=301):
    """Pixels of a cross-entropy case: two CUDA block steps on a GPU, a program or two in the interpreter."""
    if backends.device(backend).type == "cuda":
        return CUDA_STEP + 37
    return 37 if _interpreted(backend) else cpu


def assert_matches(actual, expected, rtol, what):
    """assert_close with atol = rtol * the largest finite expected magnitude (NaN where expected); failures name the
    case."""
    finite = expected[torch.isfinite(expected)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    torch.testing.assert_close(actual.cpu(), expected.cpu().to(actual.dtype), rtol=rtol, atol=rtol * scale,
                               equal_nan=True, msg=lambda message: f"{what}\n{message}")


def check_ce(backend, args, what):
    """ops.dbce.dbce_ce, forward and backward (through autograd), against the float64 reference on the same values:
    sums and map in the accumulation dtype, the gradient in the logits' dtype and in empty_like's layout, twice the
    upstream gradient giving twice the gradient. Returns (sums, map, gradient)."""
    logits, labels, masks, weights, ignore_index, write_map = args
    batch, _, pixels = logits.shape
    accumulator = torch.float64 if logits.dtype == torch.float64 else torch.float32
    generator = torch.Generator().manual_seed(1)
    grad_sums = torch.randn((batch, 2), generator=generator, dtype=torch.float64).to(logits.device)
    grad_map = torch.randn((batch, pixels), generator=generator, dtype=torch.float64).to(logits.device)

    leaf = logits.detach().requires_grad_(True)  # keeps the strides (a clone would make a strided view dense)
    sums, loss_map = op.dbce_ce(backend, leaf, *args[1:])
    total = (sums * grad_sums.to(sums)).sum() + ((loss_map * grad_map.to(loss_map)).sum() if write_map else 0)
    grad, doubled = (torch.autograd.grad(scale * total, leaf, retain_graph=True)[0] for scale in (1, 2))

    exact_leaf = logits.detach().double().requires_grad_(True)
    expected_sums, expected_map = reference.dbce_ce_fwd(exact_leaf, labels, masks, weights.double(), ignore_index,
                                                        write_map)
    expected_total = (expected_sums * grad_sums).sum() + ((expected_map * grad_map).sum() if write_map else 0)
    (expected_grad,) = torch.autograd.grad(expected_total, exact_leaf)

    assert sums.shape == (batch, 2) and sums.dtype == accumulator, f"{what}: sums {sums.dtype} {tuple(sums.shape)}"
    assert_matches(sums.detach(), expected_sums, SUMS_RTOL[accumulator], f"{what}: sums")
    if write_map:
        assert loss_map.shape == (batch, pixels) and loss_map.dtype == accumulator, f"{what}: map {loss_map.dtype}"
        assert_matches(loss_map.detach(), expected_map, SUMS_RTOL[accumulator], f"{what}: map")
    else:
        assert loss_map.shape == (0,), f"{what}: map {tuple(loss_map.shape)} without write_map"
    assert grad.shape == logits.shape and grad.dtype == logits.dtype, f"{what}: gradient {grad.dtype}"
    assert grad.stride() == torch.empty_like(logits).stride(), f"{what}: gradient strides {grad.stride()}"
    assert_matches(grad.double(), expected_grad, GRAD_RTOL[logits.dtype], f"{what}: gradient")
    if logits.dtype == torch.float16:  # subnormal gradients round differently at twice the size
        assert_matches(doubled.double(), 2 * grad.double(), GRAD_RTOL[logits.dtype], f"{what}: doubled")
    else:
        assert torch.equal(doubled, 2 * grad), f"{what}: twice the upstream gradient did not double the gradient"
    return sums.detach(), loss_map.detach(), grad


def codes(element=BALL, batch=False, reduction=K.REDUCTION_MEAN, ignore_index=-100) -> list[int]:
    """The loss op's codes (torch_medloss._contract)."""
    values = [0] * K.DBCE_NUM_CODES
    values[K.DBCE_CODE_ELEMENT] = element
    values[K.DBCE_CODE_BATCH] = int(batch)
    values[K.DBCE_CODE_REDUCTION] = reduction
    values[K.DBCE_CODE_IGNORE_INDEX] = ignore_index
    return values


def scalars(radius=2.0, spacing=ISOTROPIC) -> list[float]:
    """The loss op's scalars: the radius and the spacing along D, H, W."""
    return [float(radius), *(float(s) for s in spacing)]


def loss_ops(backend):
    """(forward, backward) of the loss op on a fused backend: torch_medloss::dbce_loss_fwd / _bwd (C++ and CUDA) or
    their Triton versions, with autograd registered."""
    if backend == "triton":
        ops = op._triton_ops()
        return ops.dbce_loss_fwd_triton, ops.dbce_loss_bwd_triton
    return torch.ops.torch_medloss.dbce_loss_fwd, torch.ops.torch_medloss.dbce_loss_bwd


def make_logits(shape, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)


LOSS_OPTIONS = dict(radius=2.0, element="ball", spacing=None, batch=False, ignore_index=-100, reduction="mean")


def loss_and_grads(backend, logits, labels, upstream=None, **options):
    """The DBCE loss of ops.dbce.dbce_loss (the loss op on a fused backend, its reference on "reference") for logits
    (B, C, *S) and labels (B, *S) on the backend's device, and d<s upstream, loss>/d logits for s = 1 and 2 (one
    forward, two backwards)."""
    device = backends.device(backend)
    leaf = logits.detach().to(device).requires_grad_(True)
    loss = op.dbce_loss(leaf, labels.to(device), backend=backend, distributed="off", **{**LOSS_OPTIONS, **options})
    upstream = torch.ones_like(loss) if upstream is None else upstream.to(loss)
    grads = []
    for scale in (1, 2):
        (grad,) = torch.autograd.grad((loss * (scale * upstream)).sum(), leaf, retain_graph=True, allow_unused=True)
        grads.append(torch.zeros_like(leaf) if grad is None else grad)
    return loss.detach(), grads


def check_loss(backend, logits, labels, what, **options):
    """Value and gradients (under a random upstream gradient and twice it) against the reference in float64 on the
    same values. Returns (loss, gradient)."""
    reduction = options.get("reduction", LOSS_OPTIONS["reduction"])
    generator = torch.Generator().manual_seed(3)
    upstream = torch.rand(labels.shape if reduction == "none" else (), generator=generator, dtype=torch.float64)
    loss, grads = loss_and_grads(backend, logits, labels, upstream, **options)
    want, want_grads = loss_and_grads("reference", logits.double(), labels, upstream, **options)
    assert loss.shape == want.shape, f"{what}: shape {tuple(loss.shape)} != {tuple(want.shape)}"
    accumulator = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert loss.dtype == accumulator, f"{what}: loss dtype {loss.dtype}"
    assert_matches(loss.double(), want, SUMS_RTOL[accumulator], f"{what}: loss")
    for scale, grad, want_grad in zip((1, 2), grads, want_grads, strict=True):
        assert grad.dtype == logits.dtype and grad.shape == logits.shape, f"{what}: gradient {grad.dtype}"
        assert_matches(grad.double(), want_grad, LOSS_GRAD_RTOL[logits.dtype], f"{what}: gradient x{scale}")
    return loss, grads[0]


# ---------------------------------------------------------------------------------------------------- dbce_masks


@WITH_REFERENCE
def test_masks_hand_computed(backend):
    # One row of 9 pixels: class 0 at 2, class 1 at 7, ignored at 4, invalid (5) at 8; radius 2 along W. Class 0
    # reaches 0..3 (not 4: ignored), class 1 reaches 5..7 (not 8: invalid), class 3 is every valid pixel.
    labels = torch.tensor([[[[3, 3, 0, 3, -1, 3, 3, 1, 5]]]])
    masks, counts, areas, invalid = run_masks(backend, labels, 4, -1, BALL, 2.0, ISOTROPIC)
    assert masks.dtype == torch.uint8
    assert masks.flatten().tolist() == [9, 9, 9, 9, 0, 10, 10, 10, 0]
    assert counts.tolist() == [[1, 1, 0, 5]] and areas.tolist() == [[4, 3, 0, 7]] and invalid.tolist() == [1]
    # 2-D, spacing 1.5 along H: radius 1.5 reaches one row up or down but not diagonally (1.5^2 + 1 > 1.5^2).
    labels = torch.full((1, 1, 3, 3), 1)
    labels[0, 0, 1, 1] = 0
    masks, *_ = run_masks(backend, labels, 2, -100, BALL, 1.5, (1.0, 1.5, 1.0))
    assert masks[0, 0].tolist() == [[2, 3, 2], [3, 3, 3], [2, 3, 2]]
    masks, *_ = run_masks(backend, labels, 2, -100, CUBE, 1.5, (1.0, 1.5, 1.0))
    assert masks[0, 0].tolist() == [[3, 3, 3], [3, 3, 3], [3, 3, 3]]


@WITH_REFERENCE
def test_masks_invalid_labels(backend):
    """Invalid pixels (outside [0, C), neither ignored) get no bits and are counted, and are not dilated; a dilation
    crosses them."""
    labels = torch.tensor([[[[0, 1, 7, -3, -100, 2, 1]]]])
    masks, counts, areas, invalid = run_masks(backend, labels, 3, -100, CUBE, 1.0, ISOTROPIC)
    assert masks.tolist() == [[[[0b011, 0b011, 0, 0, 0, 0b110, 0b110]]]]
    assert invalid.tolist() == [2] and counts.tolist() == [[1, 2, 1]] and areas.tolist() == [[2, 4, 2]]
    labels = torch.tensor([[[[0, 7, -3, 1, 2**40, 1, -100, -(2**40)]]]])
    masks, counts, _, invalid = run_masks(backend, labels, 2, -100, CUBE, 1.0, ISOTROPIC)
    assert invalid.tolist() == [4] and counts.tolist() == [[1, 2]]
    assert masks.flatten().tolist() == [1, 0, 0, 2, 0, 2, 0, 0]
    masks, *_ = run_masks(backend, labels, 2, -100, CUBE, 3.0, ISOTROPIC)
    assert masks.flatten().tolist() == [3, 0, 0, 3, 0, 2, 0, 0]
    for dtype in (torch.uint8, torch.int8):
        narrow = torch.tensor([[[[0, 100, 1, 127]]]], dtype=dtype)
        assert run_masks(backend, narrow, 2, -100, BALL, 1.0, ISOTROPIC)[3].tolist() == [2]
    # 2-D, C = 3: class 0 at (0, 0), 1 at (0, 3), 2 at (1, 1); the cube of radius 1 joins (0, 0) and (1, 1).
    labels = torch.tensor([0, 2**40, -7, 1, 1000, 2, -100, 5]).view(1, 1, 2, 4)
    masks, counts, areas, invalid = run_masks(backend, labels, 3, -100, CUBE, 1.0, ISOTROPIC)
    assert masks[0, 0].tolist() == [[5, 0, 0, 2], [0, 5, 0, 0]] and invalid.tolist() == [4]
    assert counts.tolist() == [[1, 1, 1]] and areas.tolist() == [[2, 1, 2]]


MASK_SHAPES = {"1d": (3, 1, 1, 23), "2d": (2, 1, 11, 13), "3d": (2, 7, 9, 8)}
SPACINGS = {"iso": ISOTROPIC, "aniso": ANISOTROPIC, "fine_d": (0.5, 1.5, 1.0)}


@thinned(4, "shape", "element", "radius", "spacing")
@pytest.mark.parametrize("spacing", SPACINGS.values(), ids=SPACINGS.keys())
@pytest.mark.parametrize("radius", [0.0, 1.0, 1.5, 2.5, 3.0])
@pytest.mark.parametrize("element", [BALL, CUBE], ids=["ball", "cube"])
@pytest.mark.parametrize("shape", MASK_SHAPES.values(), ids=MASK_SHAPES.keys())
def test_masks_match_reference(backend, shape, element, radius, spacing):
    """1-D, 2-D and 3-D maps (leading size-1 dims) by elements, radii and spacings: one pass, a box of two axes,
    a box then a pass; windows clipped to a size-1 axis; C = 2 and 5 (with ignore_index a class)."""
    for classes, ignore_index in ((2, -100), (5, 3)):
        labels = make_labels(shape, classes, ignore_index=ignore_index, seed=classes + int(10 * radius))
        check_masks(backend, labels, classes, ignore_index, element, radius, spacing, f"C={classes}")


@pytest.mark.parametrize("spacing", [ISOTROPIC, ANISOTROPIC], ids=["iso", "aniso"])
@pytest.mark.parametrize("element", [BALL, CUBE], ids=["ball", "cube"])
def test_masks_radius_10(backend, element, spacing):
    """Every window clipped to the image; W and H too wide for a box: three passes (W, H, D) in 3-D. Class 2 is only
    in the first slice, so its dilation must cross the depth."""
    labels = make_labels((2, 4, 9, 14), 3, torch.int32, seed=3)
    labels[:, 1:] = torch.where(labels[:, 1:] == 2, 0, labels[:, 1:])
    check_masks(backend, labels, 3, -100, element, 10.0, spacing, "radius 10")


BOUNDARY_RADII = [(math.sqrt(2), ISOTROPIC), (math.sqrt(3), ISOTROPIC), (3.0, ISOTROPIC), (2.1, (0.7, 0.7, 0.7)),
                  (1.4, ANISOTROPIC), (math.sqrt(2.0**2 + 0.7**2), ANISOTROPIC), (2.0, (0.5, 1.0, 2.0)),
                  (0.3, (0.1, 0.1, 0.1)), (0.3, (1.0, 0.1, 0.1))]


@thinned(2, "radius", "element")
@pytest.mark.parametrize("element", [BALL, CUBE], ids=["ball", "cube"])
@pytest.mark.parametrize("radius, spacing", BOUNDARY_RADII, ids=str)
def test_masks_boundary_radii(backend, radius, spacing, element):
    """Radii on the element's boundary (sqrt 2, sqrt 3, integer multiples of the spacing) keep the reference's
    boundary offsets, radius 2.1 with spacing 0.7 (3 * 0.7 = 2.0999999999999996) its rounding, and radius 0.3 with
    spacing 0.1 (3 * 0.1 = 0.30000000000000004 > 0.3) the 1e-9 tolerance that keeps offset 3: on blocky labels,
    and on two single seeds (the element's exact shape)."""
    labels = make_labels((1, 5, 6, 7), 4, seed=5, invalid=False)
    check_masks(backend, labels, 4, -100, element, radius, spacing, "blobs")
    sparse = torch.full((1, 5, 6, 7), -100)
    sparse[0, 2, 3, 3] = 1
    sparse[0, 0, 5, 0] = 0
    check_masks(backend, sparse, 2, -100, element, radius, spacing, "single seeds")


@thinned(2, "classes", "element")
@pytest.mark.parametrize("element", [BALL, CUBE], ids=["ball", "cube"])
@pytest.mark.parametrize("classes", [1, 2, 5, 8, 9, 16, 17, 32, 33, 64])
def test_masks_classes_and_mask_dtypes(backend, classes, element):
    """Every mask dtype on both sides of its width (uint8, int16, int32, int64 and its sign bit: label 63), every
    label dtype."""
    dtype = LABEL_DTYPES[classes % len(LABEL_DTYPES)]
    ignore_index = 255 if dtype == torch.uint8 else -100
    labels = make_labels((2, 3, 4, 5), classes, dtype, ignore_index, seed=classes, blobs=classes < 17)
    if classes == 64:
        labels.view(-1)[:8] = 63
    masks, *_ = check_masks(backend, labels, classes, ignore_index, element, 1.5, ANISOTROPIC, f"C={classes} {dtype}")
    assert masks.dtype == reference.mask_dtype(classes)


@thinned(3, "dtype", "ignore_index")
@pytest.mark.parametrize("ignore_index", [-100, 0, 2, 4, 255])
@pytest.mark.parametrize("dtype", LABEL_DTYPES, ids=_dtype_id)
def test_masks_label_dtypes_and_ignore_index(backend, dtype, ignore_index):
    """C = 4: ignore_index 0 and 2 are classes, 4 is just past them, -100 and 255 sentinels (255 fits uint8 only, and
    is an invalid label of the other dtypes). Labels are compared at their own dtype: a uint8 156 (-100 wrapped)
    stays invalid, not ignored."""
    labels = make_labels((2, 4, 6, 5), 4, dtype, ignore_index, seed=ignore_index % 7)
    if dtype == torch.uint8:
        labels[0, 0, 0, 1] = 156
    for element, radius in ((BALL, 1.5), (CUBE, 1.0)):
        *_, invalid = check_masks(backend, labels, 4, ignore_index, element, radius, ISOTROPIC, f"{dtype} {element}")
    assert invalid.sum() > 0


STRIDED_LABELS = {
    "transposed": lambda x: x.transpose(1, 3).contiguous().transpose(1, 3),
    "permuted": lambda x: x.permute(3, 0, 2, 1).contiguous().permute(1, 3, 2, 0),
    "w_outermost": lambda x: x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1),
    "sliced": lambda x: x[:, :, ::2, 1::3],
    "strided_w": lambda x: torch.cat([x, x], dim=3)[..., ::2],
    "expanded_d": lambda x: x[:, :1].expand(-1, 4, -1, -1),
    "expanded_b": lambda x: x[:1].expand(3, -1, -1, -1),
}


@pytest.mark.parametrize("make", STRIDED_LABELS.values(), ids=STRIDED_LABELS.keys())
def test_masks_strided_labels(backend, make):
    """Labels are read in place through their strides (stride 0 too): the reference's masks, and the contiguous
    copy's."""
    labels = make(make_labels((2, 4, 6, 8), 5, torch.int16, seed=11))
    assert not labels.is_contiguous()
    for element in (BALL, CUBE):
        got = check_masks(backend, labels, 5, -100, element, 1.5, ANISOTROPIC, f"strided, element {element}")
        contiguous = run_masks(backend, labels.contiguous(), 5, -100, element, 1.5, ANISOTROPIC)
        assert all(torch.equal(a, b.cpu()) for a, b in zip(got, contiguous, strict=True))


@thinned(2, "element", "radius")
@pytest.mark.parametrize("radius", [0.0, 1.0, 2.5, 10.0])
@pytest.mark.parametrize("element", [BALL, CUBE], ids=["ball", "cube"])
def test_masks_all_ignored_absent_classes_and_borders(backend, element, radius):
    labels = torch.full((3, 4, 5, 6), -100)
    labels[1] = 2  # one class fills the image: every valid pixel is its own class's
    labels[2, 0, 0, 0] = 0  # corners and faces: the dilation must stop at the borders
    labels[2, -1, -1, -1] = 3
    labels[2, :, 2, -1] = 1
    masks, counts, areas, invalid = check_masks(backend, labels, 4, -100, element, radius, ANISOTROPIC, "borders")
    assert masks[0].eq(0).all() and counts[0].eq(0).all() and areas[0].eq(0).all()
    assert masks[1].eq(4).all() and counts[1].tolist() == [0, 0, 120, 0] and areas[1].tolist() == [0, 0, 120, 0]
    assert invalid.eq(0).all()


@WITH_REFERENCE
@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 4, 0), (2, 1, 1, 0)], ids=str)
def test_masks_empty(backend, shape):
    """No pixel: no launch, empty masks (uint8 for C = 3), zero counts, areas and invalid counts."""
    masks, counts, areas, invalid = run_masks(backend, torch.zeros(shape, dtype=torch.int64), 3, -100, BALL, 2.0,
                                              ISOTROPIC)
    assert masks.shape == shape and masks.dtype == torch.uint8
    zeros = torch.zeros(shape[0], 3, dtype=torch.int64)
    assert torch.equal(counts.cpu(), zeros) and torch.equal(areas.cpu(), zeros)
    assert torch.equal(invalid.cpu(), torch.zeros(shape[0], dtype=torch.int64))


# Sized for the compiled kernels' own paths.


@COMPILED
@pytest.mark.parametrize("element", [BALL, CUBE], ids=["ball", "cube"])
@pytest.mark.parametrize("radius", [0.0, 1.0, 1.5, 2.0, 3.0, 5.5, 10.0])
@pytest.mark.parametrize("shape, spacing", [
    ((2, 1, 1, 97), ISOTROPIC),
    ((2, 1, 29, 37), ISOTROPIC),
    ((1, 1, 23, 41), (1.0, 0.6, 1.7)),
    ((2, 7, 13, 19), ISOTROPIC),
    ((1, 9, 11, 17), (2.5, 0.8, 1.0)),
], ids=str)
def test_masks_plans_of_the_cuda_kernels(backend, shape, spacing, radius, element):
    """Every plan of the CUDA kernels: one list of offsets (small elements), a window along one axis (1-D), a rank
    pass then a window (2-D past the list, 3-D with a small enough disk of (D, H) offsets), three passes beyond."""
    labels = make_labels(shape, 4, seed=int(radius * 10) + shape[1], invalid=False)
    labels.view(-1)[::97] = 9  # a few invalid labels
    check_masks(backend, labels, 4, -100, element, radius, spacing, f"{shape} R={radius} s={spacing} e={element}")


@COMPILED
@pytest.mark.parametrize("element", [BALL, CUBE], ids=["ball", "cube"])
@pytest.mark.parametrize("classes", [1, 2, 8, 9, 16, 17, 32, 33, 64])
def test_masks_rank_buffers(backend, classes, element):
    """Past the one-list element (R = 4): the rank buffers with C classes per pixel, and R = 2 beside them."""
    labels = make_labels((2, 5, 12, 14), classes, seed=classes, blobs=classes < 20)
    for radius in (2.0, 4.0):
        check_masks(backend, labels, classes, 255, element, radius, ISOTROPIC, f"C={classes} R={radius}")


@COMPILED
@pytest.mark.parametrize("element", [BALL, CUBE], ids=["ball", "cube"])
def test_masks_mixed_reaches(backend, element):
    """Slices of a few pixels (several per C++ task), reaches that differ per axis and exceed some dims, and class
    counts on each side of the 16-class bit-counting switch."""
    shape = (2, 12, 5, 14)
    for index, (radius, spacing) in enumerate([(0.5, (0.4, 1.0, 2.0)), (1.8, (1.3, 0.6, 1.0)),
                                               (4.2, (2.3, 1.1, 0.6)), (6.0, (1.0, 3.0, 0.9))]):
        for classes in (3, 12, 40):
            labels = make_labels(shape, classes, seed=100 + index)
            check_masks(backend, labels, classes, -100, element, radius, spacing,
                        f"radius {radius}, spacing {spacing}, C = {classes}")


@COMPILED
def test_masks_large_images_and_a_window_past_the_image(backend):
    """Images of >= 2**16 pixels (the C++ kernels run them image after image with their rows on the threads; the
    CUDA kernels over several 4096-pixel blocks); a cube larger than the image (too large for structuring_element's
    loop): every valid pixel gets the bits of all the classes present in its image."""
    labels = make_labels((2, 40, 41, 42), 6, torch.uint8, seed=13)
    for element in (BALL, CUBE):
        check_masks(backend, labels, 6, -100, element, 2.5, ANISOTROPIC, f"large, element {element}")
    labels = make_labels((2, 3, 37, 83), 5, seed=11)
    assert labels[0].numel() > 2 * CUDA_STEP
    check_masks(backend, labels, 5, -100, BALL, 3.0, ISOTROPIC, "blocks")
    masks, _, areas, _ = run_masks(backend, labels, 5, -100, CUBE, 500.0, ISOTROPIC)
    valid = (labels >= 0) & (labels < 5)
    present = [sum(1 << c for c in range(5) if bool((labels[b][valid[b]] == c).any())) for b in range(2)]
    expected = torch.where(valid, torch.tensor(present).view(2, 1, 1, 1), 0).to(torch.uint8)
    assert torch.equal(masks.cpu(), expected)
    assert torch.equal(areas.cpu(), torch.tensor([[int(valid[b].sum()) if present[b] >> c & 1 else 0
                                                   for c in range(5)] for b in range(2)]))


def _single_seed_ball(shape, spacing, radius, seed_at):
    """The ball around one seed pixel with the reference's float64 expression, vectorised (for radii too large for
    structuring_element's Python loop)."""
    grids = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in shape), indexing="ij")
    total = torch.zeros(shape, dtype=torch.float64)
    for grid, s, origin in zip(grids, spacing, seed_at, strict=True):
        offset = grid - origin
        extent = int(radius / s * (1 + 1e-9))
        total = total + torch.where(offset.abs() <= extent, (offset * s) ** 2, torch.inf)
    return total <= radius * radius * (1 + 1e-9)


@COMPILED
@pytest.mark.parametrize("shape, spacing, radius", [
    ((300, 1, 1), (1.0, 1.0, 1.0), 280.0),  # one axis: a window over the labels
    ((9, 40, 40), (1.0, 1.3, 1.0), 41.0),  # three passes, 16-bit ranks
    ((1, 300, 300), (1.0, 1.0, 0.77), 250.0),  # two axes: ranks along H (16-bit), then W
    ((260, 260, 1), (1.0, 1.0 + 2**-20, 1.0), 400.0),  # two axes, ~67000 distinct lengths: 32-bit ranks
    ((12, 14, 16), (1.0, 1.0, 1.0), 6.0),  # three axes, a list of (D, H) pairs then W
], ids=["deep", "three_passes", "wide", "ranks32", "pairs"])
def test_masks_wide_index_paths(backend, shape, spacing, radius):
    seed_at = tuple(n // 3 for n in shape)
    labels = torch.full((1, *shape), 1, dtype=torch.int64)
    labels[(0, *seed_at)] = 0
    masks, counts, areas, invalid = run_masks(backend, labels, 2, -100, BALL, radius, spacing)
    inside = _single_seed_ball(shape, spacing, radius, seed_at)
    got = (masks[0].cpu().long() & 1).bool()
    assert torch.equal(got, inside), f"{(got != inside).nonzero()[:8].tolist()}"
    assert areas.cpu().tolist() == [[int(inside.sum()), labels.numel()]]
    assert counts.cpu().tolist() == [[1, labels.numel() - 1]] and invalid.cpu().tolist() == [0]


# ------------------------------------------------------------------------------------------------------ dbce_ce


@WITH_REFERENCE
def test_ce_hand_computed(backend):
    dtype = torch.float64 if takes(backend, torch.float64) else torch.float32
    device = backends.device(backend)
    tight = dict(rtol=1e-15 if dtype == torch.float64 else 1e-6, atol=0.0)
    # Two classes, logits (0, log 3): CE = log 4 - x_label; masks 0b01, 0b11, 0b10, 0; weights (2, 5).
    x = torch.tensor([[[0.0] * 4, [math.log(3.0)] * 4]], dtype=dtype)
    labels = torch.tensor([[0, 1, -100, 1]])
    masks = torch.tensor([[0b01, 0b11, 0b10, 0]], dtype=torch.uint8)
    weights = torch.tensor([[2.0, 5.0]], dtype=dtype)
    sums, loss_map = op.dbce_ce(backend, *(t.to(device) for t in (x, labels, masks, weights)), -100, True)
    ce0, ce1 = math.log(4.0), math.log(4.0 / 3.0)
    torch.testing.assert_close(loss_map.cpu(), torch.tensor([[2 * ce0, 5 * ce1, 0.0, 0.0]], dtype=dtype), **tight)
    torch.testing.assert_close(sums.cpu(), torch.tensor([[2 * ce0 + 5 * ce1, 7.0]], dtype=dtype), **tight)

    # Pixel 0: logits (0, 0), label 0, mask bits {0, 1} with weights (0.5, 2): w = 2, CE = log 2. Pixel 1: label 1,
    # empty mask: w = 0. Pixel 2: ignored (label 7 = ignore_index). Pixel 3: invalid label -1.
    logits = torch.tensor([[[0.0, 1.0, 5.0, 2.0], [0.0, 3.0, -1.0, 0.0]]], dtype=dtype, device=device)
    labels = torch.tensor([[0, 1, 7, -1]], device=device)
    masks = torch.tensor([[3, 0, 3, 3]], dtype=torch.uint8, device=device)
    weights = torch.tensor([[0.5, 2.0]], dtype=dtype, device=device)
    leaf = logits.clone().requires_grad_(True)
    sums, weighted = op.dbce_ce(backend, leaf, labels, masks, weights, 7, True)
    torch.testing.assert_close(sums.detach().cpu(), torch.tensor([[2 * math.log(2.0), 2.0]], dtype=dtype), **tight)
    assert weighted.detach()[0, 1:].eq(0).all()
    (grad,) = torch.autograd.grad((sums * torch.tensor([[1.0, 5.0]], dtype=dtype, device=device)).sum(), leaf)
    # d(2 CE)/dx = 2 (softmax - onehot) = (-1, 1) at pixel 0; zero elsewhere (sum w has no gradient).
    expected = torch.zeros(1, 2, 4, dtype=dtype)
    expected[0, :, 0] = torch.tensor([-1.0, 1.0])
    assert torch.equal(grad.cpu(), expected)


CE_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@thinned(5, "dtype", "classes", "write_map")
@pytest.mark.parametrize("write_map", [True, False], ids=["map", "sums"])
@pytest.mark.parametrize("classes", [1, 2, 4, 5, 8, 9, 16, 17, 40, 64])
@pytest.mark.parametrize("backend, dtype", on_backends(("cpp", "triton", "cuda"), CE_DTYPES, map(_dtype_id, CE_DTYPES),
                                                       takes), indirect=["backend"])
def test_ce_matches_reference(backend, dtype, classes, write_map):
    """Every mask dtype and C around the backward's register buckets (4, 8, 16) and the streamed path; on a GPU
    over two CUDA block steps."""
    args = make_ce_case(backend, 2, classes, ce_pixels(backend), dtype=dtype, write_map=write_map, seed=classes)
    check_ce(backend, args, f"C={classes} write_map={write_map} {dtype}")


CE_SHAPES = [(1, 1, 7), (3, 2, 33), (2, 5, 1000), (3, 9, 1), (1, 17, 65), (2, 64, 40)]


@pytest.mark.parametrize("write_map", [True, False], ids=["map", "sums"])
@pytest.mark.parametrize("shape", CE_SHAPES, ids=str)
@pytest.mark.parametrize("backend, dtype", on_backends(("cpp", "triton", "cuda"), CE_DTYPES[:2],
                                                       map(_dtype_id, CE_DTYPES[:2]), takes), indirect=["backend"])
def test_ce_shapes(backend, dtype, shape, write_map):
    """One pixel, one class, a batch of three, prime sizes."""
    check_ce(backend, make_ce_case(backend, *shape, dtype=dtype, write_map=write_map, seed=sum(shape)), f"{shape}")


@thinned(2, "label_dtype", "ignore_index")
@pytest.mark.parametrize("ignore_index", [-100, 0, 2, 3, 255])
@pytest.mark.parametrize("label_dtype", LABEL_DTYPES, ids=_dtype_id)
def test_ce_label_dtypes_and_ignore_index(backend, label_dtype, ignore_index):
    """C = 3: ignore_index 0 and 2 are classes, 3 just past them; labels compared at their own dtype (int64 2**32 + 1
    stays invalid)."""
    args = make_ce_case(backend, 2, 3, ce_pixels(backend, 157), label_dtype=label_dtype, ignore_index=ignore_index,
                        seed=ignore_index % 13)
    check_ce(backend, args, f"{label_dtype}, ignore_index {ignore_index}")


@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.int32, torch.int16, torch.int8], ids=_dtype_id)
def test_ce_wider_or_signed_masks(backend, mask_dtype):
    """Masks of another integer dtype than C's are read as the reference reads them (masks.long(), sign-extended)."""
    logits, labels, masks, *rest = make_ce_case(backend, 2, 7, ce_pixels(backend, 300), seed=3)
    masks = masks.to(torch.int16).to(mask_dtype) if mask_dtype != torch.int8 else masks.view(torch.int8)
    check_ce(backend, (logits, labels, masks, *rest), f"{mask_dtype} masks")


@pytest.mark.parametrize("classes", [3, 20])
@pytest.mark.parametrize("spatial", [(5, 7), (5, 4, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("backend, dtype", on_backends(("cpp", "triton", "cuda"), CE_DTYPES[:3],
                                                       map(_dtype_id, CE_DTYPES[:3]), takes), indirect=["backend"])
def test_ce_channels_last_read_in_place(backend, dtype, spatial, classes):
    """channels_last logits flattened to (B, C, S) (strides (S C, 1, C)) are read in place and the gradient keeps
    their layout; transposed labels (pixel stride B), masks and class weights; the same values as the contiguous
    copies."""
    memory_format = torch.channels_last if len(spatial) == 2 else torch.channels_last_3d
    pixels = math.prod(spatial)
    logits, labels, masks, weights, *options = make_ce_case(backend, 2, classes, pixels, dtype=dtype, seed=9)
    image = logits.view(2, classes, *spatial).contiguous(memory_format=memory_format)
    flat = image.flatten(2)
    assert flat.data_ptr() == image.data_ptr() and flat.stride() == (pixels * classes, 1, classes)
    args = (flat, labels.t().contiguous().t(), masks.t().contiguous().t(), weights.t().contiguous().t(), *options)
    _, _, grad = check_ce(backend, args, f"channels_last C={classes}")
    assert grad.stride() == flat.stride(), "the gradient must keep the logits' channels_last layout"
    contiguous = op.dbce_ce(backend, flat.contiguous(), labels, masks, weights, *options)
    assert all(torch.equal(a, b) for a, b in zip(op.dbce_ce(backend, *args), contiguous, strict=True))


STRIDED_CE = {
    "pixel_stride_3": lambda x: x[:, :, ::3],
    "batch_stride_2": lambda x: x[::2],
    "pixel_stride_0": lambda x: x[:, :, :1].expand(-1, -1, x.shape[2] // 3),
    "interleaved": lambda x: torch.cat([x, x], dim=2)[..., ::2],
}


@pytest.mark.parametrize("make", STRIDED_CE.values(), ids=STRIDED_CE.keys())
def test_ce_strided_views(backend, make):
    """Logits, labels, masks and class weights read through their strides (views, not copies)."""
    generator = torch.Generator().manual_seed(19)
    logits = make(torch.randn((6, 4, 120), generator=generator, dtype=torch.float64).to(torch.float32))
    logits = logits.to(backends.device(backend))
    batch, classes, pixels = logits.shape
    _, labels, masks, weights, *options = make_ce_case(backend, batch, classes, 2 * pixels, ignore_index=1, seed=19)
    args = (logits, labels[:, ::2], masks[:, 1::2], weights.t().contiguous().t(), *options)
    assert not any(t.is_contiguous() for t in args[1:3])
    check_ce(backend, args, "strided")


def test_ce_invalid_and_ignored_pixels_weigh_nothing(backend):
    """Invalid labels (either side of [0, C), 2**40) and ignored pixels: weight 0 whatever their mask, no gradient,
    never an address."""
    device = backends.device(backend)
    generator = torch.Generator().manual_seed(5)
    labels = torch.tensor([[0, 2**40, -7, 1, 1000, 2, -100]], device=device)
    logits = torch.randn(1, 3, 7, generator=generator).to(device)
    masks = torch.full((1, 7), 7, dtype=torch.uint8, device=device)
    weights = torch.rand(1, 3, generator=generator).to(device)
    sums, weighted, grad = check_ce(backend, (logits, labels, masks, weights, -100, True), "invalid labels")
    assert weighted[:, [1, 2, 4, 6]].eq(0).all() and grad[0, :, [1, 2, 4, 6]].eq(0).all()


def test_ce_negative_infinite_logit(backend):
    """A masked class (logit -inf) that is never the label: its softmax term is 0, not NaN."""
    logits, labels, *rest = make_ce_case(backend, 2, 4, 50, seed=6)
    logits, labels = logits.clone(), labels.clone()
    logits[:, 3] = -math.inf
    labels[labels == 3] = 0
    _, loss_map, grad = check_ce(backend, (logits, labels, *rest), "-inf logit")
    assert torch.isfinite(loss_map).all() and torch.isfinite(grad).all()


@WITH_REFERENCE
@pytest.mark.parametrize("shape", [(2, 3, 0), (0, 3, 5)], ids=str)
def test_ce_empty(backend, shape):
    """No pixel: zero sums, an empty map, an empty gradient (no launch)."""
    device = backends.device(backend)
    batch, classes, pixels = shape
    leaf = torch.empty(shape, device=device, requires_grad=True)
    args = (torch.empty((batch, pixels), dtype=torch.int64, device=device),
            torch.empty((batch, pixels), dtype=torch.uint8, device=device), torch.ones(batch, classes, device=device),
            -100, True)
    sums, weighted = op.dbce_ce(backend, leaf, *args)
    assert torch.equal(sums.detach().cpu(), torch.zeros(batch, 2)) and weighted.shape == (batch, pixels)
    (grad,) = torch.autograd.grad((sums.sum() + weighted.sum()), leaf)
    assert grad.shape == shape and grad.dtype == torch.float32


# Sized for the compiled kernels' own paths.


@COMPILED
def test_ce_several_chunks_per_image(backend):
    """Images of several C++ tasks (8192 pixels) and CUDA block steps (4096)."""
    for dtype in (torch.float64, torch.float32):
        if takes(backend, dtype):
            check_ce(backend, make_ce_case(backend, 2, 3, 2 * CPP_CHUNK + 77, dtype=dtype, seed=9), f"{dtype}")


# ----------------------------------------------------------------------------------------------------- the loss


@WITH_REFERENCE
def test_loss_hand_computed(backend):
    """R = 0 on one 1-D image: w_c = N / (K |M_c|) (N = 4 pixels, K = 2 classes: w_0 = 4 / 2 = 2, w_1 = 4 / 6), the
    mean sum w CE / sum w, and its gradient, by hand."""
    dtype = torch.float64 if takes(backend, torch.float64) else torch.float32
    logits = torch.tensor([[[2.0, 0.0, 0.0, 1.0], [0.0, 1.0, 3.0, 0.0]]], dtype=dtype)
    labels = torch.tensor([[0, 1, 1, 1]])
    ce = [math.log1p(math.exp(-2.0)), math.log1p(math.exp(-1.0)), math.log1p(math.exp(-3.0)),
          math.log1p(math.exp(1.0))]
    weights = [2.0, 2.0 / 3, 2.0 / 3, 2.0 / 3]
    total = sum(w * c for w, c in zip(weights, ce, strict=True))
    loss, (grad, _) = loss_and_grads(backend, logits, labels, radius=0.0)
    rtol = 1e-14 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(loss.cpu(), torch.tensor(total / sum(weights), dtype=dtype), rtol=rtol, atol=0)
    softmax = torch.softmax(logits.double(), 1)
    onehot = F.one_hot(labels, 2).permute(0, 2, 1).double()
    expected = torch.tensor(weights, dtype=torch.float64) * (softmax - onehot) / sum(weights)
    torch.testing.assert_close(grad.cpu().double(), expected, rtol=rtol, atol=rtol)


def test_loss_op_outputs_hand_computed(backend):
    """The forward's other outputs, read by the backward: the masks (B, S), the class weights of each unit and norm
    = d loss / d sum w CE = 1 / sum w for the mean."""
    dtype = torch.float64 if takes(backend, torch.float64) else torch.float32
    device = backends.device(backend)
    logits = torch.tensor([[[2.0, 0.0, 0.0, 1.0], [0.0, 1.0, 3.0, 0.0]]], dtype=dtype, device=device)
    labels = torch.tensor([0, 1, 1, 1], device=device).view(1, 1, 1, 4)
    forward, _ = loss_ops(backend)
    _, masks, class_weights, norm = forward(logits, labels, codes(), scalars(0.0))
    rtol = 1e-15 if dtype == torch.float64 else 1e-7
    assert torch.equal(masks.cpu(), torch.tensor([[1, 2, 2, 2]], dtype=torch.uint8))
    torch.testing.assert_close(class_weights.cpu(), torch.tensor([[2.0, 2.0 / 3]], dtype=dtype), rtol=rtol, atol=0)
    torch.testing.assert_close(norm.cpu(), torch.tensor([1 / (2.0 + 3 * 2.0 / 3)], dtype=dtype), rtol=rtol, atol=0)
    # batch: the weights of the whole batch, on every image.
    _, _, class_weights, _ = forward(logits.expand(2, -1, -1), labels.expand(2, -1, -1, -1),
                                     codes(batch=True), scalars(0.0))
    torch.testing.assert_close(class_weights.cpu(), torch.tensor([[2.0, 2.0 / 3]] * 2, dtype=dtype), rtol=rtol,
                               atol=0)


LOSS_SPATIAL = {"1d": (37,), "2d": (9, 11), "3d": (5, 6, 7)}
LOSS_RADII = [(0.0, ISOTROPIC), (1.5, ISOTROPIC), (2.5, ANISOTROPIC)]


@thinned(3, "spatial", "element", "batch", "reduction")
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("batch", [False, True], ids=["images", "batch"])
@pytest.mark.parametrize("element", ["ball", "cube"])
@pytest.mark.parametrize("spatial", LOSS_SPATIAL.values(), ids=LOSS_SPATIAL.keys())
@pytest.mark.parametrize("backend, dtype", on_backends(("cpp", "triton", "cuda"), CE_DTYPES[:2],
                                                       map(_dtype_id, CE_DTYPES[:2]), takes), indirect=["backend"])
def test_loss_matches_reference(backend, dtype, spatial, element, batch, reduction):
    """The loss (masks, class weights of each unit, cross entropy, reduction) for 1-D to 3-D labels (B, *S), every
    reduction, per image and per batch, R = 0 (balanced CE), 1.5 and 2.5 (anisotropic). The interpreter runs one of
    the radii per case, in turn."""
    index = list(LOSS_SPATIAL.values()).index(spatial) + REDUCTIONS.index(reduction) + 2 * batch
    radii = [LOSS_RADII[index % 3]] if _interpreted(backend) else LOSS_RADII
    labels = make_labels((2, *spatial), 4, seed=len(spatial) + 3 * batch, invalid=False)
    logits = make_logits((2, 4, *spatial), dtype, seed=index)
    for radius, spacing in radii:
        check_loss(backend, logits, labels, f"R {radius}, spacing {spacing}", element=element, batch=batch,
                   reduction=reduction, radius=radius, spacing=spacing[-len(spatial):])


@thinned(2, "spatial", "element")
@pytest.mark.parametrize("element", ["ball", "cube"])
@pytest.mark.parametrize("spatial, radius", [((97,), 3.0), ((11, 13), 2.0), ((11, 13), 10.0), ((3, 12, 12), 7.0)],
                         ids=str)
def test_loss_masks_passes(backend, spatial, radius, element):
    """The masks' launches of each dimension: one pass in 1-D (a list of offsets) and in 2-D up to the box limit,
    two past it; three in 3-D with W and H too wide for a box."""
    labels = make_labels((2, *spatial), 3, seed=len(spatial), invalid=False)
    logits = make_logits((2, 3, *spatial), seed=5)
    for reduction in ("mean", "none"):
        check_loss(backend, logits, labels, f"{spatial} R={radius} {reduction}", radius=radius, element=element,
                   reduction=reduction)


@WITH_REFERENCE
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_loss_bad_labels_make_it_nan_and_keep_the_gradient(backend, reduction):
    """A label neither a class nor ignore_index makes the whole loss NaN; the gradient stays the valid pixels'."""
    labels = make_labels((2, 6, 7), 3, seed=5, invalid=False)
    labels.view(-1)[3::11] = 3
    logits = make_logits((2, 3, 6, 7), seed=5)
    options = dict(radius=1.0, reduction=reduction, batch=reduction == "sum")
    loss, (grad, _) = loss_and_grads(backend, logits, labels, **options)
    assert torch.isnan(loss).all() and torch.isfinite(grad).all()
    check_loss(backend, logits, labels, "bad labels", **options)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 0, 5)], ids=str)
def test_loss_empty(backend, shape, reduction):
    """No pixel or no image: the reference's loss (0 for mean and sum) and shape, an empty gradient."""
    labels = torch.zeros(shape, dtype=torch.int64)
    logits = make_logits((shape[0], 3, *shape[1:]))
    loss, (grad, _) = loss_and_grads(backend, logits, labels, reduction=reduction)
    want, _ = loss_and_grads("reference", logits, labels, reduction=reduction)
    assert loss.shape == want.shape and grad.shape == logits.shape
    torch.testing.assert_close(loss.cpu(), want)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_dtype_id)
def test_loss_low_precision_logits_and_narrow_labels(backend, dtype, reduction):
    labels = make_labels((2, 5, 6, 7), 3, torch.uint8, 255, seed=8, invalid=False)
    logits = make_logits((2, 3, 5, 6, 7), dtype, seed=8)
    check_loss(backend, logits, labels, f"{dtype}", radius=1.5, ignore_index=255, reduction=reduction)


@thinned(2, "label_dtype", "ignore_index")
@pytest.mark.parametrize("ignore_index", [-100, 0, 2, 255])
@pytest.mark.parametrize("label_dtype", LABEL_DTYPES, ids=_dtype_id)
def test_loss_label_dtypes_and_ignore_index(backend, label_dtype, ignore_index):
    """Labels are read at their own dtype and compared as integers: a uint8 map never matches -100, and 255 is an
    invalid label of int64 maps but the ignored one of uint8 maps."""
    labels = make_labels((2, 7, 8), 3, label_dtype, ignore_index, seed=ignore_index % 13, invalid=False)
    dtype = torch.float64 if takes(backend, torch.float64) else torch.float32
    logits = make_logits((2, 3, 7, 8), dtype, seed=ignore_index % 13)
    check_loss(backend, logits, labels, f"{label_dtype}", ignore_index=ignore_index, batch=True, radius=1.0)


@pytest.mark.parametrize("layout", ["channels_last", "strided_labels", "non_mergeable_labels"])
def test_loss_layouts(backend, layout):
    """Logits are read in place through their strides (the gradient keeps them); labels whose spatial dims cannot be
    flattened into a view are copied once for the cross entropy (the masks read them in place)."""
    dtype = torch.float64 if takes(backend, torch.float64) else torch.float32
    logits = make_logits((2, 4, 5, 6, 7), dtype, seed=11)
    labels = make_labels((2, 5, 6, 7), 4, seed=11, invalid=False)
    if layout == "channels_last":
        logits = logits.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "strided_labels":
        labels = make_labels((2, 5, 6, 14), 4, seed=12, invalid=False)[..., ::2]
    else:
        labels = labels.transpose(2, 3).contiguous().transpose(2, 3)
    for reduction in REDUCTIONS:
        _, grad = check_loss(backend, logits, labels, layout, reduction=reduction, radius=2.0, spacing=ANISOTROPIC)
        assert grad.stride() == logits.stride(), layout


@WITH_REFERENCE
def test_loss_negative_infinite_logit_keeps_it_finite(backend):
    """A masked class (logit -inf) that is never the label: its softmax term is 0, not NaN, in the loss and the
    gradient."""
    labels = make_labels((2, 4, 6, 7), 3, seed=2, invalid=False)
    labels[labels == 2] = 0
    logits = make_logits((2, 3, 4, 6, 7), seed=2)
    logits[:, 2] = -math.inf
    loss, (grad, _) = loss_and_grads(backend, logits, labels, radius=1.0)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    check_loss(backend, logits, labels, "-inf logit", radius=1.0)


@COMPILED
def test_deterministic(backend):
    """Bitwise the same masks, sums, map, gradients and loss from run to run (fixed-order partial sums, no float
    atomics), on several programs per image (the interpreter's: test_triton_several_programs_and_int64_offsets)."""
    shape = (2, 24, 40, 44)
    labels = make_labels(shape, 6, seed=21, invalid=False)
    logits = make_logits((2, 6, *shape[1:]), seed=21)
    args = make_ce_case(backend, 2, 6, logits[0, 0].numel(), seed=21)

    def run():
        masks = run_masks(backend, labels, 6, -100, BALL, 3.0, ANISOTROPIC)
        leaf = args[0].detach().requires_grad_(True)
        sums, loss_map = op.dbce_ce(backend, leaf, *args[1:])
        (grad,) = torch.autograd.grad(sums.sum() + loss_map.sum(), leaf)
        loss, grads = loss_and_grads(backend, logits, labels, radius=3.0)
        return (*masks, sums, loss_map, grad, loss, *grads)

    first = run()
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(run(), first, strict=True))


# Sized for the compiled kernels' own paths.


@COMPILED
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("element, radius, spacing", [
    ("ball", 1.5, (1.0, 1.0, 1.0)),  # one list of offsets
    ("cube", 2.0, (2.0, 1.0, 0.7)),
    ("ball", 5.0, (1.0, 1.0, 1.0)),  # a list of (D, H) pairs, then W: two passes
    ("cube", 3.0, (1.0, 1.0, 1.0)),  # 343 offsets: two passes
    ("ball", 7.5, (1.0, 1.0, 1.0)),  # three passes
], ids=str)
@pytest.mark.parametrize("batch", [False, True], ids=["images", "batch"])
def test_loss_several_blocks_per_image(backend, element, radius, spacing, batch, reduction):
    """3-D images over several CUDA blocks, with every plan of the CUDA masks kernels."""
    labels = make_labels((2, 10, 11, 12), 4, seed=int(radius * 4), invalid=False)
    logits = make_logits((2, 4, 10, 11, 12), seed=int(10 * radius))
    check_loss(backend, logits, labels, f"{element} R={radius} batch={batch} {reduction}", element=element,
               radius=radius, spacing=spacing, batch=batch, reduction=reduction)


@COMPILED
def test_loss_several_chunks_per_image(backend):
    labels = make_labels((1, 20, 21, 22), 5, seed=13, invalid=False)
    dtype = torch.float64 if takes(backend, torch.float64) else torch.float32
    logits = make_logits((1, 5, 20, 21, 22), dtype, seed=13)
    assert logits[0, 0].numel() > CPP_CHUNK
    for reduction in REDUCTIONS:
        check_loss(backend, logits, labels, reduction, element="cube", radius=3.0, reduction=reduction)


# ------------------------------------------------------------------------------------------------- op machinery
# Argument checks: the C++ ops raise RuntimeError, the Triton ops ValueError, each naming the op and the argument.

MASKS_CHECKS = {
    "rank": ({"labels": torch.zeros(2, 3, 4, dtype=torch.int64)},
             r"labels must be 4-D \(B, D, H, W\), got shape \[2, 3, 4\]",
             r"labels must be \(B, D, H, W\), got shape \(2, 3, 4\)"),
    "labels_dtype": ({"labels": torch.zeros(1, 2, 3, 4)},
                     "labels must be uint8, int8, int16, int32 or int64, got Float",
                     "labels must be uint8, int8, int16, int32 or int64, got torch.float32"),
    "classes_65": ({"num_classes": 65}, r"num_classes must be in \[1, 64\] \(one bit per class in the mask\), got 65",
                   r"num_classes must be in \[1, 64\] \(one mask bit each\), got 65\."),
    "classes_0": ({"num_classes": 0}, r"num_classes must be in \[1, 64\] .*got 0", r"num_classes must be in \[1, 64\] "
                  r".*got 0"),
    "element": ({"element": 2}, r"element must be 0 \(ball\) or 1 \(cube\), got 2",
                r"element must be 0 \(ball\) or 1 \(cube\), got 2"),
    "radius": ({"radius": -1.0}, "radius must be finite and >= 0, got -1", "radius must be finite and >= 0, got -1"),
    "radius_inf": ({"radius": math.inf}, "radius must be finite and >= 0, got inf",
                   "radius must be finite and >= 0, got inf"),
    "spacing_length": ({"spacing": [1.0, 1.0]}, r"spacing must hold 3 voxel sizes \(D, H, W\), got 2 values",
                       r"spacing must hold 3 finite positive values \(D, H, W\), got \[1.0, 1.0\]"),
    "spacing_zero": ({"spacing": [1.0, 0.0, 1.0]}, "spacing must be finite and > 0",
                     r"spacing must hold 3 finite positive values \(D, H, W\), got \[1.0, 0.0, 1.0\]"),
}
_ERROR = {"cpp": RuntimeError, "triton": ValueError}


def _expect(backend, name, messages):
    """(exception type, match) for the op ``name`` (torch_medloss::<name>, or its _triton version) on the backend."""
    cpp_message, triton_message = messages
    prefix = f"torch_medloss::{name}{'_triton' if backend == 'triton' else ''}: "
    return _ERROR[backend], prefix + (triton_message if backend == "triton" else cpp_message)


def _piece_ops(backend):
    return op._triton_ops() if backend == "triton" else torch.ops.torch_medloss


def _suffix(backend):
    return "_triton" if backend == "triton" else ""


@pytest.mark.parametrize("backend, case", on_backends(("cpp", "triton"), MASKS_CHECKS, MASKS_CHECKS),
                         indirect=["backend"])
def test_masks_checks(backend, case):
    changes, *messages = MASKS_CHECKS[case]
    arguments = dict(labels=torch.zeros(1, 2, 3, 4, dtype=torch.int64), num_classes=3, ignore_index=-100,
                     element=BALL, radius=1.0, spacing=[1.0, 1.0, 1.0])
    arguments.update(changes)
    error, match = _expect(backend, "dbce_masks", messages)
    with pytest.raises(error, match=match):
        getattr(_piece_ops(backend), f"dbce_masks{_suffix(backend)}")(*arguments.values())


CE_CHECKS = {
    "logits_rank": ({"logits": torch.zeros(2, 3)}, r"logits must be 3-D \(B, C, S\), got shape \[2, 3\]",
                    r"logits must be 3-D \(B, C, S\), got shape \(2, 3\)"),
    "logits_dtype": ({"logits": torch.zeros(2, 3, 5, dtype=torch.int64)},
                     "logits must be float32, float64, bfloat16 or float16, got Long",
                     "logits must be float32, bfloat16 or float16, got torch.int64"),
    "logits_float64": ({"logits": torch.zeros(2, 3, 5, dtype=torch.float64)}, None,
                       "logits must be float32, bfloat16 or float16, got torch.float64"),
    "classes_65": ({"logits": torch.zeros(2, 65, 5), "class_weights": torch.ones(2, 65)},
                   r"logits must have between 1 and 64 classes \(one mask bit per class\), got shape \[2, 65, 5\]",
                   r"the number of classes \(logits.shape\[1\]\) must be in \[1, 64\] \(one mask bit each\), got 65"),
    "labels_shape": ({"labels": torch.zeros(2, 4, dtype=torch.int64)},
                     r"labels must have shape \(B, S\) = \[2, 5\], got \[2, 4\]",
                     r"labels must have shape \(B, S\) = \(2, 5\) for logits of shape \(2, 3, 5\), got \(2, 4\)"),
    "labels_dtype": ({"labels": torch.zeros(2, 5)}, "labels must be uint8, int8, int16, int32 or int64, got Float",
                     "labels must be uint8, int8, int16, int32 or int64, got torch.float32"),
    "masks_shape": ({"masks": torch.zeros(5, dtype=torch.uint8)},
                    r"masks must have shape \(B, S\) = \[2, 5\], got \[5\]",
                    r"masks must have shape \(B, S\) = \(2, 5\) .*got \(5,\)"),
    "masks_bool": ({"masks": torch.zeros(2, 5, dtype=torch.bool)},
                   "masks must be uint8, int8, int16, int32 or int64, got Bool",
                   "masks must be uint8, int8, int16, int32 or int64, got torch.bool"),
    "masks_float": ({"masks": torch.zeros(2, 5)}, "masks must be uint8, int8, int16, int32 or int64, got Float",
                    "masks must be uint8, int8, int16, int32 or int64, got torch.float32"),
    "weights_shape": ({"class_weights": torch.ones(3)}, r"class_weights must have shape \(B, C\) = \[2, 3\], got \[3\]",
                      r"class_weights must be a float tensor of shape \(B, C\) = \(2, 3\), got torch.float32 of "
                      r"shape \(3,\)"),
    "weights_dtype": ({"class_weights": torch.ones(2, 3, dtype=torch.int64)},
                      "class_weights must be float32, .* got Long",
                      r"class_weights must be a float tensor of shape \(B, C\) = \(2, 3\), got torch.int64"),
}


@pytest.mark.parametrize("backend, case", on_backends(("cpp", "triton"), CE_CHECKS, CE_CHECKS,
                                                      lambda backend, case: backend == "triton"
                                                      or CE_CHECKS[case][1] is not None), indirect=["backend"])
def test_ce_checks(backend, case):
    """The forward's and the backward's checks of the cross entropy's inputs (float64 logits: C++ only)."""
    changes, *messages = CE_CHECKS[case]
    arguments = dict(logits=torch.zeros(2, 3, 5), labels=torch.zeros(2, 5, dtype=torch.int64),
                     masks=torch.zeros(2, 5, dtype=torch.uint8), class_weights=torch.ones(2, 3), ignore_index=-100,
                     write_map=True)
    arguments.update(changes)
    args = tuple(arguments.values())
    ops, suffix = _piece_ops(backend), _suffix(backend)
    error, match = _expect(backend, "dbce_ce_fwd", messages)
    with pytest.raises(error, match=match):
        getattr(ops, f"dbce_ce_fwd{suffix}")(*args)
    error, match = _expect(backend, "dbce_ce_bwd", messages)
    with pytest.raises(error, match=match):
        getattr(ops, f"dbce_ce_bwd{suffix}")(torch.zeros(2, 2), torch.zeros(2, 5), *args)


CE_BACKWARD_CHECKS = {
    "grad_sums_shape": ((torch.zeros(2, 3), torch.zeros(2, 5)),
                        r"grad_sums must have shape \(B, 2\) = \[2, 2\], got \[2, 3\]",
                        r"grad_sums must be a float tensor of shape \(B, 2\) = \(2, 2\), got torch.float32 of shape "
                        r"\(2, 3\)"),
    "grad_map_shape": ((torch.zeros(2, 2), torch.zeros(0)),
                       r"grad_map must have shape \(B, S\) = \[2, 5\] when write_map, got \[0\]",
                       r"grad_map must be a float tensor of shape \(B, S\) = \(2, 5\) with write_map, got "
                       r"torch.float32 of shape \(0,\)"),
    "grad_sums_dtype": ((torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, 5)),
                        "grad_sums must be float32, .* got Long",
                        r"grad_sums must be a float tensor of shape \(B, 2\) = \(2, 2\), got torch.int64"),
}


@pytest.mark.parametrize("backend, case", on_backends(("cpp", "triton"), CE_BACKWARD_CHECKS, CE_BACKWARD_CHECKS),
                         indirect=["backend"])
def test_ce_backward_checks(backend, case):
    grads, *messages = CE_BACKWARD_CHECKS[case]
    args = (torch.zeros(2, 3, 5), torch.zeros(2, 5, dtype=torch.int64), torch.zeros(2, 5, dtype=torch.uint8),
            torch.ones(2, 3), -100, True)
    error, match = _expect(backend, "dbce_ce_bwd", messages)
    with pytest.raises(error, match=match):
        getattr(_piece_ops(backend), f"dbce_ce_bwd{_suffix(backend)}")(*grads, *args)


_LOSS_SHAPES = r"logits must be \(B, C, S\) and labels \(B, D, H, W\) with D H W = S, got "
LOSS_CHECKS = {
    "codes": (dict(codes=codes()[:-1]), "codes must have 4 entries",
              r"codes must have 4 entries and scalars 4 \(torch_medloss._contract\), got 3 and 4"),
    "scalars": (dict(scalars=scalars()[:-1]), "scalars must have 4 entries",
                r"codes must have 4 entries and scalars 4 \(torch_medloss._contract\), got 4 and 3"),
    "logits": (dict(logits=torch.zeros(2, 3)), r"logits must be 3-D \(B, C, S\), got shape \[2, 3\]",
               _LOSS_SHAPES + r"\(2, 3\) and \(2, 1, 4, 5\)"),
    "logits_float64": (dict(logits=torch.zeros(2, 3, 20, dtype=torch.float64)), None,
                       "logits must be float32, bfloat16 or float16, got torch.float64"),
    "labels_shape": (dict(labels=torch.zeros(2, 1, 4, 4, dtype=torch.int64)),
                     r"labels must be \(B, D, H, W\) with B = 2 and D H W = S = 20 for logits of shape \[2, 3, 20\], "
                     r"got \[2, 1, 4, 4\]", _LOSS_SHAPES + r"\(2, 3, 20\) and \(2, 1, 4, 4\)"),
    "labels_dtype": (dict(labels=torch.zeros(2, 1, 4, 5)), "labels must be uint8, int8, int16, int32 or int64, got "
                     "Float", "labels must be uint8, int8, int16, int32 or int64, got torch.float32"),
    "reduction": (dict(codes=codes(reduction=3)),
                  r"codes\[DBCE_CODE_REDUCTION\] must be 0 \(mean\), 1 \(sum\) or 2 \(none\), got 3",
                  r"codes\[DBCE_CODE_REDUCTION\] must be 0 \(mean\), 1 \(sum\) or 2 \(none\), got 3"),
    "element": (dict(codes=codes(element=2)), r"element must be 0 \(ball\) or 1 \(cube\), got 2",
                r"element must be 0 \(ball\) or 1 \(cube\), got 2"),
    "radius": (dict(scalars=scalars(radius=-1.0)), "radius must be finite and >= 0, got -1",
               "radius must be finite and >= 0, got -1"),
    "spacing": (dict(scalars=scalars(spacing=(1.0, 0.0, 1.0))), "spacing must be finite and > 0",
                r"spacing must hold 3 finite positive values \(D, H, W\), got \[1.0, 0.0, 1.0\]"),
    "classes": (dict(logits=torch.zeros(2, 65, 20)), r"num_classes must be in \[1, 64\]",
                r"num_classes must be in \[1, 64\]"),
}


@pytest.mark.parametrize("backend, case", on_backends(("cpp", "triton"), LOSS_CHECKS, LOSS_CHECKS,
                                                      lambda backend, case: backend == "triton"
                                                      or LOSS_CHECKS[case][1] is not None), indirect=["backend"])
def test_loss_checks(backend, case):
    """The loss op's forward and backward name the argument (float64 logits: C++ only)."""
    change, *messages = LOSS_CHECKS[case]
    args = dict(logits=torch.zeros(2, 3, 20), labels=torch.zeros(2, 1, 4, 5, dtype=torch.int64), codes=codes(),
                scalars=scalars())
    args.update(change)
    forward, backward = loss_ops(backend)
    error, match = _expect(backend, "dbce_loss_fwd", messages)
    with pytest.raises(error, match=match):
        forward(*args.values())
    error, match = _expect(backend, "dbce_loss_bwd", messages)
    with pytest.raises(error, match=match):
        backward(torch.zeros(()), torch.zeros(2, 20, dtype=torch.uint8), torch.ones(2, 3), torch.ones(1),
                 *args.values())


def test_double_backward_is_refused(backend):
    device = backends.device(backend)
    logits = torch.randn(1, 2, 5, device=device, requires_grad=True)
    labels = torch.randint(0, 2, (1, 1, 1, 5), device=device)
    loss = loss_ops(backend)[0](logits, labels, codes(), scalars(1.0))[0]
    (grad,) = torch.autograd.grad(loss, logits, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        grad.sum().backward()
    masks = torch.full((1, 5), 3, dtype=torch.uint8, device=device)
    sums, _ = op.dbce_ce(backend, logits, labels.view(1, 5), masks, torch.ones(1, 2, device=device), -100, False)
    (grad,) = torch.autograd.grad(sums[:, 0].sum(), logits, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        grad.sum().backward()


def test_opcheck(backend):
    """torch.library.opcheck of every op: masks, cross entropy forward and backward, loss forward and backward, on
    contiguous and classes-innermost logits. Triton on CPU tensors (the interpreter): the schema and the autograd
    registration only (the fake-tensor checks need a device)."""
    device = backends.device(backend)
    utils = {"test_utils": ("test_schema", "test_autograd_registration")} if _interpreted(backend) else {}
    schema = {"test_utils": ("test_schema",)} if _interpreted(backend) else {}
    ops, suffix = _piece_ops(backend), _suffix(backend)
    masks_op, ce_fwd, ce_bwd = (getattr(ops, f"{name}{suffix}").default for name in
                                ("dbce_masks", "dbce_ce_fwd", "dbce_ce_bwd"))
    labels = make_labels((2, 3, 4, 5), 3, torch.uint8, seed=31).to(device)
    torch.library.opcheck(masks_op, (labels, 3, -100, BALL, 1.5, list(ANISOTROPIC)), **schema)
    torch.library.opcheck(masks_op, (labels.transpose(2, 3), 9, 0, CUBE, 1.0, list(ISOTROPIC)), **schema)
    dtype = torch.float64 if takes(backend, torch.float64) else torch.float32
    for args in (make_ce_case(backend, 2, 3, 33, dtype=dtype, seed=1), make_ce_case(backend, 1, 4, 20, seed=2,
                                                                                   write_map=False)):
        for x in (args[0], args[0].transpose(1, 2).contiguous().transpose(1, 2)):
            batch, _, pixels = x.shape
            grads = (torch.randn(batch, 2, device=device), torch.randn(batch, pixels, device=device))
            torch.library.opcheck(ce_fwd, (x.detach().requires_grad_(True), *args[1:]), **utils)
            torch.library.opcheck(ce_bwd, (*grads, x, *args[1:]), **schema)
    forward, backward = (f.default for f in loss_ops(backend))
    labels = make_labels((2, 3, 4, 5), 3, torch.uint8, seed=31, invalid=False).to(device)  # a finite loss
    logits = make_logits((2, 3, 60), seed=0).to(device)
    for reduction in (K.REDUCTION_MEAN, K.REDUCTION_SUM, K.REDUCTION_NONE):
        for x in (logits, logits.transpose(1, 2).contiguous().transpose(1, 2)):
            args = (x.detach().requires_grad_(True), labels, codes(reduction=reduction, batch=True), scalars(1.5))
            torch.library.opcheck(forward, args, **utils)
            loss, masks, class_weights, norm = forward(*args)
            torch.library.opcheck(backward, (torch.randn_like(loss), masks, class_weights, norm, x.detach(),
                                             *args[1:]), **schema)


@CPP
@pytest.mark.parametrize("permuted", [False, True], ids=["contiguous", "permuted"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcheck(backend, seed, permuted):
    """Finite differences in float64 (the C++ kernels only take it) of the cross entropy and of the loss, every
    reduction: the weights depend on the labels only, so they see the same function."""
    logits, *rest = make_ce_case(backend, 2, 4, 7, dtype=torch.float64, ignore_index=2, seed=seed)
    labels = make_labels((2, 1, 3, 5), 3, ignore_index=0, seed=seed, invalid=False)
    loss_logits = make_logits((2, 3, 15), torch.float64, seed=seed)
    if permuted:
        logits = logits.transpose(1, 2).contiguous().transpose(1, 2)
        loss_logits = loss_logits.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.autograd.gradcheck(lambda x: op.dbce_ce(backend, x, *rest), (logits.requires_grad_(True),))
    forward, _ = loss_ops(backend)
    for reduction in (K.REDUCTION_MEAN, K.REDUCTION_SUM, K.REDUCTION_NONE):
        assert torch.autograd.gradcheck(lambda x, r=reduction: forward(x, labels, codes(reduction=r),
                                                                       scalars(1.0))[0],
                                        (loss_logits.requires_grad_(True),))


@COMPILED
def test_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) traces the pieces (masks, weights, cross entropy) and the loss op: the eager
    values and gradients."""
    device = backends.device(backend)
    labels = make_labels((2, 3, 4, 5), 3, seed=37, invalid=False).to(device)
    logits = make_logits((2, 3, 60), seed=37).to(device)
    forward, _ = loss_ops(backend)
    ops, suffix = _piece_ops(backend), _suffix(backend)

    def pieces(x):
        masks, _, areas, _ = getattr(ops, f"dbce_masks{suffix}")(labels, 3, -100, BALL, 1.0, list(ISOTROPIC))
        weights = 1.0 / areas.clamp_min(1).float()
        sums, _ = getattr(ops, f"dbce_ce_fwd{suffix}")(x, labels.flatten(1), masks.flatten(1), weights, -100, False)
        return sums[:, 0].sum() / sums[:, 1].sum()

    def loss(x):
        return forward(x, labels, codes(), scalars(1.5))[0] * 2

    for fn, compiler in ((pieces, "aot_eager"), (loss, "inductor")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            leaf = logits.clone().requires_grad_(True)
            value = torch.compile(fn, fullgraph=True, backend=compiler)(leaf)
            (grad,) = torch.autograd.grad(value, leaf)
        expected_leaf = logits.clone().requires_grad_(True)
        expected = fn(expected_leaf)
        (expected_grad,) = torch.autograd.grad(expected, expected_leaf)
        torch.testing.assert_close(value, expected)
        torch.testing.assert_close(grad, expected_grad)


# ----------------------------------------------------------------------------------------------- C++ kernels only


def _cpp_case():
    """Inputs that spread over the C++ kernels' tasks: masks of images with many rows and of an image of >= 2**16
    pixels, cross entropy over several chunks, the loss with a 3-D anisotropic ball and batch weights."""
    masks_inputs = [(make_labels((2, 20, 30, 40), 5, seed=23), 5, -100, BALL, 3.0, ANISOTROPIC),
                    (make_labels((1, 40, 41, 42), 3, seed=24), 3, -100, CUBE, 2.0, ISOTROPIC)]
    ce_args = make_ce_case("cpp", 2, 5, 3 * CPP_CHUNK + 77, seed=29)
    loss_labels = make_labels((2, 18, 20, 24), 5, seed=23, invalid=False)
    loss_logits = make_logits((2, 5, 18 * 20 * 24), seed=23)
    return masks_inputs, ce_args, loss_logits, loss_labels


def _cpp_outputs(masks_inputs, ce_args, loss_logits, loss_labels):
    """(name, tensor) of every output of the C++ ops on _cpp_case's inputs: masks, cross entropy forward and backward,
    the loss op's forward outputs and gradient for every reduction."""
    outputs = []
    for index, args in enumerate(masks_inputs):
        result = torch.ops.torch_medloss.dbce_masks(*args[:5], list(args[5]))
        outputs += [(f"{name} {index}", t) for name, t in zip(("masks", "counts", "areas", "invalid"), result,
                                                              strict=True)]
    generator = torch.Generator().manual_seed(24)
    batch, _, pixels = ce_args[0].shape
    grads = (torch.randn(batch, 2, generator=generator), torch.randn(batch, pixels, generator=generator))
    outputs += list(zip(("sums", "map"), torch.ops.torch_medloss.dbce_ce_fwd(*ce_args), strict=True))
    outputs.append(("ce gradient", torch.ops.torch_medloss.dbce_ce_bwd(*grads, *ce_args)))
    for reduction in (K.REDUCTION_MEAN, K.REDUCTION_SUM, K.REDUCTION_NONE):
        cds, scl = codes(batch=reduction != K.REDUCTION_SUM, reduction=reduction), scalars(2.5, ANISOTROPIC)
        leaf = loss_logits.clone().requires_grad_(True)
        loss, masks, class_weights, norm = torch.ops.torch_medloss.dbce_loss_fwd(leaf, loss_labels, cds, scl)
        upstream = torch.rand(loss.shape, generator=generator)
        (grad,) = torch.autograd.grad((loss * upstream).sum(), leaf)
        outputs += [(f"{name} {reduction}", t.detach()) for name, t in zip(
            ("loss", "loss masks", "class weights", "norm", "loss gradient"), (loss, masks, class_weights, norm, grad),
            strict=True)]
    return outputs


@CPP
def test_cpp_deterministic_and_thread_count_independent(backend):
    case = _cpp_case()
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 1, 2):
            torch.set_num_threads(count)
            results.append(_cpp_outputs(*case))
    finally:
        torch.set_num_threads(threads)
    for result in results[1:]:
        for (name, got), (_, first) in zip(result, results[0], strict=True):
            assert torch.equal(got, first), f"{name} differs by {(got.double() - first.double()).abs().max().item()}"


_ISA_SCRIPT = """
import sys
import torch
from torch_medloss import _extension
import torch_medloss.ops.dbce  # noqa: F401  (the autograd of the C++ ops)

sys.path.insert(0, sys.argv[2])
import test_dbce_ops as t

assert _extension.why_not_loaded(cuda=False) is None
torch.save((torch.backends.cpu.get_cpu_capability(), t._cpp_outputs(*t._cpp_case())),
           sys.argv[1] + "/" + sys.argv[3] + ".pt")
"""


@CPP
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_cpp_instruction_sets_agree(backend, capability, tmp_path):
    """The cross entropy's float32 tasks are compiled for the baseline, AVX2 and AVX-512 and picked at run time
    (ATEN_CPU_CAPABILITY caps the choice, once per process): the same results within float32 rounding, the masks,
    counts and class weights bitwise."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(tmp_path), str(Path(__file__).parent), capability],
                   env=env, check=True, timeout=600)
    used, got = torch.load(tmp_path / f"{capability}.pt")
    assert used == capability.upper() or (capability == "avx2" and used == "DEFAULT"), used
    here = _cpp_outputs(*_cpp_case())
    for (name, g), (_, h) in zip(got, here, strict=True):
        if not h.is_floating_point() or name.startswith("class weights"):
            assert torch.equal(g, h), name
        elif name.startswith("norm"):
            torch.testing.assert_close(g, h, rtol=1e-6, atol=0)
        else:
            scale = h[torch.isfinite(h)].abs().max().item() if h.numel() else 1.0
            torch.testing.assert_close(g, h, rtol=2e-5, atol=2e-5 * scale, equal_nan=True,
                                       msg=lambda m, n=name: f"{n}: {m}")


# -------------------------------------------------------------------------------------------- Triton kernels only


def _kernels():
    """kernels/dbce.py, its ops registered and given autograd (torch_medloss.ops.dbce)."""
    op._triton_ops()
    return importlib.import_module("torch_medloss.kernels.dbce")


@TRITON
def test_triton_several_programs_and_int64_offsets(backend, monkeypatch):
    """A shrunken launch heuristic (64-element tiles, 8- or 16-pixel blocks, 2 programs per image): images of several
    programs and programs of several tiles, for the masks, the cross entropy and the loss op (whose last programs
    finish the class weights and the reduction); the int64 offset path (forced on small tensors) gives the same bits.
    (The interpreter runs the programs one after the other: test_deterministic checks the compiled kernels.)"""
    kernel = _kernels()
    monkeypatch.setattr(kernel, "_TILE_ELEMENTS", 64)
    monkeypatch.setattr(kernel, "_MIN_BLOCK", 8)
    monkeypatch.setattr(kernel, "_MAX_PROGRAMS_PER_IMAGE", 2)
    assert kernel._launch_sizes(2, 3, 101) == (4, 16, 2, 64), kernel._launch_sizes(2, 3, 101)
    assert kernel._launch_sizes(2, 5, 30) == (8, 8, 2, 16) and kernel._launch_sizes(2, 4, 60) == (4, 16, 2, 32)
    masks_cases = [(make_labels((2, 2, 3, 5), 5, seed=element + 2), 5, -100, element, radius, (1.0, 0.9, 1.2))
                   for element, radius in ((BALL, 2.5), (CUBE, 1.5))]
    ce_cases = [make_ce_case(backend, 2, 3, pixels, ignore_index=1, write_map=write_map, seed=7)
                for pixels, write_map in ((101, True), (50, False))]
    loss_labels = make_labels((2, 3, 4, 5), 4, seed=8, invalid=False)
    loss_logits = make_logits((2, 4, 3, 4, 5), seed=8)
    loss_cases = [dict(reduction=reduction, batch=batch, element=element, radius=1.0, spacing=ANISOTROPIC)
                  for reduction, batch, element in (("mean", False, "ball"), ("sum", True, "cube"),
                                                    ("none", True, "ball"))]

    def run():
        results = [check_masks(backend, *args, f"masks, element {args[3]} R={args[4]}") for args in masks_cases]
        results += [check_ce(backend, args, f"cross entropy, write_map={args[5]}") for args in ce_cases]
        results += [check_loss(backend, loss_logits, loss_labels, f"loss {options}", **options)
                    for options in loss_cases]
        return [[t.detach().cpu() for t in result] for result in results]

    first = run()
    monkeypatch.setattr(kernel, "_FORCE_INT64", True)
    for index, (a, b) in enumerate(zip(first, run(), strict=True)):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), f"int64 offsets: case {index} differs"


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


helpers.compile_check("dbce", """
    kernel = load_kernel("dbce")
    MASK_TYPES = {4: "*u8", 64: "*i64"}

    def compile_and_count(fn, pointer_types, constants, num_classes, what, float_args=()):
        constants = {k: v for k, v in constants.items() if k in fn.arg_names}
        registers, spills = ptxas_report(fn, pointer_types, constants, 4, float_args=float_args)
        print(fn.__name__, num_classes, what, registers, spills)
        if num_classes <= 16 and spills:
            FAILURES.append(f"{fn.__name__} C={num_classes} {what}: {registers} registers, spills {spills}")

    for num_classes in (4, 64):
        block_c, block, _, _ = kernel._launch_sizes(2, num_classes, 128**3)
        masks_type = MASK_TYPES[num_classes]
        # The masks passes: a box of two axes first (with the labels' dtype), the last pass with the class weights
        # (the loss op), a single pass (the masks op, R = 0 or 1-D); ball (fp32 distances) and cube (bitmasks).
        for ball in (True, False):
            between = "*fp32" if ball else masks_type
            for first, box, last, finalize, labels_type, int64 in ((True, True, False, False, "*i64", False),
                                                                   (False, False, True, True, "*u8", False),
                                                                   (True, False, True, False, "*i32", True)):
                out_type = masks_type if last else between
                types = {"out_ptr": out_type, "src_ptr": out_type if first else between, "labels_ptr": labels_type,
                         "partial_ptr": "*i32", "invalid_ptr": "*i32", "counter_ptr": "*i32"}
                constants = dict(BALL=ball, FIRST=first, BOX=box, LAST=last, FINALIZE=finalize, UNIT_BATCH=finalize,
                                 INT64_OFFSETS=int64, BLOCK_C=block_c, BLOCK_N=block, BLOCK_R=max(1, 1024 // block_c))
                compile_and_count(kernel._dbce_masks_pass_kernel, types, constants, num_classes,
                                  (ball, first, box, last, finalize, labels_type, int64),
                                  float_args=("step_sq", "step_sq2", "limit"))
        # The cross entropy: the pieces' forward (map, partial sums) and the loss op's (finished reduction).
        for logits_type, labels_type, write_map, finalize, int64 in (("*fp32", "*i64", True, False, False),
                                                                     ("*bf16", "*u8", False, True, False),
                                                                     ("*fp16", "*i32", True, True, True)):
            types = {"logits_ptr": logits_type, "labels_ptr": labels_type, "masks_ptr": masks_type,
                     "invalid_ptr": "*i32", "counter_ptr": "*i32", "grad_logits_ptr": logits_type}
            what = (logits_type, labels_type, write_map, finalize, int64)
            compile_and_count(kernel._dbce_ce_fwd_kernel, types, dict(
                WRITE_MAP=write_map, FINALIZE=finalize, MEAN=finalize, INT64_OFFSETS=int64, BLOCK_C=block_c,
                BLOCK_S=block, BLOCK_R=1024), num_classes, what)
            compile_and_count(kernel._dbce_ce_bwd_kernel, types, dict(
                WITH_SUM=not (write_map and finalize), WRITE_MAP=write_map, SCALED=finalize, INT64_OFFSETS=int64,
                BLOCK_C=block_c, BLOCK_S=block), num_classes, what)
""")


@pytest.mark.skipif(not _has_nvidia_backend(), reason="triton has no NVIDIA backend")
def test_triton_compiles_for_sm90_without_spills():
    """Compile the masks pass and the cross entropy's forward and backward ahead of time for an H100 (sm_90a) at the
    launch heuristic's sizes, with their option sets; no GPU needed. The interpreter is lax about types; the compiler
    is not (loop-carried values, branch results, pointer dtypes). ptxas -v must report no register spills for
    C <= 16 (printed for C = 64)."""
    output, failures = helpers.compile_result("dbce")
    print(output)
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------------------ GPU-sized cases


@ON_GPU
@pytest.mark.parametrize("element", [BALL, CUBE], ids=["ball", "cube"])
@pytest.mark.parametrize("radius", [3.0, 10.0])
def test_gpu_volumes_masks(backend, element, radius):
    """64^3 volumes: mostly background, a few labelled spheres after the dilation, an ignored slab."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.zeros(2, 64, 64, 64, dtype=torch.int64)
    labels[torch.rand(labels.shape, generator=generator) < 0.002] = 2
    labels[torch.rand(labels.shape, generator=generator) < 0.001] = 3
    labels[:, :8] = -100
    for spacing in (ISOTROPIC, (2.0, 1.0, 1.0)):
        check_masks(backend, labels, 4, -100, element, radius, spacing, f"64^3 R={radius} {spacing}")


@ON_GPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
def test_gpu_volumes_cross_entropy(backend, dtype):
    generator = torch.Generator().manual_seed(1)
    pixels = 17 * 19 * 23
    logits = (3 * torch.randn(2, 4, pixels, generator=generator)).to(dtype).cuda()
    labels = make_labels((2, pixels), 4, torch.uint8, 255, seed=1, blobs=False).cuda()
    masks = torch.randint(0, 16, (2, pixels), generator=generator).to(torch.uint8).cuda()
    weights = torch.rand(2, 4, generator=generator).cuda()
    for write_map in (True, False):
        check_ce(backend, (logits, labels, masks, weights, 255, write_map), f"{dtype} write_map={write_map}")


@ON_GPU
def test_gpu_volumes_deterministic(backend):
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (2, 64, 64, 64), generator=generator).cuda()
    logits = torch.randn(2, 4, 64**3, generator=generator).cuda()
    first = run_masks(backend, labels, 4, -100, BALL, 3.0, ISOTROPIC)
    ce_args = (logits, labels.flatten(1), first[0].flatten(1), torch.rand(2, 4, device="cuda"), -100, True)

    def ce():
        leaf = logits.detach().requires_grad_(True)
        sums, weighted = op.dbce_ce(backend, leaf, *ce_args[1:])
        (grad,) = torch.autograd.grad(sums.sum() + weighted.sum(), leaf)
        return sums, weighted, grad

    ce_first = ce()
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(run_masks(backend, labels, 4, -100, BALL, 3.0, ISOTROPIC),
                                                     first, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(ce(), ce_first, strict=True))


# ---------------------------------------------------------------------------------------------------- CUDA only


@on("cuda")
@pytest.mark.parametrize("radius, element, passes", [(0.0, "ball", 1), (2.0, "ball", 1), (1.0, "cube", 1),
                                                     (5.0, "ball", 2)], ids=str)
def test_cuda_four_launches_without_sync(backend, radius, element, passes):
    """Issue 12 on the CUDA C++ kernels: forward and backward in the masks passes (one, or two past a 169-offset
    element in 3-D) + the cross entropy forward and backward, plus one zeros for the launches' tickets and autograd's
    upstream gradient; no host sync (test_host_cost.py counts the Triton launches)."""
    from test_dice_sums import _cuda_kernels

    if not torch._C._dispatch_has_kernel_for_dispatch_key("torch_medloss::dbce_loss_fwd", "CUDA"):
        pytest.fail("the CUDA dbce_loss op is not registered")
    labels = make_labels((2, 12, 13, 14), 4, seed=1, invalid=False).cuda()
    logits = torch.randn(2, 4, 12, 13, 14, device="cuda", requires_grad=True)

    def step():
        loss = op.dbce_loss(logits, labels, backend="cuda", radius=radius, element=element, spacing=None,
                            batch=False, ignore_index=-100, reduction="mean", distributed="off")
        torch.autograd.grad(loss, logits)

    step()
    names = _cuda_kernels(step)
    ours = [name for name in names if "dbce_" in name]
    assert len(ours) == passes + 2 and len(names) <= len(ours) + 2, names
