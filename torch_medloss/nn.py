"""Layers built on torch_medloss's fused ops."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from torch_medloss import _backend
from torch_medloss import _contract as K
from torch_medloss.functional.concat_conv import _check_activation, concat_conv2d

__all__ = ["ConcatConv2d"]


class ConcatConv2d(nn.Module):
    """A convolution (and ReLU) of the concatenation of several feature maps, run without concatenating them.

    ``ConcatConv2d([64, 64], 64)(a, b)`` equals ``relu(nn.Conv2d(128, 64, 3, padding=1)(torch.cat([a, b], 1)))``
    with the same parameters: ``weight`` has the layout of that ``nn.Conv2d``'s weight (its state dict loads into one)
    and the same default initialization, with the fan-in of all inputs together.

    Args:
        in_channels: one channel count per input (1 to 8 entries).
        out_channels: output channels.
        kernel_size: 3 (default) or 1.
        padding: zero padding per side; None (default) keeps the size: kernel_size // 2 (1 for 3x3, 0 for 1x1).
        bias: learn a bias (default True).
        activation: "relu" (default) or None.
        backend: see :func:`torch_medloss.functional.concat_conv2d`.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, kernel_size: int = 3, padding: int | None = None,
                 bias: bool = True, activation: str | None = "relu", *, backend: str = "auto",
                 device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(in_channels, (str, bytes)) or not isinstance(in_channels, Sequence):
            raise TypeError(f"in_channels must be a sequence of ints, one per input, got {type(in_channels).__name__}.")
        if not 1 <= len(in_channels) <= K.CONCAT_CONV_MAX_INPUTS:
            raise ValueError(f"in_channels must have 1 to {K.CONCAT_CONV_MAX_INPUTS} entries, got {len(in_channels)}.")
        for name, value in [(f"in_channels[{i}]", c) for i, c in enumerate(in_channels)] + [("out_channels",
                                                                                            out_channels)]:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, numbers.Integral):
            raise TypeError(f"kernel_size must be an int, 1 or 3, got {type(kernel_size).__name__}.")
        if kernel_size not in K.CONCAT_CONV_KERNEL_SIZES:
            raise ValueError(f"kernel_size must be 1 or 3, got {kernel_size!r}.")
        padding = kernel_size // 2 if padding is None else padding
        if isinstance(padding, bool) or not isinstance(padding, numbers.Integral):
            raise TypeError(f"padding must be None or an int, got {type(padding).__name__}.")
        if not 0 <= padding < kernel_size:
            raise ValueError(f"padding must be None or an int in [0, {kernel_size - 1}], got {padding!r}.")
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}.")
        _check_activation(activation)
        self.in_channels = tuple(int(c) for c in in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = int(kernel_size)
        self.padding = int(padding)
        self.activation = activation
        self.backend = _backend.check_backend_name(backend)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, sum(self.in_channels), kernel_size, kernel_size,
                                               **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's default: Kaiming-uniform with a = sqrt(5) and a bias uniform in +-1/sqrt(fan_in).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size * self.kernel_size
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, *inputs: Tensor) -> Tensor:
        """``forward(x_1, ..., x_n)`` (or one list) with x_i of shape (B, in_channels[i], H, W)."""
        if len(inputs) == 1 and isinstance(inputs[0], (list, tuple)):
            inputs = tuple(inputs[0])
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"ConcatConv2d expects {len(self.in_channels)} inputs, got {len(inputs)}.")
        for i, (x, channels) in enumerate(zip(inputs, self.in_channels, strict=True)):
            if isinstance(x, Tensor) and x.dim() == 4 and x.shape[1] != channels:
                raise ValueError(f"input {i} must have {channels} channels, got shape {tuple(x.shape)}.")
        return concat_conv2d(inputs, self.weight, self.bias, self.padding, self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_channels={list(self.in_channels)}, out_channels={self.out_channels}, "
                f"kernel_size={self.kernel_size}, padding={self.padding}, bias={self.bias is not None}, "
                f"activation={self.activation!r}")
