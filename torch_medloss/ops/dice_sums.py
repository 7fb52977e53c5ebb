"""The Dice-family op: registration, autograd and the choice of kernel for a resolved backend.

Two op pairs share the kernels and the argument list ``(logits, target, params, codes, scalars)`` of
torch_medloss._contract:

- ``dice_loss_fwd`` / ``dice_loss_bwd``: the whole loss (the sums and the head) in one op, the path of every
  Dice-family loss: returns (loss, coefficients); the backward reads the coefficients and the loss's upstream
  gradient. On CUDA tensors with Triton this is three kernel launches for forward and backward together.
- ``dice_sums_fwd`` / ``dice_sums_bwd``: the per-class sums (B, C, 5) and extras (B, 4) only, for the one call
  that must stop between the sums and the head: batch Dice under DDP, whose sums are summed over the ranks first.

Each has a C++ schema (csrc/dice_sums.cpp: CPU kernels in csrc/cpu, CUDA kernels in csrc/cuda; backends "cpp" and
"cuda"), a Triton version (kernels/dice_sums.py, ``*_triton``) and a reference (torch_medloss.reference.dice_sums,
plain autograd). This module gives the compiled ops their fake kernels and autograd formulas.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch_medloss import _contract as K
from torch_medloss import _extension
from torch_medloss.ops import _autograd
from torch_medloss.reference import dice_sums as _reference

__all__ = ["dice_loss", "dice_sums"]


def dice_loss(backend: str, logits: Tensor, target: Tensor, params: Tensor, codes: list[int],
              scalars: list[float]) -> Tensor:
    """The loss of ``codes``' head, shape _contract.dice_loss_shape, differentiable in ``logits``."""
    if backend == "reference":
        return _reference.dice_loss_fwd(logits, target, params, codes, scalars)
    if backend == "triton":
        loss, coefficients = _triton_ops().dice_loss_fwd_triton(logits, target, params, codes, scalars)
    else:
        loss, coefficients = torch.ops.torch_medloss.dice_loss_fwd(logits, target, params, codes, scalars)
    if codes[K.DICE_CODE_HEAD] == K.HEAD_NONE and codes[K.DICE_CODE_REDUCTION] == K.REDUCTION_NONE \
            and coefficients.shape[0] > 0:
        # The focal map is written before the bad labels are counted: the op leaves the poison (0 or NaN) beside it.
        loss = loss + coefficients[0, K.DICE_SLOT_POISON, -1]
    return loss


def dice_sums(backend: str, logits: Tensor, target: Tensor, params: Tensor, codes: list[int],
              scalars: list[float]) -> tuple[Tensor, Tensor]:
    """(sums (B, C, 5), extras (B, 4)), differentiable in ``logits``."""
    if backend == "reference":
        return _reference.dice_sums_fwd(logits, target, params, codes, scalars)
    if backend == "triton":
        return _triton_ops().dice_sums_fwd_triton(logits, target, params, codes, scalars)
    return torch.ops.torch_medloss.dice_sums_fwd(logits, target, params, codes, scalars)


# ------------------------------------------------------------------------------------------- fake kernels (shapes)


def check_op_inputs(logits: Tensor, target: Tensor, params: Tensor, codes: list[int], scalars: list[float]) -> None:
    """The checks shared by the fake kernels (the compiled kernels make the same ones)."""
    if len(codes) != K.DICE_NUM_CODES or len(scalars) != K.DICE_NUM_SCALARS:
        raise ValueError(f"dice_sums: codes must have {K.DICE_NUM_CODES} entries and scalars {K.DICE_NUM_SCALARS}, "
                         f"got {len(codes)} and {len(scalars)}.")
    if logits.dim() != 3:
        raise ValueError(f"dice_sums: logits must be (B, C, S), got shape {tuple(logits.shape)}.")
    batch, classes, pixels = logits.shape
    expected = (batch, pixels) if codes[K.DICE_CODE_TARGET_IS_LABELS] else (batch, classes, pixels)
    if tuple(target.shape) != expected:
        raise ValueError(f"dice_sums: target must have shape {expected}, got {tuple(target.shape)}.")
    if tuple(params.shape) != (K.DICE_PARAM_ROWS, classes):
        raise ValueError(f"dice_sums: params must have shape {(K.DICE_PARAM_ROWS, classes)}, got "
                         f"{tuple(params.shape)}.")


def _accumulator(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def dice_sums_fwd_fake(logits, target, params, codes, scalars):
    check_op_inputs(logits, target, params, codes, scalars)
    batch, classes, _ = logits.shape
    dtype = _accumulator(logits)
    return (logits.new_empty((batch, classes, K.DICE_NUM_SUMS), dtype=dtype),
            logits.new_empty((batch, K.DICE_NUM_EXTRAS), dtype=dtype))


def dice_sums_bwd_fake(grad_sums, grad_extras, logits, target, params, codes, scalars):
    check_op_inputs(logits, target, params, codes, scalars)
    return torch.empty_like(logits)


def dice_loss_fwd_fake(logits, target, params, codes, scalars):
    check_op_inputs(logits, target, params, codes, scalars)
    batch, classes, _ = logits.shape
    dtype = _accumulator(logits)
    return (logits.new_empty(K.dice_loss_shape(batch, classes, codes, logits.shape[2]), dtype=dtype),
            logits.new_empty((batch, K.DICE_NUM_SUMS, classes + 1), dtype=dtype))


def dice_loss_bwd_fake(grad_loss, coefficients, logits, target, params, codes, scalars):
    check_op_inputs(logits, target, params, codes, scalars)
    return torch.empty_like(logits)


# ------------------------------------------------------------------------------------------------------- autograd

_WHAT = "the fused Dice-family loss"


def _register(prefix: str, suffix: str, ops) -> None:
    _autograd.register(f"{prefix}dice_sums_fwd{suffix}", f"{prefix}dice_sums_bwd{suffix}",
                       getattr(ops, f"dice_sums_bwd{suffix}"), _WHAT, num_tensors=3)
    # The loss op's backward takes the loss's gradient and the forward's coefficients (output 1).
    _autograd.register(f"{prefix}dice_loss_fwd{suffix}", f"{prefix}dice_loss_bwd{suffix}",
                       getattr(ops, f"dice_loss_bwd{suffix}"), _WHAT, num_tensors=3, saved_outputs=(1,),
                       used_grads=(0,))


def _register_compiled_ops() -> None:
    """Fake kernels and autograd of the C++ ops, once the library is loaded (torch accepts them only for ops that
    exist). csrc/dice_sums.cpp names this module with set_python_module, as torch requires of C++ ops with Python
    fake kernels."""
    if not torch._C._dispatch_has_kernel("torch_medloss::dice_loss_fwd"):
        return
    for name, fake in (("dice_sums_fwd", dice_sums_fwd_fake), ("dice_sums_bwd", dice_sums_bwd_fake),
                       ("dice_loss_fwd", dice_loss_fwd_fake), ("dice_loss_bwd", dice_loss_bwd_fake)):
        torch.library.register_fake(f"torch_medloss::{name}", fake)
    _register("torch_medloss::", "", torch.ops.torch_medloss)


_extension.when_loaded(_register_compiled_ops)

_triton = None


def _triton_ops():
    """torch.ops.torch_medloss with the Triton ops registered (importing triton) and given autograd, on first use."""
    global _triton
    if _triton is None:
        from torch_medloss.kernels import dice_sums as kernels  # noqa: F401  (registers the triton_ops)

        ops = torch.ops.torch_medloss
        _register("torch_medloss::", "_triton", ops)
        _triton = ops
    return _triton
