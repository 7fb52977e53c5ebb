"""Loss modules. The MONAI-named ones take MONAI 1.6.1's arguments and give its values, gradients and shapes.

Every module checks its options once, in ``__init__``, into one frozen options object (torch_medloss._options:
TypeError for a wrong type, ValueError for a bad value), keeps them as attributes under MONAI's names too
(``class_weight`` is a buffer, as in MONAI), and in ``forward`` hands the options object and the tensors to its
family's functional entry (torch_medloss.functional), which picks the backend and runs the op. The options are
fixed at construction: to change one, build a new loss.

Extra keyword arguments on every loss:
    backend: "auto" (default), "triton", "cuda", "cpp" or "reference". "auto" takes the fastest implementation that
        can run on the input's device; a named backend that cannot run raises ValueError saying why.
    validate: check label values on CUDA tensors too (one device sync). CPU tensors are always checked; on CUDA
        without it, an out-of-range label makes the loss NaN instead of raising.
    distributed (Dice family, DBCE): "auto" (default) or "off". With ``batch=True`` inside an initialized
        torch.distributed group of 2+ ranks, "auto" sums the per-class sums over the ranks (with autograd), so
        every rank computes the global-batch loss and DDP's averaged gradient is that loss's gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.nn.modules.loss import _Loss

from torch_medloss import functional as F
from torch_medloss._options import DBCEOptions, DiceOptions, as_tensor

__all__ = [
    "BalancedCELoss",
    "DBCELoss",
    "DiceCELoss",
    "DiceFocalLoss",
    "DiceLoss",
    "FocalLoss",
    "GeneralizedDiceFocalLoss",
    "GeneralizedDiceLoss",
    "PMDiceLoss",
    "TverskyLoss",
]

# Per-class options kept as buffers (so .to(device) moves them), under MONAI's attribute names. (Tversky's float
# alpha stays an attribute, as in MONAI.)
_BUFFERS = {"weight": "class_weight", "gamma": "gamma", "focal_weight": "class_weight", "focal_alpha": "alpha"}
# Options fields that are not user arguments, or are shown under another name.
_HIDDEN = ("name", "head", "with_ce", "focal")
_RENAMED = {"focal_gamma": "gamma"}


class _OptionsLoss(_Loss):
    """Holds the checked options; ``forward`` calls the family's functional entry with them.

    ``_arguments``: the options fields this loss takes (its MONAI arguments), kept as attributes under MONAI's
    names too, for code that reads them (read-only in effect: forward uses ``self.options``).
    """

    _family: Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]
    _arguments: tuple[str, ...] = ()

    def __init__(self, options: DiceOptions | DBCEOptions) -> None:
        super().__init__(reduction=options.reduction)
        self.options = options
        for name in self._arguments:
            value = getattr(options, name)
            if name in _BUFFERS:
                self.register_buffer(_BUFFERS[name], as_tensor(value))
            else:
                setattr(self, _RENAMED.get(name, name), value)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return type(self)._family(input, target, self.options)


_DICE_ARGUMENTS = ("include_background", "to_onehot_y", "sigmoid", "softmax", "other_act", "reduction", "smooth_nr",
                   "smooth_dr", "batch", "backend", "validate", "distributed")


class DiceLoss(_OptionsLoss):
    """Dice loss between logits/probabilities (B, C, *S) and a one-hot (B, C, *S) or label (B, 1, *S) target.

    Exactly MONAI 1.6.1's ``DiceLoss``: per (batch item, class), with I = sum p*y, P = sum p^k, G = sum y^k
    (k = 2 with ``squared_pred``) summed over space (and batch with ``batch=True``),
    ``loss = 1 - (2I + smooth_nr) / (P + G + smooth_dr)``, or ``1 - (2I + smooth_nr) / (2(P + G - I) + smooth_dr)``
    with ``jaccard``; then class weights and the reduction.

    Args:
        include_background: keep class 0. Default True.
        to_onehot_y: the target is a label map (B, 1, *S) (or (B, *S)) to one-hot encode. Default False.
        sigmoid, softmax, other_act: the activation applied to ``input`` (at most one). Default none: the input is
            taken as probabilities.
        squared_pred: squares in the denominator (k = 2). Default False.
        jaccard: soft Jaccard (IoU) instead of Dice. Default False.
        reduction: "mean" (default), "sum" or "none" (shape (B, C, 1, ..., 1); (C, 1, ..., 1) with ``batch``).
        smooth_nr, smooth_dr: added to numerator and denominator. Default 1e-5 each.
        batch: sum over the batch before the ratio. Default False.
        weight: class weights >= 0, a scalar or one per (kept) class. Default None.
        soft_label: MONAI's soft-label form of I for k = 1. Default False.
        ignore_index: label (or one-hot channel / sentinel) whose pixels are left out. Default None.
        backend, validate: see :mod:`torch_medloss.losses`.

    Returns:
        The loss: a scalar for "mean"/"sum", else the broadcastable per-class shape above.

    Raises:
        TypeError: wrong option types, non-floating input, non-tensor target, float-but-fractional labels.
        ValueError: bad option values, more than one activation, shape/device mismatches, labels out of range,
            a weight sequence of the wrong length.

    Example:
        >>> loss = DiceLoss(to_onehot_y=True, softmax=True)
        >>> loss(torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 1, 8, 8))).shape
        torch.Size([])

    Milletari et al., V-Net, 3DV 2016.
    """

    _family = staticmethod(F.dice_family)
    _arguments = (*_DICE_ARGUMENTS, "squared_pred", "jaccard", "weight", "soft_label", "ignore_index")

    def __init__(
        self,
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
        weight: Sequence[float] | float | int | torch.Tensor | None = None,
        soft_label: bool = False,
        ignore_index: int | None = None,
        *,
        backend: str = "auto",
        validate: bool = False,
        distributed: str = "auto",
    ) -> None:
        super().__init__(DiceOptions(
            "dice_loss", "dice", include_background, to_onehot_y, sigmoid, softmax, other_act, squared_pred, jaccard,
            reduction, smooth_nr, smooth_dr, batch, weight, soft_label, ignore_index, backend=backend,
            validate=validate, distributed=distributed))


class PMDiceLoss(_OptionsLoss):
    """Pixel-wise Modulated Dice loss (arXiv 2506.15744) on (B, C, *S) logits/probabilities.

    Each pixel's terms are weighted by the modulator m = |y - stopgrad(p)|^gamma_c, which grows with the error at
    that pixel, so hard pixels (for example the rims of small lesions) weigh more:
    I_c = sum m*y*p, D_c = sum m*(y^2 + p^2) (``squared_pred=True``, the default) or sum m*(y + p);
    ``loss_c = 1 - (2 I_c + smooth_nr) / (D_c + smooth_dr)``. Classes, weights and reductions are DiceLoss's.
    With gamma = 0 (0^0 = 1, so m = 1) it equals :class:`DiceLoss` with the same arguments.

    Args:
        gamma: the modulation exponent >= 0, a scalar or one per (kept) class. Default 2.0.
        squared_pred: Default True. With ``soft_label`` and ``squared_pred=False``, I_c uses MONAI's soft form
            (sum m*p + sum m*y - sum m*|p - y|) / 2.
        Every other argument is :class:`DiceLoss`'s (no ``jaccard``).

    Returns and Raises: as :class:`DiceLoss`; ValueError also for a negative gamma or a gamma sequence of the
    wrong length.

    Example:
        >>> loss = PMDiceLoss(gamma=2.0, to_onehot_y=True, softmax=True)
        >>> value = loss(torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 1, 8, 8)))
    """

    _family = staticmethod(F.dice_family)
    _arguments = (*_DICE_ARGUMENTS, "gamma", "squared_pred", "weight", "soft_label", "ignore_index")

    def __init__(
        self,
        gamma: Sequence[float] | float | torch.Tensor = 2.0,
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
        weight: Sequence[float] | float | int | torch.Tensor | None = None,
        soft_label: bool = False,
        ignore_index: int | None = None,
        *,
        backend: str = "auto",
        validate: bool = False,
        distributed: str = "auto",
    ) -> None:
        if gamma is None:
            raise TypeError("gamma must be a number or a sequence of numbers, got None.")
        super().__init__(DiceOptions(
            "pm_dice_loss", "dice", include_background, to_onehot_y, sigmoid, softmax, other_act, squared_pred,
            False, reduction, smooth_nr, smooth_dr, batch, weight, soft_label, ignore_index, gamma, backend=backend,
            validate=validate, distributed=distributed))


class GeneralizedDiceLoss(_OptionsLoss):
    """Generalized Dice loss (Sudre et al., DLMIA 2017), exactly MONAI 1.6.1's ``GeneralizedDiceLoss``.

    Class weights w_c = 1/G_c^2 (``w_type="square"``, default), 1/G_c ("simple") or 1 ("uniform") from the target
    volume G_c; an absent class takes the largest finite weight.
    ``loss = 1 - (2 sum_c w_c I_c + smooth_nr) / (sum_c w_c (P_c + G_c) + smooth_dr)`` per batch item (or once with
    ``batch=True``). ``reduction="none"`` gives (B, 1, 1, ..., 1) (or (1, 1, ..., 1) with ``batch``).

    Args: ``include_background``, ``to_onehot_y``, ``sigmoid``, ``softmax``, ``other_act``, ``w_type``,
    ``reduction``, ``smooth_nr``, ``smooth_dr``, ``batch``, ``soft_label`` as in MONAI; ``backend``, ``validate``.
    Raises: as :class:`DiceLoss`; ValueError for an unknown ``w_type``.
    """

    _family = staticmethod(F.dice_family)
    _arguments = (*_DICE_ARGUMENTS, "w_type", "soft_label")

    def __init__(
        self,
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
    ) -> None:
        super().__init__(DiceOptions(
            "generalized_dice_loss", "generalized", include_background, to_onehot_y, sigmoid, softmax, other_act,
            reduction=reduction, smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=batch, soft_label=soft_label,
            w_type=w_type, backend=backend, validate=validate, distributed=distributed))


class TverskyLoss(_OptionsLoss):
    """Tversky loss (Salehi et al. 2017), exactly MONAI 1.6.1's ``TverskyLoss``.

    ``loss = 1 - (TP + smooth_nr) / (TP + alpha*FP + beta*FN + smooth_dr)`` per (batch item, class), with
    TP = sum p*y, FP = sum p*(1 - y), FN = sum (1 - p)*y. ``reduction="none"`` gives (B, C) ((C,) with ``batch``).

    Args: ``alpha`` (false-positive weight, default 0.5), ``beta`` (false-negative weight, default 0.5), and
    ``include_background``, ``to_onehot_y``, ``sigmoid``, ``softmax``, ``other_act``, ``reduction``,
    ``smooth_nr``, ``smooth_dr``, ``batch``, ``soft_label``, ``ignore_index`` as :class:`DiceLoss`.
    Raises: as :class:`DiceLoss`.
    """

    _family = staticmethod(F.dice_family)
    _arguments = (*_DICE_ARGUMENTS, "alpha", "beta", "soft_label", "ignore_index")

    def __init__(
        self,
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
    ) -> None:
        super().__init__(DiceOptions(
            "tversky_loss", "tversky", include_background, to_onehot_y, sigmoid, softmax, other_act,
            reduction=reduction, smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=batch, soft_label=soft_label,
            ignore_index=ignore_index, alpha=alpha, beta=beta, backend=backend, validate=validate,
            distributed=distributed))


class DiceCELoss(_OptionsLoss):
    """Dice plus cross entropy, exactly MONAI 1.6.1's ``DiceCELoss``: lambda_dice * Dice + lambda_ce * CE.

    The Dice part is :class:`DiceLoss` (activation options apply to it only); the CE part is torch's cross entropy
    on the raw logits with ``weight`` as class weights and ``label_smoothing``, on a label map (B, 1, *S), or on
    probabilities for a one-hot target, or binary cross entropy with logits (``pos_weight=weight``) for C = 1.

    Args: MONAI's: ``include_background``, ``to_onehot_y``, ``sigmoid``, ``softmax``, ``other_act``,
    ``squared_pred``, ``jaccard``, ``reduction`` ("mean" or "sum"; no "none"), ``smooth_nr``, ``smooth_dr``,
    ``batch``, ``weight`` (one per class, background included; the Dice part drops class 0 when
    ``include_background=False``), ``lambda_dice``, ``lambda_ce`` (>= 0), ``label_smoothing`` (in [0, 1]).
    Returns: a scalar. Raises: as :class:`DiceLoss`; ValueError for negative lambdas.
    """

    _family = staticmethod(F.dice_family)
    _arguments = (*_DICE_ARGUMENTS, "squared_pred", "jaccard", "weight", "lambda_dice", "lambda_ce",
                  "label_smoothing")

    def __init__(
        self,
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
        weight: torch.Tensor | Sequence[float] | None = None,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        label_smoothing: float = 0.0,
        *,
        backend: str = "auto",
        validate: bool = False,
        distributed: str = "auto",
    ) -> None:
        super().__init__(DiceOptions(
            "dice_ce_loss", "dice", include_background, to_onehot_y, sigmoid, softmax, other_act, squared_pred,
            jaccard, reduction, smooth_nr, smooth_dr, batch, weight, with_ce=True, lambda_dice=lambda_dice,
            lambda_ce=lambda_ce, label_smoothing=label_smoothing, backend=backend, validate=validate,
            distributed=distributed))


class FocalLoss(_OptionsLoss):
    """Focal loss (Lin et al., ICCV 2017) on logits, exactly MONAI 1.6.1's ``FocalLoss``.

    Sigmoid form (default): (1 - p_t)^gamma * BCE-with-logits per class; ``use_softmax=True``:
    -(1 - p_c)^gamma * log p_c * y_c with p = softmax. ``reduction="none"`` keeps (B, C, *S); "sum" averages over
    space first, as MONAI does.

    Args: ``include_background``, ``to_onehot_y``, ``gamma`` (>= 0, default 2), ``alpha`` (in [0, 1], scalar or
    per class), ``weight`` (class weights >= 0), ``reduction``, ``use_softmax``, ``ignore_index``; ``backend``,
    ``validate``. Float64 inputs stay float64 here (MONAI computes in float32).
    """

    _family = staticmethod(F.dice_family)
    _arguments = ("include_background", "to_onehot_y", "focal_gamma", "focal_alpha", "focal_weight", "reduction",
                  "ignore_index", "backend", "validate")

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | None = None,
        weight: Sequence[float] | float | int | torch.Tensor | None = None,
        reduction: str = "mean",
        use_softmax: bool = False,
        ignore_index: int | None = None,
        *,
        backend: str = "auto",
        validate: bool = False,
    ) -> None:
        super().__init__(DiceOptions(
            "focal_loss", "none", include_background, to_onehot_y, reduction=reduction, ignore_index=ignore_index,
            focal="softmax" if use_softmax else "sigmoid", focal_gamma=gamma, focal_alpha=alpha, focal_weight=weight,
            backend=backend, validate=validate, distributed="off"))
        self.use_softmax = bool(use_softmax)


class DiceFocalLoss(_OptionsLoss):
    """Dice plus focal loss, exactly MONAI 1.6.1's ``DiceFocalLoss``: lambda_dice * Dice + lambda_focal * focal.

    The Dice part is :class:`DiceLoss` (activation options apply to it only); the focal part is MONAI's sigmoid
    :class:`FocalLoss` on the raw logits, with ``gamma``, ``alpha`` and ``weight`` (which weighs both parts). Both
    come from one pass over the logits. ``reduction="none"`` (a (B, C, *S) map, MONAI's broadcast sum) runs the
    reference.

    Args: MONAI's: ``include_background``, ``to_onehot_y``, ``sigmoid``, ``softmax``, ``other_act``,
    ``squared_pred``, ``jaccard``, ``reduction``, ``smooth_nr``, ``smooth_dr``, ``batch``, ``gamma`` (>= 0),
    ``weight``, ``lambda_dice``, ``lambda_focal`` (>= 0), ``alpha`` (in [0, 1] or None); ``backend``, ``validate``,
    ``distributed``.
    """

    _family = staticmethod(F.dice_family)
    _arguments = (*_DICE_ARGUMENTS, "squared_pred", "jaccard", "focal_gamma", "weight", "lambda_dice",
                  "lambda_focal", "focal_alpha")

    def __init__(
        self,
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
        weight: Sequence[float] | float | int | torch.Tensor | None = None,
        lambda_dice: float = 1.0,
        lambda_focal: float = 1.0,
        alpha: float | None = None,
        *,
        backend: str = "auto",
        validate: bool = False,
        distributed: str = "auto",
    ) -> None:
        super().__init__(DiceOptions(
            "dice_focal_loss", "dice", include_background, to_onehot_y, sigmoid, softmax, other_act, squared_pred,
            jaccard, reduction, smooth_nr, smooth_dr, batch, weight, lambda_dice=lambda_dice, focal="sigmoid",
            focal_gamma=gamma, focal_alpha=alpha, focal_weight=weight, lambda_focal=lambda_focal, backend=backend,
            validate=validate, distributed=distributed))


class GeneralizedDiceFocalLoss(_OptionsLoss):
    """Generalized Dice plus focal loss, exactly MONAI 1.6.1's ``GeneralizedDiceFocalLoss``:
    lambda_gdl * generalized Dice + lambda_focal * focal, from one pass over the logits.

    Args: MONAI's: ``include_background``, ``to_onehot_y``, ``sigmoid``, ``softmax``, ``other_act``, ``w_type``,
    ``reduction``, ``smooth_nr``, ``smooth_dr``, ``batch``, ``gamma``, ``weight`` (the focal part's class weights),
    ``lambda_gdl``, ``lambda_focal``; ``backend``, ``validate``, ``distributed``.
    """

    _family = staticmethod(F.dice_family)
    _arguments = (*_DICE_ARGUMENTS, "w_type", "focal_gamma", "focal_weight", "lambda_focal")

    def __init__(
        self,
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
        weight: Sequence[float] | float | int | torch.Tensor | None = None,
        lambda_gdl: float = 1.0,
        lambda_focal: float = 1.0,
        *,
        backend: str = "auto",
        validate: bool = False,
        distributed: str = "auto",
    ) -> None:
        super().__init__(DiceOptions(
            "generalized_dice_focal_loss", "generalized", include_background, to_onehot_y, sigmoid, softmax,
            other_act, reduction=reduction, smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=batch, w_type=w_type,
            lambda_dice=lambda_gdl, focal="sigmoid", focal_gamma=gamma, focal_weight=weight,
            lambda_focal=lambda_focal, backend=backend, validate=validate, distributed=distributed))
        self.lambda_gdl = self.options.lambda_dice


class DBCELoss(_OptionsLoss):
    """Dilated Balanced Cross Entropy (DBCE, arXiv 2412.06045) on logits (B, C, *S) and labels (B, *S) or (B, 1, *S).

    Balanced cross entropy whose class weights come from class areas *dilated* by a ball (or cube) of radius R, so
    a small structure's weight also covers a margin of its surroundings: within each image (or the whole batch with
    ``batch=True``), w_c = N / (K * A_c) with N the valid pixels, K the classes present, A_c the dilated area of
    class c; each pixel takes the largest weight of the dilated classes covering it. The definition in full is in
    :mod:`torch_medloss.reference.dbce` and the README.

    Args:
        radius: R >= 0 in physical units (see ``spacing``). Default 3.0. R = 0 gives :class:`BalancedCELoss`.
        element: "ball" (default) or "cube".
        spacing: voxel size per spatial axis (> 0), so anisotropic voxels get an ellipsoid. Default all 1.
        batch: weights from the whole batch instead of per image. Default False.
        ignore_index: label left out of everything. Default -100.
        reduction: "mean" (sum w*CE / sum w over the batch's valid pixels, 0 if none), "sum", or "none" (the
            (B, *S) map w*CE, 0 at ignored pixels).
        backend, validate, distributed: see :mod:`torch_medloss.losses` (with ``batch=True`` under an initialized
            process group, "auto" sums the counts, areas and normalizer over the ranks: the global-batch loss).

    Raises:
        TypeError: float labels, non-floating logits. ValueError: labels outside [0, C) other than ignore_index,
        shape/device mismatch, negative radius or spacing, a spacing of the wrong length, an unknown element.
    """

    _family = staticmethod(F.dbce_family)
    _arguments = ("radius", "element", "spacing", "batch", "ignore_index", "reduction", "backend", "validate",
                  "distributed")

    def __init__(
        self,
        radius: float = 3.0,
        element: str = "ball",
        spacing: Sequence[float] | None = None,
        batch: bool = False,
        ignore_index: int = -100,
        reduction: str = "mean",
        backend: str = "auto",
        *,
        validate: bool = False,
        distributed: str = "auto",
    ) -> None:
        super().__init__(DBCEOptions(radius, element, spacing, batch, ignore_index, reduction, backend, validate,
                                     distributed))


class BalancedCELoss(_OptionsLoss):
    """Balanced cross entropy: weights N / (K * |M_c|), the inverse class frequency; :class:`DBCELoss` with R = 0.

    Args: ``batch``, ``ignore_index``, ``reduction``, ``backend``, ``validate`` as :class:`DBCELoss`.
    """

    _family = staticmethod(F.dbce_family)
    _arguments = ("batch", "ignore_index", "reduction", "backend", "validate", "distributed")

    def __init__(
        self,
        batch: bool = False,
        ignore_index: int = -100,
        reduction: str = "mean",
        backend: str = "auto",
        *,
        validate: bool = False,
        distributed: str = "auto",
    ) -> None:
        super().__init__(DBCEOptions(0.0, "ball", None, batch, ignore_index, reduction, backend, validate,
                                     distributed))
