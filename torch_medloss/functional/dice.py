"""The Dice family's functional forms (Dice, PM Dice, generalized Dice, Tversky, Dice+CE, and with MONAI's focal term
FocalLoss, DiceFocalLoss, GeneralizedDiceFocalLoss): one entry, ``dice_family``, from a checked options object.

``dice_family`` checks the tensors, picks the backend (torch_medloss._backend) and runs either the readable
references (backend "reference") or the family's one fused op, torch_medloss.ops.dice_sums.dice_loss (the sums and
the loss head), with the codes/scalars/params of torch_medloss._contract. The loss modules call it with the options
they checked at construction; the public functions build the options from their (MONAI-named) arguments.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from torch_medloss import _backend, _distributed
from torch_medloss import _contract as K
from torch_medloss import _validation as v
from torch_medloss._options import DiceOptions, as_tensor
from torch_medloss.ops import dice_sums as op

__all__ = [
    "dice_ce_loss",
    "dice_family",
    "dice_focal_loss",
    "dice_loss",
    "focal_loss",
    "generalized_dice_focal_loss",
    "generalized_dice_loss",
    "pm_dice_loss",
    "tversky_loss",
]

FUSED = ("triton", "cuda", "cpp", "reference")

_ACTIVATIONS = {"sigmoid": K.ACTIVATION_SIGMOID, "softmax": K.ACTIVATION_SOFTMAX}
_HEADS = {"dice": K.HEAD_DICE, "generalized": K.HEAD_GENERALIZED, "tversky": K.HEAD_TVERSKY, "none": K.HEAD_NONE}
_FOCAL = {None: K.FOCAL_NONE, "sigmoid": K.FOCAL_SIGMOID, "softmax": K.FOCAL_SOFTMAX}
_REDUCTIONS = {"mean": K.REDUCTION_MEAN, "sum": K.REDUCTION_SUM, "none": K.REDUCTION_NONE}
_W_TYPES = {"square": K.W_TYPE_SQUARE, "simple": K.W_TYPE_SIMPLE, "uniform": K.W_TYPE_UNIFORM}


def dice_family(input: Tensor, target: Tensor, options: DiceOptions) -> Tensor:
    """Every Dice-family loss (FocalLoss too), from its checked options: the reference, or one fused op (the sums
    and the head)."""
    v.check_logits(input, min_ndim=2)
    target = v.check_dice_target(input, target, options.to_onehot_y)
    blocker = _dice_blocker(input, target, options)
    backend = _backend.resolve(options.name, options.backend, input.device, FUSED, blocker)
    if backend == "reference":
        return _dice_reference(input, target, options)

    num_classes = input.shape[1]
    labels = options.to_onehot_y and num_classes > 1
    if labels:
        v.check_label_map(target, num_classes, options.ignore_index, options.validate, allow_float=True)
    codes, kernel_target = _dice_codes(input, target, labels, options)
    accumulator = torch.float64 if input.dtype == torch.float64 else torch.float32
    params = options.params(num_classes, codes[K.DICE_CODE_DROP_BACKGROUND], input.device, accumulator)
    logits = input.flatten(2) if input.ndim > 2 else input.unsqueeze(2)

    if _distributed.active(options.distributed, options.batch):
        # Batch sums over the ranks first: the one call that stops between the sums and the head.
        sums, extras = op.dice_sums(backend, logits, kernel_target, params, codes, options.scalars)
        loss = _reference_head(sums, extras, params, codes, options.scalars, _distributed.all_reduce_sum)
    else:
        loss = op.dice_loss(backend, logits, kernel_target, params, codes, options.scalars)
    return _dice_output(loss, input, target, codes, labels)


def _dice_blocker(input: Tensor, target: Tensor, o: DiceOptions) -> str | None:
    """Why these options and tensors cannot run on the fused kernels, or None."""
    if o.other_act is not None:
        return "other_act is an arbitrary callable; only sigmoid, softmax or no activation are fused"
    if input.ndim == 2:
        return ("(B, C) inputs have no spatial dims: MONAI reduces them with torch.sum(dim=[]), over every dim, "
                "which the reference reproduces")
    num_classes = input.shape[1]
    if num_classes > K.DICE_MAX_CLASSES:
        return f"{num_classes} classes is more than the fused kernels' {K.DICE_MAX_CLASSES}"
    if input.dtype == torch.float64 and (input.device.type != "cpu" or o.backend == "triton"):
        return "float64 logits are fused by the C++ CPU kernels only (Triton and CUDA take float32, bfloat16, float16)"
    if o.with_ce and num_classes == 1:
        return "single-channel Dice+CE uses binary cross entropy, which is not fused"
    labels = o.to_onehot_y and num_classes > 1
    if o.ignore_index is not None and not labels and target.shape[1] == 1:
        return "ignore_index on a single-channel dense target is not fused"
    if target.requires_grad:
        return "the target requires grad, and the fused kernels give the logits' gradient only"
    if o.focal is not None and o.head != "none" and o.reduction == "none":
        return "reduction='none' of a Dice and focal sum is a (B, C, *S) map; only its mean and sum are fused"
    return None


def _dice_codes(input: Tensor, target: Tensor, labels: bool, o: DiceOptions) -> tuple[list[int], Tensor]:
    """The op's codes for these tensors, and the target as the kernels take it ((B, S) labels or (B, C, S))."""
    num_classes = input.shape[1]
    codes = [0] * K.DICE_NUM_CODES
    activation = "sigmoid" if o.sigmoid else "softmax" if o.softmax else None
    if activation == "softmax" and num_classes == 1:
        warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=3)
        activation = None
    if o.to_onehot_y and num_classes == 1:
        warnings.warn("single channel prediction, `to_onehot_y=True` ignored.", stacklevel=3)
    drop = not o.include_background and num_classes > 1
    if not o.include_background and num_classes == 1:
        warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=3)
    codes[K.DICE_CODE_ACTIVATION] = _ACTIVATIONS.get(activation, K.ACTIVATION_NONE)
    codes[K.DICE_CODE_TARGET_IS_LABELS] = int(labels)
    codes[K.DICE_CODE_IGNORE_INDEX] = 0 if o.ignore_index is None else o.ignore_index
    if labels:
        kernel_target = target[:, 0]
        if kernel_target.is_floating_point():
            kernel_target = kernel_target.long()  # MONAI-style float label maps (whole numbers, checked on CPU)
        # An ignore_index the labels' dtype cannot hold matches no label (values compare as integers, never wrap).
        ignoring = o.ignore_index is not None and v.holds(kernel_target.dtype, o.ignore_index)
        codes[K.DICE_CODE_MASK_MODE] = K.MASK_LABEL if ignoring else K.MASK_NONE
    else:
        kernel_target = target if target.is_floating_point() else target.to(torch.float32)
        if o.ignore_index is None:
            codes[K.DICE_CODE_MASK_MODE] = K.MASK_NONE
        elif 0 <= o.ignore_index < num_classes:
            codes[K.DICE_CODE_MASK_MODE] = K.MASK_CHANNEL
        else:
            codes[K.DICE_CODE_MASK_MODE] = K.MASK_SENTINEL
    kernel_target = kernel_target.flatten(1 if labels else 2) if input.ndim > 2 else kernel_target.unsqueeze(-1)
    head = _HEADS[o.head]
    codes[K.DICE_CODE_SQUARED] = int(o.squared_pred and head == K.HEAD_DICE)
    codes[K.DICE_CODE_WITH_CE] = int(o.with_ce)
    codes[K.DICE_CODE_HEAD] = head
    codes[K.DICE_CODE_DROP_BACKGROUND] = int(drop)
    codes[K.DICE_CODE_BATCH] = int(o.batch)
    codes[K.DICE_CODE_REDUCTION] = _REDUCTIONS[o.reduction]
    codes[K.DICE_CODE_JACCARD] = int(o.jaccard and head == K.HEAD_DICE)
    # MONAI's soft-label intersection matters only with k = 1 (with k = 2 both forms agree).
    codes[K.DICE_CODE_SOFT_INTERSECTION] = int(o.soft_label and not codes[K.DICE_CODE_SQUARED])
    codes[K.DICE_CODE_W_TYPE] = _W_TYPES[o.w_type]
    codes[K.DICE_CODE_HAS_WEIGHT] = int(head == K.HEAD_DICE and o.dice_weights(num_classes - drop) is not None)
    codes[K.DICE_CODE_FOCAL] = _FOCAL[o.focal]
    if o.focal is not None:
        codes[K.DICE_CODE_FOCAL_ALPHA] = o.focal_alpha_mode(num_classes - drop)
        codes[K.DICE_CODE_FOCAL_MASK] = int(o.ignore_index is not None)
    if head == K.HEAD_NONE:
        codes[K.DICE_CODE_ACTIVATION] = K.ACTIVATION_NONE  # no Dice part: FocalLoss activates its own logits
    return codes, kernel_target


