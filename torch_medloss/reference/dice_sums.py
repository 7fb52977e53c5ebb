"""Reference of the fused Dice-family kernel: the per-(batch item, class) sums every Dice-family loss needs.

This is the contract the C++, CUDA and Triton kernels implement (``torch_medloss::dice_sums_fwd`` / ``_bwd``), written
as plain PyTorch. Layout: logits x (B, C, S) (spatial dims flattened), target either labels (B, S) of any integer
dtype or dense (B, C, S) floats.

Per pixel i and class c, with p = activation(x) and the valid-pixel weight w_i (see ``MASK_*``):

    p'_c = w * p_c,   y'_c = w * y_c,   m_c = |y'_c - p'_c|^gamma_c   (m = 1 where gamma_c = 0; no gradient)

    sums[b, c] = [ I = sum m p' y',   P = sum m p'^k,   G = sum m y'^k,   D = sum m |p' - y'| ]   (k = 2 if squared)

Masking p and y before everything is what MONAI does (``input * mask``, ``target * mask``), so soft masks behave
exactly as in MONAI. ``extras[b] = [ce_num, ce_den, invalid]``:

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

ACTIVATION_NONE, ACTIVATION_SOFTMAX, ACTIVATION_SIGMOID = 0, 1, 2
# Which pixels count (w): none masked; label == ignore_index (label maps); MONAI's one-hot masks: 1 - y[ignore_index]
# when ignore_index is a channel, or "the one-hot vector is not all zero" for a sentinel ignore_index.
MASK_NONE, MASK_LABEL, MASK_CHANNEL, MASK_SENTINEL = 0, 1, 2, 3


def _activate(x: torch.Tensor, activation: int) -> torch.Tensor:
    if activation == ACTIVATION_SOFTMAX:
        return torch.softmax(x, 1)
    if activation == ACTIVATION_SIGMOID:
        return torch.sigmoid(x)
    return x


def dice_sums_fwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: torch.Tensor,
    ce_weight: torch.Tensor,
    activation: int,
    target_is_labels: bool,
    ignore_index: int,
    mask_mode: int,
    squared: bool,
    with_ce: bool,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums (B, C, 4), extras (B, 3)) in float32 (float64 for float64 logits); differentiable in ``logits``."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    x = logits.to(acc)
    num_classes = x.shape[1]
    p = _activate(x, activation)
    invalid = torch.zeros(x.shape[0], dtype=acc, device=x.device)
    if target_is_labels:
        labels = target.long()
        in_range = (labels >= 0) & (labels < num_classes)
        ignored = (labels == ignore_index) if mask_mode == MASK_LABEL else torch.zeros_like(in_range)
        invalid = (~in_range & ~ignored).to(acc).sum(1)
        w = (in_range & ~ignored).to(acc)
        safe = torch.where(in_range, labels, torch.zeros_like(labels))
        y = torch.nn.functional.one_hot(safe, num_classes).movedim(-1, 1).to(acc)
    else:
        y = target.to(acc)
        if mask_mode == MASK_CHANNEL:
            w = 1.0 - y[:, ignore_index]
        elif mask_mode == MASK_SENTINEL:
            w = (y.sum(1) > 0).to(acc)
        else:
            w = torch.ones_like(y[:, 0])
    p_w, y_w = p * w[:, None], y * w[:, None]
    m = (y_w - p_w.detach()).abs().pow(gamma.to(acc).view(1, -1, 1))  # pow(0, 0) = 1
    power = 2 if squared else 1
    sums = torch.stack(
        [
            (m * p_w * y_w).sum(2),
            (m * p_w.pow(power)).sum(2),
            (m * y_w.pow(power)).sum(2),
            (m * (p_w - y_w).abs()).sum(2),
        ],
        dim=2,
    )
    ce_num = torch.zeros_like(invalid)
    ce_den = torch.zeros_like(invalid)
    if with_ce:
        log_q = torch.log_softmax(x, 1)
        cw = ce_weight.to(acc).view(1, -1, 1)
        eps = label_smoothing
        if target_is_labels:
            valid = in_range.to(acc)
            picked = -(log_q * y).sum(1)  # -log q at the label
            cw_label = (cw * y).sum(1)
            smooth = -(cw * log_q).sum(1)
            ce_num = (valid * ((1 - eps) * cw_label * picked + eps / num_classes * smooth)).sum(1)
            ce_den = (valid * cw_label).sum(1)
        else:
            smoothed = (1 - eps) * y + eps / num_classes
            ce_num = -(cw * smoothed * log_q).sum((1, 2))
            ce_den = torch.full_like(ce_num, float(y.shape[2]))
    return sums, torch.stack([ce_num, ce_den, invalid], dim=1)


def dice_sums_bwd(
    grad_sums: torch.Tensor,
    grad_extras: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: torch.Tensor,
    ce_weight: torch.Tensor,
    activation: int,
    target_is_labels: bool,
    ignore_index: int,
    mask_mode: int,
    squared: bool,
    with_ce: bool,
    label_smoothing: float,
) -> torch.Tensor:
    """d(<grad_sums, sums> + <grad_extras, extras>)/d(logits), in logits' dtype: the ground truth of the backward."""
    with torch.enable_grad():
        leaf = logits.detach().to(torch.promote_types(logits.dtype, torch.float32)).requires_grad_(True)
        sums, extras = dice_sums_fwd(leaf, target, gamma, ce_weight, activation, target_is_labels, ignore_index,
                                     mask_mode, squared, with_ce, label_smoothing)
        total = (sums * grad_sums.to(sums)).sum() + (extras * grad_extras.to(extras)).sum()
        (grad,) = torch.autograd.grad(total, leaf, allow_unused=True)
    grad = torch.zeros_like(leaf) if grad is None else grad
    return grad.to(logits.dtype)
