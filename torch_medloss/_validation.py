"""Argument checks shared by the losses and their functional forms.

Options are checked once, when a loss is constructed (the functional forms check them on each call). Tensor checks
run on every call. Checks that read tensor *values* (label ranges) run up front for CPU tensors, and for CUDA tensors
only with ``validate=True``: on the GPU fast path a bad label turns the loss into NaN instead of costing a sync.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: object, allowed: Sequence[str] = REDUCTIONS) -> str:
    value = getattr(reduction, "value", reduction)  # MONAI passes LossReduction enum members
    if not isinstance(value, str):
        raise TypeError(f"reduction must be a str, one of {tuple(allowed)}, got {type(reduction).__name__}.")
    if value not in allowed:
        raise ValueError(f"reduction must be one of {tuple(allowed)}, got {value!r}.")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, (bool, int)) or isinstance(value, float):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}.")
    return bool(value)


def check_nonnegative_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}.")
    return value


def check_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}.")
    return float(value)


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


def check_ignore_index(ignore_index: object, allow_none: bool = True) -> int | None:
    if ignore_index is None and allow_none:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        expected = "an int or None" if allow_none else "an int"
        raise TypeError(f"ignore_index must be {expected}, got {type(ignore_index).__name__}.")
    return int(ignore_index)


def per_class_values(name: str, value: object, allow_none: bool = True) -> torch.Tensor | None:
    """A scalar or a sequence of per-class values >= 0 (class weights, PM Dice gammas) as a float64 tensor."""
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{name} must be a number or a sequence of numbers, got None.")
    try:
        tensor = torch.as_tensor(value).detach().to("cpu", torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be a number or a sequence of numbers, got {type(value).__name__}.") from exc
    if tensor.ndim > 1:
        shape = tuple(tensor.shape)
        raise ValueError(f"{name} must be a scalar or a 1-D sequence (one value per class), got shape {shape}.")
    if not torch.isfinite(tensor).all() or (tensor < 0).any():
        raise ValueError(f"{name} must be finite and >= 0, got {tensor.tolist()}.")
    return tensor


def expand_per_class(name: str, values: torch.Tensor, num_classes: int, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar to ``num_classes`` values, or check a sequence's length; cast to ``like``."""
    if values.ndim == 0:
        values = values.expand(num_classes)
    elif values.shape[0] != num_classes:
        raise ValueError(
            f"{name} has {values.shape[0]} values but there are {num_classes} classes "
            "(with include_background=False, leave out the background class 0)."
        )
    return values.to(device=like.device, dtype=like.dtype)


def check_logits(input: object, name: str = "input") -> torch.Tensor:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(input).__name__}.")
    if not input.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (logits), got dtype {input.dtype}.")
    if input.ndim < 3:
        raise ValueError(
            f"{name} must have shape (B, C, *spatial) with at least one spatial dim, got shape {tuple(input.shape)}."
        )
    return input


def check_same_device(input: torch.Tensor, target: torch.Tensor, target_name: str = "target") -> None:
    if input.device != target.device:
        raise ValueError(f"input and {target_name} must be on the same device, got {input.device} and {target.device}.")


def check_label_map(
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int | None,
    validate: bool,
    name: str = "target",
    allow_float: bool = False,
) -> None:
    """Check that a label map holds class indices in [0, num_classes) or ``ignore_index``.

    Reads the values (one device sync on CUDA), so it runs for CPU tensors always and for CUDA tensors only when
    ``validate`` is set. ``allow_float`` accepts float label maps holding whole numbers: MONAI pipelines load labels
    as float tensors, and MONAI's own losses take them.
    """
    if labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"{name} must hold integer class labels, got dtype {labels.dtype}.")
    if labels.is_floating_point() and not allow_float:
        raise TypeError(f"{name} must be an integer tensor of class labels, got dtype {labels.dtype}.")
    if not (validate or labels.device.type == "cpu") or labels.numel() == 0:
        return
    if torch.compiler.is_compiling():
        return  # reading values would break the graph: compiled code gets the NaN path of unchecked CUDA tensors
    if labels.is_floating_point():
        whole = labels == torch.round(labels)
        if not bool(whole.all()):
            bad = labels[~whole][:5].tolist()
            raise ValueError(f"{name} holds float labels that are not whole numbers, e.g. {bad}.")
    lowest, highest = torch.aminmax(labels)
    if lowest >= 0 and highest < num_classes:  # the common case, in one cheap pass
        return
    valid = (labels >= 0) & (labels < num_classes)
    if ignore_index is not None:
        valid |= labels == ignore_index
    if not bool(valid.all()):
        bad = torch.unique(labels[~valid])[:8].tolist()
        allowed = f"[0, {num_classes})" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
        raise ValueError(f"{name} holds labels outside {allowed}: {bad}.")


def invalid_label_flag(labels: torch.Tensor, num_classes: int, ignore_index: int | None) -> torch.Tensor:
    """A 0-dim bool tensor, True when any label is out of range. No sync: used to turn the loss into NaN."""
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        bad &= labels != ignore_index
    return bad.any()
