"""Triton kernels of ``torch_medloss::concat_conv2d_triton``: convolution of a channel concatenation, without the cat.

The op computes ``relu?(conv2d(cat(inputs, 1), weight, bias, padding=padding))`` for 1 to 8 inputs (B, C_i, H, W)
of any strides (channels_last native, NCHW fine), a weight (O, sum C_i, K, K) with K = 1 or 3, stride 1 and
0 <= padding <= K - 1, in float32, bfloat16 or float16 with fp32 accumulation. Its autograd formula
(torch_medloss.ops.concat_conv) calls two internal ops, ``concat_conv2d_bwd_input_triton`` (one gradient tensor per
input) and ``concat_conv2d_bwd_weight_triton`` (weight and bias). Contract: torch_medloss.reference.concat_conv, and
torch_medloss._contract for the input count (the kernels' pointer slots) and the kernel sizes.

Method: implicit GEMM (no im2col buffer, no cat).
  - Forward. GEMM of M = B * H' * W' output pixels by N = O output channels, reduced over sum_i C_i * K * K. Program
    (m, n) owns a (BLOCK_M, BLOCK_N) output tile and walks, in a fixed order, the inputs (a constexpr-guarded
    unrolled chain over 8 pointer slots), the K * K taps (static), and the input's channels BLOCK_K at a time
    (a runtime loop): it loads the shifted (BLOCK_M, BLOCK_K) patch of that input where it lies (pointer + strides;
    out-of-image taps masked to 0, which is the zero padding) and the (BLOCK_K, BLOCK_N) slice of the weight, and
    accumulates ``tl.dot`` in fp32. Epilogue: + bias, ReLU, one store in the output dtype.
  - Input gradients. The transposed GEMM: for input k, M = B * H * W input pixels by N = C_k channels, reduced over
    O * K * K: dX_k[p, c] = sum_{tap, o} dY'[p - tap + pad, o] W[o, start_k + c, tap] (the flipped taps; dY' is the
    upstream gradient times the ReLU mask (Y > 0) of the saved output, applied as it is loaded). One launch for all
    inputs: the channel-tile axis of the grid is (input, tile) pairs, and each program writes one tile of its own
    input's gradient tensor, in that input's layout. Nothing is concatenated.
  - Weight and bias gradients. dW[o, c, tap] = sum over the B * H' * W' output pixels of dY' times the shifted input:
    a GEMM reduced over the pixels. The pixels are cut into ``splits`` contiguous slices; program (split, tap,
    channel tile, out tile) reduces its slice in a fixed order and writes its own tile of an fp32 partial buffer
    (splits, K * K, sum C_i, O), and ``torch.sum`` over the splits gives dW: deterministic, no atomics. The bias
    gradient rides along: the programs of tap 0 and the first channel tile also sum dY' into (splits, O).

Why 8 pointer slots with a constexpr NUM_INPUTS rather than one launch per input accumulating into the output:
one launch reads every input once and writes the output once, with the bias and ReLU in the epilogue; per-input
launches would read and rewrite an fp32 output n times (and could apply the ReLU only at the end). The cost is
code size: the reduction body is instantiated NUM_INPUTS times (one compile per input count, kernel size and
dtype), and unused slots receive inputs[0] as a placeholder that is never read.
A table of input addresses loaded in the kernel (the grouped-GEMM way) would avoid instantiating the body per
slot, but it has to be built from ``data_ptr()``, which the fake tensors of torch.compile do not have: the slots keep
the op traceable with ``fullgraph=True``.

Trade-off and limits. A 3x3 layer of 64 -> 64 channels does ~9 * 128 FLOP per loaded input element, so the kernels
are bound by the tensor cores, not by memory; the saving over cat + conv2d is the write and reread of the
concatenated tensor (and of its gradient), about 2 * sum C_i * B * H * W elements each way. Against cuDNN the
kernels give up hand-tuned tile schedules (no TMA, no warp specialisation, no split-K heuristics), so where cuDNN
is much faster than a Triton implicit GEMM, at large channel counts (C and O in the hundreds), the cat is cheap
in comparison and cat + conv2d is the better choice. The weight-gradient kernel rereads dY' once per tap and per
channel tile (from L2). fp32 runs the dots in TF32 (as cuDNN does by default) when
``torch.backends.cudnn.allow_tf32`` is set: expect a relative error of about 1e-3 of the output's scale; otherwise
(and under TRITON_INTERPRET=1, where the dot is numpy's fp32 matmul) the dots are IEEE fp32.

First thing to try on a GPU. The reduction loops are ``while`` loops (the Triton 3.6 interpreter, with numpy >= 2.4,
cannot take a runtime range bound; see below), and Triton software-pipelines only ``for`` loops: compiled for sm_90a
the forward has no async copies, each step loads, then waits for its wgmma. A constexpr switch to
``tl.range(..., num_stages=...)`` on the GPU (keeping ``while`` under the interpreter) is the likely win; it was not
made blind, without a GPU to time it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from torch_medloss import _contract as K
from torch_medloss.kernels._device import on_device
from torch_medloss.reference.concat_conv import output_memory_format

# No autotuning yet: no GPU has timed these kernels. An autotune key would be (C_i tuple, O, K, dtype, layout);
# the candidates worth timing on an H100 are listed in the report of issue 6 (BLOCK_M 64/128, BLOCK_N 64/128,
# BLOCK_K 32/64, num_warps 4/8, num_stages 2-4). The sizes below are a conservative middle.

# Forward tile: BLOCK_M output pixels x BLOCK_N output channels, reduced BLOCK_K input channels at a time.
_FWD_BLOCK_M = 64
_FWD_BLOCK_N = 64
_FWD_BLOCK_K = 32
# Input-gradient tile: BLOCK_M input pixels x BLOCK_N channels of one input, reduced BLOCK_K output channels at a time.
_BWD_IN_BLOCK_M = 64
_BWD_IN_BLOCK_N = 64
_BWD_IN_BLOCK_K = 32
# Weight-gradient tile: BLOCK_C input channels x BLOCK_O output channels, reduced BLOCK_P output pixels at a time.
_BWD_W_BLOCK_C = 64
_BWD_W_BLOCK_O = 64
_BWD_W_BLOCK_P = 32
# Weight gradient: aim for this many programs in all (about 4 per SM on an H100's 132) by splitting the pixels; the
# partial buffer is then splits * K * K * sum C_i * O fp32 (9.4 MB at 2 x 64 -> 64, 3x3 and 32 splits).
_BWD_W_TARGET_PROGRAMS = 512
# 8 warps: ptxas (sm_90a, Triton 3.6, compiled here without a GPU, bf16 3x3 with ReLU) reports with 4 warps 255
# registers and spills in the forward (2 inputs: 536 bytes; 8 inputs: 948) and the weight gradient (8 inputs:
# 1832 bytes), the int64 pointer tiles being the main cost; with 8 warps no spills: forward 235 (2 inputs) / 232
# (8), input gradient 142, weight gradient 214 (8 inputs).
_NUM_WARPS = 8
_NUM_STAGES = 2

# The kernels have K.CONCAT_CONV_MAX_INPUTS (8) pointer slots: x0_ptr ... x7_ptr, gx0_ptr ... gx7_ptr.
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ------------------------------------------------------------------------------------------------ shared tile math


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + a @ b in fp32. UPCAST: run the product in fp32 (the Triton 3.6 interpreter's dot misreads bfloat16)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _fwd_one_input(
    acc,
    x_ptr,
    w_ptr,
    num_channels,
    channel_start,
    image,
    oh,
    ow,
    pixel_ok,
    outs,
    out_ok,
    height,
    width,
    padding,
    stride_x_b,
    stride_x_c,
    stride_x_h,
    stride_x_w,
    stride_w_o,
    stride_w_c,
    stride_w_h,
    stride_w_w,
    KS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Add one input's share, sum over its channels and taps of x[p + tap - pad, c] W[o, start + c, tap], to acc."""
    chans = tl.arange(0, BLOCK_K).to(tl.int64)
    x_image = x_ptr + image * stride_x_b  # (BLOCK_M,) pointers: a tile may span two images
    for kh in tl.static_range(KS):
        ih = oh + (kh - padding)
        row_ok = pixel_ok & (ih >= 0) & (ih < height)
        for kw in tl.static_range(KS):
            iw = ow + (kw - padding)
            ok = row_ok & (iw >= 0) & (iw < width)  # out of the image: the zero padding
            x_rows = x_image + ih * stride_x_h + iw * stride_x_w
            w_tap = w_ptr + kh * stride_w_h + kw * stride_w_w + outs * stride_w_o
            # A while loop, not range() with a runtime bound: with numpy >= 2.4 the Triton 3.6 interpreter cannot
            # use a runtime argument as a range bound (triton-lang/triton#9171).
            c0 = 0
            while c0 < num_channels:
                c = c0 + chans
                c_ok = c < num_channels
                a = tl.load(x_rows[:, None] + c[None, :] * stride_x_c, mask=ok[:, None] & c_ok[None, :], other=0.0)
                b = tl.load(w_tap[None, :] + (channel_start + c)[:, None] * stride_w_c,
                            mask=c_ok[:, None] & out_ok[None, :], other=0.0)
                acc = _dot(a, b, acc, UPCAST, INPUT_PRECISION)
                c0 += BLOCK_K
    return acc


