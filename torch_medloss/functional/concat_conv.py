"""``concat_conv2d``: a convolution of the channel-wise concatenation of several tensors, without the concatenation.

Lattice Fusion Network nodes (arXiv 2011.14196) fuse the feature maps of the nodes before them; done naively that is
``torch.cat`` then ``conv2d``, which writes and rereads a tensor as large as all the inputs together.

The front end: checks the arguments, applies autocast, picks the backend (torch_medloss._backend) and runs the op,
torch_medloss.ops.concat_conv. Implementations:

- "triton" (default on CUDA): an implicit-GEMM kernel in torch_medloss.kernels.concat_conv whose reduction loop walks
  the inputs where they lie, with bias and ReLU in the epilogue, and Triton backward kernels for every input, the
  weight and the bias (``torch_medloss::concat_conv2d_triton``).
- "reference" (CPU and fallback): split-weight convolutions, sum_i conv(x_i, W_i) (torch_medloss.reference).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from torch_medloss import _backend
from torch_medloss import _contract as K
from torch_medloss.ops import concat_conv as op

__all__ = ["ACTIVATIONS", "concat_conv2d"]

ACTIVATIONS = (None, "relu")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def concat_conv2d(
    inputs: Sequence[Tensor],
    weight: Tensor,
    bias: Tensor | None = None,
    padding: int = 1,
    activation: str | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """``activation(conv2d(torch.cat(inputs, dim=1), weight, bias, padding=padding))``, never building the cat.

    Args:
        inputs: a sequence of 1 to 8 tensors (B, C_i, H, W) with the same B, H, W, dtype and device and any channel
            counts C_i >= 1; contiguous (NCHW) or channels_last, each read where it lies.
        weight: (O, sum C_i, K, K) with K = 1 or 3, the weight of the convolution of the concatenation (the layout
            of ``nn.Conv2d(sum C_i, O, K)``'s weight), same dtype as the inputs.
        bias: (O,) or None.
        padding: zero padding on each side, an int in [0, K - 1] (1 for a "same" 3x3, 0 for a 1x1). Stride 1.
        activation: None or "relu" (applied after the bias).
        backend: "auto" (Triton on CUDA tensors, the reference elsewhere), "triton" or "reference".

    Returns:
        (B, O, H + 2 padding - K + 1, W + 2 padding - K + 1) in the inputs' dtype, on every backend in the layout of
        the first input that is densely NCHW or channels_last but not both: a 1-channel input (or a 1x1 image) fits
        both and a strided view neither, so the next input decides (NCHW when none does). A channels_last network
        whose first input is a 1-channel image keeps channels_last.

    Autocast: inside ``torch.autocast`` (as for ``conv2d``, which autocast runs in its lower precision) float32,
    float16 and bfloat16 inputs, weight and bias are cast to the autocast dtype first; float64 is left alone.

    Raises:
        TypeError: inputs not a sequence of tensors, a non-float dtype, mixed dtypes, weight or bias not a tensor,
            padding not an int, activation not None or a str.
        ValueError: 0 or more than 8 inputs, inputs that are not 4-D or differ in batch or spatial size or device,
            a weight or bias on another device, a weight whose shape does not match the inputs, a kernel other than
            1x1 or 3x3, a bias of the wrong shape, a padding outside [0, K - 1], an image smaller than the kernel
            (with its padding), an unknown activation or backend.
    """
    inputs = _check_inputs(inputs)
    inputs, weight, bias = _autocast(inputs, weight, bias)
    _check_weight(inputs, weight, bias)
    padding = _check_padding(padding, weight.shape[-1])
    _check_output_size(inputs[0], weight.shape[-1], padding)
    relu = _check_activation(activation)
    backend = _backend.check_backend_name(backend)
    # float64 is a fusion blocker: "auto" falls back with one warning where it would otherwise run Triton.
    chosen = _backend.resolve("concat_conv2d", backend, inputs[0].device, op.BACKENDS,
                              blocker=op.fusion_blocker(inputs))
    return op.concat_conv2d(chosen, inputs, weight, bias, padding, relu)


# ------------------------------------------------------------------------------------------------- argument checks


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _autocast(inputs: tuple[Tensor, ...], weight: object, bias: object):
    """Cast to the autocast dtype inside ``torch.autocast``, as autocast does for conv2d (a custom op is not on
    autocast's lists, so without this the bf16 activations of an autocast network would meet fp32 weights)."""
    device_type = inputs[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return inputs, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(tensor):
        if isinstance(tensor, Tensor) and tensor.dtype in _AUTOCAST_ELIGIBLE and tensor.dtype != dtype:
            return tensor.to(dtype)
        return tensor

    return tuple(cast(x) for x in inputs), cast(weight), cast(bias)


def _check_output_size(first: Tensor, kernel_size: int, padding: int) -> None:
    height, width = first.shape[-2:]
    if min(height, width) + 2 * padding < kernel_size:
        raise ValueError(f"inputs of size {height}x{width} with padding={padding} are smaller than the "
                         f"{kernel_size}x{kernel_size} kernel: the output would be empty.")


def _check_inputs(inputs: object) -> tuple[Tensor, ...]:
    if isinstance(inputs, Tensor) or not isinstance(inputs, Sequence):
        raise TypeError(f"inputs must be a sequence (list or tuple) of tensors, got {type(inputs).__name__}.")
    inputs = tuple(inputs)
    if not 1 <= len(inputs) <= K.CONCAT_CONV_MAX_INPUTS:
        raise ValueError(f"inputs must hold 1 to {K.CONCAT_CONV_MAX_INPUTS} tensors, got {len(inputs)}.")
    for i, x in enumerate(inputs):
        if not isinstance(x, Tensor):
            raise TypeError(f"inputs[{i}] must be a torch.Tensor, got {type(x).__name__}.")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"inputs[{i}] must be a floating tensor (float32, float64, float16, bfloat16), got "
                            f"{x.dtype}.")
        if x.dim() != 4:
            raise ValueError(f"inputs[{i}] must have shape (B, C, H, W), got {tuple(x.shape)}.")
        if x.shape[1] < 1:
            raise ValueError(f"inputs[{i}] must have at least one channel, got shape {tuple(x.shape)}.")
    first = inputs[0]
    for i, x in enumerate(inputs[1:], start=1):
        if x.dtype != first.dtype:
            raise TypeError(f"inputs must share one dtype: inputs[0] is {first.dtype}, inputs[{i}] is {x.dtype}.")
        if x.device != first.device:
            raise ValueError(f"inputs must be on one device: inputs[0] is on {first.device}, inputs[{i}] on "
                             f"{x.device}.")
        if x.shape[0] != first.shape[0] or x.shape[2:] != first.shape[2:]:
            raise ValueError(
                f"inputs must share batch and spatial size (B, *, H, W): inputs[0] has shape {tuple(first.shape)}, "
                f"inputs[{i}] has {tuple(x.shape)}."
            )
    return inputs


def _check_weight(inputs: tuple[Tensor, ...], weight: object, bias: object) -> None:
    first = inputs[0]
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}.")
    if weight.dtype != first.dtype:
        raise TypeError(f"weight must have the inputs' dtype {first.dtype}, got {weight.dtype}.")
    if weight.device != first.device:
        raise ValueError(f"weight must be on the inputs' device {first.device}, got {weight.device}.")
    channels = sum(x.shape[1] for x in inputs)
    if weight.dim() != 4 or weight.shape[1] != channels or weight.shape[2] != weight.shape[3] or weight.shape[0] < 1:
        raise ValueError(
            f"weight must have shape (out_channels, {channels}, K, K) for inputs with "
            f"{[x.shape[1] for x in inputs]} channels, got {tuple(weight.shape)}."
        )
    if weight.shape[-1] not in K.CONCAT_CONV_KERNEL_SIZES:
        raise ValueError(f"weight must be a 1x1 or 3x3 kernel, got {weight.shape[-2]}x{weight.shape[-1]}.")
    if bias is None:
        return
    if not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}.")
    if bias.dtype != first.dtype:
        raise TypeError(f"bias must have the inputs' dtype {first.dtype}, got {bias.dtype}.")
    if bias.device != first.device:
        raise ValueError(f"bias must be on the inputs' device {first.device}, got {bias.device}.")
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}.")


def _check_padding(padding: object, kernel_size: int) -> int:
    if isinstance(padding, bool) or not isinstance(padding, numbers.Integral):
        raise TypeError(f"padding must be an int, got {type(padding).__name__}.")
    if not 0 <= padding <= kernel_size - 1:
        raise ValueError(f"padding must be in [0, {kernel_size - 1}] for a {kernel_size}x{kernel_size} kernel, got "
                         f"{padding}.")
    return int(padding)


def _check_activation(activation: object) -> bool:
    if activation is not None and not isinstance(activation, str):
        raise TypeError(f"activation must be None or 'relu', got {type(activation).__name__}.")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or 'relu', got {activation!r}.")
    return activation == "relu"
