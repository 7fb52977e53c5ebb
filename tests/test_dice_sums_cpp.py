"""Tests of the C++ dice_sums ops (csrc/cpu) against torch_medloss.reference.dice_sums.

``torch.ops.torch_medloss.dice_sums_fwd`` / ``_bwd`` are called directly on (B, C, S) logits and (B, S) labels or
(B, C, S) dense targets, forward and backward, and compared with the pure-PyTorch reference run on the same values:
float64 and float32 tightly, bfloat16 and float16 logits against the reference on the same values upcast to float32
(the kernels accumulate in float32), within a small multiple of the dtype's rounding for the gradients, which come
back in the logits' dtype. The extension is built once (or loaded from the cache) by the ``ops`` fixture.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_medloss import _extension
from torch_medloss.reference import dice_sums as reference

HAS_OPS_MODULE = importlib.util.find_spec("torch_medloss.dice_sums") is not None

NONE, SOFTMAX, SIGMOID = reference.ACTIVATION_NONE, reference.ACTIVATION_SOFTMAX, reference.ACTIVATION_SIGMOID
MASK_NONE, MASK_LABEL = reference.MASK_NONE, reference.MASK_LABEL
MASK_CHANNEL, MASK_SENTINEL = reference.MASK_CHANNEL, reference.MASK_SENTINEL
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
# Relative tolerance per logits dtype, scaled by the largest expected magnitude for the absolute one. bfloat16 and
# float16 sums are float32 sums of the same values; their gradients are rounded once to the dtype (2 eps covers it).
RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps,
    torch.float16: 2 * torch.finfo(torch.float16).eps,
}
# The CPU kernel's pixel chunk: larger images are summed from several partial rows.
CPU_CHUNK = 8192


@pytest.fixture(scope="module")
def ops():
    """(dice_sums_fwd, dice_sums_bwd), built (or loaded from the cache) once for the module."""
    if HAS_OPS_MODULE:
        import torch_medloss.dice_sums  # noqa: F401  (registers the fake kernels and autograd once loaded)
    reason = _extension.why_not_loaded(cuda=False)
    if reason is not None and os.environ.get("TORCH_MEDLOSS_NO_BUILD", "0") not in ("", "0"):
        pytest.skip(reason)
    assert reason is None, f"the C++ extension did not build: {reason}"
    return torch.ops.torch_medloss.dice_sums_fwd, torch.ops.torch_medloss.dice_sums_bwd


# ---------------------------------------------------------------------------------------------------- case builder


def make_labels(batch, pixels, classes, dtype, ignore_index, generator, invalid=True):
    """Labels in [0, C), some invalid ones on both sides (when ``invalid``) and ~20% ignore_index where it fits."""
    info = torch.iinfo(dtype)
    low = max(info.min, -2 if invalid else 0)
    high = min(info.max + 1, classes + (3 if invalid else 0))
    labels = torch.randint(low, high, (batch, pixels), generator=generator)
    if info.min <= ignore_index <= info.max:
        labels[torch.rand((batch, pixels), generator=generator) < 0.2] = ignore_index
    labels = labels.to(dtype)
    if invalid and dtype == torch.int64 and labels.numel() > 1:
        labels.view(-1)[1] = 2**32 + 1  # would wrap onto class 1 if anything narrowed it to int32
    if invalid and dtype == torch.uint8 and labels.numel() > 2:
        labels.view(-1)[2] = 156  # -100 as uint8: must stay invalid, not ignored
    return labels


def make_dense(kind, batch, classes, pixels, dtype, generator):
    """One-hot or soft (B, C, S) targets, with ~20% all-zero pixels (the sentinel mask drops them)."""
    if kind == "onehot":
        index = torch.randint(0, classes, (batch, pixels), generator=generator)
        dense = torch.nn.functional.one_hot(index, classes).movedim(-1, 1).to(dtype)
    else:
        dense = torch.rand((batch, classes, pixels), generator=generator, dtype=torch.float64).to(dtype)
    empty = torch.rand((batch, 1, pixels), generator=generator) < 0.2
    return dense.masked_fill(empty, 0)


def make_gamma(kind, classes, dtype):
    if kind == "zero":
        return torch.zeros(classes, dtype=dtype)
    if kind == "scalar":
        return torch.full((classes,), 1.5, dtype=dtype)
    # per class: the special cases 0, 1, 2 and general exponents
    return torch.tensor([0.0, 1.0, 2.0, 0.5, 3.25][:classes] + [0.75] * max(0, classes - 5), dtype=dtype)


def make_case(batch, classes, pixels, *, kind="labels", activation=SOFTMAX, mask_mode=MASK_NONE, ignore_index=-100,
              squared=False, gamma="zero", with_ce=False, smoothing=0.0, dtype=torch.float64,
              label_dtype=torch.int64, target_dtype=None, seed=0):
    """The op's argument tuple. ``kind``: "labels", "onehot" or "soft"."""
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn((batch, classes, pixels), generator=generator, dtype=torch.float64)).to(dtype)
    if kind == "labels":
        target = make_labels(batch, pixels, classes, label_dtype, ignore_index, generator)
    else:
        target = make_dense(kind, batch, classes, pixels, target_dtype or dtype, generator)
    accumulator = torch.float64 if dtype == torch.float64 else torch.float32
    weight = (0.5 + torch.rand(classes, generator=generator, dtype=torch.float64)).to(accumulator)
    return (logits, target, make_gamma(gamma, classes, accumulator), weight, activation, kind == "labels",
            ignore_index, mask_mode, squared, with_ce, smoothing)


