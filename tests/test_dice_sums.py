"""The Dice-family op (torch_medloss.ops.dice_sums: ``dice_sums`` and ``dice_loss``) on every backend that runs here,
against its reference (torch_medloss.reference.dice_sums), from one set of case builders.

The ops are called as the losses call them: logits (B, C, S), a (B, S) label map or a (B, C, S) dense target, the
(3, C) per-class params and the codes/scalars lists of torch_medloss._contract. The losses themselves are compared
with the readable references (and MONAI) in test_dice_losses.py and test_monai_parity.py.
"""

from __future__ import annotations

import itertools
import math
import warnings

import backends
import pytest
import torch

from torch_medloss import _contract as K
from torch_medloss.ops import dice_sums as op

LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
# Relative tolerance per logits dtype (float32 sums in a different order; low precision is compared with the
# reference run on the same values upcast to float32: the kernels accumulate in float32).
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.fixture(params=backends.params())
def backend(request):
    backends.require(request.param)
    return request.param


# ---------------------------------------------------------------------------------------------------- case builders


def codes(activation=K.ACTIVATION_SOFTMAX, labels=True, ignore_index=0, mask_mode=K.MASK_NONE, squared=False,
          with_ce=False, head=K.HEAD_DICE, drop=False, batch=False, reduction=K.REDUCTION_MEAN, jaccard=False,
          soft=False, w_type=K.W_TYPE_SQUARE, has_weight=False, focal=K.FOCAL_NONE, alpha=K.ALPHA_NONE,
          focal_mask=False) -> list[int]:
    values = [0] * K.DICE_NUM_CODES
    values[K.DICE_CODE_ACTIVATION] = activation
    values[K.DICE_CODE_TARGET_IS_LABELS] = int(labels)
    values[K.DICE_CODE_IGNORE_INDEX] = ignore_index
    values[K.DICE_CODE_MASK_MODE] = mask_mode
    values[K.DICE_CODE_SQUARED] = int(squared)
    values[K.DICE_CODE_WITH_CE] = int(with_ce)
    values[K.DICE_CODE_HEAD] = head
    values[K.DICE_CODE_DROP_BACKGROUND] = int(drop)
    values[K.DICE_CODE_BATCH] = int(batch)
    values[K.DICE_CODE_REDUCTION] = reduction
    values[K.DICE_CODE_JACCARD] = int(jaccard)
    values[K.DICE_CODE_SOFT_INTERSECTION] = int(soft)
    values[K.DICE_CODE_W_TYPE] = w_type
    values[K.DICE_CODE_HAS_WEIGHT] = int(has_weight)
    values[K.DICE_CODE_FOCAL] = focal
    values[K.DICE_CODE_FOCAL_ALPHA] = alpha
    values[K.DICE_CODE_FOCAL_MASK] = int(focal_mask)
    return values


def scalars(label_smoothing=0.0, smooth_nr=1e-5, smooth_dr=1e-5, alpha=0.5, beta=0.5, lambda_dice=1.0,
            lambda_ce=1.0, focal_gamma=2.0, focal_alpha=0.25, lambda_focal=1.0) -> list[float]:
    values = [0.0] * K.DICE_NUM_SCALARS
    values[K.DICE_SCALAR_LABEL_SMOOTHING] = label_smoothing
    values[K.DICE_SCALAR_SMOOTH_NR] = smooth_nr
    values[K.DICE_SCALAR_SMOOTH_DR] = smooth_dr
    values[K.DICE_SCALAR_ALPHA] = alpha
    values[K.DICE_SCALAR_BETA] = beta
    values[K.DICE_SCALAR_LAMBDA_DICE] = lambda_dice
    values[K.DICE_SCALAR_LAMBDA_CE] = lambda_ce
    values[K.DICE_SCALAR_FOCAL_GAMMA] = focal_gamma
    values[K.DICE_SCALAR_FOCAL_ALPHA] = focal_alpha
    values[K.DICE_SCALAR_LAMBDA_FOCAL] = lambda_focal
    return values


def params(num_classes, gamma=0.0, weight=None, ce_weight=None, dtype=torch.float32, generator=None,
           focal_alpha=None, focal_weight=None):
    """(5, C): gamma (a scalar, a list, or "random" in [0, 3]), Dice class weights, cross-entropy class weights, focal
    alpha and focal class weights."""
    rows = torch.ones(K.DICE_PARAM_ROWS, num_classes, dtype=torch.float64)
    rows[K.DICE_PARAM_GAMMA] = 3 * torch.rand(num_classes, generator=generator, dtype=torch.float64) \
        if gamma == "random" else torch.as_tensor(gamma, dtype=torch.float64)
    if weight is not None:
        rows[K.DICE_PARAM_WEIGHT] = torch.as_tensor(weight, dtype=torch.float64)
    if ce_weight is not None:
        rows[K.DICE_PARAM_CE_WEIGHT] = torch.as_tensor(ce_weight, dtype=torch.float64)
    rows[K.DICE_PARAM_FOCAL_ALPHA] = 0.0 if focal_alpha is None else torch.as_tensor(focal_alpha, dtype=torch.float64)
    if focal_weight is not None:
        rows[K.DICE_PARAM_FOCAL_WEIGHT] = torch.as_tensor(focal_weight, dtype=torch.float64)
    return rows.to(dtype)


def make_labels(shape, num_classes, dtype, generator, ignore_index=None, invalid=False):
    """(B, S) labels in [0, C); about 20% ignore_index where the dtype holds it; a few invalid labels with
    ``invalid``."""
    labels = torch.randint(0, num_classes, shape, generator=generator)
    if ignore_index is not None and _holds(dtype, ignore_index):
        labels[torch.rand(shape, generator=generator) < 0.2] = ignore_index
    if invalid:
        labels.view(-1)[::7] = num_classes if _holds(dtype, num_classes) else -1
    return labels.to(dtype)


def _holds(dtype, value):
    info = torch.iinfo(dtype)
    return info.min <= value <= info.max


def make_dense(shape, kind, dtype, generator, ignore_index=None):
    """A (B, C, S) one-hot ("onehot", with all-zero pixels for a sentinel ignore_index) or soft ("soft") target."""
    num_classes = shape[1]
    if kind == "soft":
        return torch.softmax(2 * torch.randn(shape, generator=generator), 1).to(dtype)
    labels = torch.randint(0, num_classes, (shape[0], shape[2]), generator=generator)
    onehot = torch.nn.functional.one_hot(labels, num_classes).movedim(-1, 1).to(dtype)
    if ignore_index is not None and not 0 <= ignore_index < num_classes:
        onehot[:, :, ::5] = 0
    return onehot


def make_logits(shape, dtype, generator, device="cpu"):
    return (3 * torch.randn(shape, generator=generator)).to(dtype).to(device)


def to(device, *tensors):
    return [t.to(device) for t in tensors]


# ---------------------------------------------------------------------------------------------------- comparisons


