"""Triton kernels of ``torch_medloss::frequency_split_triton`` and its backward: a fused Gaussian low/high split.

The op has the contract of torch_medloss.reference.frequency_split: x (B, C, H, W) of any strides (fp32, bf16 or
fp16) and sigma > 0 in; low = the separable Gaussian blur of x (radius r = ceil(3 sigma), taps exp(-k^2 / (2
sigma^2)) / sum, k = -r..r, reflect padding as ``F.pad(mode="reflect")``) and high = x - low, both in x's dtype and
layout. low is accumulated in fp32 and rounded once to x's dtype; high is then computed from that rounded low, in
fp32 and rounded to x's dtype, exactly as torch evaluates ``x - low``, so ``high == x - low`` holds bit for bit.

Method. Write the blur of one (H, W) plane as low = A_H x A_W^T, where A_n is the n x n matrix of the 1-D
reflect-padded Gaussian: A[o, c] = sum_k g_k [reflect(o + k) == c]. With H, W > r one reflection suffices, and
  A[o, c] = G(c - o) + [c > 0] G(-c - o) + [c < n - 1] G(2 (n - 1) - c - o),   G(d) = g_d for |d| <= r, else 0,
(the three terms: the direct tap, the tap folded back at index 0, the tap folded back at index n - 1; see
_reflect_matrix). Program (j, i, g) owns one T_H x T_W window of the plane, rows [h0 - r, h0 - r + T_H) and columns
[w0 - r, w0 - r + T_W), and produces the outputs in the window's interior (T_H - 2r rows, T_W - 2r columns), which
read only inputs inside the window: every output o depends on inputs in [o - r, o + r], also next to the border,
since reflect(o + k) lies there too. Per plane the program
  1. loads the window once, zero outside the image (the window straddles the border at the edges);
  2. computes low = (Lv @ X) @ Rh with two ``tl.dot``: Lv (T_H x T_H) and Rh (T_W x T_W) are the window's blocks of
     A_H and A_W^T, built in registers from the formula above (exp2 of the squared offset, times 1 / sum of the taps;
     the folded terms only in programs whose window touches the border). Entries outside the image are zero, so the
     zeros loaded there never count. fp32 operands with input_precision "ieee" (Triton's default, tf32, keeps 10
     mantissa bits: errors of 1e-3 here), fp32 accumulation;
  3. rounds low to the output dtype, forms high = x - low from the x still in registers, and stores both where the
     window's interior lies inside the image.
Windows overlap by 2r; the tile stride is T - 2r. The program walks planes_per_program (b, c) planes with the same
window, so the two tap matrices are built once per program.

Backward. L = <g_low, low> + <g_high, x - low> gives grad_x = g_high + A_H^T (g_low - g_high) A_W. Near the border
A^T is not the blur again: the taps that the reflection folded onto an input pixel c come back to c from the output
pixels whose padded neighbourhood mirrored onto it. The backward kernel is the forward kernel with each tap matrix
transposed (_reflect_matrix with output and input indices swapped), acting on d = g_low - g_high loaded once per
window, plus g_high; it reads the two upstream gradients once and writes grad_x once. The backward of the backward
is linear and equals the forward split of its upstream gradient (the autograd formulas of both ops:
torch_medloss.ops.frequency_split).

Trade-off. Each pass reads its inputs once from memory (the 2r-wide overlaps of neighbouring windows come again,
mostly from L2) and writes its outputs once: 12 bytes per pixel in fp32 (x, low, high), 6 in bf16. The price is
arithmetic: dense dots over banded matrices cost 2 (T_H + T_W) T_H T_W / ((T_H - 2r)(T_W - 2r)) flops per output
pixel, ~190 at T = 32 and r = 3 (sigma = 1), 512 at r = 8, ~650 at T = 64 and r = 12 (sigma = 4), where a
shifted-load FMA blur needs 4 (2r + 1); a smaller window wastes more halo but spends less on the zeros of the band,
and 32 is the better of the two for r <= 8. fp32 dots with "ieee" run on the FMA units (no tensor cores): by
estimate (not timed: no GPU where this was written) B16 C3 512^2 at sigma = 1 is ~2.4 GFLOP, ~36 us at an H100's
67 TFLOP/s, against the 64 us (fp32) and 32 us (bf16) that 70% of copy bandwidth (~3 TB/s) allows: within reach in
fp32 at small sigma, out of reach in bf16 and at sigma = 4 (~8 GFLOP). The lever is _DOT_PRECISION = "tf32x3"
(three tf32 tensor-core products of the operands split into high and low parts; ~1e-6 relative error, far below
bf16's rounding and near fp32's own re-association error): the first thing to time on an H100; the interpreter
ignores input_precision, so only a GPU can test it. ptxas (sm_90a, Triton 3.6, compiled here without a GPU) reports
no spills for a 32 x 32 window with 8 warps, fwd/bwd, fp32/bf16, "ieee" (209-248 registers) and "tf32x3" (239),
but 2-3 KB of spills for 64 x 64 windows (r = 9..16) with "ieee" at 8 or 16 warps (8 bytes with plain tf32, 1.7 KB
with tf32x3): those radii are correct but slower. Past r ~ 8 a shifted-load (2r + 1)-tap pass along H (loads from
L1, no halo rows in the dot) with one dot along W would be the better design.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from torch_medloss import _contract as K
from torch_medloss.kernels._device import on_device
from torch_medloss.reference.frequency_split import gaussian_radius

# No autotuning: the window is a heuristic of r and the image size alone (_launch_sizes); an autotune key would have
# to include r, since r sets the useful fraction of a window.

# Window side for r <= 8 (32: interior 26 at r = 3, 16 at r = 8); larger radii take next_power_of_2(4 r), so that at
# least half of each side is interior (64 up to r = 16, K.FREQUENCY_SPLIT_TRITON_MAX_RADIUS, the largest radius the
# kernels take: a contract constant; larger radii run the reference, a fusion blocker in
# torch_medloss.ops.frequency_split). Expected H100 starting point:
# T_H = T_W = 32, 8 warps, then _DOT_PRECISION = "tf32x3"; then 32 x 64 windows with 8 warps (no spills with
# tf32x3; for that the heuristic would need separate sides) and 64 x 64 with plain tf32 to see what the spills cost.
_TILE = 32
# Programs to aim for: enough to fill an H100 (132 SMs) several times over, few enough that each program walks
# several planes and builds its tap matrices once for all of them (B16 C3 512^2 at r = 3: 400 windows per plane,
# 16 planes a program, 1200 programs). At ~220 registers a thread an 8-warp program fills an SM's register file
# alone: one program per SM, so latency hiding rests on the loads of one program.
_TARGET_PROGRAMS = 1024
# CUDA's limit on grid axes 1 and 2.
_MAX_GRID_YZ = 65535
# input_precision of the two dots; see the module docstring ("tf32x3" is the GPU experiment).
_DOT_PRECISION = "ieee"

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------------ shared tile math


@triton.jit
def _gauss(d, radius, log2_scale, inv_norm):
    """G(d) = exp(-d^2 / (2 sigma^2)) / sum_k exp(-k^2 / (2 sigma^2)) for |d| <= r, else 0 (d an int tensor)."""
    df = d.to(tl.float32)
    return tl.where((d <= radius) & (d >= -radius), tl.exp2(df * df * log2_scale) * inv_norm, 0.0)


@triton.jit
def _reflect_matrix(out_idx, in_idx, size, radius, log2_scale, inv_norm, folded):
    """A[out, in] = sum_k g_k [reflect(out + k) == in] for broadcastable int index tensors, fp32, 0 off the image.

    ``folded`` (a scalar) adds the two reflected terms; it may be False when no index is within r of the border.
    """
    inside = (out_idx >= 0) & (out_idx < size) & (in_idx >= 0) & (in_idx < size)
    a = _gauss(in_idx - out_idx, radius, log2_scale, inv_norm)
    if folded:
        a += tl.where(in_idx > 0, _gauss(-in_idx - out_idx, radius, log2_scale, inv_norm), 0.0)
        a += tl.where(in_idx < size - 1, _gauss(2 * (size - 1) - in_idx - out_idx, radius, log2_scale, inv_norm), 0.0)
    return tl.where(inside, a, 0.0)


@triton.jit
def _round(value, DTYPE: tl.constexpr):
    """fp32 -> DTYPE rounded to nearest, ties to even, as torch rounds (NaN stays NaN).

    bfloat16 by hand, on the bits: the Triton 3.6 interpreter truncates fp32 -> bf16 casts (and its "rtne" mode
    rounds ties away and can carry into the sign), which would break ``high == x - low`` there. The same code runs on
    the GPU, where it costs four integer operations per element against a single cvt.rn.bf16.f32.
    """
    if DTYPE == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(value != value, value.to(tl.bfloat16), rounded)
    else:
        return value.to(DTYPE)


@triton.jit
def _window(height, width, radius, tile_stride_h, tile_stride_w, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """This program's window: int64 row and column indices in the image, the interior masks and the border flags."""
    window_h = tl.program_id(1).to(tl.int64) * tile_stride_h - radius
    window_w = tl.program_id(0).to(tl.int64) * tile_stride_w - radius
    i = tl.arange(0, TILE_H)
    j = tl.arange(0, TILE_W)
    rows = window_h + i
    cols = window_w + j
    row_out = (i >= radius) & (i < TILE_H - radius) & (rows < height)
    col_out = (j >= radius) & (j < TILE_W - radius) & (cols < width)
    # A window within r of an edge holds pixels whose taps fold back: only there are the folded terms needed.
    folded_h = (window_h < radius) | (window_h + TILE_H > height - 1 - radius)
    folded_w = (window_w < radius) | (window_w + TILE_W > width - 1 - radius)
    return rows, cols, row_out, col_out, folded_h, folded_w