def upstream(args, seed=1):
    """Random upstream gradients (grad_sums, grad_extras) for the case, in the accumulation dtype."""
    logits = args[0]
    accumulator = torch.float64 if logits.dtype == torch.float64 else torch.float32
    generator = torch.Generator().manual_seed(seed)
    batch, classes = logits.shape[:2]
    grad_sums = torch.randn((batch, classes, 4), generator=generator, dtype=torch.float64).to(accumulator)
    grad_extras = torch.randn((batch, 3), generator=generator, dtype=torch.float64).to(accumulator)
    return grad_sums, grad_extras


def upcast(args):
    """The case with low-precision logits replaced by the same values in float32 (the reference's view of them)."""
    logits = args[0]
    if logits.dtype in (torch.bfloat16, torch.float16):
        return (logits.float(), *args[1:])
    return args


def assert_matches(actual, expected, rtol, what):
    """assert_close with atol = rtol * the largest expected magnitude; failures name the case."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale,
                               msg=lambda message: f"{what}\n{message}")


def check_case(ops, args, what, rtol=None, sums_rtol=None):
    """Forward and backward against the reference, and the backward with the upstream gradients doubled.

    ``rtol`` applies to the gradients (default: RTOL of the logits' dtype), ``sums_rtol`` to the float32 or float64
    sums (default: RTOL of the accumulation dtype).
    """
    forward, backward = ops
    logits = args[0]
    rtol = RTOL[logits.dtype] if rtol is None else rtol
    accumulator = torch.float64 if logits.dtype == torch.float64 else torch.float32
    sums, extras = forward(*args)
    expected_sums, expected_extras = reference.dice_sums_fwd(*upcast(args))
    batch, classes = logits.shape[:2]
    assert sums.shape == (batch, classes, 4) and extras.shape == (batch, 3), what
    assert sums.dtype == accumulator and extras.dtype == accumulator, what
    assert sums.is_contiguous() and extras.is_contiguous(), what
    sums_rtol = RTOL[accumulator] if sums_rtol is None else sums_rtol
    assert_matches(sums, expected_sums.to(sums.device), sums_rtol, f"{what}: sums")
    assert_matches(extras, expected_extras.to(sums.device), sums_rtol, f"{what}: extras")

    grad_sums, grad_extras = upstream(args)
    grad_sums, grad_extras = grad_sums.to(logits.device), grad_extras.to(logits.device)
    grad = backward(grad_sums, grad_extras, *args)
    assert grad.shape == logits.shape and grad.dtype == logits.dtype, what
    assert grad.stride() == torch.empty_like(logits).stride(), what
    expected = reference.dice_sums_bwd(grad_sums, grad_extras, *upcast(args))
    assert_matches(grad.float() if grad.dtype != torch.float64 else grad, expected.to(grad.device, accumulator),
                   rtol, f"{what}: grad_logits")
    # The loss scaled by 2: the backward is linear in the upstream gradients, and doubling is exact in float32 and
    # float64 (not where a float16 result is subnormal: there 2 * round(g) is coarser than round(2 g)).
    doubled = backward(2 * grad_sums, 2 * grad_extras, *args)
    if logits.dtype in (torch.float64, torch.float32):
        assert torch.equal(doubled, 2 * grad), f"{what}: doubling the upstream gradient did not double grad_logits"
    else:
        assert_matches(doubled.float(), 2 * grad.float(), rtol, f"{what}: grad_logits with the loss doubled")
    return sums, extras, grad


def to_device(args, device):
    return tuple(arg.to(device) if isinstance(arg, torch.Tensor) else arg for arg in args)


# ------------------------------------------------------------------------------------------------- hand-computed


def test_hand_computed_sums(ops):
    forward, backward = ops
    # Probabilities given directly (activation none): pixel 0 is class 0, pixel 1 is class 1.
    logits = torch.tensor([[[0.25, 0.5], [0.75, 0.5]]], dtype=torch.float64)
    labels = torch.tensor([[0, 1]])
    ones = torch.ones(2, dtype=torch.float64)

    def run(gamma, squared, with_ce=False):
        return forward(logits, labels, gamma, ones, NONE, True, -100, MASK_NONE, squared, with_ce, 0.0)

    sums, extras = run(torch.zeros(2, dtype=torch.float64), False)
    # class 0: I = 0.25, P = 0.75, G = 1, D = 0.75 + 0.5; class 1: I = 0.5, P = 1.25, G = 1, D = 0.75 + 0.5
    expected = torch.tensor([[[0.25, 0.75, 1.0, 1.25], [0.5, 1.25, 1.0, 1.25]]], dtype=torch.float64)
    torch.testing.assert_close(sums, expected, rtol=0, atol=0)
    assert torch.equal(extras, torch.zeros(1, 3, dtype=torch.float64))
    sums, _ = run(torch.zeros(2, dtype=torch.float64), True)
    assert torch.equal(sums[0, :, 1], torch.tensor([0.3125, 0.8125], dtype=torch.float64))  # P = sum p^2
    # PM Dice modulator, gamma = (1, 2): class 0 m = [0.75, 0.5], class 1 m = [0.5625, 0.25].
    sums, _ = run(torch.tensor([1.0, 2.0], dtype=torch.float64), False)
    expected = torch.tensor([[[0.1875, 0.4375, 0.75, 0.8125], [0.125, 0.546875, 0.25, 0.546875]]], dtype=torch.float64)
    torch.testing.assert_close(sums, expected, rtol=0, atol=1e-15)
    # Cross entropy on the raw logits: -log softmax at the label, summed; the denominator counts the pixels.
    _, extras = run(torch.zeros(2, dtype=torch.float64), False, with_ce=True)
    ce = math.log1p(math.exp(0.5)) + math.log(2.0)
    torch.testing.assert_close(extras, torch.tensor([[ce, 2.0, 0.0]], dtype=torch.float64), rtol=1e-14, atol=1e-14)
    # d(I of class 0)/dx = y'_0 with no activation.
    grad_sums = torch.zeros(1, 2, 4, dtype=torch.float64)
    grad_sums[0, 0, 0] = 1.0
    grad = backward(grad_sums, torch.zeros(1, 3, dtype=torch.float64), logits, labels, torch.zeros(2).double(), ones,
                    NONE, True, -100, MASK_NONE, False, False, 0.0)
    assert torch.equal(grad, torch.tensor([[[1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64))
    # p' = y' exactly: D = 0 and its gradient is sign(0) = 0, while dP/dp = 1 (k = 1).
    exact = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    sums, _ = forward(exact, labels, torch.zeros(2).double(), ones, NONE, True, -100, MASK_NONE, False, False, 0.0)
    assert torch.equal(sums[0, :, 3], torch.zeros(2, dtype=torch.float64))
    grad_sums = torch.zeros(1, 2, 4, dtype=torch.float64)
    grad_sums[0, :, 3] = 1.0
    grad_sums[0, 1, 1] = 0.5
    grad = backward(grad_sums, torch.zeros(1, 3, dtype=torch.float64), exact, labels, torch.zeros(2).double(), ones,
                    NONE, True, -100, MASK_NONE, False, False, 0.0)
    assert torch.equal(grad, torch.tensor([[[0.0, 0.0], [0.5, 0.5]]], dtype=torch.float64))


# ------------------------------------------------------------------------------------------- against the reference

# (kind, mask_mode, ignore_index): label maps with and without the label mask, ignore_index inside and outside
# [0, C); dense one-hot and soft targets with the channel mask (ignore_index a channel) and the sentinel mask.
TARGETS = [
    ("labels", MASK_NONE, -100),
    ("labels", MASK_LABEL, -100),
    ("labels", MASK_LABEL, 1),
    ("onehot", MASK_NONE, 0),
    ("onehot", MASK_CHANNEL, 0),
    ("onehot", MASK_SENTINEL, -1),
    ("soft", MASK_NONE, 0),
    ("soft", MASK_CHANNEL, 1),
    ("soft", MASK_SENTINEL, 5),
]
SHAPES = [(1, 1, 7), (3, 2, 33), (1, 5, 1000), (3, 3, 1), (1, 17, 33)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("with_ce", [False, True], ids=["dice", "dice_ce"])
@pytest.mark.parametrize("squared", [False, True], ids=["k1", "k2"])
@pytest.mark.parametrize("kind, mask_mode, ignore_index", TARGETS, ids=str)
@pytest.mark.parametrize("activation", [NONE, SOFTMAX, SIGMOID], ids=["none", "softmax", "sigmoid"])
def test_matches_reference(ops, activation, kind, mask_mode, ignore_index, squared, with_ce, dtype):
    for index, (batch, classes, pixels) in enumerate(SHAPES):
        if mask_mode == MASK_CHANNEL and ignore_index >= classes:
            continue
        gamma = ("zero", "scalar", "per_class")[index % 3]
        args = make_case(batch, classes, pixels, kind=kind, activation=activation, mask_mode=mask_mode,
                         ignore_index=ignore_index, squared=squared, gamma=gamma, with_ce=with_ce,
                         smoothing=0.1 if index % 2 else 0.0, dtype=dtype, seed=index)
        check_case(ops, args, f"shape {(batch, classes, pixels)}, gamma {gamma}")


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES, ids=str)
@pytest.mark.parametrize("ignore_index", [-100, 0, 2, 3, 255])
@pytest.mark.parametrize("mask_mode", [MASK_NONE, MASK_LABEL])
def test_label_dtypes_and_ignore_index(ops, label_dtype, ignore_index, mask_mode):
    # C = 3: ignore_index 0 and 2 are classes, 3 is just past them, -100 and 255 are sentinels (255 fits uint8 only).
    args = make_case(3, 3, 257, kind="labels", mask_mode=mask_mode, ignore_index=ignore_index, with_ce=True,
                     gamma="per_class", label_dtype=label_dtype, seed=ignore_index % 11)
    _, extras, _ = check_case(ops, args, f"{label_dtype}, ignore_index {ignore_index}")
    assert extras[:, 2].sum() > 0, "the case should hold invalid labels"


@pytest.mark.parametrize("gamma", ["zero", "scalar", "per_class"])
@pytest.mark.parametrize("kind", ["labels", "soft"])
@pytest.mark.parametrize("activation", [SOFTMAX, SIGMOID], ids=["softmax", "sigmoid"])
def test_gamma(ops, gamma, kind, activation):
    args = make_case(2, 5, 300, kind=kind, activation=activation, gamma=gamma, squared=True, seed=3)
    check_case(ops, args, f"gamma {gamma}")


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("kind, mask_mode, ignore_index", [("labels", MASK_LABEL, 0), ("soft", MASK_CHANNEL, 0)])
@pytest.mark.parametrize("activation", [NONE, SOFTMAX, SIGMOID], ids=["none", "softmax", "sigmoid"])
def test_cross_entropy_weights_and_smoothing(ops, smoothing, kind, mask_mode, ignore_index, activation):
    args = make_case(3, 4, 200, kind=kind, activation=activation, mask_mode=mask_mode, ignore_index=ignore_index,
                     with_ce=True, smoothing=smoothing, seed=7)
    sums, extras, _ = check_case(ops, args, f"smoothing {smoothing}")
    without_ce = forward_without_ce(ops, args)
    assert torch.equal(sums, without_ce[0]), "the cross entropy must not change the Dice sums"
    assert torch.equal(without_ce[1][:, :2], torch.zeros_like(extras[:, :2]))


def forward_without_ce(ops, args):
    return ops[0](*args[:9], False, args[10])


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("pixels", [1, 7, 33, 1000])
@pytest.mark.parametrize("classes", [1, 2, 3, 5, 17, 70])
def test_class_and_pixel_counts(ops, classes, pixels, batch):
    seed = classes * 1000 + pixels + batch
    kind, mask_mode, ignore_index = TARGETS[seed % len(TARGETS)]
    if mask_mode == MASK_CHANNEL:
        ignore_index = classes - 1
    args = make_case(batch, classes, pixels, kind=kind, activation=(NONE, SOFTMAX, SIGMOID)[seed % 3],
                     mask_mode=mask_mode, ignore_index=ignore_index, squared=bool(seed % 2), gamma="per_class",
                     with_ce=True, smoothing=0.05, seed=seed)
    check_case(ops, args, f"{kind}, mask {mask_mode}")


def test_several_chunks_per_image(ops):
    """Images longer than the CPU kernel's pixel chunk are summed from several partial rows."""
    for kind, mask_mode, ignore_index in [("labels", MASK_LABEL, 2), ("soft", MASK_SENTINEL, -1)]:
        args = make_case(2, 3, 2 * CPU_CHUNK + 77, kind=kind, mask_mode=mask_mode, ignore_index=ignore_index,
                         gamma="per_class", with_ce=True, dtype=torch.float64, seed=5)
        check_case(ops, args, kind)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind, mask_mode, ignore_index", [TARGETS[1], TARGETS[4], TARGETS[8]], ids=str)
@pytest.mark.parametrize("activation", [NONE, SOFTMAX, SIGMOID], ids=["none", "softmax", "sigmoid"])
def test_low_precision_logits(ops, dtype, kind, mask_mode, ignore_index, activation):
    args = make_case(2, 5, 333, kind=kind, activation=activation, mask_mode=mask_mode, ignore_index=ignore_index,
                     gamma="per_class", with_ce=True, smoothing=0.1, dtype=dtype, target_dtype=torch.float32,
                     seed=11)
    check_case(ops, args, f"{dtype} logits")


@pytest.mark.parametrize("target_dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_dense_target_dtypes(ops, target_dtype):
    """A dense target of any float dtype is read as it is, whatever the logits' dtype."""
    args = make_case(2, 4, 100, kind="soft", mask_mode=MASK_SENTINEL, gamma="scalar", with_ce=True,
                     dtype=torch.float32, target_dtype=target_dtype, seed=13)
    assert args[1].dtype == target_dtype
    check_case(ops, args, f"{target_dtype} target")


# ------------------------------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize("memory_format, shape", [(torch.channels_last, (2, 5, 7, 9)),
                                                  (torch.channels_last_3d, (2, 3, 5, 4, 3))], ids=["2d", "3d"])
