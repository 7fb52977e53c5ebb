"""Triton kernel of ``torch_medloss::label_histogram_triton``: per-(image, class) label counts.

The op has the contract of the C++ ``torch_medloss::label_histogram`` (csrc/label_histogram.cpp): labels (B, N) of
any integer dtype and any strides in, int64 counts (B, C + 1) out, the last column counting invalid labels.

Method. Program (b, k, j) reads the k-th slice of the pixels of image b and counts them against the j-th tile of
BLOCK_C bins by comparing a (BLOCK_N, BLOCK_C) tile of "bin == class" and summing over the pixels. Each program
writes its own row of a (B, programs, C + 1) int32 partial buffer, and ``torch.sum`` over the programs gives the
counts. No atomics: the partial sums are added in a fixed order, so the result is deterministic by construction
and the kernel is the same under TRITON_INTERPRET=1. (Integer atomics would be deterministic too, but with the few
classes of segmentation every thread would hit the same handful of addresses.)

Trade-off. The compare tile costs about C + 1 integer operations per pixel, against a load of 1 to 8 bytes: the
kernel stays memory-bound for the 2 to ~30 classes of segmentation and stops paying past a few hundred classes,
where the CUDA backend's shared-memory histogram (one atomic per pixel, any C) is the better choice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from torch_medloss.kernels._device import on_device
from torch_medloss.label_histogram import check_op_inputs, label_histogram_fake

# No autotuning: the kernel is bound by its loads and its compare tile, and the fixed sizes below keep it free of
# register spills for every label dtype (ptxas, sm_90: 34 registers at BLOCK_C = 32); an autotune key would also
# have to include C, which changes BLOCK_C.

# Pixels per step of a program.
_BLOCK_N = 256
# Bins per class tile at most: the (BLOCK_N, BLOCK_C) int32 compare tile is then 8192 values, 64 registers per
# thread with 4 warps. More classes take more class tiles (grid axis 2), each rereading the labels (from L2).
_MAX_BLOCK_C = 32
# Programs per image at most: bounds the partial buffer at B * 1024 * (C + 1) int32 while giving a large image
# enough programs to fill a GPU (1024 programs of 4 warps is ~8 per SM on an H100), and keeps each program's count
# far below 2**31 for any image that fits in memory.
_MAX_PROGRAMS_PER_IMAGE = 1024
# CUDA's limit on grid axes 1 and 2.
_MAX_GRID_YZ = 65535


@triton.jit
def _label_histogram_fwd_kernel(
    # Output pointers
    partial_ptr,
    # Input pointers
    labels_ptr,
    # Sizes
    num_pixels,
    num_classes,
    ignore_index,
    pixels_per_program,
    # Strides
    stride_labels_b,
    stride_labels_n,
    stride_partial_b,
    stride_partial_p,
    # Blocks
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Count pixels [k * pixels_per_program, (k + 1) * pixels_per_program) of image b into bins of class tile j.

    partial_ptr: (B, programs, C + 1) int32, row (b, k) written by the programs (b, k, *).
    labels_ptr: (B, N) integer labels, pixel i of image b at b * stride_labels_b + i * stride_labels_n.
    Grid: (B, programs, cdiv(C + 1, BLOCK_C)); pixels_per_program is a multiple of BLOCK_N.
    """
    image = tl.program_id(0).to(tl.int64)
    program = tl.program_id(1).to(tl.int64)
    class_tile = tl.program_id(2).to(tl.int64)

    bins = num_classes + 1
    classes = class_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    counts = tl.zeros([BLOCK_C], dtype=tl.int32)
    row = labels_ptr + image * stride_labels_b
    first_pixel = program * pixels_per_program

    # ------------------------------------------------------------------ 1. count the slice, BLOCK_N pixels at a time
    # A while loop, not `for offset in range(0, pixels_per_program, BLOCK_N)`: with numpy >= 2.4 the Triton 3.6
    # interpreter cannot use a runtime argument as a range bound (triton-lang/triton#9171, fixed after 3.6.0).
    # The loop is not software-pipelined then; occupancy (about 8 programs per SM) hides the load latency instead.
    offset = 0
    while offset < pixels_per_program:
        pixels = first_pixel + offset + tl.arange(0, BLOCK_N)
        in_image = pixels < num_pixels
        label = tl.load(row + pixels * stride_labels_n, mask=in_image, other=0).to(tl.int64)
        # The bin of a pixel: its class, C for an invalid label, -1 (no bin) for ignore_index or past the end.
        is_class = (label >= 0) & (label < num_classes)
        pixel_bin = tl.where(is_class, label, num_classes)
        pixel_bin = tl.where(in_image & (label != ignore_index), pixel_bin, -1)
        counts += tl.sum((pixel_bin[:, None] == classes[None, :]).to(tl.int32), axis=0)
        offset += BLOCK_N

    # ------------------------------------------------------------------ 2. write this program's row of the tile
    out = partial_ptr + image * stride_partial_b + program * stride_partial_p + classes
    tl.store(out, counts, mask=classes < bins)


