"""Reference Dilated Balanced Cross Entropy (DBCE, arXiv 2412.06045) and balanced cross entropy.

Our documented reading of the paper. A unit u is one image (``batch=False``) or the whole batch (``batch=True``).
Within u: V = valid pixels (label != ignore_index), N = |V|, and for each class c:

    M_c = {i in V : L_i = c}
    D_c = dilate(M_c, E_R) restricted to V, inside each image (no wrap-around, no crossing between images)
    A_c = |D_c|,  K = number of classes with M_c non-empty
    w_c = N / (K * A_c) for present classes
    w_i = max{ w_c : c present, i in D_c }         (every valid pixel lies in D of its own class)

E_R holds the integer offsets o with sum_k (o_k * s_k)^2 <= R^2 (``"ball"``) or max_k |o_k * s_k| <= R
(``"cube"``), s = ``spacing``, so R is in physical units. With R = 0, D_c = M_c and w_c = N / (K * |M_c|): the inverse
class frequency of balanced cross entropy.

The loss is w_i * CE_i with CE_i = -log softmax(x)_i[L_i]; ``mean`` is sum w*CE / sum w over all valid pixels of
the batch (0 when there are none), ``sum`` is sum w*CE, ``none`` is the (B, *S) map, zero at ignored pixels.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from torch_medloss import _distributed
from torch_medloss._validation import invalid_label_flag
from torch_medloss.reference._common import compute_dtype, poison

# Offsets on the boundary of the element are kept despite floating-point error in (o * s)^2 sums.
_BOUNDARY_TOLERANCE = 1e-9


def structuring_element(radius: float, element: str, spacing: tuple[float, ...]) -> torch.Tensor:
    """The offsets of E_R as an int64 tensor (num_offsets, ndim), the origin included, in lexicographic order.

    This one definition is shared by every backend, so the element is the same everywhere. Its size grows as R^ndim:
    to dilate an image, take _element_within(..., image shape), the same element without the offsets that cannot
    reach another pixel of that image.
    """
    return _element_within(radius, element, spacing, None)


def _element_within(radius: float, element: str, spacing: tuple[float, ...],
                    shape: tuple[int, ...] | None) -> torch.Tensor:
    """structuring_element restricted to offsets with |o_a| <= n_a - 1 on every axis of an image of ``shape``.

    An offset with |o_a| >= n_a moves every pixel out of the image, so dropping it leaves every dilation of that
    image unchanged, while the cost (and the enumeration here) becomes bounded by the image instead of growing as R^d
    (R = 1e9 never finished). The extents are those of the fused kernels: r_a = min(floor(R / s_a (1 + 1e-9)),
    n_a - 1). ``shape`` None: no clamp (the whole element).
    """
    extents = []
    for a, s in enumerate(spacing):
        reach = radius / s * (1 + _BOUNDARY_TOLERANCE)  # may be inf for a huge R or a tiny spacing: clamp first
        if shape is not None and reach >= shape[a] - 1:
            extents.append(shape[a] - 1)
        else:
            extents.append(math.floor(reach))
    limit = radius * radius * (1 + _BOUNDARY_TOLERANCE)
    offsets = []
    for offset in itertools.product(*(range(-e, e + 1) for e in extents)):
        if element == "ball":
            inside = sum((o * s) ** 2 for o, s in zip(offset, spacing, strict=True)) <= limit
        else:
            inside = all(abs(o * s) <= radius * (1 + _BOUNDARY_TOLERANCE) for o, s in zip(offset, spacing, strict=True))
        if inside:
            offsets.append(offset)
    return torch.tensor(offsets, dtype=torch.int64).view(-1, len(spacing))


def _covers_image(radius: float, element: str, spacing: tuple[float, ...], shape: tuple[int, ...]) -> bool:
    """Whether E_R holds every offset with |o_a| <= n_a - 1: the farthest one, o = (n_a - 1), is inside (the
    predicate of _element_within on that offset, evaluated the same way; it is monotone in each |o_a|)."""
    corner = [(n - 1) * s for n, s in zip(shape, spacing, strict=True)]
    if element == "ball":
        return sum(c**2 for c in corner) <= radius * radius * (1 + _BOUNDARY_TOLERANCE)
    return all(abs(c) <= radius * (1 + _BOUNDARY_TOLERANCE) for c in corner)


def dilate(masks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Binary dilation of boolean masks (B, C, *S) by an element given as offsets, zero outside each image.

    out[i] = OR over offsets o of masks[i - o]: pad every spatial axis by the largest offset with False, then OR the
    shifted views. Images and classes never mix because only the spatial axes shift. Offsets with |o_a| >= n_a on
    some axis read only padding, so they are dropped first: the padding (and the work) stays bounded by the image
    whatever the element.
    """
    spatial = masks.shape[2:]
    if offsets.numel():
        offsets = offsets[(offsets.abs() < torch.tensor(spatial, device=offsets.device)).all(dim=1)]
    reach = offsets.abs().amax(dim=0).tolist() if offsets.numel() else [0] * len(spatial)
    pad = []
    for r in reversed(reach):
        pad += [r, r]
    padded = F.pad(masks.to(torch.uint8), pad).bool()
    out = torch.zeros_like(masks)
    for offset in offsets.tolist():
        window = tuple(
            slice(r - o, r - o + n) for o, r, n in zip(offset, reach, spatial, strict=True)
        )
        out |= padded[(slice(None), slice(None), *window)]
    return out


