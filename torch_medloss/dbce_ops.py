"""The fused DBCE ops: dilated class masks in one pass over the labels, and a one-pass weighted cross entropy.

Contract: torch_medloss.reference.dbce_ops (the pure-PyTorch ground truth). Implementations:

- ``torch_medloss::dbce_masks`` / ``dbce_ce_fwd`` / ``dbce_ce_bwd``: C++ schema in csrc/dbce.cpp, CPU kernels in
  csrc/cpu, CUDA kernels in csrc/cuda (backends "cpp" and "cuda"); fake kernels and autograd registered here once
  the library is loaded.
- ``torch_medloss::dbce_masks_triton`` / ``dbce_ce_fwd_triton`` / ``dbce_ce_bwd_triton``: Triton kernels in
  torch_medloss.kernels.dbce, imported (and given autograd) on first use.
- "reference": torch_medloss.reference.dbce_ops through plain autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch_medloss import _autograd, _extension
from torch_medloss.reference import dbce_ops as _reference

__all__ = ["dbce_ce", "dbce_masks"]



def dbce_masks(backend: str, labels: Tensor, num_classes: int, ignore_index: int, element: int, radius: float,
               spacing: list[float]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run the masks op with an already-resolved backend; labels (B, D, H, W)."""
    args = (labels, num_classes, ignore_index, element, float(radius), [float(s) for s in spacing])
    if backend == "reference":
        return _reference.dbce_masks(*args)
    if backend == "triton":
        return _triton_ops()["masks"](*args)
    return torch.ops.torch_medloss.dbce_masks(*args)


def dbce_ce(backend: str, logits: Tensor, labels: Tensor, masks: Tensor, class_weights: Tensor, ignore_index: int,
            write_map: bool) -> tuple[Tensor, Tensor]:
    """Run the weighted cross entropy (differentiable in ``logits``) with an already-resolved backend."""
    args = (logits, labels, masks, class_weights, ignore_index, write_map)
    if backend == "reference":
        return _reference.dbce_ce_fwd(*args)
    if backend == "triton":
        return _triton_ops()["ce_fwd"](*args)
    return torch.ops.torch_medloss.dbce_ce_fwd(*args)


# ------------------------------------------------------------------------------------------- fake kernels (shapes)


def dbce_masks_fake(labels, num_classes, ignore_index, element, radius, spacing):
    if labels.dim() != 4:
        raise ValueError(f"dbce_masks: labels must be (B, D, H, W), got shape {tuple(labels.shape)}.")
    batch = labels.shape[0]
    return (
        labels.new_empty(labels.shape, dtype=_reference.mask_dtype(num_classes)),
        labels.new_empty((batch, num_classes), dtype=torch.int64),
        labels.new_empty((batch, num_classes), dtype=torch.int64),
        labels.new_empty((batch,), dtype=torch.int64),
    )


def _accumulator(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def dbce_ce_fwd_fake(logits, labels, masks, class_weights, ignore_index, write_map):
    if logits.dim() != 3 or tuple(labels.shape) != (logits.shape[0], logits.shape[2]):
        raise ValueError(f"dbce_ce_fwd: logits (B, C, S) and labels (B, S) expected, got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}.")
    dtype = _accumulator(logits)
    batch, _, pixels = logits.shape
    map_shape = (batch, pixels) if write_map else (0,)
    return logits.new_empty((batch, 2), dtype=dtype), logits.new_empty(map_shape, dtype=dtype)


def dbce_ce_bwd_fake(grad_sums, grad_map, logits, labels, masks, class_weights, ignore_index, write_map):
    return torch.empty_like(logits)


def _register(forward: str, backward: str, backward_op) -> None:
    _autograd.register(forward, backward, backward_op, "the fused DBCE cross entropy")


def _register_compiled_ops() -> None:
    # Named by csrc/dbce.cpp through set_python_module, as torch requires of C++ ops with Python fake kernels.
    if not torch._C._dispatch_has_kernel("torch_medloss::dbce_ce_fwd"):
        return
    torch.library.register_fake("torch_medloss::dbce_masks", dbce_masks_fake)
    torch.library.register_fake("torch_medloss::dbce_ce_fwd", dbce_ce_fwd_fake)
    torch.library.register_fake("torch_medloss::dbce_ce_bwd", dbce_ce_bwd_fake)
    _register("torch_medloss::dbce_ce_fwd", "torch_medloss::dbce_ce_bwd", torch.ops.torch_medloss.dbce_ce_bwd)


_extension.when_loaded(_register_compiled_ops)

_triton: dict | None = None


def _triton_ops() -> dict:
    """The Triton ops, imported (which imports triton) and given autograd on first use."""
    global _triton
    if _triton is None:
        from torch_medloss.kernels import dbce as kernels  # noqa: F401  (registers the triton_ops)

        ops = torch.ops.torch_medloss
        _register("torch_medloss::dbce_ce_fwd_triton", "torch_medloss::dbce_ce_bwd_triton", ops.dbce_ce_bwd_triton)
        _triton = {"masks": ops.dbce_masks_triton, "ce_fwd": ops.dbce_ce_fwd_triton}
    return _triton