# ------------------------------------------------------------------------------------------------------- forward


@triton.jit
def _frequency_split_fwd_kernel(
    # Output pointers
    low_ptr,
    high_ptr,
    # Input pointers
    x_ptr,
    # Sizes and the Gaussian
    num_planes,
    channels,
    height,
    width,
    planes_per_program,
    radius,
    tile_stride_h,
    tile_stride_w,
    log2_scale,
    inv_norm,
    # Strides: the outputs', then the input's (the launcher's order: outputs, then inputs)
    stride_low_b,
    stride_low_c,
    stride_low_h,
    stride_low_w,
    stride_high_b,
    stride_high_c,
    stride_high_h,
    stride_high_w,
    stride_x_b,
    stride_x_c,
    stride_x_h,
    stride_x_w,
    # Blocks and options
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """low, high of one window of planes [g * planes_per_program, (g + 1) * planes_per_program).

    x_ptr, low_ptr, high_ptr: (B, C, H, W), any strides; low and high of one dtype (fp32, bf16 or fp16), x of any of
    those. log2_scale = -log2(e) / (2 sigma^2), inv_norm = 1 / sum_k exp(-k^2 / (2 sigma^2)).
    Grid: (windows along W, windows along H, plane groups); tile strides T - 2r.
    """
    rows, cols, row_out, col_out, folded_h, folded_w = _window(
        height, width, radius, tile_stride_h, tile_stride_w, TILE_H, TILE_W
    )
    # ------------------------------------------------------------------ 1. the tap matrices, once per program
    # Lv[i, p] = A_H[rows[i], rows[p]] (output row, input row); Rh[q, j] = A_W[cols[j], cols[q]] = A_W^T[q, j].
    lv = _reflect_matrix(rows[:, None], rows[None, :], height, radius, log2_scale, inv_norm, folded_h)
    rh = _reflect_matrix(cols[None, :], cols[:, None], width, radius, log2_scale, inv_norm, folded_w)
    in_image = (rows[:, None] >= 0) & (rows[:, None] < height) & (cols[None, :] >= 0) & (cols[None, :] < width)
    out_mask = row_out[:, None] & col_out[None, :]

    # ------------------------------------------------------------------ 2. walk the planes
    # A while loop, not `for t in range(planes_per_program)`: with numpy >= 2.4 the Triton 3.6 interpreter cannot
    # use a runtime argument as a range bound (triton-lang/triton#9171).
    plane = tl.program_id(2).to(tl.int64) * planes_per_program
    last = tl.minimum(plane + planes_per_program, num_planes)
    while plane < last:
        image = plane // channels
        channel = plane % channels
        x_tile = x_ptr + image * stride_x_b + channel * stride_x_c
        x = tl.load(x_tile + rows[:, None] * stride_x_h + cols[None, :] * stride_x_w, mask=in_image, other=0.0)
        x32 = x.to(tl.float32)
        # low = Lv @ X @ Rh: the blur along H, then along W, both in fp32.
        vertical = tl.dot(lv, x32, input_precision=DOT_PRECISION)
        low = tl.dot(vertical, rh, input_precision=DOT_PRECISION)
        # Round low first, then high = x - low from the rounded value, computed as torch does (fp32, one rounding).
        low = _round(low, low_ptr.dtype.element_ty)
        high = _round(x32 - low.to(tl.float32), high_ptr.dtype.element_ty)
        low_tile = low_ptr + image * stride_low_b + channel * stride_low_c
        tl.store(low_tile + rows[:, None] * stride_low_h + cols[None, :] * stride_low_w, low, mask=out_mask)
        high_tile = high_ptr + image * stride_high_b + channel * stride_high_c
        tl.store(high_tile + rows[:, None] * stride_high_h + cols[None, :] * stride_high_w, high, mask=out_mask)
        plane += 1


# ------------------------------------------------------------------------------------------------------ backward


@triton.jit
def _frequency_split_bwd_kernel(
    # Output pointers
    grad_x_ptr,
    # Input pointers
    grad_low_ptr,
    grad_high_ptr,
    # Sizes and the Gaussian
    num_planes,
    channels,
    height,
    width,
    planes_per_program,
    radius,
    tile_stride_h,
    tile_stride_w,
    log2_scale,
    inv_norm,
    # Strides: the output's, then the inputs' (the launcher's order)
    stride_grad_x_b,
    stride_grad_x_c,
    stride_grad_x_h,
    stride_grad_x_w,
    stride_grad_low_b,
    stride_grad_low_c,
    stride_grad_low_h,
    stride_grad_low_w,
    stride_grad_high_b,
    stride_grad_high_c,
    stride_grad_high_h,
    stride_grad_high_w,
    # Blocks and options
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """grad_x = g_high + A_H^T (g_low - g_high) A_W on one window of a group of planes.

    grad_x_ptr: (B, C, H, W) fp32/bf16/fp16, any strides. grad_low_ptr, grad_high_ptr: (B, C, H, W) of any float
    dtype but float64 and any strides. The other arguments and the grid as in the forward.
    """
    rows, cols, row_out, col_out, folded_h, folded_w = _window(
        height, width, radius, tile_stride_h, tile_stride_w, TILE_H, TILE_W
    )
    # ------------------------------------------------------------------ 1. the transposed tap matrices
    # Lt[i, p] = A_H[rows[p], rows[i]] = A_H^T[i, p]; Rt[q, j] = A_W[cols[q], cols[j]]: the forward's arguments
    # swapped, which transposes each matrix, folded terms included.
    lt = _reflect_matrix(rows[None, :], rows[:, None], height, radius, log2_scale, inv_norm, folded_h)
    rt = _reflect_matrix(cols[:, None], cols[None, :], width, radius, log2_scale, inv_norm, folded_w)
    in_image = (rows[:, None] >= 0) & (rows[:, None] < height) & (cols[None, :] >= 0) & (cols[None, :] < width)
    out_mask = row_out[:, None] & col_out[None, :]

    # ------------------------------------------------------------------ 2. walk the planes (while: see the forward)
    plane = tl.program_id(2).to(tl.int64) * planes_per_program
    last = tl.minimum(plane + planes_per_program, num_planes)
    while plane < last:
        image = plane // channels
        channel = plane % channels
        offsets_low = image * stride_grad_low_b + channel * stride_grad_low_c
        offsets_high = image * stride_grad_high_b + channel * stride_grad_high_c
        grad_low = tl.load(
            grad_low_ptr + offsets_low + rows[:, None] * stride_grad_low_h + cols[None, :] * stride_grad_low_w,
            mask=in_image,
            other=0.0,
        ).to(tl.float32)
        grad_high = tl.load(
            grad_high_ptr + offsets_high + rows[:, None] * stride_grad_high_h + cols[None, :] * stride_grad_high_w,
            mask=in_image,
            other=0.0,
        ).to(tl.float32)
        # d(x - low)/dx = 1 and d(low, high)/d(low) = (1, -1): the blur's adjoint acts on g_low - g_high.
        vertical = tl.dot(lt, grad_low - grad_high, input_precision=DOT_PRECISION)
        grad_x = grad_high + tl.dot(vertical, rt, input_precision=DOT_PRECISION)
        out_tile = grad_x_ptr + image * stride_grad_x_b + channel * stride_grad_x_c
        tl.store(
            out_tile + rows[:, None] * stride_grad_x_h + cols[None, :] * stride_grad_x_w,
            _round(grad_x, grad_x_ptr.dtype.element_ty),
            mask=out_mask,
        )
        plane += 1


# ------------------------------------------------------------------------------------------------------ launchers


def gaussian_constants(sigma: float) -> tuple[int, float, float]:
    """(r, log2_scale, inv_norm) of the kernels' taps g_k = exp2(k^2 log2_scale) * inv_norm, computed in float64.

    The Gaussian is evaluated at max(sigma, K.FREQUENCY_SPLIT_IDENTITY_SIGMA), as the reference's taps are: the same
    taps [0, 1, 0] (r = 1) for every sigma <= that, where a smaller sigma would give log2_scale = -inf in fp32 (below
    ~5e-20) or a division by zero (below ~1e-162), and g_0 = exp2(0 * -inf) = NaN.
    """
    radius = gaussian_radius(sigma)
    sigma = max(sigma, K.FREQUENCY_SPLIT_IDENTITY_SIGMA)
    norm = math.fsum(math.exp(-(k * k) / (2.0 * sigma * sigma)) for k in range(-radius, radius + 1))
    return radius, -math.log2(math.e) / (2.0 * sigma * sigma), 1.0 / norm


def _side(size: int, radius: int) -> int:
    """Window side along one axis: _TILE (next_power_of_2(4 r) past r = _TILE / 4), no larger than the image with
    its halo needs; at least 16 (tl.dot's smallest operand side) and always > 2 r (a non-empty interior)."""
    base = max(_TILE, triton.next_power_of_2(4 * radius))
    return max(16, min(base, triton.next_power_of_2(size + 2 * radius)))


def _launch_sizes(shape: tuple[int, ...], radius: int) -> tuple[int, int, int, int, int, int, tuple[int, int, int]]:
    """(T_H, T_W, num_warps, planes_per_program, tile strides..., grid) for x of ``shape`` and radius r."""
    batch, channels, height, width = shape
    tile_h, tile_w = _side(height, radius), _side(width, radius)
    stride_h, stride_w = tile_h - 2 * radius, tile_w - 2 * radius
    windows_h, windows_w = triton.cdiv(height, stride_h), triton.cdiv(width, stride_w)
    if windows_h > _MAX_GRID_YZ:
        raise ValueError(
            f"frequency_split_triton: H = {height} needs {windows_h} windows of {stride_h} rows, more than CUDA's "
            f"{_MAX_GRID_YZ} on grid axis 1; transpose the image (W has no such limit)."
        )
    planes = batch * channels
    groups = min(planes, max(1, triton.cdiv(_TARGET_PROGRAMS, windows_h * windows_w)))
    planes_per_program = max(triton.cdiv(planes, groups), triton.cdiv(planes, _MAX_GRID_YZ))
    groups = triton.cdiv(planes, planes_per_program)
    # 8 warps for a 32 x 32 window (4 values of a tile per thread: the FMA dots need the room, see _TILE), 16 for
    # larger windows, 4 for the small windows of small images.
    num_warps = max(4, min(16, tile_h * tile_w // 128))
    return tile_h, tile_w, num_warps, planes_per_program, stride_h, stride_w, (windows_w, windows_h, groups)


def _check(op: str, tensors: dict[str, torch.Tensor], sigma: float) -> int:
    """The launchers' checks (none reads tensor data); returns r."""
    first_name, first = next(iter(tensors.items()))
    for name, tensor in tensors.items():
        if tensor.dim() != 4:
            raise ValueError(f"{op}: {name} must have shape (B, C, H, W), got {tuple(tensor.shape)}.")
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"{op}: {name} must be float32, bfloat16 or float16, got {tensor.dtype}.")
        if tensor.shape != first.shape:
            raise ValueError(
                f"{op}: {name} has shape {tuple(tensor.shape)}, {first_name} has {tuple(first.shape)}; they must match."
            )
        if tensor.device != first.device:
            raise ValueError(f"{op}: {name} is on {tensor.device}, {first_name} on {first.device}.")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"{op}: sigma must be a finite number > 0, got {sigma}.")
    radius = gaussian_radius(sigma)
    if radius > K.FREQUENCY_SPLIT_TRITON_MAX_RADIUS:
        raise ValueError(f"{op}: r = ceil(3 sigma) = {radius} exceeds the kernels' limit "
                         f"{K.FREQUENCY_SPLIT_TRITON_MAX_RADIUS}, sigma={sigma}.")
    height, width = first.shape[-2:]
    if height <= radius or width <= radius:
        raise ValueError(f"{op}: reflect padding by r = {radius} needs H and W > {radius}, got H={height}, W={width}.")
    return radius


def _launch(kernel, outputs: list[torch.Tensor], inputs: list[torch.Tensor], sigma: float, radius: int) -> None:
    shape = tuple(inputs[0].shape)
    tile_h, tile_w, num_warps, planes_per_program, stride_h, stride_w, grid = _launch_sizes(shape, radius)
    _, log2_scale, inv_norm = gaussian_constants(sigma)
    strides = [s for tensor in outputs + inputs for s in tensor.stride()]  # the kernels' order: outputs, inputs
    with on_device(outputs[0]):
        wrap_triton(kernel)[grid](
            *outputs,
            *inputs,
            shape[0] * shape[1],
            shape[1],
            shape[2],
            shape[3],
            planes_per_program,
            radius,
            stride_h,
            stride_w,
            log2_scale,
            inv_norm,
            *strides,
            TILE_H=tile_h,
            TILE_W=tile_w,
            DOT_PRECISION=_DOT_PRECISION,
            num_warps=num_warps,
        )


@triton_op("torch_medloss::frequency_split_triton", mutates_args=())
def frequency_split_triton(x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Check, allocate, launch: (low, high) in x's dtype, as reference.frequency_split.frequency_split."""
    radius = _check("torch_medloss::frequency_split_triton", {"x": x}, sigma)
    # empty_like keeps a dense layout's strides (channels_last stays channels_last); the kernel takes any strides,
    # so nothing is copied.
    low = torch.empty_like(x)
    high = torch.empty_like(x)
    if x.numel() == 0:
        return low, high
    _launch(_frequency_split_fwd_kernel, [low, high], [x], sigma, radius)
    return low, high


@triton_op("torch_medloss::frequency_split_bwd_triton", mutates_args=())
def frequency_split_bwd_triton(
    grad_low: torch.Tensor, grad_high: torch.Tensor, sigma: float, dtype: torch.dtype
) -> torch.Tensor:
    """grad_x = grad_high + A^T (grad_low - grad_high), in ``dtype`` (x's) and grad_high's layout."""
    op = "torch_medloss::frequency_split_bwd_triton"
    radius = _check(op, {"grad_low": grad_low, "grad_high": grad_high}, sigma)
    if dtype not in _DTYPES:
        raise ValueError(f"{op}: dtype must be float32, bfloat16 or float16, got {dtype}.")
    grad_x = torch.empty_like(grad_high, dtype=dtype)
    if grad_x.numel() == 0:
        return grad_x
    _launch(_frequency_split_bwd_kernel, [grad_x], [grad_low, grad_high], sigma, radius)
    return grad_x
