"""Functional forms of every loss: check the arguments, pick the backend (torch_medloss._backend), compute.

Each public function has a private ``_<name>_options`` that validates and normalizes the options (the loss modules
call it once, in ``__init__``) and a private ``_<name>`` that checks the tensors and runs the chosen backend with
already-normalized options (the modules call it in ``forward``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from torch_medloss import _backend, _distributed, dbce_family, dice_family
from torch_medloss import _validation as v
from torch_medloss.concat_conv import concat_conv2d
from torch_medloss.frequency_split import frequency_split
from torch_medloss.label_histogram import label_histogram
from torch_medloss.reference import dbce as dbce_reference
from torch_medloss.reference import dice as dice_reference
from torch_medloss.reference.dice_ce import dice_ce_loss as _dice_ce_reference
from torch_medloss.reference.focal import focal_loss as _focal_reference

__all__ = [
    "balanced_ce_loss",
    "concat_conv2d",
    "dbce_loss",
    "dice_ce_loss",
    "dice_loss",
    "dilated_class_weights",
    "focal_loss",
    "frequency_split",
    "generalized_dice_loss",
    "label_histogram",
    "pm_dice_loss",
    "tversky_loss",
]

FUSED = ("triton", "cuda", "cpp", "reference")
# The backends each op has; "auto" picks among them by device (torch_medloss._backend).
BACKENDS = {
    "dice_loss": FUSED,
    "pm_dice_loss": FUSED,
    "generalized_dice_loss": FUSED,
    "tversky_loss": FUSED,
    "dice_ce_loss": FUSED,
    "focal_loss": ("reference",),
    "dbce_loss": FUSED,
    "dilated_class_weights": FUSED,
}


def _run(op: str, implementations: dict[str, Callable], backend: str, input: torch.Tensor, *args, **kwargs):
    chosen = _backend.resolve(op, backend, input.device, BACKENDS[op])
    return implementations[chosen](input, *args, **kwargs)


def _run_dice_family(op: str, reference: Callable, fused: Callable, backend: str, input: torch.Tensor,
                     target: torch.Tensor, options: dict) -> torch.Tensor:
    """Dice-family ops: one fused kernel pass plus a small head, unless these options cannot be fused."""
    v.check_logits(input)
    blocker = dice_family.fusion_blocker(input, target, options, with_ce=op == "dice_ce_loss")
    chosen = _backend.resolve(op, backend, input.device, BACKENDS[op], blocker)
    if chosen == "reference":
        return reference(input, target, **options)
    return fused(input, target, backend=chosen, **options)


# ----------------------------------------------------------------------------------------------- Dice family options


def _activation_options(sigmoid, softmax, other_act) -> dict:
    v.check_activation(sigmoid, softmax, other_act)
    return {"sigmoid": bool(sigmoid), "softmax": bool(softmax), "other_act": other_act}


def _common_options(include_background, to_onehot_y, reduction, smooth_nr, smooth_dr, batch, validate,
                    distributed) -> dict:
    return {
        "distributed": _distributed.check_distributed(distributed),
        "include_background": v.check_bool("include_background", include_background),
        "to_onehot_y": v.check_bool("to_onehot_y", to_onehot_y),
        "reduction": v.check_reduction(reduction),
        "smooth_nr": v.check_float("smooth_nr", smooth_nr),
        "smooth_dr": v.check_float("smooth_dr", smooth_dr),
        "batch": v.check_bool("batch", batch),
        "validate": v.check_bool("validate", validate),
    }


def _dice_options(
    include_background=True,
    to_onehot_y=False,
    sigmoid=False,
    softmax=False,
    other_act=None,
    squared_pred=False,
    jaccard=False,
    reduction="mean",
    smooth_nr=1e-5,
    smooth_dr=1e-5,
    batch=False,
    weight=None,
    soft_label=False,
    ignore_index=None,
    validate=False,
    distributed="auto",
) -> dict:
    return {
        **_common_options(include_background, to_onehot_y, reduction, smooth_nr, smooth_dr, batch, validate,
                           distributed),
        **_activation_options(sigmoid, softmax, other_act),
        "squared_pred": v.check_bool("squared_pred", squared_pred),
        "jaccard": v.check_bool("jaccard", jaccard),
        "weight": v.per_class_values("weight", weight),
        "soft_label": v.check_bool("soft_label", soft_label),
        "ignore_index": v.check_ignore_index(ignore_index),
    }


def _pm_dice_options(gamma=2.0, squared_pred=True, **dice_options) -> dict:
    if "jaccard" in dice_options:
        raise TypeError("PM Dice has no jaccard option.")
    options = _dice_options(squared_pred=squared_pred, **dice_options)
    options["gamma"] = v.per_class_values("gamma", gamma, allow_none=False)
    return options


def _generalized_dice_options(
    include_background=True,
    to_onehot_y=False,
    sigmoid=False,
    softmax=False,
    other_act=None,
    w_type="square",
    reduction="mean",
    smooth_nr=1e-5,
    smooth_dr=1e-5,
    batch=False,
    soft_label=False,
    validate=False,
    distributed="auto",
) -> dict:
    w_type = getattr(w_type, "value", w_type)
    if w_type not in ("square", "simple", "uniform"):
        raise ValueError(f"w_type must be one of ('square', 'simple', 'uniform'), got {w_type!r}.")
    return {
        **_common_options(include_background, to_onehot_y, reduction, smooth_nr, smooth_dr, batch, validate,
                           distributed),
        **_activation_options(sigmoid, softmax, other_act),
        "w_type": w_type,
        "soft_label": v.check_bool("soft_label", soft_label),
    }


def _tversky_options(
    include_background=True,
    to_onehot_y=False,
    sigmoid=False,
    softmax=False,
    other_act=None,
    alpha=0.5,
    beta=0.5,
    reduction="mean",
    smooth_nr=1e-5,
    smooth_dr=1e-5,
    batch=False,
    soft_label=False,
    ignore_index=None,
    validate=False,
    distributed="auto",
) -> dict:
    return {
        **_common_options(include_background, to_onehot_y, reduction, smooth_nr, smooth_dr, batch, validate,
                           distributed),
        **_activation_options(sigmoid, softmax, other_act),
        "alpha": v.check_float("alpha", alpha),
        "beta": v.check_float("beta", beta),
        "soft_label": v.check_bool("soft_label", soft_label),
        "ignore_index": v.check_ignore_index(ignore_index),
    }


def _dice_ce_options(
    include_background=True,
    to_onehot_y=False,
    sigmoid=False,
    softmax=False,
    other_act=None,
    squared_pred=False,
    jaccard=False,
    reduction="mean",
    smooth_nr=1e-5,
    smooth_dr=1e-5,
    batch=False,
    weight=None,
    lambda_dice=1.0,
    lambda_ce=1.0,
    label_smoothing=0.0,
    validate=False,
    distributed="auto",
) -> dict:
    options = _common_options(include_background, to_onehot_y, "mean", smooth_nr, smooth_dr, batch, validate,
                              distributed)
    # DiceCELoss has no "none": its Dice part reduces over space, its CE part does not.
    options["reduction"] = v.check_reduction(reduction, ("mean", "sum"))
    label_smoothing = v.check_nonnegative_float("label_smoothing", label_smoothing)
    if label_smoothing > 1:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}.")
    return {
        **options,
        **_activation_options(sigmoid, softmax, other_act),
        "squared_pred": v.check_bool("squared_pred", squared_pred),
        "jaccard": v.check_bool("jaccard", jaccard),
        "weight": v.per_class_values("weight", weight),
        "lambda_dice": v.check_nonnegative_float("lambda_dice", lambda_dice),
        "lambda_ce": v.check_nonnegative_float("lambda_ce", lambda_ce),
        "label_smoothing": label_smoothing,
    }


def _focal_options(
    include_background=True,
    to_onehot_y=False,
    gamma=2.0,
    alpha=None,
    weight=None,
    reduction="mean",
    use_softmax=False,
    ignore_index=None,
    validate=False,
) -> dict:
    alpha_values = v.per_class_values("alpha", alpha)
    if alpha_values is not None and (alpha_values > 1).any():
        raise ValueError(f"alpha must be in [0, 1], got {alpha_values.tolist()}.")
    return {
        "include_background": v.check_bool("include_background", include_background),
        "to_onehot_y": v.check_bool("to_onehot_y", to_onehot_y),
        "gamma": v.check_nonnegative_float("gamma", gamma),
        "alpha": alpha_values,
        "weight": v.per_class_values("weight", weight),
        "reduction": v.check_reduction(reduction),
        "use_softmax": v.check_bool("use_softmax", use_softmax),
        "ignore_index": v.check_ignore_index(ignore_index),
        "validate": v.check_bool("validate", validate),
    }


def _dbce_options(radius=3.0, element="ball", spacing=None, batch=False, ignore_index=-100, reduction="mean",
                  validate=False, distributed="auto") -> dict:
    if element not in ("ball", "cube"):
        raise ValueError(f"element must be 'ball' or 'cube', got {element!r}.")
    if spacing is not None:
        if isinstance(spacing, (str, bytes)) or not isinstance(spacing, Sequence):
            raise TypeError(f"spacing must be None or a sequence of voxel sizes, got {type(spacing).__name__}.")
        spacing = tuple(v.check_nonnegative_float("spacing", s) for s in spacing)
        if any(s == 0 for s in spacing):
            raise ValueError(f"spacing must hold voxel sizes > 0, got {spacing}.")
    return {
        "radius": v.check_nonnegative_float("radius", radius),
        "element": element,
        "spacing": spacing,
        "batch": v.check_bool("batch", batch),
        "ignore_index": v.check_ignore_index(ignore_index, allow_none=False),
        "reduction": v.check_reduction(reduction),
        "validate": v.check_bool("validate", validate),
        "distributed": _distributed.check_distributed(distributed),
    }


# ------------------------------------------------------------------------------------------------ tensor-side entry


def _dice(input, target, options: dict, backend: str) -> torch.Tensor:
    return _run_dice_family("dice_loss", dice_reference.dice_loss, dice_family.dice_loss, backend, input, target,
                            options)


def _pm_dice(input, target, options: dict, backend: str) -> torch.Tensor:
    return _run_dice_family("pm_dice_loss", dice_reference.pm_dice_loss, dice_family.pm_dice_loss, backend, input,
                            target, options)


def _generalized_dice(input, target, options: dict, backend: str) -> torch.Tensor:
    return _run_dice_family("generalized_dice_loss", dice_reference.generalized_dice_loss,
                            dice_family.generalized_dice_loss, backend, input, target, options)


def _tversky(input, target, options: dict, backend: str) -> torch.Tensor:
    return _run_dice_family("tversky_loss", dice_reference.tversky_loss, dice_family.tversky_loss, backend, input,
                            target, options)


def _dice_ce(input, target, options: dict, backend: str) -> torch.Tensor:
    return _run_dice_family("dice_ce_loss", _dice_ce_reference, dice_family.dice_ce_loss, backend, input, target,
                            options)


def _focal(input, target, options: dict, backend: str) -> torch.Tensor:
    v.check_logits(input)
    return _run("focal_loss", {"reference": _focal_reference}, backend, input, target, **options)


def _check_dbce_labels(input: torch.Tensor, labels: object, ignore_index: int, validate: bool) -> torch.Tensor:
    """Labels (B, *S) or (B, 1, *S) matching logits (B, C, *S); returns them as (B, *S)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of class labels, got {type(labels).__name__}.")
    v.check_same_device(input, labels)
    if labels.ndim == input.ndim and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.shape != input.shape[:1] + input.shape[2:]:
        raise ValueError(
            f"target must be labels of shape (B, *S) or (B, 1, *S) matching input (B, C, *S): input has shape "
            f"{tuple(input.shape)}, target has shape {tuple(labels.shape)}."
        )
    v.check_label_map(labels, input.shape[1], ignore_index, validate)
    return labels


