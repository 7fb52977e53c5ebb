"""Autograd for the fused forward/backward op pairs, registered the same way for every op and backend.

A forward op takes its tensors first (the differentiable one at position 0: the logits), then plain options; its
backward op takes the upstream gradients of the outputs it reads, the tensors saved for it, and the same options,
and returns the first input's gradient. Only that input gets a gradient: targets, masks and per-class values are
data, not parameters (a call whose target needs a gradient runs the reference instead; see functional).

The denoising ops' Triton forwards do not have that shape (concat_conv2d gives a gradient to every input, the
weight and the bias; frequency_split's backward is linear and has a backward of its own): their formulas are in
ops/concat_conv.py and ops/frequency_split.py, with the same structure, and concat_conv2d's backward ops refuse
double backward through ``refuse_double_backward``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def _zeros(shape, dtype, device) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=device)


def register(
    forward: str,
    backward: str,
    backward_op: Callable,
    what: str,
    num_tensors: int,
    saved_outputs: Sequence[int] = (),
    used_grads: Sequence[int] | None = None,
) -> None:
    """Give ``forward`` an autograd formula that calls ``backward_op``; make ``backward`` refuse double backward.

    Args:
        forward, backward: the ops' qualified names ("torch_medloss::dice_loss_fwd").
        backward_op: called as ``backward_op(*grads, *saved outputs, *forward tensors, *options)``.
        what: the op family, for the double-backward error.
        num_tensors: how many leading inputs of the forward are tensors (saved for the backward).
        saved_outputs: indices of forward outputs the backward reads (marked non-differentiable: no gradient
            flows into them, and autograd materializes no zeros for them).
        used_grads: indices of the outputs whose upstream gradients the backward takes (default: all but the
            saved ones).
    """

    def setup_context(ctx, inputs, output) -> None:
        outputs = output if isinstance(output, tuple) else (output,)
        saved = [outputs[i] for i in saved_outputs]
        ctx.save_for_backward(*inputs[:num_tensors], *saved)
        ctx.options = inputs[num_tensors:]
        if saved:
            ctx.mark_non_differentiable(*saved)
        # No zeros for the outputs nobody differentiates (a launch each): backward_formula fills in what it needs.
        ctx.set_materialize_grads(False)
        ctx.num_outputs = len(outputs)
        ctx.output_like = [(o.shape, o.dtype, o.device) for o in outputs]

    def backward_formula(ctx, *grads):
        tensors = ctx.saved_tensors
        inputs, saved = tensors[:num_tensors], tensors[num_tensors:]
        grad_input = None
        if ctx.needs_input_grad[0]:
            wanted = used_grads if used_grads is not None else [
                i for i in range(ctx.num_outputs) if i not in saved_outputs]
            grads = [grads[i] if grads[i] is not None else _zeros(*ctx.output_like[i]) for i in wanted]
            grad_input = backward_op(*grads, *saved, *inputs, *ctx.options)
        # The other inputs are data, and the options are not tensors.
        return (grad_input,) + (None,) * (num_tensors - 1 + len(ctx.options))

    torch.library.register_autograd(forward, backward_formula, setup_context=setup_context)
    refuse_double_backward(backward, what)


def refuse_double_backward(backward: str, what: str) -> None:
    """Make differentiating the op ``backward`` (double backward, create_graph=True) raise a clear RuntimeError.

    Also for the backward ops of a forward whose autograd formula does not fit ``register`` (concat_conv2d's: a
    gradient for every input, the weight and the bias)."""

    def no_double_backward(ctx, *grads):
        raise RuntimeError(f"torch_medloss: {what} does not support double backward (create_graph=True); use "
                           "backend='reference' for higher-order gradients.")

    def setup_nothing(ctx, inputs, output) -> None:
        pass

    torch.library.register_autograd(backward, no_double_backward, setup_context=setup_nothing)