def run_sums(backend, logits, target, prm, cds, scl, grads):
    """(sums, extras, d<grads, outputs>/d logits) of the dice_sums op on ``backend``."""
    leaf = logits.detach().clone().requires_grad_(True)
    sums, extras = op.dice_sums(backend, leaf, target, prm, cds, scl)
    (grad,) = torch.autograd.grad((sums * grads[0]).sum() + (extras * grads[1]).sum(), leaf, allow_unused=True)
    return sums.detach(), extras.detach(), (torch.zeros_like(leaf) if grad is None else grad)


def run_loss(backend, logits, target, prm, cds, scl, upstream=None):
    """(loss, d<upstream, loss>/d logits) of the dice_loss op on ``backend``."""
    leaf = logits.detach().clone().requires_grad_(True)
    loss = op.dice_loss(backend, leaf, target, prm, cds, scl)
    upstream = torch.ones_like(loss) if upstream is None else upstream.to(loss)
    (grad,) = torch.autograd.grad((loss * upstream).sum(), leaf, allow_unused=True)
    return loss.detach(), (torch.zeros_like(leaf) if grad is None else grad)


def expected(logits, *args, fn="sums", **kwargs):
    """The reference on the same values, upcast to float32 for half logits (the kernels accumulate in float32)."""
    wide = logits.detach().cpu()
    if wide.dtype in (torch.bfloat16, torch.float16):
        wide = wide.float()
    args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    kwargs = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    return (run_sums if fn == "sums" else run_loss)("reference", wide, *args, **kwargs)


def assert_close(got, want, dtype, what=""):
    rtol = RTOL[dtype]
    for g, w in zip(got, want, strict=True):
        g = g.detach().cpu().to(w.dtype)
        scale = max(w.abs().max().item() if w.numel() else 0.0, 1.0)
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * scale, equal_nan=True, msg=lambda m: f"{what}: {m}")


def check_sums(backend, logits, target, prm, cds, scl, generator):
    device = backends.device(backend)
    if logits.dtype == torch.float64 and backend in ("triton", "cuda"):
        pytest.skip("float64 logits are fused on the CPU only")
    batch, num_classes, _ = logits.shape
    grads = (torch.randn(batch, num_classes, K.DICE_NUM_SUMS, generator=generator, dtype=torch.float64),
             torch.randn(batch, K.DICE_NUM_EXTRAS, generator=generator, dtype=torch.float64))
    got = run_sums(backend, *to(device, logits, target, prm), cds, scl, to(device, *grads))
    want = expected(logits, target, prm, cds, scl, grads)
    assert_close(got, want, logits.dtype, f"{backend} sums {cds} {scl}")


def check_loss(backend, logits, target, prm, cds, scl, generator):
    device = backends.device(backend)
    if logits.dtype == torch.float64 and backend in ("triton", "cuda"):
        pytest.skip("float64 logits are fused on the CPU only")
    shape = K.dice_loss_shape(logits.shape[0], logits.shape[1], cds, logits.shape[2])
    upstream = torch.rand(shape, generator=generator, dtype=torch.float64)
    got = run_loss(backend, *to(device, logits, target, prm), cds, scl, upstream.to(device))
    want = expected(logits, target, prm, cds, scl, fn="loss", upstream=upstream)
    assert got[0].shape == want[0].shape
    assert_close(got, want, logits.dtype, f"{backend} loss {cds} {scl}")


# ------------------------------------------------------------------------------------------------------ the sums


@pytest.mark.parametrize("activation, kind, mask_mode, squared, with_ce", [
    (activation, kind, mask_mode, squared, with_ce)
    for activation, kind, mask_mode, squared, with_ce in itertools.product(
        (K.ACTIVATION_NONE, K.ACTIVATION_SOFTMAX, K.ACTIVATION_SIGMOID), ("labels", "onehot", "soft"),
        (K.MASK_NONE, K.MASK_LABEL, K.MASK_CHANNEL, K.MASK_SENTINEL), (False, True), (False, True))
    if (mask_mode in (K.MASK_NONE, K.MASK_LABEL)) == (kind == "labels") or mask_mode == K.MASK_NONE
], ids=str)
def test_sums_match_reference(backend, activation, kind, mask_mode, squared, with_ce):
    generator = torch.Generator().manual_seed(activation * 100 + mask_mode * 10 + squared + 2 * with_ce)
    shape, ignore_index = (2, 5, 37), {K.MASK_LABEL: 3, K.MASK_CHANNEL: 1, K.MASK_SENTINEL: -100}.get(mask_mode, 0)
    dtype = torch.float64 if backend in ("reference", "cpp") else torch.float32
    logits = make_logits(shape, dtype, generator)
    if kind == "labels":
        target = make_labels((2, 37), 5, torch.int64, generator, ignore_index if mask_mode else None)
    else:
        target = make_dense(shape, kind, dtype, generator, ignore_index if mask_mode else None)
    prm = params(5, gamma="random", ce_weight=[0.5, 1.0, 2.0, 1.5, 0.25], dtype=dtype, generator=generator)
    check_sums(backend, logits, target, prm, codes(activation, kind == "labels", ignore_index, mask_mode, squared,
                                                    with_ce), scalars(label_smoothing=0.1 * with_ce), generator)


def test_hand_computed_sums(backend):
    """Two pixels, two classes, no activation, gamma 0: the sums by hand."""
    device = backends.device(backend)
    logits = torch.tensor([[[0.25, 0.5], [0.75, 0.5]]], device=device)  # p (B=1, C=2, S=2)
    labels = torch.tensor([[1, 0]], device=device)  # y = [[0, 1], [1, 0]]
    sums, extras = op.dice_sums(backend, logits, labels, params(2).to(device),
                                codes(K.ACTIVATION_NONE, squared=True), scalars())
    # I = sum p y: class 0: 0.5, class 1: 0.75. P = sum p^2: 0.3125, 0.8125. G = sum y^2: 1, 1.
    # D = sum |p - y|: class 0: 0.25 + 0.5 = 0.75; class 1: 0.25 + 0.5 = 0.75. No focal term: F = 0. Two valid pixels.
    want = torch.tensor([[[0.5, 0.3125, 1.0, 0.75, 0.0], [0.75, 0.8125, 1.0, 0.75, 0.0]]])
    torch.testing.assert_close(sums.cpu(), want)
    torch.testing.assert_close(extras.cpu(), torch.tensor([[0.0, 0.0, 0.0, 2.0]]))


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES, ids=str)
@pytest.mark.parametrize("ignore_index", [-100, -1, 0, 3, 255, 40000], ids=str)
def test_label_dtypes_ignore_index_and_invalid_labels(backend, label_dtype, ignore_index):
    """Labels are read at their own dtype and compared as integers (a uint8 map never matches -100); out-of-range
    labels are counted in extras and weigh nothing."""
    generator = torch.Generator().manual_seed(ignore_index % 97)
    logits = make_logits((2, 4, 41), torch.float32, generator)
    labels = make_labels((2, 41), 4, label_dtype, generator, ignore_index, invalid=True)
    prm = params(4, gamma=2.0)
    check_sums(backend, logits, labels, prm, codes(ignore_index=ignore_index, mask_mode=K.MASK_LABEL, with_ce=True),
               scalars(), generator)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["labels", "soft"])