def _check_spacing(spacing: tuple[float, ...] | None, spatial_ndim: int) -> None:
    if spacing is not None and len(spacing) != spatial_ndim:
        raise ValueError(f"spacing must have one voxel size per spatial dim ({spatial_ndim}), got {spacing}.")


def _dbce(input, target, options: dict, backend: str) -> torch.Tensor:
    v.check_logits(input)
    options = dict(options)
    validate = options.pop("validate")
    labels = _check_dbce_labels(input, target, options["ignore_index"], validate)
    _check_spacing(options["spacing"], labels.ndim - 1)
    blocker = dbce_family.fusion_blocker(input, labels)
    chosen = _backend.resolve("dbce_loss", backend, input.device, BACKENDS["dbce_loss"], blocker)
    if chosen == "reference":
        return dbce_reference.dbce_loss(input, labels, **options)
    return dbce_family.dbce_loss(input, labels, backend=chosen, **options)


# ------------------------------------------------------------------------------------------------- public functions


def dice_loss(input: torch.Tensor, target: torch.Tensor, *, backend: str = "auto", **options) -> torch.Tensor:
    """Functional :class:`torch_medloss.DiceLoss`: same keyword options (MONAI 1.6.1's), plus ``backend``."""
    return _dice(input, target, _dice_options(**options), _backend.check_backend_name(backend))


