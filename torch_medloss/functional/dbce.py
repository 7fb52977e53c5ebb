"""DBCE and balanced cross entropy's functional forms, and DBCE's class weights, from a checked options object.

``dbce_family`` checks the tensors, picks the backend (torch_medloss._backend) and runs either the readable
reference (backend "reference") or the fused op, torch_medloss.ops.dbce.dbce_loss (masks, class weights and the
weighted cross entropy).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from torch_medloss import _backend
from torch_medloss import _validation as v
from torch_medloss._options import DBCEOptions
from torch_medloss.ops import dbce as op
from torch_medloss.reference import dbce as reference

__all__ = ["balanced_ce_loss", "dbce_family", "dbce_loss", "dilated_class_weights"]

FUSED = ("triton", "cuda", "cpp", "reference")


def dbce_family(input: Tensor, target: Tensor, options: DBCEOptions) -> Tensor:
    """DBCE and balanced cross entropy from their checked options."""
    v.check_logits(input)
    labels = v.check_dbce_labels(input, target, options.ignore_index, options.validate)
    _check_spacing(options.spacing, labels.ndim - 1)
    blocker = op.fusion_blocker(input, labels, options.backend)
    backend = _backend.resolve("dbce_loss", options.backend, input.device, FUSED, blocker)
    kwargs = {"radius": options.radius, "element": options.element, "spacing": options.spacing,
              "batch": options.batch, "ignore_index": options.ignore_index, "reduction": options.reduction,
              "distributed": options.distributed}
    if backend == "reference":
        if not v.holds(labels.dtype, options.ignore_index):
            labels = labels.long()  # compare values, not wrapped bits, as the fused kernels do
        return reference.dbce_loss(input, labels, **kwargs)
    return op.dbce_loss(input, labels, backend=backend, **kwargs)


def _check_spacing(spacing: tuple[float, ...] | None, spatial_ndim: int) -> None:
    if spacing is not None and len(spacing) != spatial_ndim:
        raise ValueError(f"spacing must have one voxel size per spatial dim ({spatial_ndim}), got {spacing}.")


def dbce_loss(
    input: Tensor,
    target: Tensor,
    radius: float = 3.0,
    element: str = "ball",
    spacing: Sequence[float] | None = None,
    batch: bool = False,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    validate: bool = False,
    distributed: str = "auto",
) -> Tensor:
    """Functional :class:`torch_medloss.DBCELoss`."""
    return dbce_family(input, target, DBCEOptions(radius, element, spacing, batch, ignore_index, reduction, backend,
                                                  validate, distributed))


def balanced_ce_loss(
    input: Tensor,
    target: Tensor,
    batch: bool = False,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    validate: bool = False,
    distributed: str = "auto",
) -> Tensor:
    """Functional :class:`torch_medloss.BalancedCELoss`: DBCE with radius 0 (inverse class frequency weights)."""
    return dbce_family(input, target, DBCEOptions(0.0, "ball", None, batch, ignore_index, reduction, backend,
                                                  validate, distributed))


def dilated_class_weights(
    labels: Tensor,
    num_classes: int,
    radius: float,
    element: str = "ball",
    spacing: Sequence[float] | None = None,
    batch: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """DBCE's weights for labels (B, *S): ``(pixel_weights, class_weights, dilated_areas)``.

    Returns:
        pixel_weights: float32 (B, *S), 0 at ignored pixels.
        class_weights: float32 (B, C), or (C,) with ``batch=True``; 0 for classes absent from the unit.
        dilated_areas: int64 A_c with the shape of ``class_weights``.

    Raises:
        TypeError: non-integer labels or num_classes. ValueError: num_classes < 1, labels outside
        [0, num_classes) other than ``ignore_index`` (always checked: this function's result is read on the host
        anyway).
    """
    options = DBCEOptions(radius, element, spacing, batch, ignore_index, "mean", backend, True)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__} ({num_classes!r}).")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")  # as label_histogram
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}.")
    if labels.ndim < 2:
        raise ValueError(f"labels must have shape (B, *S) with at least one spatial dim, got {tuple(labels.shape)}.")
    v.check_label_map(labels, num_classes, options.ignore_index, True, name="labels")
    _check_spacing(options.spacing, labels.ndim - 1)
    args = (num_classes, options.radius, options.element, options.spacing, options.batch, options.ignore_index)
    blocker = op.fusion_blocker(labels.new_empty((1, num_classes) + (1,) * (labels.ndim - 1)), labels)
    backend = _backend.resolve("dilated_class_weights", options.backend, labels.device, FUSED, blocker)
    if backend == "reference":
        if not v.holds(labels.dtype, options.ignore_index):
            labels = labels.long()
        return reference.dilated_class_weights(labels, *args)
    return op.dilated_class_weights(labels, *args, backend=backend)
