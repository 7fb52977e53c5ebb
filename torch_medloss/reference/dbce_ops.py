"""Reference of the fused DBCE kernels: dilated class masks, and the weighted cross entropy forward and backward.

This is the contract the C++, CUDA and Triton kernels implement (``torch_medloss::dbce_masks``, ``dbce_ce_fwd``,
``dbce_ce_bwd``), in plain PyTorch. The definitions are those of torch_medloss.reference.dbce.

``dbce_masks``: labels (B, D, H, W) of any integer dtype (1-D and 2-D maps are passed with leading size-1 spatial
dims). For each pixel i, bit c of ``masks[i]`` is set when i is valid and i lies in D_c, the dilation of class c's
valid pixels by the element (offsets o with sum_k (o_k s_k)^2 <= R^2 for "ball", max_k |o_k s_k| <= R for "cube",
both up to the relative tolerance 1e-9 of structuring_element), inside its own image. The mask dtype holds C bits:
uint8 for C <= 8, int16 <= 16, int32 <= 32, int64 <= 64 (bit 63 is the sign bit; only bit operations touch it).
Also returned, per image: counts[b, c] = |M_c|, areas[b, c] = |D_c| (int64) and invalid[b] = the number of labels
neither in [0, C) nor ignore_index (such pixels count as ignored: they are in no M_c and no D_c).

``dbce_ce_fwd``: logits (B, C, S) (any strides), labels (B, S), masks (B, S), class_weights (B, C) float32.
w_i = max{ class_weights[b, c] : bit c set in masks[i] } (0 for an empty mask), CE_i = logsumexp_c x_ic - x_i,L_i.
Returns sums (B, 2) = [sum_i w_i CE_i, sum_i w_i] (float32, float64 for float64 logits) and, with ``write_map``,
the (B, S) map w*CE (else an empty tensor). ``dbce_ce_bwd``: d(<grad_sums, sums> + <grad_map, map>)/d logits =
w_i (grad_sums[b, 0] + grad_map[b, i]) (softmax(x_i)_j - [j = L_i]); sum w has no gradient.
"""

from __future__ import annotations

import torch

from torch_medloss import _contract as K
from torch_medloss._contract import ELEMENT_BALL, ELEMENT_CUBE, MAX_MASK_CLASSES  # noqa: F401  (re-exported)
from torch_medloss.reference.dbce import _element_within, class_weights_from_sums, dilate, reduce_weighted

_MASK_DTYPES = ((8, torch.uint8), (16, torch.int16), (32, torch.int32), (64, torch.int64))


def mask_dtype(num_classes: int) -> torch.dtype:
    """The narrowest integer dtype with a bit per class."""
    for bits, dtype in _MASK_DTYPES:
        if num_classes <= bits:
            return dtype
    raise ValueError(f"dbce_masks: at most {MAX_MASK_CLASSES} classes fit a mask, got {num_classes}.")