# ------------------------------------------------------------------------------------------------------- forward


@triton.jit
def _concat_conv2d_fwd_kernel(
    # Output pointer
    out_ptr,
    # Input pointers: 8 slots, the first NUM_INPUTS used
    x0_ptr, x1_ptr, x2_ptr, x3_ptr, x4_ptr, x5_ptr, x6_ptr, x7_ptr,
    w_ptr,
    bias_ptr,
    # Sizes
    c0, c1, c2, c3, c4, c5, c6, c7,
    num_pixels,
    out_channels,
    height,
    width,
    out_height,
    out_width,
    padding,
    # Strides: (b, c, h, w) of each input slot, of the weight as (o, c, kh, kw), of the output
    sx0_b, sx0_c, sx0_h, sx0_w, sx1_b, sx1_c, sx1_h, sx1_w, sx2_b, sx2_c, sx2_h, sx2_w, sx3_b, sx3_c, sx3_h, sx3_w,
    sx4_b, sx4_c, sx4_h, sx4_w, sx5_b, sx5_c, sx5_h, sx5_w, sx6_b, sx6_c, sx6_h, sx6_w, sx7_b, sx7_c, sx7_h, sx7_w,
    stride_w_o,
    stride_w_c,
    stride_w_h,
    stride_w_w,
    stride_out_b,
    stride_out_c,
    stride_out_h,
    stride_out_w,
    # Constexpr flags and blocks
    NUM_INPUTS: tl.constexpr,
    KS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M pixels, BLOCK_N output channels) tile of the output.

    out_ptr: (B, O, H', W'), any strides. x{k}_ptr: (B, c{k}, H, W), any strides. w_ptr: (O, sum c{k}, KS, KS),
    any strides. bias_ptr: (O,) contiguous (unused without HAS_BIAS). Grid: (cdiv(M, BLOCK_M) * cdiv(O, BLOCK_N),),
    the output-channel tile fastest so that the programs sharing input rows run together.
    """
    pid = tl.program_id(0).to(tl.int64)
    n_tiles = tl.cdiv(out_channels, BLOCK_N)
    tile_m = pid // n_tiles
    tile_n = pid % n_tiles

    # 1. the tile's output pixels (int64: B * H' * W' may pass 2**31) and output channels
    pixels = tile_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    pixel_ok = pixels < num_pixels
    plane = out_height * out_width
    image = pixels // plane
    rest = pixels % plane
    oh = rest // out_width
    ow = rest % out_width
    outs = tile_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    out_ok = outs < out_channels

    # ------------------------------------------------------------------ 2. the reduction: inputs, taps, channels
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    start = 0
    if NUM_INPUTS > 0:
        acc = _fwd_one_input(acc, x0_ptr, w_ptr, c0, start, image, oh, ow, pixel_ok, outs, out_ok, height, width,
                             padding, sx0_b, sx0_c, sx0_h, sx0_w, stride_w_o, stride_w_c, stride_w_h, stride_w_w,
                             KS, BLOCK_K, UPCAST, INPUT_PRECISION)
        start += c0
    if NUM_INPUTS > 1:
        acc = _fwd_one_input(acc, x1_ptr, w_ptr, c1, start, image, oh, ow, pixel_ok, outs, out_ok, height, width,
                             padding, sx1_b, sx1_c, sx1_h, sx1_w, stride_w_o, stride_w_c, stride_w_h, stride_w_w,
                             KS, BLOCK_K, UPCAST, INPUT_PRECISION)
        start += c1
    if NUM_INPUTS > 2:
        acc = _fwd_one_input(acc, x2_ptr, w_ptr, c2, start, image, oh, ow, pixel_ok, outs, out_ok, height, width,
                             padding, sx2_b, sx2_c, sx2_h, sx2_w, stride_w_o, stride_w_c, stride_w_h, stride_w_w,
                             KS, BLOCK_K, UPCAST, INPUT_PRECISION)
        start += c2
    if NUM_INPUTS > 3:
        acc = _fwd_one_input(acc, x3_ptr, w_ptr, c3, start, image, oh, ow, pixel_ok, outs, out_ok, height, width,
                             padding, sx3_b, sx3_c, sx3_h, sx3_w, stride_w_o, stride_w_c, stride_w_h, stride_w_w,
                             KS, BLOCK_K, UPCAST, INPUT_PRECISION)
        start += c3
    if NUM_INPUTS > 4:
        acc = _fwd_one_input(acc, x4_ptr, w_ptr, c4, start, image, oh, ow, pixel_ok, outs, out_ok, height, width,
                             padding, sx4_b, sx4_c, sx4_h, sx4_w, stride_w_o, stride_w_c, stride_w_h, stride_w_w,
                             KS, BLOCK_K, UPCAST, INPUT_PRECISION)
        start += c4
    if NUM_INPUTS > 5:
        acc = _fwd_one_input(acc, x5_ptr, w_ptr, c5, start, image, oh, ow, pixel_ok, outs, out_ok, height, width,
                             padding, sx5_b, sx5_c, sx5_h, sx5_w, stride_w_o, stride_w_c, stride_w_h, stride_w_w,
                             KS, BLOCK_K, UPCAST, INPUT_PRECISION)
        start += c5
    if NUM_INPUTS > 6:
        acc = _fwd_one_input(acc, x6_ptr, w_ptr, c6, start, image, oh, ow, pixel_ok, outs, out_ok, height, width,
                             padding, sx6_b, sx6_c, sx6_h, sx6_w, stride_w_o, stride_w_c, stride_w_h, stride_w_w,
                             KS, BLOCK_K, UPCAST, INPUT_PRECISION)
        start += c6
    if NUM_INPUTS > 7:
        acc = _fwd_one_input(acc, x7_ptr, w_ptr, c7, start, image, oh, ow, pixel_ok, outs, out_ok, height, width,
                             padding, sx7_b, sx7_c, sx7_h, sx7_w, stride_w_o, stride_w_c, stride_w_h, stride_w_w,
                             KS, BLOCK_K, UPCAST, INPUT_PRECISION)

    # ------------------------------------------------------------------ 3. epilogue: bias, ReLU, one store
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs, mask=out_ok, other=0.0).to(tl.float32)[None, :]
    if RELU:
        # NaN stays NaN, as in torch.relu (PTX max.f32 would return the other operand: 0).
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    out_rows = out_ptr + image * stride_out_b + oh * stride_out_h + ow * stride_out_w
    tl.store(out_rows[:, None] + outs[None, :] * stride_out_c, acc.to(out_ptr.dtype.element_ty),
             mask=pixel_ok[:, None] & out_ok[None, :])


# ------------------------------------------------------------------------------------------------ input gradients


@triton.jit
def _bwd_input_tile(
    gx_ptr,
    gy_ptr,
    y_ptr,
    w_ptr,
    tile_m,
    tile_n,
    num_channels,
    channel_start,
    num_pixels,
    out_channels,
    height,
    width,
    out_height,
    out_width,
    padding,
    stride_gx_b,
    stride_gx_c,
    stride_gx_h,
    stride_gx_w,
    stride_gy_b,
    stride_gy_c,
    stride_gy_h,
    stride_gy_w,
    stride_y_b,
    stride_y_c,
    stride_y_h,
    stride_y_w,
    stride_w_o,
    stride_w_c,
    stride_w_h,
    stride_w_w,
    KS: tl.constexpr,
    RELU: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M input pixels, BLOCK_N channels) tile of one input's gradient: sum over taps and O of dY' W."""
    # 1. the tile's input pixels (int64) and channels
    pixels = tile_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    pixel_ok = pixels < num_pixels
    plane = height * width
    image = pixels // plane
    rest = pixels % plane
    ih = rest // width
    iw = rest % width
    chans = tile_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    chan_ok = chans < num_channels
    outs_k = tl.arange(0, BLOCK_K).to(tl.int64)

    # 2. the transposed reduction: output pixel p - tap + pad meets input pixel p through tap (kh, kw)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    gy_image = gy_ptr + image * stride_gy_b
    y_image = y_ptr + image * stride_y_b
    for kh in tl.static_range(KS):
        oh = ih + (padding - kh)
        row_ok = pixel_ok & (oh >= 0) & (oh < out_height)
        for kw in tl.static_range(KS):
            ow = iw + (padding - kw)
            ok = row_ok & (ow >= 0) & (ow < out_width)
            gy_rows = gy_image + oh * stride_gy_h + ow * stride_gy_w
            y_rows = y_image + oh * stride_y_h + ow * stride_y_w
            w_tap = w_ptr + kh * stride_w_h + kw * stride_w_w + (channel_start + chans) * stride_w_c
            o0 = 0
            while o0 < out_channels:
                o = o0 + outs_k
                o_ok = o < out_channels
                tile_ok = ok[:, None] & o_ok[None, :]
                gy = tl.load(gy_rows[:, None] + o[None, :] * stride_gy_c, mask=tile_ok, other=0.0)
                if RELU:
                    # ReLU's gradient from the saved output: dY where Y > 0 (as torch's threshold_backward)
                    y = tl.load(y_rows[:, None] + o[None, :] * stride_y_c, mask=tile_ok, other=0.0)
                    gy = tl.where(y > 0, gy, tl.zeros_like(gy))
                b = tl.load(w_tap[None, :] + o[:, None] * stride_w_o, mask=o_ok[:, None] & chan_ok[None, :],
                            other=0.0)
                acc = _dot(gy, b, acc, UPCAST, INPUT_PRECISION)
                o0 += BLOCK_K

    # 3. one store into this input's own gradient, in its layout
    gx_rows = gx_ptr + image * stride_gx_b + ih * stride_gx_h + iw * stride_gx_w
    tl.store(gx_rows[:, None] + chans[None, :] * stride_gx_c, acc.to(gx_ptr.dtype.element_ty),
             mask=pixel_ok[:, None] & chan_ok[None, :])


