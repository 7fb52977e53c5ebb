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

from torch_medloss import _contract as K
from torch_medloss.kernels._device import on_device
from torch_medloss.kernels._tile import label_tile, logits_tile, softmax_tile

# No autotuning: the sizes are a heuristic of C alone (BLOCK_C = next power of two of C). An autotune key would have to
# include C and every flag, and the first call of each combination would pay the search.

# Elements of a (BLOCK_C, BLOCK_N) tile: 16 values per thread with 4 warps, as kernels/dice_sums.py.
_TILE_ELEMENTS = 2048
# BLOCK_N / BLOCK_S bounds: at least 32 pixels (C = 64), at most 1024.
_MIN_BLOCK = 32
_MAX_BLOCK = 1024
# Programs per image at most (the partial buffers have a row per program); past the cap a program walks more tiles.
_MAX_PROGRAMS_PER_IMAGE = 1024
_MAX_PROGRAMS = 2048
# Private switch for the tests: force the int64 offset path on tensors small enough for int32.
_FORCE_INT64 = False

_MASK_DTYPES = ((8, torch.uint8), (16, torch.int16), (32, torch.int32), (64, torch.int64))
_LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_BOUNDARY_TOLERANCE = 1e-9  # as torch_medloss.reference.dbce.structuring_element


# ----------------------------------------------------------------------------------------------------------- masks


@triton.jit
def _first_pass_hit(acc, labels_row, label_offset, neighbour_ok, distance, classes, num_classes, ignore_index, one,
                    BALL: tl.constexpr):
    """Fold one offset of the first pass into ``acc``: the neighbour's class at ``distance`` (BALL: per-class min of
    the squared distance, (BLOCK_C, BLOCK_N) fp32) or its bit (cube: (BLOCK_N,) int64 bitmask)."""
    # Read at the labels' own dtype, compared in int64 (2**32 + 1 must not wrap onto class 1); an out-of-range
    # label is never a shift amount or an address.
    label = tl.load(labels_row + label_offset, mask=neighbour_ok, other=0).to(tl.int64)
    member = neighbour_ok & (label >= 0) & (label < num_classes) & (label != ignore_index)
    if BALL:
        hit = classes[:, None] == tl.where(member, label, -1)[None, :]
        acc = tl.minimum(acc, tl.where(hit, distance, float("inf")))
    else:
        acc = acc | tl.where(member, one << tl.where(member, label, 0), 0)
    return acc


