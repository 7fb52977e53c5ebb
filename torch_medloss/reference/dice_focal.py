"""Reference Dice + focal losses, MONAI 1.6.1's DiceFocalLoss and GeneralizedDiceFocalLoss:
lambda_dice * (generalized) Dice + lambda_focal * focal, the focal part MONAI's sigmoid FocalLoss on the raw logits.

Under an initialized process group with ``batch=True`` and ``distributed="auto"`` every rank computes the loss of the
whole global batch, as Dice+CE does: the Dice sums and the focal totals are summed over the ranks (MONAI has no
distributed focal loss; this keeps the two parts of one loss on the same batch).
"""

from __future__ import annotations

import torch

from torch_medloss import _distributed
from torch_medloss.reference import dice as dice_reference
from torch_medloss.reference.focal import focal_loss


def focal_part(input: torch.Tensor, target: torch.Tensor, *, include_background: bool, to_onehot_y: bool,
               gamma: float, alpha: torch.Tensor | None, weight: torch.Tensor | None, reduction: str, batch: bool,
               distributed: str, validate: bool) -> torch.Tensor:
    """MONAI's sigmoid FocalLoss, its mean or sum taken over the ranks' global batch when distributed is active."""
    if not _distributed.active(distributed, batch) or reduction == "none":
        return focal_loss(input, target, include_background=include_background, to_onehot_y=to_onehot_y,
                          gamma=gamma, alpha=alpha, weight=weight, reduction=reduction, validate=validate)
    terms = focal_loss(input, target, include_background=include_background, to_onehot_y=to_onehot_y, gamma=gamma,
                       alpha=alpha, weight=weight, reduction="none", validate=validate)
    if reduction == "sum":  # the mean over space of each (image, class), summed: additive over the ranks
        return _distributed.all_reduce_sum(terms.flatten(2).mean(2).sum())
    total = _distributed.all_reduce_sum(terms.sum())
    count = _distributed.all_reduce_sum(torch.tensor(float(terms.numel()), dtype=terms.dtype))
    return total / count


def dice_focal_loss(input: torch.Tensor, target: torch.Tensor, *, include_background: bool = True,
                    to_onehot_y: bool = False, sigmoid: bool = False, softmax: bool = False, other_act=None,
                    squared_pred: bool = False, jaccard: bool = False, reduction: str = "mean",
                    smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, batch: bool = False, gamma: float = 2.0,
                    weight: torch.Tensor | None = None, lambda_dice: float = 1.0, lambda_focal: float = 1.0,
                    alpha: torch.Tensor | None = None, validate: bool = False,
                    distributed: str = "auto") -> torch.Tensor:
    """MONAI 1.6.1's DiceFocalLoss; see :class:`torch_medloss.DiceFocalLoss`."""
    dice = dice_reference.dice_loss(
        input, target, include_background=include_background, to_onehot_y=to_onehot_y, sigmoid=sigmoid,
        softmax=softmax, other_act=other_act, squared_pred=squared_pred, jaccard=jaccard, reduction=reduction,
        smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=batch, weight=weight, validate=validate,
        distributed=distributed)
    focal = focal_part(input, target, include_background=include_background, to_onehot_y=to_onehot_y, gamma=gamma,
                       alpha=alpha, weight=weight, reduction=reduction, batch=batch, distributed=distributed,
                       validate=validate)
    return lambda_dice * dice + lambda_focal * focal


def generalized_dice_focal_loss(input: torch.Tensor, target: torch.Tensor, *, include_background: bool = True,
                                to_onehot_y: bool = False, sigmoid: bool = False, softmax: bool = False,
                                other_act=None, w_type: str = "square", reduction: str = "mean",
                                smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, batch: bool = False,
                                gamma: float = 2.0, weight: torch.Tensor | None = None, lambda_gdl: float = 1.0,
                                lambda_focal: float = 1.0, validate: bool = False,
                                distributed: str = "auto") -> torch.Tensor:
    """MONAI 1.6.1's GeneralizedDiceFocalLoss; see :class:`torch_medloss.GeneralizedDiceFocalLoss`."""
    gdl = dice_reference.generalized_dice_loss(
        input, target, include_background=include_background, to_onehot_y=to_onehot_y, sigmoid=sigmoid,
        softmax=softmax, other_act=other_act, w_type=w_type, reduction=reduction, smooth_nr=smooth_nr,
        smooth_dr=smooth_dr, batch=batch, validate=validate, distributed=distributed)
    focal = focal_part(input, target, include_background=include_background, to_onehot_y=to_onehot_y, gamma=gamma,
                       alpha=None, weight=weight, reduction=reduction, batch=batch, distributed=distributed,
                       validate=validate)
    return lambda_gdl * gdl + lambda_focal * focal
