"""Reference of the fused Dice-family kernel: the per-(batch item, class) sums every Dice-family loss needs.

This is the contract the C++, CUDA and Triton kernels implement (``torch_medloss::dice_sums_fwd`` / ``_bwd``, and the
fused ``dice_loss_fwd`` / ``_bwd``: the sums, then ``loss_from_sums``), written as plain PyTorch; the options come as
the codes, scalars and params of torch_medloss._contract. Layout: logits x (B, C, S) (spatial dims flattened), target
either labels (B, S) of any integer dtype or dense (B, C, S) floats.

Per pixel i and class c, with p = activation(x) and the valid-pixel weight w_i (see ``MASK_*``):

    p'_c = w * p_c,   y'_c = w * y_c,   m_c = |y'_c - p'_c|^gamma_c   (m = 1 where gamma_c = 0; no gradient)

    sums[b, c] = [ I = sum m p' y',  P = sum m p'^k,  G = sum m y'^k,  D = sum m |p' - y'|,  F ]  (k = 2 if squared)

with F the focal term's sum (``focal_terms``: MONAI's FocalLoss per pixel, on the raw logits, 0 without it).
Masking p and y before everything is what MONAI does (``input * mask``, ``target * mask``), so soft masks behave
exactly as in MONAI. ``extras[b] = [ce_num, ce_den, invalid, valid]``, valid = sum_i w_i:

- ``invalid``: label-map pixels whose label is outside [0, C) and is not the ignored label. Such a pixel gets w = 0;
  the loss head turns any invalid count into NaN (no device sync).
- ``ce_num``, ``ce_den`` (only with ``with_ce``; zeros otherwise): torch's cross entropy on the raw logits, with class
  weights cw and label smoothing eps, as sums (the head divides): for labels,
  num = sum_i (1 - eps) cw[L_i] (-log q_{L_i}) + (eps / C) sum_c cw[c] (-log q_c),  den = sum_i cw[L_i]
  over pixels with an in-range label (q = softmax(x)); for dense targets y~ = (1 - eps) y + eps / C,
  num = sum_i sum_c cw[c] y~_c (-log q_c), den = number of pixels.
"""

from __future__ import annotations

import torch

from torch_medloss import _contract as K
from torch_medloss._contract import (
    ACTIVATION_SIGMOID,
    ACTIVATION_SOFTMAX,
    MASK_CHANNEL,
    MASK_LABEL,
    MASK_SENTINEL,
)


def _activate(x: torch.Tensor, activation: int) -> torch.Tensor:
    if activation == ACTIVATION_SOFTMAX:
        return torch.softmax(x, 1)
    if activation == ACTIVATION_SIGMOID:
        return torch.sigmoid(x)
    return x


