"""The options of each loss family, checked once into one frozen object.

A loss module builds its options in ``__init__`` and hands the same object to its functional form on every call; a
functional call builds it from its arguments. Checking happens here and only here (TypeError for a wrong type,
ValueError for a bad value, the message naming the argument), so every layer below trusts the object.

Per-class values (class weights, PM Dice's gamma, focal alpha) are kept as floats (a scalar) or tuples (one per
class). The fused kernels read them from one small device tensor per (device, dtype, class count), built on first
use and cached on the options object, so a loss module's call starts no copy to the device after its first.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from torch_medloss import _backend, _distributed
from torch_medloss import _contract as K

REDUCTIONS = ("mean", "sum", "none")
PerClass = float | tuple[float, ...] | None


# ------------------------------------------------------------------------------------------------------- checks


def check_reduction(reduction: object, allowed: tuple[str, ...] = REDUCTIONS) -> str:
    value = getattr(reduction, "value", reduction)  # MONAI passes LossReduction enum members
    if value is None:
        # MONAI raises ValueError for reduction=None ("Unsupported reduction: None"); so do we.
        raise ValueError(f"reduction must be one of {allowed}, got None.")
    if not isinstance(value, str):
        raise TypeError(f"reduction must be a str, one of {allowed}, got {type(reduction).__name__}.")
    if value not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {value!r}.")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, (bool, int)) or isinstance(value, float):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}.")
    return bool(value)


def check_real(name: str, value: object, low: float | None = None, high: float | None = None,
               low_open: bool = False) -> float:
    """A finite real number in [low, high] (or (low, high] with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}.")
    value = float(value)
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and value > high
    if not math.isfinite(value) or below or above:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            bounds.append(f"<= {high:g}")
        expected = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
        raise ValueError(f"{name} must be {expected}, got {value}.")
    return value


