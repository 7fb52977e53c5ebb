"""``frequency_split``: an image's low- and high-frequency components (arXiv 2011.14908's twin denoiser input).

low is a separable Gaussian blur of x (reflect padding), high = x - low. The front end: checks the arguments, picks
the backend (torch_medloss._backend) and runs the op, torch_medloss.ops.frequency_split. Implementations:

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
from torch_medloss._contract import FREQUENCY_SPLIT_IDENTITY_SIGMA as IDENTITY_SIGMA
from torch_medloss._contract import FREQUENCY_SPLIT_TRITON_MAX_RADIUS as TRITON_MAX_RADIUS
from torch_medloss.ops import frequency_split as op
from torch_medloss.reference.frequency_split import gaussian_radius, gaussian_taps

# IDENTITY_SIGMA and TRITON_MAX_RADIUS (the names frequency_split's docstring uses) are contract constants, defined
# in torch_medloss._contract; gaussian_radius and gaussian_taps are the reference's.
__all__ = ["IDENTITY_SIGMA", "TRITON_MAX_RADIUS", "frequency_split", "gaussian_radius", "gaussian_taps"]

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


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
    chosen = _backend.resolve("frequency_split", backend, x.device, op.BACKENDS, blocker=op.fusion_blocker(x, sigma))
    return op.frequency_split(chosen, x, sigma)


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