def dice_sums_fwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    params: torch.Tensor,
    codes: list[int],
    scalars: list[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums (B, C, 5), extras (B, 4)) in float32 (float64 for float64 logits); differentiable in ``logits``."""
    activation, target_is_labels = codes[K.DICE_CODE_ACTIVATION], codes[K.DICE_CODE_TARGET_IS_LABELS]
    ignore_index, mask_mode = codes[K.DICE_CODE_IGNORE_INDEX], codes[K.DICE_CODE_MASK_MODE]
    squared, with_ce = codes[K.DICE_CODE_SQUARED], codes[K.DICE_CODE_WITH_CE]
    label_smoothing = scalars[K.DICE_SCALAR_LABEL_SMOOTHING]
    gamma, ce_weight = params[K.DICE_PARAM_GAMMA], params[K.DICE_PARAM_CE_WEIGHT]
    acc = torch.promote_types(logits.dtype, torch.float32)
    x = logits.to(acc)
    num_classes = x.shape[1]
    p = _activate(x, activation)
    invalid = torch.zeros(x.shape[0], dtype=acc, device=x.device)
    y, w = _target_and_weight(x, target, codes)
    if target_is_labels:
        labels = target.long()
        in_range = (labels >= 0) & (labels < num_classes)
        ignored = (labels == ignore_index) if mask_mode == MASK_LABEL else torch.zeros_like(in_range)
        invalid = (~in_range & ~ignored).to(acc).sum(1)
    p_w, y_w = p * w[:, None], y * w[:, None]
    m = (y_w - p_w.detach()).abs().pow(gamma.to(acc).view(1, -1, 1))  # pow(0, 0) = 1
    power = 2 if squared else 1
    focal = focal_terms(x, y, w, params, codes, scalars)
    sums = torch.stack(
        [
            (m * p_w * y_w).sum(2),
            (m * p_w.pow(power)).sum(2),
            (m * y_w.pow(power)).sum(2),
            (m * (p_w - y_w).abs()).sum(2),
            focal.sum(2),
        ],
        dim=2,
    )
    ce_num = torch.zeros_like(invalid)
    ce_den = torch.zeros_like(invalid)
    if with_ce:
        log_q = torch.log_softmax(x, 1)
        cw = ce_weight.to(acc).view(1, -1, 1)
        eps = label_smoothing
        # Terms with a zero factor are selected away, not multiplied: a -inf logit (a masked class) has
        # log q = -inf, and torch's cross entropy reads it only at the label or where label smoothing puts weight.
        zero = torch.zeros((), dtype=acc, device=x.device)
        if target_is_labels:
            picked = -torch.where(y != 0, log_q, zero).sum(1)  # -log q at the label
            cw_label = (cw * y).sum(1)
            term = (1 - eps) * cw_label * picked
            if eps:
                term = term - eps / num_classes * torch.where(cw != 0, cw * log_q, zero).sum(1)
            ce_num = torch.where(in_range, term, zero).sum(1)
            ce_den = (in_range.to(acc) * cw_label).sum(1)
        else:
            smoothed = cw * ((1 - eps) * y + eps / num_classes)
            ce_num = -torch.where(smoothed != 0, smoothed * log_q, zero).sum((1, 2))
            ce_den = torch.full_like(ce_num, float(y.shape[2]))
    return sums, torch.stack([ce_num, ce_den, invalid, w.sum(1)], dim=1)


def _target_and_weight(x: torch.Tensor, target: torch.Tensor, codes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, w): the target as (B, C, S) floats (one-hot of the in-range labels) and the pixel weight (B, S)."""
    num_classes, acc = x.shape[1], x.dtype
    ignore_index, mask_mode = codes[K.DICE_CODE_IGNORE_INDEX], codes[K.DICE_CODE_MASK_MODE]
    if codes[K.DICE_CODE_TARGET_IS_LABELS]:
        labels = target.long()
        in_range = (labels >= 0) & (labels < num_classes)
        ignored = (labels == ignore_index) if mask_mode == MASK_LABEL else torch.zeros_like(in_range)
        safe = torch.where(in_range, labels, torch.zeros_like(labels))
        return torch.nn.functional.one_hot(safe, num_classes).movedim(-1, 1).to(acc), (in_range & ~ignored).to(acc)
    y = target.to(acc)
    if mask_mode == MASK_CHANNEL:
        return y, 1.0 - y[:, ignore_index]
    if mask_mode == MASK_SENTINEL:
        return y, (y.sum(1) > 0).to(acc)
    return y, torch.ones_like(y[:, 0])


def focal_terms(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, params: torch.Tensor, codes: list[int],
                scalars: list[float]) -> torch.Tensor:
    """MONAI's focal loss per (image, class, pixel), masked as MONAI masks it: the terms of (x w, y w), times w,
    times the focal class weight; 0 for the left-out class 0 and without a focal term (torch_medloss.reference.focal
    has the formulas)."""
    from torch_medloss.reference.focal import sigmoid_focal_terms, softmax_focal_terms

    mode = codes[K.DICE_CODE_FOCAL]
    if mode == K.FOCAL_NONE:
        return torch.zeros_like(x)
    drop = codes[K.DICE_CODE_DROP_BACKGROUND]
    x_w, y_w = (x * w[:, None])[:, drop:], (y * w[:, None])[:, drop:]
    alpha = None
    if codes[K.DICE_CODE_FOCAL_ALPHA] == K.ALPHA_SCALAR:
        alpha = torch.tensor(scalars[K.DICE_SCALAR_FOCAL_ALPHA], dtype=x.dtype)
    elif codes[K.DICE_CODE_FOCAL_ALPHA] == K.ALPHA_PER_CLASS:
        alpha = params[K.DICE_PARAM_FOCAL_ALPHA, drop:]
    gamma = scalars[K.DICE_SCALAR_FOCAL_GAMMA]
    terms = softmax_focal_terms(x_w, y_w, gamma, alpha) if mode == K.FOCAL_SOFTMAX else \
        sigmoid_focal_terms(x_w, y_w, gamma, alpha)
    terms = terms * w[:, None] * params[K.DICE_PARAM_FOCAL_WEIGHT, drop:].to(terms).view(1, -1, 1)
    return torch.cat([torch.zeros_like(x[:, :drop]), terms], dim=1)