def _reference_head(sums, extras, params, codes, scalars, all_reduce) -> Tensor:
    from torch_medloss.reference.dice_sums import loss_from_sums

    return loss_from_sums(sums, extras, params, codes, scalars, all_reduce)


def _dice_output(loss: Tensor, input: Tensor, target: Tensor, codes: list[int], labels: bool) -> Tensor:
    """MONAI's output: its "none" shape for Dice and generalized Dice, and its dtype (a float64 target promotes)."""
    if codes[K.DICE_CODE_REDUCTION] == K.REDUCTION_NONE and codes[K.DICE_CODE_HEAD] == K.HEAD_NONE:
        loss = loss.view(loss.shape[:2] + input.shape[2:])  # FocalLoss's map (B, C', *S)
    elif codes[K.DICE_CODE_REDUCTION] == K.REDUCTION_NONE and codes[K.DICE_CODE_HEAD] != K.HEAD_TVERSKY:
        loss = loss.view(list(loss.shape[:2]) + [1] * (input.ndim - 2))
    if not labels and target.dtype == torch.float64 and loss.dtype != torch.float64:
        loss = loss.to(torch.float64)
    return loss


def _dice_reference(input: Tensor, target: Tensor, o: DiceOptions) -> Tensor:
    from torch_medloss.reference import dice as reference
    from torch_medloss.reference.dice_ce import dice_ce_loss
    from torch_medloss.reference.dice_focal import dice_focal_loss, generalized_dice_focal_loss
    from torch_medloss.reference.focal import focal_loss

    labels = o.to_onehot_y and input.shape[1] > 1 and not target.is_floating_point()
    if labels and o.ignore_index is not None and not v.holds(target.dtype, o.ignore_index):
        target = target.long()  # compare values, not wrapped bits, as the fused kernels do
    common = {"include_background": o.include_background, "to_onehot_y": o.to_onehot_y, "sigmoid": o.sigmoid,
              "softmax": o.softmax, "other_act": o.other_act, "reduction": o.reduction, "smooth_nr": o.smooth_nr,
              "smooth_dr": o.smooth_dr, "batch": o.batch, "validate": o.validate, "distributed": o.distributed}
    if o.focal is not None and o.head == "none":
        return focal_loss(input, target, include_background=o.include_background, to_onehot_y=o.to_onehot_y,
                          gamma=o.focal_gamma, alpha=as_tensor(o.focal_alpha), weight=as_tensor(o.focal_weight),
                          reduction=o.reduction, use_softmax=o.focal == "softmax", ignore_index=o.ignore_index,
                          validate=o.validate)
    if o.focal is not None and o.head == "generalized":
        return generalized_dice_focal_loss(input, target, w_type=o.w_type, gamma=o.focal_gamma,
                                           weight=as_tensor(o.focal_weight), lambda_gdl=o.lambda_dice,
                                           lambda_focal=o.lambda_focal, **common)
    if o.focal is not None:
        return dice_focal_loss(input, target, squared_pred=o.squared_pred, jaccard=o.jaccard, gamma=o.focal_gamma,
                               weight=as_tensor(o.weight), lambda_dice=o.lambda_dice, lambda_focal=o.lambda_focal,
                               alpha=as_tensor(o.focal_alpha), **common)
    if o.with_ce:
        return dice_ce_loss(input, target, squared_pred=o.squared_pred, jaccard=o.jaccard, weight=as_tensor(o.weight),
                            lambda_dice=o.lambda_dice, lambda_ce=o.lambda_ce, label_smoothing=o.label_smoothing,
                            **common)
    if o.head == "generalized":
        return reference.generalized_dice_loss(input, target, w_type=o.w_type, soft_label=o.soft_label, **common)
    if o.head == "tversky":
        return reference.tversky_loss(input, target, alpha=o.alpha, beta=o.beta, soft_label=o.soft_label,
                                      ignore_index=o.ignore_index, **common)
    return reference.pm_dice_loss(input, target, gamma=as_tensor(o.gamma), squared_pred=o.squared_pred,
                                  jaccard=o.jaccard, weight=as_tensor(o.weight), soft_label=o.soft_label,
                                  ignore_index=o.ignore_index, **common)


