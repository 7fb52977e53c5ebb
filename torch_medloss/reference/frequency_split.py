"""Reference of ``frequency_split``: a separable Gaussian low-pass with reflect padding, and its residual.

low = blur_W(blur_H(pad_reflect(x))) with the 1-D kernel g_k = exp(-k^2 / (2 sigma^2)) / sum, k = -r..r,
r = ceil(3 sigma); high = x - low. Built from ``F.pad`` and two depthwise ``F.conv2d`` calls, accumulated in float32
for half-precision inputs (float64 stays float64), so autograd gives the adjoint blur for the backward.

Tiny sigma: at or below _contract.FREQUENCY_SPLIT_IDENTITY_SIGMA (0.02) the blur is the identity (low = x,
high = 0); see gaussian_taps. Empty input (B = 0 or C = 0): empty low and high of x's shape, dtype and layout, with an
(empty) gradient, as the Triton op gives.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from torch_medloss import _contract as K


def gaussian_radius(sigma: float) -> int:
    """r = ceil(3 sigma), the blur's radius (the Triton kernels take it from here)."""
    return int(math.ceil(3.0 * sigma))


def gaussian_taps(sigma: float, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """The normalized 1-D kernel of length 2r + 1 (computed in float64, then cast); [0, 1, 0] for sigma <=
    FREQUENCY_SPLIT_IDENTITY_SIGMA (torch_medloss._contract, which says why)."""
    radius = gaussian_radius(sigma)
    k = torch.arange(-radius, radius + 1, dtype=torch.float64)
    sigma = max(sigma, K.FREQUENCY_SPLIT_IDENTITY_SIGMA)  # same taps, without the 0 / 0 of an underflowing sigma^2
    taps = torch.exp(-(k * k) / (2.0 * sigma * sigma))
    return (taps / taps.sum()).to(dtype=dtype, device=device)


def frequency_split(x: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
    """x (B, C, H, W) -> (low, high) in x's dtype; high is x - low computed from the rounded low."""
    if x.numel() == 0:
        # B = 0 or C = 0 (H, W > r are the caller's check): nothing to blur, and F.pad(mode="reflect") and a conv2d
        # with groups=0 reject C = 0. clone() keeps x's strides, as the Triton op's empty_like does (x - low would
        # not: torch gives an empty result contiguous strides), and carries the (empty) gradient.
        return x.clone(), x.clone()
    radius = gaussian_radius(sigma)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    channels = x.shape[1]
    taps = gaussian_taps(sigma, compute, x.device)
    wide = x.to(compute)
    padded = F.pad(wide, (radius, radius, radius, radius), mode="reflect")
    blurred = F.conv2d(padded, taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    low = F.conv2d(blurred, taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels).to(x.dtype)
    return low, x - low