@triton.jit
def _concat_conv2d_bwd_input_kernel(
    # Output pointers: 8 slots, the first NUM_INPUTS used
    gx0_ptr, gx1_ptr, gx2_ptr, gx3_ptr, gx4_ptr, gx5_ptr, gx6_ptr, gx7_ptr,
    # Input pointers
    gy_ptr,
    y_ptr,
    w_ptr,
    # Sizes
    c0, c1, c2, c3, c4, c5, c6, c7,
    tiles_per_input,
    num_pixels,
    out_channels,
    height,
    width,
    out_height,
    out_width,
    padding,
    # Strides: (b, c, h, w) of each gradient slot, of dY and Y, of the weight as (o, c, kh, kw)
    sg0_b, sg0_c, sg0_h, sg0_w, sg1_b, sg1_c, sg1_h, sg1_w, sg2_b, sg2_c, sg2_h, sg2_w, sg3_b, sg3_c, sg3_h, sg3_w,
    sg4_b, sg4_c, sg4_h, sg4_w, sg5_b, sg5_c, sg5_h, sg5_w, sg6_b, sg6_c, sg6_h, sg6_w, sg7_b, sg7_c, sg7_h, sg7_w,
    stride_gy_b,
    stride_gy_c,
    stride_gy_h,
    stride_gy_w,
    stride_y_b,
    stride_y_c,
    stride_y_h,
    stride_y_w,
    stride_w_o,
    stride_w_c,
    stride_w_h,
    stride_w_w,
    # Constexpr flags and blocks
    NUM_INPUTS: tl.constexpr,
    KS: tl.constexpr,
    RELU: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Tile (m, input k, channel tile t) of dX_k.

    gx{k}_ptr: (B, c{k}, H, W), any strides. gy_ptr, y_ptr: (B, O, H', W'), any strides (y_ptr read only with RELU).
    w_ptr: (O, sum c{k}, KS, KS), any strides. Grid: (cdiv(B * H * W, BLOCK_M) * NUM_INPUTS * tiles_per_input,),
    (input, tile) fastest so that the programs reading the same dY rows run together; tiles past an input's channel
    count do nothing.
    """
    pid = tl.program_id(0).to(tl.int64)
    n_tiles = NUM_INPUTS * tiles_per_input
    tile_m = pid // n_tiles
    which = (pid % n_tiles) // tiles_per_input
    tile_n = pid % tiles_per_input

    start = 0
    if NUM_INPUTS > 0:
        if (which == 0) & (tile_n * BLOCK_N < c0):
            _bwd_input_tile(gx0_ptr, gy_ptr, y_ptr, w_ptr, tile_m, tile_n, c0, start, num_pixels, out_channels,
                            height, width, out_height, out_width, padding, sg0_b, sg0_c, sg0_h, sg0_w,
                            stride_gy_b, stride_gy_c, stride_gy_h, stride_gy_w, stride_y_b, stride_y_c, stride_y_h,
                            stride_y_w, stride_w_o, stride_w_c, stride_w_h, stride_w_w,
                            KS, RELU, UPCAST, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        start += c0
    if NUM_INPUTS > 1:
        if (which == 1) & (tile_n * BLOCK_N < c1):
            _bwd_input_tile(gx1_ptr, gy_ptr, y_ptr, w_ptr, tile_m, tile_n, c1, start, num_pixels, out_channels,
                            height, width, out_height, out_width, padding, sg1_b, sg1_c, sg1_h, sg1_w,
                            stride_gy_b, stride_gy_c, stride_gy_h, stride_gy_w, stride_y_b, stride_y_c, stride_y_h,
                            stride_y_w, stride_w_o, stride_w_c, stride_w_h, stride_w_w,
                            KS, RELU, UPCAST, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        start += c1
    if NUM_INPUTS > 2:
        if (which == 2) & (tile_n * BLOCK_N < c2):
            _bwd_input_tile(gx2_ptr, gy_ptr, y_ptr, w_ptr, tile_m, tile_n, c2, start, num_pixels, out_channels,
                            height, width, out_height, out_width, padding, sg2_b, sg2_c, sg2_h, sg2_w,
                            stride_gy_b, stride_gy_c, stride_gy_h, stride_gy_w, stride_y_b, stride_y_c, stride_y_h,
                            stride_y_w, stride_w_o, stride_w_c, stride_w_h, stride_w_w,
                            KS, RELU, UPCAST, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        start += c2
    if NUM_INPUTS > 3:
        if (which == 3) & (tile_n * BLOCK_N < c3):
            _bwd_input_tile(gx3_ptr, gy_ptr, y_ptr, w_ptr, tile_m, tile_n, c3, start, num_pixels, out_channels,
                            height, width, out_height, out_width, padding, sg3_b, sg3_c, sg3_h, sg3_w,
                            stride_gy_b, stride_gy_c, stride_gy_h, stride_gy_w, stride_y_b, stride_y_c, stride_y_h,
                            stride_y_w, stride_w_o, stride_w_c, stride_w_h, stride_w_w,
                            KS, RELU, UPCAST, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        start += c3
    if NUM_INPUTS > 4:
        if (which == 4) & (tile_n * BLOCK_N < c4):
            _bwd_input_tile(gx4_ptr, gy_ptr, y_ptr, w_ptr, tile_m, tile_n, c4, start, num_pixels, out_channels,
                            height, width, out_height, out_width, padding, sg4_b, sg4_c, sg4_h, sg4_w,
                            stride_gy_b, stride_gy_c, stride_gy_h, stride_gy_w, stride_y_b, stride_y_c, stride_y_h,
                            stride_y_w, stride_w_o, stride_w_c, stride_w_h, stride_w_w,
                            KS, RELU, UPCAST, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        start += c4
    if NUM_INPUTS > 5:
        if (which == 5) & (tile_n * BLOCK_N < c5):
            _bwd_input_tile(gx5_ptr, gy_ptr, y_ptr, w_ptr, tile_m, tile_n, c5, start, num_pixels, out_channels,
                            height, width, out_height, out_width, padding, sg5_b, sg5_c, sg5_h, sg5_w,
                            stride_gy_b, stride_gy_c, stride_gy_h, stride_gy_w, stride_y_b, stride_y_c, stride_y_h,
                            stride_y_w, stride_w_o, stride_w_c, stride_w_h, stride_w_w,
                            KS, RELU, UPCAST, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        start += c5
    if NUM_INPUTS > 6:
        if (which == 6) & (tile_n * BLOCK_N < c6):
            _bwd_input_tile(gx6_ptr, gy_ptr, y_ptr, w_ptr, tile_m, tile_n, c6, start, num_pixels, out_channels,
                            height, width, out_height, out_width, padding, sg6_b, sg6_c, sg6_h, sg6_w,
                            stride_gy_b, stride_gy_c, stride_gy_h, stride_gy_w, stride_y_b, stride_y_c, stride_y_h,
                            stride_y_w, stride_w_o, stride_w_c, stride_w_h, stride_w_w,
                            KS, RELU, UPCAST, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        start += c6
    if NUM_INPUTS > 7:
        if (which == 7) & (tile_n * BLOCK_N < c7):
            _bwd_input_tile(gx7_ptr, gy_ptr, y_ptr, w_ptr, tile_m, tile_n, c7, start, num_pixels, out_channels,
                            height, width, out_height, out_width, padding, sg7_b, sg7_c, sg7_h, sg7_w,
                            stride_gy_b, stride_gy_c, stride_gy_h, stride_gy_w, stride_y_b, stride_y_c, stride_y_h,
                            stride_y_w, stride_w_o, stride_w_c, stride_w_h, stride_w_w,
                            KS, RELU, UPCAST, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)


# ------------------------------------------------------------------------------------ weight and bias gradients


@triton.jit
def _bwd_weight_tile(
    gw_partial_ptr,
    gb_partial_ptr,
    x_ptr,
    gy_ptr,
    y_ptr,
    split,
    tap,
    tile_c,
    tile_o,
    num_channels,
    channel_start,
    pixels_per_split,
    num_pixels,
    out_channels,
    height,
    width,
    out_height,
    out_width,
    padding,
    stride_x_b,
    stride_x_c,
    stride_x_h,
    stride_x_w,
    stride_gy_b,
    stride_gy_c,
    stride_gy_h,
    stride_gy_w,
    stride_y_b,
    stride_y_c,
    stride_y_h,
    stride_y_w,
    stride_gw_s,
    stride_gw_t,
    stride_gw_c,
    stride_gb_s,
    WITH_BIAS: tl.constexpr,
    KS: tl.constexpr,
    RELU: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Partial dW[tap, start + c, o] (and, for WITH_BIAS, db[o]) over the output pixels of one split."""
    kh = tap // KS
    kw = tap % KS
    chans = tile_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    chan_ok = chans < num_channels
    outs = tile_o * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)
    out_ok = outs < out_channels
    plane = out_height * out_width
    first = split * pixels_per_split

    acc = tl.zeros([BLOCK_C, BLOCK_O], dtype=tl.float32)
    acc_bias = tl.zeros([BLOCK_O], dtype=tl.float32)
    offset = tl.zeros([], dtype=tl.int64)  # int64: a slice may hold more than 2**31 pixels
    while offset < pixels_per_split:
        # 1. BLOCK_P output pixels, and the input pixels that tap (kh, kw) reads for them
        pixels = first + offset + tl.arange(0, BLOCK_P).to(tl.int64)
        pixel_ok = pixels < num_pixels
        image = pixels // plane
        rest = pixels % plane
        oh = rest // out_width
        ow = rest % out_width
        ih = oh + (kh - padding)
        iw = ow + (kw - padding)
        in_ok = pixel_ok & (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)

        # 2. dY' (BLOCK_P, BLOCK_O) with the ReLU mask, and the shifted input transposed (BLOCK_C, BLOCK_P)
        gy_tile_ok = pixel_ok[:, None] & out_ok[None, :]
        gy_rows = gy_ptr + image * stride_gy_b + oh * stride_gy_h + ow * stride_gy_w
        gy = tl.load(gy_rows[:, None] + outs[None, :] * stride_gy_c, mask=gy_tile_ok, other=0.0)
        if RELU:
            y_rows = y_ptr + image * stride_y_b + oh * stride_y_h + ow * stride_y_w
            y = tl.load(y_rows[:, None] + outs[None, :] * stride_y_c, mask=gy_tile_ok, other=0.0)
            gy = tl.where(y > 0, gy, tl.zeros_like(gy))
        x_rows = x_ptr + image * stride_x_b + ih * stride_x_h + iw * stride_x_w
        xt = tl.load(x_rows[None, :] + chans[:, None] * stride_x_c, mask=chan_ok[:, None] & in_ok[None, :],
                     other=0.0)
        acc = _dot(xt, gy, acc, UPCAST, INPUT_PRECISION)
        if WITH_BIAS:
            acc_bias += tl.sum(gy.to(tl.float32), axis=0)
        offset += BLOCK_P

    # 3. this program's tile of the partial buffers (every element is written by exactly one program)
    gw = gw_partial_ptr + split * stride_gw_s + tap * stride_gw_t + (channel_start + chans)[:, None] * stride_gw_c
    tl.store(gw + outs[None, :], acc, mask=chan_ok[:, None] & out_ok[None, :])
    if WITH_BIAS:
        tl.store(gb_partial_ptr + split * stride_gb_s + outs, acc_bias, mask=out_ok)


