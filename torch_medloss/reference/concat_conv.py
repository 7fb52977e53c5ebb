"""Reference of ``concat_conv2d``: ``activation(conv2d(cat(inputs, 1), weight, bias, padding))`` without the cat.

A convolution is linear in its input channels, so conv(cat(x_1..x_n), W) = sum_i conv(x_i, W_i) where W_i is the
slice of W's input channels that meets x_i. This computes that sum with ``torch.nn.functional.conv2d`` (one call
per input, accumulated in place), so the concatenated tensor is never built; autograd gives every input its own
gradient. It is the CPU path and the fallback; the tests hold it (and every kernel) to literal cat + conv.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def concat_conv2d(inputs: Sequence[Tensor], weight: Tensor, bias: Tensor | None, padding: int,
                  relu: bool) -> Tensor:
    """Inputs (B, C_i, H, W), weight (O, sum C_i, K, K), bias (O,) or None; returns (B, O, H', W')."""
    out = None
    start = 0
    for x in inputs:
        part = weight[:, start:start + x.shape[1]]
        start += x.shape[1]
        term = F.conv2d(x, part, None, padding=padding)
        out = term if out is None else out + term
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1).to(out.dtype)
    return torch.relu(out) if relu else out