def pm_dice_loss(input: torch.Tensor, target: torch.Tensor, *, backend: str = "auto", **options) -> torch.Tensor:
    """Functional :class:`torch_medloss.PMDiceLoss` (``gamma=2.0``, ``squared_pred=True`` by default)."""
    return _pm_dice(input, target, _pm_dice_options(**options), _backend.check_backend_name(backend))


def generalized_dice_loss(
    input: torch.Tensor, target: torch.Tensor, *, backend: str = "auto", **options
) -> torch.Tensor:
    """Functional :class:`torch_medloss.GeneralizedDiceLoss`."""
    return _generalized_dice(input, target, _generalized_dice_options(**options), _backend.check_backend_name(backend))


def tversky_loss(input: torch.Tensor, target: torch.Tensor, *, backend: str = "auto", **options) -> torch.Tensor:
    """Functional :class:`torch_medloss.TverskyLoss`."""
    return _tversky(input, target, _tversky_options(**options), _backend.check_backend_name(backend))


def dice_ce_loss(input: torch.Tensor, target: torch.Tensor, *, backend: str = "auto", **options) -> torch.Tensor:
    """Functional :class:`torch_medloss.DiceCELoss`."""
    return _dice_ce(input, target, _dice_ce_options(**options), _backend.check_backend_name(backend))


