"""A small U-Net for 2D or 3D segmentation: the model of the segmentation study (``python -m torch_medloss segdemo``).

The layout follows the usual U-Net pattern (Ronneberger et al., MICCAI 2015) with nnU-Net's choice of blocks:
two (conv 3^d, instance norm, leaky ReLU) per level, max pooling down, a transposed convolution up, skip
connections by concatenation, and a 1^d convolution to the class logits. Written for this project; kept small so
that a CPU can train it in minutes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_UP = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


class _Block(nn.Sequential):
    """Two (3^d conv, instance norm with affine, leaky ReLU 0.01)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        conv, norm = _CONV[spatial_dims], _NORM[spatial_dims]
        layers: list[nn.Module] = []
        for c_in in (in_channels, out_channels):
            layers += [conv(c_in, out_channels, 3, padding=1), norm(out_channels, affine=True),
                       nn.LeakyReLU(0.01, inplace=True)]
        super().__init__(*layers)


class UNet(nn.Module):
    """A U-Net on images (B, in_channels, H, W) or volumes (B, in_channels, D, H, W); returns logits.

    Level k (0 at full resolution) has ``base_channels * 2**k`` channels; ``depth`` is the number of 2x
    down-samplings, so the bottleneck works at 1 / 2**depth of the input size. Inputs whose spatial sizes are not
    multiples of 2**depth are zero-padded at the far end of each axis up to the next multiple and the logits are
    cropped back, so the output always has the input's spatial shape. In training mode instance norm needs more
    than one voxel at the bottleneck: some axis longer than 2**depth.

    Args:
        in_channels: image channels. Default 1.
        num_classes: output channels (one logit per class, softmax not applied). Default 5.
        spatial_dims: 2 or 3. Default 2.
        base_channels: channels at full resolution. Default 16.
        depth: number of down-samplings (>= 0; 0 gives a single block). Default 3.

    Returns:
        Logits of shape (B, num_classes, *S), S the input's spatial shape.

    Raises:
        TypeError: a non-integer argument. ValueError: a value out of range, or an input of the wrong rank or
        channel count (the message shows the shape).

    Example:
        >>> net = UNet(in_channels=1, num_classes=5, spatial_dims=2)
        >>> net(torch.randn(2, 1, 37, 50)).shape
        torch.Size([2, 5, 37, 50])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 5, spatial_dims: int = 2, base_channels: int = 16,
                 depth: int = 3) -> None:
        super().__init__()
        for name, value, low in (("in_channels", in_channels, 1), ("num_classes", num_classes, 1),
                                 ("base_channels", base_channels, 1), ("depth", depth, 0)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"UNet: {name} must be an int, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"UNet: {name} must be >= {low}, got {value}")
        if spatial_dims not in (2, 3):
            raise ValueError(f"UNet: spatial_dims must be 2 or 3, got {spatial_dims!r}")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.spatial_dims, self.depth = spatial_dims, depth
        widths = [base_channels * 2**k for k in range(depth + 1)]
        self.down = nn.ModuleList()
        c_in = in_channels
        for w in widths:
            self.down.append(_Block(spatial_dims, c_in, w))
            c_in = w
        self.pool = _POOL[spatial_dims](2)
        self.up = nn.ModuleList(_UP[spatial_dims](widths[k + 1], widths[k], 2, stride=2) for k in range(depth))
        self.up_blocks = nn.ModuleList(_Block(spatial_dims, 2 * widths[k], widths[k]) for k in range(depth))
        self.head = _CONV[spatial_dims](widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet: expected input (B, {self.in_channels}, *S) with {self.spatial_dims} spatial "
                             f"dims, got shape {tuple(x.shape)}")
        size = x.shape[2:]
        multiple = 2**self.depth
        pad = [(-s) % multiple for s in size]
        if any(pad):
            # F.pad lists (before, after) pairs from the last axis back.
            x = F.pad(x, [p for q in reversed(pad) for p in (0, q)])
        skips = []
        for k, block in enumerate(self.down):
            x = block(x)
            if k < self.depth:
                skips.append(x)
                x = self.pool(x)
        for k in reversed(range(self.depth)):
            x = self.up_blocks[k](torch.cat([self.up[k](x), skips[k]], dim=1))
        logits = self.head(x)
        if any(pad):
            logits = logits[(..., *(slice(0, s) for s in size))]
        return logits
