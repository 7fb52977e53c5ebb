"""DBCE and balanced CE references: element, dilation and weights against brute force; hand-computed cases."""

import itertools
import math

import pytest
import torch

import torch_medloss
from helpers import value_and_grad
from torch_medloss import functional as F
from torch_medloss.reference import dbce as ref


@pytest.mark.parametrize(
    "radius, element, spacing, count",
    [
        (0.0, "ball", (1.0, 1.0), 1),
        (1.0, "ball", (1.0, 1.0), 5),
        (1.5, "ball", (1.0, 1.0), 9),  # sqrt(2) <= 1.5: the diagonals join
        (2.0, "ball", (1.0, 2.0), 7),  # ellipse: 5 along the fine axis, 1 step each way along the coarse one
        (1.0, "ball", (1.0, 1.0, 1.0), 7),
        (1.0, "cube", (1.0, 1.0, 1.0), 27),
        (3.0, "ball", (1.0, 1.0, 1.0), 123),
        (2.0, "cube", (1.0, 0.5), 5 * 9),
        (math.sqrt(2), "ball", (1.0, 1.0), 9),  # on the boundary despite rounding
    ],
)
def test_structuring_element_size(radius, element, spacing, count):
    offsets = ref.structuring_element(radius, element, spacing)
    assert offsets.shape == (count, len(spacing))
    assert (offsets == 0).all(dim=1).any()  # the origin


def brute_force_dilate(masks, offsets):
    out = torch.zeros_like(masks)
    spatial = masks.shape[2:]
    for b, c in itertools.product(range(masks.shape[0]), range(masks.shape[1])):
        for target in itertools.product(*(range(n) for n in spatial)):
            for offset in offsets.tolist():
                source = tuple(t - o for t, o in zip(target, offset, strict=True))
                if all(0 <= s < n for s, n in zip(source, spatial, strict=True)) and masks[(b, c, *source)]:
                    out[(b, c, *target)] = True
                    break
    return out


@pytest.mark.parametrize("spatial, radius, element", [((7,), 2.0, "ball"), ((6, 5), 1.5, "ball"),
                                                      ((5, 4, 3), 1.0, "cube"), ((4, 5), 2.0, "cube")])
def test_dilate_matches_brute_force(spatial, radius, element):
    masks = torch.rand(2, 2, *spatial) > 0.85
    offsets = ref.structuring_element(radius, element, (1.0,) * len(spatial))
    assert torch.equal(ref.dilate(masks, offsets), brute_force_dilate(masks, offsets))


def brute_force_weights(labels, num_classes, radius, element, spacing, batch, ignore_index):
    """The reference definition, pixel by pixel in Python loops."""
    B, spatial = labels.shape[0], labels.shape[1:]
    spacing = spacing or (1.0,) * len(spatial)
    pixels = list(itertools.product(*(range(n) for n in spatial)))

    def near(i, j):
        d = [(a - b) * s for a, b, s in zip(i, j, spacing, strict=True)]
        return (sum(x * x for x in d) <= radius**2 * (1 + 1e-9)) if element == "ball" else \
            all(abs(x) <= radius * (1 + 1e-9) for x in d)

    dilated = torch.zeros(B, num_classes, *spatial, dtype=torch.bool)
    for b in range(B):
        for i in pixels:
            if labels[(b, *i)] == ignore_index:
                continue
            for j in pixels:
                if labels[(b, *j)] != ignore_index and near(i, j):
                    dilated[(b, int(labels[(b, *j)]), *i)] = True
    valid = labels != ignore_index
    counts = torch.stack([((labels == c) & valid).flatten(1).sum(1) for c in range(num_classes)], 1)
    areas = dilated.flatten(2).sum(2)
    n = valid.flatten(1).sum(1).double()
    units = [list(range(B))] if batch else [[b] for b in range(B)]
    pixel_weights = torch.zeros(labels.shape, dtype=torch.float64)
    for unit in units:
        unit_counts, unit_areas = counts[unit].sum(0), areas[unit].sum(0)
        k = int((unit_counts > 0).sum())
        weights = [n[unit].sum() / (k * unit_areas[c]) if unit_counts[c] > 0 else 0.0 for c in range(num_classes)]
        for b in unit:
            for i in pixels:
                if valid[(b, *i)]:
                    pixel_weights[(b, *i)] = max(float(weights[c]) for c in range(num_classes)
                                                 if dilated[(b, c, *i)])
    return pixel_weights


