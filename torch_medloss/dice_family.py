"""Fused Dice-family losses: one ``dice_sums`` pass over the logits, then a tiny head on (B, C) sums.

Each function here has the signature of its reference in torch_medloss.reference (same options, same values and
gradients, MONAI 1.6.1's order of operations) plus ``backend``, the resolved fused backend ("cpp", "cuda" or
"triton"). The head reuses the references' own per-class formulas, so the two paths cannot drift apart.

``fusion_blocker`` says why a call cannot run fused (an arbitrary ``other_act``, too many classes, ...): the
dispatcher then runs the reference instead (with a warning under "auto").
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from torch_medloss import _distributed
from torch_medloss._validation import check_label_map, expand_per_class
from torch_medloss.dice_sums import dice_sums
from torch_medloss.reference import dice_sums as contract
from torch_medloss.reference._common import check_target_shape, poison, reduce_like_monai_dice
from torch_medloss.reference.dice import (
    dice_from_sums,
    generalized_dice_from_sums,
    tversky_from_sums,
    weighted_by_class,
)
from torch_medloss.reference.dice_ce import check_ce_weight

# The kernels keep a pixel's classes in registers; past this many classes the reference runs instead.
MAX_FUSED_CLASSES = 128


def fusion_blocker(input: Tensor, target: object, options: dict, with_ce: bool = False) -> str | None:
    """Why these options cannot run on the fused kernels, or None."""
    if options.get("other_act") is not None:
        return "other_act is an arbitrary callable; only sigmoid, softmax or no activation are fused"
    num_classes = input.shape[1] if input.ndim >= 2 else 0
    if num_classes > MAX_FUSED_CLASSES:
        return f"{num_classes} classes is more than the fused kernels' {MAX_FUSED_CLASSES}"
    if input.dtype == torch.float64 and input.device.type != "cpu":
        return "float64 logits are fused on the CPU only"
    if with_ce and num_classes == 1:
        return "single-channel Dice+CE uses binary cross entropy, which is not fused"
    onehot_labels = options.get("to_onehot_y") and num_classes > 1
    if options.get("ignore_index") is not None and not onehot_labels and isinstance(target, Tensor) \
            and target.ndim >= 2 and target.shape[1] == 1:
        return "ignore_index on a single-channel dense target is not fused"
    return None


def _kernel_inputs(input: Tensor, target: Tensor, to_onehot_y: bool, ignore_index: int | None, validate: bool):
    """Flatten logits and target to the kernel's (B, C, S) / (B, S) views and choose the mask mode."""
    num_classes = input.shape[1]
    if to_onehot_y and num_classes == 1:
        warnings.warn("single channel prediction, `to_onehot_y=True` ignored.", stacklevel=5)
    expects_labels = to_onehot_y and num_classes > 1
    target = check_target_shape(input, target, expects_labels)
    if expects_labels:
        check_label_map(target, num_classes, ignore_index, validate, allow_float=True)
        labels = target[:, 0]
        if labels.is_floating_point():
            labels = labels.long()  # MONAI-style float label maps (whole numbers, checked on CPU): one copy
        mask_mode = contract.MASK_NONE if ignore_index is None else contract.MASK_LABEL
        return input.flatten(2), labels.flatten(1), True, mask_mode
    dense = target if target.is_floating_point() else target.to(torch.float32)
    if ignore_index is None:
        mask_mode = contract.MASK_NONE
    elif 0 <= ignore_index < num_classes:
        mask_mode = contract.MASK_CHANNEL
    else:
        mask_mode = contract.MASK_SENTINEL
    return input.flatten(2), dense.flatten(2), False, mask_mode


def _activation(num_classes: int, sigmoid: bool, softmax: bool) -> int:
    if sigmoid:
        return contract.ACTIVATION_SIGMOID
    if softmax:
        if num_classes == 1:
            warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=5)
            return contract.ACTIVATION_NONE
        return contract.ACTIVATION_SOFTMAX
    return contract.ACTIVATION_NONE