@triton.jit
def _concat_conv2d_bwd_weight_kernel(
    # Output pointers
    gw_partial_ptr,
    gb_partial_ptr,
    # Input pointers: 8 slots, the first NUM_INPUTS used
    x0_ptr, x1_ptr, x2_ptr, x3_ptr, x4_ptr, x5_ptr, x6_ptr, x7_ptr,
    gy_ptr,
    y_ptr,
    # Sizes
    c0, c1, c2, c3, c4, c5, c6, c7,
    tiles_per_input,
    pixels_per_split,
    num_pixels,
    out_channels,
    height,
    width,
    out_height,
    out_width,
    padding,
    # Strides: (b, c, h, w) of each input slot, of dY and Y, of the partial buffers
    sx0_b, sx0_c, sx0_h, sx0_w, sx1_b, sx1_c, sx1_h, sx1_w, sx2_b, sx2_c, sx2_h, sx2_w, sx3_b, sx3_c, sx3_h, sx3_w,
    sx4_b, sx4_c, sx4_h, sx4_w, sx5_b, sx5_c, sx5_h, sx5_w, sx6_b, sx6_c, sx6_h, sx6_w, sx7_b, sx7_c, sx7_h, sx7_w,
    stride_gy_b,
    stride_gy_c,
    stride_gy_h,
    stride_gy_w,
    stride_y_b,
    stride_y_c,
    stride_y_h,
    stride_y_w,
    stride_gw_s,
    stride_gw_t,
    stride_gw_c,
    stride_gb_s,
    # Constexpr flags and blocks
    NUM_INPUTS: tl.constexpr,
    KS: tl.constexpr,
    RELU: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Program (split, tap, input k, channel tile t, out tile) of the weight gradient's partial buffers.

    gw_partial_ptr: (splits, KS * KS, sum c{k}, O) fp32, contiguous in its last dim. gb_partial_ptr: (splits, O)
    fp32, contiguous in its last dim, written by the programs of tap 0, input 0, channel tile 0. x{k}_ptr:
    (B, c{k}, H, W), gy_ptr and y_ptr: (B, O, H', W'), any strides. Grid: (splits * KS * KS * NUM_INPUTS *
    tiles_per_input * cdiv(O, BLOCK_O),), the out tile fastest and the split slowest, so that the programs reading
    the same pixels run together.
    """
    pid = tl.program_id(0).to(tl.int64)
    o_tiles = tl.cdiv(out_channels, BLOCK_O)
    tile_o = pid % o_tiles
    rest = pid // o_tiles
    tile_c = rest % tiles_per_input
    rest = rest // tiles_per_input
    which = rest % NUM_INPUTS
    rest = rest // NUM_INPUTS
    tap = rest % (KS * KS)
    split = rest // (KS * KS)

    start = 0
    if NUM_INPUTS > 0:
        if (which == 0) & (tile_c * BLOCK_C < c0):
            if (tap == 0) & (tile_c == 0):
                _bwd_weight_tile(gw_partial_ptr, gb_partial_ptr, x0_ptr, gy_ptr, y_ptr, split, tap, tile_c, tile_o,
                                 c0, start, pixels_per_split, num_pixels, out_channels, height, width, out_height,
                                 out_width, padding, sx0_b, sx0_c, sx0_h, sx0_w, stride_gy_b, stride_gy_c,
                                 stride_gy_h, stride_gy_w, stride_y_b, stride_y_c, stride_y_h, stride_y_w,
                                 stride_gw_s, stride_gw_t, stride_gw_c, stride_gb_s,
                                 True, KS, RELU, UPCAST, INPUT_PRECISION, BLOCK_C, BLOCK_O, BLOCK_P)
            else:
                _bwd_weight_tile(gw_partial_ptr, gb_partial_ptr, x0_ptr, gy_ptr, y_ptr, split, tap, tile_c, tile_o,
                                 c0, start, pixels_per_split, num_pixels, out_channels, height, width, out_height,
                                 out_width, padding, sx0_b, sx0_c, sx0_h, sx0_w, stride_gy_b, stride_gy_c,
                                 stride_gy_h, stride_gy_w, stride_y_b, stride_y_c, stride_y_h, stride_y_w,
                                 stride_gw_s, stride_gw_t, stride_gw_c, stride_gb_s,
                                 False, KS, RELU, UPCAST, INPUT_PRECISION, BLOCK_C, BLOCK_O, BLOCK_P)
        start += c0
    if NUM_INPUTS > 1:
        if (which == 1) & (tile_c * BLOCK_C < c1):
            _bwd_weight_tile(gw_partial_ptr, gb_partial_ptr, x1_ptr, gy_ptr, y_ptr, split, tap, tile_c, tile_o,
                             c1, start, pixels_per_split, num_pixels, out_channels, height, width, out_height,
                             out_width, padding, sx1_b, sx1_c, sx1_h, sx1_w, stride_gy_b, stride_gy_c,
                             stride_gy_h, stride_gy_w, stride_y_b, stride_y_c, stride_y_h, stride_y_w,
                             stride_gw_s, stride_gw_t, stride_gw_c, stride_gb_s,
                             False, KS, RELU, UPCAST, INPUT_PRECISION, BLOCK_C, BLOCK_O, BLOCK_P)
        start += c1
    if NUM_INPUTS > 2:
        if (which == 2) & (tile_c * BLOCK_C < c2):
            _bwd_weight_tile(gw_partial_ptr, gb_partial_ptr, x2_ptr, gy_ptr, y_ptr, split, tap, tile_c, tile_o,
                             c2, start, pixels_per_split, num_pixels, out_channels, height, width, out_height,
                             out_width, padding, sx2_b, sx2_c, sx2_h, sx2_w, stride_gy_b, stride_gy_c,
                             stride_gy_h, stride_gy_w, stride_y_b, stride_y_c, stride_y_h, stride_y_w,
                             stride_gw_s, stride_gw_t, stride_gw_c, stride_gb_s,
                             False, KS, RELU, UPCAST, INPUT_PRECISION, BLOCK_C, BLOCK_O, BLOCK_P)
        start += c2
    if NUM_INPUTS > 3:
        if (which == 3) & (tile_c * BLOCK_C < c3):
            _bwd_weight_tile(gw_partial_ptr, gb_partial_ptr, x3_ptr, gy_ptr, y_ptr, split, tap, tile_c, tile_o,
                             c3, start, pixels_per_split, num_pixels, out_channels, height, width, out_height,
                             out_width, padding, sx3_b, sx3_c, sx3_h, sx3_w, stride_gy_b, stride_gy_c,
                             stride_gy_h, stride_gy_w, stride_y_b, stride_y_c, stride_y_h, stride_y_w,
                             stride_gw_s, stride_gw_t, stride_gw_c, stride_gb_s,
                             False, KS, RELU, UPCAST, INPUT_PRECISION, BLOCK_C, BLOCK_O, BLOCK_P)
        start += c3
    if NUM_INPUTS > 4:
        if (which == 4) & (tile_c * BLOCK_C < c4):
            _bwd_weight_tile(gw_partial_ptr, gb_partial_ptr, x4_ptr, gy_ptr, y_ptr, split, tap, tile_c, tile_o,
                             c4, start, pixels_per_split, num_pixels, out_channels, height, width, out_height,
                             out_width, padding, sx4_b, sx4_c, sx4_h, sx4_w, stride_gy_b, stride_gy_c,
                             stride_gy_h, stride_gy_w, stride_y_b, stride_y_c, stride_y_h, stride_y_w,
                             stride_gw_s, stride_gw_t, stride_gw_c, stride_gb_s,
                             False, KS, RELU, UPCAST, INPUT_PRECISION, BLOCK_C, BLOCK_O, BLOCK_P)
        start += c4
    if NUM_INPUTS > 5:
        if (which == 5) & (tile_c * BLOCK_C < c5):
            _bwd_weight_tile(gw_partial_ptr, gb_partial_ptr, x5_ptr, gy_ptr, y_ptr, split, tap, tile_c, tile_o,
                             c5, start, pixels_per_split, num_pixels, out_channels, height, width, out_height,
                             out_width, padding, sx5_b, sx5_c, sx5_h, sx5_w, stride_gy_b, stride_gy_c,
                             stride_gy_h, stride_gy_w, stride_y_b, stride_y_c, stride_y_h, stride_y_w,
                             stride_gw_s, stride_gw_t, stride_gw_c, stride_gb_s,
                             False, KS, RELU, UPCAST, INPUT_PRECISION, BLOCK_C, BLOCK_O, BLOCK_P)
        start += c5
    if NUM_INPUTS > 6:
        if (which == 6) & (tile_c * BLOCK_C < c6):
            _bwd_weight_tile(gw_partial_ptr, gb_partial_ptr, x6_ptr, gy_ptr, y_ptr, split, tap, tile_c, tile_o,
                             c6, start, pixels_per_split, num_pixels, out_channels, height, width, out_height,
                             out_width, padding, sx6_b, sx6_c, sx6_h, sx6_w, stride_gy_b, stride_gy_c,
                             stride_gy_h, stride_gy_w, stride_y_b, stride_y_c, stride_y_h, stride_y_w,
                             stride_gw_s, stride_gw_t, stride_gw_c, stride_gb_s,
                             False, KS, RELU, UPCAST, INPUT_PRECISION, BLOCK_C, BLOCK_O, BLOCK_P)
        start += c6
    if NUM_INPUTS > 7:
        if (which == 7) & (tile_c * BLOCK_C < c7):
            _bwd_weight_tile(gw_partial_ptr, gb_partial_ptr, x7_ptr, gy_ptr, y_ptr, split, tap, tile_c, tile_o,
                             c7, start, pixels_per_split, num_pixels, out_channels, height, width, out_height,
                             out_width, padding, sx7_b, sx7_c, sx7_h, sx7_w, stride_gy_b, stride_gy_c,
                             stride_gy_h, stride_gy_w, stride_y_b, stride_y_c, stride_y_h, stride_y_w,
                             stride_gw_s, stride_gw_t, stride_gw_c, stride_gb_s,
                             False, KS, RELU, UPCAST, INPUT_PRECISION, BLOCK_C, BLOCK_O, BLOCK_P)


# ------------------------------------------------------------------------------------------------------ launchers


def _check(op: str, inputs: list[torch.Tensor], weight: torch.Tensor, padding: int) -> tuple[int, int, int]:
    """The launchers' checks (the public function checked the user's arguments); returns (K, H', W')."""
    if not 1 <= len(inputs) <= K.CONCAT_CONV_MAX_INPUTS:
        raise ValueError(f"{op}: inputs must hold 1 to {K.CONCAT_CONV_MAX_INPUTS} tensors, got {len(inputs)}.")
    first = inputs[0]
    if first.dtype not in _DTYPES:
        raise ValueError(f"{op}: the Triton kernels take float32, bfloat16 or float16, got {first.dtype}; use the "
                         f"reference backend.")
    for i, x in enumerate(inputs):
        if x.dim() != 4 or x.shape[0] != first.shape[0] or x.shape[2:] != first.shape[2:]:
            raise ValueError(f"{op}: inputs[{i}] must have shape (B, C, H, W) with inputs[0]'s B, H, W "
                             f"{tuple(first.shape)}, got {tuple(x.shape)}.")
        if x.dtype != first.dtype or x.device != first.device:
            raise ValueError(f"{op}: inputs[{i}] must have inputs[0]'s dtype and device, got {x.dtype} on {x.device}.")
        if x.shape[1] < 1:  # the bias gradient rides on the first input's programs
            raise ValueError(f"{op}: inputs[{i}] must have at least one channel, got shape {tuple(x.shape)}.")
    channels = sum(x.shape[1] for x in inputs)
    if weight.dim() != 4 or weight.shape[1] != channels or weight.shape[2] != weight.shape[3] or \
            weight.shape[2] not in K.CONCAT_CONV_KERNEL_SIZES or weight.dtype != first.dtype or \
            weight.device != first.device:
        raise ValueError(f"{op}: weight must be (O, {channels}, K, K) with K in {K.CONCAT_CONV_KERNEL_SIZES}, "
                         f"{first.dtype}, on {first.device}; got {tuple(weight.shape)} {weight.dtype} on "
                         f"{weight.device}.")
    ks = weight.shape[-1]
    if not 0 <= padding <= ks - 1:
        raise ValueError(f"{op}: padding must be in [0, {ks - 1}], got {padding}.")
    return ks, first.shape[2] + 2 * padding - ks + 1, first.shape[3] + 2 * padding - ks + 1


def _weight_view(weight: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """The weight as (KS, KS, C, O) contiguous, so that a (channels, out) tile is contiguous along O, and its
    strides in (o, c, kh, kw) order for the kernels. A visible copy of a small tensor (O * C * K * K elements)."""
    w = weight.permute(2, 3, 1, 0).contiguous()
    return w, (w.stride(3), w.stride(2), w.stride(0), w.stride(1))


def _dot_options(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, INPUT_PRECISION): fp32 dots in TF32 when cuDNN convolutions may use it, else IEEE."""
    upcast = _interpreting() and dtype == torch.bfloat16
    precision = "tf32" if dtype == torch.float32 and _cudnn_conv_tf32() else "ieee"
    return upcast, precision