def check_int(name: str, value: object, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {type(value).__name__}.")
    return int(value)


def check_per_class(name: str, value: object, allow_none: bool = True, high: float | None = None) -> PerClass:
    """A scalar or a 1-D sequence of finite values >= 0 (and <= high): a float or a tuple of floats."""
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{name} must be a number or a sequence of numbers, got None.")
    try:
        tensor = torch.as_tensor(value).detach().to("cpu", torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be a number or a sequence of numbers, got {type(value).__name__}.") from exc
    if tensor.ndim > 1:
        raise ValueError(f"{name} must be a scalar or a 1-D sequence (one value per class), got shape "
                         f"{tuple(tensor.shape)}.")
    bad = ~torch.isfinite(tensor) | (tensor < 0)
    if high is not None:
        bad |= tensor > high
    if bad.any():
        expected = "finite and >= 0" + (f" and <= {high:g}" if high is not None else "")
        raise ValueError(f"{name} must be {expected}, got {tensor.tolist()}.")
    return float(tensor) if tensor.ndim == 0 else tuple(tensor.tolist())


def check_activation(sigmoid: object, softmax: object, other_act: Callable | None) -> None:
    check_bool("sigmoid", sigmoid)
    check_bool("softmax", softmax)
    if other_act is not None and not callable(other_act):
        raise TypeError(f"other_act must be None or callable, got {type(other_act).__name__}.")
    if int(bool(sigmoid)) + int(bool(softmax)) + int(other_act is not None) > 1:
        raise ValueError(
            "Incompatible values: more than one activation chosen among sigmoid=True, softmax=True and other_act; "
            "choose at most one."
        )


def expand(name: str, values: PerClass, num_classes: int) -> list[float]:
    """A scalar broadcast to ``num_classes`` values, or a sequence checked to have that many."""
    if isinstance(values, float):
        return [values] * num_classes
    if len(values) != num_classes:
        raise ValueError(
            f"{name} has {len(values)} values but there are {num_classes} classes "
            "(with include_background=False, leave out the background class 0)."
        )
    return list(values)


def as_tensor(values: PerClass) -> torch.Tensor | None:
    """The float64 tensor the references take (0-dim for a scalar)."""
    return None if values is None else torch.tensor(values, dtype=torch.float64)


class _DeviceCache:
    """Small per-(device, dtype, classes) tensors of an options object; not part of its value (eq, hash, repr)."""

    def __init__(self) -> None:
        self.tensors: dict = {}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _DeviceCache)

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "_DeviceCache()"

    def get(self, key, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return build()  # a constant of the graph; the cache would be a side effect for dynamo
        tensor = self.tensors.get(key)
        if tensor is None:
            tensor = self.tensors[key] = build()
        return tensor


# ---------------------------------------------------------------------------------------------------- Dice family


@dataclass(frozen=True)
class DiceOptions:
    """Every option of the Dice family (Dice, PM Dice, generalized Dice, Tversky, Dice+CE).

    ``head`` picks the loss computed from the sums ("none": no Dice part, FocalLoss); ``gamma`` set makes it PM
    Dice; ``with_ce`` adds Dice+CE's cross entropy (``weight`` then also weighs the cross entropy, one value per
    class including the background); ``focal`` ("sigmoid" or "softmax") adds MONAI's focal loss on the raw logits
    with ``focal_gamma``, ``focal_alpha`` and the class weights ``focal_weight`` (DiceFocalLoss passes its weight to
    both parts). The names and defaults of the rest are MONAI's; ``name`` is the functional form's, for messages.
    """

    name: str = "dice_loss"
    head: str = "dice"
    include_background: bool = True
    to_onehot_y: bool = False
    sigmoid: bool = False
    softmax: bool = False
    other_act: Callable | None = None
    squared_pred: bool = False
    jaccard: bool = False
    reduction: str = "mean"
    smooth_nr: float = 1e-5
    smooth_dr: float = 1e-5
    batch: bool = False
    weight: PerClass = None
    soft_label: bool = False
    ignore_index: int | None = None
    gamma: PerClass = None
    w_type: str = "square"
    alpha: float = 0.5
    beta: float = 0.5
    with_ce: bool = False
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0
    label_smoothing: float = 0.0
    focal: str | None = None
    focal_gamma: float = 2.0
    focal_alpha: PerClass = None
    focal_weight: PerClass = None
    lambda_focal: float = 1.0
    backend: str = "auto"
    validate: bool = False
    distributed: str = "auto"
    _cache: _DeviceCache = field(default_factory=_DeviceCache, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        check_activation(self.sigmoid, self.softmax, self.other_act)
        if self.focal not in (None, "sigmoid", "softmax"):
            raise ValueError(f"focal must be None, 'sigmoid' or 'softmax', got {self.focal!r}.")
        set_(self, "focal_gamma", check_real("gamma", self.focal_gamma, 0.0))
        set_(self, "focal_alpha", check_per_class("alpha", self.focal_alpha, high=1.0))
        set_(self, "focal_weight", check_per_class("weight", self.focal_weight))
        set_(self, "lambda_focal", check_real("lambda_focal", self.lambda_focal, 0.0))
        for flag in ("include_background", "to_onehot_y", "sigmoid", "softmax", "squared_pred", "jaccard", "batch",
                     "soft_label", "with_ce", "validate"):
            set_(self, flag, check_bool(flag, getattr(self, flag)))
        # DiceCELoss has no "none": its Dice part reduces over space, its cross entropy does not.
        set_(self, "reduction", check_reduction(self.reduction, ("mean", "sum") if self.with_ce else REDUCTIONS))
        if self.head not in ("dice", "generalized", "tversky", "none"):
            raise ValueError(f"head must be 'dice', 'generalized', 'tversky' or 'none', got {self.head!r}.")
        # MONAI lets any float through and gives NaN or inf losses; a smoothing term must be a finite number >= 0.
        set_(self, "smooth_nr", check_real("smooth_nr", self.smooth_nr, 0.0))
        set_(self, "smooth_dr", check_real("smooth_dr", self.smooth_dr, 0.0))
        set_(self, "alpha", check_real("alpha", self.alpha, 0.0))
        set_(self, "beta", check_real("beta", self.beta, 0.0))
        set_(self, "lambda_dice", check_real("lambda_dice", self.lambda_dice, 0.0))
        set_(self, "lambda_ce", check_real("lambda_ce", self.lambda_ce, 0.0))
        set_(self, "label_smoothing", check_real("label_smoothing", self.label_smoothing, 0.0, 1.0))
        set_(self, "weight", check_per_class("weight", self.weight))
        set_(self, "gamma", check_per_class("gamma", self.gamma))
        set_(self, "ignore_index", check_int("ignore_index", self.ignore_index, allow_none=True))
        w_type = getattr(self.w_type, "value", self.w_type)
        if w_type not in ("square", "simple", "uniform"):
            raise ValueError(f"w_type must be one of ('square', 'simple', 'uniform'), got {w_type!r}.")
        set_(self, "w_type", w_type)
        set_(self, "backend", _backend.check_backend_name(self.backend))
        set_(self, "distributed", _distributed.check_distributed(self.distributed))
        if self.with_ce and isinstance(self.weight, float):
            raise ValueError("weight must hold one value per class for the cross entropy, got a scalar.")

    @property
    def scalars(self) -> list[float]:
        values = [0.0] * K.DICE_NUM_SCALARS
        values[K.DICE_SCALAR_LABEL_SMOOTHING] = self.label_smoothing
        values[K.DICE_SCALAR_SMOOTH_NR] = self.smooth_nr
        values[K.DICE_SCALAR_SMOOTH_DR] = self.smooth_dr
        values[K.DICE_SCALAR_ALPHA] = self.alpha
        values[K.DICE_SCALAR_BETA] = self.beta
        values[K.DICE_SCALAR_LAMBDA_DICE] = self.lambda_dice
        values[K.DICE_SCALAR_LAMBDA_CE] = self.lambda_ce
        values[K.DICE_SCALAR_FOCAL_GAMMA] = self.focal_gamma
        values[K.DICE_SCALAR_FOCAL_ALPHA] = self.focal_alpha if isinstance(self.focal_alpha, float) else 0.0
        values[K.DICE_SCALAR_LAMBDA_FOCAL] = self.lambda_focal
        return values

    def focal_alpha_mode(self, kept: int) -> int:
        """_contract.ALPHA_*: MONAI's softmax focal loss ignores a scalar alpha without the background (it warns)."""
        if self.focal_alpha is None:
            return K.ALPHA_NONE
        if isinstance(self.focal_alpha, float):
            if self.focal == "softmax" and not self.include_background:
                warnings.warn("`include_background=False`, scalar `alpha` ignored when using softmax.", stacklevel=4)
                return K.ALPHA_NONE
            return K.ALPHA_SCALAR
        return K.ALPHA_PER_CLASS

    def dice_weights(self, kept: int) -> list[float] | None:
        """The Dice class weights of the kept classes, or None (MONAI weighs no single-class loss)."""
        if self.weight is None or kept == 1:
            return None
        if self.with_ce:
            full = expand("weight", self.weight, kept + (0 if self.include_background else 1))
            return full[len(full) - kept:]
        return expand("weight", self.weight, kept)

    def params(self, num_classes: int, drop: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The (3, C) per-class tensor of the kernels (_contract.DICE_PARAM_*), cached per device and dtype."""

        def build() -> torch.Tensor:
            rows = [[0.0] * num_classes, [1.0] * num_classes, [1.0] * num_classes]
            kept = num_classes - drop
            if self.gamma is not None:
                gammas = expand("gamma", self.gamma, kept)
                # The left-out class's own sums are never read; giving it a kept class's gamma keeps the kernels'
                # fast path for a uniform gamma (m = 1 or m = d^2) instead of the general pow.
                rows[K.DICE_PARAM_GAMMA] = gammas[:1] * drop + gammas
            weights = self.dice_weights(kept)
            if weights is not None:
                rows[K.DICE_PARAM_WEIGHT] = [1.0] * drop + weights
            if self.with_ce and self.weight is not None:
                rows[K.DICE_PARAM_CE_WEIGHT] = expand("weight", self.weight, num_classes)
            rows.append([0.0] * num_classes)  # DICE_PARAM_FOCAL_ALPHA
            rows.append([1.0] * num_classes)  # DICE_PARAM_FOCAL_WEIGHT
            if isinstance(self.focal_alpha, tuple):
                rows[K.DICE_PARAM_FOCAL_ALPHA] = [0.0] * drop + expand("alpha", self.focal_alpha, kept)
            if self.focal_weight is not None:
                if isinstance(self.focal_weight, tuple) and kept == 1:
                    raise ValueError("weight: per-class weights are not supported for single-channel outputs.")
                rows[K.DICE_PARAM_FOCAL_WEIGHT] = [1.0] * drop + expand("weight", self.focal_weight, kept)
            return torch.tensor(rows, dtype=dtype, device=device)

        return self._cache.get((device, dtype, num_classes, drop), build)


# -------------------------------------------------------------------------------------------------------- DBCE


@dataclass(frozen=True)
class DBCEOptions:
    """DBCE's options; balanced cross entropy is radius 0."""

    radius: float = 3.0
    element: str = "ball"
    spacing: tuple[float, ...] | None = None
    batch: bool = False
    ignore_index: int = -100
    reduction: str = "mean"
    backend: str = "auto"
    validate: bool = False
    distributed: str = "auto"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.element not in ("ball", "cube"):
            raise ValueError(f"element must be 'ball' or 'cube', got {self.element!r}.")
        spacing = self.spacing
        if spacing is not None:
            if isinstance(spacing, (str, bytes)) or not hasattr(spacing, "__len__"):
                raise TypeError(f"spacing must be None or a sequence of voxel sizes, got {type(spacing).__name__}.")
            spacing = tuple(check_real("spacing", s, 0.0, low_open=True) for s in spacing)
        set_(self, "spacing", spacing)
        set_(self, "radius", check_real("radius", self.radius, 0.0))
        set_(self, "batch", check_bool("batch", self.batch))
        set_(self, "ignore_index", check_int("ignore_index", self.ignore_index))
        set_(self, "reduction", check_reduction(self.reduction))
        set_(self, "validate", check_bool("validate", self.validate))
        set_(self, "backend", _backend.check_backend_name(self.backend))
        set_(self, "distributed", _distributed.check_distributed(self.distributed))