@pytest.mark.parametrize("kind", ["labels", "soft"])
def test_channels_last_read_in_place(ops, memory_format, shape, kind):
    generator = torch.Generator().manual_seed(17)
    batch, classes = shape[:2]
    image = torch.randn(shape, generator=generator, dtype=torch.float64).contiguous(memory_format=memory_format)
    logits = image.flatten(2)
    assert logits.data_ptr() == image.data_ptr() and logits.stride(1) == 1, "flatten(2) must be a view"
    pixels = logits.shape[2]
    if kind == "labels":
        # A transposed label map: pixel stride B, batch stride 1.
        target = make_labels(pixels, batch, classes, torch.int64, -100, generator, invalid=False).t()
    else:
        dense = torch.rand(shape, generator=generator, dtype=torch.float64).contiguous(memory_format=memory_format)
        target = dense.flatten(2)
        assert target.data_ptr() == dense.data_ptr()
    args = (logits, target, make_gamma("per_class", classes, torch.float64), torch.ones(classes, dtype=torch.float64),
            SOFTMAX, kind == "labels", -100, MASK_NONE, True, True, 0.1)
    _, _, grad = check_case(ops, args, f"{memory_format}")
    assert grad.stride() == logits.stride(), "grad_logits must keep the logits' channels_last layout"
    contiguous_args = (logits.contiguous(), target.contiguous(), *args[2:])
    sums, extras = ops[0](*args)
    expected_sums, expected_extras = ops[0](*contiguous_args)
    torch.testing.assert_close(sums, expected_sums, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(extras, expected_extras, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda x: x[:, :, ::3], id="pixel-stride-3"),
        pytest.param(lambda x: x[::2], id="batch-stride-2"),
        pytest.param(lambda x: x.transpose(1, 2).contiguous().transpose(1, 2), id="classes-innermost"),
        pytest.param(lambda x: x[:, :, :1].expand(-1, -1, 40), id="pixel-stride-0"),
    ],
)
@pytest.mark.parametrize("kind", ["labels", "soft"])
def test_strided_views(ops, make, kind):
    generator = torch.Generator().manual_seed(19)
    logits = make(torch.randn((6, 4, 120), generator=generator, dtype=torch.float64))
    batch, classes, pixels = logits.shape
    if kind == "labels":
        target = make_labels(batch, 2 * pixels, classes, torch.int16, 1, generator)[:, ::2]
    else:
        target = make(torch.rand((6, 4, 120), generator=generator, dtype=torch.float64))
    args = (logits, target, make_gamma("scalar", classes, torch.float64), torch.ones(classes, dtype=torch.float64),
            SIGMOID, kind == "labels", 1, MASK_LABEL if kind == "labels" else MASK_CHANNEL, False, True, 0.0)
    check_case(ops, args, "strided")