def _cudnn_conv_tf32() -> bool:
    """Whether cuDNN convolutions may use TF32. torch >= 2.9 has per-level ``fp32_precision`` settings ("none" defers
    to the level above) and raises on reading the legacy ``allow_tf32`` once a user has set the new API."""
    levels = (getattr(torch.backends.cudnn, "conv", None), torch.backends.cudnn, torch.backends)
    for level in levels:
        value = getattr(level, "fp32_precision", None)
        if value is None:
            break  # an older torch: the legacy flag below
        if value != "none":
            return value == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)


def _slots(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int], list[int]]:
    """8 pointer slots (unused ones hold tensors[0], never read), 8 channel counts, 32 (b, c, h, w) strides."""
    pad = K.CONCAT_CONV_MAX_INPUTS - len(tensors)
    pointers = list(tensors) + [tensors[0]] * pad
    channels = [t.shape[1] for t in tensors] + [0] * pad
    strides = [s for t in tensors for s in t.stride()] + [0] * (4 * pad)
    return pointers, channels, strides


@triton_op("torch_medloss::concat_conv2d_triton", mutates_args=())
def concat_conv2d_triton(inputs: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None, padding: int,
                         relu: bool) -> torch.Tensor:
    """Check, allocate, launch: (B, O, H', W') in the inputs' dtype and the reference's output_memory_format (the
    first input that is densely NCHW or channels_last but not both decides)."""
    op = "torch_medloss::concat_conv2d_triton"
    ks, out_h, out_w = _check(op, inputs, weight, padding)
    first = inputs[0]
    batch, out_channels = first.shape[0], weight.shape[0]
    layout = output_memory_format(inputs)  # one rule for every backend (not inputs[0]: a 1-channel one is ambiguous)
    out = torch.empty((batch, out_channels, out_h, out_w), dtype=first.dtype, device=first.device,
                      memory_format=layout)
    num_pixels = batch * out_h * out_w
    if out.numel() == 0:
        return out
    w, w_strides = _weight_view(weight)
    bias_arg = bias.contiguous() if bias is not None else w
    pointers, channels, strides = _slots(inputs)
    upcast, precision = _dot_options(first.dtype)
    grid = (triton.cdiv(num_pixels, _FWD_BLOCK_M) * triton.cdiv(out_channels, _FWD_BLOCK_N),)
    with on_device(out):
        wrap_triton(_concat_conv2d_fwd_kernel)[grid](
            out, *pointers, w, bias_arg,
            *channels, num_pixels, out_channels, first.shape[2], first.shape[3], out_h, out_w, padding,
            *strides, *w_strides, *out.stride(),
            NUM_INPUTS=len(inputs), KS=ks, HAS_BIAS=bias is not None, RELU=relu, UPCAST=upcast,
            INPUT_PRECISION=precision, BLOCK_M=_FWD_BLOCK_M, BLOCK_N=_FWD_BLOCK_N, BLOCK_K=_FWD_BLOCK_K,
            num_warps=_NUM_WARPS, num_stages=_NUM_STAGES,
        )  # fmt: skip
    return out


