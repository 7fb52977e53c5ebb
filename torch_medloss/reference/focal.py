"""Reference focal loss, MONAI 1.6.1's FocalLoss (Lin et al. 2017), sigmoid or softmax form.

One deliberate difference: MONAI casts to float32 before computing; this reference keeps float64 inputs in float64
(so gradcheck can run) and computes half inputs in float32 like MONAI. Float32 values are MONAI's.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from torch_medloss.reference._common import compute_dtype, poison, prepare


def softmax_focal_terms(logits: torch.Tensor, target: torch.Tensor, gamma: float, alpha) -> torch.Tensor:
    """-alpha_c * (1 - p_c)^gamma * log(p_c) * y_c per class and pixel, with p = softmax over classes.

    log p_c is read only where y_c != 0: a -inf logit (a masked class, log p = -inf) that is not the target gives 0
    and a finite gradient, where MONAI's 0 * -inf gives NaN (a deliberate difference, as for the cross entropy).
    """
    log_p = logits.log_softmax(1)
    log_p = torch.where(target != 0, log_p, torch.zeros_like(log_p))
    loss = -(1 - log_p.exp()).pow(gamma) * log_p * target
    if alpha is None:
        return loss
    if alpha.ndim == 0:
        # A scalar alpha weighs the background (class 0) by 1 - alpha and every other class by alpha.
        factors = torch.cat([1 - alpha.view(1), alpha.view(1).expand(target.shape[1] - 1)])
    else:
        if alpha.shape[0] != target.shape[1]:
            raise ValueError(f"alpha has {alpha.shape[0]} values but there are {target.shape[1]} classes.")
        factors = alpha
    return factors.to(loss).view([-1] + [1] * (target.ndim - 2)) * loss


def sigmoid_focal_terms(logits: torch.Tensor, target: torch.Tensor, gamma: float, alpha) -> torch.Tensor:
    """Binary focal terms per class and pixel: (1 - p_t)^gamma * BCE-with-logits, alpha-balanced if given.

    Infinite logits are clamped to +-1e30 first: every term then is its limit (0 for x = -inf and t = 0) where
    MONAI's x - x t gives NaN; finite float32 logits are unchanged.
    """
    logits = logits.clamp(-1e30, 1e30)
    bce = logits - logits * target - F.logsigmoid(logits)
    # log(1 - p_t) computed as logsigmoid(-x * (2t - 1)) to avoid overflow.
    loss = (F.logsigmoid(-logits * (target * 2 - 1)) * gamma).exp() * bce
    if alpha is None:
        return loss
    alpha = alpha.to(loss)
    if alpha.ndim == 0:
        factor = target * alpha + (1 - target) * (1 - alpha)
    else:
        if alpha.shape[0] != target.shape[1]:
            raise ValueError(f"alpha has {alpha.shape[0]} values but there are {target.shape[1]} classes.")
        alpha = alpha.view([-1] + [1] * (target.ndim - 2))
        factor = torch.where(target == 1, alpha, torch.ones_like(alpha))  # per-class alpha on positives only
    return factor * loss


def focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    include_background: bool = True,
    to_onehot_y: bool = False,
    gamma: float = 2.0,
    alpha: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    use_softmax: bool = False,
    ignore_index: int | None = None,
    validate: bool = False,
) -> torch.Tensor:
    """MONAI 1.6.1's FocalLoss on logits; see :class:`torch_medloss.FocalLoss`."""
    prep = prepare(input, target, include_background=include_background, to_onehot_y=to_onehot_y,
                   ignore_index=ignore_index, validate=validate)
    dtype = compute_dtype(input)
    logits, y = prep.input.to(dtype), prep.target.to(dtype)
    if use_softmax:
        if not include_background and alpha is not None and alpha.ndim == 0:
            warnings.warn("`include_background=False`, scalar `alpha` ignored when using softmax.", stacklevel=3)
            alpha = None
        loss = softmax_focal_terms(logits, y, gamma, alpha)
    else:
        loss = sigmoid_focal_terms(logits, y, gamma, alpha)
    mask = prep.mask
    if mask is not None:
        loss = loss * mask

    if weight is not None:
        num_classes = loss.shape[1]
        if weight.ndim > 0:
            if num_classes == 1:
                raise ValueError("weight: per-class weights are not supported for single-channel outputs.")
            if weight.numel() != num_classes:
                raise ValueError(f"weight has {weight.numel()} values but there are {num_classes} output channels.")
            loss = loss * weight.to(loss).view([1, num_classes] + [1] * (loss.ndim - 2))
        else:
            loss = loss * weight.to(loss)

    spatial = list(range(2, loss.ndim))
    if reduction == "sum":
        # MONAI averages over space first, then sums over batch and classes.
        if mask is not None:
            eps = torch.finfo(torch.float32).eps
            loss = loss.sum(dim=spatial, keepdim=True) / mask.sum(dim=spatial, keepdim=True).clamp(min=eps)
        else:
            loss = loss.mean(dim=spatial)
        loss = loss.sum()
    elif reduction == "mean":
        if mask is not None:
            loss = loss.sum() / mask.sum().clamp(min=torch.finfo(torch.float32).eps)
        else:
            loss = loss.mean()
    return poison(loss, prep.bad_labels)