def fused_sums(
    backend: str,
    input: Tensor,
    target: Tensor,
    *,
    sigmoid: bool,
    softmax: bool,
    to_onehot_y: bool,
    include_background: bool,
    ignore_index: int | None,
    squared: bool,
    batch: bool,
    distributed: str,
    validate: bool,
    gamma: Tensor | None = None,
    ce_weight: Tensor | None = None,
    label_smoothing: float = 0.0,
    with_ce: bool = False,
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], Tensor, Tensor]:
    """((I, P, G, D) per kept class, extras (B, 3), bad-label flag) from one kernel pass."""
    num_classes = input.shape[1]
    activation = _activation(num_classes, sigmoid, softmax)
    logits, flat_target, target_is_labels, mask_mode = _kernel_inputs(input, target, to_onehot_y, ignore_index,
                                                                     validate)
    drop_background = not include_background and num_classes > 1
    if not include_background and num_classes == 1:
        warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=4)
    accumulator = torch.float64 if input.dtype == torch.float64 else torch.float32
    gammas = torch.zeros(num_classes, dtype=accumulator, device=input.device)
    if gamma is not None:
        kept = expand_per_class("gamma", gamma, num_classes - int(drop_background), gammas)
        gammas = torch.cat([gammas[:1], kept]) if drop_background else kept
    weights = torch.ones(num_classes, dtype=accumulator, device=input.device)
    if ce_weight is not None:
        weights = ce_weight.to(weights)
    sums, extras = dice_sums(backend, logits, flat_target, gammas, weights, activation, target_is_labels,
                             0 if ignore_index is None else ignore_index, mask_mode, squared, with_ce,
                             label_smoothing)
    if drop_background:
        sums = sums[:, 1:]
    if batch:
        sums = sums.sum(0)
        if _distributed.active(distributed, batch):
            sums = _distributed.all_reduce_sum(sums)
    bad_labels = extras[:, 2].sum() > 0
    return sums.unbind(-1), extras, bad_labels


def pm_dice_loss(
    input: Tensor,
    target: Tensor,
    *,
    backend: str,
    gamma: Tensor | None = None,
    include_background: bool = True,
    to_onehot_y: bool = False,
    sigmoid: bool = False,
    softmax: bool = False,
    other_act: Callable | None = None,
    squared_pred: bool = True,
    jaccard: bool = False,
    reduction: str = "mean",
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = False,
    weight: Tensor | None = None,
    soft_label: bool = False,
    ignore_index: int | None = None,
    validate: bool = False,
    distributed: str = "auto",
) -> Tensor:
    """Fused reference.dice.pm_dice_loss (``gamma=None``: plain Dice)."""
    (intersection, pred, ground, difference), _, bad = fused_sums(
        backend, input, target, sigmoid=sigmoid, softmax=softmax, to_onehot_y=to_onehot_y,
        include_background=include_background, ignore_index=ignore_index, squared=squared_pred, batch=batch,
        distributed=distributed, validate=validate, gamma=gamma,
    )
    if soft_label and not squared_pred:
        intersection = (pred + ground - difference) / 2  # MONAI's soft-label intersection
    f = dice_from_sums(intersection, pred, ground, jaccard, smooth_nr, smooth_dr)
    return poison(reduce_like_monai_dice(weighted_by_class(f, weight), reduction, input.ndim), bad)


def dice_loss(input: Tensor, target: Tensor, *, backend: str, squared_pred: bool = False, **options) -> Tensor:
    """Fused reference.dice.dice_loss."""
    return pm_dice_loss(input, target, backend=backend, gamma=None, squared_pred=squared_pred, **options)


