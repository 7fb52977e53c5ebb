"""Tests of the CUDA DBCE ops (csrc/cuda/dbce_kernel.cu) against torch_medloss.reference.dbce_ops.

``torch.ops.torch_medloss.dbce_masks`` must match the reference bitwise (masks, counts, areas, invalid): the kernel
evaluates the element's float64 inequality exactly as structuring_element does. ``dbce_ce_fwd`` / ``dbce_ce_bwd``
are compared with the reference run in float64 on the same logit values: float32 sums within 1e-5 relative, the
gradients within a small multiple of the logits' dtype rounding. Every test needs a CUDA device.
"""

from __future__ import annotations

import pytest
import torch

from torch_medloss import _extension
from torch_medloss.reference import dbce_ops as reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BALL, CUBE = reference.ELEMENT_BALL, reference.ELEMENT_CUBE
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
# Gradient tolerance per logits dtype: float32 is computed with expf/logf, bfloat16 and float16 are rounded once.
GRAD_RTOL = {
    torch.float32: 1e-5,
    torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps,
    torch.float16: 2 * torch.finfo(torch.float16).eps,
}
SUMS_RTOL = 1e-5
# Pixels per block of the CUDA kernels: larger images are summed from several partial rows.
CUDA_CHUNK = 4096


@pytest.fixture(scope="module")
def ops():
    """(dbce_masks, dbce_ce_fwd, dbce_ce_bwd), built (or loaded from the cache) once for the module."""
    import torch_medloss.dbce_ops  # noqa: F401  (registers the fake kernels and autograd once loaded)

    reason = _extension.why_not_loaded(cuda=True)
    assert reason is None, f"the CUDA extension did not build: {reason}"
    lib = torch.ops.torch_medloss
    return lib.dbce_masks, lib.dbce_ce_fwd, lib.dbce_ce_bwd


# ---------------------------------------------------------------------------------------------------- case builder


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


def check_masks(ops, labels, classes, ignore_index, element, radius, spacing, what):
    """The CUDA masks op against the reference (run on the CPU), bitwise."""
    args = (classes, ignore_index, element, float(radius), [float(s) for s in spacing])
    got = ops[0](labels.cuda(), *args)
    expected = reference.dbce_masks(labels.cpu(), *args)
    names = ("masks", "counts", "areas", "invalid")
    for name, actual, wanted in zip(names, got, expected, strict=True):
        assert actual.dtype == wanted.dtype and actual.shape == wanted.shape, f"{what}: {name} {actual.dtype}"
        actual = actual.cpu()
        if not torch.equal(actual, wanted):
            differ = (actual != wanted).nonzero()[:8].tolist()
            pytest.fail(f"{what}: {name} differ at {differ}: got {[actual[tuple(i)].item() for i in differ]}, "
                        f"expected {[wanted[tuple(i)].item() for i in differ]}")
    assert got[0].is_contiguous(), what
    return got


def make_ce_case(batch, classes, pixels, *, dtype=torch.float32, label_dtype=torch.int64, ignore_index=-100,
                 write_map=True, seed=0):
    """(logits, labels, masks, class_weights, ignore_index, write_map) on the GPU, with random mask bits (bits >= C
    set too: the op must ignore them), invalid and ignored labels, and positive class weights."""
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn((batch, classes, pixels), generator=generator, dtype=torch.float64)).to(dtype)
    labels = make_labels((batch, 1, 1, pixels), classes, label_dtype, ignore_index, seed=seed, blobs=False)
    mask_type = reference.mask_dtype(classes)
    bits = torch.randint(0, 2, (batch, pixels, 64), generator=generator, dtype=torch.int64)
    bits[..., :classes] &= (torch.rand((batch, pixels, 1), generator=generator) < 0.9).long()  # some empty masks
    masks = (bits << torch.arange(64)).sum(-1)  # int64, wraps onto bit 63 as intended
    masks = masks.to(mask_type) if mask_type != torch.uint8 else (masks & 0xFF).to(torch.uint8)
    weights = (0.25 + 2 * torch.rand((batch, classes), generator=generator)).float()
    args = (logits, labels.view(batch, pixels), masks, weights, ignore_index, write_map)
    return tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)


def upstream(args, seed=1):
    """Random (grad_sums (B, 2), grad_map (B, S) or empty) in float32 on the GPU."""
    logits, write_map = args[0], args[5]
    generator = torch.Generator().manual_seed(seed)
    batch, pixels = logits.shape[0], logits.shape[2]
    grad_sums = torch.randn((batch, 2), generator=generator)
    grad_map = torch.randn((batch, pixels), generator=generator) if write_map else torch.empty(0)
    return grad_sums.cuda(), grad_map.cuda()