@triton.jit
def _dbce_masks_pass_kernel(
    # Output pointers
    out_ptr,
    partial_ptr,
    class_weights_ptr,
    invalid_ptr,
    # Input pointers
    labels_ptr,
    src_ptr,
    counter_ptr,
    # Sizes and scalar options
    batch_size,
    programs,
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
    axis_size2,
    axis_stride2,
    reach2,
    step_sq2,
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
    stride_labels_axis2,
    stride_partial_b,
    stride_partial_p,
    # Constexpr flags and blocks
    BALL: tl.constexpr,
    FIRST: tl.constexpr,
    BOX: tl.constexpr,
    LAST: tl.constexpr,
    FINALIZE: tl.constexpr,
    UNIT_BATCH: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """One pass over pixels [k * pixels_per_program, (k + 1) * pixels_per_program) of image b.

    labels_ptr: (B, D, H, W) integers, any strides (read by the first pass, and by the last for the pixel's own
    label). src_ptr: the previous pass's buffer (not FIRST): (B, C, N) fp32 distances (BALL) or (B, N) bitmask.
    out_ptr: the next buffer of the same kind, or (LAST) the (B, N) masks in the mask dtype.
    partial_ptr (LAST): (B, programs, 2C + 1) int32, [counts | areas | invalid] of the slice.
    The pass reads pixel i + k * axis_stride for |k| <= reach within the axis (coordinate (i // axis_stride) %
    axis_size), at (k * step)^2 = k^2 step_sq; with BOX (the first pass only) also j * axis_stride2 for
    |j| <= reach2 along a second axis, at k^2 step_sq + j^2 step_sq2 (the ball skips the offsets beyond R^2).
    FINALIZE (LAST): the last program to finish (an atomic ticket on counter_ptr, int32, zero before the launch)
    adds the partial rows in a fixed order and writes class_weights_ptr (B, C) fp32, w_c = N / (K A_c) per image
    (UNIT_BATCH: per batch, the same row for every image), and invalid_ptr (1,) int32, the batch's invalid labels,
    reading BLOCK_R partial rows at a time. Grid: (B, programs); pixels_per_program is a multiple of BLOCK_N.
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
    # interpreter cannot use a runtime argument as a range bound (triton-lang/triton#9171).
    offset = 0
    while offset < pixels_per_program:
        pixels = first_pixel + offset + tl.arange(0, BLOCK_N)
        pixel_ok = pixels < num_pixels
        coord = (pixels // axis_stride) % axis_size
        column = pixels % width
        row = (pixels // width) % height
        plane = pixels // (width * height)
        label_offset = plane * stride_labels_d + row * stride_labels_h + column * stride_labels_w

        # ------------------------------------------------------------------ 1. the window along the axis (axes)
        if BALL:
            acc = tl.full([BLOCK_C, BLOCK_N], float("inf"), dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_N], dtype=tl.int64)
        if BOX:
            # Two axes at once (the first pass): one launch instead of two, at the price of the window's
            # area in reads per pixel (the launcher keeps it at most DBCE_MAX_BOX_OFFSETS).
            coord2 = (pixels // axis_stride2) % axis_size2
            j = -reach2
            while j <= reach2:
                line_ok = pixel_ok & (coord2 + j >= 0) & (coord2 + j < axis_size2)
                k = -reach
                while k <= reach:
                    distance = (k * k).to(tl.float32) * step_sq + (j * j).to(tl.float32) * step_sq2
                    if not BALL or distance <= limit:
                        neighbour_ok = line_ok & (coord + k >= 0) & (coord + k < axis_size)
                        acc = _first_pass_hit(acc, labels_row,
                                              label_offset + k * stride_labels_axis + j * stride_labels_axis2,
                                              neighbour_ok, distance, classes, num_classes, ignore_index, one, BALL)
                    k += 1
                j += 1
        else:
            k = -reach
            while k <= reach:
                neighbour_ok = pixel_ok & (coord + k >= 0) & (coord + k < axis_size)
                distance = (k * k).to(tl.float32) * step_sq
                if FIRST:
                    acc = _first_pass_hit(acc, labels_row, label_offset + k * stride_labels_axis, neighbour_ok,
                                          distance, classes, num_classes, ignore_index, one, BALL)
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
        if FINALIZE:
            # ------------------------------------------------------------ 4. the last program: class weights
            # Every thread's row stores are done (barrier) before the ticket's release; the last program's
            # acquire then sees every program's rows, read past L1 (.cg) in a fixed order: deterministic.
            tl.debug_barrier()
            ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
            if ticket == batch_size * programs - 1:
                _class_weights(class_weights_ptr, invalid_ptr, partial_ptr, batch_size, programs, num_classes,
                               classes, class_ok, stride_partial_b, stride_partial_p, UNIT_BATCH, BLOCK_C,
                               BLOCK_R)


@triton.jit
def _unit_counts(partial_ptr, first_image, images, programs, num_classes, classes, class_ok, stride_b, stride_p,
                 BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """(counts, areas, invalid) of images [first_image, first_image + images): their partial rows added in a fixed
    order, BLOCK_R rows at a time, read past L1 (.cg: other programs wrote them during this launch)."""
    counts = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int64)
    areas = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int64)
    invalid = tl.zeros([BLOCK_R], dtype=tl.int64)
    image = first_image
    while image < first_image + images:
        first = 0
        while first < programs:
            rows = first + tl.arange(0, BLOCK_R)
            row_ok = rows < programs
            at = partial_ptr + image * stride_b + rows * stride_p
            ok = row_ok[:, None] & class_ok[None, :]
            counts += tl.load(at[:, None] + classes[None, :], mask=ok, other=0, cache_modifier=".cg").to(tl.int64)
            areas += tl.load(at[:, None] + num_classes + classes[None, :], mask=ok, other=0,
                             cache_modifier=".cg").to(tl.int64)
            invalid += tl.load(at + 2 * num_classes, mask=row_ok, other=0, cache_modifier=".cg").to(tl.int64)
            first += BLOCK_R
        image += 1
    return tl.sum(counts, axis=0), tl.sum(areas, axis=0), tl.sum(invalid, axis=0)


@triton.jit
def _class_weights(class_weights_ptr, invalid_ptr, partial_ptr, batch_size, programs, num_classes, classes, class_ok,
                   stride_b, stride_p, UNIT_BATCH: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """w_c = N / (K A_c) of each unit (reference.dbce.class_weights_from_sums), 0 for absent classes, in float64
    and rounded once to fp32, as the reference; and the batch's invalid labels."""
    invalid = tl.zeros([1], dtype=tl.int64)
    if UNIT_BATCH:
        counts, areas, bad = _unit_counts(partial_ptr, 0, batch_size, programs, num_classes, classes, class_ok,
                                          stride_b, stride_p, BLOCK_C, BLOCK_R)
        weights = _weights_from_counts(counts, areas)
        image = 0
        while image < batch_size:
            tl.store(class_weights_ptr + image * num_classes + classes, weights, mask=class_ok)
            image += 1
        invalid += bad
    else:
        image = 0
        while image < batch_size:
            counts, areas, bad = _unit_counts(partial_ptr, image, 1, programs, num_classes, classes, class_ok,
                                              stride_b, stride_p, BLOCK_C, BLOCK_R)
            tl.store(class_weights_ptr + image * num_classes + classes, _weights_from_counts(counts, areas),
                     mask=class_ok)
            invalid += bad
            image += 1
    tl.store(invalid_ptr + tl.arange(0, 1), invalid.to(tl.int32))


@triton.jit
def _weights_from_counts(counts, areas):
    present = counts > 0
    valid_count = tl.sum(counts, axis=0).to(tl.float64)
    num_present = tl.sum(present.to(tl.int64), axis=0).to(tl.float64)
    ratio = valid_count / (num_present * tl.where(present, areas, 1).to(tl.float64))
    return tl.where(present, ratio, 0.0).to(tl.float32)


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
    # 1. softmax of the logits (kernels/_tile.py: padded class rows enter no max and no sum).
    tile_ok, class_ok, pixel_ok, x = logits_tile(logits_row, classes, pixels, num_classes, num_pixels,
                                                 stride_logits_c, stride_logits_s)
    q, _, shift, e_sum = softmax_tile(x, class_ok)

    # 2. labels: read at their own dtype, compared in int64. CE = logsumexp - x[label], from the label's logit
    #    alone: a -inf logit of another class (a masked class) must not enter as 0 * -inf.
    label = label_tile(labels_row, pixels, pixel_ok, stride_labels_s)
    valid = pixel_ok & (label >= 0) & (label < num_classes) & (label != ignore_index)
    y = (classes[:, None] == tl.where(valid, label, -1).to(classes.dtype)[None, :]).to(tl.float32)
    ce = shift + tl.log(e_sum) - tl.sum(tl.where(y != 0.0, x, 0.0), axis=0)

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
    loss_ptr,
    norm_ptr,
    # Input pointers
    logits_ptr,
    labels_ptr,
    masks_ptr,
    class_weights_ptr,
    invalid_ptr,
    counter_ptr,
    # Sizes and scalar options
    batch_size,
    programs,
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
    FINALIZE: tl.constexpr,
    MEAN: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Sum pixels [k * pixels_per_program, (k + 1) * pixels_per_program) of image b into partial row (b, k).

    partial_ptr: (B, programs, 2) fp32, [sum w CE, sum w] of the slice. map_ptr (WRITE_MAP): (B, S) fp32, w CE.
    logits_ptr: (B, C, S) fp32/bf16/fp16, any strides. labels_ptr, masks_ptr: (B, S) integers, any strides.
    class_weights_ptr: (B, C) floats. Grid: (B, programs); pixels_per_program is a multiple of BLOCK_S.
    FINALIZE (the dbce_loss op): the map (WRITE_MAP) carries NaN where invalid_ptr (int32, the masks pass's count
    of bad labels) is not 0; without WRITE_MAP the last program to finish (an atomic ticket on counter_ptr, zero
    before the launch) adds the partial rows in a fixed order and writes loss_ptr (the mean sum w CE / sum w, or
    the sum; NaN for a bad label) and norm_ptr, d loss / d sum w CE (1 / sum w, or 1), for the backward.
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
    poison = 0.0
    if FINALIZE:
        # A label outside [0, C) (unchecked CUDA labels) makes the loss NaN, as the reference's poison.
        poison = tl.where(tl.load(invalid_ptr) > 0, float("nan"), 0.0)
    acc_loss = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc_weight = tl.zeros([BLOCK_S], dtype=tl.float32)

    offset = 0
    while offset < pixels_per_program:
        pixels = first_pixel + offset + tl.arange(0, BLOCK_S)
        tile_ok, q, y, w, ce = _ce_tile(
            logits_row, labels_row, masks_row, class_weight, classes, pixels, num_classes, num_pixels, ignore_index,
            stride_logits_c, stride_logits_s, stride_labels_s, stride_masks_s,
        )  # fmt: skip
        weighted = tl.where(w != 0.0, w * ce, 0.0)
        acc_loss += weighted
        acc_weight += w
        if WRITE_MAP:
            tl.store(map_ptr + image * stride_map_b + pixels, weighted + poison, mask=pixels < num_pixels)
        offset += BLOCK_S

    partial_row = partial_ptr + image * stride_partial_b + program * stride_partial_p
    tl.store(partial_row, tl.sum(acc_loss, axis=0))
    tl.store(partial_row + 1, tl.sum(acc_weight, axis=0))
    if FINALIZE and WRITE_MAP:
        # "none": the map is the loss; norm (an output of the op) is 1, written once
        tl.store(norm_ptr + tl.arange(0, 1), tl.full([1], 1.0, tl.float32), mask=(image + program) == 0)
    if FINALIZE and not WRITE_MAP:
        # The last program reduces the rows (the pattern of the masks' class weights: barrier, acq_rel ticket,
        # .cg reads in a fixed order).
        tl.debug_barrier()
        ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
        if ticket == batch_size * programs - 1:
            total = tl.zeros([BLOCK_R], dtype=tl.float32)
            weight = tl.zeros([BLOCK_R], dtype=tl.float32)
            row_image = 0
            while row_image < batch_size:
                first = 0
                while first < programs:
                    rows = first + tl.arange(0, BLOCK_R)
                    at = partial_ptr + row_image * stride_partial_b + rows * stride_partial_p
                    total += tl.load(at, mask=rows < programs, other=0.0, cache_modifier=".cg")
                    weight += tl.load(at + 1, mask=rows < programs, other=0.0, cache_modifier=".cg")
                    first += BLOCK_R
                row_image += 1
            total_sum = tl.sum(total, axis=0)
            if MEAN:
                # reference.dbce.reduce_weighted: sum w CE / sum w, the normalizer clamped to the smallest normal.
                normalizer = tl.maximum(tl.sum(weight, axis=0), 1.1754943508222875e-38)
                tl.store(loss_ptr, total_sum / normalizer + poison)
                tl.store(norm_ptr, 1.0 / normalizer)
            else:
                tl.store(loss_ptr, total_sum + poison)
                tl.store(norm_ptr, total_sum * 0.0 + 1.0)


@triton.jit
def _dbce_ce_bwd_kernel(
    # Output pointers
    grad_logits_ptr,
    # Input pointers
    grad_sums_ptr,
    grad_map_ptr,
    norm_ptr,
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
    WITH_SUM: tl.constexpr,
    WRITE_MAP: tl.constexpr,
    SCALED: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Gradient of pixels [k * pixels_per_program, (k + 1) * pixels_per_program) of image b.

    grad_logits_ptr: (B, C, S) in the logits' dtype, any strides. grad_sums_ptr (WITH_SUM): (B, 2), any float dtype
    and strides (column 0 only: sum w has no gradient), or (SCALED, the dbce_loss op) the scalar loss's upstream
    gradient (stride 0), times norm_ptr's d loss / d sum w CE. grad_map_ptr (WRITE_MAP): (B, S) floats, any
    strides. The other pointers as in the forward.
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
    grad_sum = 0.0
    if WITH_SUM:
        grad_sum = tl.load(grad_sums_ptr + image * stride_grad_sums_b).to(tl.float32)
        if SCALED:
            grad_sum = grad_sum * tl.load(norm_ptr).to(tl.float32)

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


def _launch_sizes(batch: int, num_classes: int, num_pixels: int) -> tuple[int, int, int, int]:
    """Heuristic launch sizes of every kernel: (BLOCK_C, BLOCK, programs per image, pixels per program).

    BLOCK_C holds the whole class axis; BLOCK = _TILE_ELEMENTS / BLOCK_C clamped to [_MIN_BLOCK, _MAX_BLOCK] (C = 4:
    512 pixels, C = 64: 32), with 4 warps. Programs per image: one per BLOCK step up to _MAX_PROGRAMS_PER_IMAGE and
    _MAX_PROGRAMS over the batch (the last program of a launch reads every partial row), then several steps each.
    Ceiling divisions, so that the partial buffers have a row for every program and no program starts past the end.
    """
    block_c = triton.next_power_of_2(num_classes)
    block = min(_MAX_BLOCK, max(_MIN_BLOCK, _TILE_ELEMENTS // block_c))
    steps = max(1, triton.cdiv(num_pixels, block))
    cap = max(1, min(_MAX_PROGRAMS_PER_IMAGE, _MAX_PROGRAMS // max(batch, 1)))
    steps_per_program = triton.cdiv(steps, cap)
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
    raise ValueError(f"dbce_masks: at most {K.MAX_MASK_CLASSES} classes fit a mask, got {num_classes}.")


def _fp32_at_least(value: float) -> float:
    """The smallest float32 >= value (so that the fp32 compare keeps every offset the float64 one keeps)."""
    rounded = np.float32(value)
    if float(rounded) < value:
        rounded = np.nextafter(rounded, np.float32(np.inf))
    return float(rounded)


def _check_masks(op: str, labels: torch.Tensor, num_classes: int, element: int, radius: float,
                 spacing: list[float]) -> None:
    if labels.dim() != 4:
        raise ValueError(f"{op}: labels must be (B, D, H, W), got shape {tuple(labels.shape)}.")
    if labels.dtype not in _INT_DTYPES:
        raise ValueError(f"{op}: labels must be uint8, int8, int16, int32 or int64, got {labels.dtype}.")
    if not 1 <= num_classes <= K.MAX_MASK_CLASSES:
        raise ValueError(f"{op}: num_classes must be in [1, {K.MAX_MASK_CLASSES}] (one mask bit each), got "
                         f"{num_classes}.")
    if element not in (K.ELEMENT_BALL, K.ELEMENT_CUBE):
        raise ValueError(f"{op}: element must be 0 (ball) or 1 (cube), got {element}.")
    if not (math.isfinite(radius) and radius >= 0):
        raise ValueError(f"{op}: radius must be finite and >= 0, got {radius}.")
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"{op}: spacing must hold 3 finite positive values (D, H, W), got {list(spacing)}.")


def _passes(labels: torch.Tensor, radius: float, spacing: list[float]) -> list[list[tuple]]:
    """The masks passes: each a list of one axis, or (the first) two, as (size, stride in the pixel numbering,
    labels stride, window, spacing). W, H, D (W first: unit stride in the pixel numbering and, usually, in the
    labels); axes whose window is 0 are identities and are left out (one pass of W's if all are)."""
    _, depth, height, width = labels.shape
    axes = []
    for size, stride, labels_stride, step in ((width, 1, labels.stride(3), spacing[2]),
                                               (height, width, labels.stride(2), spacing[1]),
                                               (depth, height * width, labels.stride(1), spacing[0])):
        reach = min(math.floor(radius / step * (1 + _BOUNDARY_TOLERANCE)), size - 1)
        if reach > 0:
            axes.append((size, stride, labels_stride, reach, step))
    if not axes:
        return [[(width, 1, labels.stride(3), 0, spacing[2])]]
    if len(axes) > 1 and (2 * axes[0][3] + 1) * (2 * axes[1][3] + 1) <= K.DBCE_MAX_BOX_OFFSETS:
        return [axes[:2]] + [[axis] for axis in axes[2:]]
    return [[axis] for axis in axes]


def _launch_masks(labels, num_classes, ignore_index, element, radius, spacing, masks, finalize=None):
    """Launch the masks passes into ``masks`` (B, D, H, W); returns the last pass's (B, programs, 2C + 1) rows.

    finalize: None, or (class_weights (B, C) fp32, invalid (1,) int32, counter (int32, zero), unit_batch): the last
    pass's last program then writes the class weights and the invalid count itself (see _dbce_masks_pass_kernel).
    """
    batch, depth, height, width = labels.shape
    num_pixels = depth * height * width
    passes = _passes(labels, radius, spacing)
    ball = element == K.ELEMENT_BALL
    limit = _fp32_at_least(radius * radius * (1 + _BOUNDARY_TOLERANCE))
    block_c, block_n, programs, pixels_per_program = _launch_sizes(batch, num_classes, num_pixels)
    span = programs * pixels_per_program
    furthest = max(axis[3] * axis[1] for axes in passes for axis in axes)
    labels_extent = sum((n - 1) * abs(s) for n, s in zip(labels.shape[1:], labels.stride()[1:], strict=True))
    int64_offsets = _needs_int64(span + furthest, block_c * num_pixels + span + furthest, labels_extent + 1)
    buffers = []
    if len(passes) > 1:
        shape = (batch, num_classes, num_pixels) if ball else (batch, num_pixels)
        buffers = [torch.empty(shape, dtype=torch.float32 if ball else masks.dtype, device=labels.device)
                   for _ in range(min(2, len(passes) - 1))]
    partial = labels.new_empty((batch, programs, 2 * num_classes + 1), dtype=torch.int32)
    class_weights, invalid, counter, unit_batch = finalize if finalize is not None else (partial, partial, partial,
                                                                                          False)
    flat_masks = masks.view(batch, num_pixels)
    for index, axes in enumerate(passes):
        first, last = index == 0, index == len(passes) - 1
        out = flat_masks if last else buffers[index % 2]
        src = buffers[(index - 1) % 2] if not first else out  # unused by the first pass
        size, stride, labels_stride, reach, step = axes[0]
        size2, stride2, labels_stride2, reach2, step2 = axes[1] if len(axes) > 1 else (1, 1, 0, 0, 1.0)
        with on_device(out):
            wrap_triton(_dbce_masks_pass_kernel)[(batch, programs)](
                out,
                partial,
                class_weights,
                invalid,
                labels,
                src,
                counter,
                batch,
                programs,
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
                size2,
                stride2,
                reach2,
                step2 * step2,
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
                labels_stride2,
                partial.stride(0),
                partial.stride(1),
                BALL=ball,
                FIRST=first,
                BOX=len(axes) > 1,
                LAST=last,
                FINALIZE=last and finalize is not None,
                UNIT_BATCH=bool(unit_batch),
                INT64_OFFSETS=int64_offsets,
                BLOCK_C=block_c,
                BLOCK_N=block_n,
                BLOCK_R=max(1, 1024 // block_c),
                num_warps=4,
            )
    return partial


@triton_op("torch_medloss::dbce_masks_triton", mutates_args=())
def dbce_masks_triton(
    labels: torch.Tensor, num_classes: int, ignore_index: int, element: int, radius: float, spacing: list[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check, allocate, launch: (masks (B, D, H, W), counts (B, C), areas (B, C), invalid (B,)), as dbce_ops."""
    _check_masks("torch_medloss::dbce_masks_triton", labels, num_classes, element, radius, spacing)
    batch = labels.shape[0]
    masks = torch.empty(labels.shape, dtype=mask_dtype(num_classes), device=labels.device)
    if labels.numel() == 0:
        zeros = labels.new_zeros((batch, num_classes), dtype=torch.int64)
        return masks, zeros, zeros.clone(), labels.new_zeros((batch,), dtype=torch.int64)
    partial = _launch_masks(labels, num_classes, ignore_index, element, radius, spacing, masks)
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
    if not 1 <= num_classes <= K.MAX_MASK_CLASSES:
        raise ValueError(f"{op}: the number of classes (logits.shape[1]) must be in [1, {K.MAX_MASK_CLASSES}] (one "
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


def _launch_ce_fwd(logits, labels, masks, class_weights, ignore_index, weighted, partial_or_none=None,
                   finalize=None):
    """Launch the cross-entropy forward; returns its (B, programs, 2) partial rows.

    weighted: the (B, S) map to write, or None. finalize: None, or (loss, norm, invalid, counter, mean) for the
    dbce_loss op (see _dbce_ce_fwd_kernel).
    """
    batch, num_classes, num_pixels = logits.shape
    block_c, block_s, programs, pixels_per_program = _launch_sizes(batch, num_classes, num_pixels)
    int64_offsets = _ce_int64(logits, labels, masks, block_c, programs * pixels_per_program)
    partial = logits.new_empty((batch, programs, 2), dtype=torch.float32)
    loss, norm, invalid, counter, mean = finalize if finalize is not None else (partial, partial, partial, partial,
                                                                                False)
    map_arg = weighted if weighted is not None else partial  # never written without WRITE_MAP
    with on_device(partial):
        wrap_triton(_dbce_ce_fwd_kernel)[(batch, programs)](
            partial,
            map_arg,
            loss,
            norm,
            logits,
            labels,
            masks,
            class_weights,
            invalid,
            counter,
            batch,
            programs,
            num_classes,
            num_pixels,
            pixels_per_program,
            ignore_index,
            partial.stride(0),
            partial.stride(1),
            weighted.stride(0) if weighted is not None else 0,
            logits.stride(0),
            logits.stride(1),
            logits.stride(2),
            labels.stride(0),
            labels.stride(1),
            masks.stride(0),
            masks.stride(1),
            class_weights.stride(0),
            class_weights.stride(1),
            WRITE_MAP=weighted is not None,
            FINALIZE=finalize is not None,
            MEAN=bool(mean),
            INT64_OFFSETS=int64_offsets,
            BLOCK_C=block_c,
            BLOCK_S=block_s,
            BLOCK_R=1024,
            num_warps=4,
        )
    return partial


def _launch_ce_bwd(grad_logits, grad_sums, grad_map, norm, logits, labels, masks, class_weights, ignore_index,
                   scaled: bool) -> None:
    """Launch the cross-entropy backward into grad_logits. grad_sums: (B, 2) (or, ``scaled``, the scalar loss's
    gradient, times ``norm``) or None; grad_map: (B, S) or None."""
    batch, num_classes, num_pixels = logits.shape
    block_c, block_s, programs, pixels_per_program = _launch_sizes(batch, num_classes, num_pixels)
    span = programs * pixels_per_program
    int64_offsets = _ce_int64(logits, labels, masks, block_c, span, grad_logits)
    if grad_map is not None:
        int64_offsets = int64_offsets or _needs_int64(span * abs(grad_map.stride(1)))
    with on_device(grad_logits):
        wrap_triton(_dbce_ce_bwd_kernel)[(batch, programs)](
            grad_logits,
            grad_sums if grad_sums is not None else grad_map,
            grad_map if grad_map is not None else grad_sums,
            norm if norm is not None else grad_logits,
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
            (0 if scaled else grad_sums.stride(0)) if grad_sums is not None else 0,
            grad_map.stride(0) if grad_map is not None else 0,
            grad_map.stride(1) if grad_map is not None else 0,
            logits.stride(0),
            logits.stride(1),
            logits.stride(2),
            labels.stride(0),
            labels.stride(1),
            masks.stride(0),
            masks.stride(1),
            class_weights.stride(0),
            class_weights.stride(1),
            WITH_SUM=grad_sums is not None,
            WRITE_MAP=grad_map is not None,
            SCALED=scaled,
            INT64_OFFSETS=int64_offsets,
            BLOCK_C=block_c,
            BLOCK_S=block_s,
            num_warps=4,
        )


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
    partial = _launch_ce_fwd(logits, labels, masks, class_weights, ignore_index, weighted if write_map else None)
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
    _launch_ce_bwd(grad_logits, grad_sums, grad_map if write_map else None, None, logits, labels, masks,
                   class_weights, ignore_index, scaled=False)
    return grad_logits


# ------------------------------------------------------------------------------------------- the fused loss op


def _check_loss(op: str, logits: torch.Tensor, labels: torch.Tensor, codes: list[int], scalars: list[float]) -> None:
    if len(codes) != K.DBCE_NUM_CODES or len(scalars) != K.DBCE_NUM_SCALARS:
        raise ValueError(f"{op}: codes must have {K.DBCE_NUM_CODES} entries and scalars {K.DBCE_NUM_SCALARS} "
                         f"(torch_medloss._contract), got {len(codes)} and {len(scalars)}.")
    if logits.dim() != 3 or labels.dim() != 4 or labels.shape[0] != logits.shape[0] \
            or math.prod(labels.shape[1:]) != logits.shape[2]:
        raise ValueError(f"{op}: logits must be (B, C, S) and labels (B, D, H, W) with D H W = S, got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}.")
    if logits.dtype not in _LOGITS_DTYPES:
        raise ValueError(f"{op}: logits must be float32, bfloat16 or float16, got {logits.dtype}.")
    if codes[K.DBCE_CODE_REDUCTION] not in (K.REDUCTION_MEAN, K.REDUCTION_SUM, K.REDUCTION_NONE):
        raise ValueError(f"{op}: codes[DBCE_CODE_REDUCTION] must be {K.REDUCTION_MEAN} (mean), {K.REDUCTION_SUM} "
                         f"(sum) or {K.REDUCTION_NONE} (none), got {codes[K.DBCE_CODE_REDUCTION]}.")
    _check_masks(op, labels, logits.shape[1], codes[K.DBCE_CODE_ELEMENT], scalars[K.DBCE_SCALAR_RADIUS],
                 scalars[K.DBCE_SCALAR_SPACING:K.DBCE_SCALAR_SPACING + 3])
    if labels.device != logits.device:
        raise ValueError(f"{op}: labels are on {labels.device}, the logits on {logits.device}.")


@triton_op("torch_medloss::dbce_loss_fwd_triton", mutates_args=())
def dbce_loss_fwd_triton(logits: torch.Tensor, labels: torch.Tensor, codes: list[int],
                         scalars: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, masks, class_weights, norm): DBCE of logits (B, C, S) and labels (B, D, H, W), as
    reference.dbce_ops.dbce_loss_fwd; masks (B, S), class_weights (B, C) fp32 and norm (1,) fp32 (d loss / d sum
    w CE) are what the backward reads. Two launches for the masks' passes in 3-D (one in 1-D and 2-D, or with
    R = 0), one for the cross entropy; the last program of each finishes its reduction (no PyTorch op between)."""
    op = "torch_medloss::dbce_loss_fwd_triton"
    _check_loss(op, logits, labels, codes, scalars)
    batch, num_classes, num_pixels = logits.shape
    reduction = codes[K.DBCE_CODE_REDUCTION]
    ignore_index = codes[K.DBCE_CODE_IGNORE_INDEX]
    masks = torch.empty((batch, num_pixels), dtype=mask_dtype(num_classes), device=logits.device)
    class_weights = logits.new_empty((batch, num_classes), dtype=torch.float32)
    norm = logits.new_empty((1,), dtype=torch.float32)
    invalid = logits.new_empty((1,), dtype=torch.int32)
    loss = logits.new_empty(K.dbce_loss_shape(batch, num_pixels, codes), dtype=torch.float32)
    if batch == 0 or num_pixels == 0:
        # Nothing is valid: the mean is 0 (reference.dbce.reduce_weighted's clamped normalizer), the sum 0.
        return loss.zero_(), masks, class_weights.zero_(), norm.zero_()
    counters = torch.zeros(2, dtype=torch.int32, device=logits.device)  # the launches' tickets: one op
    flat_labels = labels.flatten(1)  # a view unless the spatial dims cannot merge
    _launch_masks(labels, num_classes, ignore_index, codes[K.DBCE_CODE_ELEMENT], scalars[K.DBCE_SCALAR_RADIUS],
                  scalars[K.DBCE_SCALAR_SPACING:K.DBCE_SCALAR_SPACING + 3], masks.view(labels.shape),
                  (class_weights, invalid, counters[0:1], codes[K.DBCE_CODE_BATCH]))
    weighted = loss if reduction == K.REDUCTION_NONE else None
    _launch_ce_fwd(logits, flat_labels, masks, class_weights, ignore_index, weighted,
                   finalize=(loss, norm, invalid, counters[1:2], reduction == K.REDUCTION_MEAN))
    return loss, masks, class_weights, norm


@triton_op("torch_medloss::dbce_loss_bwd_triton", mutates_args=())
def dbce_loss_bwd_triton(grad_loss: torch.Tensor, masks: torch.Tensor, class_weights: torch.Tensor,
                         norm: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, codes: list[int],
                         scalars: list[float]) -> torch.Tensor:
    """The logits' gradient from the loss's upstream gradient and the forward's masks, weights and norm: one
    launch."""
    op = "torch_medloss::dbce_loss_bwd_triton"
    _check_loss(op, logits, labels, codes, scalars)
    batch, num_classes, num_pixels = logits.shape
    grad_logits = torch.empty_like(logits)
    if logits.numel() == 0:
        return grad_logits
    flat_labels = labels.flatten(1)
    none = codes[K.DBCE_CODE_REDUCTION] == K.REDUCTION_NONE
    _launch_ce_bwd(grad_logits, None if none else grad_loss, grad_loss if none else None, norm, logits, flat_labels,
                   masks, class_weights, codes[K.DBCE_CODE_IGNORE_INDEX], scaled=not none)
    return grad_logits
