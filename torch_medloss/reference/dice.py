"""Reference Dice-family losses: Dice (MONAI 1.6.1), PM Dice (arXiv 2506.15744), generalized Dice and Tversky.

All of them reduce the same few sums per (batch item, class), which is what the fused kernels compute in one pass:

    I = sum m*p*y,   P = sum m*p^k,   G = sum m*y^k      (k = 2 with squared_pred, else 1; m = 1 unless PM Dice)

Options are assumed checked (torch_medloss.functional does that); tensors are checked here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from torch_medloss import _distributed
from torch_medloss._validation import expand_per_class
from torch_medloss.reference._common import activate, poison, prepare, reduce_axes, reduce_like_monai_dice


def dice_sums(
    p: torch.Tensor,
    y: torch.Tensor,
    axes: list[int],
    squared_pred: bool,
    soft_label: bool,
    modulator: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(I, P, G): the intersection and the prediction and target volumes, each weighted by ``modulator``.

    With ``soft_label`` and k = 1 the intersection is MONAI's soft-label form (P + G - sum m*|p - y|) / 2, which equals
    sum m*p*y for hard labels and stays a proper Dice for soft ones. With k = 2 both forms agree for any target.
    """
    m = 1.0 if modulator is None else modulator
    if squared_pred:
        return (m * p * y).sum(axes), (m * p * p).sum(axes), (m * y * y).sum(axes)
    if soft_label:
        pred = (m * p.abs()).sum(axes)
        ground = (m * y.abs()).sum(axes)
        return (pred + ground - (m * (p - y).abs()).sum(axes)) / 2, pred, ground
    return (m * p * y).sum(axes), (m * p).sum(axes), (m * y).sum(axes)


def dice_from_sums(
    intersection: torch.Tensor,
    pred: torch.Tensor,
    ground: torch.Tensor,
    jaccard: bool,
    smooth_nr: float,
    smooth_dr: float,
) -> torch.Tensor:
    """Per-class Dice (or Jaccard) loss, 1 - (2I + nr) / (P + G + dr), or with 2(P + G - I) below for Jaccard."""
    union = pred + ground
    denominator = 2 * (union - intersection) if jaccard else union
    return 1.0 - (2 * intersection + smooth_nr) / (denominator + smooth_dr)


def global_sums(sums: tuple[torch.Tensor, ...], batch: bool, distributed: str) -> tuple[torch.Tensor, ...]:
    """Batch sums summed over the ranks of a process group too, when ``batch`` and ``distributed="auto"`` ask."""
    if not _distributed.active(distributed, batch):
        return sums
    return tuple(_distributed.all_reduce_sum(s) for s in sums)


def weighted_by_class(f: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Multiply per-class losses (class dim last after batch reduction or second) by class weights."""
    if weight is None or f.shape[-1] == 1:
        return f  # MONAI applies no class weight to a single-class loss
    return f * expand_per_class("weight", weight, f.shape[-1], f)


def dice_loss(
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
    soft_label: bool = False,
    ignore_index: int | None = None,
    validate: bool = False,
    distributed: str = "auto",
) -> torch.Tensor:
    """MONAI 1.6.1's DiceLoss; see :class:`torch_medloss.DiceLoss`."""
    return pm_dice_loss(
        input,
        target,
        gamma=None,
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
        weight=weight,
        soft_label=soft_label,
        ignore_index=ignore_index,
        validate=validate,
        distributed=distributed,
    )


def pm_dice_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: torch.Tensor | None = None,
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
    weight: torch.Tensor | None = None,
    soft_label: bool = False,
    ignore_index: int | None = None,
    validate: bool = False,
    distributed: str = "auto",
) -> torch.Tensor:
    """Pixel-wise Modulated Dice (arXiv 2506.15744): Dice sums weighted by m = |y - stopgrad(p)|^gamma_c.

    ``gamma`` is a 0-dim or per-class float tensor (None means no modulator: plain DiceLoss). torch.pow gives
    0^0 = 1, so gamma = 0 reproduces DiceLoss exactly.
    """
    p = activate(input, sigmoid, softmax, other_act)
    prep = prepare(p, target, include_background=include_background, to_onehot_y=to_onehot_y,
                   ignore_index=ignore_index, validate=validate)
    p, y = prep.input, prep.target
    modulator = None
    if gamma is not None:
        gammas = expand_per_class("gamma", gamma, p.shape[1], p)
        gammas = gammas.view([1, -1] + [1] * (p.ndim - 2))
        # The modulator is a weight, not a path for gradients: stop-gradient on p.
        modulator = (y - p.detach()).abs().pow(gammas)
    sums = dice_sums(p, y, reduce_axes(p.ndim, batch), squared_pred, soft_label, modulator)
    intersection, pred, ground = global_sums(sums, batch, distributed)
    f = dice_from_sums(intersection, pred, ground, jaccard, smooth_nr, smooth_dr)
    f = weighted_by_class(f, weight)
    return poison(reduce_like_monai_dice(f, reduction, p.ndim), prep.bad_labels)


