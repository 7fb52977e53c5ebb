"""DnCNN, the residual denoiser of Zhang et al., "Beyond a Gaussian Denoiser" (IEEE TIP 2017, arXiv 1608.03981).

The baseline of the denoising study (``python -m torch_medloss denoise``).
"""

from __future__ import annotations

import numbers

from torch import Tensor, nn


def check_int(name: str, value: object, minimum: int) -> int:
    """An int >= minimum, or TypeError/ValueError naming the argument (shared by the denoisers)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


def check_image(x: object, image_channels: int, model: str) -> None:
    """x must be a (B, image_channels, H, W) floating tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{model}: x must be a torch.Tensor, got {type(x).__name__}.")
    if x.dim() != 4 or x.shape[1] != image_channels:
        raise ValueError(f"{model}: x must have shape (B, {image_channels}, H, W), got {tuple(x.shape)}.")
    if not x.is_floating_point():
        raise TypeError(f"{model}: x must be a floating tensor, got {x.dtype}.")


def noise_network(depth: int, channels: int, image_channels: int) -> nn.Sequential:
    """DnCNN's body: conv+ReLU, (depth - 2) x (conv+BN+ReLU), conv; 3x3 convolutions with zero padding 1.

    The convolutions followed by BN have no bias (BN's shift replaces it) and neither has the last one, as in the
    paper's released model; the first has one.
    """
    layers: list[nn.Module] = [nn.Conv2d(image_channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
    for _ in range(depth - 2):
        layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                   nn.ReLU(inplace=True)]
    layers.append(nn.Conv2d(channels, image_channels, 3, padding=1, bias=False))
    return nn.Sequential(*layers)


class DnCNN(nn.Module):
    """DnCNN: a plain convolutional network that predicts the noise; ``forward`` returns the denoised image.

    Layout (B, C, H, W) with C = image_channels, any H and W (every convolution is 3x3 with zero padding 1, so the
    output has the input's size), any memory format (channels_last in, channels_last out). Residual learning: the
    network R predicts the noise v of y = x + v and ``forward(y) = y - R(y)``, so training ``forward(y)`` with MSE
    against the clean x is exactly the paper's loss ``||R(y) - (y - x)||^2`` (up to the constant factor).

    Args:
        depth: number of convolutions, >= 2 (default 17: the paper's depth for Gaussian denoising of known sigma).
        channels: feature maps per hidden layer (default 64, the paper's).
        image_channels: channels of the images, e.g. 1 grey, 3 colour (default 1).

    With the defaults the model has 556,096 learnable parameters (BN's running statistics are buffers, not counted).

    Raises:
        TypeError, ValueError: an argument that is not an int or is too small; ``forward`` on a tensor that is not
        (B, image_channels, H, W) floating.

    Example:
        >>> model = DnCNN()
        >>> model(torch.rand(2, 1, 41, 37)).shape
        torch.Size([2, 1, 41, 37])
    """

    def __init__(self, depth: int = 17, channels: int = 64, image_channels: int = 1) -> None:
        super().__init__()
        self.depth = check_int("depth", depth, 2)
        self.channels = check_int("channels", channels, 1)
        self.image_channels = check_int("image_channels", image_channels, 1)
        self.body = noise_network(self.depth, self.channels, self.image_channels)

    def predict_noise(self, y: Tensor) -> Tensor:
        """R(y): the noise estimate, shaped like y."""
        check_image(y, self.image_channels, "DnCNN")
        return self.body(y)

    def forward(self, y: Tensor) -> Tensor:
        """The denoised image y - R(y), shaped like y."""
        return y - self.predict_noise(y)
