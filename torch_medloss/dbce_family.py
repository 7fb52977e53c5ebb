"""Fused DBCE and balanced CE: dilated class masks in one pass over the labels, then one weighted-CE pass.

Each function has the signature of its reference in torch_medloss.reference.dbce plus ``backend``, the resolved
fused backend ("cpp", "cuda" or "triton"). The class weights w_c = N / (K * A_c) are a tiny head on (B, C) counts
and areas, shared with the reference (``class_weights_from_sums``); the weighted cross entropy reads each pixel's
class bitmask and takes the largest weight among its bits, so no weight map exists unless asked for.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch_medloss.dbce_ops import dbce_ce, dbce_masks
from torch_medloss.reference import dbce_ops as contract
from torch_medloss.reference._common import poison
from torch_medloss.reference.dbce import class_weights_from_sums, reduce_weighted

_ELEMENTS = {"ball": contract.ELEMENT_BALL, "cube": contract.ELEMENT_CUBE}


def fusion_blocker(input: Tensor, labels: object) -> str | None:
    """Why these tensors cannot run on the fused kernels, or None."""
    num_classes = input.shape[1] if input.ndim >= 2 else 0
    if num_classes > contract.MAX_MASK_CLASSES:
        return f"{num_classes} classes do not fit the {contract.MAX_MASK_CLASSES}-bit class masks"
    if input.ndim - 2 > 3:
        return f"{input.ndim - 2} spatial dims; the fused kernels take 1 to 3"
    if input.dtype == torch.float64 and input.device.type != "cpu":
        return "float64 logits are fused on the CPU only"
    return None


def _volume(labels: Tensor) -> Tensor:
    """Labels (B, *S) with 1 to 3 spatial dims as the kernels' (B, D, H, W) view."""
    while labels.ndim < 4:
        labels = labels.unsqueeze(1)
    return labels


def _spacing3(spacing: tuple[float, ...] | None, spatial_ndim: int) -> list[float]:
    spacing = list(spacing) if spacing is not None else [1.0] * spatial_ndim
    return [1.0] * (3 - spatial_ndim) + spacing  # the added size-1 dims have no neighbours: any spacing works


def _weights(backend, labels, num_classes, radius, element, spacing, batch, ignore_index, distributed, dtype):
    masks, counts, areas, invalid = dbce_masks(backend, _volume(labels), num_classes, ignore_index,
                                               _ELEMENTS[element], radius, _spacing3(spacing, labels.ndim - 1))
    class_weights, unit_areas = class_weights_from_sums(counts, areas, batch, distributed, dtype)
    per_image = class_weights.expand(labels.shape[0], num_classes) if batch else class_weights
    return masks, per_image, class_weights, unit_areas, invalid


def dilated_class_weights(
    labels: Tensor,
    num_classes: int,
    radius: float,
    element: str = "ball",
    spacing: tuple[float, ...] | None = None,
    batch: bool = False,
    ignore_index: int = -100,
    *,
    backend: str,
    distributed: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused reference.dbce.dilated_class_weights: (pixel_weights (B, *S) float32, class_weights, areas)."""
    masks, per_image, class_weights, areas, _ = _weights(backend, labels, num_classes, radius, element, spacing,
                                                          batch, ignore_index, distributed, torch.float64)
    pixel = contract.pixel_weights(masks.flatten(1), per_image).view(labels.shape)
    return pixel.float(), class_weights.float(), areas


def dbce_loss(
    input: Tensor,
    labels: Tensor,
    *,
    backend: str,
    radius: float = 3.0,
    element: str = "ball",
    spacing: tuple[float, ...] | None = None,
    batch: bool = False,
    ignore_index: int = -100,
    reduction: str = "mean",
    distributed: str = "auto",
) -> Tensor:
    """Fused reference.dbce.dbce_loss on logits (B, C, *S) and checked labels (B, *S)."""
    accumulator = torch.float64 if input.dtype == torch.float64 else torch.float32
    masks, per_image, _, _, invalid = _weights(backend, labels, input.shape[1], radius, element, spacing, batch,
                                               ignore_index, distributed, torch.float64)
    sums, weighted = dbce_ce(backend, input.flatten(2), labels.reshape(labels.shape[0], -1), masks.flatten(1),
                             per_image.to(accumulator), ignore_index, reduction == "none")
    bad = invalid.sum() > 0
    if reduction == "none":
        return poison(weighted.view(labels.shape), bad)
    return poison(reduce_weighted(sums[:, 0].sum(), sums[:, 1].sum(), reduction, batch, distributed), bad)


def balanced_ce_loss(input: Tensor, labels: Tensor, *, backend: str, batch: bool = False, ignore_index: int = -100,
                     reduction: str = "mean", distributed: str = "auto") -> Tensor:
    """Fused reference.dbce.balanced_ce_loss: DBCE with radius 0."""
    return dbce_loss(input, labels, backend=backend, radius=0.0, element="ball", spacing=None, batch=batch,
                     ignore_index=ignore_index, reduction=reduction, distributed=distributed)