def dice_sums_bwd(
    grad_sums: torch.Tensor,
    grad_extras: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    params: torch.Tensor,
    codes: list[int],
    scalars: list[float],
) -> torch.Tensor:
    """d(<grad_sums, sums> + <grad_extras, extras>)/d(logits), in logits' dtype: the ground truth of the backward."""
    return _gradient(lambda leaf: (dice_sums_fwd(leaf, target, params, codes, scalars), (grad_sums, grad_extras)),
                     logits)


def dice_loss_fwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    params: torch.Tensor,
    codes: list[int],
    scalars: list[float],
) -> torch.Tensor:
    """The dice_loss op's loss (shape _contract.dice_loss_shape): the sums, then the head of ``codes``; the focal
    term alone with reduction "none" is its (B, C', S) map."""
    sums, extras = dice_sums_fwd(logits, target, params, codes, scalars)
    if codes[K.DICE_CODE_HEAD] == K.HEAD_NONE and codes[K.DICE_CODE_REDUCTION] == K.REDUCTION_NONE:
        from torch_medloss.reference._common import poison

        acc = torch.promote_types(logits.dtype, torch.float32)
        x = logits.to(acc)
        y, w = _target_and_weight(x, target, codes)
        terms = focal_terms(x, y, w, params, codes, scalars)[:, codes[K.DICE_CODE_DROP_BACKGROUND]:]
        return poison(terms, extras[:, K.DICE_EXTRA_INVALID].sum() > 0)
    return loss_from_sums(sums, extras, params, codes, scalars)


def dice_loss_bwd(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    params: torch.Tensor,
    codes: list[int],
    scalars: list[float],
) -> torch.Tensor:
    """d<grad_loss, loss>/d(logits), in logits' dtype: the ground truth of the dice_loss op's backward."""
    return _gradient(lambda leaf: ((dice_loss_fwd(leaf, target, params, codes, scalars),), (grad_loss,)), logits)