# -------------------------------------------------------------------------------------- invalid labels, empty


def test_invalid_labels_counted_and_weightless(ops):
    forward, backward = ops
    generator = torch.Generator().manual_seed(23)
    logits = torch.randn((2, 3, 6), generator=generator, dtype=torch.float64)
    labels = torch.tensor([[0, 7, -3, 2, 2**40, 1], [1, 1, -100, 0, 2, -(2**40)]])
    gamma = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    weight = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    options = (SOFTMAX, True, -100, MASK_LABEL, True, True, 0.1)
    sums, extras = forward(logits, labels, gamma, weight, *options)
    assert extras[:, 2].tolist() == [3.0, 1.0]  # 7, -3, 2**40; -2**40 (-100 is ignored)
    # The same sums as for the valid pixels alone.
    valid = [[0, 3, 5], [0, 1, 3, 4]]
    for b, columns in enumerate(valid):
        alone_sums, alone_extras = forward(logits[b : b + 1, :, columns], labels[b : b + 1, columns], gamma, weight,
                                           *options)
        torch.testing.assert_close(sums[b], alone_sums[0], rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(extras[b, :2], alone_extras[0, :2], rtol=1e-14, atol=1e-14)
    # No gradient reaches an invalid pixel (w = 0, and it is left out of the cross entropy).
    grad_sums, grad_extras = upstream((logits,))
    grad = backward(grad_sums, grad_extras, logits, labels, gamma, weight, *options)
    assert torch.equal(grad[0, :, [1, 2, 4]], torch.zeros(3, 3, dtype=torch.float64))
    assert torch.equal(grad[1, :, 5], torch.zeros(3, dtype=torch.float64))
    check_case(ops, (logits, labels, gamma, weight, *options), "invalid labels")


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int8], ids=str)
def test_invalid_narrow_labels(ops, label_dtype):
    labels = torch.tensor([[0, 100, 1, 127]], dtype=label_dtype)  # 100 and 127 are not classes of C = 2
    logits = torch.randn(1, 2, 4, dtype=torch.float64)
    _, extras = ops[0](logits, labels, torch.zeros(2).double(), torch.ones(2).double(), SOFTMAX, True, -100,
                       MASK_LABEL, False, False, 0.0)
    assert extras[0, 2].item() == 2.0