def generalized_dice_loss(
    input: Tensor,
    target: Tensor,
    *,
    backend: str,
    include_background: bool = True,
    to_onehot_y: bool = False,
    sigmoid: bool = False,
    softmax: bool = False,
    other_act: Callable | None = None,
    w_type: str = "square",
    reduction: str = "mean",
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = False,
    soft_label: bool = False,
    validate: bool = False,
    distributed: str = "auto",
) -> Tensor:
    """Fused reference.dice.generalized_dice_loss."""
    (intersection, pred, ground, difference), _, bad = fused_sums(
        backend, input, target, sigmoid=sigmoid, softmax=softmax, to_onehot_y=to_onehot_y,
        include_background=include_background, ignore_index=None, squared=False, batch=batch,
        distributed=distributed, validate=validate,
    )
    if soft_label:
        intersection = (pred + ground - difference) / 2
    f = generalized_dice_from_sums(intersection, pred, ground, w_type, batch, smooth_nr, smooth_dr)
    return poison(reduce_like_monai_dice(f, reduction, input.ndim), bad)


def tversky_loss(
    input: Tensor,
    target: Tensor,
    *,
    backend: str,
    include_background: bool = True,
    to_onehot_y: bool = False,
    sigmoid: bool = False,
    softmax: bool = False,
    other_act: Callable | None = None,
    alpha: float = 0.5,
    beta: float = 0.5,
    reduction: str = "mean",
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = False,
    soft_label: bool = False,
    ignore_index: int | None = None,
    validate: bool = False,
    distributed: str = "auto",
) -> Tensor:
    """Fused reference.dice.tversky_loss: TP = I, FP = P - I, FN = G - I (k = 1)."""
    (intersection, pred, ground, difference), _, bad = fused_sums(
        backend, input, target, sigmoid=sigmoid, softmax=softmax, to_onehot_y=to_onehot_y,
        include_background=include_background, ignore_index=ignore_index, squared=False, batch=batch,
        distributed=distributed, validate=validate,
    )
    if soft_label:
        intersection = (pred + ground - difference) / 2
    score = tversky_from_sums(intersection, pred - intersection, ground - intersection, alpha, beta, smooth_nr,
                              smooth_dr, reduction)
    return poison(score, bad)


def dice_ce_loss(
    input: Tensor,
    target: Tensor,
    *,
    backend: str,
    include_background: bool = True,
    to_onehot_y: bool = False,
    sigmoid: bool = False,
    softmax: bool = False,
    other_act: Callable | None = None,
    squared_pred: bool = False,
    jaccard: bool = False,
    reduction: str = "mean",
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = False,
    weight: Tensor | None = None,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
    label_smoothing: float = 0.0,
    validate: bool = False,
    distributed: str = "auto",
) -> Tensor:
    """Fused reference.dice_ce.dice_ce_loss: the Dice sums and the cross entropy from the same pass."""
    if to_onehot_y and isinstance(target, Tensor) and target.ndim == input.ndim - 1:
        target = target.unsqueeze(1)
    check_ce_weight(weight, input.shape[1])
    (intersection, pred, ground, _), extras, bad = fused_sums(
        backend, input, target, sigmoid=sigmoid, softmax=softmax, to_onehot_y=to_onehot_y,
        include_background=include_background, ignore_index=None, squared=squared_pred, batch=batch,
        distributed=distributed, validate=validate, ce_weight=weight, label_smoothing=label_smoothing, with_ce=True,
    )
    dice_weight = weight[1:] if weight is not None and not include_background and weight.ndim == 1 else weight
    f = dice_from_sums(intersection, pred, ground, jaccard, smooth_nr, smooth_dr)
    dice = reduce_like_monai_dice(weighted_by_class(f, dice_weight), reduction, input.ndim)
    ce_total, ce_normalizer = extras[:, 0].sum(), extras[:, 1].sum()
    if _distributed.active(distributed, batch):
        ce_total, ce_normalizer = _distributed.all_reduce_sum(ce_total), _distributed.all_reduce_sum(ce_normalizer)
    ce = ce_total if reduction == "sum" else ce_total / ce_normalizer
    return poison(lambda_dice * dice + lambda_ce * ce.to(dice.dtype), bad)