def _gradient(outputs_and_grads, logits: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        leaf = logits.detach().to(torch.promote_types(logits.dtype, torch.float32)).requires_grad_(True)
        outputs, grads = outputs_and_grads(leaf)
        total = sum((output * grad.to(output)).sum() for output, grad in zip(outputs, grads, strict=True))
        (grad,) = torch.autograd.grad(total, leaf, allow_unused=True)
    grad = torch.zeros_like(leaf) if grad is None else grad
    return grad.to(logits.dtype)


def loss_from_sums(
    sums: torch.Tensor,
    extras: torch.Tensor,
    params: torch.Tensor,
    codes: list[int],
    scalars: list[float],
    all_reduce=None,
) -> torch.Tensor:
    """The loss head on the sums (B, C, 5) and extras (B, 4): what the fused dice_loss ops compute after the sums.

    Composed from the reference losses' own per-class formulas (torch_medloss.reference.dice), so the fused heads
    and the references cannot drift apart. ``all_reduce``: a differentiable sum over the ranks of a process group,
    applied to the batch sums and the cross-entropy totals (DDP batch Dice), or None. The shape is
    _contract.dice_loss_shape; a bad label (extras' invalid count) makes it NaN.
    """
    from torch_medloss.reference import dice as formulas
    from torch_medloss.reference._common import poison

    drop, batch = codes[K.DICE_CODE_DROP_BACKGROUND], codes[K.DICE_CODE_BATCH]
    reduction = {K.REDUCTION_MEAN: "mean", K.REDUCTION_SUM: "sum", K.REDUCTION_NONE: "none"}[
        codes[K.DICE_CODE_REDUCTION]]
    nr, dr = scalars[K.DICE_SCALAR_SMOOTH_NR], scalars[K.DICE_SCALAR_SMOOTH_DR]
    kept = sums[:, drop:]
    if batch:
        kept = kept.sum(0)
        if all_reduce is not None:
            kept = all_reduce(kept)
    intersection, pred, ground, difference = kept[..., :K.DICE_SUM_F].unbind(-1)
    if codes[K.DICE_CODE_SOFT_INTERSECTION]:
        intersection = (pred + ground - difference) / 2  # MONAI's soft-label intersection
    head = codes[K.DICE_CODE_HEAD]
    if head == K.HEAD_NONE:
        loss = torch.zeros((), dtype=sums.dtype, device=sums.device)
    elif head == K.HEAD_GENERALIZED:
        w_type = {K.W_TYPE_SQUARE: "square", K.W_TYPE_SIMPLE: "simple", K.W_TYPE_UNIFORM: "uniform"}[
            codes[K.DICE_CODE_W_TYPE]]
        f = formulas.generalized_dice_from_sums(intersection, pred, ground, w_type, bool(batch), nr, dr)
        loss = _reduce(f, reduction)
    elif head == K.HEAD_TVERSKY:
        alpha, beta = scalars[K.DICE_SCALAR_ALPHA], scalars[K.DICE_SCALAR_BETA]
        loss = formulas.tversky_from_sums(intersection, pred - intersection, ground - intersection, alpha, beta,
                                          nr, dr, reduction)
    else:
        f = formulas.dice_from_sums(intersection, pred, ground, bool(codes[K.DICE_CODE_JACCARD]), nr, dr)
        if codes[K.DICE_CODE_HAS_WEIGHT]:
            f = f * params[K.DICE_PARAM_WEIGHT, drop:].to(f)
        loss = _reduce(f, reduction)
    with_focal = codes[K.DICE_CODE_FOCAL] != K.FOCAL_NONE
    loss = scalars[K.DICE_SCALAR_LAMBDA_DICE] * loss  # 1 for every loss but Dice+CE and Dice+focal
    if codes[K.DICE_CODE_WITH_CE]:
        ce_total, ce_normalizer = extras[:, K.DICE_EXTRA_CE_NUM].sum(), extras[:, K.DICE_EXTRA_CE_DEN].sum()
        if all_reduce is not None:
            ce_total, ce_normalizer = all_reduce(ce_total), all_reduce(ce_normalizer)
        ce = ce_total if reduction == "sum" else ce_total / ce_normalizer
        loss = loss + scalars[K.DICE_SCALAR_LAMBDA_CE] * ce.to(loss.dtype)
    if with_focal:
        loss = loss + scalars[K.DICE_SCALAR_LAMBDA_FOCAL] * _focal_from_sums(sums, extras, codes, reduction,
                                                                               all_reduce).to(loss.dtype)
    return poison(loss, extras[:, K.DICE_EXTRA_INVALID].sum() > 0)


def _focal_from_sums(sums, extras, codes, reduction: str, all_reduce) -> torch.Tensor:
    """MONAI FocalLoss's mean or sum from the per-(image, class) sums F and the valid pixels V of each image: "sum"
    averages over space first (F / V), "mean" divides by the valid pixels with an ignore mask and by all elements
    without one. MONAI clamps V at float32's eps only when it has a mask (else V is the pixel count)."""
    focal = sums[:, codes[K.DICE_CODE_DROP_BACKGROUND]:, K.DICE_SUM_F]
    valid = extras[:, K.DICE_EXTRA_VALID]
    masked = bool(codes[K.DICE_CODE_FOCAL_MASK])
    eps = torch.finfo(torch.float32).eps
    if reduction == "sum":
        total = (focal / (valid.clamp(min=eps) if masked else valid)[:, None]).sum()
        return all_reduce(total) if all_reduce is not None else total
    total, count = focal.sum(), valid.sum()
    if all_reduce is not None:
        total, count = all_reduce(total), all_reduce(count)
    return total / (count.clamp(min=eps) if masked else count * focal.shape[1])


def _reduce(f: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return f.mean()
    if reduction == "sum":
        return f.sum()
    return f