@pytest.mark.parametrize("kind", ["labels", "soft"])
@pytest.mark.parametrize("shape", [(2, 3, 0), (0, 3, 5)], ids=str)
def test_empty(ops, kind, shape):
    batch, classes, pixels = shape
    logits = torch.empty(shape, dtype=torch.float32)
    target = torch.empty((batch, pixels), dtype=torch.int64) if kind == "labels" else torch.empty(shape)
    args = (logits, target, torch.ones(classes), torch.ones(classes), SOFTMAX, kind == "labels", -100,
            MASK_NONE, False, True, 0.0)
    sums, extras = ops[0](*args)
    assert torch.equal(sums, torch.zeros(batch, classes, 4)) and torch.equal(extras, torch.zeros(batch, 3))
    expected_sums, expected_extras = reference.dice_sums_fwd(*args)
    assert torch.equal(sums, expected_sums) and torch.equal(extras, expected_extras)
    grad = ops[1](torch.ones(batch, classes, 4), torch.ones(batch, 3), *args)
    assert grad.shape == shape and grad.dtype == torch.float32


# ------------------------------------------------------------------------------------------------ determinism


def test_deterministic_and_thread_count_independent(ops):
    forward, backward = ops
    args = make_case(2, 5, 3 * CPU_CHUNK + 77, kind="soft", mask_mode=MASK_SENTINEL, ignore_index=-1,
                     gamma="per_class", with_ce=True, smoothing=0.1, dtype=torch.float32, seed=29)
    grad_sums, grad_extras = upstream(args)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 1, 2):
            torch.set_num_threads(count)
            results.append((*forward(*args), backward(grad_sums, grad_extras, *args)))
    finally:
        torch.set_num_threads(threads)
    for result in results[1:]:
        for got, first in zip(result, results[0], strict=True):
            assert torch.equal(got, first), f"differs by {(got - first).abs().max().item()}"