def test_low_precision_logits(backend, dtype, kind):
    generator = torch.Generator().manual_seed(7)
    logits = make_logits((2, 3, 53), dtype, generator)
    target = make_labels((2, 53), 3, torch.uint8, generator) if kind == "labels" else \
        make_dense((2, 3, 53), "soft", torch.float32, generator)
    check_sums(backend, logits, target, params(3, gamma=2.0), codes(labels=kind == "labels", with_ce=True),
               scalars(label_smoothing=0.05), generator)


@pytest.mark.parametrize("num_classes", [1, 2, 3, 7, 16, 33])
def test_class_counts(backend, num_classes):
    generator = torch.Generator().manual_seed(num_classes)
    logits = make_logits((3, num_classes, 29), torch.float32, generator)
    labels = make_labels((3, 29), num_classes, torch.int32, generator)
    check_sums(backend, logits, labels, params(num_classes, gamma="random", generator=generator),
               codes(with_ce=num_classes > 1), scalars(), generator)


def test_many_programs_per_image(backend):
    """Enough pixels that every backend splits an image over several partial rows (CPU chunks of 8192 pixels,
    Triton programs of 512) and adds them in its fixed order."""
    generator = torch.Generator().manual_seed(3)
    logits = make_logits((1, 4, 20011), torch.float32, generator)
    labels = make_labels((1, 20011), 4, torch.int64, generator, ignore_index=2)
    check_sums(backend, logits, labels, params(4, gamma=2.0), codes(mask_mode=K.MASK_LABEL, ignore_index=2,
                                                                    with_ce=True), scalars(), generator)


@pytest.mark.parametrize("layout", ["channels_last", "strided", "transposed_target"])
def test_strided_layouts_are_read_in_place(backend, layout):
    generator = torch.Generator().manual_seed(11)
    base = make_logits((2, 4, 6, 7), torch.float32, generator)
    if layout == "channels_last":
        logits = base.contiguous(memory_format=torch.channels_last).flatten(2)  # class stride 1
        target = make_dense((2, 4, 42), "soft", torch.float32, generator)
        labels = False
    elif layout == "strided":
        logits = make_logits((2, 8, 84), torch.float32, generator)[:, ::2, ::2]
        target = make_labels((2, 84), 4, torch.int64, generator)[:, ::2]
        labels = True
    else:
        logits = base.flatten(2)
        target = make_dense((2, 42, 4), "onehot", torch.float32, generator).transpose(1, 2)
        labels = False
    check_sums(backend, logits, target, params(4, gamma=1.5), codes(labels=labels, with_ce=True), scalars(),
               generator)


# ------------------------------------------------------------------------------------------------------ the loss

LOSS_GRID = [
    dict(head=head, reduction=reduction, batch=batch, drop=drop)
    for head, reduction, batch, drop in itertools.product(
        (K.HEAD_DICE, K.HEAD_GENERALIZED, K.HEAD_TVERSKY),
        (K.REDUCTION_MEAN, K.REDUCTION_SUM, K.REDUCTION_NONE), (False, True), (False, True))
]


@pytest.mark.parametrize("head_codes", LOSS_GRID, ids=str)
def test_loss_heads_match_reference(backend, head_codes):
    generator = torch.Generator().manual_seed(sum(head_codes.values()) + 10 * head_codes["head"])
    dtype = torch.float64 if backend in ("reference", "cpp") else torch.float32
    logits = make_logits((3, 4, 23), dtype, generator)
    labels = make_labels((3, 23), 4, torch.int16, generator)
    prm = params(4, dtype=dtype)
    check_loss(backend, logits, labels, prm, codes(**head_codes), scalars(alpha=0.3, beta=0.7), generator)


@pytest.mark.parametrize("variant", [
    dict(jaccard=True), dict(soft=True), dict(squared=True), dict(has_weight=True), dict(gamma=2.0),
    dict(gamma="random", drop=True, batch=True), dict(head=K.HEAD_TVERSKY, soft=True),
    dict(head=K.HEAD_GENERALIZED, soft=True), dict(head=K.HEAD_GENERALIZED, w_type=K.W_TYPE_SIMPLE),
    dict(head=K.HEAD_GENERALIZED, w_type=K.W_TYPE_UNIFORM, batch=True), dict(with_ce=True),
    dict(with_ce=True, reduction=K.REDUCTION_SUM, batch=True, drop=True, has_weight=True),
    dict(with_ce=True, label_smoothing=0.2, lambda_dice=0.5, lambda_ce=2.0),
    dict(head=K.HEAD_NONE, focal=K.FOCAL_SIGMOID), dict(head=K.HEAD_NONE, focal=K.FOCAL_SOFTMAX, drop=True),
    dict(head=K.HEAD_NONE, focal=K.FOCAL_SIGMOID, reduction=K.REDUCTION_SUM, alpha=K.ALPHA_SCALAR),
    dict(head=K.HEAD_NONE, focal=K.FOCAL_SOFTMAX, reduction=K.REDUCTION_NONE, alpha=K.ALPHA_PER_CLASS),
    dict(head=K.HEAD_NONE, focal=K.FOCAL_SIGMOID, reduction=K.REDUCTION_NONE, focal_gamma=0.5, drop=True),
    dict(head=K.HEAD_NONE, focal=K.FOCAL_SOFTMAX, focal_mask=True, mask_mode=K.MASK_LABEL, ignore_index=1),
    dict(head=K.HEAD_NONE, focal=K.FOCAL_SIGMOID, soft=True, focal_gamma=1.0),
    dict(focal=K.FOCAL_SIGMOID, alpha=K.ALPHA_SCALAR, has_weight=True, lambda_focal=0.5),
    dict(head=K.HEAD_GENERALIZED, focal=K.FOCAL_SIGMOID, batch=True, reduction=K.REDUCTION_SUM),
    dict(focal=K.FOCAL_SIGMOID, with_ce=True, batch=True, drop=True),
], ids=str)
def test_loss_options_match_reference(backend, variant):
    variant = dict(variant)
    generator = torch.Generator().manual_seed(len(str(variant)))
    dtype = torch.float64 if backend in ("reference", "cpp") else torch.float32
    gamma = variant.pop("gamma", 0.0)
    scalar_options = {k: variant.pop(k) for k in ("label_smoothing", "lambda_dice", "lambda_ce", "focal_gamma",
                                                  "lambda_focal") if k in variant}
    logits = make_logits((2, 5, 31), dtype, generator)
    target = make_dense((2, 5, 31), "soft", dtype, generator) if variant.get("soft") else \
        make_labels((2, 31), 5, torch.int64, generator)
    prm = params(5, gamma=gamma, weight=[0.2, 0.5, 1.0, 2.0, 4.0], ce_weight=[1.0, 2.0, 0.5, 1.0, 3.0], dtype=dtype,
                 generator=generator, focal_alpha=[0.1, 0.3, 0.5, 0.7, 0.9], focal_weight=[1.0, 0.5, 2.0, 1.5, 3.0])
    check_loss(backend, logits, target, prm, codes(labels=not variant.get("soft"), **variant),
               scalars(**scalar_options), generator)


