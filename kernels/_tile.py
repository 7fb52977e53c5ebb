"""Triton pieces shared by the kernels of several ops: the logits tile with its masked softmax, and the label tile.

A (BLOCK_C, BLOCK_S) tile holds the whole class axis of BLOCK_S pixels, so every softmax statistic is a reduction
over axis 0 in registers. Padded class rows (classes >= C) load 0 and enter no max and no sum.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def logits_tile(logits_row, classes, pixels, num_classes, num_pixels, stride_c, stride_s):
    """(tile_ok, class_ok, pixel_ok, x): the in-bounds masks and the logits tile in fp32 (0 where out of bounds)."""
    class_ok = classes < num_classes
    pixel_ok = pixels < num_pixels
    tile_ok = class_ok[:, None] & pixel_ok[None, :]
    x = tl.load(logits_row + classes[:, None] * stride_c + pixels[None, :] * stride_s, mask=tile_ok, other=0.0)
    return tile_ok, class_ok, pixel_ok, x.to(tl.float32)


@triton.jit
def softmax_tile(x, class_ok):
    """(q, log_q, shift, e_sum) of a logits tile along the classes: q = softmax(x), log_q = log_softmax(x),
    shift = the per-pixel max and e_sum = sum exp(x - shift).

    A logit of -inf (a masked class) gives q = 0 and log_q = -inf there; callers that multiply log_q by a zero
    weight must select with tl.where instead (0 * -inf is NaN), as torch's cross entropy never reads such terms.
    log_q is finite on padded rows (x = 0 there), which no caller reads either.
    """
    shifted = tl.where(class_ok[:, None], x, float("-inf"))
    shift = tl.max(shifted, axis=0)
    e = tl.exp(shifted - shift[None, :])
    e_sum = tl.sum(e, axis=0)
    q = e * (1.0 / e_sum)[None, :]
    log_q = (x - shift[None, :]) - tl.log(e_sum)[None, :]
    return q, log_q, shift, e_sum


@triton.jit
def label_tile(labels_row, pixels, pixel_ok, stride_s):
    """The labels of a tile's pixels, read at their own dtype and widened to int64 (0 past the end).

    Compared in int64: a uint8 map cannot hold -100, and an int64 label such as 2**32 + 1 must not wrap onto a class.
    An out-of-range label is never used as an address.
    """
    return tl.load(labels_row + pixels * stride_s, mask=pixel_ok, other=0).to(tl.int64)
