"""Argument checks shared by the losses and their functional forms.

Options are checked once, when a loss is constructed (the functional forms check them on each call). Tensor checks
run on every call. Checks that read tensor *values* (label ranges) run up front for CPU tensors, and for CUDA tensors
only with ``validate=True``: on the GPU fast path a bad label turns the loss into NaN instead of costing a sync.
"""

from __future__ import annotations

import torch


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


def check_logits(input: object, name: str = "input", min_ndim: int = 3) -> torch.Tensor:
    """A floating-point (B, C, *S) tensor; ``min_ndim=2`` also takes MONAI's (B, C) classification-style input."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(input).__name__}.")
    if not input.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (logits), got dtype {input.dtype}.")
    if input.ndim < min_ndim:
        layout = "(B, C) or (B, C, *spatial)" if min_ndim == 2 else "(B, C, *spatial) with at least one spatial dim"
        raise ValueError(f"{name} must have shape {layout}, got shape {tuple(input.shape)}.")
    return input


def check_target_shape(input: torch.Tensor, target: torch.Tensor, expects_labels: bool) -> torch.Tensor:
    """Check a Dice-family target against the logits; returns it with the channel dim a label map may lack."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}.")
    check_same_device(input, target)
    if expects_labels and target.ndim == input.ndim - 1:
        target = target.unsqueeze(1)  # (B, *S) label maps, as nnU-Net passes them
    if target.ndim != input.ndim or target.shape[0] != input.shape[0] or target.shape[2:] != input.shape[2:]:
        layout = "(B, 1, *S) or (B, *S) labels" if expects_labels else "(B, C, *S) one-hot"
        raise ValueError(
            f"target must match input's batch and spatial shape as {layout}: input has shape {tuple(input.shape)}, "
            f"target has shape {tuple(target.shape)}."
        )
    expected_channels = 1 if expects_labels else input.shape[1]
    if target.shape[1] != expected_channels:
        if expects_labels:
            raise ValueError(
                f"target must be a label map with 1 channel when to_onehot_y=True, got shape {tuple(target.shape)}."
            )
        raise ValueError(
            f"target must be one-hot with {input.shape[1]} classes like input {tuple(input.shape)}, got shape "
            f"{tuple(target.shape)} (pass to_onehot_y=True for a label map)."
        )
    return target


def check_dice_target(input: torch.Tensor, target: object, to_onehot_y: bool) -> torch.Tensor:
    """A Dice-family target against (B, C, *S) logits: (B, 1, *S) or (B, *S) labels with ``to_onehot_y`` (and
    C > 1), else (B, C, *S) one-hot or soft; returned with the channel dim a label map may lack."""
    return check_target_shape(input, target, to_onehot_y and input.shape[1] > 1)


def holds(dtype: torch.dtype, value: int) -> bool:
    """Whether an integer (or float) dtype can hold ``value``: if not, no label equals it (labels are compared as
    integers, never through a wrapped copy such as -100 -> 156 in uint8)."""
    if dtype.is_floating_point:
        return True
    info = torch.iinfo(dtype)
    return info.min <= value <= info.max


def check_dbce_labels(input: torch.Tensor, labels: object, ignore_index: int, validate: bool) -> torch.Tensor:
    """Labels (B, *S) or (B, 1, *S) matching logits (B, C, *S); returns them as (B, *S)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of class labels, got {type(labels).__name__}.")
    check_same_device(input, labels)
    if labels.ndim == input.ndim and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.shape != input.shape[:1] + input.shape[2:]:
        raise ValueError(
            f"target must be labels of shape (B, *S) or (B, 1, *S) matching input (B, C, *S): input has shape "
            f"{tuple(input.shape)}, target has shape {tuple(labels.shape)}."
        )
    check_label_map(labels, input.shape[1], ignore_index, validate)
    return labels


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
    lowest, highest = (value.item() for value in torch.aminmax(labels))
    if lowest >= 0 and highest < num_classes:  # the common case, in one cheap pass
        return
    valid = (labels >= 0) & (labels < num_classes)
    if ignore_index is not None and holds(labels.dtype, ignore_index):
        valid |= labels == ignore_index
    if not bool(valid.all()):
        bad = torch.unique(labels[~valid])[:8].tolist()
        allowed = f"[0, {num_classes})" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
        raise ValueError(f"{name} holds labels outside {allowed}: {bad}.")


def invalid_label_flag(labels: torch.Tensor, num_classes: int, ignore_index: int | None) -> torch.Tensor:
    """A 0-dim bool tensor, True when any label is out of range. No sync: used to turn the loss into NaN."""
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None and holds(labels.dtype, ignore_index):
        bad &= labels != ignore_index
    return bad.any()