def test_absent_classes_generalized_dice(backend):
    """A class absent from an image takes the largest finite weight of the image (MONAI's rule)."""
    generator = torch.Generator().manual_seed(5)
    logits = make_logits((2, 4, 19), torch.float32, generator)
    labels = make_labels((2, 19), 2, torch.int64, generator)  # classes 2 and 3 absent
    check_loss(backend, logits, labels, params(4), codes(head=K.HEAD_GENERALIZED), scalars(), generator)


def test_bad_label_makes_the_loss_nan_and_keeps_the_gradient(backend):
    generator = torch.Generator().manual_seed(2)
    logits = make_logits((2, 3, 17), torch.float32, generator)
    labels = make_labels((2, 17), 3, torch.int64, generator, invalid=True)
    device = backends.device(backend)
    for reduction in (K.REDUCTION_MEAN, K.REDUCTION_NONE):
        cds = codes(with_ce=reduction == K.REDUCTION_MEAN, reduction=reduction)
        loss, grad = run_loss(backend, *to(device, logits, labels, params(3)), cds, scalars())
        assert torch.isnan(loss).all()
        assert torch.isfinite(grad).all()
        want = expected(logits, labels, params(3), cds, scalars(), fn="loss")
        assert_close((grad,), (want[1],), torch.float32, f"{backend} gradient with bad labels")


def test_negative_infinite_logit_keeps_the_cross_entropy_finite(backend):
    """A masked class (logit -inf) that is not the label: torch's cross entropy never reads it (issue 13 item 2)."""
    generator = torch.Generator().manual_seed(4)
    logits = make_logits((1, 3, 16), torch.float32, generator)
    logits[:, 2] = -math.inf
    labels = make_labels((1, 16), 2, torch.int64, generator)
    cds = codes(with_ce=True)
    got = run_loss(backend, *to(backends.device(backend), logits, labels, params(3)), cds, scalars())
    assert all(torch.isfinite(t).all() for t in got)
    assert_close(got, expected(logits, labels, params(3), cds, scalars(), fn="loss"), torch.float32)
    dense = make_dense((1, 3, 16), "onehot", torch.float32, generator)
    dense[:, 2] = 0
    got = run_loss(backend, *to(backends.device(backend), logits, dense, params(3)), codes(labels=False, with_ce=True),
                   scalars())
    assert all(torch.isfinite(t).all() for t in got)


@pytest.mark.parametrize("shape", [(0, 3, 10), (2, 3, 0)], ids=str)
def test_empty(backend, shape):
    device = backends.device(backend)
    logits = torch.randn(shape, device=device)
    labels = torch.zeros(shape[0], shape[2], dtype=torch.int64, device=device)
    for cds in (codes(), codes(reduction=K.REDUCTION_NONE), codes(batch=True)):
        loss, grad = run_loss(backend, logits, labels, params(3).to(device), cds, scalars())
        want, _ = expected(logits, labels, params(3), cds, scalars(), fn="loss")
        assert loss.shape == want.shape and grad.shape == logits.shape
        torch.testing.assert_close(loss.cpu(), want.to(loss.dtype), equal_nan=True)


def test_bitwise_deterministic(backend):
    generator = torch.Generator().manual_seed(9)
    device = backends.device(backend)
    logits, labels = to(device, make_logits((2, 4, 9000), torch.float32, generator),
                        make_labels((2, 9000), 4, torch.uint8, generator))
    cds = codes(with_ce=True, batch=True)
    first = run_loss(backend, logits, labels, params(4, gamma=2.0).to(device), cds, scalars())
    for _ in range(2):
        again = run_loss(backend, logits, labels, params(4, gamma=2.0).to(device), cds, scalars())
        assert all(torch.equal(a, b) for a, b in zip(again, first, strict=True))


# (C, logits dtype, target kind): the class counts of every register bucket of the CUDA kernels (forward 4, 8, 16,
# then groups of 16; backward 4, 8, then streamed), with every per-class term on.
BUCKET_CASES = [(1, torch.float32, "labels"), (3, torch.bfloat16, "soft"), (8, torch.float16, "onehot"),
                (13, torch.float32, "labels"), (17, torch.bfloat16, "soft"), (40, torch.float32, "onehot")]


@pytest.mark.parametrize("num_classes, dtype, kind", BUCKET_CASES, ids=str)
def test_class_buckets_with_every_term(backend, num_classes, dtype, kind):
    """PM Dice's modulator, the cross entropy and the focal term at every class count the kernels specialise on;
    on CUDA over two steps of 4096 pixels (two forward chunks, two backward blocks per image)."""
    generator = torch.Generator().manual_seed(num_classes)
    pixels = 4096 + 33 if backend == "cuda" else 67
    shape = (2, num_classes, pixels)
    logits = make_logits(shape, dtype, generator)
    mask_mode, ignore_index = {"labels": (K.MASK_LABEL, 1), "soft": (K.MASK_CHANNEL, 0),
                               "onehot": (K.MASK_SENTINEL, -100)}[kind]
    target = make_labels((2, pixels), num_classes, torch.uint8, generator, ignore_index) if kind == "labels" else \
        make_dense(shape, kind, torch.float32, generator, ignore_index)
    prm = params(num_classes, gamma="random", generator=generator,
                 ce_weight=0.5 + torch.rand(num_classes, generator=generator, dtype=torch.float64),
                 focal_alpha=torch.rand(num_classes, generator=generator, dtype=torch.float64))
    several = num_classes > 2
    for cds in (codes(labels=kind == "labels", ignore_index=ignore_index, mask_mode=mask_mode, squared=several,
                      with_ce=several, focal=K.FOCAL_SOFTMAX if several else K.FOCAL_SIGMOID,
                      alpha=K.ALPHA_PER_CLASS, drop=several, focal_mask=True),
                codes(labels=kind == "labels", ignore_index=ignore_index, mask_mode=mask_mode,
                      activation=K.ACTIVATION_SIGMOID, head=K.HEAD_NONE, focal=K.FOCAL_SIGMOID,
                      alpha=K.ALPHA_SCALAR, reduction=K.REDUCTION_NONE)):
        check_loss(backend, logits, target, prm, cds, scalars(label_smoothing=0.1, focal_gamma=1.5), generator)
    check_sums(backend, logits, target, prm, cds, scalars(focal_gamma=1.5), generator)


