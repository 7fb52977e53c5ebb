"""Per-image class counts of a label map: ``label_histogram`` and the internal ops behind it.

Internal ops, all with the contract of ``csrc/label_histogram.cpp`` (labels (B, N) with any strides; int64 counts
(B, C + 1) whose last column counts invalid labels):

- ``torch_medloss::label_histogram``: C++ schema, CPU kernel in csrc/cpu, CUDA kernel in csrc/cuda (backends
  "cpp" and "cuda"; the dispatcher picks the kernel by device). Its fake kernel is registered here.
- ``torch_medloss::label_histogram_triton``: the Triton kernel in torch_medloss.kernels.label_histogram, imported
  only when the "triton" backend runs.
- torch_medloss.reference.label_histogram: the pure-PyTorch ground truth.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
from torch import Tensor

from torch_medloss import _backend, _extension
from torch_medloss.reference import label_histogram as _reference

__all__ = ["label_histogram"]

BACKENDS = ("triton", "cuda", "cpp", "reference")
LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# Invalid values the error message lists at most.
_SHOWN_BAD_VALUES = 8


def label_histogram(
    labels: Tensor, num_classes: int, ignore_index: int = -100, batch: bool = False, backend: str = "auto"
) -> Tensor:
    """Count the pixels of each class in each image of a label map.

    ``counts[b, c]`` is the number of pixels of image ``b`` whose label is ``c``. The labels are class indices, not
    one-hot or probabilities. A singleton channel, (B, 1, H, W), is not treated specially: it is one more pixel dim
    of size 1, which changes no count.

    The labels are always checked: an invalid label raises. On CUDA that costs one device-to-host sync, which a
    histogram, read on the host, needs anyway.

    Args:
        labels: integer tensor (uint8, int8, int16, int32 or int64) of shape (B, *S) = (B, H, W[, D]), with any
            number >= 1 of spatial dims and any strides (a view, channels_last, a slice). A permuted layout is read
            in place when its pixel dims form one strided block in memory, else copied once to contiguous.
        num_classes: C >= 1; the valid labels are 0 .. C - 1.
        ignore_index: pixels with this label are not counted (default -100, PyTorch's cross-entropy default). It may
            also be a class index in [0, C); that class then always counts 0.
        batch: False (default) gives one histogram per image, True sums them over the batch.
        backend: "auto" (default: the fastest backend available for the device, see torch_medloss._backend),
            "triton", "cuda", "cpp" or "reference". A backend named explicitly raises if it cannot run.

    Returns:
        int64 tensor on the labels' device: (B, C) counts when ``batch`` is False, (C,) when it is True.
        Empty labels (a zero-size dim) give zeros without running a kernel.

    Raises:
        TypeError: labels not an integer tensor (float, bool, complex), num_classes or ignore_index not an int,
            batch not a bool, backend not a str.
        ValueError: labels with fewer than 2 dims, num_classes < 1, an unknown backend, a backend that cannot run
            here, or a label that is neither in [0, C) nor ignore_index (the message lists the bad values).

    Example:
        >>> labels = torch.tensor([[[0, 1], [1, -100]], [[2, 2], [2, 0]]])  # (B=2, H=2, W=2)
        >>> label_histogram(labels, num_classes=3)
        tensor([[1, 2, 0],
                [1, 0, 3]])
        >>> label_histogram(labels, num_classes=3, batch=True)
        tensor([2, 2, 3])
    """
    _check_arguments(labels, num_classes, ignore_index, batch)
    backend = _backend.check_backend_name(backend)
    chosen = _backend.resolve("label_histogram", backend, labels.device, BACKENDS)

    if labels.numel() == 0:
        counts = torch.zeros(labels.shape[0], num_classes, dtype=torch.int64, device=labels.device)
        return counts.sum(0) if batch else counts

    counts = _run(chosen, _flatten_pixels(labels), num_classes, ignore_index)
    invalid = counts[:, num_classes]
    if invalid.any():  # the one sync
        raise ValueError(_invalid_labels_message(labels, num_classes, ignore_index, int(invalid.sum())))
    counts = counts[:, :num_classes]
    return counts.sum(0) if batch else counts


# ------------------------------------------------------------------------------------------------- argument checks


def _check_arguments(labels: object, num_classes: object, ignore_index: object, batch: object) -> None:
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}.")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(
            f"labels must be an integer tensor of class indices, one of {_dtype_names()}, got {labels.dtype}."
        )
    if labels.dim() < 2:
        raise ValueError(
            f"labels must have shape (B, *spatial) with at least one spatial dim, got shape {tuple(labels.shape)}."
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__} ({num_classes!r}).")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    if num_classes >= _INT64_MAX:
        raise ValueError(f"num_classes must be < 2**63 - 1, got {num_classes}.")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__} ({ignore_index!r}).")
    if not _INT64_MIN <= ignore_index <= _INT64_MAX:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}.")
    if not isinstance(batch, bool):
        raise TypeError(f"batch must be a bool, got {type(batch).__name__} ({batch!r}).")


def _dtype_names() -> str:
    return ", ".join(str(dtype).removeprefix("torch.") for dtype in LABEL_DTYPES)


def _invalid_labels_message(labels: Tensor, num_classes: int, ignore_index: int, count: int) -> str:
    wide = labels.long()  # compare in int64: as uint8, -100 would wrap to 156
    bad = torch.unique(wide[((wide < 0) | (wide >= num_classes)) & (wide != ignore_index)])
    shown = ", ".join(str(value) for value in bad[:_SHOWN_BAD_VALUES].tolist())
    more = f" and {bad.numel() - _SHOWN_BAD_VALUES} more" if bad.numel() > _SHOWN_BAD_VALUES else ""
    return (
        f"labels must be class indices in [0, {num_classes}) or ignore_index={ignore_index}; found {count} pixel(s) "
        f"with invalid values: {shown}{more}."
    )


# ------------------------------------------------------------------------------------------------ layout and ops


def _flatten_pixels(labels: Tensor) -> Tensor:
    """View (B, *S) labels as (B, N), copying only when no view exists.

    A histogram does not depend on the order of the pixels, so the pixel dims may be merged in memory order rather
    than in logical order: a channels_last or transposed map becomes a (B, N) view with ``stride(1) == 1`` (or
    another single stride). When the pixel dims do not form one evenly strided block (the batch dim lies between
    them, or a slice left gaps), the one copy below makes them contiguous.
    """
    batch, pixels = labels.shape[0], math.prod(labels.shape[1:])
    dims = [d for d in range(1, labels.dim()) if labels.shape[d] != 1]
    dims.sort(key=lambda d: labels.stride(d), reverse=True)  # memory order: outermost first
    mergeable = all(labels.stride(a) == labels.stride(b) * labels.shape[b] for a, b in pairwise(dims))
    in_memory_order = labels.permute(0, *dims, *(d for d in range(1, labels.dim()) if d not in dims))
    if not mergeable:
        in_memory_order = in_memory_order.contiguous()  # the copy
    return in_memory_order.view(batch, pixels)


def _run(backend: str, flat: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    if backend == "reference":
        return _reference.label_histogram(flat, num_classes, ignore_index)
    if backend == "triton":
        try:
            from torch_medloss.kernels.label_histogram import label_histogram_triton  # imports triton
        except ModuleNotFoundError as exc:
            if exc.name not in ("torch_medloss.kernels", "torch_medloss.kernels.label_histogram"):
                raise
            raise ImportError(
                "the triton backend needs torch_medloss.kernels, which setup.py maps from the repository's kernels/ "
                "directory: install torch_medloss (pip install -e . in a checkout)."
            ) from exc
        return label_histogram_triton(flat, num_classes, ignore_index)
    # "cpp" and "cuda" are the same op: the dispatcher runs its CPU or CUDA kernel by the device of the labels.
    return torch.ops.torch_medloss.label_histogram(flat, num_classes, ignore_index)


def check_op_inputs(labels: Tensor, num_classes: int) -> None:
    """The checks every kernel of the internal ops makes (and their fake kernels, on fake tensors)."""
    if labels.dim() != 2:
        raise ValueError(f"torch_medloss::label_histogram: labels must be 2-D (B, N), got shape {tuple(labels.shape)}.")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"torch_medloss::label_histogram: labels must be one of {_dtype_names()}, got {labels.dtype}.")
    if num_classes < 1:
        raise ValueError(f"torch_medloss::label_histogram: num_classes must be >= 1, got {num_classes}.")


def label_histogram_fake(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Fake (meta) kernel of both internal ops: checks the inputs and gives the (B, C + 1) int64 output."""
    check_op_inputs(labels, num_classes)
    return labels.new_empty((labels.shape[0], num_classes + 1), dtype=torch.int64)


def _register_fake_kernel() -> None:
    # Called from this module: csrc/label_histogram.cpp names it with set_python_module, as torch requires of a C++
    # op with a Python fake kernel.
    torch.library.register_fake("torch_medloss::label_histogram", label_histogram_fake)


# torch accepts a fake kernel only for an op that exists, and the C++ op exists once the library is loaded (on first
# use, not at import).
_extension.when_loaded(_register_fake_kernel)
