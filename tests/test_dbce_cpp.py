"""Tests of the C++ DBCE ops (csrc/cpu/dbce_kernel.cpp) against torch_medloss.reference.dbce_ops.

``torch.ops.torch_medloss.dbce_masks`` must give the reference's masks bitwise (and its counts, areas and invalid
counts exactly) for the ball and the cube, any radius, anisotropic spacing, 1-D, 2-D and 3-D maps, 1 to 64 classes,
every label dtype and strided labels. ``dbce_ce_fwd`` / ``dbce_ce_bwd`` are compared with the reference on the same
values: float64 and float32 tightly, bfloat16 and float16 logits against the reference on the same values upcast to
float32 (the kernel accumulates in float32), within a small multiple of the dtype's rounding for the gradients. The
extension is built once (or loaded from the cache) by the ``ops`` fixture.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from torch_medloss import _extension
from torch_medloss.reference import dbce_ops as reference

BALL, CUBE = reference.ELEMENT_BALL, reference.ELEMENT_CUBE
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
ISOTROPIC, ANISOTROPIC = [1.0, 1.0, 1.0], [2.0, 1.0, 0.7]
RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps,
    torch.float16: 2 * torch.finfo(torch.float16).eps,
}
CPU_CHUNK = 8192  # the kernel's pixels per task: longer images are summed from several partial rows


@pytest.fixture(scope="module")
def ops():
    """The three ops, built (or loaded from the cache) once for the module; autograd registered with them."""
    import torch_medloss.ops.dbce  # noqa: F401  (registers the fake kernels and autograd once loaded)

    reason = _extension.why_not_loaded(cuda=False)
    if reason is not None and os.environ.get("TORCH_MEDLOSS_NO_BUILD", "0") not in ("", "0"):
        pytest.skip(reason)
    assert reason is None, f"the C++ extension did not build: {reason}"
    return torch.ops.torch_medloss


# ----------------------------------------------------------------------------------------------------- masks


def make_labels(shape, classes, dtype=torch.int64, ignore_index=-100, seed=0, invalid=True, blobs=True):
    """Labels (B, D, H, W): blocky regions of classes (so dilation matters), ~15% ignore_index where the dtype holds
    it, and a few invalid labels on both sides of [0, C) when ``invalid``. Label 1 is absent when C >= 3."""
    generator = torch.Generator().manual_seed(seed)
    batch, *spatial = shape
    if blobs:
        coarse = [max(1, math.ceil(n / 3)) for n in spatial]
        field = torch.randint(0, classes, (batch, 1, *coarse), generator=generator).double()
        labels = torch.nn.functional.interpolate(field, size=spatial, mode="nearest")[:, 0].long()
        scatter = torch.rand(shape, generator=generator) < 0.1
        labels[scatter] = torch.randint(0, classes, (int(scatter.sum()),), generator=generator)
    else:
        labels = torch.randint(0, classes, shape, generator=generator)
    if classes >= 3:
        labels[labels == 1] = 0
    info = torch.iinfo(dtype)
    if info.min <= ignore_index <= info.max:
        labels[torch.rand(shape, generator=generator) < 0.15] = ignore_index
    if invalid:
        bad = torch.rand(shape, generator=generator) < 0.05
        values = torch.tensor([-3, classes, classes + 7])[torch.randint(0, 3, (int(bad.sum()),), generator=generator)]
        labels[bad] = values
    labels = labels.clamp(info.min, info.max).to(dtype)
    return labels


def check_masks(ops, labels, classes, ignore_index, element, radius, spacing, what=""):
    args = (labels, classes, ignore_index, element, float(radius), [float(s) for s in spacing])
    got = ops.dbce_masks(*args)
    expected = reference.dbce_masks(*args)
    names = ("masks", "counts", "areas", "invalid")
    for name, actual, wanted in zip(names, got, expected, strict=True):
        assert actual.dtype == wanted.dtype, f"{what}: {name} dtype {actual.dtype} != {wanted.dtype}"
        assert actual.shape == wanted.shape, f"{what}: {name} shape {tuple(actual.shape)} != {tuple(wanted.shape)}"
        if not torch.equal(actual, wanted):
            where = (actual != wanted).nonzero()[:5].tolist()
            values = [(actual[tuple(i)].item(), wanted[tuple(i)].item()) for i in where]
            pytest.fail(f"{what}: {name} differs at {where} (got, expected) = {values}")
    assert got[0].is_contiguous()
    return got


def test_hand_computed_masks(ops):
    # One row of 9 pixels: class 0 at 2, class 1 at 7, ignored at 4, invalid (5) at 8; radius 2 along W.
    labels = torch.tensor([[[[3, 3, 0, 3, -1, 3, 3, 1, 5]]]])
    masks, counts, areas, invalid = ops.dbce_masks(labels, 4, -1, BALL, 2.0, ISOTROPIC)
    # class 0 reaches 0..4 (not 4: ignored), class 1 reaches 5..8 (not 8: invalid), class 3 is everywhere valid
    assert masks.dtype == torch.uint8
    assert masks.flatten().tolist() == [9, 9, 9, 9, 0, 10, 10, 10, 0]
    assert counts.tolist() == [[1, 1, 0, 5]] and areas.tolist() == [[4, 3, 0, 7]] and invalid.tolist() == [1]
    # 2-D, spacing 1.5 along H: radius 1.5 reaches one row up or down but not diagonally (1.5^2 + 1 > 1.5^2).
    labels = torch.full((1, 1, 3, 3), 1)
    labels[0, 0, 1, 1] = 0
    masks, *_ = ops.dbce_masks(labels, 2, -100, BALL, 1.5, [1.0, 1.5, 1.0])
    assert masks[0, 0].tolist() == [[2, 3, 2], [3, 3, 3], [2, 3, 2]]
    masks, *_ = ops.dbce_masks(labels, 2, -100, CUBE, 1.5, [1.0, 1.5, 1.0])
    assert masks[0, 0].tolist() == [[3, 3, 3], [3, 3, 3], [3, 3, 3]]


@pytest.mark.parametrize("spacing", [ISOTROPIC, ANISOTROPIC], ids=["iso", "aniso"])
@pytest.mark.parametrize("radius", [0, 1, 1.5, 2.5, 3])
@pytest.mark.parametrize("element", [BALL, CUBE], ids=["ball", "cube"])
@pytest.mark.parametrize("shape", [(3, 1, 1, 23), (2, 1, 11, 13), (2, 7, 9, 8)], ids=["1d", "2d", "3d"])
def test_masks_match_reference(ops, shape, element, radius, spacing):
    for index, classes in enumerate((2, 5)):
        labels = make_labels(shape, classes, seed=index + int(10 * radius))
        check_masks(ops, labels, classes, -100, element, radius, spacing, f"C = {classes}")


@pytest.mark.parametrize("spacing", [ISOTROPIC, ANISOTROPIC], ids=["iso", "aniso"])
@pytest.mark.parametrize("element", [BALL, CUBE], ids=["ball", "cube"])
def test_masks_radius_10(ops, element, spacing):
    labels = make_labels((1, 12, 14, 13), 3, seed=3)
    labels[0, 1:, :, :] = torch.where(labels[0, 1:] == 2, 0, labels[0, 1:])  # class 2 only in the first slice
    check_masks(ops, labels, 3, -100, element, 10, spacing, "radius 10")


def test_masks_boundary_radii(ops):
    """Radii on the element's boundary (sqrt 2, sqrt 3, integer multiples of the spacing) keep the reference's
    boundary offsets, radius 2.1 with spacing 0.7 (3 * 0.7 = 2.0999999999999996) its rounding, and radius 0.3 with
    spacing 0.1 (3 * 0.1 = 0.30000000000000004 > 0.3) the 1e-9 tolerance that keeps offset 3."""
    labels = make_labels((1, 9, 10, 11), 4, seed=5, invalid=False)
    for radius, spacing in [(math.sqrt(2), ISOTROPIC), (math.sqrt(3), ISOTROPIC), (2.1, [0.7, 0.7, 0.7]),
                            (1.4, ANISOTROPIC), (math.sqrt(2.0**2 + 0.7**2), ANISOTROPIC), (2.0, [0.5, 1.0, 2.0]),
                            (0.3, [0.1, 0.1, 0.1]), (0.3, [1.0, 0.1, 0.1])]:
        for element in (BALL, CUBE):
            check_masks(ops, labels, 4, -100, element, radius, spacing, f"radius {radius}, spacing {spacing}")


@pytest.mark.parametrize("classes", [1, 2, 5, 9, 17, 33, 64])
def test_masks_class_counts(ops, classes):
    labels = make_labels((2, 5, 7, 6), classes, seed=classes, blobs=classes < 17)
    for element in (BALL, CUBE):
        masks, *_ = check_masks(ops, labels, classes, -100, element, 1.5, ANISOTROPIC, f"C = {classes}")
    assert masks.dtype == reference.mask_dtype(classes)


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES, ids=str)
@pytest.mark.parametrize("ignore_index", [-100, 0, 2, 4, 255])
def test_masks_label_dtypes_and_ignore_index(ops, label_dtype, ignore_index):
    # C = 4: ignore_index 0 and 2 are classes, 4 is just past them, -100 and 255 sentinels (255 fits uint8 only).
    labels = make_labels((2, 4, 6, 5), 4, label_dtype, ignore_index, seed=ignore_index % 7)
    if label_dtype == torch.int64:
        labels[0, 0, 0, 0] = 2**32 + 1  # wraps onto class 1 if anything narrows it to int32
    if label_dtype == torch.uint8:
        labels[0, 0, 0, 1] = 156  # -100 as uint8: must stay invalid, not ignored
    for element in (BALL, CUBE):
        _, _, _, invalid = check_masks(ops, labels, 4, ignore_index, element, 1.0, ISOTROPIC, f"{label_dtype}")
    assert invalid.sum() > 0


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda x: x.transpose(1, 3).contiguous().transpose(1, 3), id="transposed"),
        pytest.param(lambda x: x.permute(3, 0, 2, 1).contiguous().permute(1, 3, 2, 0), id="permuted"),
        pytest.param(lambda x: x[:, :, ::2, 1::3], id="sliced"),
        pytest.param(lambda x: x[:, :1].expand(-1, 4, -1, -1), id="expanded"),
    ],
)
def test_masks_strided_labels(ops, make):
    labels = make(make_labels((2, 6, 10, 12), 5, torch.int16, seed=11))
    assert not labels.is_contiguous()
    for element in (BALL, CUBE):
        got = check_masks(ops, labels, 5, -100, element, 2.0, ANISOTROPIC, "strided")
        contiguous = ops.dbce_masks(labels.contiguous(), 5, -100, element, 2.0, ANISOTROPIC)
        assert all(torch.equal(a, b) for a, b in zip(got, contiguous, strict=True))


def test_masks_all_ignored_absent_classes_and_borders(ops):
    labels = torch.full((3, 4, 5, 6), -100)
    labels[1] = 2  # one class fills the image: every valid pixel is its own class's
    labels[2, 0, 0, 0] = 0  # corners and faces: the dilation must stop at the borders
    labels[2, -1, -1, -1] = 3
    labels[2, :, 2, -1] = 1
    for element in (BALL, CUBE):
        for radius in (0, 1, 2.5, 10):
            masks, counts, areas, invalid = check_masks(ops, labels, 4, -100, element, radius, ANISOTROPIC,
                                                        f"radius {radius}")
            assert masks[0].eq(0).all() and counts[0].eq(0).all() and areas[0].eq(0).all()
            assert masks[1].eq(4).all() and counts[1].tolist() == [0, 0, 120, 0] and areas[1].tolist() == [0, 0, 120, 0]
            assert invalid.eq(0).all()


def test_masks_invalid_labels(ops):
    labels = torch.tensor([[[[0, 7, -3, 1, 2**40, 1, -100, -(2**40)]]]])
    masks, counts, areas, invalid = check_masks(ops, labels, 2, -100, CUBE, 1, ISOTROPIC, "invalid")
    assert invalid.tolist() == [4] and counts.tolist() == [[1, 2]]
    # invalid pixels are neither members nor dilated, but a dilation crosses them
    assert masks.flatten().tolist() == [1, 0, 0, 2, 0, 2, 0, 0]
    masks, *_ = check_masks(ops, labels, 2, -100, CUBE, 3, ISOTROPIC, "invalid, crossed")
    assert masks.flatten().tolist() == [3, 0, 0, 3, 0, 2, 0, 0]
    for dtype in (torch.uint8, torch.int8):
        narrow = torch.tensor([[[[0, 100, 1, 127]]]], dtype=dtype)
        assert ops.dbce_masks(narrow, 2, -100, BALL, 1.0, ISOTROPIC)[3].tolist() == [2]


@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 4, 0)], ids=str)
def test_masks_empty(ops, shape):
    check_masks(ops, torch.zeros(shape, dtype=torch.int64), 3, -100, BALL, 2.0, ISOTROPIC, "empty")


def test_masks_large_images_spread_over_threads(ops):
    """Images of >= 2**16 pixels run image after image with their rows on the threads (the other code path)."""
    labels = make_labels((2, 40, 41, 42), 6, torch.uint8, seed=13)
    for element in (BALL, CUBE):
        check_masks(ops, labels, 6, -100, element, 2.5, ANISOTROPIC, "large")


# ----------------------------------------------------------------------------------------------- cross entropy


def make_ce_case(batch, classes, pixels, dtype=torch.float64, label_dtype=torch.int64, ignore_index=-100,
                 write_map=True, seed=0, mask_dtype=None):
    """(logits, labels, masks, class_weights, ignore_index, write_map): masks from the reference op (classes > 1)
    or random bits, labels with ignore_index and invalid values."""
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn((batch, classes, pixels), generator=generator, dtype=torch.float64)).to(dtype)
    info = torch.iinfo(label_dtype)
    labels = torch.randint(max(info.min, -2), min(info.max + 1, classes + 2), (batch, pixels), generator=generator)
    if info.min <= ignore_index <= info.max:
        labels[torch.rand((batch, pixels), generator=generator) < 0.2] = ignore_index
    labels = labels.to(label_dtype)
    wide = torch.randint(0, 2, (batch, pixels, classes), generator=generator) << torch.arange(classes)
    masks = wide.sum(-1)
    masks[torch.rand((batch, pixels), generator=generator) < 0.1] = 0
    masks = masks.to(mask_dtype or reference.mask_dtype(classes))
    weights = 0.1 + 2 * torch.rand((batch, classes), generator=generator)
    return logits, labels, masks, weights, ignore_index, write_map


def upstream(args, seed=1):
    logits, *_, write_map = args
    accumulator = torch.float64 if logits.dtype == torch.float64 else torch.float32
    generator = torch.Generator().manual_seed(seed)
    batch, _, pixels = logits.shape
    grad_sums = torch.randn((batch, 2), generator=generator, dtype=torch.float64).to(accumulator)
    grad_map = torch.randn((batch, pixels) if write_map else (0,), generator=generator, dtype=torch.float64)
    return grad_sums, grad_map.to(accumulator)


def upcast(args):
    logits = args[0]
    return (logits.float(), *args[1:]) if logits.dtype in (torch.bfloat16, torch.float16) else args


def assert_matches(actual, expected, rtol, what):
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale,
                               msg=lambda message: f"{what}\n{message}")


def check_ce(ops, args, what):
    logits, *_, write_map = args
    accumulator = torch.float64 if logits.dtype == torch.float64 else torch.float32
    batch, _, pixels = logits.shape
    sums, weighted = ops.dbce_ce_fwd(*args)
    expected_sums, expected_map = reference.dbce_ce_fwd(*upcast(args))
    assert sums.shape == (batch, 2) and sums.dtype == accumulator, what
    assert weighted.shape == ((batch, pixels) if write_map else (0,)) and weighted.dtype == accumulator, what
    assert_matches(sums, expected_sums, RTOL[accumulator], f"{what}: sums")
    assert_matches(weighted, expected_map, RTOL[accumulator], f"{what}: map")

    grad_sums, grad_map = upstream(args)
    grad = ops.dbce_ce_bwd(grad_sums, grad_map, *args)
    assert grad.shape == logits.shape and grad.dtype == logits.dtype, what
    assert grad.stride() == torch.empty_like(logits).stride(), what
    expected = reference.dbce_ce_bwd(grad_sums, grad_map, *upcast(args))
    assert_matches(grad.to(accumulator), expected.to(accumulator), RTOL[logits.dtype], f"{what}: grad_logits")
    # The loss scaled by 2: doubling is exact in float32 and float64.
    doubled = ops.dbce_ce_bwd(2 * grad_sums, 2 * grad_map, *args)
    if logits.dtype in (torch.float64, torch.float32):
        assert torch.equal(doubled, 2 * grad), f"{what}: doubling the upstream gradient did not double grad_logits"
    else:
        assert_matches(doubled.float(), 2 * grad.float(), RTOL[logits.dtype], f"{what}: doubled")
    return sums, weighted, grad


def test_hand_computed_ce(ops):
    # Pixel 0: logits (0, 0), label 0, mask bits {0, 1} with weights (0.5, 2): w = 2, CE = log 2.
    # Pixel 1: label 1, empty mask: w = 0. Pixel 2: ignored (label 7 = ignore_index). Pixel 3: invalid label -1.
    logits = torch.tensor([[[0.0, 1.0, 5.0, 2.0], [0.0, 3.0, -1.0, 0.0]]], dtype=torch.float64)
    labels = torch.tensor([[0, 1, 7, -1]])
    masks = torch.tensor([[3, 0, 3, 3]], dtype=torch.uint8)
    weights = torch.tensor([[0.5, 2.0]])
    sums, weighted = ops.dbce_ce_fwd(logits, labels, masks, weights, 7, True)
    assert torch.allclose(sums, torch.tensor([[2 * math.log(2.0), 2.0]], dtype=torch.float64), rtol=1e-15, atol=0)
    assert weighted[0, 1:].eq(0).all()
    grad = ops.dbce_ce_bwd(torch.tensor([[1.0, 5.0]], dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64),
                           logits, labels, masks, weights, 7, True)
    # d(2 CE)/dx = 2 (softmax - onehot) = (-1, 1) at pixel 0; zero elsewhere (sum w has no gradient).
    expected = torch.zeros(1, 2, 4, dtype=torch.float64)
    expected[0, :, 0] = torch.tensor([-1.0, 1.0])
    assert torch.equal(grad, expected)


@pytest.mark.parametrize("write_map", [False, True], ids=["sums", "map"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 7), (3, 2, 33), (2, 5, 1000), (3, 9, 1), (1, 17, 65), (2, 64, 40)],
                         ids=str)
def test_ce_matches_reference(ops, shape, dtype, write_map):
    check_ce(ops, make_ce_case(*shape, dtype=dtype, write_map=write_map, seed=sum(shape)), f"{shape}")


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES, ids=str)
@pytest.mark.parametrize("ignore_index", [-100, 0, 2, 3, 255])
def test_ce_label_dtypes_and_ignore_index(ops, label_dtype, ignore_index):
    args = make_ce_case(2, 3, 157, label_dtype=label_dtype, ignore_index=ignore_index, seed=ignore_index % 13)
    if label_dtype == torch.int64:
        args[1][0, 0] = 2**32 + 1
    check_ce(ops, args, f"{label_dtype}, ignore_index {ignore_index}")


@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.int32, torch.int16, torch.int8], ids=str)
def test_ce_wider_or_signed_masks(ops, mask_dtype):
    """Masks of another integer dtype are read as the reference reads them (masks.long(), sign-extended)."""
    args = make_ce_case(2, 7, 300, mask_dtype=torch.uint8, seed=3)
    masks = args[2].to(torch.int16).to(mask_dtype) if mask_dtype != torch.int8 else args[2].view(torch.int8)
    check_ce(ops, (args[0], args[1], masks, *args[3:]), f"{mask_dtype} masks")


@pytest.mark.parametrize("write_map", [False, True], ids=["sums", "map"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_ce_low_precision_logits(ops, dtype, write_map):
    check_ce(ops, make_ce_case(2, 5, 333, dtype=dtype, write_map=write_map, seed=7), f"{dtype}")


def test_ce_several_chunks_per_image(ops):
    for dtype in (torch.float64, torch.float32):
        check_ce(ops, make_ce_case(2, 3, 2 * CPU_CHUNK + 77, dtype=dtype, seed=9), f"{dtype}, 3 chunks")


@pytest.mark.parametrize("memory_format, shape", [(torch.channels_last, (2, 5, 7, 9)),
                                                  (torch.channels_last_3d, (2, 3, 5, 4, 3))], ids=["2d", "3d"])
def test_ce_channels_last_read_in_place(ops, memory_format, shape):
    generator = torch.Generator().manual_seed(17)
    image = torch.randn(shape, generator=generator, dtype=torch.float64).contiguous(memory_format=memory_format)
    logits = image.flatten(2)
    assert logits.data_ptr() == image.data_ptr() and logits.stride(1) == 1, "flatten(2) must be a view"
    _, labels, masks, weights, *options = make_ce_case(shape[0], shape[1], logits.shape[2], seed=17)
    labels = labels.t().contiguous().t()  # transposed labels: pixel stride B
    args = (logits, labels, masks, weights, *options)
    _, _, grad = check_ce(ops, args, f"{memory_format}")
    assert grad.stride() == logits.stride(), "grad_logits must keep the logits' channels_last layout"
    contiguous = ops.dbce_ce_fwd(logits.contiguous(), labels.contiguous(), masks, weights, *options)
    assert all(torch.equal(a, b) for a, b in zip(ops.dbce_ce_fwd(*args), contiguous, strict=True))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda x: x[:, :, ::3], id="pixel-stride-3"),
        pytest.param(lambda x: x[::2], id="batch-stride-2"),
        pytest.param(lambda x: x[:, :, :1].expand(-1, -1, 40), id="pixel-stride-0"),
    ],
)
def test_ce_strided_views(ops, make):
    generator = torch.Generator().manual_seed(19)
    logits = make(torch.randn((6, 4, 120), generator=generator, dtype=torch.float64))
    batch, classes, pixels = logits.shape
    _, labels, masks, weights, *options = make_ce_case(batch, classes, 2 * pixels, ignore_index=1, seed=19)
    check_ce(ops, (logits, labels[:, ::2], masks[:, 1::2], weights, *options), "strided")


@pytest.mark.parametrize("shape", [(2, 3, 0), (0, 3, 5)], ids=str)
def test_ce_empty(ops, shape):
    batch, classes, pixels = shape
    args = (torch.empty(shape), torch.empty((batch, pixels), dtype=torch.int64),
            torch.empty((batch, pixels), dtype=torch.uint8), torch.ones(batch, classes), -100, True)
    sums, weighted = ops.dbce_ce_fwd(*args)
    assert torch.equal(sums, torch.zeros(batch, 2)) and weighted.shape == (batch, pixels)
    grad = ops.dbce_ce_bwd(torch.ones(batch, 2), torch.ones(batch, pixels), *args)
    assert grad.shape == shape and grad.dtype == torch.float32


# ------------------------------------------------------------------------------------------------ determinism


def test_deterministic_and_thread_count_independent(ops):
    labels = make_labels((2, 20, 30, 40), 5, seed=23)
    large = make_labels((1, 40, 41, 42), 3, seed=24)
    args = make_ce_case(2, 5, 3 * CPU_CHUNK + 77, dtype=torch.float32, seed=29)
    grad_sums, grad_map = upstream(args)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 1, 2):
            torch.set_num_threads(count)
            results.append((*ops.dbce_masks(labels, 5, -100, BALL, 3.0, ANISOTROPIC),
                            *ops.dbce_masks(large, 3, -100, CUBE, 2.0, ISOTROPIC),
                            *ops.dbce_ce_fwd(*args), ops.dbce_ce_bwd(grad_sums, grad_map, *args)))
    finally:
        torch.set_num_threads(threads)
    for result in results[1:]:
        for got, first in zip(result, results[0], strict=True):
            assert torch.equal(got, first), f"differs by {(got.double() - first.double()).abs().max().item()}"


# ---------------------------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"labels": torch.zeros(2, 3, 4, dtype=torch.int64)},
         r"labels must be 4-D \(B, D, H, W\), got shape \[2, 3, 4\]"),
        ({"labels": torch.zeros(1, 2, 3, 4)}, "labels must be uint8, int8, int16, int32 or int64, got Float"),
        ({"num_classes": 65}, r"num_classes must be in \[1, 64\] \(one bit per class in the mask\), got 65"),
        ({"num_classes": 0}, r"num_classes must be in \[1, 64\] .*got 0"),
        ({"element": 2}, r"element must be 0 \(ball\) or 1 \(cube\), got 2"),
        ({"radius": -1.0}, "radius must be finite and >= 0, got -1"),
        ({"radius": math.inf}, "radius must be finite and >= 0, got inf"),
        ({"spacing": [1.0, 1.0]}, r"spacing must hold 3 voxel sizes \(D, H, W\), got 2 values"),
        ({"spacing": [1.0, 0.0, 1.0]}, "spacing must be finite and > 0"),
    ],
)
def test_masks_checks(ops, changes, match):
    arguments = dict(labels=torch.zeros(1, 2, 3, 4, dtype=torch.int64), num_classes=3, ignore_index=-100,
                     element=BALL, radius=1.0, spacing=[1.0, 1.0, 1.0])
    arguments.update(changes)
    with pytest.raises(RuntimeError, match="torch_medloss::dbce_masks: " + match):
        ops.dbce_masks(*arguments.values())


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"logits": torch.zeros(2, 3)}, r"logits must be 3-D \(B, C, S\), got shape \[2, 3\]"),
        ({"logits": torch.zeros(2, 3, 5, dtype=torch.int64)}, "logits must be float32, float64, bfloat16 or float16, "
         "got Long"),
        ({"logits": torch.zeros(2, 65, 5), "class_weights": torch.ones(2, 65)},
         r"logits must have between 1 and 64 classes \(one mask bit per class\), got shape \[2, 65, 5\]"),
        ({"labels": torch.zeros(2, 4, dtype=torch.int64)}, r"labels must have shape \(B, S\) = \[2, 5\], got \[2, 4\]"),
        ({"labels": torch.zeros(2, 5)}, "labels must be uint8, int8, int16, int32 or int64, got Float"),
        ({"masks": torch.zeros(5, dtype=torch.uint8)}, r"masks must have shape \(B, S\) = \[2, 5\], got \[5\]"),
        ({"masks": torch.zeros(2, 5, dtype=torch.bool)}, "masks must be uint8, int8, int16, int32 or int64, got Bool"),
        ({"class_weights": torch.ones(3)}, r"class_weights must have shape \(B, C\) = \[2, 3\], got \[3\]"),
        ({"class_weights": torch.ones(2, 3, dtype=torch.int64)}, "class_weights must be float32, .* got Long"),
    ],
)
def test_ce_checks(ops, changes, match):
    arguments = dict(logits=torch.zeros(2, 3, 5), labels=torch.zeros(2, 5, dtype=torch.int64),
                     masks=torch.zeros(2, 5, dtype=torch.uint8), class_weights=torch.ones(2, 3), ignore_index=-100,
                     write_map=True)
    arguments.update(changes)
    args = tuple(arguments.values())
    with pytest.raises(RuntimeError, match="torch_medloss::dbce_ce_fwd: " + match):
        ops.dbce_ce_fwd(*args)
    with pytest.raises(RuntimeError, match="torch_medloss::dbce_ce_bwd: " + match):
        ops.dbce_ce_bwd(torch.zeros(2, 2), torch.zeros(2, 5), *args)


@pytest.mark.parametrize(
    "grads, match",
    [
        ((torch.zeros(2, 3), torch.zeros(2, 5)), r"grad_sums must have shape \(B, 2\) = \[2, 2\], got \[2, 3\]"),
        ((torch.zeros(2, 2), torch.zeros(0)),
         r"grad_map must have shape \(B, S\) = \[2, 5\] when write_map, got \[0\]"),
        ((torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, 5)), "grad_sums must be float32, .* got Long"),
    ],
)
def test_ce_backward_checks(ops, grads, match):
    args = (torch.zeros(2, 3, 5), torch.zeros(2, 5, dtype=torch.int64), torch.zeros(2, 5, dtype=torch.uint8),
            torch.ones(2, 3), -100, True)
    with pytest.raises(RuntimeError, match="torch_medloss::dbce_ce_bwd: " + match):
        ops.dbce_ce_bwd(*grads, *args)


# ------------------------------------------------------------------------------- autograd, opcheck, compile


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("permuted", [False, True])
def test_gradcheck(ops, seed, permuted):
    logits, *rest = make_ce_case(2, 4, 7, ignore_index=2, seed=seed)
    if permuted:
        logits = logits.transpose(1, 2).contiguous().transpose(1, 2)
    leaf = logits.detach().requires_grad_(True)

    # sum w has no gradient (w does not depend on the logits); finite differences agree
    assert torch.autograd.gradcheck(lambda x: ops.dbce_ce_fwd(x, *rest), (leaf,))


def test_opcheck(ops):
    labels = make_labels((2, 3, 4, 5), 3, torch.uint8, seed=31)
    torch.library.opcheck(ops.dbce_masks.default, (labels, 3, -100, BALL, 1.5, ANISOTROPIC))
    torch.library.opcheck(ops.dbce_masks.default, (labels.transpose(2, 3), 9, 0, CUBE, 1.0, ISOTROPIC))
    for args in (make_ce_case(2, 3, 33, seed=1), make_ce_case(1, 4, 20, dtype=torch.float32, write_map=False, seed=2)):
        logits = args[0].transpose(1, 2).contiguous().transpose(1, 2)  # classes innermost, like channels_last
        for x in (args[0], logits):
            torch.library.opcheck(ops.dbce_ce_fwd.default, (x.detach().requires_grad_(True), *args[1:]))
            torch.library.opcheck(ops.dbce_ce_bwd.default, (*upstream(args), x, *args[1:]))


def test_compile_fullgraph(ops):
    labels = make_labels((2, 3, 4, 5), 3, seed=37, invalid=False)
    logits0 = torch.randn(2, 3, 60)

    def loss(logits):
        masks, _, areas, _ = ops.dbce_masks(labels, 3, -100, BALL, 1.0, ISOTROPIC)
        weights = 1.0 / areas.clamp_min(1).float()
        sums, _ = ops.dbce_ce_fwd(logits, labels.flatten(1), masks.flatten(1), weights, -100, False)
        return sums[:, 0].sum() / sums[:, 1].sum()

    leaf = logits0.clone().requires_grad_(True)
    value = torch.compile(loss, fullgraph=True, backend="aot_eager")(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    expected_leaf = logits0.clone().requires_grad_(True)
    expected = loss(expected_leaf)
    (expected_grad,) = torch.autograd.grad(expected, expected_leaf)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("element", [BALL, CUBE], ids=["ball", "cube"])
def test_masks_mixed_reaches(ops, element):
    # Slices of a few pixels (several per task), reaches that differ per axis and exceed some dims, and class counts
    # on each side of the 16-class bit-counting switch.
    shape = (2, 12, 5, 14)
    for index, (radius, spacing) in enumerate([(0.5, [0.4, 1.0, 2.0]), (1.8, [1.3, 0.6, 1.0]),
                                               (4.2, [2.3, 1.1, 0.6]), (6.0, [1.0, 3.0, 0.9])]):
        for classes in (3, 12, 40):
            labels = make_labels(shape, classes, seed=100 + index)
            check_masks(ops, labels, classes, -100, element, radius, spacing,
                        f"radius {radius}, spacing {spacing}, C = {classes}")