def test_gradient_keeps_the_logits_layout(backend):
    """The fused backward writes the gradient in the logits' layout (empty_like), channels_last included."""
    if backend == "reference":
        pytest.skip("the reference's layout is autograd's")
    generator = torch.Generator().manual_seed(21)
    device = backends.device(backend)
    image = make_logits((2, 3, 13, 17), torch.float32, generator).to(device)
    logits = image.contiguous(memory_format=torch.channels_last).flatten(2)
    assert logits.stride(1) == 1
    labels = make_labels((2, 13 * 17), 3, torch.int64, generator).to(device)
    _, grad = run_loss(backend, logits, labels, params(3, gamma=2.0).to(device), codes(with_ce=True), scalars())
    assert grad.stride() == logits.stride()
    _, flat = run_loss(backend, logits.contiguous(), labels, params(3, gamma=2.0).to(device), codes(with_ce=True),
                       scalars())
    torch.testing.assert_close(grad, flat)


def test_gpu_backends_reject_float64(backend):
    if backend not in ("triton", "cuda"):
        pytest.skip("float64 logits run on the CPU backends")
    device = backends.device(backend)
    logits = torch.randn(1, 3, 10, dtype=torch.float64, device=device)
    labels = torch.zeros(1, 10, dtype=torch.int64, device=device)
    with pytest.raises((ValueError, RuntimeError), match="float32, bfloat16 or float16"):
        _op("dice_loss_fwd", backend)(logits, labels, params(3).to(device), codes(), scalars())


def _cuda_kernels(fn) -> list[str]:
    """The names of the CUDA kernels ``fn`` launches, with host syncs turned into errors."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.set_sync_debug_mode(previous)
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return [event.name for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("variant", [dict(with_ce=True), dict(focal=K.FOCAL_SOFTMAX, batch=True, drop=True),
                                     dict(head=K.HEAD_NONE, focal=K.FOCAL_SIGMOID, reduction=K.REDUCTION_NONE)],
                         ids=str)
def test_cuda_three_launches_without_sync(backend, variant):
    """Issue 12 on the CUDA C++ kernels: forward and backward in 3 launches (partials, finalize, backward), no host
    sync, no other op but autograd's upstream gradient (test_host_cost.py counts the Triton ones)."""
    if backend != "cuda":
        pytest.skip("counts the CUDA C++ kernels' launches")
    generator = torch.Generator().manual_seed(2)
    logits = make_logits((2, 4, 5000), torch.float32, generator).cuda().requires_grad_(True)
    labels = make_labels((2, 5000), 4, torch.uint8, generator).cuda()
    prm = params(4, gamma=2.0).cuda()

    def step():
        loss = op.dice_loss(backend, logits, labels, prm, codes(**variant), scalars())
        torch.autograd.grad(loss, logits, torch.ones_like(loss))

    step()  # warm-up: the first call builds or loads the extension
    names = _cuda_kernels(step)
    ours = [name for name in names if "dice_" in name]
    assert len(ours) == 3 and len(names) <= len(ours) + 2, names


# ------------------------------------------------------------------------------------------------- op machinery


def _op(name: str, backend: str):
    suffix = "_triton" if backend == "triton" else ""
    if backend == "triton":
        op._triton_ops()
    return getattr(torch.ops.torch_medloss, f"{name}{suffix}").default


@pytest.mark.parametrize("with_labels", [True, False])
def test_opcheck(backend, with_labels):
    if backend == "reference":
        pytest.skip("the reference is plain PyTorch, not an op")
    device = backends.device(backend)
    generator = torch.Generator().manual_seed(0)
    logits = make_logits((2, 3, 11), torch.float32, generator).to(device)
    target = make_labels((2, 11), 3, torch.int64, generator) if with_labels else \
        make_dense((2, 3, 11), "soft", torch.float32, generator)
    target, prm = to(device, target, params(3, gamma=2.0))
    # The interpreter cannot run a kernel on fake tensors: there, check the schema and the autograd registration.
    utils = ("test_schema", "test_autograd_registration") if backend == "triton" and device.type == "cpu" else None
    for cds in (codes(labels=with_labels, with_ce=True), codes(labels=with_labels, reduction=K.REDUCTION_NONE)):
        args = (logits, target, prm, cds, scalars())
        checks = {} if utils is None else {"test_utils": utils}
        torch.library.opcheck(_op("dice_sums_fwd", backend), args, **checks)
        torch.library.opcheck(_op("dice_loss_fwd", backend), args, **checks)
        sums, extras = _op("dice_sums_fwd", backend)(*args)
        torch.library.opcheck(_op("dice_sums_bwd", backend), (torch.randn_like(sums), torch.randn_like(extras), *args),
                              **checks)
        loss, coefficients = _op("dice_loss_fwd", backend)(*args)
        torch.library.opcheck(_op("dice_loss_bwd", backend), (torch.randn_like(loss), coefficients, *args), **checks)


def test_gradcheck_float64(backend):
    if backend in ("triton", "cuda"):
        pytest.skip("float64 logits are fused on the CPU only")
    generator = torch.Generator().manual_seed(1)
    logits = make_logits((2, 3, 7), torch.float64, generator).requires_grad_(True)
    labels = make_labels((2, 7), 3, torch.int64, generator)
    for cds in (codes(with_ce=True, batch=True), codes(head=K.HEAD_TVERSKY, reduction=K.REDUCTION_NONE, drop=True),
                codes(head=K.HEAD_GENERALIZED, squared=False), codes(jaccard=True, squared=True)):
        # gamma 0: PM Dice's modulator is a stop-gradient weight, which finite differences would see through.
        prm = params(3, dtype=torch.float64)
        assert torch.autograd.gradcheck(lambda x, c=cds, p=prm: op.dice_loss(backend, x, labels, p, c, scalars()),
                                        (logits,))