def generalized_dice_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
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
) -> torch.Tensor:
    """MONAI 1.6.1's GeneralizedDiceLoss (Sudre et al. 2017): class weights 1/G^2, 1/G or 1."""
    p = activate(input, sigmoid, softmax, other_act)
    prep = prepare(p, target, include_background=include_background, to_onehot_y=to_onehot_y,
                   ignore_index=None, validate=validate)
    p, y = prep.input, prep.target
    axes = reduce_axes(p.ndim, batch)
    intersection, pred, ground = global_sums(dice_sums(p, y, axes, False, soft_label), batch, distributed)
    f = generalized_dice_from_sums(intersection, pred, ground, w_type, batch, smooth_nr, smooth_dr)
    return poison(reduce_like_monai_dice(f, reduction, p.ndim), prep.bad_labels)


def generalized_dice_from_sums(
    intersection: torch.Tensor,
    pred: torch.Tensor,
    ground: torch.Tensor,
    w_type: str,
    batch: bool,
    smooth_nr: float,
    smooth_dr: float,
) -> torch.Tensor:
    """Generalized Dice from per-class sums (k = 1): (B, 1), or (1,) with ``batch``."""
    volume = ground.float()  # sum y
    if w_type == "simple":
        w = torch.reciprocal(volume)
    elif w_type == "square":
        w = torch.reciprocal(volume * volume)
    else:
        w = torch.ones_like(volume)
    # An absent class has infinite weight; MONAI gives it the largest finite weight (per item, or over the batch).
    infinite = torch.isinf(w)
    w = torch.where(infinite, torch.zeros_like(w), w)
    largest = w.max() if batch else w.max(dim=1, keepdim=True).values
    w = w + infinite * largest
    class_dim = 0 if batch else 1
    numerator = 2.0 * (intersection * w).sum(class_dim, keepdim=True) + smooth_nr
    denominator = ((pred + ground) * w).sum(class_dim, keepdim=True) + smooth_dr
    return 1.0 - numerator / denominator


def tversky_from_sums(
    tp: torch.Tensor,
    fp: torch.Tensor,
    fn: torch.Tensor,
    alpha: float,
    beta: float,
    smooth_nr: float,
    smooth_dr: float,
    reduction: str,
) -> torch.Tensor:
    """1 - (TP + nr) / (TP + alpha*FP + beta*FN + dr), then MONAI's Tversky reduction (``none`` keeps (B, C))."""
    score = 1.0 - (tp + smooth_nr) / (tp + alpha * fp + beta * fn + smooth_dr)
    if reduction == "sum":
        return score.sum()
    if reduction == "mean":
        return score.mean()
    return score


def tversky_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
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
) -> torch.Tensor:
    """MONAI 1.6.1's TverskyLoss: 1 - (TP + nr) / (TP + alpha*FP + beta*FN + dr); ``none`` gives (B, C)."""
    p = activate(input, sigmoid, softmax, other_act)
    prep = prepare(p, target, include_background=include_background, to_onehot_y=to_onehot_y,
                   ignore_index=ignore_index, validate=validate)
    p, y = prep.input, prep.target
    axes = reduce_axes(p.ndim, batch)
    if soft_label:
        tp, pred, ground = global_sums(dice_sums(p, y, axes, False, True), batch, distributed)
        fp, fn = pred - tp, ground - tp
    else:
        tp, fp, fn = global_sums(((p * y).sum(axes), (p * (1 - y)).sum(axes), ((1 - p) * y).sum(axes)), batch,
                                 distributed)
    return poison(tversky_from_sums(tp, fp, fn, alpha, beta, smooth_nr, smooth_dr, reduction), prep.bad_labels)
