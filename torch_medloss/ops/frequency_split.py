"""The frequency_split op: the choice of kernel for a resolved backend, and the autograd of the Triton ops.

Contract: torch_medloss.reference.frequency_split (low = a separable Gaussian blur with reflect padding, high = x -
low) and the FREQUENCY_SPLIT_* constants of torch_medloss._contract. Backends (no C++ kernels):

- "triton": kernels/frequency_split.py, ``frequency_split_triton`` (one pass: x read once, low and high written
  once) and its backward ``frequency_split_bwd_triton`` (the adjoint blur of the two upstream gradients, one pass).
  Their autograd is registered here, when the backend first runs. The backward is linear, so it has a backward of
  its own: the forward split of its upstream gradient (higher-order gradients work).
- "reference": ``F.pad`` and two depthwise convolutions (plain autograd).
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch_medloss import _contract as K
from torch_medloss.reference import frequency_split as _reference

__all__ = ["BACKENDS", "frequency_split", "fusion_blocker"]

BACKENDS = ("triton", "reference")


def fusion_blocker(x: Tensor, sigma: float) -> str | None:
    """Why the Triton kernels cannot take these (checked) arguments, or None."""
    if x.dtype == torch.float64:
        return "the Triton kernels take float32, bfloat16 and float16, not float64"
    radius = _reference.gaussian_radius(sigma)
    if radius > K.FREQUENCY_SPLIT_TRITON_MAX_RADIUS:
        return (f"the Triton kernels take r = ceil(3 sigma) <= {K.FREQUENCY_SPLIT_TRITON_MAX_RADIUS}, got r = "
                f"{radius} (sigma = {sigma})")
    return None


def frequency_split(backend: str, x: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
    """(low, high) on a resolved backend, each shaped and typed like x, differentiable in x."""
    if backend == "reference":
        return _reference.frequency_split(x, sigma)
    if backend == "triton":
        return _triton_ops().frequency_split_triton(x, sigma)
    raise ValueError(f"frequency_split has no {backend!r} backend (it has: {', '.join(BACKENDS)}).")


# ------------------------------------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output) -> None:
    x, sigma = inputs
    ctx.sigma = sigma  # nothing else is saved: the backward is linear and needs no input values
    ctx.dtype = x.dtype


def _backward(ctx, grad_low, grad_high):
    # Outputs not used by the loss come as None when autograd does not materialize them.
    if grad_low is None and grad_high is None:
        return None, None
    reference = grad_high if grad_low is None else grad_low
    grad_low = torch.zeros_like(reference) if grad_low is None else grad_low
    grad_high = torch.zeros_like(reference) if grad_high is None else grad_high
    # None: sigma is not a tensor.
    return torch.ops.torch_medloss.frequency_split_bwd_triton(grad_low, grad_high, ctx.sigma, ctx.dtype), None


def _setup_context_bwd(ctx, inputs, output) -> None:
    _, _, sigma, _ = inputs
    ctx.sigma = sigma


def _backward_backward(ctx, grad):
    # bwd(g_low, g_high) = g_high + A^T (g_low - g_high) is linear; its adjoint maps v to (A v, v - A v), which is
    # the forward split of v. None for sigma and dtype, which are not tensors.
    grad_low, grad_high = torch.ops.torch_medloss.frequency_split_triton(grad, ctx.sigma)
    return grad_low, grad_high, None, None


def _register_triton_autograd() -> None:
    torch.library.register_autograd("torch_medloss::frequency_split_triton", _backward, setup_context=_setup_context)
    torch.library.register_autograd("torch_medloss::frequency_split_bwd_triton", _backward_backward,
                                    setup_context=_setup_context_bwd)


_triton = None


def _triton_ops():
    """torch.ops.torch_medloss with the Triton ops registered (importing triton) and given autograd, on first use."""
    global _triton
    if _triton is None:
        from torch_medloss.kernels import frequency_split as kernels  # noqa: F401  (registers the triton_ops)

        _register_triton_autograd()
        _triton = torch.ops.torch_medloss
    return _triton