def test_double_backward_is_refused(backend):
    if backend == "reference":
        pytest.skip("the reference supports higher-order gradients")
    device = backends.device(backend)
    logits = torch.randn(1, 2, 5, device=device, requires_grad=True)
    labels = torch.randint(0, 2, (1, 5), device=device)
    loss = op.dice_loss(backend, logits, labels, params(2).to(device), codes(), scalars())
    (grad,) = torch.autograd.grad(loss, logits, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        grad.sum().backward()


@pytest.mark.parametrize("change, match", [
    (lambda a: {**a, "logits": a["logits"][0]}, "logits must be"),
    (lambda a: {**a, "target": a["target"][:, :-1]}, "target must"),
    (lambda a: {**a, "params": a["params"][:, :-1]}, "params must"),
    (lambda a: {**a, "codes": a["codes"][:-1]}, "codes must have"),
], ids=["logits", "target", "params", "codes"])
def test_op_checks_name_the_argument(backend, change, match):
    if backend == "reference":
        pytest.skip("the reference is plain PyTorch, not an op")
    device = backends.device(backend)
    args = {"logits": torch.randn(2, 3, 5, device=device), "target": torch.zeros(2, 5, dtype=torch.int64,
                                                                                   device=device),
            "params": params(3).to(device), "codes": codes(), "scalars": scalars()}
    args = change(args)
    with pytest.raises((ValueError, RuntimeError), match=match):
        _op("dice_loss_fwd", backend)(args["logits"], args["target"], args["params"], args["codes"], args["scalars"])


def test_compile_fullgraph(backend):
    if backend == "triton" and not backends.HAS_CUDA:
        pytest.skip("inductor compiles Triton kernels for GPUs only")
    device = backends.device(backend)
    generator = torch.Generator().manual_seed(0)
    logits, labels = to(device, make_logits((2, 3, 13), torch.float32, generator),
                        make_labels((2, 13), 3, torch.int64, generator))
    prm = params(3, gamma=2.0).to(device)

    def loss(x):
        return op.dice_loss(backend, x, labels, prm, codes(with_ce=True), scalars())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(torch.compile(loss, fullgraph=True)(logits), loss(logits))


def _has_nvidia_backend() -> bool:
    if not backends.HAS_TRITON:
        return False
    import triton.backends

    return "nvidia" in triton.backends.backends


@pytest.mark.skipif(not _has_nvidia_backend(), reason="triton has no NVIDIA backend")
def test_triton_kernels_compile_for_sm90_without_spills():
    """Compile the three kernels ahead of time for an H100 (sm_90a) with the launch heuristic's sizes; no GPU
    needed. The interpreter is lax about types; the compiler is not (loop-carried values, branch results, pointer
    dtypes). ptxas -v then must report no register spills for C <= 16, the sizes the heuristic is tuned for."""
    from helpers import run_script

    run_script("", """
        kernel = load_kernel("dice_sums")
        FLAGS = ("ACTIVATION", "TARGET_IS_LABELS", "MASK_MODE", "SQUARED", "WITH_CE", "INT64_OFFSETS")
        FLOATS = ("label_smoothing", "smooth_nr", "smooth_dr", "alpha", "beta", "lambda_dice", "lambda_ce",
                  "lambda_focal", "focal_gamma", "focal_alpha")

        def compile_and_count(fn, pointer_types, constants, num_classes, what):
            constants = {k: v for k, v in constants.items() if k in fn.arg_names}
            # The usual specialisation of a contiguous (B, C, S) layout: unit pixel strides become constants.
            constants.update({name: 1 for name in fn.arg_names if name in (
                "stride_logits_s", "stride_target_s", "stride_grad_logits_s", "stride_coef_c")})
            registers, spills = ptxas_report(fn, pointer_types, constants, 4, float_args=FLOATS)
            if num_classes <= 16 and spills:
                FAILURES.append(f"{fn.__name__} C={num_classes} {what}: {registers} registers, spills {spills}")
            print(fn.__name__, num_classes, what, registers, spills)

        # (C, logits dtype, target pointer type, flags): the H100 workloads' option sets and some corners.
        for num_classes, logits_type, target_type, flags in [
            (4, "*fp32", "*i64", (1, True, 1, True, True, False)),
            (4, "*bf16", "*u8", (1, True, 1, False, False, False)),
            (14, "*fp32", "*i64", (1, True, 1, True, True, False)),
            (14, "*fp16", "*fp32", (2, False, 3, False, True, True)),
            (128, "*fp32", "*i8", (0, True, 0, True, True, True)),
        ]:
            block_c, block_s, _, _ = kernel._launch_sizes(2, num_classes, 128**3)
            for focal in (0, 1, 2) if num_classes == 4 else (0,):
                constants = dict(zip(FLAGS, flags), BLOCK_C=block_c, BLOCK_S=block_s, SCALED=True, DROP=1,
                                 FOCAL=focal, ALPHA=focal, FOCAL_MAP=focal == 2)
                types = {"logits_ptr": logits_type, "target_ptr": target_type, "grad_logits_ptr": logits_type}
                compile_and_count(kernel._dice_partials_kernel, types, constants, num_classes, (*flags, focal))
                compile_and_count(kernel._dice_bwd_kernel, types, constants, num_classes, (*flags, focal))
        for head, batch, reduction, with_ce in [(0, True, 0, True), (1, False, 2, False), (2, False, 0, False),
                                                (0, False, 2, False)]:
            for num_classes in (4, 128):
                constants = dict(SUMS_ONLY=False, HEAD=head, DROP=1, BATCH=batch, REDUCTION=reduction, JACCARD=True,
                                 SOFT=True, W_TYPE=0, HAS_WEIGHT=True, WITH_CE=with_ce, FOCAL=1, FOCAL_MASK=True,
                                 BLOCK_C=num_classes, BLOCK_P=max(1, 256 // num_classes))
                compile_and_count(kernel._dice_finalize_kernel, {}, constants, num_classes, (head, batch, reduction))
        compile_and_count(kernel._dice_finalize_kernel, {}, dict(
            SUMS_ONLY=True, HEAD=0, DROP=0, BATCH=False, REDUCTION=0, JACCARD=False, SOFT=False, W_TYPE=0,
            HAS_WEIGHT=False, WITH_CE=True, FOCAL=0, FOCAL_MASK=False, BLOCK_C=4, BLOCK_P=64), 4, "sums only")
        """,
        interpret=False,
    )


# ------------------------------------------------------------------------------------------- the C++ CPU kernels
# What only the C++ kernels have: the focal term's own entry points (checked here on every form, alpha mode, target
# kind and gamma case), the pixel chunks of their tasks, the thread count, and the instruction set picked at run
# time. (Their values on everything else are checked with every backend's above.)

CPP_CHUNK = 8192  # csrc/cpu/dice_sums_kernel.cpp's kChunkPixels: longer images are summed from several rows
CPP = pytest.mark.parametrize("backend", ["cpp"], indirect=True)

FOCAL_CASES = [
    dict(focal=K.FOCAL_SIGMOID), dict(focal=K.FOCAL_SIGMOID, alpha=K.ALPHA_SCALAR),
    dict(focal=K.FOCAL_SIGMOID, alpha=K.ALPHA_PER_CLASS, drop=True), dict(focal=K.FOCAL_SOFTMAX),
    dict(focal=K.FOCAL_SOFTMAX, alpha=K.ALPHA_SCALAR, drop=True), dict(focal=K.FOCAL_SOFTMAX, alpha=K.ALPHA_PER_CLASS),
]
# (target kind, mask mode, ignore_index): labels with and without the label mask, soft targets with the channel mask
# (a soft w), one-hot targets with the sentinel mask.
FOCAL_TARGETS = [("labels", K.MASK_NONE, 0), ("labels", K.MASK_LABEL, 3), ("soft", K.MASK_CHANNEL, 1),
                 ("onehot", K.MASK_SENTINEL, -100)]


def focal_case(kind, mask_mode, ignore_index, dtype, generator, shape=(2, 5, 37)):
    """(logits, target, params) of a focal case: every per-class row different."""
    logits = make_logits(shape, dtype, generator)
    if kind == "labels":
        target = make_labels((shape[0], shape[2]), shape[1], torch.int64, generator,
                             ignore_index if mask_mode else None)
    else:
        target = make_dense(shape, kind, torch.float64 if dtype == torch.float64 else torch.float32, generator,
                            ignore_index if mask_mode else None)
    prm = params(shape[1], gamma=1.5, ce_weight=[0.5, 1.0, 2.0, 1.5, 0.25][:shape[1]],
                 dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                 focal_alpha=[0.1, 0.3, 0.5, 0.7, 0.9][:shape[1]], focal_weight=[1.0, 0.5, 2.0, 1.5, 3.0][:shape[1]])
    return logits, target, prm


@CPP
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("focal_gamma", [0.0, 1.0, 2.0, 1.5])
@pytest.mark.parametrize("kind, mask_mode, ignore_index", FOCAL_TARGETS, ids=str)
@pytest.mark.parametrize("focal_codes", FOCAL_CASES, ids=str)
def test_cpp_focal_sums_match_reference(backend, focal_codes, kind, mask_mode, ignore_index, focal_gamma, dtype):
    """The F sums and their gradient (a random upstream on every sum and extra) for each focal entry point."""
    generator = torch.Generator().manual_seed(int(10 * focal_gamma) + mask_mode)
    logits, target, prm = focal_case(kind, mask_mode, ignore_index, dtype, generator)
    cds = codes(labels=kind == "labels", ignore_index=ignore_index, mask_mode=mask_mode, with_ce=True, **focal_codes)
    check_sums(backend, logits, target, prm, cds, scalars(focal_gamma=focal_gamma, focal_alpha=0.3), generator)


@CPP
@pytest.mark.parametrize("focal", [K.FOCAL_SIGMOID, K.FOCAL_SOFTMAX])
@pytest.mark.parametrize("layout", ["channels_last", "float16"])
def test_cpp_focal_gathered_and_scattered_tiles(backend, focal, layout):
    """Tiles gathered into buffers and gradients scattered from them (class stride 1, or a low-precision dtype):
    the focal backward adds to the scattered tile."""
    generator = torch.Generator().manual_seed(focal)
    base = make_logits((2, 4, 6, 7), torch.float32, generator)
    if layout == "channels_last":
        logits = base.contiguous(memory_format=torch.channels_last).flatten(2)
    else:
        logits = base.flatten(2).to(torch.float16)
    labels = make_labels((2, 42), 4, torch.uint8, generator, ignore_index=2)
    cds = codes(mask_mode=K.MASK_LABEL, ignore_index=2, focal=focal, alpha=K.ALPHA_SCALAR, drop=True)
    check_sums(backend, logits, labels, params(4, gamma=2.0), cds, scalars(), generator)
    check_loss(backend, logits, labels, params(4, gamma=2.0), codes(head=K.HEAD_NONE, focal=focal,
                                                                    reduction=K.REDUCTION_NONE), scalars(), generator)


@CPP
@pytest.mark.parametrize("focal", [K.FOCAL_SIGMOID, K.FOCAL_SOFTMAX])
def test_cpp_focal_keeps_a_negative_infinite_logit_finite(backend, focal):
    """A masked class (logit -inf) that is never the label: the softmax form's terms there are selected away (not
    0 * -inf), the sigmoid form's logits clamped to +-1e30 with the clamp's zero gradient, as the reference does."""
    generator = torch.Generator().manual_seed(8)
    logits = make_logits((1, 3, 16), torch.float32, generator)
    logits[:, 2] = -math.inf
    labels = make_labels((1, 16), 2, torch.int64, generator)
    for cds in (codes(focal=focal, with_ce=True), codes(head=K.HEAD_NONE, focal=focal, reduction=K.REDUCTION_NONE),
                codes(focal=focal, alpha=K.ALPHA_SCALAR, with_ce=True, drop=True, reduction=K.REDUCTION_SUM)):
        got = run_loss(backend, logits, labels, params(3), cds, scalars())
        assert all(torch.isfinite(t).all() for t in got), cds
        assert_close(got, expected(logits, labels, params(3), cds, scalars(), fn="loss"), torch.float32, f"{cds}")


@CPP
def test_cpp_focal_map_with_bad_labels(backend):
    """FocalLoss's reduction "none": the map comes from the forward pass, the poison from the head (NaN everywhere for
    a bad label), and the gradient of the valid elements is untouched."""
    generator = torch.Generator().manual_seed(12)
    logits = make_logits((2, 3, 19), torch.float32, generator)
    labels = make_labels((2, 19), 3, torch.int64, generator, invalid=True)
    for focal in (K.FOCAL_SIGMOID, K.FOCAL_SOFTMAX):
        cds = codes(head=K.HEAD_NONE, focal=focal, reduction=K.REDUCTION_NONE, drop=True)
        upstream = torch.rand(2, 2, 19, generator=generator, dtype=torch.float64)
        loss, grad = run_loss(backend, logits, labels, params(3), cds, scalars(), upstream)
        assert loss.shape == (2, 2, 19) and torch.isnan(loss).all()
        _, want = expected(logits, labels, params(3), cds, scalars(), fn="loss", upstream=upstream)
        assert_close((grad,), (want,), torch.float32, f"focal {focal} gradient with bad labels")


@CPP
@pytest.mark.parametrize("variant", [
    dict(with_ce=True, mask_mode=K.MASK_LABEL, ignore_index=2, gamma=2.0),
    dict(focal=K.FOCAL_SOFTMAX, alpha=K.ALPHA_PER_CLASS, batch=True, mask_mode=K.MASK_LABEL, ignore_index=2),
    dict(head=K.HEAD_NONE, focal=K.FOCAL_SIGMOID, reduction=K.REDUCTION_NONE, drop=True),
    dict(head=K.HEAD_GENERALIZED, focal=K.FOCAL_SIGMOID, focal_mask=True, mask_mode=K.MASK_LABEL, ignore_index=2),
], ids=str)
def test_cpp_several_chunks_per_image(backend, variant):
    """Images longer than a task's chunk: every sum (F and the valid count too) is added from several rows."""
    variant = dict(variant)
    gamma = variant.pop("gamma", 0.0)
    generator = torch.Generator().manual_seed(len(variant))
    pixels = 2 * CPP_CHUNK + 77
    logits = make_logits((2, 3, pixels), torch.float64, generator)
    labels = make_labels((2, pixels), 3, torch.int64, generator, ignore_index=2)
    prm = params(3, gamma=gamma, dtype=torch.float64, focal_alpha=[0.2, 0.5, 0.8])
    check_loss(backend, logits, labels, prm, codes(**variant), scalars(), generator)
    check_sums(backend, logits, labels, prm, codes(**variant), scalars(), generator)


def _expanded(x):
    return x[:, :, :1].expand(-1, -1, 40)  # pixel stride 0: one pixel read 40 times


@CPP
@pytest.mark.parametrize("case", ["dense_float64", "dense_bfloat16", "dense_float16", "classes_70_smoothing_1",
                                  "wide_int64_labels", "uint8_156", "pixel_stride_0", "channels_last_3d"])
def test_cpp_inputs(backend, case):
    """Inputs the C++ tiles treat apart: dense targets of another dtype than the logits (gathered, converted), many
    classes (small tiles), label values that would wrap if narrowed (2**32 + 1 is not class 1; uint8 156 is not
    -100), a pixel stride of 0 and channels_last_3d logits (gathered, the gradient scattered)."""
    generator = torch.Generator().manual_seed(len(case))
    cds, scl, prm = codes(with_ce=True, squared=True), scalars(label_smoothing=0.1), params(4, gamma=[0, 1, 2, 0.5])
    if case.startswith("dense"):
        logits = make_logits((2, 4, 50), torch.float32, generator)
        target = make_dense((2, 4, 50), "soft", getattr(torch, case.split("_")[1]), generator)
        cds = codes(labels=False, with_ce=True, mask_mode=K.MASK_SENTINEL, ignore_index=-1)
    elif case == "classes_70_smoothing_1":
        logits = make_logits((2, 70, 45), torch.float32, generator)
        target = make_labels((2, 45), 70, torch.int64, generator)
        prm, scl = params(70, gamma="random", generator=generator), scalars(label_smoothing=1.0)
    elif case in ("wide_int64_labels", "uint8_156"):
        logits = make_logits((2, 4, 30), torch.float32, generator)
        target = make_labels((2, 30), 4, torch.int64 if case == "wide_int64_labels" else torch.uint8, generator)
        target.view(-1)[1::5] = 2**32 + 1 if case == "wide_int64_labels" else 156
        cds = codes(with_ce=True, mask_mode=K.MASK_LABEL, ignore_index=-100)
        sums, extras = op.dice_sums(backend, logits, target, prm, cds, scl)
        assert extras[:, K.DICE_EXTRA_INVALID].sum().item() == 12
        check_sums(backend, logits, target, prm, cds, scl, generator)  # (the loss is NaN: a bad label)
        return
    elif case == "pixel_stride_0":
        logits = _expanded(make_logits((2, 4, 5), torch.float32, generator))
        target = _expanded(make_dense((2, 4, 5), "soft", torch.float32, generator))
        cds = codes(labels=False, with_ce=True, focal=K.FOCAL_SIGMOID)
    else:
        image = make_logits((2, 4, 3, 5, 6), torch.float32, generator).contiguous(memory_format=torch.channels_last_3d)
        logits = image.flatten(2)
        assert logits.data_ptr() == image.data_ptr() and logits.stride(1) == 1
        target = make_labels((2, 90), 4, torch.int64, generator, ignore_index=1)
        cds = codes(with_ce=True, mask_mode=K.MASK_LABEL, ignore_index=1, focal=K.FOCAL_SOFTMAX)
    check_sums(backend, logits, target, prm, cds, scl, generator)
    check_loss(backend, logits, target, prm, cds, scl, generator)


def _cpp_case(generator):
    """Several chunks per image, and every part of the tiles on: softmax, squared, PM Dice's pow, cross entropy with
    label smoothing, the label mask, a focal term."""
    logits = make_logits((2, 5, 3 * CPP_CHUNK + 77), torch.float32, generator)
    labels = make_labels((2, 3 * CPP_CHUNK + 77), 5, torch.int16, generator, ignore_index=4)
    prm = params(5, gamma=[0.0, 1.0, 2.0, 0.5, 3.25], ce_weight=[0.5, 1.0, 2.0, 1.5, 0.25],
                 focal_alpha=[0.1, 0.3, 0.5, 0.7, 0.9])
    cases = [codes(squared=True, with_ce=True, batch=True, mask_mode=K.MASK_LABEL, ignore_index=4, drop=True,
                   focal=K.FOCAL_SIGMOID, alpha=K.ALPHA_PER_CLASS),
             codes(activation=K.ACTIVATION_SIGMOID, mask_mode=K.MASK_LABEL, ignore_index=4, focal=K.FOCAL_SOFTMAX,
                   reduction=K.REDUCTION_SUM, head=K.HEAD_TVERSKY),
             codes(head=K.HEAD_NONE, focal=K.FOCAL_SOFTMAX, reduction=K.REDUCTION_NONE)]
    return logits, labels, prm, cases, scalars(label_smoothing=0.1, focal_gamma=1.5)


def _cpp_outputs(logits, labels, prm, cases, scl, generator):
    """The loss and its gradient of each case, and the sums, extras and their gradient of the first."""
    outputs = []
    for cds in cases:
        shape = K.dice_loss_shape(logits.shape[0], logits.shape[1], cds, logits.shape[2])
        outputs += run_loss("cpp", logits, labels, prm, cds, scl, torch.rand(shape, generator=generator))
    grads = (torch.randn(2, 5, K.DICE_NUM_SUMS, generator=generator), torch.randn(2, K.DICE_NUM_EXTRAS,
                                                                                  generator=generator))
    outputs += run_sums("cpp", logits, labels, prm, cases[0], scl, grads)
    return outputs


@CPP
def test_cpp_deterministic_and_thread_count_independent(backend):
    """Chunks of a constant size, each summed into its own row, the rows added in order: bitwise the same results
    for any number of threads."""
    case = _cpp_case(torch.Generator().manual_seed(29))
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 1, 2):
            torch.set_num_threads(count)
            results.append(_cpp_outputs(*case, torch.Generator().manual_seed(30)))
    finally:
        torch.set_num_threads(threads)
    for result in results[1:]:
        for got, first in zip(result, results[0], strict=True):
            assert torch.equal(got, first), f"differs by {(got - first).abs().max().item()}"


