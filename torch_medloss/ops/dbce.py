"""The DBCE op: registration, autograd and the choice of kernel for a resolved backend.

Contract: torch_medloss.reference.dbce_ops (the kernels and the loss op) and torch_medloss.reference.dbce (the
readable loss). Ops, each with a C++ schema (csrc/dbce.cpp: CPU kernels in csrc/cpu, CUDA kernels in csrc/cuda;
backends "cpp" and "cuda"), a Triton version (kernels/dbce.py, ``*_triton``) and a reference:

- ``dbce_loss_fwd`` / ``dbce_loss_bwd``: the whole loss in one op, the path of DBCELoss and BalancedCELoss:
  dilated class masks in one pass over the labels (two in 3-D), class weights w_c = N / (K A_c), one weighted
  cross-entropy pass; returns (loss, masks, class_weights, norm), the last three read by the backward.
- ``dbce_masks``, ``dbce_ce_fwd`` / ``dbce_ce_bwd``: the pieces, for the calls that must stop between them:
  ``dilated_class_weights`` (which returns the weights) and batch DBCE under DDP (counts and areas are summed over
  the ranks before the weights).
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch_medloss import _contract as K
from torch_medloss import _extension
from torch_medloss.ops import _autograd
from torch_medloss.reference import dbce_ops as _reference
from torch_medloss.reference._common import poison
from torch_medloss.reference.dbce import class_weights_from_sums, reduce_weighted

__all__ = ["dbce_ce", "dbce_loss", "dbce_masks", "dilated_class_weights", "fusion_blocker"]

_ELEMENTS = {"ball": K.ELEMENT_BALL, "cube": K.ELEMENT_CUBE}
_REDUCTIONS = {"mean": K.REDUCTION_MEAN, "sum": K.REDUCTION_SUM, "none": K.REDUCTION_NONE}


def fusion_blocker(input: Tensor, labels: object, backend: str = "auto") -> str | None:
    """Why these tensors cannot run on the fused kernels (or on the named ``backend``), or None."""
    num_classes = input.shape[1] if input.ndim >= 2 else 0
    if num_classes > K.MAX_MASK_CLASSES:
        return f"{num_classes} classes do not fit the {K.MAX_MASK_CLASSES}-bit class masks"
    if input.ndim - 2 > 3:
        return f"{input.ndim - 2} spatial dims; the fused kernels take 1 to 3"
    if input.dtype == torch.float64 and (input.device.type != "cpu" or backend == "triton"):
        return "float64 logits are fused by the C++ CPU kernels only (Triton and CUDA take float32, bfloat16, float16)"
    return None


def _volume(labels: Tensor) -> Tensor:
    """Labels (B, *S) with 1 to 3 spatial dims as the kernels' (B, D, H, W) view."""
    while labels.ndim < 4:
        labels = labels.unsqueeze(1)
    return labels


def _spacing3(spacing: tuple[float, ...] | None, spatial_ndim: int) -> list[float]:
    spacing = list(spacing) if spacing is not None else [1.0] * spatial_ndim
    return [1.0] * (3 - spatial_ndim) + spacing  # the added size-1 dims have no neighbours: any spacing works


# ------------------------------------------------------------------------------------------------------ the loss


def dbce_loss(input: Tensor, labels: Tensor, *, backend: str, radius: float, element: str,
              spacing: tuple[float, ...] | None, batch: bool, ignore_index: int, reduction: str,
              distributed: str) -> Tensor:
    """DBCE on logits (B, C, *S) and checked labels (B, *S), on a resolved fused backend (or "reference": the op's
    reference, reference.dbce_ops.dbce_loss_fwd)."""
    from torch_medloss import _distributed

    if _distributed.active(distributed, batch):
        return _dbce_loss_composed(input, labels, backend, radius, element, spacing, ignore_index, reduction,
                                   distributed)
    codes = [0] * K.DBCE_NUM_CODES
    codes[K.DBCE_CODE_ELEMENT] = _ELEMENTS[element]
    codes[K.DBCE_CODE_BATCH] = int(batch)
    codes[K.DBCE_CODE_REDUCTION] = _REDUCTIONS[reduction]
    codes[K.DBCE_CODE_IGNORE_INDEX] = ignore_index
    scalars = [float(radius), *_spacing3(spacing, labels.ndim - 1)]
    logits, volume = input.flatten(2), _volume(labels)
    if backend == "reference":
        loss = _reference.dbce_loss_fwd(logits, volume, codes, scalars)
    elif backend == "triton":
        loss = _triton_ops().dbce_loss_fwd_triton(logits, volume, codes, scalars)[0]
    else:
        loss = torch.ops.torch_medloss.dbce_loss_fwd(logits, volume, codes, scalars)[0]
    return loss.view(labels.shape) if reduction == "none" else loss


def _dbce_loss_composed(input, labels, backend, radius, element, spacing, ignore_index, reduction, distributed):
    """Batch DBCE under DDP: the counts, areas and normalizer are summed over the ranks between the pieces."""
    accumulator = torch.float64 if input.dtype == torch.float64 else torch.float32
    masks, per_image, _, _, invalid = _weights(backend, labels, input.shape[1], radius, element, spacing, True,
                                               ignore_index, distributed, torch.float64)
    sums, weighted = dbce_ce(backend, input.flatten(2), labels.reshape(labels.shape[0], -1), masks.flatten(1),
                             per_image.to(accumulator), ignore_index, reduction == "none")
    bad = invalid.sum() > 0
    if reduction == "none":
        return poison(weighted.view(labels.shape), bad)
    return poison(reduce_weighted(sums[:, 0].sum(), sums[:, 1].sum(), reduction, True, distributed), bad)


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
    pixel = _reference.pixel_weights(masks.flatten(1), per_image).view(labels.shape)
    return pixel.float(), class_weights.float(), areas


