"""Reference Dice + cross entropy, MONAI 1.6.1's DiceCELoss: lambda_dice * Dice + lambda_ce * CE.

The cross entropy is torch's: with class weights and label smoothing on a label map, on probabilities for a one-hot
target, and binary cross entropy with logits (``pos_weight=weight``) for a single channel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from torch_medloss import _distributed
from torch_medloss._validation import invalid_label_flag
from torch_medloss.reference._common import poison
from torch_medloss.reference.dice import dice_loss


def check_ce_weight(weight: torch.Tensor | None, num_classes: int) -> None:
    """torch's cross entropy takes one weight per class (BCE's pos_weight, for one channel, broadcasts)."""
    if weight is None or num_classes == 1:
        return
    if weight.ndim == 0:
        raise ValueError("weight must hold one value per class for the cross entropy, got a scalar.")
    if weight.shape[0] != num_classes:
        raise ValueError(f"weight has {weight.shape[0]} values but input has {num_classes} classes.")


def cross_entropy_sums(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MONAI's ``DiceCELoss.ce`` / ``.bce`` as (total, normalizer): torch's "sum" and the divisor of its "mean".

    The target is (B, 1, *S) labels (normalizer: the summed class weights of the labels), (B, C, *S) one-hot/soft
    (normalizer: the pixel count), or, for one channel, binary targets (BCE with ``pos_weight=weight``).
    """
    num_classes = input.shape[1]
    if num_classes == 1:
        target = target if target.is_floating_point() else target.to(input.dtype)
        pos_weight = None if weight is None else weight.to(input)
        total = F.binary_cross_entropy_with_logits(input, target, pos_weight=pos_weight, reduction="sum")
        return total, torch.tensor(float(target.numel()), dtype=total.dtype, device=total.device)
    class_weight = None if weight is None else weight.to(input)
    if target.shape[1] == 1:
        labels = target[:, 0].long()
        bad = invalid_label_flag(labels, num_classes, None)
        # Out-of-range labels (unvalidated CUDA tensors only) must not reach the indexing kernel: class 0 + NaN.
        labels = torch.where((labels >= 0) & (labels < num_classes), labels, torch.zeros_like(labels))
        total = F.cross_entropy(input, labels, weight=class_weight, reduction="sum", label_smoothing=label_smoothing)
        if class_weight is None:
            normalizer = torch.tensor(float(labels.numel()), dtype=total.dtype, device=total.device)
        else:
            normalizer = class_weight[labels].sum()
        return poison(total, bad), normalizer
    target = target if target.is_floating_point() else target.to(input.dtype)
    total = F.cross_entropy(input, target, weight=class_weight, reduction="sum", label_smoothing=label_smoothing)
    return total, torch.tensor(float(target[:, 0].numel()), dtype=total.dtype, device=total.device)


def dice_ce_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
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
    weight: torch.Tensor | None = None,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
    label_smoothing: float = 0.0,
    validate: bool = False,
    distributed: str = "auto",
) -> torch.Tensor:
    """MONAI 1.6.1's DiceCELoss; see :class:`torch_medloss.DiceCELoss`."""
    if to_onehot_y and isinstance(target, torch.Tensor) and target.ndim == input.ndim - 1:
        target = target.unsqueeze(1)
    check_ce_weight(weight, input.shape[1])
    dice_weight = weight[1:] if weight is not None and not include_background and weight.ndim == 1 else weight
    dice = dice_loss(
        input,
        target,
        include_background=include_background,
        to_onehot_y=to_onehot_y,
        sigmoid=sigmoid,
        softmax=softmax,
        other_act=other_act,
        squared_pred=squared_pred,
        jaccard=jaccard,
        reduction=reduction,
        smooth_nr=smooth_nr,
        smooth_dr=smooth_dr,
        batch=batch,
        weight=dice_weight,
        validate=validate,
        distributed=distributed,
    )
    total, normalizer = cross_entropy_sums(input, target, weight, label_smoothing)
    if _distributed.active(distributed, batch):
        # Under batch=True every rank computes the global loss: the cross entropy too, from summed totals.
        total, normalizer = _distributed.all_reduce_sum(total), _distributed.all_reduce_sum(normalizer)
    ce = total if reduction == "sum" else total / normalizer
    return lambda_dice * dice + lambda_ce * ce