def dbce_masks(
    labels: torch.Tensor, num_classes: int, ignore_index: int, element: int, radius: float, spacing: list[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masks (B, D, H, W), counts (B, C), areas (B, C), invalid (B,)) for labels (B, D, H, W)."""
    wide = labels.long()
    in_range = (wide >= 0) & (wide < num_classes)
    ignored = wide == ignore_index
    invalid = (~in_range & ~ignored).flatten(1).sum(1)
    valid = in_range & ~ignored
    classes = torch.arange(num_classes, device=labels.device).view(1, -1, 1, 1, 1)
    members = (wide.unsqueeze(1) == classes) & valid.unsqueeze(1)
    # The element clamped to the image (as the kernels): its cost stays bounded by the image for any radius.
    offsets = _element_within(radius, "ball" if element == ELEMENT_BALL else "cube", tuple(spacing),
                              tuple(labels.shape[1:]))
    dilated = dilate(members, offsets.to(labels.device)) & valid.unsqueeze(1)
    bits = torch.ones((), dtype=torch.int64, device=labels.device) << torch.arange(num_classes, device=labels.device)
    masks = (dilated.long() * bits.view(1, -1, 1, 1, 1)).sum(1)  # disjoint bits: the sum is the OR
    return (masks.to(mask_dtype(num_classes)), members.flatten(2).sum(2), dilated.flatten(2).sum(2), invalid)


def pixel_weights(masks: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """w_i = max of the class weights whose bit is set in masks[i] (0 for an empty mask); masks (B, S)."""
    num_classes = class_weights.shape[1]
    bits = (masks.long().unsqueeze(1) >> torch.arange(num_classes, device=masks.device).view(1, -1, 1)) & 1
    return (bits * class_weights.unsqueeze(-1)).amax(1)


def dbce_ce_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor,
    class_weights: torch.Tensor,
    ignore_index: int,
    write_map: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums (B, 2), map (B, S) or empty): differentiable in ``logits``."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    x = logits.to(acc)
    num_classes = x.shape[1]
    wide = labels.long()
    valid = (wide >= 0) & (wide < num_classes) & (wide != ignore_index)
    w = torch.where(valid, pixel_weights(masks, class_weights.to(acc)), torch.zeros((), dtype=acc, device=x.device))
    safe = torch.where(valid, wide, torch.zeros_like(wide))
    ce = torch.logsumexp(x, 1) - x.gather(1, safe.unsqueeze(1)).squeeze(1)
    weighted = torch.where(valid, w * ce, torch.zeros_like(ce))
    sums = torch.stack([weighted.sum(1), w.sum(1)], dim=1)
    return sums, (weighted if write_map else x.new_empty(0))


def dbce_ce_bwd(
    grad_sums: torch.Tensor,
    grad_map: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor,
    class_weights: torch.Tensor,
    ignore_index: int,
    write_map: bool,
) -> torch.Tensor:
    """The gradient of the forward, in logits' dtype: the ground truth of the backward kernels."""
    with torch.enable_grad():
        leaf = logits.detach().to(torch.promote_types(logits.dtype, torch.float32)).requires_grad_(True)
        sums, weighted = dbce_ce_fwd(leaf, labels, masks, class_weights, ignore_index, write_map)
        total = (sums * grad_sums.to(sums)).sum()
        if write_map:
            total = total + (weighted * grad_map.to(weighted)).sum()
        (grad,) = torch.autograd.grad(total, leaf)
    return grad.to(logits.dtype)


def dbce_loss_fwd(logits: torch.Tensor, labels: torch.Tensor, codes: list[int], scalars: list[float]) -> torch.Tensor:
    """The dbce_loss op: DBCE of logits (B, C, S) and labels (B, D, H, W) (S = D H W), shape
    _contract.dbce_loss_shape: the masks, the class weights of each unit, the weighted cross entropy, the reduction;
    NaN where a label is neither a class nor ignore_index."""
    from torch_medloss.reference._common import poison

    batch, num_classes, num_pixels = logits.shape
    ignore_index = codes[K.DBCE_CODE_IGNORE_INDEX]
    spacing = list(scalars[K.DBCE_SCALAR_SPACING:K.DBCE_SCALAR_SPACING + 3])
    masks, counts, areas, invalid = dbce_masks(labels, num_classes, ignore_index, codes[K.DBCE_CODE_ELEMENT],
                                               scalars[K.DBCE_SCALAR_RADIUS], spacing)
    unit_batch = bool(codes[K.DBCE_CODE_BATCH])
    class_weights, _ = class_weights_from_sums(counts, areas, unit_batch, "off", torch.float64)
    per_image = class_weights.expand(batch, num_classes) if unit_batch else class_weights
    accumulator = torch.promote_types(logits.dtype, torch.float32)
    reduction = codes[K.DBCE_CODE_REDUCTION]
    sums, weighted = dbce_ce_fwd(logits, labels.reshape(batch, num_pixels), masks.reshape(batch, num_pixels),
                                 per_image.to(accumulator), ignore_index, reduction == K.REDUCTION_NONE)
    bad = invalid.sum() > 0
    if reduction == K.REDUCTION_NONE:
        return poison(weighted, bad)
    mode = "mean" if reduction == K.REDUCTION_MEAN else "sum"
    return poison(reduce_weighted(sums[:, 0].sum(), sums[:, 1].sum(), mode, unit_batch, "off"), bad)
