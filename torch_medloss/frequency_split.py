"""``frequency_split``: an image's low- and high-frequency components (arXiv 2011.14908's twin denoiser input).

low is a separable Gaussian blur of x (reflect padding), high = x - low. Implementations:

- "triton" (default on CUDA): one kernel reads x once and writes low and high; the backward (the adjoint blur of
  the two upstream gradients) is one kernel too (torch_medloss.kernels.frequency_split,
  ``torch_medloss::frequency_split_triton``).
- "reference" (CPU and fallback): ``F.pad`` and two depthwise convolutions (torch_medloss.reference).

Reconstruction: high is computed as x - low from the low that is returned, so ``high == x - low`` holds bit for
bit, and low + high gives back x up to the rounding of that one sum (floating point cannot promise more: for
example 0.1 + (0.3 - 0.1) != 0.3 in float64).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from torch_medloss import _backend
from torch_medloss.reference import frequency_split as _reference
from torch_medloss.reference.frequency_split import IDENTITY_SIGMA, gaussian_radius, gaussian_taps

__all__ = ["BACKENDS", "IDENTITY_SIGMA", "frequency_split", "gaussian_radius", "gaussian_taps"]

BACKENDS = ("triton", "reference")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Largest r = ceil(3 sigma) the Triton kernels take (sigma <= 16 / 3): windows of 64 pixels, 32 interior. Past it
# the 128-pixel windows spill heavily on sm_90 (ptxas: 12 KB forward, 39 KB backward per thread at r = 32, local
# memory a driver may reserve by the GB), so larger radii run the reference (kernels/frequency_split.py reads this).
TRITON_MAX_RADIUS = 16


def frequency_split(x: Tensor, sigma: float, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Split images into ``(low, high)``: a Gaussian blur of x and the residual x - low.

    low = separable Gaussian blur with radius r = ceil(3 sigma) and taps exp(-k^2 / (2 sigma^2)), k = -r..r,
    normalized to sum 1, per channel, with reflect padding on each spatial axis (``F.pad(mode="reflect")``, which
    mirrors without repeating the edge pixel). Half-precision inputs accumulate in float32.

    Args:
        x: (B, C, H, W) float32, float64, float16 or bfloat16, any strides (channels_last too: the outputs keep
            x's layout, nothing is copied); H and W must exceed r (reflect padding reads r pixels inside the border).
            B = 0 or C = 0 is allowed: empty outputs (and an empty gradient), H and W still checked.
            float64, and sigma > 16 / 3 (r > TRITON_MAX_RADIUS), run the reference: "auto" warns once, "triton" raises.
        sigma: the Gaussian's standard deviation in pixels, a finite number > 0. At or below IDENTITY_SIGMA (0.02)
            the off-centre taps are 0 even in float64: low = x and high = 0 exactly, on every backend, however small
            sigma is (r = 1 there, so H and W must still exceed 1).
        backend: "auto" (Triton on CUDA tensors, the reference elsewhere), "triton" or "reference".

    Returns:
        (low, high), each shaped and typed like x.

    Raises:
        TypeError: x not a floating tensor, sigma not a real number. ValueError: x not 4-D, sigma <= 0 or not finite,
        an image too small for the reflect padding (H or W <= r), an unknown backend, backend="triton" where Triton
        cannot run (a CPU tensor without TRITON_INTERPRET=1, float64, r > TRITON_MAX_RADIUS).

    Example:
        >>> x = torch.rand(2, 3, 64, 64)
        >>> low, high = frequency_split(x, sigma=1.5)
        >>> torch.equal(high, x - low), torch.allclose(low + high, x)
        (True, True)
    """
    sigma = _check_arguments(x, sigma)
    backend = _backend.check_backend_name(backend)
    chosen = _backend.resolve("frequency_split", backend, x.device, BACKENDS, blocker=_fusion_blocker(x, sigma))
    if chosen == "triton":
        return _triton_op()(x, sigma)
    return _reference.frequency_split(x, sigma)


def _check_arguments(x: object, sigma: object) -> float:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}.")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be a floating tensor (float32, float64, float16, bfloat16), got {x.dtype}.")
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}.")
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise TypeError(f"sigma must be a real number, got {type(sigma).__name__}.")
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be a finite number > 0, got {sigma}.")
    if not math.isfinite(3.0 * sigma):  # r = ceil(3 sigma) would be infinite: larger than any image
        raise ValueError(f"x is too small for sigma={sigma}: r = ceil(3 sigma) is infinite.")
    radius = gaussian_radius(sigma)
    height, width = x.shape[-2:]
    if height <= radius or width <= radius:
        raise ValueError(
            f"x is too small for sigma={sigma}: reflect padding by r = ceil(3 sigma) = {radius} needs H and W > "
            f"{radius}, got H={height}, W={width}."
        )
    return sigma


def _fusion_blocker(x: Tensor, sigma: float) -> str | None:
    """Why the Triton kernels cannot take these arguments, or None."""
    if x.dtype == torch.float64:
        return "the Triton kernels take float32, bfloat16 and float16, not float64"
    radius = gaussian_radius(sigma)
    if radius > TRITON_MAX_RADIUS:
        return f"the Triton kernels take r = ceil(3 sigma) <= {TRITON_MAX_RADIUS}, got r = {radius} (sigma = {sigma})"
    return None


_triton: object | None = None


def _triton_op():
    """``torch_medloss::frequency_split_triton``, imported (which imports triton) on first use."""
    global _triton
    if _triton is None:
        from torch_medloss.kernels import frequency_split as kernels

        _triton = kernels.frequency_split_triton
    return _triton