# ---------------------------------------------------------------------------------------------- argument checks


def good_args(**changes):
    """A valid (logits, target, gamma, ce_weight, options...) tuple for B = 2, C = 3, S = 5, with changes."""
    arguments = dict(logits=torch.zeros(2, 3, 5), target=torch.zeros(2, 5, dtype=torch.int64), gamma=torch.zeros(3),
                     ce_weight=torch.ones(3), activation=SOFTMAX, target_is_labels=True, ignore_index=-100,
                     mask_mode=MASK_NONE, squared=False, with_ce=False, label_smoothing=0.0)
    arguments.update(changes)
    return tuple(arguments.values())


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"logits": torch.zeros(2, 3)}, r"logits must be 3-D \(B, C, S\), got shape \[2, 3\]"),
        ({"logits": torch.zeros(2, 3, 5, dtype=torch.int64)}, "logits must be float32, float64, bfloat16 or float16, "
         "got Long"),
        ({"logits": torch.zeros(2, 0, 5)}, r"logits must have at least one class \(C >= 1\), got shape \[2, 0, 5\]"),
        ({"target": torch.zeros(2, 4, dtype=torch.int64)}, r"target \(labels\) must have shape \(B, S\) = \[2, 5\], "
         r"got \[2, 4\]"),
        ({"target": torch.zeros(2, 5)}, r"target \(labels\) must be uint8, int8, int16, int32 or int64, got Float"),
        ({"target": torch.zeros(2, 5, dtype=torch.bool)}, r"target \(labels\) must be uint8, .* got Bool"),
        ({"target": torch.zeros(2, 3, 4), "target_is_labels": False}, r"target \(dense\) must have the logits' shape "
         r"\(B, C, S\) = \[2, 3, 5\], got \[2, 3, 4\]"),
        ({"target": torch.zeros(2, 3, 5, dtype=torch.int64), "target_is_labels": False},
         r"target \(dense\) must be float32, float64, bfloat16 or float16, got Long"),
        ({"gamma": torch.zeros(2)}, r"gamma must have shape \(C,\) = \[3\], got \[2\]"),
        ({"ce_weight": torch.ones(3, dtype=torch.int64)}, "ce_weight must be float32, float64, bfloat16 or float16, "
         "got Long"),
        ({"activation": 3}, r"activation must be 0 \(none\), 1 \(softmax\) or 2 \(sigmoid\), got 3"),
        ({"mask_mode": 4}, r"mask_mode must be 0 \(none\), 1 \(label\), 2 \(channel\) or 3 \(sentinel\), got 4"),
        ({"mask_mode": -1}, r"mask_mode must be 0 .* got -1"),
        ({"target": torch.zeros(2, 3, 5), "target_is_labels": False, "mask_mode": MASK_CHANNEL, "ignore_index": 3},
         r"ignore_index must be a channel in \[0, 3\) for mask_mode 2 \(channel\), got 3"),
    ],
)
def test_op_checks(ops, changes, match):
    forward, backward = ops
    args = good_args(**changes)
    with pytest.raises(RuntimeError, match="torch_medloss::dice_sums_fwd: " + match):
        forward(*args)
    with pytest.raises(RuntimeError, match="torch_medloss::dice_sums_bwd: " + match):
        backward(torch.zeros(2, 3, 4), torch.zeros(2, 3), *args)


