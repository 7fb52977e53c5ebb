"""Reference of ``concat_conv2d``: ``activation(conv2d(cat(inputs, 1), weight, bias, padding))`` without the cat.

A convolution is linear in its input channels, so conv(cat(x_1..x_n), W) = sum_i conv(x_i, W_i) where W_i is the
slice of W's input channels that meets x_i. This computes that sum with ``torch.nn.functional.conv2d`` (one call
per input, accumulated in place), so the concatenated tensor is never built; autograd gives every input its own
gradient. It is the CPU path and the fallback; the tests hold it (and every kernel) to literal cat + conv.

The output's memory format, shared with the Triton op: output_memory_format.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def output_memory_format(inputs: Sequence[Tensor]) -> torch.memory_format:
    """The output's layout: that of the first input laid out densely in exactly one of NCHW and channels_last.

    A 1-channel input (or a 1x1 image) has strides that fit both (its channel stride does not count; torch's
    elementwise ops likewise pass over an operand whose strides leave the order of two dimensions open), and a
    strided view fits neither: neither decides. Deciding from inputs[0] alone turned the output of a channels_last
    network NCHW whenever its first input was a 1-channel image. No input decides: NCHW.
    """
    for x in inputs:
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        if channels_last != x.is_contiguous():
            return torch.channels_last if channels_last else torch.contiguous_format
    return torch.contiguous_format


def concat_conv2d(inputs: Sequence[Tensor], weight: Tensor, bias: Tensor | None, padding: int,
                  relu: bool) -> Tensor:
    """Inputs (B, C_i, H, W), weight (O, sum C_i, K, K), bias (O,) or None; returns (B, O, H', W') in
    output_memory_format(inputs)."""
    out = None
    start = 0
    for x in inputs:
        part = weight[:, start:start + x.shape[1]]
        start += x.shape[1]
        term = F.conv2d(x, part, None, padding=padding)
        out = term if out is None else out + term
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1).to(out.dtype)
    out = torch.relu(out) if relu else out
    # conv2d follows each input's own layout and the sum follows the terms', so mixed or ambiguous inputs can give
    # either: the documented layout costs at most one copy, and none when the sum already has it.
    return out.contiguous(memory_format=output_memory_format(inputs))
