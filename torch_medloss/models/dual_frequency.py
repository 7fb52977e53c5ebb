"""The twin (dual-frequency) denoiser after arXiv 2011.14908: split the noisy image into a low- and a high-frequency
component with a Gaussian blur, denoise each with its own DnCNN-style network, and add the two results.
"""

from __future__ import annotations

import math
import numbers

from torch import Tensor, nn

from torch_medloss.functional.frequency_split import frequency_split
from torch_medloss.models.dncnn import check_image, check_int, noise_network


class DualFrequencyDenoiser(nn.Module):
    """Two DnCNN-style networks, one per frequency band of the input; the output is the sum of their estimates.

    ``low, high = frequency_split(y, sigma)`` (Gaussian blur of y and y - blur), then ``low_clean = low -
    R_low(low)`` and ``high_clean = high - R_high(high)`` (each network predicts the noise of its component:
    residual learning, as in DnCNN) and ``forward(y) = low_clean + high_clean``. Trained end to end with MSE of the
    sum against the clean image. Layout (B, C, H, W), C = image_channels; H and W must exceed the blur radius
    ceil(3 sigma) (7 or more with the default sigma); any memory format.

    Why sigma = 2 pixels by default: white noise of standard deviation s keeps only s * sqrt(sum of the 2-D
    kernel's squared taps) ~ s / (2 sqrt(pi) sigma) = 0.14 s in the blurred component at sigma = 2, so the low
    band is nearly clean (shading, large structures) and its network has an easy job, while the high band holds
    almost all the noise with the edges and textures (frequencies above about 0.1 cycle per pixel, periods under
    ~10 pixels) that its network must keep. A larger sigma moves more image structure into the noisy band; a
    smaller one leaves more noise in the low band. The radius, 6 pixels, keeps the minimum image size small.

    Args:
        sigma: the blur's standard deviation in pixels (default 2.0, see above).
        depth: convolutions per network, >= 2 (default 17, DnCNN's, so each band sees DnCNN's receptive field).
        channels: feature maps per hidden layer of each network (default 45: two networks with together 551,160
            learnable parameters, 99.1% of DnCNN()'s 556,096: "the same number of learnable parameters").
        image_channels: channels of the images (default 1).

    Raises:
        TypeError, ValueError: a bad argument; ``forward`` on a tensor that is not (B, image_channels, H, W)
        floating, or with H or W <= ceil(3 sigma).

    Example:
        >>> model = DualFrequencyDenoiser()
        >>> model(torch.rand(1, 1, 40, 31)).shape
        torch.Size([1, 1, 40, 31])
    """

    def __init__(self, sigma: float = 2.0, depth: int = 17, channels: int = 45, image_channels: int = 1) -> None:
        super().__init__()
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
            raise TypeError(f"sigma must be a real number, got {type(sigma).__name__}.")
        if not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"sigma must be a finite number > 0, got {sigma}.")
        self.sigma = float(sigma)
        self.radius = math.ceil(3 * self.sigma)
        self.depth = check_int("depth", depth, 2)
        self.channels = check_int("channels", channels, 1)
        self.image_channels = check_int("image_channels", image_channels, 1)
        self.low_net = noise_network(self.depth, self.channels, self.image_channels)
        self.high_net = noise_network(self.depth, self.channels, self.image_channels)

    def split(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """(low, high) of y; ValueError when H or W is not larger than the blur radius."""
        check_image(y, self.image_channels, "DualFrequencyDenoiser")
        if min(y.shape[-2:]) <= self.radius:
            raise ValueError(f"DualFrequencyDenoiser(sigma={self.sigma}) needs H and W > its blur radius "
                             f"ceil(3 sigma) = {self.radius}, got an image of shape {tuple(y.shape)}.")
        return frequency_split(y, self.sigma)

    def forward_bands(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """The two denoised components (low_clean, high_clean), each shaped like y."""
        low, high = self.split(y)
        return low - self.low_net(low), high - self.high_net(high)

    def forward(self, y: Tensor) -> Tensor:
        """The denoised image low_clean + high_clean, shaped like y."""
        low_clean, high_clean = self.forward_bands(y)
        return low_clean + high_clean

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, depth={self.depth}, channels={self.channels}"