# -------------------------------------------------------------------------------------------------- the pieces


def dbce_masks(backend: str, labels: Tensor, num_classes: int, ignore_index: int, element: int, radius: float,
               spacing: list[float]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(masks, counts, areas, invalid) of labels (B, D, H, W) on a resolved backend."""
    args = (labels, num_classes, ignore_index, element, float(radius), [float(s) for s in spacing])
    if backend == "reference":
        return _reference.dbce_masks(*args)
    if backend == "triton":
        return _triton_ops().dbce_masks_triton(*args)
    return torch.ops.torch_medloss.dbce_masks(*args)


def dbce_ce(backend: str, logits: Tensor, labels: Tensor, masks: Tensor, class_weights: Tensor, ignore_index: int,
            write_map: bool) -> tuple[Tensor, Tensor]:
    """The weighted cross entropy (differentiable in ``logits``) on a resolved backend."""
    args = (logits, labels, masks, class_weights, ignore_index, write_map)
    if backend == "reference":
        return _reference.dbce_ce_fwd(*args)
    if backend == "triton":
        return _triton_ops().dbce_ce_fwd_triton(*args)
    return torch.ops.torch_medloss.dbce_ce_fwd(*args)


# ------------------------------------------------------------------------------------------- fake kernels (shapes)


def dbce_masks_fake(labels, num_classes, ignore_index, element, radius, spacing):
    if labels.dim() != 4:
        raise ValueError(f"dbce_masks: labels must be (B, D, H, W), got shape {tuple(labels.shape)}.")
    batch = labels.shape[0]
    return (
        labels.new_empty(labels.shape, dtype=_reference.mask_dtype(num_classes)),
        labels.new_empty((batch, num_classes), dtype=torch.int64),
        labels.new_empty((batch, num_classes), dtype=torch.int64),
        labels.new_empty((batch,), dtype=torch.int64),
    )


def _accumulator(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def dbce_ce_fwd_fake(logits, labels, masks, class_weights, ignore_index, write_map):
    if logits.dim() != 3 or tuple(labels.shape) != (logits.shape[0], logits.shape[2]):
        raise ValueError(f"dbce_ce_fwd: logits (B, C, S) and labels (B, S) expected, got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}.")
    dtype = _accumulator(logits)
    batch, _, pixels = logits.shape
    map_shape = (batch, pixels) if write_map else (0,)
    return logits.new_empty((batch, 2), dtype=dtype), logits.new_empty(map_shape, dtype=dtype)


def dbce_ce_bwd_fake(grad_sums, grad_map, logits, labels, masks, class_weights, ignore_index, write_map):
    return torch.empty_like(logits)


def dbce_loss_fwd_fake(logits, labels, codes, scalars):
    if logits.dim() != 3 or labels.dim() != 4:
        raise ValueError(f"dbce_loss_fwd: logits (B, C, S) and labels (B, D, H, W) expected, got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}.")
    batch, num_classes, pixels = logits.shape
    dtype = _accumulator(logits)
    return (logits.new_empty(K.dbce_loss_shape(batch, pixels, codes), dtype=dtype),
            logits.new_empty((batch, pixels), dtype=_reference.mask_dtype(num_classes)),
            logits.new_empty((batch, num_classes), dtype=dtype), logits.new_empty((1,), dtype=dtype))


def dbce_loss_bwd_fake(grad_loss, masks, class_weights, norm, logits, labels, codes, scalars):
    return torch.empty_like(logits)


# ------------------------------------------------------------------------------------------------------- autograd

_CE = "the fused DBCE cross entropy"


def _register(prefix: str, suffix: str, ops) -> None:
    _autograd.register(f"{prefix}dbce_ce_fwd{suffix}", f"{prefix}dbce_ce_bwd{suffix}",
                       getattr(ops, f"dbce_ce_bwd{suffix}"), _CE, num_tensors=4)
    # The loss op's backward takes the loss's gradient and the forward's masks, class weights and norm.
    _autograd.register(f"{prefix}dbce_loss_fwd{suffix}", f"{prefix}dbce_loss_bwd{suffix}",
                       getattr(ops, f"dbce_loss_bwd{suffix}"), "the fused DBCE loss", num_tensors=2,
                       saved_outputs=(1, 2, 3), used_grads=(0,))


def _register_compiled_ops() -> None:
    """Fake kernels and autograd of the C++ ops, once the library is loaded. csrc/dbce.cpp names this module with
    set_python_module, as torch requires of C++ ops with Python fake kernels."""
    if not torch._C._dispatch_has_kernel("torch_medloss::dbce_loss_fwd"):
        return
    for name, fake in (("dbce_masks", dbce_masks_fake), ("dbce_ce_fwd", dbce_ce_fwd_fake),
                       ("dbce_ce_bwd", dbce_ce_bwd_fake), ("dbce_loss_fwd", dbce_loss_fwd_fake),
                       ("dbce_loss_bwd", dbce_loss_bwd_fake)):
        torch.library.register_fake(f"torch_medloss::{name}", fake)
    _register("torch_medloss::", "", torch.ops.torch_medloss)


_extension.when_loaded(_register_compiled_ops)

_triton = None


def _triton_ops():
    """torch.ops.torch_medloss with the Triton ops registered (importing triton) and given autograd, on first use."""
    global _triton
    if _triton is None:
        from torch_medloss.kernels import dbce as kernels  # noqa: F401  (registers the triton_ops)

        ops = torch.ops.torch_medloss
        _register("torch_medloss::", "_triton", ops)
        _triton = ops
    return _triton