@pytest.mark.parametrize(
    "spatial, num_classes, radius, element, spacing, batch",
    [
        ((9,), 3, 1.0, "ball", None, False),
        ((6, 7), 4, 1.5, "ball", None, False),
        ((6, 7), 4, 2.0, "ball", (1.0, 2.0), True),
        ((4, 5, 3), 3, 1.0, "cube", None, False),
        ((4, 5, 3), 5, 1.8, "ball", (0.7, 1.0, 1.3), True),
        ((6, 6), 2, 0.0, "ball", None, False),
    ],
)
def test_pixel_weights_match_brute_force(spatial, num_classes, radius, element, spacing, batch):
    labels = torch.randint(0, num_classes, (2, *spatial))
    labels[0].view(-1)[:3] = -100  # some ignored pixels
    weights, class_weights, areas = F.dilated_class_weights(labels, num_classes, radius, element, spacing, batch)
    expected = brute_force_weights(labels, num_classes, radius, element, spacing, batch, -100)
    torch.testing.assert_close(weights, expected.float())
    assert weights.dtype == torch.float32 and areas.dtype == torch.int64
    assert class_weights.shape == areas.shape == ((num_classes,) if batch else (2, num_classes))


def test_hand_computed_1d():
    # labels [0, 0, 0, 1], R = 1: D_0 = all 4 pixels, D_1 = {2, 3}; N = 4, K = 2 -> w_0 = 4/8, w_1 = 4/4.
    labels = torch.tensor([[0, 0, 0, 1]])
    weights, class_weights, areas = F.dilated_class_weights(labels, 2, 1.0)
    torch.testing.assert_close(areas, torch.tensor([[4, 2]]))
    torch.testing.assert_close(class_weights, torch.tensor([[0.5, 1.0]]))
    torch.testing.assert_close(weights, torch.tensor([[0.5, 0.5, 1.0, 1.0]]))
    logits = torch.randn(1, 2, 4, dtype=torch.float64)
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")[0]
    w = torch.tensor([0.5, 0.5, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(F.dbce_loss(logits, labels, radius=1.0), (w * ce).sum() / w.sum())
    torch.testing.assert_close(F.dbce_loss(logits, labels, radius=1.0, reduction="sum"), (w * ce).sum())
    torch.testing.assert_close(F.dbce_loss(logits, labels, radius=1.0, reduction="none"), (w * ce)[None])


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_radius_zero_is_balanced_ce_and_inverse_frequency(batch, reduction):
    logits = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    labels = torch.randint(0, 4, (3, 5, 6))
    labels[1][labels[1] == 2] = 0  # class 2 absent from image 1
    labels[2, 0] = 7  # ignored row
    balanced = torch_medloss.BalancedCELoss(batch=batch, ignore_index=7, reduction=reduction)(logits, labels)
    dbce = torch_medloss.DBCELoss(radius=0.0, batch=batch, ignore_index=7, reduction=reduction)(logits, labels)
    torch.testing.assert_close(balanced, dbce, rtol=0, atol=0)

    # Inverse class frequency by hand: w_c = N / (K * |M_c|) per unit.
    valid = labels != 7
    weights = torch.zeros(labels.shape, dtype=torch.float64)
    units = [list(range(3))] if batch else [[0], [1], [2]]
    for unit in units:
        unit_labels = labels[unit][valid[unit]]
        present = unit_labels.unique()
        for c in present:
            w_c = unit_labels.numel() / (len(present) * (unit_labels == c).sum())
            weights[unit] = torch.where((labels[unit] == c) & valid[unit], w_c, weights[unit])
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none", ignore_index=7)
    expected = {"none": weights * ce, "sum": (weights * ce).sum(), "mean": (weights * ce).sum() / weights.sum()}
    torch.testing.assert_close(balanced, expected[reduction])


def test_dilation_stays_inside_each_image():
    # Class 1 sits on the last pixel of image 0; it must not dilate into the first pixel of image 1.
    labels = torch.zeros(2, 6, dtype=torch.long)
    labels[0, -1] = 1
    labels[1, 0] = 1
    weights, _, areas = F.dilated_class_weights(labels, 2, 2.0)
    torch.testing.assert_close(areas, torch.tensor([[6, 3], [6, 3]]))
    torch.testing.assert_close(weights[0], weights[1].flip(0))


def test_batch_units_pool_the_batch():
    labels = torch.randint(0, 3, (1, 6, 6)).repeat(2, 1, 1)
    per_image = F.dilated_class_weights(labels, 3, 1.5)[0]
    pooled = F.dilated_class_weights(labels, 3, 1.5, batch=True)[0]
    torch.testing.assert_close(pooled, per_image)  # identical images: same N/A ratios
    labels[1, :3] = 0  # different images: pooling changes the weights
    assert not torch.allclose(F.dilated_class_weights(labels, 3, 1.5, batch=True)[0],
                              F.dilated_class_weights(labels, 3, 1.5)[0])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nothing_valid_gives_zero_and_zero_gradient(reduction):
    logits = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.full((2, 4, 4), -100)
    loss = F.dbce_loss(logits, labels, reduction=reduction)
    assert torch.equal(loss.detach(), torch.zeros_like(loss))
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_ignored_pixels_do_not_count():
    logits = torch.randn(1, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (1, 5, 5))
    labels[0, 0, 0] = -100
    loss_map = F.dbce_loss(logits, labels, radius=1.0, reduction="none")
    assert loss_map[0, 0, 0] == 0 and loss_map.shape == (1, 5, 5)
    (grad,) = torch.autograd.grad(F.dbce_loss(logits, labels, radius=1.0), logits)
    assert torch.equal(grad[0, :, 0, 0], torch.zeros(3, dtype=torch.float64))


def test_label_layouts_and_dtypes_agree():
    logits = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 5, 4))
    expected = F.dbce_loss(logits, labels)
    for variant in (labels[:, None], labels.to(torch.uint8), labels.to(torch.int16), labels.to(torch.int32)):
        torch.testing.assert_close(F.dbce_loss(logits, variant), expected)