_ISA_SCRIPT = """
import sys
import torch
from torch_medloss import _extension
import torch_medloss.ops.dice_sums  # noqa: F401  (the autograd of the C++ ops)

sys.path.insert(0, sys.argv[2])
import test_dice_sums as t

assert _extension.why_not_loaded(cuda=False) is None
case = torch.load(sys.argv[1] + "/case.pt")
outputs = t._cpp_outputs(*case, torch.Generator().manual_seed(30))
torch.save((torch.backends.cpu.get_cpu_capability(), outputs), sys.argv[1] + "/" + sys.argv[3] + ".pt")
"""


@CPP
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_cpp_instruction_sets_agree(backend, capability, tmp_path):
    """The float32 tiles are compiled for the baseline, AVX2 and AVX-512 and picked at run time (torch's
    ATEN_CPU_CAPABILITY caps the choice, read once per process): each gives the same results within float32
    rounding (FMA changes the last bits), in a process of its own."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    case = _cpp_case(torch.Generator().manual_seed(29))
    torch.save(case, tmp_path / "case.pt")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(tmp_path), str(Path(__file__).parent), capability],
                   env=env, check=True, timeout=600)
    used, got = torch.load(tmp_path / f"{capability}.pt")
    assert used == capability.upper() or (capability == "avx2" and used == "DEFAULT"), used
    here = _cpp_outputs(*case, torch.Generator().manual_seed(30))
    assert_close(got, here, torch.float32, f"{capability} against {torch.backends.cpu.get_cpu_capability()}")