def _grid(num_pixels: int, bins: int) -> tuple[int, int, int, int]:
    """Heuristic launch sizes: (BLOCK_C, class tiles, programs per image, pixels per program).

    One class tile when C + 1 <= _MAX_BLOCK_C. Programs per image: as many as there are BLOCK_N steps, up to
    _MAX_PROGRAMS_PER_IMAGE; past that each program takes several steps. Ceiling divisions throughout, so that the
    partial buffer has a row for every program and no program starts past the end of the image.
    """
    block_c = min(triton.next_power_of_2(bins), _MAX_BLOCK_C)
    class_tiles = triton.cdiv(bins, block_c)
    steps = triton.cdiv(num_pixels, _BLOCK_N)
    steps_per_program = triton.cdiv(steps, _MAX_PROGRAMS_PER_IMAGE)
    programs = triton.cdiv(steps, steps_per_program)
    return block_c, class_tiles, programs, steps_per_program * _BLOCK_N


@triton_op("torch_medloss::label_histogram_triton", mutates_args=())
def label_histogram_triton(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Check, allocate, launch: labels (B, N) -> int64 counts (B, C + 1), the last column counting invalid labels."""
    check_op_inputs(labels, num_classes)
    batch, num_pixels = labels.shape
    bins = num_classes + 1
    if labels.numel() == 0:
        return labels.new_zeros((batch, bins), dtype=torch.int64)

    block_c, class_tiles, programs, pixels_per_program = _grid(num_pixels, bins)
    if class_tiles > _MAX_GRID_YZ:
        raise ValueError(
            f"torch_medloss::label_histogram_triton: num_classes must be < {_MAX_GRID_YZ * _MAX_BLOCK_C}, got "
            f"{num_classes}; use the cuda backend."
        )
    if pixels_per_program >= 2**31:
        raise ValueError(
            f"torch_medloss::label_histogram_triton: labels must have < {2**31 * _MAX_PROGRAMS_PER_IMAGE} pixels "
            f"per image (the int32 partial counts), got {num_pixels}."
        )

    partial = labels.new_empty((batch, programs, bins), dtype=torch.int32)
    with on_device(partial):
        wrap_triton(_label_histogram_fwd_kernel)[(batch, programs, class_tiles)](
            partial,
            labels,
            num_pixels,
            num_classes,
            ignore_index,
            pixels_per_program,
            labels.stride(0),
            labels.stride(1),
            partial.stride(0),
            partial.stride(1),
            BLOCK_N=_BLOCK_N,
            BLOCK_C=block_c,
        )
    return partial.sum(dim=1, dtype=torch.int64)


# triton_op registers the launcher itself as the fake kernel; the shared one states the contract directly and is
# the same for both internal ops.
label_histogram_triton.register_fake(label_histogram_fake)
