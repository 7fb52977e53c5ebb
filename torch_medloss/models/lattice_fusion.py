"""Lattice Fusion Network (LFN) for image denoising, after the abstract of arXiv 2011.14196 (Lattice Fusion
Networks for Image Denoising): convolutional layers are the nodes of a lattice graph and each node fuses the feature
maps of its predecessors in the lattice. The abstract does not fix a design; the one here is documented in
:class:`LatticeFusionNet`. Every node is a :class:`torch_medloss.nn.ConcatConv2d`, so the fused inputs are never
concatenated in memory.
"""

from __future__ import annotations

from torch import Tensor, nn

from torch_medloss.models.dncnn import check_image, check_int
from torch_medloss.nn import ConcatConv2d

WIRINGS = ("grid", "diagonal")


class LatticeFusionNet(nn.Module):
    """An r x c lattice of conv3x3 (+BN) + ReLU nodes between a head and a tail convolution; residual learning.

    Layout (B, C, H, W) with C = image_channels, any H and W (3x3 convolutions with zero padding 1), any memory
    format. ``forward(y) = y - tail(node[r-1][c-1])``: like DnCNN the network predicts the noise.

    Wiring. ``h = relu(head(y))`` (conv3x3, image_channels -> width). Node (i, j), 0 <= i < rows, 0 <= j < cols,
    computes ``relu(conv3x3(cat(inputs, 1)))`` (with BN before the ReLU when ``batch_norm``) of, in this order:

    - "grid" (default): the node above, (i-1, j), then the node to the left, (i, j-1). A neighbour outside the
      lattice is replaced by the head features h, so node (0, 0) receives h alone (one input, width channels);
      node (0, j > 0) receives (h, node(0, j-1)); node (i > 0, 0) receives (node(i-1, 0), h); every interior node
      receives two lattice nodes. The head thus feeds the first row and the first column.
    - "diagonal": as "grid" plus the diagonal predecessor (i-1, j-1) as a third input where it exists (i, j > 0);
      the boundary nodes are those of "grid".

    The tail conv3x3 (width -> image_channels, no bias, no activation) maps node (rows-1, cols-1) to the noise. The
    longest path has rows + cols + 1 convolutions (head, rows + cols - 1 nodes, tail): 9 with the defaults, against
    DnCNN's 17, while the many short paths (every monotone path through the lattice) ease training.

    Args:
        rows, cols: lattice size, >= 1 each (default 4 x 4).
        width: channels of the head and of every node (default 32).
        image_channels: channels of the images (default 1).
        batch_norm: conv + BN + ReLU nodes (the convolutions then have no bias) instead of conv + ReLU with the ReLU
            fused into ConcatConv2d (default False: the fused path, and a model that behaves the same in train and
            eval mode).
        wiring: "grid" (default) or "diagonal", see above.

    The defaults have 286,816 learnable parameters, 51.6% of DnCNN()'s 556,096 (the abstract reports an LFN that
    beats DnCNN with 52% of its parameters).

    Raises:
        TypeError, ValueError: a bad argument (the message names it); ``forward`` on a tensor that is not
        (B, image_channels, H, W) floating.

    Example:
        >>> model = LatticeFusionNet(rows=3, cols=5, width=24)
        >>> model(torch.rand(1, 1, 33, 20)).shape
        torch.Size([1, 1, 33, 20])
    """

    def __init__(self, rows: int = 4, cols: int = 4, width: int = 32, image_channels: int = 1,
                 batch_norm: bool = False, wiring: str = "grid") -> None:
        super().__init__()
        self.rows = check_int("rows", rows, 1)
        self.cols = check_int("cols", cols, 1)
        self.width = check_int("width", width, 1)
        self.image_channels = check_int("image_channels", image_channels, 1)
        if not isinstance(batch_norm, bool):
            raise TypeError(f"batch_norm must be a bool, got {type(batch_norm).__name__}.")
        if not isinstance(wiring, str):
            raise TypeError(f"wiring must be a str, got {type(wiring).__name__}.")
        if wiring not in WIRINGS:
            raise ValueError(f"wiring must be one of {', '.join(map(repr, WIRINGS))}, got {wiring!r}.")
        self.batch_norm = batch_norm
        self.wiring = wiring
        self.head = nn.Conv2d(self.image_channels, self.width, 3, padding=1)
        self.nodes = nn.ModuleList()
        self.norms = nn.ModuleList()
        for i in range(self.rows):
            for j in range(self.cols):
                fan_in = len(self.sources(i, j))
                self.nodes.append(ConcatConv2d([self.width] * fan_in, self.width, 3, bias=not batch_norm,
                                               activation=None if batch_norm else "relu"))
                self.norms.append(nn.BatchNorm2d(self.width) if batch_norm else nn.Identity())
        self.tail = nn.Conv2d(self.width, self.image_channels, 3, padding=1, bias=False)

    def sources(self, i: int, j: int) -> list[tuple[int, int] | None]:
        """The inputs of node (i, j), in order: (row, col) of a lattice node, or None for the head features."""
        if i == 0 and j == 0:
            return [None]
        inputs: list[tuple[int, int] | None] = [(i - 1, j) if i > 0 else None, (i, j - 1) if j > 0 else None]
        if self.wiring == "diagonal" and i > 0 and j > 0:
            inputs.append((i - 1, j - 1))
        return inputs

    def predict_noise(self, y: Tensor) -> Tensor:
        """The noise estimate, shaped like y."""
        check_image(y, self.image_channels, "LatticeFusionNet")
        head = self.head(y).relu()
        # Keep only what later nodes read: the row above (and its diagonal) and the current row.
        above: list[Tensor] = []
        for i in range(self.rows):
            row: list[Tensor] = []
            for j in range(self.cols):
                inputs = [head if s is None else (row[s[1]] if s[0] == i else above[s[1]]) for s in self.sources(i, j)]
                k = i * self.cols + j
                out = self.nodes[k](*inputs)
                if self.batch_norm:
                    out = self.norms[k](out).relu()
                row.append(out)
            above = row
        return self.tail(above[-1])

    def forward(self, y: Tensor) -> Tensor:
        """The denoised image y - noise estimate, shaped like y."""
        return y - self.predict_noise(y)

    def extra_repr(self) -> str:
        return f"rows={self.rows}, cols={self.cols}, width={self.width}, batch_norm={self.batch_norm}, " \
               f"wiring={self.wiring!r}"