def _check_grad(op: str, grad_out: torch.Tensor, out: torch.Tensor | None, inputs: list[torch.Tensor],
                weight: torch.Tensor, padding: int, relu: bool) -> tuple[int, int, int]:
    ks, out_h, out_w = _check(op, inputs, weight, padding)
    expected = (inputs[0].shape[0], weight.shape[0], out_h, out_w)
    if tuple(grad_out.shape) != expected or grad_out.device != weight.device:
        raise ValueError(f"{op}: grad_out must have shape {expected} on {weight.device}, got "
                         f"{tuple(grad_out.shape)} on {grad_out.device}.")
    if relu and (out is None or tuple(out.shape) != expected):
        raise ValueError(f"{op}: with relu, out (the forward's output, shape {expected}) is needed, got "
                         f"{None if out is None else tuple(out.shape)}.")
    return ks, out_h, out_w


@triton_op("torch_medloss::concat_conv2d_bwd_input_triton", mutates_args=())
def concat_conv2d_bwd_input_triton(grad_out: torch.Tensor, out: torch.Tensor | None, inputs: list[torch.Tensor],
                                   weight: torch.Tensor, padding: int, relu: bool) -> list[torch.Tensor]:
    """Gradients of the inputs, one tensor each in that input's dtype and (dense) layout. ``inputs`` gives only
    shapes and layouts; ``out`` (the forward's output) is read for the ReLU mask when ``relu``."""
    op = "torch_medloss::concat_conv2d_bwd_input_triton"
    ks, out_h, out_w = _check_grad(op, grad_out, out, inputs, weight, padding, relu)
    grads = [torch.empty_like(x) for x in inputs]
    first = inputs[0]
    num_pixels = first.shape[0] * first.shape[2] * first.shape[3]
    if num_pixels == 0 or weight.shape[0] == 0:
        for g in grads:
            g.zero_()
        return grads
    grad_out = grad_out.to(first.dtype)
    y = out if relu else grad_out
    w, w_strides = _weight_view(weight)
    pointers, channels, strides = _slots(grads)
    tiles = triton.cdiv(max(channels), _BWD_IN_BLOCK_N)
    upcast, precision = _dot_options(first.dtype)
    grid = (triton.cdiv(num_pixels, _BWD_IN_BLOCK_M) * len(inputs) * tiles,)
    with on_device(grad_out):
        wrap_triton(_concat_conv2d_bwd_input_kernel)[grid](
            *pointers, grad_out, y, w,
            *channels, tiles, num_pixels, weight.shape[0], first.shape[2], first.shape[3], out_h, out_w, padding,
            *strides, *grad_out.stride(), *y.stride(), *w_strides,
            NUM_INPUTS=len(inputs), KS=ks, RELU=relu, UPCAST=upcast, INPUT_PRECISION=precision,
            BLOCK_M=_BWD_IN_BLOCK_M, BLOCK_N=_BWD_IN_BLOCK_N, BLOCK_K=_BWD_IN_BLOCK_K,
            num_warps=_NUM_WARPS, num_stages=_NUM_STAGES,
        )  # fmt: skip
    return grads