def test_radius_changes_weights_toward_small_structures():
    # A one-pixel structure: at R = 0 its weight is 81 / (2 * 1); dilated by a radius-2 disk (13 pixels) it is
    # 81 / (2 * 13), and the 13 pixels around it all take that larger weight.
    labels = torch.zeros(1, 9, 9, dtype=torch.long)
    labels[0, 4, 4] = 1
    _, w0, _ = F.dilated_class_weights(labels, 2, 0.0)
    pixel_weights, w2, _ = F.dilated_class_weights(labels, 2, 2.0)
    torch.testing.assert_close(w0, torch.tensor([[81 / 160, 81 / 2]]))
    torch.testing.assert_close(w2, torch.tensor([[0.5, 81 / 26]]))
    assert int((pixel_weights == w2[0, 1]).sum()) == 13


# ------------------------------------------------------------------------ the element clamped to the image (issue 13)


@pytest.mark.parametrize(
    "spatial, spacing, element",
    [((4, 4), None, "ball"), ((3, 5, 2), (1.0, 0.5, 2.0), "ball"), ((4, 3), (0.7, 1.3), "cube"), ((6,), None, "ball")],
)
def test_huge_radius_equals_radius_covering_the_image(spatial, spacing, element):
    """R = 1e9 (or 1e300, whose R^2 overflows) gives the weights of a radius just above the image's diagonal and the
    brute-force definition's; before the clamp the element had ~R^d offsets and this never finished."""
    torch.manual_seed(0)
    steps = spacing or (1.0,) * len(spatial)
    diagonal = math.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(spatial, steps, strict=True)))
    labels = torch.randint(0, 4, (2, *spatial))
    labels[1].view(-1)[:2] = -100
    covering = ref.dilated_class_weights(labels, 4, diagonal * 1.01, element, spacing)
    for radius in (1e9, 1e300):
        huge = ref.dilated_class_weights(labels, 4, radius, element, spacing)
        for got, expected in zip(huge, covering, strict=True):
            assert torch.equal(got, expected)
    expected = brute_force_weights(labels, 4, 1e9, element, spacing, False, -100)
    torch.testing.assert_close(covering[0], expected.float())


