"""The DBCE ops (torch_medloss.ops.dbce: the dbce_loss op and its pieces dbce_masks and dbce_ce) on the fused
backends against their reference (torch_medloss.reference.dbce_ops), from one set of case builders: the masks, class
counts and areas bitwise, the cross entropy and the loss within float32 rounding, forward and backward.

The cases are sized for the GPU kernels' paths: several blocks per image, the element as one list of offsets or
split into two or three passes, 8-, 16- and 32-bit rank buffers, every mask dtype. The C++ kernels' own corner cases
are in test_dbce_cpp.py and test_dbce_loss.py, the Triton kernels' in test_dbce_triton.py; the Triton interpreter
runs the small cases only.
"""

from __future__ import annotations

import math

import backends
import pytest
import torch

from torch_medloss import _contract as K
from torch_medloss.ops import dbce as op
from torch_medloss.reference import dbce_ops as reference

BALL, CUBE = K.ELEMENT_BALL, K.ELEMENT_CUBE
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
# Gradient tolerance per logits dtype against the float64 reference: float32 within expf/logf rounding, bfloat16 and
# float16 rounded once.
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps,
             torch.float16: 2 * torch.finfo(torch.float16).eps}
SUMS_RTOL = 2e-5
# Pixels per block step of the CUDA kernels: longer images are summed from several partial rows.
CUDA_STEP = 4096
REDUCTIONS = [K.REDUCTION_MEAN, K.REDUCTION_SUM, K.REDUCTION_NONE]


@pytest.fixture(params=backends.params("cpp", "triton", "cuda"))
def backend(request):
    if request.param == "triton" and backends.INTERPRETING:
        pytest.skip("sized for compiled kernels; test_dbce_triton.py runs the Triton kernels in the interpreter")
    backends.require(request.param)
    return request.param


def large(backend):
    """Mark a case that needs compiled kernels (kept for a Triton run under the interpreter)."""
    if backend == "triton" and backends.INTERPRETING:
        pytest.skip("too large for the Triton interpreter")


# ---------------------------------------------------------------------------------------------------- case builders


