"""Steps shared by the reference losses: activation, one-hot targets, ignore masks and label-error NaNs.

These follow MONAI 1.6.1's order of operations exactly (activation, one-hot, background removal, ignore mask),
because the MONAI-named losses must give MONAI's values and gradients.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from torch_medloss._validation import check_label_map, check_target_shape, invalid_label_flag


def compute_dtype(input: torch.Tensor) -> torch.dtype:
    """float32 for half inputs (MONAI's float32 one-hot promotes them too), else the input's dtype."""
    return torch.promote_types(input.dtype, torch.float32)


def activate(input: torch.Tensor, sigmoid: bool, softmax: bool, other_act: Callable | None) -> torch.Tensor:
    if sigmoid:
        input = torch.sigmoid(input)
    if softmax:
        if input.shape[1] == 1:
            warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=4)
        else:
            input = torch.softmax(input, 1)
    if other_act is not None:
        input = other_act(input)
    return input


def one_hot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, *S) class indices, all in [0, num_classes), to a (B, num_classes, *S) one-hot tensor."""
    encoded = F.one_hot(labels[:, 0].long(), num_classes)  # (B, *S, C)
    # Contiguous (B, C, *S), as MONAI's scatter-made one-hot: a channels-last view would make the elementwise
    # products follow its strides, and sums over them add in another order (1 ulp apart from MONAI's).
    return encoded.movedim(-1, 1).to(dtype).contiguous()


def ignore_mask(original_target: torch.Tensor, ignore_index: int | None, dtype: torch.dtype) -> torch.Tensor | None:
    """MONAI's spatial ignore mask, (B, 1, *S), 1 where a pixel counts.

    Label maps: pixels equal to ``ignore_index``. One-hot targets: the pixels of class ``ignore_index`` when it is a
    channel index, otherwise (a sentinel such as -100) the pixels whose one-hot vector is all zero.
    """
    if ignore_index is None:
        return None
    if original_target.shape[1] == 1:
        return (original_target != ignore_index).to(dtype)
    if 0 <= ignore_index < original_target.shape[1]:
        return 1.0 - original_target[:, ignore_index : ignore_index + 1].to(dtype)
    return (original_target.sum(dim=1, keepdim=True) > 0).to(dtype)


@dataclass
class Prepared:
    """Activated predictions and targets, masked and with the background removed as asked."""

    input: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor | None
    # 0-dim bool tensor: some label was out of range (only possible for CUDA tensors without validate=True).
    bad_labels: torch.Tensor | None


def prepare(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    include_background: bool,
    to_onehot_y: bool,
    ignore_index: int | None,
    validate: bool,
) -> Prepared:
    """One-hot encode, drop the background channel and build the ignore mask, as MONAI's Dice-family losses do.

    ``input`` is already activated (or raw logits for the focal loss).
    """
    num_classes = input.shape[1]
    if to_onehot_y and num_classes == 1:
        warnings.warn("single channel prediction, `to_onehot_y=True` ignored.", stacklevel=4)
    expects_labels = to_onehot_y and num_classes > 1
    target = check_target_shape(input, target, expects_labels)
    original_target = target
    dtype = compute_dtype(input)

    bad_labels = None
    if expects_labels:
        check_label_map(target, num_classes, ignore_index, validate, allow_float=True)
        bad_labels = invalid_label_flag(target, num_classes, ignore_index)
        in_range = (target >= 0) & (target < num_classes)
        # Ignored and (unvalidated CUDA) out-of-range pixels become class 0 here: the mask removes the former, and
        # bad_labels turns the loss into NaN for the latter.
        target = one_hot(torch.where(in_range, target, torch.zeros_like(target)), num_classes, dtype)

    if not include_background:
        if num_classes == 1:
            warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=4)
        else:
            target = target[:, 1:]
            input = input[:, 1:]

    mask = ignore_mask(original_target, ignore_index, dtype)
    if mask is not None:
        input = input * mask
        target = target * mask
    return Prepared(input, target, mask, bad_labels)


def poison(loss: torch.Tensor, bad_labels: torch.Tensor | None) -> torch.Tensor:
    """NaN where a label was out of range, without a device sync; a no-op otherwise."""
    if bad_labels is None:
        return loss
    return loss + torch.where(bad_labels, float("nan"), 0.0).to(loss.dtype)


def reduce_axes(ndim: int, batch: bool) -> list[int]:
    axes = list(range(2, ndim))
    return [0, *axes] if batch else axes


def reduce_like_monai_dice(f: torch.Tensor, reduction: str, ndim: int) -> torch.Tensor:
    """Mean, sum, or MONAI's broadcastable ``none`` shape: f's first two dims followed by ndim - 2 ones."""
    if reduction == "mean":
        return f.mean()
    if reduction == "sum":
        return f.sum()
    return f.view(list(f.shape[0:2]) + [1] * (ndim - 2))