def dice_loss(
    input: Tensor,
    target: Tensor,
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
    weight: Sequence[float] | float | Tensor | None = None,
    soft_label: bool = False,
    ignore_index: int | None = None,
    *,
    backend: str = "auto",
    validate: bool = False,
    distributed: str = "auto",
) -> Tensor:
    """Functional :class:`torch_medloss.DiceLoss` (MONAI 1.6.1's arguments), plus ``backend``, ``validate`` and
    ``distributed``."""
    return dice_family(input, target, DiceOptions(
        "dice_loss", "dice", include_background, to_onehot_y, sigmoid, softmax, other_act, squared_pred, jaccard,
        reduction, smooth_nr, smooth_dr, batch, weight, soft_label, ignore_index, backend=backend, validate=validate,
        distributed=distributed))


def pm_dice_loss(
    input: Tensor,
    target: Tensor,
    gamma: Sequence[float] | float | Tensor = 2.0,
    include_background: bool = True,
    to_onehot_y: bool = False,
    sigmoid: bool = False,
    softmax: bool = False,
    other_act: Callable | None = None,
    squared_pred: bool = True,
    reduction: str = "mean",
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = False,
    weight: Sequence[float] | float | Tensor | None = None,
    soft_label: bool = False,
    ignore_index: int | None = None,
    *,
    backend: str = "auto",
    validate: bool = False,
    distributed: str = "auto",
) -> Tensor:
    """Functional :class:`torch_medloss.PMDiceLoss` (``gamma=2.0``, ``squared_pred=True`` by default)."""
    if gamma is None:
        raise TypeError("gamma must be a number or a sequence of numbers, got None.")
    return dice_family(input, target, DiceOptions(
        "pm_dice_loss", "dice", include_background, to_onehot_y, sigmoid, softmax, other_act, squared_pred, False,
        reduction, smooth_nr, smooth_dr, batch, weight, soft_label, ignore_index, gamma, backend=backend,
        validate=validate, distributed=distributed))


