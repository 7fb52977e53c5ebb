"""Autograd for the fused forward/backward op pairs (Dice sums, DBCE cross entropy), registered the same way.

Each forward op takes four tensors (the logits first, then data: targets, masks, per-class values) and then plain
options; its backward op takes the upstream gradients of the forward's outputs, the same four tensors and the same
options, and returns the logits' gradient. Only the logits get a gradient. Saved for backward: the four inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_SAVED_TENSORS = 4


def register(forward: str, backward: str, backward_op: Callable, what: str) -> None:
    """Give ``forward`` an autograd formula that calls ``backward_op``; make ``backward`` refuse double backward."""

    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs[:_SAVED_TENSORS])
        ctx.options = inputs[_SAVED_TENSORS:]

    def backward_formula(ctx, *grads):
        saved = ctx.saved_tensors
        grad_logits = None
        if ctx.needs_input_grad[0]:
            grad_logits = backward_op(*(grad.contiguous() for grad in grads), *saved, *ctx.options)
        # Targets, masks and per-class values are data, not parameters; the options are not tensors.
        return (grad_logits,) + (None,) * (len(saved) - 1 + len(ctx.options))

    def no_double_backward(ctx, grad):
        raise RuntimeError(f"torch_medloss: {what} does not support double backward (create_graph=True); use "
                           "backend='reference' for higher-order gradients.")

    def setup_nothing(ctx, inputs, output) -> None:
        pass

    torch.library.register_autograd(forward, backward_formula, setup_context=setup_context)
    torch.library.register_autograd(backward, no_double_backward, setup_context=setup_nothing)