def test_huge_radius_loss_on_the_reference():
    """The issue's case, C = 70 (over the fused kernels' 64), on the reference: finishes, and equals the loss at a
    radius just above the diagonal; its gradient too."""
    torch.manual_seed(1)
    logits = torch.randn(1, 70, 4, 4, dtype=torch.float64)
    labels = torch.randint(0, 70, (1, 4, 4))
    for reduction in ("mean", "none"):
        value, grad = value_and_grad(
            torch_medloss.DBCELoss(radius=1e9, reduction=reduction, backend="reference"), logits, labels)
        expected, expected_grad = value_and_grad(
            torch_medloss.DBCELoss(radius=4.25, reduction=reduction, backend="reference"), logits, labels)
        assert torch.equal(value, expected) and torch.equal(grad, expected_grad)


def test_dilation_work_is_bounded_by_the_image(monkeypatch):
    """A radius past the image along one axis but not covering the image: dilate gets only offsets with |o_a| <=
    n_a - 1 (not the (2R + 1)-wide element), and the weights still equal the brute-force definition's."""
    seen = []
    original = ref.dilate

    def spy(masks, offsets):
        seen.append(offsets.clone())
        return original(masks, offsets)

    monkeypatch.setattr(ref, "dilate", spy)
    torch.manual_seed(2)
    labels = torch.randint(0, 3, (2, 3, 30))
    labels[0, 1, :4] = -100
    weights, _, _ = ref.dilated_class_weights(labels, 3, 20.0, "ball")
    (offsets,) = seen
    full = ref.structuring_element(20.0, "ball", (1.0, 1.0))
    assert torch.equal(offsets, full[(full.abs() <= torch.tensor([2, 29])).all(dim=1)])
    expected = brute_force_weights(labels, 3, 20.0, "ball", None, False, -100)
    torch.testing.assert_close(weights, expected.float())


def test_dilate_drops_offsets_past_the_image():
    """An offset with |o_a| >= n_a reads only padding: dilate ignores it instead of padding by it."""
    masks = torch.rand(2, 3, 4, 5) > 0.7
    near = torch.tensor([[0, 0], [1, -1], [-3, 4]])
    far = torch.cat([near, torch.tensor([[4, 0], [0, -5], [10**15, 10**15]])])
    assert torch.equal(ref.dilate(masks, far), ref.dilate(masks, near))
    assert torch.equal(ref.dilate(masks, near), brute_force_dilate(masks, near))


@pytest.mark.parametrize(
    "dtype, ignore_index",
    [(torch.int8, 255), (torch.int16, 40000), (torch.int8, -200), (torch.uint8, -1), (torch.uint8, 300)],
)
def test_reference_labels_compare_with_any_ignore_index(dtype, ignore_index):
    """An ignore_index the label dtype cannot hold: the reference compares the true values (labels widened to int64)
    instead of raising torch's "without overflow" RuntimeError or wrapping (uint8 255 == -1): the loss and the
    weights equal those of the same labels in int64."""
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 5, 4))
    for reduction in ("mean", "none"):
        got = ref.dbce_loss(logits, labels.to(dtype), ignore_index=ignore_index, reduction=reduction, radius=1.5)
        expected = ref.dbce_loss(logits, labels, ignore_index=ignore_index, reduction=reduction, radius=1.5)
        assert torch.equal(got, expected)
    got = ref.dilated_class_weights(labels.to(dtype), 3, 1.5, ignore_index=ignore_index)
    expected = ref.dilated_class_weights(labels, 3, 1.5, ignore_index=ignore_index)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    if dtype == torch.uint8 and ignore_index == -1:  # 255 is a label out of range (NaN), not an ignored pixel
        labels[0, 0, 0] = 255
        got = ref.dbce_loss(logits, labels.to(dtype), ignore_index=-1, reduction="sum")
        assert torch.isnan(got) and torch.isnan(ref.dbce_loss(logits, labels, ignore_index=-1, reduction="sum"))