def _widen(labels: torch.Tensor) -> torch.Tensor:
    """Labels as int64 (float64 for float labels), so that comparing them with ignore_index, and filling with it, is
    exact for any label dtype: in a narrow dtype torch wraps the scalar (uint8 labels 255 equal -1) or raises
    (``full_like`` of int8 labels with 255, of int16 ones with 40000: "value cannot be converted ... without
    overflow"). The reference's masks are C times larger than this copy anyway."""
    return labels.to(torch.float64 if labels.is_floating_point() else torch.int64)


def class_weights_from_sums(
    counts: torch.Tensor, areas: torch.Tensor, batch: bool, distributed: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(class weights w_c = N / (K * A_c), 0 for absent classes; areas A_c) of each unit.

    From per-image counts |M_c| and dilated areas |D_c| (B, C); with ``batch`` the unit is the batch ((C,) results),
    summed over the ranks of a process group too when ``distributed`` is active. N is the sum of the counts (every
    valid pixel belongs to exactly one class).
    """
    if batch:
        counts, areas = counts.sum(0), areas.sum(0)
        if _distributed.active(distributed, batch):
            counts, areas = _distributed.all_reduce_sum(counts), _distributed.all_reduce_sum(areas)
    present = counts > 0
    valid_count = counts.sum(-1, keepdim=True)
    num_present = present.sum(-1, keepdim=True)
    ratio = valid_count.to(dtype) / (num_present.to(dtype) * areas.to(dtype))
    return torch.where(present, ratio, torch.zeros_like(ratio)), areas


def dilated_class_weights(
    labels: torch.Tensor,
    num_classes: int,
    radius: float,
    element: str = "ball",
    spacing: tuple[float, ...] | None = None,
    batch: bool = False,
    ignore_index: int = -100,
    dtype: torch.dtype = torch.float32,
    distributed: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixel_weights (B, *S), class_weights, dilated_areas) for labels (B, *S) whose values are all valid.

    ``class_weights`` and ``dilated_areas`` (int64) have shape (B, C), or (C,) with ``batch=True``; absent classes
    have weight 0. Pixel weights are 0 at ignored pixels.
    """
    spatial_ndim = labels.ndim - 1
    spacing = tuple(spacing) if spacing is not None else (1.0,) * spatial_ndim
    labels = _widen(labels)
    valid = labels != ignore_index
    classes = torch.arange(num_classes, device=labels.device).view([1, -1] + [1] * spatial_ndim)
    members = (labels.unsqueeze(1) == classes) & valid.unsqueeze(1)  # M_c, (B, C, *S)
    shape = tuple(labels.shape[1:])
    if _covers_image(radius, element, spacing, shape):
        # Every pixel reaches every other (R at least the image's diagonal): D_c is the whole image wherever class c
        # occurs in it, the dilation by the full element in one reduction instead of (2n - 1)^d shifted ORs.
        present = members.flatten(2).any(2).reshape(members.shape[:2] + (1,) * spatial_ndim)
        dilated = present.expand_as(members)
    else:
        # The element clamped to the image: the same dilation, its cost bounded by the image for any radius.
        dilated = dilate(members, _element_within(radius, element, spacing, shape).to(labels.device))
    dilated = dilated & valid.unsqueeze(1)  # D_c
    space = list(range(2, members.ndim))
    class_weights, areas = class_weights_from_sums(members.sum(space), dilated.sum(space), batch, distributed, dtype)
    per_image = class_weights.expand(labels.shape[0], num_classes) if batch else class_weights
    candidates = dilated * per_image.view(list(per_image.shape) + [1] * spatial_ndim)
    pixel_weights = candidates.amax(dim=1)
    return pixel_weights, class_weights, areas


def dbce_loss(
    input: torch.Tensor,
    labels: torch.Tensor,
    *,
    radius: float = 3.0,
    element: str = "ball",
    spacing: tuple[float, ...] | None = None,
    batch: bool = False,
    ignore_index: int = -100,
    reduction: str = "mean",
    distributed: str = "auto",
) -> torch.Tensor:
    """DBCE on logits (B, C, *S) and labels (B, *S) (checked by the caller); see :class:`torch_medloss.DBCELoss`."""
    num_classes = input.shape[1]
    labels = _widen(labels)
    bad = invalid_label_flag(labels, num_classes, ignore_index)
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < num_classes)
    # Out-of-range labels (possible only for unvalidated CUDA tensors) count as ignored, and the loss becomes NaN.
    labels = torch.where(in_range | ~valid, labels, torch.full_like(labels, ignore_index))
    valid = valid & in_range
    dtype = compute_dtype(input)
    pixel_weights, _, _ = dilated_class_weights(
        labels, num_classes, radius, element, spacing, batch, ignore_index, torch.float64, distributed
    )
    pixel_weights = pixel_weights.to(dtype)
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
    log_p = input.to(dtype).log_softmax(1)
    ce = -log_p.gather(1, safe_labels.unsqueeze(1)).squeeze(1)
    weighted = torch.where(valid, pixel_weights * ce, torch.zeros_like(ce))
    if reduction == "none":
        return poison(weighted, bad)
    return poison(reduce_weighted(weighted.sum(), pixel_weights.sum(), reduction, batch, distributed), bad)


def reduce_weighted(total: torch.Tensor, normalizer: torch.Tensor, reduction: str, batch: bool,
                    distributed: str) -> torch.Tensor:
    """"sum" = sum w*CE; "mean" = sum w*CE / sum w (0 when nothing is valid), over the ranks too when distributed."""
    if _distributed.active(distributed, batch):
        total, normalizer = _distributed.all_reduce_sum(total), _distributed.all_reduce_sum(normalizer)
    if reduction == "sum":
        return total
    return total / normalizer.clamp_min(torch.finfo(normalizer.dtype).tiny)


def balanced_ce_loss(
    input: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch: bool = False,
    ignore_index: int = -100,
    reduction: str = "mean",
    distributed: str = "auto",
) -> torch.Tensor:
    """Balanced cross entropy: DBCE with radius 0, i.e. inverse class frequency weights N / (K * |M_c|)."""
    return dbce_loss(input, labels, radius=0.0, element="ball", spacing=None, batch=batch,
                     ignore_index=ignore_index, reduction=reduction, distributed=distributed)
