"""Triton kernels of the fused DBCE ops: ``torch_medloss::dbce_masks_triton``, ``dbce_ce_fwd_triton``, ``_bwd_triton``.

The ops have the contract of torch_medloss.reference.dbce_ops (``dbce_masks``, ``dbce_ce_fwd``, ``dbce_ce_bwd``),
with the same arguments in the same order.

Masks. Labels (B, D, H, W) of any integer dtype and strides, read in place at their own dtype. The pixels of an
image are numbered i = (z * H + y) * W + x, and every pass is one launch over a (B, programs) grid in which program
(b, k) walks the k-th slice of image b BLOCK_N pixels at a time. A pass works along one axis a (stride t_a in that
numbering, size n_a, window r_a = min(floor(R / s_a * (1 + 1e-9)), n_a - 1), the extents of structuring_element):
  - "cube" (the box is a product of intervals, so the dilation is separable): the first pass ORs 1 << label of the
    valid labels over |k| <= r_W into a (B, N) bitmask in the mask dtype; each later pass ORs that bitmask over its
    own window.
  - "ball": a per-class truncated squared-distance transform in fp32, one min-plus pass per axis. First pass:
    d_c(i) = min{(k s_W)^2 : |k| <= r_W, i + k e_W a valid class-c pixel} (+inf if none), then for the next axes
    d'_c(i) = min_k d_c(i + k e_a) + (k s_a)^2. After the last pass d_c(i) = min over the element's bounding box of
    |o s|^2 among the offsets that reach class c, so bit c is set iff d_c(i) <= R^2 (1 + 1e-9): the exact
    ellipsoid, at a cost linear in R per axis (R = 10 costs about 3x R = 3, not the 40x of a brute-force ball).
    The intermediate distances are (B, C, N) fp32 buffers (two, ping-ponged).
Axes whose window is 0 (size 1, or s_a > R) are identities and are skipped, so a 2-D map (B, 1, H, W) costs two
passes and R = 0 one. The last pass reads each pixel's own label, clears the bits of ignored and invalid pixels
(the dilation crossed them; they get no bits), stores the mask, and adds counts |M_c|, areas |D_c| and the invalid
labels into one int32 row per program of a (B, programs, 2C + 1) partial buffer, reduced by ``torch.sum`` in a
fixed order (no atomics: bitwise reproducible).

fp32 against the float64 reference: the squared lengths (k s)^2 are summed in fp32, and R^2 (1 + 1e-9) is rounded
up to the next fp32. With integer spacing and radii up to ~1000 every such sum is exact and the masks are bitwise
equal; with non-integer spacing an offset can land on the other side of the boundary only if its squared length is
within ~1e-7 relative of R^2 (the reference keeps those within 1e-9; here they are within fp32 rounding).

Cross entropy. Logits (B, C, S) of any strides (fp32, bf16 or fp16) are read in place, one (BLOCK_C, BLOCK_S) tile
with the whole class axis in registers, as kernels/dice_sums.py. Per pixel: w = max_c bit_c(masks[i]) * cw[b, c]
(the reference's amax, 0 for an empty mask), 0 where the label is out of [0, C) or ignore_index; CE = logsumexp -
x[label]. The forward writes one fp32 row [sum w CE, sum w] per program (and w CE into the map with WRITE_MAP); the
backward recomputes the tile and writes w (g_sum + g_map[i]) (softmax - onehot) in the logits' dtype and layout.

Trade-off. The cross entropy is one read of the logits per pass plus one write of the gradient, the bandwidth floor.
The masks cost one read of the labels per pass that touches them (the first and the last) and, for the ball, a
write and a read of a C x fp32 distance map per intermediate pass: at C = 4 and 128^3 that is ~100 MB per pass pair
(~35 us at 3 TB/s), growing linearly in C, so past C ~ 16 the distance maps dominate; a uint8 first-pass buffer (the
integer step k instead of (k s)^2) would halve the first pair. The window loads are reread from L1/L2, 2r + 1 per
pixel and pass. Not yet timed (no GPU where this was written).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from torch_medloss.kernels._device import on_device

# No autotuning: the sizes are a heuristic of C alone (BLOCK_C = next power of two of C). An autotune key would have to
# include C and every flag, and the first call of each combination would pay the search.

# Elements of a (BLOCK_C, BLOCK_N) tile: 16 values per thread with 4 warps, as kernels/dice_sums.py.
_TILE_ELEMENTS = 2048
# BLOCK_N / BLOCK_S bounds: at least 32 pixels (C = 64), at most 1024.
_MIN_BLOCK = 32
_MAX_BLOCK = 1024
# Programs per image at most (the partial buffers have a row per program); past the cap a program walks more tiles.
_MAX_PROGRAMS_PER_IMAGE = 1024
# Private switch for the tests: force the int64 offset path on tensors small enough for int32.
_FORCE_INT64 = False

_MAX_MASK_CLASSES = 64
_MASK_DTYPES = ((8, torch.uint8), (16, torch.int16), (32, torch.int32), (64, torch.int64))
_LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_ELEMENT_BALL, _ELEMENT_CUBE = 0, 1
_BOUNDARY_TOLERANCE = 1e-9  # as torch_medloss.reference.dbce.structuring_element


# ----------------------------------------------------------------------------------------------------------- masks


@triton.jit
def _dbce_masks_pass_kernel(
    # Output pointers
    out_ptr,
    partial_ptr,
    # Input pointers
    labels_ptr,
    src_ptr,
    # Sizes and scalar options
    num_classes,
    num_pixels,
    pixels_per_program,
    ignore_index,
    height,
    width,
    axis_size,
    axis_stride,
    reach,
    step_sq,
    limit,
    # Strides
    stride_out_b,
    stride_out_c,
    stride_src_b,
    stride_src_c,
    stride_labels_b,
    stride_labels_d,
    stride_labels_h,
    stride_labels_w,
    stride_labels_axis,
    stride_partial_b,
    stride_partial_p,
    # Constexpr flags and blocks
    BALL: tl.constexpr,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One pass along one axis over pixels [k * pixels_per_program, (k + 1) * pixels_per_program) of image b.

    labels_ptr: (B, D, H, W) integers, any strides (read by the first pass, and by the last for the pixel's own
    label). src_ptr: the previous pass's buffer (not FIRST): (B, C, N) fp32 distances (BALL) or (B, N) bitmask.
    out_ptr: the next buffer of the same kind, or (LAST) the (B, N) masks in the mask dtype.
    partial_ptr (LAST): (B, programs, 2C + 1) int32, [counts | areas | invalid] of the slice.
    The pass reads pixel i + k * axis_stride for |k| <= reach within the axis (coordinate (i // axis_stride) %
    axis_size), at (k * step)^2 = k^2 step_sq. Grid: (B, programs); pixels_per_program is a multiple of BLOCK_N.
    """
    image = tl.program_id(0).to(tl.int64)
    program = tl.program_id(1).to(tl.int64)
    first_pixel = program * pixels_per_program
    classes = tl.arange(0, BLOCK_C)
    if INT64_OFFSETS:
        classes = classes.to(tl.int64)
    else:
        first_pixel = first_pixel.to(tl.int32)  # the launcher checked every in-image offset fits
    class_ok = classes < num_classes
    labels_row = labels_ptr + image * stride_labels_b
    src_row = src_ptr + image * stride_src_b
    out_row = out_ptr + image * stride_out_b
    acc_counts = tl.zeros([BLOCK_C], dtype=tl.int32)
    acc_areas = tl.zeros([BLOCK_C], dtype=tl.int32)
    acc_invalid = tl.zeros([BLOCK_N], dtype=tl.int32)
    one = tl.full([BLOCK_N], 1, dtype=tl.int64)

    # A while loop, not `for offset in range(0, pixels_per_program, BLOCK_N)`: with numpy >= 2.4 the Triton 3.6
    # interpreter cannot use a runtime argument as a range bound (triton-lang/triton#9171), as in label_histogram.
    offset = 0
    while offset < pixels_per_program:
        pixels = first_pixel + offset + tl.arange(0, BLOCK_N)
        pixel_ok = pixels < num_pixels
        coord = (pixels // axis_stride) % axis_size
        column = pixels % width
        row = (pixels // width) % height
        plane = pixels // (width * height)
        label_offset = plane * stride_labels_d + row * stride_labels_h + column * stride_labels_w

        # ------------------------------------------------------------------ 1. the window along the axis
        if BALL:
            acc = tl.full([BLOCK_C, BLOCK_N], float("inf"), dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_N], dtype=tl.int64)
        k = -reach
        while k <= reach:
            neighbour_ok = pixel_ok & (coord + k >= 0) & (coord + k < axis_size)
            distance = (k * k).to(tl.float32) * step_sq
            if FIRST:
                # Read at the labels' own dtype, compared in int64 (2**32 + 1 must not wrap onto class 1); an
                # out-of-range label is never a shift amount or an address.
                label = tl.load(labels_row + label_offset + k * stride_labels_axis, mask=neighbour_ok, other=0)
                label = label.to(tl.int64)
                member = neighbour_ok & (label >= 0) & (label < num_classes) & (label != ignore_index)
                if BALL:
                    hit = classes[:, None] == tl.where(member, label, -1)[None, :]
                    acc = tl.minimum(acc, tl.where(hit, distance, float("inf")))
                else:
                    acc = acc | tl.where(member, one << tl.where(member, label, 0), 0)
            else:
                neighbours = pixels + k * axis_stride
                if BALL:
                    values = tl.load(
                        src_row + classes[:, None] * stride_src_c + neighbours[None, :],
                        mask=class_ok[:, None] & neighbour_ok[None, :],
                        other=float("inf"),
                    )
                    acc = tl.minimum(acc, values + distance)
                else:
                    acc = acc | tl.load(src_row + neighbours, mask=neighbour_ok, other=0).to(tl.int64)
            k += 1

        # ------------------------------------------------------------------ 2. store the buffer, or the masks
        if LAST:
            own = tl.load(labels_row + label_offset, mask=pixel_ok, other=0).to(tl.int64)
            in_range = (own >= 0) & (own < num_classes)
            ignored = own == ignore_index
            valid = pixel_ok & in_range & ~ignored
            if BALL:
                bits = (acc <= limit) & class_ok[:, None] & valid[None, :]
                # Disjoint bits: the sum is the OR.
                mask = tl.sum(bits.to(tl.int64) << classes[:, None].to(tl.int64), axis=0)
            else:
                mask = tl.where(valid, acc, 0)
                bits = (((mask[None, :] >> classes[:, None].to(tl.int64)) & 1) != 0) & class_ok[:, None]
            tl.store(out_row + pixels, mask.to(out_ptr.dtype.element_ty), mask=pixel_ok)
            acc_areas += tl.sum(bits.to(tl.int32), axis=1)
            member = classes[:, None] == tl.where(valid, own, -1)[None, :]
            acc_counts += tl.sum(member.to(tl.int32), axis=1)
            acc_invalid += (pixel_ok & ~in_range & ~ignored).to(tl.int32)
        else:
            if BALL:
                out = out_row + classes[:, None] * stride_out_c + pixels[None, :]
                tl.store(out, acc, mask=class_ok[:, None] & pixel_ok[None, :])
            else:
                tl.store(out_row + pixels, acc.to(out_ptr.dtype.element_ty), mask=pixel_ok)
        offset += BLOCK_N

    # ------------------------------------------------------------------ 3. this program's partial row (last pass)
    if LAST:
        partial_row = partial_ptr + image * stride_partial_b + program * stride_partial_p
        tl.store(partial_row + classes, acc_counts, mask=class_ok)
        tl.store(partial_row + num_classes + classes, acc_areas, mask=class_ok)
        tl.store(partial_row + 2 * num_classes, tl.sum(acc_invalid, axis=0))


# --------------------------------------------------------------------------------------------- cross entropy


@triton.jit
def _ce_tile(
    logits_row,
    labels_row,
    masks_row,
    class_weight,
    classes,
    pixels,
    num_classes,
    num_pixels,
    ignore_index,
    stride_logits_c,
    stride_logits_s,
    stride_labels_s,
    stride_masks_s,
):
    """Load one (BLOCK_C, BLOCK_S) tile: (tile_ok, q = softmax, y = one-hot of valid labels, w, ce), in fp32.

    w and ce are (BLOCK_S,); w is 0 past the end and at out-of-range or ignored labels (ce is finite there).
    """
    class_ok = classes < num_classes
    pixel_ok = pixels < num_pixels
    tile_ok = class_ok[:, None] & pixel_ok[None, :]

    # 1. softmax of the logits, max-subtracted; padded class rows are -inf in the max and the sum.
    x = tl.load(
        logits_row + classes[:, None] * stride_logits_c + pixels[None, :] * stride_logits_s, mask=tile_ok, other=0.0
    ).to(tl.float32)
    shifted = tl.where(class_ok[:, None], x, float("-inf"))
    x_max = tl.max(shifted, axis=0)
    e = tl.exp(shifted - x_max[None, :])
    e_sum = tl.sum(e, axis=0)
    q = e * (1.0 / e_sum)[None, :]

    # 2. labels: read at their own dtype, compared in int64.
    label = tl.load(labels_row + pixels * stride_labels_s, mask=pixel_ok, other=0).to(tl.int64)
    valid = pixel_ok & (label >= 0) & (label < num_classes) & (label != ignore_index)
    y = (classes[:, None] == tl.where(valid, label, -1).to(classes.dtype)[None, :]).to(tl.float32)
    ce = tl.log(e_sum) - tl.sum(y * (x - x_max[None, :]), axis=0)  # logsumexp - x[label]

    # 3. w = max over the classes of bit_c * cw_c (the reference's amax: unset bits count as 0).
    bitmask = tl.load(masks_row + pixels * stride_masks_s, mask=pixel_ok, other=0).to(tl.int64)
    bits = ((bitmask[None, :] >> classes[:, None].to(tl.int64)) & 1).to(tl.float32)
    w = tl.max(tl.where(class_ok[:, None], bits * class_weight[:, None], float("-inf")), axis=0)
    w = tl.where(valid, w, 0.0)
    return tile_ok, q, y, w, ce


@triton.jit
def _dbce_ce_fwd_kernel(
    # Output pointers
    partial_ptr,
    map_ptr,
    # Input pointers
    logits_ptr,
    labels_ptr,
    masks_ptr,
    class_weights_ptr,
    # Sizes and scalar options
    num_classes,
    num_pixels,
    pixels_per_program,
    ignore_index,
    # Strides
    stride_partial_b,
    stride_partial_p,
    stride_map_b,
    stride_logits_b,
    stride_logits_c,
    stride_logits_s,
    stride_labels_b,
    stride_labels_s,
    stride_masks_b,
    stride_masks_s,
    stride_class_weights_b,
    stride_class_weights_c,
    # Constexpr flags and blocks
    WRITE_MAP: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Sum pixels [k * pixels_per_program, (k + 1) * pixels_per_program) of image b into partial row (b, k).

    partial_ptr: (B, programs, 2) fp32, [sum w CE, sum w] of the slice. map_ptr (WRITE_MAP): (B, S) fp32, w CE.
    logits_ptr: (B, C, S) fp32/bf16/fp16, any strides. labels_ptr, masks_ptr: (B, S) integers, any strides.
    class_weights_ptr: (B, C) floats. Grid: (B, programs); pixels_per_program is a multiple of BLOCK_S.
    """
    image = tl.program_id(0).to(tl.int64)
    program = tl.program_id(1).to(tl.int64)
    first_pixel = program * pixels_per_program
    classes = tl.arange(0, BLOCK_C)
    if INT64_OFFSETS:
        classes = classes.to(tl.int64)
    else:
        first_pixel = first_pixel.to(tl.int32)
    class_ok = classes < num_classes
    logits_row = logits_ptr + image * stride_logits_b
    labels_row = labels_ptr + image * stride_labels_b
    masks_row = masks_ptr + image * stride_masks_b
    class_weight = tl.load(
        class_weights_ptr + image * stride_class_weights_b + classes * stride_class_weights_c, mask=class_ok, other=0.0
    ).to(tl.float32)
    acc_loss = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc_weight = tl.zeros([BLOCK_S], dtype=tl.float32)

    offset = 0
    while offset < pixels_per_program:
        pixels = first_pixel + offset + tl.arange(0, BLOCK_S)
        tile_ok, q, y, w, ce = _ce_tile(
            logits_row, labels_row, masks_row, class_weight, classes, pixels, num_classes, num_pixels, ignore_index,
            stride_logits_c, stride_logits_s, stride_labels_s, stride_masks_s,
        )  # fmt: skip
        weighted = w * ce
        acc_loss += weighted
        acc_weight += w
        if WRITE_MAP:
            tl.store(map_ptr + image * stride_map_b + pixels, weighted, mask=pixels < num_pixels)
        offset += BLOCK_S

    partial_row = partial_ptr + image * stride_partial_b + program * stride_partial_p
    tl.store(partial_row, tl.sum(acc_loss, axis=0))
    tl.store(partial_row + 1, tl.sum(acc_weight, axis=0))


@triton.jit
def _dbce_ce_bwd_kernel(
    # Output pointers
    grad_logits_ptr,
    # Input pointers
    grad_sums_ptr,
    grad_map_ptr,
    logits_ptr,
    labels_ptr,
    masks_ptr,
    class_weights_ptr,
    # Sizes and scalar options
    num_classes,
    num_pixels,
    pixels_per_program,
    ignore_index,
    # Strides
    stride_grad_logits_b,
    stride_grad_logits_c,
    stride_grad_logits_s,
    stride_grad_sums_b,
    stride_grad_map_b,
    stride_grad_map_s,
    stride_logits_b,
    stride_logits_c,
    stride_logits_s,
    stride_labels_b,
    stride_labels_s,
    stride_masks_b,
    stride_masks_s,
    stride_class_weights_b,
    stride_class_weights_c,
    # Constexpr flags and blocks
    WRITE_MAP: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Gradient of pixels [k * pixels_per_program, (k + 1) * pixels_per_program) of image b.

    grad_logits_ptr: (B, C, S) in the logits' dtype, any strides. grad_sums_ptr: (B, 2), any float dtype and
    strides (column 0 only: sum w has no gradient). grad_map_ptr (WRITE_MAP): (B, S) floats, any strides.
    The other pointers as in the forward.
    """
    image = tl.program_id(0).to(tl.int64)
    program = tl.program_id(1).to(tl.int64)
    first_pixel = program * pixels_per_program
    classes = tl.arange(0, BLOCK_C)
    if INT64_OFFSETS:
        classes = classes.to(tl.int64)
    else:
        first_pixel = first_pixel.to(tl.int32)
    class_ok = classes < num_classes
    logits_row = logits_ptr + image * stride_logits_b
    labels_row = labels_ptr + image * stride_labels_b
    masks_row = masks_ptr + image * stride_masks_b
    grad_row = grad_logits_ptr + image * stride_grad_logits_b
    class_weight = tl.load(
        class_weights_ptr + image * stride_class_weights_b + classes * stride_class_weights_c, mask=class_ok, other=0.0
    ).to(tl.float32)
    grad_sum = tl.load(grad_sums_ptr + image * stride_grad_sums_b).to(tl.float32)

    offset = 0
    while offset < pixels_per_program:
        pixels = first_pixel + offset + tl.arange(0, BLOCK_S)
        tile_ok, q, y, w, ce = _ce_tile(
            logits_row, labels_row, masks_row, class_weight, classes, pixels, num_classes, num_pixels, ignore_index,
            stride_logits_c, stride_logits_s, stride_labels_s, stride_masks_s,
        )  # fmt: skip
        upstream = tl.zeros([BLOCK_S], dtype=tl.float32) + grad_sum
        if WRITE_MAP:
            grad_map = tl.load(grad_map_ptr + image * stride_grad_map_b + pixels * stride_grad_map_s,
                               mask=pixels < num_pixels, other=0.0)
            upstream += grad_map.to(tl.float32)
        # d(w CE)/dx_j = w (softmax_j - [j == label]).
        dx = (w * upstream)[None, :] * (q - y)
        out = grad_row + classes[:, None] * stride_grad_logits_c + pixels[None, :] * stride_grad_logits_s
        tl.store(out, dx.to(grad_logits_ptr.dtype.element_ty), mask=tile_ok)
        offset += BLOCK_S


# ------------------------------------------------------------------------------------------------------ launchers


def _launch_sizes(num_classes: int, num_pixels: int) -> tuple[int, int, int, int]:
    """Heuristic launch sizes of every kernel: (BLOCK_C, BLOCK, programs per image, pixels per program).

    BLOCK_C holds the whole class axis; BLOCK = _TILE_ELEMENTS / BLOCK_C clamped to [_MIN_BLOCK, _MAX_BLOCK] (C = 4:
    512 pixels, C = 64: 32), with 4 warps. Programs per image: one per BLOCK step up to _MAX_PROGRAMS_PER_IMAGE, then
    several steps each. Ceiling divisions, so that the partial buffers have a row for every program and no program
    starts past the end of the image.
    """
    block_c = triton.next_power_of_2(num_classes)
    block = min(_MAX_BLOCK, max(_MIN_BLOCK, _TILE_ELEMENTS // block_c))
    steps = triton.cdiv(num_pixels, block)
    steps_per_program = triton.cdiv(steps, _MAX_PROGRAMS_PER_IMAGE)
    programs = triton.cdiv(steps, steps_per_program)
    return block_c, block, programs, steps_per_program * block


def _needs_int64(*extents: int) -> bool:
    """Whether an in-image element offset (each extent bounds one operand's, padded lanes included) can reach 2**31.

    The batch offset is always int64 (image * stride_b on an int64 program id).
    """
    return _FORCE_INT64 or any(extent >= 2**31 for extent in extents)


def mask_dtype(num_classes: int) -> torch.dtype:
    """The narrowest integer dtype with a bit per class (as reference.dbce_ops.mask_dtype)."""
    for bits, dtype in _MASK_DTYPES:
        if num_classes <= bits:
            return dtype
    raise ValueError(f"dbce_masks: at most {_MAX_MASK_CLASSES} classes fit a mask, got {num_classes}.")


def _fp32_at_least(value: float) -> float:
    """The smallest float32 >= value (so that the fp32 compare keeps every offset the float64 one keeps)."""
    rounded = np.float32(value)
    if float(rounded) < value:
        rounded = np.nextafter(rounded, np.float32(np.inf))
    return float(rounded)


@triton_op("torch_medloss::dbce_masks_triton", mutates_args=())
def dbce_masks_triton(
    labels: torch.Tensor, num_classes: int, ignore_index: int, element: int, radius: float, spacing: list[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check, allocate, launch: (masks (B, D, H, W), counts (B, C), areas (B, C), invalid (B,)), as dbce_ops."""
    op = "torch_medloss::dbce_masks_triton"
    if labels.dim() != 4:
        raise ValueError(f"{op}: labels must be (B, D, H, W), got shape {tuple(labels.shape)}.")
    if labels.dtype not in _INT_DTYPES:
        raise ValueError(f"{op}: labels must be uint8, int8, int16, int32 or int64, got {labels.dtype}.")
    if num_classes < 1:
        raise ValueError(f"{op}: num_classes must be >= 1, got {num_classes}.")
    dtype = mask_dtype(num_classes)
    if element not in (_ELEMENT_BALL, _ELEMENT_CUBE):
        raise ValueError(f"{op}: element must be 0 (ball) or 1 (cube), got {element}.")
    if not (math.isfinite(radius) and radius >= 0):
        raise ValueError(f"{op}: radius must be finite and >= 0, got {radius}.")
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"{op}: spacing must hold 3 finite positive values (D, H, W), got {list(spacing)}.")
    batch, depth, height, width = labels.shape
    num_pixels = depth * height * width
    masks = torch.empty(labels.shape, dtype=dtype, device=labels.device)
    if labels.numel() == 0:
        zeros = labels.new_zeros((batch, num_classes), dtype=torch.int64)
        return masks, zeros, zeros.clone(), labels.new_zeros((batch,), dtype=torch.int64)

    # The passes: W, H, D (W first: unit stride in the pixel numbering and, usually, in the labels), skipping the
    # identities. (axis size, stride in the pixel numbering, labels stride, window, spacing).
    axes = []
    for size, stride, labels_stride, step in ((width, 1, labels.stride(3), spacing[2]),
                                               (height, width, labels.stride(2), spacing[1]),
                                               (depth, height * width, labels.stride(1), spacing[0])):
        reach = min(math.floor(radius / step * (1 + _BOUNDARY_TOLERANCE)), size - 1)
        if reach > 0:
            axes.append((size, stride, labels_stride, reach, step))
    if not axes:
        axes.append((width, 1, labels.stride(3), 0, spacing[2]))
    ball = element == _ELEMENT_BALL
    limit = _fp32_at_least(radius * radius * (1 + _BOUNDARY_TOLERANCE))

    block_c, block_n, programs, pixels_per_program = _launch_sizes(num_classes, num_pixels)
    span = programs * pixels_per_program
    labels_extent = sum((n - 1) * abs(s) for n, s in zip(labels.shape[1:], labels.stride()[1:], strict=True))
    int64_offsets = _needs_int64(
        span + max(a[3] * a[1] for a in axes),
        block_c * num_pixels + span + max(a[3] * a[1] for a in axes),
        labels_extent + 1,
    )
    buffers = []
    if len(axes) > 1:
        shape = (batch, num_classes, num_pixels) if ball else (batch, num_pixels)
        buffers = [torch.empty(shape, dtype=torch.float32 if ball else dtype, device=labels.device)
                   for _ in range(min(2, len(axes) - 1))]
    partial = labels.new_empty((batch, programs, 2 * num_classes + 1), dtype=torch.int32)
    flat_masks = masks.view(batch, num_pixels)
    for index, (size, stride, labels_stride, reach, step) in enumerate(axes):
        first, last = index == 0, index == len(axes) - 1
        out = flat_masks if last else buffers[index % 2]
        src = buffers[(index - 1) % 2] if not first else out  # unused by the first pass
        with on_device(out):
            wrap_triton(_dbce_masks_pass_kernel)[(batch, programs)](
                out,
                partial,
                labels,
                src,
                num_classes,
                num_pixels,
                pixels_per_program,
                ignore_index,
                height,
                width,
                size,
                stride,
                reach,
                step * step,
                limit,
                out.stride(0),
                out.stride(1) if out.dim() == 3 else 0,
                src.stride(0),
                src.stride(1) if src.dim() == 3 else 0,
                labels.stride(0),
                labels.stride(1),
                labels.stride(2),
                labels.stride(3),
                labels_stride,
                partial.stride(0),
                partial.stride(1),
                BALL=ball,
                FIRST=first,
                LAST=last,
                INT64_OFFSETS=int64_offsets,
                BLOCK_C=block_c,
                BLOCK_N=block_n,
                num_warps=4,
            )
    # Fixed-order reduction of the per-program rows (integers: exact in any order anyway).
    totals = partial.sum(dim=1, dtype=torch.int64)
    # Clones: the outputs of a custom op must not alias one another.
    counts = totals[:, :num_classes].clone()
    areas = totals[:, num_classes : 2 * num_classes].clone()
    return masks, counts, areas, totals[:, 2 * num_classes].clone()


def _check_ce(op: str, logits, labels, masks, class_weights, tensors: dict[str, torch.Tensor]) -> None:
    """The cross-entropy launchers' checks: shapes, dtypes and devices (none reads tensor data)."""
    if logits.dim() != 3:
        raise ValueError(f"{op}: logits must be 3-D (B, C, S), got shape {tuple(logits.shape)}.")
    if logits.dtype not in _LOGITS_DTYPES:
        raise ValueError(f"{op}: logits must be float32, bfloat16 or float16, got {logits.dtype}.")
    batch, num_classes, num_pixels = logits.shape
    if not 1 <= num_classes <= _MAX_MASK_CLASSES:
        raise ValueError(f"{op}: the number of classes (logits.shape[1]) must be in [1, {_MAX_MASK_CLASSES}] (one "
                         f"mask bit each), got {num_classes}.")
    for name, tensor in (("labels", labels), ("masks", masks)):
        if tuple(tensor.shape) != (batch, num_pixels):
            raise ValueError(f"{op}: {name} must have shape (B, S) = {(batch, num_pixels)} for logits of shape "
                             f"{tuple(logits.shape)}, got {tuple(tensor.shape)}.")
        if tensor.dtype not in _INT_DTYPES:
            raise ValueError(f"{op}: {name} must be uint8, int8, int16, int32 or int64, got {tensor.dtype}.")
    if tuple(class_weights.shape) != (batch, num_classes) or not class_weights.dtype.is_floating_point:
        raise ValueError(f"{op}: class_weights must be a float tensor of shape (B, C) = {(batch, num_classes)}, got "
                         f"{class_weights.dtype} of shape {tuple(class_weights.shape)}.")
    for name, tensor in tensors.items():
        if tensor.device != logits.device:
            raise ValueError(f"{op}: {name} is on {tensor.device}, the logits on {logits.device}.")


def _ce_int64(logits, labels, masks, block_c: int, span: int, *others: torch.Tensor) -> bool:
    extents = [(block_c - 1) * abs(logits.stride(1)) + span * abs(logits.stride(2)),
               span * abs(labels.stride(1)), span * abs(masks.stride(1)), span]
    extents += [(block_c - 1) * abs(t.stride(1)) + span * abs(t.stride(-1)) for t in others]
    return _needs_int64(*extents)


@triton_op("torch_medloss::dbce_ce_fwd_triton", mutates_args=())
def dbce_ce_fwd_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor,
    class_weights: torch.Tensor,
    ignore_index: int,
    write_map: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check, allocate, launch: (sums (B, 2) fp32, map (B, S) fp32 or empty), as reference.dbce_ops.dbce_ce_fwd."""
    op = "torch_medloss::dbce_ce_fwd_triton"
    _check_ce(op, logits, labels, masks, class_weights, {"labels": labels, "masks": masks,
                                                          "class_weights": class_weights})
    batch, num_classes, num_pixels = logits.shape
    weighted = logits.new_empty((batch, num_pixels) if write_map else (0,), dtype=torch.float32)
    if logits.numel() == 0:
        return logits.new_zeros((batch, 2), dtype=torch.float32), weighted

    block_c, block_s, programs, pixels_per_program = _launch_sizes(num_classes, num_pixels)
    int64_offsets = _ce_int64(logits, labels, masks, block_c, programs * pixels_per_program)
    partial = logits.new_empty((batch, programs, 2), dtype=torch.float32)
    map_arg = weighted if write_map else partial  # never written without WRITE_MAP
    with on_device(partial):
        wrap_triton(_dbce_ce_fwd_kernel)[(batch, programs)](
            partial,
            map_arg,
            logits,
            labels,
            masks,
            class_weights,
            num_classes,
            num_pixels,
            pixels_per_program,
            ignore_index,
            partial.stride(0),
            partial.stride(1),
            weighted.stride(0) if write_map else 0,
            logits.stride(0),
            logits.stride(1),
            logits.stride(2),
            labels.stride(0),
            labels.stride(1),
            masks.stride(0),
            masks.stride(1),
            class_weights.stride(0),
            class_weights.stride(1),
            WRITE_MAP=write_map,
            INT64_OFFSETS=int64_offsets,
            BLOCK_C=block_c,
            BLOCK_S=block_s,
            num_warps=4,
        )
    # Fixed-order reduction of the per-program rows: deterministic, no atomics.
    return partial.sum(dim=1), weighted


@triton_op("torch_medloss::dbce_ce_bwd_triton", mutates_args=())
def dbce_ce_bwd_triton(
    grad_sums: torch.Tensor,
    grad_map: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor,
    class_weights: torch.Tensor,
    ignore_index: int,
    write_map: bool,
) -> torch.Tensor:
    """Check, allocate, launch: grad_logits (B, C, S) in the logits' dtype and layout, as dbce_ops.dbce_ce_bwd."""
    op = "torch_medloss::dbce_ce_bwd_triton"
    _check_ce(op, logits, labels, masks, class_weights, {"labels": labels, "masks": masks,
                                                          "class_weights": class_weights, "grad_sums": grad_sums,
                                                          "grad_map": grad_map})
    batch, num_classes, num_pixels = logits.shape
    if tuple(grad_sums.shape) != (batch, 2) or not grad_sums.dtype.is_floating_point:
        raise ValueError(f"{op}: grad_sums must be a float tensor of shape (B, 2) = {(batch, 2)}, got "
                         f"{grad_sums.dtype} of shape {tuple(grad_sums.shape)}.")
    if write_map and (tuple(grad_map.shape) != (batch, num_pixels) or not grad_map.dtype.is_floating_point):
        raise ValueError(f"{op}: grad_map must be a float tensor of shape (B, S) = {(batch, num_pixels)} with "
                         f"write_map, got {grad_map.dtype} of shape {tuple(grad_map.shape)}.")
    # empty_like keeps the strides of a dense layout (a channels_last-derived (S*C, 1, C) view stays so).
    grad_logits = torch.empty_like(logits)
    if logits.numel() == 0:
        return grad_logits

    block_c, block_s, programs, pixels_per_program = _launch_sizes(num_classes, num_pixels)
    span = programs * pixels_per_program
    int64_offsets = _ce_int64(logits, labels, masks, block_c, span, grad_logits)
    if write_map:
        int64_offsets = int64_offsets or _needs_int64(span * abs(grad_map.stride(1)))
    map_arg = grad_map if write_map else grad_sums  # never read without WRITE_MAP
    with on_device(grad_logits):
        wrap_triton(_dbce_ce_bwd_kernel)[(batch, programs)](
            grad_logits,
            grad_sums,
            map_arg,
            logits,
            labels,
            masks,
            class_weights,
            num_classes,
            num_pixels,
            pixels_per_program,
            ignore_index,
            grad_logits.stride(0),
            grad_logits.stride(1),
            grad_logits.stride(2),
            grad_sums.stride(0),
            grad_map.stride(0) if write_map else 0,
            grad_map.stride(1) if write_map else 0,
            logits.stride(0),
            logits.stride(1),
            logits.stride(2),
            labels.stride(0),
            labels.stride(1),
            masks.stride(0),
            masks.stride(1),
            class_weights.stride(0),
            class_weights.stride(1),
            WRITE_MAP=write_map,
            INT64_OFFSETS=int64_offsets,
            BLOCK_C=block_c,
            BLOCK_S=block_s,
            num_warps=4,
        )
    return grad_logits