@pytest.mark.parametrize(
    "grads, match",
    [
        ((torch.zeros(2, 3, 3), torch.zeros(2, 3)), r"grad_sums must have shape \(B, C, 4\) = \[2, 3, 4\], got "
         r"\[2, 3, 3\]"),
        ((torch.zeros(2, 3, 4), torch.zeros(3)), r"grad_extras must have shape \(B, 3\) = \[2, 3\], got \[3\]"),
        ((torch.zeros(2, 3, 4, dtype=torch.int64), torch.zeros(2, 3)), "grad_sums must be float32, .* got Long"),
    ],
)
def test_backward_checks(ops, grads, match):
    with pytest.raises(RuntimeError, match="torch_medloss::dice_sums_bwd: " + match):
        ops[1](*grads, *good_args())


# ------------------------------------------------------------------------------------------ hypothesis, opcheck


@st.composite
def cases(draw):
    batch = draw(st.integers(1, 3))
    classes = draw(st.integers(1, 9))
    pixels = draw(st.integers(0, 80))
    kind = draw(st.sampled_from(["labels", "onehot", "soft"]))
    if kind == "labels":
        mask_mode = draw(st.sampled_from([MASK_NONE, MASK_LABEL]))
        ignore_index = draw(st.sampled_from([-100, 0, classes - 1, classes, 255]))
    else:
        mask_mode = draw(st.sampled_from([MASK_NONE, MASK_CHANNEL, MASK_SENTINEL]))
        ignore_index = draw(st.integers(0, classes - 1)) if mask_mode == MASK_CHANNEL else -1
    return make_case(batch, classes, pixels, kind=kind, activation=draw(st.sampled_from([NONE, SOFTMAX, SIGMOID])),
                     mask_mode=mask_mode, ignore_index=ignore_index, squared=draw(st.booleans()),
                     gamma=draw(st.sampled_from(["zero", "scalar", "per_class"])), with_ce=draw(st.booleans()),
                     smoothing=draw(st.sampled_from([0.0, 0.05, 0.5])),
                     label_dtype=draw(st.sampled_from(LABEL_DTYPES)), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=30)
