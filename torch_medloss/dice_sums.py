"""The fused Dice-family sums: one pass over the logits forward, one backward, behind autograd custom ops.

Contract: torch_medloss.reference.dice_sums (the pure-PyTorch ground truth). Implementations:

- ``torch_medloss::dice_sums_fwd`` / ``_bwd``: C++ schema in csrc/dice_sums.cpp, CPU kernel in csrc/cpu, CUDA kernel
  in csrc/cuda (backends "cpp" and "cuda": one op, the dispatcher picks the kernel by device). Its fake kernels and
  autograd are registered here once the library is loaded.
- ``torch_medloss::dice_sums_fwd_triton`` / ``_bwd_triton``: Triton kernels in torch_medloss.kernels.dice_sums,
  imported (and given autograd) only when the "triton" backend first runs.
- "reference": torch_medloss.reference.dice_sums through plain autograd.

Saved for backward: the inputs only (logits, target, gamma, ce_weight); the backward recomputes the activation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch_medloss import _autograd, _extension
from torch_medloss.reference import dice_sums as _reference

__all__ = ["NUM_SUMS", "dice_sums"]

NUM_SUMS = 4  # I, P, G, D per (batch item, class)
NUM_EXTRAS = 3  # ce_num, ce_den, invalid per batch item


def dice_sums(
    backend: str,
    logits: Tensor,
    target: Tensor,
    gamma: Tensor,
    ce_weight: Tensor,
    activation: int,
    target_is_labels: bool,
    ignore_index: int,
    mask_mode: int,
    squared: bool,
    with_ce: bool,
    label_smoothing: float,
) -> tuple[Tensor, Tensor]:
    """Run the sums with an already-resolved backend; see torch_medloss.reference.dice_sums for the arguments."""
    args = (logits, target, gamma, ce_weight, activation, target_is_labels, ignore_index, mask_mode, squared,
            with_ce, float(label_smoothing))
    if backend == "reference":
        return _reference.dice_sums_fwd(*args)
    if backend == "triton":
        return _triton_ops()[0](*args)
    return torch.ops.torch_medloss.dice_sums_fwd(*args)


# ------------------------------------------------------------------------------------------- fake kernels (shapes)


def check_op_inputs(logits: Tensor, target: Tensor, gamma: Tensor, ce_weight: Tensor, target_is_labels: bool) -> None:
    """The checks shared by the fake kernels (the compiled kernels make the same ones)."""
    if logits.dim() != 3:
        raise ValueError(f"dice_sums: logits must be (B, C, S), got shape {tuple(logits.shape)}.")
    batch, classes, pixels = logits.shape
    expected = (batch, pixels) if target_is_labels else (batch, classes, pixels)
    if tuple(target.shape) != expected:
        raise ValueError(f"dice_sums: target must have shape {expected}, got {tuple(target.shape)}.")
    for name, tensor in (("gamma", gamma), ("ce_weight", ce_weight)):
        if tuple(tensor.shape) != (classes,):
            raise ValueError(f"dice_sums: {name} must have shape ({classes},), got {tuple(tensor.shape)}.")


def _accumulator(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def dice_sums_fwd_fake(logits, target, gamma, ce_weight, activation, target_is_labels, ignore_index, mask_mode,
                       squared, with_ce, label_smoothing):
    check_op_inputs(logits, target, gamma, ce_weight, target_is_labels)
    batch, classes, _ = logits.shape
    dtype = _accumulator(logits)
    return logits.new_empty((batch, classes, NUM_SUMS), dtype=dtype), logits.new_empty((batch, NUM_EXTRAS), dtype=dtype)


def dice_sums_bwd_fake(grad_sums, grad_extras, logits, target, gamma, ce_weight, activation, target_is_labels,
                       ignore_index, mask_mode, squared, with_ce, label_smoothing):
    check_op_inputs(logits, target, gamma, ce_weight, target_is_labels)
    return torch.empty_like(logits)


def _register(forward: str, backward: str, backward_op) -> None:
    _autograd.register(forward, backward, backward_op, "the fused Dice sums")


def _register_compiled_ops() -> None:
    # Named by csrc/dice_sums.cpp through set_python_module, as torch requires of C++ ops with Python fake kernels.
    if not torch._C._dispatch_has_kernel("torch_medloss::dice_sums_fwd"):
        return  # a library built without csrc/dice_sums.cpp (an older cache entry cannot be: the hash covers sources)
    torch.library.register_fake("torch_medloss::dice_sums_fwd", dice_sums_fwd_fake)
    torch.library.register_fake("torch_medloss::dice_sums_bwd", dice_sums_bwd_fake)
    _register("torch_medloss::dice_sums_fwd", "torch_medloss::dice_sums_bwd", torch.ops.torch_medloss.dice_sums_bwd)


# torch accepts fake kernels and autograd only for ops that exist: the C++ ops exist once the library is loaded.
_extension.when_loaded(_register_compiled_ops)

_triton: tuple | None = None


def _triton_ops():
    """The Triton ops, imported (which imports triton) and given autograd on first use."""
    global _triton
    if _triton is None:
        from torch_medloss.kernels import dice_sums as kernels  # noqa: F401  (registers the triton_ops)

        forward = torch.ops.torch_medloss.dice_sums_fwd_triton
        backward = torch.ops.torch_medloss.dice_sums_bwd_triton
        _register("torch_medloss::dice_sums_fwd_triton", "torch_medloss::dice_sums_bwd_triton", backward)
        _triton = (forward, backward)
    return _triton