def _splits(tiles: int, num_pixels: int) -> tuple[int, int]:
    """(splits, pixels per split) of the weight gradient's reduction: enough programs to fill the GPU, each slice a
    whole number of BLOCK_P steps; ceiling divisions, so every pixel is in a slice and no slice is empty."""
    steps = triton.cdiv(num_pixels, _BWD_W_BLOCK_P)
    wanted = max(1, min(steps, triton.cdiv(_BWD_W_TARGET_PROGRAMS, tiles)))
    steps_per_split = triton.cdiv(steps, wanted)
    return triton.cdiv(steps, steps_per_split), steps_per_split * _BWD_W_BLOCK_P


@triton_op("torch_medloss::concat_conv2d_bwd_weight_triton", mutates_args=())
def concat_conv2d_bwd_weight_triton(grad_out: torch.Tensor, out: torch.Tensor | None, inputs: list[torch.Tensor],
                                    weight: torch.Tensor, padding: int,
                                    relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_weight (O, sum C_i, K, K) in the weight's dtype, grad_bias (O,) in the weight's dtype). ``weight`` gives
    only the shape; ``out`` is read for the ReLU mask when ``relu``. Deterministic: fixed-order partial sums."""
    op = "torch_medloss::concat_conv2d_bwd_weight_triton"
    ks, out_h, out_w = _check_grad(op, grad_out, out, inputs, weight, padding, relu)
    first = inputs[0]
    out_channels, total_channels = weight.shape[0], weight.shape[1]
    num_pixels = first.shape[0] * out_h * out_w
    if num_pixels == 0 or out_channels == 0 or total_channels == 0:
        return torch.zeros_like(weight), weight.new_zeros((out_channels,))
    grad_out = grad_out.to(first.dtype)
    y = out if relu else grad_out
    pointers, channels, strides = _slots(inputs)
    tiles = triton.cdiv(max(channels), _BWD_W_BLOCK_C)
    programs_per_split = ks * ks * len(inputs) * tiles * triton.cdiv(out_channels, _BWD_W_BLOCK_O)
    splits, pixels_per_split = _splits(programs_per_split, num_pixels)
    gw_partial = torch.empty((splits, ks * ks, total_channels, out_channels), dtype=torch.float32,
                             device=first.device)
    gb_partial = torch.empty((splits, out_channels), dtype=torch.float32, device=first.device)
    upcast, precision = _dot_options(first.dtype)
    with on_device(grad_out):
        wrap_triton(_concat_conv2d_bwd_weight_kernel)[(splits * programs_per_split,)](
            gw_partial, gb_partial, *pointers, grad_out, y,
            *channels, tiles, pixels_per_split, num_pixels, out_channels, first.shape[2], first.shape[3], out_h, out_w,
            padding,
            *strides, *grad_out.stride(), *y.stride(), gw_partial.stride(0), gw_partial.stride(1), gw_partial.stride(2),
            gb_partial.stride(0),
            NUM_INPUTS=len(inputs), KS=ks, RELU=relu, UPCAST=upcast, INPUT_PRECISION=precision,
            BLOCK_C=_BWD_W_BLOCK_C, BLOCK_O=_BWD_W_BLOCK_O, BLOCK_P=_BWD_W_BLOCK_P,
            num_warps=_NUM_WARPS, num_stages=_NUM_STAGES,
        )  # fmt: skip
    # Fixed-order reduction over the splits: deterministic, no atomics.
    grad_weight = gw_partial.sum(dim=0).view(ks, ks, total_channels, out_channels).permute(3, 2, 0, 1)
    return grad_weight.to(weight.dtype).contiguous(), gb_partial.sum(dim=0).to(weight.dtype)