@given(args=cases())
def test_hypothesis_shapes_and_options(ops, args):
    check_case(ops, args, f"shape {tuple(args[0].shape)}, options {args[4:]}")


@pytest.mark.skipif(not HAS_OPS_MODULE, reason="torch_medloss.dice_sums (fake kernels, autograd) is missing")
def test_opcheck(ops):
    pytest.importorskip("torch_medloss.dice_sums")
    forward, backward = ops
    for args in [
        make_case(2, 3, 33, kind="labels", mask_mode=MASK_LABEL, ignore_index=1, with_ce=True, gamma="per_class"),
        make_case(1, 4, 20, kind="soft", activation=SIGMOID, mask_mode=MASK_CHANNEL, ignore_index=0,
                  dtype=torch.float32, squared=True),
        make_case(2, 2, 0, kind="onehot", mask_mode=MASK_SENTINEL, ignore_index=-1),
    ]:
        logits = args[0].transpose(1, 2).contiguous().transpose(1, 2)  # classes innermost, like channels_last
        for x in (args[0], logits):
            leaf = x.detach().requires_grad_(True)
            torch.library.opcheck(forward.default, (leaf, *args[1:]))
            grad_sums, grad_extras = upstream(args)
            torch.library.opcheck(backward.default, (grad_sums, grad_extras, x, *args[1:]))


@pytest.mark.skipif(not HAS_OPS_MODULE, reason="torch_medloss.dice_sums (fake kernels, autograd) is missing")
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("permuted", [False, True])
def test_gradcheck(ops, seed, permuted):
    pytest.importorskip("torch_medloss.dice_sums")
    # gamma = 0: the modulator has no gradient by contract, which finite differences would see.
    args = make_case(2, 3, 6, kind="labels", activation=SOFTMAX, mask_mode=MASK_LABEL, ignore_index=2, squared=True,
                     with_ce=True, smoothing=0.1, seed=seed)
    logits = args[0].transpose(1, 2).contiguous().transpose(1, 2) if permuted else args[0]
    leaf = logits.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ops[0](x, *args[1:]), (leaf,))


@pytest.mark.skipif(not HAS_OPS_MODULE, reason="torch_medloss.dice_sums (fake kernels, autograd) is missing")
def test_compile_fullgraph(ops):
    pytest.importorskip("torch_medloss.dice_sums")
    args = make_case(2, 3, 40, kind="labels", with_ce=True, dtype=torch.float32)

    def dice_ce(logits):
        sums, extras = ops[0](logits, *args[1:])
        dice = 1 - 2 * sums[..., 0] / (sums[..., 1] + sums[..., 2])
        return dice.mean() + extras[:, 0].sum() / extras[:, 1].sum()

    leaf = args[0].clone().requires_grad_(True)
    compiled = torch.compile(dice_ce, fullgraph=True, backend="aot_eager")
    value = compiled(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    expected_leaf = args[0].clone().requires_grad_(True)
    expected = dice_ce(expected_leaf)
    (expected_grad,) = torch.autograd.grad(expected, expected_leaf)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)

