"""Pure-PyTorch reference of the internal op ``torch_medloss::label_histogram``: the ground truth of its kernels.

It is written to be read, not to be fast: it widens every label to int64 and allocates a few (B, N) temporaries.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def label_histogram(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Count the pixels of each class in each image, with one extra column for invalid labels.

    Args:
        labels: integer tensor of shape (B, N), or (B, *S): every dim after the first is a pixel dim.
        num_classes: C, the number of classes; valid labels are 0 .. C - 1.
        ignore_index: pixels with this label are not counted anywhere (it may lie inside [0, C) too).

    Returns:
        int64 tensor of shape (B, C + 1): ``[b, c]`` for ``c < C`` counts the pixels of image ``b`` labelled ``c``;
        ``[b, C]`` counts its invalid pixels, whose label is neither in [0, C) nor ``ignore_index``.
    """
    batch = labels.shape[0]
    # Widen first so that every integer dtype is compared with ignore_index and C in the same (int64) range:
    # compared as uint8, ignore_index=-100 would wrap to 156.
    flat = labels.reshape(batch, math.prod(labels.shape[1:])).long()

    # The bin of each pixel: its class; C for an invalid label; C + 1, a bin that is dropped, for ignore_index.
    is_class = (flat >= 0) & (flat < num_classes)
    bins = torch.where(is_class, flat, num_classes)
    bins = torch.where(flat == ignore_index, num_classes + 1, bins)

    counts = torch.zeros(batch, num_classes + 2, dtype=torch.int64, device=labels.device)
    counts.scatter_add_(1, bins, torch.ones_like(bins))
    return counts[:, : num_classes + 1].contiguous()