def make_labels(shape, classes, dtype=torch.int64, ignore_index=-100, invalid=True, seed=0, blobs=True):
    """Labels (B, D, H, W) in [0, C): piecewise-constant blobs (so that dilation matters) or noise, ~15% of
    ignore_index where the dtype holds it, and a few invalid values on both sides when ``invalid``."""
    generator = torch.Generator().manual_seed(seed)
    if blobs:
        coarse = [max(1, n // 4) for n in shape[1:]]
        small = torch.randint(0, classes, (shape[0], 1, *coarse), generator=generator).float()
        labels = torch.nn.functional.interpolate(small, size=tuple(shape[1:]), mode="nearest")[:, 0].long()
    else:
        labels = torch.randint(0, classes, tuple(shape), generator=generator)
    info = torch.iinfo(dtype)
    if info.min <= ignore_index <= info.max:
        labels[torch.rand(tuple(shape), generator=generator) < 0.15] = ignore_index
    if invalid:
        flat = labels.view(-1)
        spots = torch.randint(0, flat.numel(), (6,), generator=generator)
        bad = [classes, classes + 5, -1, -7] if info.min < 0 else [classes, classes + 5]
        for k, spot in enumerate(spots.tolist()):
            value = bad[k % len(bad)]
            if info.min <= value <= info.max and value != ignore_index:
                flat[spot] = value
    return labels.to(dtype)


def check_masks(backend, labels, classes, ignore_index, element, radius, spacing, what):
    """The masks op against the reference (run on the CPU), bitwise."""
    args = (classes, ignore_index, element, float(radius), [float(s) for s in spacing])
    got = op.dbce_masks(backend, labels.to(backends.device(backend)), *args)
    expected = reference.dbce_masks(labels.cpu(), *args)
    for name, actual, wanted in zip(("masks", "counts", "areas", "invalid"), got, expected, strict=True):
        assert actual.dtype == wanted.dtype and actual.shape == wanted.shape, f"{what}: {name} {actual.dtype}"
        actual = actual.cpu()
        if not torch.equal(actual, wanted):
            differ = (actual != wanted).nonzero()[:8].tolist()
            pytest.fail(f"{what}: {name} differ at {differ}: got {[actual[tuple(i)].item() for i in differ]}, "
                        f"expected {[wanted[tuple(i)].item() for i in differ]}")
    assert got[0].is_contiguous(), what
    return got


def make_ce_case(backend, batch, classes, pixels, *, dtype=torch.float32, label_dtype=torch.int64,
                 ignore_index=-100, write_map=True, seed=0):
    """(logits, labels, masks, class_weights, ignore_index, write_map) on the backend's device, with random mask bits
    (bits >= C set too: the op must ignore them), invalid and ignored labels, and positive class weights."""
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn((batch, classes, pixels), generator=generator, dtype=torch.float64)).to(dtype)
    labels = make_labels((batch, 1, 1, pixels), classes, label_dtype, ignore_index, seed=seed, blobs=False)
    mask_type = reference.mask_dtype(classes)
    bits = torch.randint(0, 2, (batch, pixels, 64), generator=generator, dtype=torch.int64)
    bits[..., :classes] &= (torch.rand((batch, pixels, 1), generator=generator) < 0.9).long()  # some empty masks
    masks = (bits << torch.arange(64)).sum(-1)  # int64, wraps onto bit 63 as intended
    masks = masks.to(mask_type) if mask_type != torch.uint8 else (masks & 0xFF).to(torch.uint8)
    weights = (0.25 + 2 * torch.rand((batch, classes), generator=generator)).float()
    device = backends.device(backend)
    return (logits.to(device), labels.view(batch, pixels).to(device), masks.to(device), weights.to(device),
            ignore_index, write_map)


def assert_matches(actual, expected, rtol, what):
    """assert_close with atol = rtol * the largest expected magnitude; failures name the case."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=rtol, atol=rtol * scale, equal_nan=True,
                               msg=lambda message: f"{what}\n{message}")


def check_ce(backend, args, what):
    """The cross entropy's forward and backward (through autograd) against the float64 reference on the same
    values."""
    logits, write_map = args[0], args[5]
    batch, _, pixels = logits.shape
    generator = torch.Generator().manual_seed(1)
    grad_sums = torch.randn((batch, 2), generator=generator, dtype=torch.float64)
    grad_map = torch.randn((batch, pixels), generator=generator, dtype=torch.float64)
    leaf = logits.detach().clone().requires_grad_(True)
    sums, loss_map = op.dbce_ce(backend, leaf, *args[1:])
    total = (sums * grad_sums.to(sums)).sum() + ((loss_map * grad_map.to(loss_map)).sum() if write_map else 0)
    (grad,) = torch.autograd.grad(total, leaf)

    exact = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    exact_leaf = exact[0].double().requires_grad_(True)
    expected_sums, expected_map = reference.dbce_ce_fwd(exact_leaf, *exact[1:])
    expected_total = (expected_sums * grad_sums).sum() + ((expected_map * grad_map).sum() if write_map else 0)
    (expected_grad,) = torch.autograd.grad(expected_total, exact_leaf)

    assert sums.shape == (batch, 2) and sums.dtype == torch.float32, what
    assert_matches(sums.detach(), expected_sums.float(), SUMS_RTOL, f"{what}: sums")
    if write_map:
        assert loss_map.shape == (batch, pixels) and loss_map.dtype == torch.float32, what
        assert_matches(loss_map.detach(), expected_map.float(), SUMS_RTOL, f"{what}: map")
    else:
        assert loss_map.numel() == 0, what
    assert grad.shape == logits.shape and grad.dtype == logits.dtype, what
    assert_matches(grad.float(), expected_grad.float(), GRAD_RTOL[logits.dtype], f"{what}: gradient")
    return sums, loss_map, grad


def run_loss(backend, logits, labels, upstream=None, **options):
    """(loss, d<upstream, loss>/d logits) of the DBCE loss seam (ops.dbce.dbce_loss: the dbce_loss op, or on the
    reference its reference) for logits (B, C, *S) and labels (B, *S)."""
    device = backends.device(backend)
    leaf = logits.detach().clone().to(device).requires_grad_(True)
    options = {"radius": 2.0, "element": "ball", "spacing": None, "batch": False, "ignore_index": -100,
               "reduction": "mean", **options}
    loss = op.dbce_loss(leaf, labels.to(device), backend=backend, distributed="off", **options)
    upstream = torch.ones_like(loss) if upstream is None else upstream.to(loss)
    (grad,) = torch.autograd.grad((loss * upstream).sum(), leaf)
    return loss.detach(), grad


def check_loss(backend, logits, labels, what, **options):
    """Value and gradient against the reference (float64 on the same values), under a random upstream."""
    generator = torch.Generator().manual_seed(3)
    shape = labels.shape if options.get("reduction") == "none" else ()
    upstream = torch.rand(shape, generator=generator, dtype=torch.float64)
    got = run_loss(backend, logits, labels, upstream, **options)
    want = run_loss("reference", logits.double(), labels, upstream, **options)
    assert got[0].shape == want[0].shape, what
    rtol = GRAD_RTOL.get(logits.dtype, 1e-5) if logits.dtype != torch.float32 else SUMS_RTOL
    for name, g, w in zip(("loss", "gradient"), got, want, strict=True):
        assert_matches(g.double(), w, rtol, f"{what}: {name}")
    return got


# ------------------------------------------------------------------------------------------------------ dbce_masks

# (shape (B, D, H, W), spacing): 1-D, 2-D and 3-D maps (leading size-1 dims), anisotropic spacing, prime sizes.
MASK_SHAPES = [
    ((2, 1, 1, 97), (1.0, 1.0, 1.0)),
    ((2, 1, 29, 37), (1.0, 1.0, 1.0)),
    ((1, 1, 23, 41), (1.0, 0.6, 1.7)),
    ((2, 7, 13, 19), (1.0, 1.0, 1.0)),
    ((1, 9, 11, 17), (2.5, 0.8, 1.0)),
]


@pytest.mark.parametrize("element", [BALL, CUBE], ids=["ball", "cube"])
@pytest.mark.parametrize("radius", [0.0, 1.0, 1.5, 2.0, 3.0, 5.5, 10.0])
@pytest.mark.parametrize("shape, spacing", MASK_SHAPES, ids=str)
def test_masks_match_reference(backend, element, radius, shape, spacing):
    """Every plan of the CUDA kernels: one list of offsets (small elements), a window along one axis (1-D), a rank
    pass then a window (2-D past the list, 3-D with a small enough disk of (D, H) offsets), three passes beyond."""
    if radius > 3.0:
        large(backend)
    labels = make_labels(shape, 4, seed=int(radius * 10) + shape[1])
    check_masks(backend, labels, 4, -100, element, radius, spacing, f"{shape} R={radius} s={spacing} e={element}")


@pytest.mark.parametrize("classes", [1, 2, 8, 9, 16, 17, 32, 33, 64])
@pytest.mark.parametrize("element", [BALL, CUBE], ids=["ball", "cube"])
def test_masks_classes_and_mask_dtypes(backend, classes, element):
    labels = make_labels((2, 5, 12, 14), classes, seed=classes, blobs=classes < 20)
    masks, *_ = check_masks(backend, labels, classes, 255, element, 2.0, (1.0, 1.0, 1.0), f"C={classes}")
    assert masks.dtype == reference.mask_dtype(classes)
    # Past the one-list element: the rank buffers with C classes per pixel.
    if backend != "triton":
        check_masks(backend, labels, classes, 255, element, 4.0, (1.0, 1.0, 1.0), f"C={classes} R=4")


@pytest.mark.parametrize("dtype", LABEL_DTYPES, ids=str)
@pytest.mark.parametrize("ignore_index", [-100, 0, 3, 255])
def test_masks_label_dtypes_and_ignore_index(backend, dtype, ignore_index):
    labels = make_labels((2, 4, 9, 15), 5, dtype, ignore_index, seed=7)
    if dtype == torch.uint8:
        labels.view(-1)[3] = 156  # -100 as uint8: invalid, not ignored
    check_masks(backend, labels, 5, ignore_index, BALL, 1.5, (1.0, 1.0, 1.0), f"{dtype} ignore={ignore_index}")


@pytest.mark.parametrize("make", [
    lambda x: x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1),  # W outermost in memory
    lambda x: x.transpose(1, 2).contiguous().transpose(1, 2),
    lambda x: torch.cat([x, x], dim=3)[..., ::2],  # strided W
    lambda x: x.expand(3, -1, -1, -1),  # stride 0 over the batch
], ids=["permuted", "transposed", "strided", "expanded"])
def test_masks_strided_labels(backend, make):
    labels = make(make_labels((1, 6, 10, 21), 3, seed=3))
    assert not labels.is_contiguous()
    check_masks(backend, labels, 3, -100, BALL, 2.0, (1.0, 2.0, 1.0), "strided labels")


def test_masks_invalid_labels(backend):
    labels = torch.tensor([[[[0, 1, 7, -3, -100, 2, 1]]]])
    masks, counts, areas, invalid = check_masks(backend, labels, 3, -100, CUBE, 1.0, (1.0, 1.0, 1.0), "invalid")
    # Hand-computed: invalid pixels (7, -3) and the ignored one get no bits, and count in `invalid` (not ignored).
    assert masks.cpu().tolist() == [[[[0b011, 0b011, 0, 0, 0, 0b110, 0b110]]]]
    assert invalid.cpu().tolist() == [2] and counts.cpu().tolist() == [[1, 2, 1]]
    assert areas.cpu().tolist() == [[2, 4, 2]]


def test_masks_several_blocks_and_a_window_past_the_image(backend):
    large(backend)
    # Images over several 4096-pixel blocks; a W window wider than the image is clamped to it.
    labels = make_labels((2, 3, 37, 83), 5, seed=11)
    assert labels[0].numel() > 2 * CUDA_STEP
    check_masks(backend, labels, 5, -100, BALL, 3.0, (1.0, 1.0, 1.0), "blocks")
    # A cube larger than the image (too large for structuring_element's loop): every valid pixel gets the bits of
    # all the classes present in its image.
    masks, _, areas, _ = op.dbce_masks(backend, labels.to(backends.device(backend)), 5, -100, CUBE, 500.0,
                                       [1.0, 1.0, 1.0])
    valid = (labels >= 0) & (labels < 5)
    present = [sum(1 << c for c in range(5) if bool((labels[b][valid[b]] == c).any())) for b in range(2)]
    expected = torch.where(valid, torch.tensor(present).view(2, 1, 1, 1), 0).to(torch.uint8)
    assert torch.equal(masks.cpu(), expected)


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


@pytest.mark.parametrize("shape, spacing, radius", [
    ((300, 1, 1), (1.0, 1.0, 1.0), 280.0),  # one axis: a window over the labels
    ((9, 40, 40), (1.0, 1.3, 1.0), 41.0),  # three passes, 16-bit ranks
    ((1, 300, 300), (1.0, 1.0, 0.77), 250.0),  # two axes: ranks along H (16-bit), then W
    ((260, 260, 1), (1.0, 1.0 + 2**-20, 1.0), 400.0),  # two axes, ~67000 distinct lengths: 32-bit ranks
    ((12, 14, 16), (1.0, 1.0, 1.0), 6.0),  # three axes, a list of (D, H) pairs then W
], ids=["deep", "three_passes", "wide", "ranks32", "pairs"])
def test_masks_wide_index_paths(backend, shape, spacing, radius):
    large(backend)
    seed_at = tuple(n // 3 for n in shape)
    labels = torch.full((1, *shape), 1, dtype=torch.int64)
    labels[(0, *seed_at)] = 0
    masks, counts, areas, invalid = op.dbce_masks(backend, labels.to(backends.device(backend)), 2, -100, BALL,
                                                  radius, list(spacing))
    inside = _single_seed_ball(shape, spacing, radius, seed_at)
    got = (masks[0].cpu().long() & 1).bool()
    assert torch.equal(got, inside), f"{(got != inside).nonzero()[:8].tolist()}"
    assert areas.cpu().tolist() == [[int(inside.sum()), labels.numel()]]
    assert counts.cpu().tolist() == [[1, labels.numel() - 1]] and invalid.cpu().tolist() == [0]


def test_masks_empty(backend):
    device = backends.device(backend)
    masks, counts, areas, invalid = op.dbce_masks(backend, torch.zeros(2, 0, 3, 4, dtype=torch.int64, device=device),
                                                  3, -100, BALL, 1.0, [1.0, 1.0, 1.0])
    assert masks.shape == (2, 0, 3, 4) and masks.dtype == torch.uint8
    assert counts.cpu().tolist() == [[0] * 3] * 2 and areas.cpu().tolist() == [[0] * 3] * 2
    assert invalid.cpu().tolist() == [0, 0]


# -------------------------------------------------------------------------------------------------------- dbce_ce


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("write_map", [True, False])
@pytest.mark.parametrize("classes", [1, 2, 4, 5, 8, 9, 16, 17, 40, 64])
def test_ce_matches_reference(backend, classes, write_map, dtype):
    # Images over two CUDA steps; C covers the backward's register buckets (4, 8, 16) and the streamed path.
    pixels = CUDA_STEP + 37 if backend == "cuda" else 301
    args = make_ce_case(backend, 2, classes, pixels, dtype=dtype, write_map=write_map, seed=classes)
    check_ce(backend, args, f"C={classes} write_map={write_map} {dtype}")


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES, ids=str)
@pytest.mark.parametrize("ignore_index", [-100, 0, 2, 255])
def test_ce_label_dtypes_and_ignore_index(backend, label_dtype, ignore_index):
    args = make_ce_case(backend, 2, 5, 301, label_dtype=label_dtype, ignore_index=ignore_index, seed=5)
    check_ce(backend, args, f"{label_dtype} ignore={ignore_index}")


@pytest.mark.parametrize("classes", [3, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ce_channels_last_in_place(backend, classes, dtype):
    args = make_ce_case(backend, 2, classes, 13 * 31, dtype=dtype, seed=9)
    image = args[0].view(2, classes, 13, 31).contiguous(memory_format=torch.channels_last)
    channels_last = image.flatten(2)
    assert channels_last.data_ptr() == image.data_ptr() and channels_last.stride(1) == 1
    _, _, grad = check_ce(backend, (channels_last, *args[1:]), f"channels_last C={classes}")
    assert grad.stride() == channels_last.stride()


def test_ce_strided_inputs(backend):
    args = make_ce_case(backend, 2, 6, 400, seed=2)
    logits = torch.cat([args[0], args[0]], dim=2)[..., ::2]
    labels = torch.stack([args[1], args[1]], dim=-1)[..., 0]
    masks = args[2].t().contiguous().t()
    weights = args[3].t().contiguous().t()
    assert not (logits.is_contiguous() or labels.is_contiguous() or masks.is_contiguous())
    check_ce(backend, (logits, labels, masks, weights, *args[4:]), "strided inputs")


def test_ce_hand_computed(backend):
    # Two classes, logits (0, log 3): CE = log 4 - x_label; masks 0b01, 0b11, 0b10, 0; weights (2, 5).
    x = torch.tensor([[[0.0] * 4, [3.0] * 4]])
    x[0, 1] = x[0, 1].log()
    labels = torch.tensor([[0, 1, -100, 1]])
    masks = torch.tensor([[0b01, 0b11, 0b10, 0]], dtype=torch.uint8)
    weights = torch.tensor([[2.0, 5.0]])
    device = backends.device(backend)
    sums, loss_map = op.dbce_ce(backend, *(t.to(device) for t in (x, labels, masks, weights)), -100, True)
    ce0, ce1 = torch.tensor(4.0).log().item(), torch.tensor(4.0 / 3.0).log().item()
    torch.testing.assert_close(loss_map.cpu(), torch.tensor([[2 * ce0, 5 * ce1, 0.0, 0.0]]))
    torch.testing.assert_close(sums.cpu(), torch.tensor([[2 * ce0 + 5 * ce1, 7.0]]))


def test_ce_negative_infinite_logit(backend):
    """A masked class (logit -inf) that is never the label: its softmax term is 0, not NaN."""
    args = make_ce_case(backend, 2, 4, 50, seed=6)
    logits = args[0].clone()
    labels = args[1].clone()
    logits[:, 3] = -math.inf
    labels[labels == 3] = 0
    _, loss_map, grad = check_ce(backend, (logits, labels, *args[2:]), "-inf logit")
    assert torch.isfinite(loss_map).all() and torch.isfinite(grad).all()


# ------------------------------------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("element, radius, spacing", [
    ("ball", 1.5, (1.0, 1.0, 1.0)),  # one list of offsets
    ("cube", 2.0, (2.0, 1.0, 0.7)),
    ("ball", 5.0, (1.0, 1.0, 1.0)),  # a list of (D, H) pairs, then W: two passes
    ("cube", 3.0, (1.0, 1.0, 1.0)),  # 343 offsets: two passes
    ("ball", 7.5, (1.0, 1.0, 1.0)),  # three passes
], ids=str)
@pytest.mark.parametrize("batch", [False, True])
def test_loss_matches_reference(backend, element, radius, spacing, batch, reduction):
    """The loss op (masks, class weights, cross entropy, reduction) against the reference, 3-D, over several CUDA
    blocks per image."""
    if radius > 3.0 or element == "cube" and radius > 2.0:
        large(backend)
    labels = make_labels((2, 10, 11, 12), 4, seed=int(radius * 4), invalid=False)
    generator = torch.Generator().manual_seed(int(10 * radius))
    logits = 3 * torch.randn(2, 4, 10, 11, 12, generator=generator)
    check_loss(backend, logits, labels, f"{element} R={radius} batch={batch} {reduction}", element=element,
               radius=radius, spacing=spacing, batch=batch, reduction=reduction)


@pytest.mark.parametrize("spatial, radius", [((97,), 3.0), ((29, 37), 2.0), ((29, 37), 10.0)], ids=str)
def test_loss_one_and_two_dimensional(backend, spatial, radius):
    """1-D and 2-D maps: one launch for the masks (a list of offsets), two past the list in 2-D. (A 1-D element past
    the list, a window along the axis, is in test_masks_wide_index_paths: the reference loss enumerates a 3-D ball.)"""
    if radius > 3.0:
        large(backend)
    labels = make_labels((2, 1, *([1] * (2 - len(spatial))), *spatial), 3, seed=len(spatial), invalid=False)
    labels = labels.view(2, *spatial)
    generator = torch.Generator().manual_seed(5)
    logits = 3 * torch.randn(2, 3, *spatial, generator=generator)
    for reduction in ("mean", "none"):
        check_loss(backend, logits, labels, f"{spatial} R={radius} {reduction}", radius=radius, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_loss_low_precision_logits_and_narrow_labels(backend, dtype):
    labels = make_labels((2, 5, 6, 7), 3, torch.uint8, 255, seed=8, invalid=False)
    generator = torch.Generator().manual_seed(8)
    logits = (3 * torch.randn(2, 3, 5, 6, 7, generator=generator)).to(dtype)
    got = run_loss(backend, logits, labels, radius=1.5, ignore_index=255)
    want = run_loss("reference", logits.float(), labels, radius=1.5, ignore_index=255)
    assert_matches(got[0].float(), want[0], 1e-4, f"{dtype} loss")
    assert_matches(got[1].float(), want[1], GRAD_RTOL[dtype], f"{dtype} gradient")


def test_loss_bad_labels_make_it_nan_and_keep_the_gradient(backend):
    labels = make_labels((2, 4, 6, 7), 3, seed=4, invalid=True)
    generator = torch.Generator().manual_seed(4)
    logits = 3 * torch.randn(2, 3, 4, 6, 7, generator=generator)
    for reduction in ("mean", "sum", "none"):
        loss, grad = run_loss(backend, logits, labels, radius=1.0, reduction=reduction)
        assert torch.isnan(loss).all() and torch.isfinite(grad).all(), reduction
        _, want = run_loss("reference", logits.double(), labels, radius=1.0, reduction=reduction)
        assert_matches(grad.double(), want, SUMS_RTOL, f"bad labels {reduction}: gradient")


def test_loss_negative_infinite_logit_keeps_it_finite(backend):
    labels = make_labels((2, 4, 6, 7), 3, seed=2, invalid=False)
    labels[labels == 2] = 0
    generator = torch.Generator().manual_seed(2)
    logits = 3 * torch.randn(2, 3, 4, 6, 7, generator=generator)
    logits[:, 2] = -math.inf
    got = check_loss(backend, logits, labels, "-inf logit", radius=1.0)
    assert all(torch.isfinite(t).all() for t in got)


def test_loss_deterministic(backend):
    large(backend)
    labels = make_labels((2, 24, 40, 44), 6, seed=21, invalid=False)
    generator = torch.Generator().manual_seed(21)
    logits = torch.randn(2, 6, 24, 40, 44, generator=generator)
    first = run_loss(backend, logits, labels, radius=3.0)
    for _ in range(2):
        again = run_loss(backend, logits, labels, radius=3.0)
        assert all(torch.equal(a, b) for a, b in zip(again, first, strict=True))


# ---------------------------------------------------------------------------------------------------- CUDA only


@pytest.mark.parametrize("radius, element, passes", [(0.0, "ball", 1), (2.0, "ball", 1), (1.0, "cube", 1),
                                                     (5.0, "ball", 2)], ids=str)
def test_cuda_four_launches_without_sync(backend, radius, element, passes):
    """Issue 12 on the CUDA C++ kernels: forward and backward in the masks passes (one, or two past a 169-offset
    element in 3-D) + the cross entropy forward and backward, plus one zeros for the launches' tickets and autograd's
    upstream gradient; no host sync (test_host_cost.py counts the Triton launches)."""
    if backend != "cuda":
        pytest.skip("counts the CUDA C++ kernels' launches")
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