def assert_matches(actual, expected, rtol, what):
    """assert_close with atol = rtol * the largest expected magnitude; failures name the case."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale,
                               msg=lambda message: f"{what}\n{message}")


def check_ce(ops, args, what):
    """Forward and backward against the float64 reference on the same values; the backward doubles exactly."""
    _, forward, backward = ops
    logits, write_map = args[0], args[5]
    batch, _, pixels = logits.shape
    exact = (logits.double(), *args[1:])
    sums, loss_map = forward(*args)
    expected_sums, expected_map = reference.dbce_ce_fwd(*exact)
    assert sums.shape == (batch, 2) and sums.dtype == torch.float32 and sums.is_contiguous(), what
    assert_matches(sums, expected_sums.float(), SUMS_RTOL, f"{what}: sums")
    if write_map:
        assert loss_map.shape == (batch, pixels) and loss_map.dtype == torch.float32, what
        assert_matches(loss_map, expected_map.float(), 1e-5, f"{what}: map")
    else:
        assert loss_map.numel() == 0 and loss_map.dtype == torch.float32, what

    grad_sums, grad_map = upstream(args)
    grad = backward(grad_sums, grad_map, *args)
    assert grad.shape == logits.shape and grad.dtype == logits.dtype, what
    assert grad.stride() == torch.empty_like(logits).stride(), what
    expected = reference.dbce_ce_bwd(grad_sums.double(), grad_map.double(), *exact)
    assert_matches(grad.float(), expected.float(), GRAD_RTOL[logits.dtype], f"{what}: grad_logits")
    doubled = backward(2 * grad_sums, 2 * grad_map, *args)
    if logits.dtype == torch.float32:
        assert torch.equal(doubled, 2 * grad), f"{what}: doubling the upstream gradient did not double grad_logits"
    else:
        assert_matches(doubled.float(), 2 * grad.float(), GRAD_RTOL[logits.dtype], f"{what}: doubled")
    return sums, loss_map, grad


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
def test_masks_match_reference(ops, element, radius, shape, spacing):
    labels = make_labels(shape, 4, seed=int(radius * 10) + shape[1])
    check_masks(ops, labels, 4, -100, element, radius, spacing, f"{shape} R={radius} s={spacing} e={element}")


@pytest.mark.parametrize("classes", [1, 2, 8, 9, 16, 17, 32, 33, 64])
@pytest.mark.parametrize("element", [BALL, CUBE], ids=["ball", "cube"])
def test_masks_classes_and_mask_dtypes(ops, classes, element):
    labels = make_labels((2, 5, 12, 14), classes, seed=classes, blobs=classes < 20)
    masks, *_ = check_masks(ops, labels, classes, 255, element, 2.0, (1.0, 1.0, 1.0), f"C={classes}")
    assert masks.dtype == reference.mask_dtype(classes)


@pytest.mark.parametrize("dtype", LABEL_DTYPES, ids=str)
@pytest.mark.parametrize("ignore_index", [-100, 0, 3, 255])
def test_masks_label_dtypes_and_ignore_index(ops, dtype, ignore_index):
    labels = make_labels((2, 4, 9, 15), 5, dtype, ignore_index, seed=7)
    if dtype == torch.uint8:
        labels.view(-1)[3] = 156  # -100 as uint8: invalid, not ignored
    check_masks(ops, labels, 5, ignore_index, BALL, 1.5, (1.0, 1.0, 1.0), f"{dtype} ignore={ignore_index}")


@pytest.mark.parametrize("make", [
    lambda x: x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1),  # W outermost in memory
    lambda x: x.transpose(1, 2).contiguous().transpose(1, 2),
    lambda x: torch.cat([x, x], dim=3)[..., ::2],  # strided W
    lambda x: x.expand(3, -1, -1, -1),  # stride 0 over the batch
], ids=["permuted", "transposed", "strided", "expanded"])
def test_masks_strided_labels(ops, make):
    labels = make(make_labels((1, 6, 10, 21), 3, seed=3))
    assert not labels.is_contiguous()
    check_masks(ops, labels, 3, -100, BALL, 2.0, (1.0, 2.0, 1.0), "strided labels")


def test_masks_invalid_labels(ops):
    labels = torch.tensor([[[[0, 1, 7, -3, -100, 2, 1]]]])
    masks, counts, areas, invalid = check_masks(ops, labels, 3, -100, CUBE, 1.0, (1.0, 1.0, 1.0), "invalid")
    # Hand-computed: invalid pixels (7, -3) and the ignored one get no bits, and count in `invalid` (not ignored).
    assert masks.cpu().tolist() == [[[[0b011, 0b011, 0, 0, 0, 0b110, 0b110]]]]
    assert invalid.cpu().tolist() == [2] and counts.cpu().tolist() == [[1, 2, 1]]
    assert areas.cpu().tolist() == [[2, 4, 2]]


def test_masks_several_chunks_and_large_window(ops):
    # Images over several 4096-pixel blocks; a W window wider than the image is clamped to it.
    labels = make_labels((2, 3, 37, 83), 5, seed=11)
    assert labels[0].numel() > 2 * CUDA_CHUNK
    check_masks(ops, labels, 5, -100, BALL, 3.0, (1.0, 1.0, 1.0), "chunks")
    # A cube larger than the image (too large for structuring_element's loop): every valid pixel gets the bits of
    # all the classes present in its image.
    masks, _, areas, _ = ops[0](labels.cuda(), 5, -100, CUBE, 500.0, [1.0, 1.0, 1.0])
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
    ((300, 1, 1), (1.0, 1.0, 1.0), 280.0),  # the D window needs 16-bit indices
    ((9, 40, 40), (1.0, 1.3, 1.0), 41.0),  # more than 255 distinct lengths: 16-bit ranks
    ((1, 300, 300), (1.0, 1.0, 0.77), 250.0),
    ((260, 260, 1), (1.0, 1.0 + 2**-20, 1.0), 400.0),  # ~67000 distinct lengths: 32-bit ranks
], ids=["deep", "ranks16", "wide", "ranks32"])
def test_masks_wide_index_paths(ops, shape, spacing, radius):
    seed_at = tuple(n // 3 for n in shape)
    labels = torch.full((1, *shape), 1, dtype=torch.int64)
    labels[(0, *seed_at)] = 0
    masks, counts, areas, invalid = ops[0](labels.cuda(), 2, -100, BALL, radius, list(spacing))
    inside = _single_seed_ball(shape, spacing, radius, seed_at)
    got = (masks[0].cpu().long() & 1).bool()
    assert torch.equal(got, inside), f"{(got != inside).nonzero()[:8].tolist()}"
    assert areas.cpu().tolist() == [[int(inside.sum()), labels.numel()]]
    assert counts.cpu().tolist() == [[1, labels.numel() - 1]] and invalid.cpu().tolist() == [0]


def test_masks_empty(ops):
    masks, counts, areas, invalid = ops[0](torch.zeros(2, 0, 3, 4, dtype=torch.int64, device="cuda"), 3, -100,
                                           BALL, 1.0, [1.0, 1.0, 1.0])
    assert masks.shape == (2, 0, 3, 4) and masks.dtype == torch.uint8
    assert counts.cpu().tolist() == [[0] * 3] * 2 and areas.cpu().tolist() == [[0] * 3] * 2
    assert invalid.cpu().tolist() == [0, 0]


@pytest.mark.parametrize("changes, match", [
    ({"classes": 65}, r"num_classes must be in \[1, 64\] \(one mask bit per class\), got 65"),
    ({"classes": 0}, r"num_classes must be in \[1, 64\]"),
    ({"element": 2}, r"element must be 0 \(ball\) or 1 \(cube\), got 2"),
    ({"radius": -1.0}, r"radius must be finite and >= 0, got -1"),
    ({"spacing": [1.0, 1.0]}, r"spacing must hold 3 voxel sizes \(D, H, W\), got 2"),
    ({"spacing": [1.0, 0.0, 1.0]}, r"spacing must be finite and > 0"),
    ({"labels": torch.zeros(2, 3, 4)}, r"labels must be 4-D \(B, D, H, W\), got shape \[2, 3, 4\]"),
    ({"labels": torch.zeros(1, 2, 3, 4)}, r"labels must be uint8, int8, int16, int32 or int64, got Float"),
])
def test_masks_checks(ops, changes, match):
    args = {"labels": torch.zeros(1, 2, 3, 4, dtype=torch.int64), "classes": 3, "element": BALL, "radius": 1.0,
            "spacing": [1.0, 1.0, 1.0], **changes}
    with pytest.raises(RuntimeError, match="torch_medloss::dbce_masks: " + match):
        ops[0](args["labels"].cuda(), args["classes"], -100, args["element"], args["radius"], args["spacing"])


# ---------------------------------------------------------------------------------------------- dbce_ce_fwd / bwd


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("write_map", [True, False])
@pytest.mark.parametrize("classes", [1, 2, 4, 5, 8, 9, 16, 17, 40, 64])
def test_ce_matches_reference(ops, classes, write_map, dtype):
    # Images over two CUDA chunks; C covers the backward's register buckets (4, 8, 16) and the streamed path.
    args = make_ce_case(2, classes, CUDA_CHUNK + 37, dtype=dtype, write_map=write_map, seed=classes)
    check_ce(ops, args, f"C={classes} write_map={write_map} {dtype}")


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES, ids=str)
@pytest.mark.parametrize("ignore_index", [-100, 0, 2, 255])
def test_ce_label_dtypes_and_ignore_index(ops, label_dtype, ignore_index):
    args = make_ce_case(2, 5, 301, label_dtype=label_dtype, ignore_index=ignore_index, seed=5)
    check_ce(ops, args, f"{label_dtype} ignore={ignore_index}")


def test_ce_masks_from_the_masks_op(ops):
    # The pipeline as the loss runs it: masks from dbce_masks (int16 for C = 12), weights N / (K A_c).
    classes = 12
    labels = make_labels((2, 6, 16, 20), classes, seed=4).cuda()
    masks, counts, areas, _ = ops[0](labels, classes, -100, BALL, 2.0, [1.0, 1.0, 1.0])
    valid = counts.sum(1, keepdim=True).float()
    present = counts > 0
    weights = torch.where(present, valid / (present.sum(1, keepdim=True) * areas.clamp_min(1)), 0.0).float()
    logits = torch.randn(2, classes, labels[0].numel(), device="cuda")
    args = (logits, labels.flatten(1), masks.flatten(1), weights, -100, True)
    check_ce(ops, args, "masks from dbce_masks")


@pytest.mark.parametrize("classes", [3, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ce_channels_last_in_place(ops, classes, dtype):
    args = make_ce_case(2, classes, 13 * 331, dtype=dtype, seed=9)
    image = args[0].view(2, classes, 13, 331).contiguous(memory_format=torch.channels_last)
    channels_last = image.flatten(2)
    assert channels_last.data_ptr() == image.data_ptr() and channels_last.stride(1) == 1
    _, _, grad = check_ce(ops, (channels_last, *args[1:]), f"channels_last C={classes}")
    assert grad.stride() == channels_last.stride()
    # Same values, any layout: the same results.
    sums, loss_map = ops[1](*args)
    sums_cl, map_cl = ops[1](channels_last, *args[1:])
    # Each pixel's classes are read in the same order whatever the layout: the results are bitwise equal.
    assert torch.equal(sums_cl, sums) and torch.equal(map_cl, loss_map)


def test_ce_strided_inputs(ops):
    args = make_ce_case(2, 6, 400, seed=2)
    logits = torch.cat([args[0], args[0]], dim=2)[..., ::2]
    labels = torch.stack([args[1], args[1]], dim=-1)[..., 0]
    masks = args[2].t().contiguous().t()
    weights = args[3].t().contiguous().t()
    assert not (logits.is_contiguous() or labels.is_contiguous() or masks.is_contiguous())
    check_ce(ops, (logits, labels, masks, weights, *args[4:]), "strided inputs")


def test_ce_hand_computed(ops):
    # Two classes, logits (0, log 3): CE = log 4 - x_label; masks 0b01, 0b11, 0b10, 0; weights (2, 5).
    x = torch.tensor([[[0.0] * 4, [3.0] * 4]])
    x[0, 1] = x[0, 1].log()
    labels = torch.tensor([[0, 1, -100, 1]])
    masks = torch.tensor([[0b01, 0b11, 0b10, 0]], dtype=torch.uint8)
    weights = torch.tensor([[2.0, 5.0]])
    args = tuple(t.cuda() for t in (x, labels, masks, weights))
    sums, loss_map = ops[1](*args, -100, True)
    ce0, ce1 = torch.tensor(4.0).log().item(), torch.tensor(4.0 / 3.0).log().item()
    expected_map = torch.tensor([[2 * ce0, 5 * ce1, 0.0, 0.0]])
    torch.testing.assert_close(loss_map.cpu(), expected_map)
    torch.testing.assert_close(sums.cpu(), torch.tensor([[2 * ce0 + 5 * ce1, 7.0]]))


def test_ce_empty(ops):
    logits = torch.zeros(2, 3, 0, device="cuda")
    labels = torch.zeros(2, 0, dtype=torch.int64, device="cuda")
    masks = torch.zeros(2, 0, dtype=torch.uint8, device="cuda")
    weights = torch.ones(2, 3, device="cuda")
    sums, loss_map = ops[1](logits, labels, masks, weights, -100, True)
    assert sums.cpu().tolist() == [[0.0, 0.0]] * 2 and loss_map.shape == (2, 0)
    grad = ops[2](torch.ones(2, 2, device="cuda"), torch.ones(2, 0, device="cuda"), logits, labels, masks, weights,
                  -100, True)
    assert grad.shape == logits.shape


def test_ce_rejects_float64_and_bad_inputs(ops):
    args = make_ce_case(1, 3, 10, seed=1)
    with pytest.raises(RuntimeError, match=r"torch_medloss::dbce_ce_fwd: CUDA logits must be float32, bfloat16 or "
                       r"float16 \(float64 runs on the CPU only\), got Double"):
        ops[1](args[0].double(), *args[1:])
    with pytest.raises(RuntimeError, match=r"dbce_ce_fwd: logits must have 1 to 64 classes"):
        ops[1](torch.zeros(1, 65, 10, device="cuda"), *args[1:3], torch.ones(1, 65, device="cuda"), *args[4:])
    with pytest.raises(RuntimeError, match=r"dbce_ce_fwd: masks must have shape \(B, S\) = \[1, 10\], got \[1, 9\]"):
        ops[1](args[0], args[1], args[2][:, :9], *args[3:])
    with pytest.raises(RuntimeError, match=r"dbce_ce_fwd: class_weights must be float32, got Double"):
        ops[1](*args[:3], args[3].double(), *args[4:])
    with pytest.raises(RuntimeError, match=r"dbce_ce_bwd: grad_sums must have shape \(B, 2\) = \[1, 2\], got \[1\]"):
        ops[2](torch.zeros(1, device="cuda"), torch.zeros(1, 10, device="cuda"), *args)
    with pytest.raises(RuntimeError, match=r"dbce_ce_bwd: grad_map must have shape \(B, S\) = \[1, 10\] when "
                       r"write_map, got \[0\]"):
        ops[2](torch.zeros(1, 2, device="cuda"), torch.zeros(0, device="cuda"), *args)


# ----------------------------------------------------------------------------------- determinism, opcheck, autograd


def test_deterministic(ops):
    labels = make_labels((2, 24, 40, 44), 6, seed=21).cuda()  # 10 blocks per image
    first_masks = ops[0](labels, 6, -100, BALL, 3.0, [1.0, 1.0, 1.0])
    args = make_ce_case(2, 6, labels[0].numel(), seed=21)
    args = (args[0], labels.flatten(1), first_masks[0].flatten(1), *args[3:])
    grad_sums, grad_map = upstream(args)
    first = (*ops[1](*args), ops[2](grad_sums, grad_map, *args))
    for _ in range(3):
        masks = ops[0](labels, 6, -100, BALL, 3.0, [1.0, 1.0, 1.0])
        assert all(torch.equal(a, b) for a, b in zip(masks, first_masks, strict=True))
        again = (*ops[1](*args), ops[2](grad_sums, grad_map, *args))
        assert all(torch.equal(a, b) for a, b in zip(again, first, strict=True))


def test_opcheck(ops):
    labels = make_labels((2, 3, 5, 7), 4, seed=1).cuda()
    torch.library.opcheck(ops[0].default, (labels, 4, -100, BALL, 1.5, [1.0, 1.0, 1.0]))
    torch.library.opcheck(ops[0].default, (labels.transpose(2, 3), 4, -100, CUBE, 2.0, [1.0, 2.0, 0.5]))
    for write_map in (True, False):
        args = make_ce_case(2, 4, 50, write_map=write_map, seed=3)
        channels_last = args[0].transpose(1, 2).contiguous().transpose(1, 2)
        for x in (args[0], channels_last):
            torch.library.opcheck(ops[1].default, (x.detach().requires_grad_(True), *args[1:]))
            grad_sums, grad_map = upstream(args)
            torch.library.opcheck(ops[2].default, (grad_sums, grad_map, x, *args[1:]))


def test_autograd_through_the_op(ops):
    args = make_ce_case(2, 5, 123, seed=8)
    leaf = args[0].detach().requires_grad_(True)
    sums, loss_map = ops[1](leaf, *args[1:])
    (sums[:, 0].sum() / sums[:, 1].sum() + loss_map.square().mean()).backward()
    exact = args[0].double().requires_grad_(True)
    ref_sums, ref_map = reference.dbce_ce_fwd(exact, *args[1:])
    (ref_sums[:, 0].sum() / ref_sums[:, 1].sum() + ref_map.square().mean()).backward()
    assert_matches(leaf.grad, exact.grad.float(), 1e-5, "autograd")