def focal_loss(input: torch.Tensor, target: torch.Tensor, *, backend: str = "auto", **options) -> torch.Tensor:
    """Functional :class:`torch_medloss.FocalLoss` (on logits)."""
    return _focal(input, target, _focal_options(**options), _backend.check_backend_name(backend))


def dbce_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    radius: float = 3.0,
    element: str = "ball",
    spacing: Sequence[float] | None = None,
    batch: bool = False,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    validate: bool = False,
    distributed: str = "auto",
) -> torch.Tensor:
    """Functional :class:`torch_medloss.DBCELoss`."""
    options = _dbce_options(radius, element, spacing, batch, ignore_index, reduction, validate, distributed)
    return _dbce(input, target, options, _backend.check_backend_name(backend))


def balanced_ce_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    batch: bool = False,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    validate: bool = False,
    distributed: str = "auto",
) -> torch.Tensor:
    """Functional :class:`torch_medloss.BalancedCELoss`: DBCE with radius 0 (inverse class frequency weights)."""
    options = _dbce_options(0.0, "ball", None, batch, ignore_index, reduction, validate, distributed)
    return _dbce(input, target, options, _backend.check_backend_name(backend))


def dilated_class_weights(
    labels: torch.Tensor,
    num_classes: int,
    radius: float,
    element: str = "ball",
    spacing: Sequence[float] | None = None,
    batch: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DBCE's weights for labels (B, *S): ``(pixel_weights, class_weights, dilated_areas)``.

    Returns:
        pixel_weights: float32 (B, *S), 0 at ignored pixels.
        class_weights: float32 (B, C), or (C,) with ``batch=True``; 0 for classes absent from the unit.
        dilated_areas: int64 A_c with the shape of ``class_weights``.

    Raises:
        TypeError: non-integer labels or num_classes. ValueError: labels outside [0, num_classes) other than
        ``ignore_index`` (always checked: this function's result is read on the host anyway).
    """
    options = _dbce_options(radius, element, spacing, batch, ignore_index, "mean", True)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise TypeError(f"num_classes must be an int >= 1, got {num_classes!r}.")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}.")
    if labels.ndim < 2:
        raise ValueError(f"labels must have shape (B, *S) with at least one spatial dim, got {tuple(labels.shape)}.")
    v.check_label_map(labels, num_classes, options["ignore_index"], True, name="labels")
    _check_spacing(options["spacing"], labels.ndim - 1)
    args = (labels, num_classes, options["radius"], options["element"], options["spacing"], options["batch"],
            options["ignore_index"])
    blocker = dbce_family.fusion_blocker(labels.new_empty((1, num_classes) + (1,) * (labels.ndim - 1)), labels)
    chosen = _backend.resolve("dilated_class_weights", _backend.check_backend_name(backend), labels.device,
                              BACKENDS["dilated_class_weights"], blocker)
    if chosen == "reference":
        return dbce_reference.dilated_class_weights(*args)
    return dbce_family.dilated_class_weights(*args, backend=chosen)
