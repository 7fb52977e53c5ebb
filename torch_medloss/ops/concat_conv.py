"""The concat_conv2d op: the choice of kernel for a resolved backend, and the autograd of the Triton ops.

Contract: torch_medloss.reference.concat_conv (``relu?(conv2d(cat(inputs, 1), weight, bias, padding))`` without the
cat) and the CONCAT_CONV_* constants of torch_medloss._contract. Backends (no C++ kernels):

- "triton": kernels/concat_conv.py, the forward ``concat_conv2d_triton`` (an implicit GEMM over the inputs where
  they lie, bias and ReLU in the epilogue) and two internal backward ops, ``concat_conv2d_bwd_input_triton`` (one
  gradient per input) and ``concat_conv2d_bwd_weight_triton`` (weight and bias). Their autograd is registered here,
  when the backend first runs; they refuse double backward.
- "reference": split-weight convolutions, sum_i conv2d(x_i, W_i) (plain autograd, higher-order gradients too).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from torch_medloss.ops import _autograd
from torch_medloss.reference import concat_conv as _reference

__all__ = ["BACKENDS", "concat_conv2d", "fusion_blocker"]

BACKENDS = ("triton", "reference")


def fusion_blocker(inputs: Sequence[Tensor]) -> str | None:
    """Why the Triton kernels cannot take these (checked) inputs, or None."""
    if inputs[0].dtype == torch.float64:
        return "the Triton kernels take float32, bfloat16 or float16, not float64"
    return None


def concat_conv2d(backend: str, inputs: Sequence[Tensor], weight: Tensor, bias: Tensor | None, padding: int,
                  relu: bool) -> Tensor:
    """(B, O, H', W') on a resolved backend, differentiable in every input, the weight and the bias."""
    if backend == "reference":
        return _reference.concat_conv2d(inputs, weight, bias, padding, relu)
    if backend == "triton":
        return _triton_ops().concat_conv2d_triton(list(inputs), weight, bias, padding, relu)
    raise ValueError(f"concat_conv2d has no {backend!r} backend (it has: {', '.join(BACKENDS)}).")


# ------------------------------------------------------------------------------------------------------- autograd

_WHAT = "concat_conv2d's Triton backward"


def _setup_context(ctx, inputs, output) -> None:
    xs, weight, bias, padding, relu = inputs
    # Saved: the inputs (the weight gradient reads them; the input gradient only their shapes), the weight, and the
    # output only when the ReLU mask needs it.
    ctx.save_for_backward(*xs, weight, output if relu else None)
    ctx.num_inputs = len(xs)
    ctx.padding = padding
    ctx.relu = relu
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    ops = torch.ops.torch_medloss
    saved = ctx.saved_tensors
    n = ctx.num_inputs
    xs, weight, out = list(saved[:n]), saved[n], saved[n + 1]
    needs = ctx.needs_input_grad
    needs_x = needs[0] if isinstance(needs[0], (list, tuple)) else [needs[0]] * n
    grad_xs = [None] * n  # a list for the list argument, even when no input needs a gradient
    if any(needs_x):
        grads = ops.concat_conv2d_bwd_input_triton(grad_out, out, xs, weight, ctx.padding, ctx.relu)
        grad_xs = [g if wanted else None for g, wanted in zip(grads, needs_x, strict=True)]
    grad_weight = grad_bias = None
    if needs[1] or (ctx.has_bias and needs[2]):
        grad_weight, grad_bias = ops.concat_conv2d_bwd_weight_triton(grad_out, out, xs, weight, ctx.padding,
                                                                     ctx.relu)
        grad_weight = grad_weight if needs[1] else None
        grad_bias = grad_bias if ctx.has_bias and needs[2] else None
    # padding and relu are not tensors.
    return grad_xs, grad_weight, grad_bias, None, None


def _register_triton_autograd() -> None:
    torch.library.register_autograd("torch_medloss::concat_conv2d_triton", _backward, setup_context=_setup_context)
    for backward in ("concat_conv2d_bwd_input_triton", "concat_conv2d_bwd_weight_triton"):
        _autograd.refuse_double_backward(f"torch_medloss::{backward}", _WHAT)


_triton = None


def _triton_ops():
    """torch.ops.torch_medloss with the Triton ops registered (importing triton) and given autograd, on first use."""
    global _triton
    if _triton is None:
        from torch_medloss.kernels import concat_conv as kernels  # noqa: F401  (registers the triton_ops)

        _register_triton_autograd()
        _triton = torch.ops.torch_medloss
    return _triton