def generalized_dice_loss(
    input: Tensor,
    target: Tensor,
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
    *,
    backend: str = "auto",
    validate: bool = False,
    distributed: str = "auto",
) -> Tensor:
    """Functional :class:`torch_medloss.GeneralizedDiceLoss`."""
    return dice_family(input, target, DiceOptions(
        "generalized_dice_loss", "generalized", include_background, to_onehot_y, sigmoid, softmax, other_act,
        reduction=reduction, smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=batch, soft_label=soft_label,
        w_type=w_type, backend=backend, validate=validate, distributed=distributed))


def tversky_loss(
    input: Tensor,
    target: Tensor,
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
    *,
    backend: str = "auto",
    validate: bool = False,
    distributed: str = "auto",
) -> Tensor:
    """Functional :class:`torch_medloss.TverskyLoss`."""
    return dice_family(input, target, DiceOptions(
        "tversky_loss", "tversky", include_background, to_onehot_y, sigmoid, softmax, other_act,
        reduction=reduction, smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=batch, soft_label=soft_label,
        ignore_index=ignore_index, alpha=alpha, beta=beta, backend=backend, validate=validate,
        distributed=distributed))


def dice_ce_loss(
    input: Tensor,
    target: Tensor,
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
    weight: Sequence[float] | Tensor | None = None,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
    label_smoothing: float = 0.0,
    *,
    backend: str = "auto",
    validate: bool = False,
    distributed: str = "auto",
) -> Tensor:
    """Functional :class:`torch_medloss.DiceCELoss`."""
    return dice_family(input, target, DiceOptions(
        "dice_ce_loss", "dice", include_background, to_onehot_y, sigmoid, softmax, other_act, squared_pred, jaccard,
        reduction, smooth_nr, smooth_dr, batch, weight, with_ce=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce,
        label_smoothing=label_smoothing, backend=backend, validate=validate, distributed=distributed))




