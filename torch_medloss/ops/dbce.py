"""The DBCE ops: dilated class masks in one pass over the labels, then one weighted-cross-entropy pass; and the
loss head between them (class weights w_c = N / (K * A_c) from the per-class counts and dilated areas).

Contract: torch_medloss.reference.dbce_ops (the kernels) and torch_medloss.reference.dbce (the loss). Ops:

- ``torch_medloss::dbce_masks`` / ``dbce_ce_fwd`` / ``dbce_ce_bwd``: C++ schema in csrc/dbce.cpp, CPU kernels in
  csrc/cpu, CUDA kernels in csrc/cuda (backends "cpp" and "cuda"); their fake kernels and autograd are registered
  here once the library is loaded.
- ``torch_medloss::dbce_masks_triton`` / ``dbce_ce_fwd_triton`` / ``dbce_ce_bwd_triton``: Triton kernels in
  kernels/dbce.py, imported (and given autograd here) on first use.
- "reference": torch_medloss.reference.dbce_ops through plain autograd.

The weighted cross entropy reads each pixel's class bitmask and takes the largest weight among its bits, so no
weight map exists unless asked for.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch_medloss import _extension
from torch_medloss.ops import _autograd
from torch_medloss.reference import dbce_ops as _reference
from torch_medloss.reference import dbce_ops as contract
from torch_medloss.reference._common import poison
from torch_medloss.reference.dbce import class_weights_from_sums, reduce_weighted

__all__ = ["dbce_ce", "dbce_loss", "dbce_masks", "dilated_class_weights", "fusion_blocker"]

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


# --------------------------------------------------------------------------------------------------------------- ops


def dbce_masks(backend: str, labels: Tensor, num_classes: int, ignore_index: int, element: int, radius: float,
               spacing: list[float]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run the masks op with an already-resolved backend; labels (B, D, H, W)."""
    args = (labels, num_classes, ignore_index, element, float(radius), [float(s) for s in spacing])
    if backend == "reference":
        return _reference.dbce_masks(*args)
    if backend == "triton":
        return _triton_ops()["masks"](*args)
    return torch.ops.torch_medloss.dbce_masks(*args)


def dbce_ce(backend: str, logits: Tensor, labels: Tensor, masks: Tensor, class_weights: Tensor, ignore_index: int,
            write_map: bool) -> tuple[Tensor, Tensor]:
    """Run the weighted cross entropy (differentiable in ``logits``) with an already-resolved backend."""
    args = (logits, labels, masks, class_weights, ignore_index, write_map)
    if backend == "reference":
        return _reference.dbce_ce_fwd(*args)
    if backend == "triton":
        return _triton_ops()["ce_fwd"](*args)
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


def _register(forward: str, backward: str, backward_op) -> None:
    _autograd.register(forward, backward, backward_op, "the fused DBCE cross entropy", num_tensors=4)


def _register_compiled_ops() -> None:
    # Named by csrc/dbce.cpp through set_python_module, as torch requires of C++ ops with Python fake kernels.
    if not torch._C._dispatch_has_kernel("torch_medloss::dbce_ce_fwd"):
        return
    torch.library.register_fake("torch_medloss::dbce_masks", dbce_masks_fake)
    torch.library.register_fake("torch_medloss::dbce_ce_fwd", dbce_ce_fwd_fake)
    torch.library.register_fake("torch_medloss::dbce_ce_bwd", dbce_ce_bwd_fake)
    _register("torch_medloss::dbce_ce_fwd", "torch_medloss::dbce_ce_bwd", torch.ops.torch_medloss.dbce_ce_bwd)


_extension.when_loaded(_register_compiled_ops)

_triton: dict | None = None


def _triton_ops() -> dict:
    """The Triton ops, imported (which imports triton) and given autograd on first use."""
    global _triton
    if _triton is None:
        from torch_medloss.kernels import dbce as kernels  # noqa: F401  (registers the triton_ops)

        ops = torch.ops.torch_medloss
        _register("torch_medloss::dbce_ce_fwd_triton", "torch_medloss::dbce_ce_bwd_triton", ops.dbce_ce_bwd_triton)
        _triton = {"masks": ops.dbce_masks_triton, "ce_fwd": ops.dbce_ce_fwd_triton}
    return _triton