def focal_loss(
    input: Tensor,
    target: Tensor,
    include_background: bool = True,
    to_onehot_y: bool = False,
    gamma: float = 2.0,
    alpha: float | Sequence[float] | None = None,
    weight: Sequence[float] | float | Tensor | None = None,
    reduction: str = "mean",
    use_softmax: bool = False,
    ignore_index: int | None = None,
    *,
    backend: str = "auto",
    validate: bool = False,
) -> Tensor:
    """Functional :class:`torch_medloss.FocalLoss` (on logits): the Dice family's op with no Dice part."""
    return dice_family(input, target, DiceOptions(
        "focal_loss", "none", include_background, to_onehot_y, reduction=reduction, ignore_index=ignore_index,
        focal="softmax" if use_softmax else "sigmoid", focal_gamma=gamma, focal_alpha=alpha, focal_weight=weight,
        backend=backend, validate=validate, distributed="off"))


def dice_focal_loss(
    input: Tensor,
    target: Tensor,
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
    gamma: float = 2.0,
    weight: Sequence[float] | float | Tensor | None = None,
    lambda_dice: float = 1.0,
    lambda_focal: float = 1.0,
    alpha: float | None = None,
    *,
    backend: str = "auto",
    validate: bool = False,
    distributed: str = "auto",
) -> Tensor:
    """Functional :class:`torch_medloss.DiceFocalLoss`: Dice and MONAI's sigmoid focal loss in one pass."""
    return dice_family(input, target, DiceOptions(
        "dice_focal_loss", "dice", include_background, to_onehot_y, sigmoid, softmax, other_act, squared_pred,
        jaccard, reduction, smooth_nr, smooth_dr, batch, weight, lambda_dice=lambda_dice, focal="sigmoid",
        focal_gamma=gamma, focal_alpha=alpha, focal_weight=weight, lambda_focal=lambda_focal, backend=backend,
        validate=validate, distributed=distributed))


def generalized_dice_focal_loss(
    input: Tensor,
    target: Tensor,
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
    gamma: float = 2.0,
    weight: Sequence[float] | float | Tensor | None = None,
    lambda_gdl: float = 1.0,
    lambda_focal: float = 1.0,
    *,
    backend: str = "auto",
    validate: bool = False,
    distributed: str = "auto",
) -> Tensor:
    """Functional :class:`torch_medloss.GeneralizedDiceFocalLoss`: generalized Dice and MONAI's sigmoid focal loss
    in one pass (``weight`` weighs the focal part only, as in MONAI)."""
    return dice_family(input, target, DiceOptions(
        "generalized_dice_focal_loss", "generalized", include_background, to_onehot_y, sigmoid, softmax, other_act,
        reduction=reduction, smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=batch, w_type=w_type,
        lambda_dice=lambda_gdl, focal="sigmoid", focal_gamma=gamma, focal_weight=weight, lambda_focal=lambda_focal,
        backend=backend, validate=validate, distributed=distributed))
