"""Triton kernels of ``torch_medloss::dice_sums_fwd_triton`` / ``_bwd_triton``: the fused Dice-family sums.

The ops have the contract of torch_medloss.reference.dice_sums (``dice_sums_fwd`` / ``dice_sums_bwd``), with the same
arguments in the same order: logits (B, C, S) of any strides (fp32, bf16 or fp16), a target that is either a label
map (B, S) of any integer dtype and strides, read at its own dtype, or dense (B, C, S) floats; out come
sums (B, C, 4) = [I, P, G, D] and extras (B, 3) = [ce_num, ce_den, invalid] in float32, and the backward gives
d(<grad_sums, sums> + <grad_extras, extras>)/d(logits) in the logits' dtype and memory layout.

Method. Program (b, k) owns the k-th slice of the pixels of image b and walks it BLOCK_S pixels at a time. Each step
loads a (BLOCK_C, BLOCK_S) tile of logits with the whole class axis in registers (BLOCK_C = next power of two of C),
applies the activation along the class axis in fp32 (a max-subtracted softmax, a sigmoid or nothing), builds the
target tile (a one-hot compare of the labels, or the dense target), the pixel weight w and the modulator m, and
  - forward: adds the tile's per-class sums over its pixels into four (BLOCK_C,) fp32 accumulators and the per-pixel
    cross-entropy terms into (BLOCK_S,) accumulators; at the end the program writes one row of a
    (B, programs, C, 4) / (B, programs, 3) fp32 partial buffer, and ``torch.sum`` over the programs axis gives the
    result. No atomics: every addition happens in a fixed order, so the sums are bitwise identical run to run.
  - backward: recomputes the same quantities and writes the gradient tile in place of the logits' layout; nothing is
    saved by the forward but the inputs, and nothing is reduced across programs.

Trade-off. Each pass reads the logits and the target once, and the backward writes the gradient once: the bandwidth
floor of shared/BASELINES.md. The price is arithmetic per element: an exp for the softmax, and a log2 and an exp2 for
m = |y' - p'|^gamma, skipped when every gamma is 0 or 2 (see _modulator). By estimate (not yet timed: no GPU where
this was written) an fp32 pass at 3 TB/s needs ~60% of an H100's special-function rate with the general gamma and
~20% without, so the kernels should stay memory-bound for the few classes of segmentation. They stop paying as C
grows: the tile keeps 16 values per thread, so BLOCK_S shrinks as 1/C, and past C = 16 the class axis of a tile
spans several warps, making every softmax max and sum a shared-memory round trip, with register pressure near the
255 limit (see _TILE_ELEMENTS). A channels_last-derived layout (class stride 1) spreads classes across threads
from the start (warp shuffles instead of in-thread sums). At C in the hundreds a class-tiled two-pass kernel would
be the better design; the launchers refuse C > _MAX_CLASSES.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from torch_medloss.kernels._device import on_device

# No autotuning: the sizes below are a heuristic of C alone. An autotune key would have to include C (it sets BLOCK_C)
# and every flag (they change the arithmetic), and the first call of each combination would pay the search.

# Largest class count the kernels take: BLOCK_C = 128 rows of a tile with BLOCK_S = 16 pixels.
_MAX_CLASSES = 128
# Elements of a (BLOCK_C, BLOCK_S) tile, with num_warps = 4 (128 threads): 16 values per thread per live tile. For
# a contiguous (NCHW) tile with C <= 16 Triton gives each thread whole class columns, so the softmax and the other
# class sums stay in registers. ptxas (sm_90a, Triton 3.6, compiled here without a GPU) reports for the forward /
# backward: C = 4 fp32 labels 96 / 121 registers, C = 4 bf16 with CE 168 / 143, C = 14 206 / 202 (254 / 242
# squared with CE), C = 128 255 / 252, no spills except the forward with CE at C = 32 (208 bytes); even 255
# registers leave two programs per SM, which a one-program-per-SM 8-warp tile (4096 elements) would not. Halving
# the tile (1024) takes C = 14 to 143 / 141 registers at the price of class sums across two warps: the first
# thing to time on an H100 for the C = 14 workload.
_TILE_ELEMENTS = 2048
# BLOCK_S bounds: at least 16 pixels (64-byte fp32 rows: whole 32-byte sectors) at C = 128; at most 2048 (C = 1).
_MIN_BLOCK_S = 16
_MAX_BLOCK_S = 2048
# Programs per image at most: bounds the forward's partial buffer at B * 1024 * C * 4 fp32 (128 KiB for C = 4 and
# B = 2, 4 MiB at C = 128) while giving a large image enough programs to fill a GPU (B = 2 of 128^3 at C = 4 is
# 2048 programs of 4 warps, about 15 per SM on an H100, each walking 4 tiles). Past the cap a program walks more.
_MAX_PROGRAMS_PER_IMAGE = 1024
# Private switch for the tests: force the int64 offset path on tensors small enough for int32.
_FORCE_INT64 = False

_LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_ACTIVATION_NONE, _ACTIVATION_SOFTMAX, _ACTIVATION_SIGMOID = 0, 1, 2
_MASK_NONE, _MASK_LABEL, _MASK_CHANNEL, _MASK_SENTINEL = 0, 1, 2, 3


# ------------------------------------------------------------------------------------------------ shared tile math


@triton.jit
def _tile(
    logits_row,
    target_row,
    classes,
    pixels,
    num_classes,
    num_pixels,
    ignore_index,
    stride_logits_c,
    stride_logits_s,
    stride_target_c,
    stride_target_s,
    ACTIVATION: tl.constexpr,
    TARGET_IS_LABELS: tl.constexpr,
    MASK_MODE: tl.constexpr,
    WITH_CE: tl.constexpr,
):
    """Load one (BLOCK_C, BLOCK_S) tile and compute what both passes need, in fp32.

    Returns (tile_ok, x, p, q, log_q, y, w, counted, invalid): the in-bounds mask of the tile; the logits x; the
    activation p; the softmax q and log-softmax log_q of x (only with softmax or WITH_CE, else x as a placeholder);
    the target y (one-hot of in-range labels, or dense); the pixel weight w (BLOCK_S,), 0 past the end; the pixels the
    cross entropy counts (in-range labels, or every in-bounds pixel of a dense target) and the invalid labels, both as
    (BLOCK_S,) 0/1 floats.
    """
    class_ok = classes < num_classes
    pixel_ok = pixels < num_pixels
    tile_ok = class_ok[:, None] & pixel_ok[None, :]

    # 1. logits and activation. Padded class rows load 0; they must not enter the softmax (-inf there) and are
    #    never stored. (With a sigmoid they hold 0.5, which only their own, masked, rows see.)
    x = tl.load(
        logits_row + classes[:, None] * stride_logits_c + pixels[None, :] * stride_logits_s, mask=tile_ok, other=0.0
    ).to(tl.float32)
    q = x
    log_q = x
    if ACTIVATION == 1 or WITH_CE:
        shifted = tl.where(class_ok[:, None], x, float("-inf"))
        x_max = tl.max(shifted, axis=0)
        e = tl.exp(shifted - x_max[None, :])
        e_sum = tl.sum(e, axis=0)
        q = e * (1.0 / e_sum)[None, :]
        log_q = (x - x_max[None, :]) - tl.log(e_sum)[None, :]  # finite on padded rows (x = 0 there)
    if ACTIVATION == 1:
        p = q
    elif ACTIVATION == 2:
        p = tl.sigmoid(x)
    else:
        p = x

    # 2. target and pixel weight w.
    if TARGET_IS_LABELS:
        # Read at the labels' own dtype, compared in int64: a uint8 map cannot hold -100, and an int64 label such as
        # 2**32 + 1 must not wrap onto a class. An out-of-range label is never used as an address.
        label = tl.load(target_row + pixels * stride_target_s, mask=pixel_ok, other=0).to(tl.int64)
        in_range = pixel_ok & (label >= 0) & (label < num_classes)
        if MASK_MODE == 1:
            ignored = label == ignore_index
        else:
            ignored = label != label  # all False: only MASK_LABEL masks a label map
        invalid = (pixel_ok & ~in_range & ~ignored).to(tl.float32)
        w = (in_range & ~ignored).to(tl.float32)
        counted = in_range.to(tl.float32)
        hit = tl.where(in_range, label, -1).to(classes.dtype)
        y = (classes[:, None] == hit[None, :]).to(tl.float32)
    else:
        y = tl.load(
            target_row + classes[:, None] * stride_target_c + pixels[None, :] * stride_target_s, mask=tile_ok, other=0.0
        ).to(tl.float32)
        counted = pixel_ok.to(tl.float32)
        if MASK_MODE == 2:
            # 1 - y[ignore_index], taken from the tile in registers (the launcher checks 0 <= ignore_index < C).
            w = (1.0 - tl.sum(tl.where(classes[:, None] == ignore_index, y, 0.0), axis=0)) * counted
        elif MASK_MODE == 3:
            w = (tl.sum(y, axis=0) > 0).to(tl.float32) * counted
        else:
            w = counted
        invalid = counted * 0.0
    return tile_ok, x, p, q, log_q, y, w, counted, invalid


@triton.jit
def _gamma_case(gamma, class_ok):
    """0 when every gamma is 0, 2 when every gamma is 2, 1 otherwise: a per-program scalar for _modulator's branch."""
    all_zero = tl.max(tl.abs(gamma), axis=0) == 0.0  # padded classes load 0
    all_two = tl.max(tl.abs(tl.where(class_ok, gamma, 2.0) - 2.0), axis=0) == 0.0
    return tl.where(all_zero, 0, tl.where(all_two, 2, 1))


@triton.jit
def _modulator(p_w, y_w, gamma, gamma_case, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """m = |y' - p'|^gamma per class, 1 where gamma == 0 (pow(0, 0) = 1 as in torch); returns (p' - y', m).

    The branch is uniform over a program, so it costs nothing per element, and it skips the log2 and exp2 (two
    special-function operations per element, the tightest unit on an H100 at this kernel's bandwidth) for plain Dice
    (gamma = 0: m = 1) and for PM Dice's usual gamma = 2 (m = d * d, also what torch.pow gives). In general,
    exp2(gamma * log2(d)) is 0 at d = 0 for gamma > 0 (log2(0) = -inf), and the where() hides the NaN of 0 * -inf.
    """
    diff = p_w - y_w
    if gamma_case == 0:
        m = tl.full([BLOCK_C, BLOCK_S], 1.0, tl.float32)
    elif gamma_case == 2:
        m = diff * diff
    else:
        m = tl.where(gamma[:, None] == 0.0, 1.0, tl.exp2(gamma[:, None] * tl.log2(tl.abs(diff))))
    return diff, m


# ------------------------------------------------------------------------------------------------------- forward


@triton.jit
def _dice_sums_fwd_kernel(
    # Output pointers
    sums_partial_ptr,
    extras_partial_ptr,
    # Input pointers
    logits_ptr,
    target_ptr,
    gamma_ptr,
    ce_weight_ptr,
    # Sizes and scalar options
    num_classes,
    num_pixels,
    pixels_per_program,
    ignore_index,
    label_smoothing,
    # Strides
    stride_logits_b,
    stride_logits_c,
    stride_logits_s,
    stride_target_b,
    stride_target_c,
    stride_target_s,
    stride_gamma,
    stride_ce_weight,
    stride_sums_partial_b,
    stride_sums_partial_p,
    stride_extras_partial_b,
    stride_extras_partial_p,
    # Constexpr flags and blocks
    ACTIVATION: tl.constexpr,
    TARGET_IS_LABELS: tl.constexpr,
    MASK_MODE: tl.constexpr,
    SQUARED: tl.constexpr,
    WITH_CE: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Sum pixels [k * pixels_per_program, (k + 1) * pixels_per_program) of image b into partial row (b, k).

    sums_partial_ptr: (B, programs, C, 4) fp32, contiguous in its last two dims; [I, P, G, D] of the slice.
    extras_partial_ptr: (B, programs, 3) fp32, contiguous in its last dim; [ce_num, ce_den, invalid] of the slice.
    logits_ptr: (B, C, S) fp32/bf16/fp16. target_ptr: labels (B, S) of any integer dtype (stride_target_c unused),
    or dense (B, C, S) of any float dtype. gamma_ptr, ce_weight_ptr: (C,) of any float dtype.
    Grid: (B, programs); pixels_per_program is a multiple of BLOCK_S.
    """
    image = tl.program_id(0).to(tl.int64)
    program = tl.program_id(1).to(tl.int64)
    logits_row = logits_ptr + image * stride_logits_b
    target_row = target_ptr + image * stride_target_b
    first_pixel = program * pixels_per_program
    classes = tl.arange(0, BLOCK_C)
    if INT64_OFFSETS:
        classes = classes.to(tl.int64)
    else:
        first_pixel = first_pixel.to(tl.int32)  # the launcher checked every in-image offset fits
    class_ok = classes < num_classes

    gamma = tl.load(gamma_ptr + classes * stride_gamma, mask=class_ok, other=0.0).to(tl.float32)
    gamma_case = _gamma_case(gamma, class_ok)
    ce_weight = tl.load(ce_weight_ptr + classes * stride_ce_weight, mask=class_ok, other=0.0).to(tl.float32)
    smooth_share = label_smoothing / num_classes

    acc_i = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_p = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_d = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_ce_num = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc_ce_den = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc_invalid = tl.zeros([BLOCK_S], dtype=tl.float32)

    # ------------------------------------------------------------------ 1. walk the slice, BLOCK_S pixels at a time
    # A while loop, not `for offset in range(0, pixels_per_program, BLOCK_S)`: with numpy >= 2.4 the Triton 3.6
    # interpreter cannot use a runtime argument as a range bound (triton-lang/triton#9171), as in label_histogram.
    offset = 0
    while offset < pixels_per_program:
        pixels = first_pixel + offset + tl.arange(0, BLOCK_S)
        tile_ok, x, p, q, log_q, y, w, counted, invalid = _tile(
            logits_row, target_row, classes, pixels, num_classes, num_pixels, ignore_index,
            stride_logits_c, stride_logits_s, stride_target_c, stride_target_s,
            ACTIVATION, TARGET_IS_LABELS, MASK_MODE, WITH_CE,
        )  # fmt: skip

        # 2. the Dice sums of the tile. Reduced over the pixels every step rather than kept as (BLOCK_C, BLOCK_S)
        #    accumulators: those would cost four more tiles of registers, and at the sizes that matter a program
        #    walks only a few tiles (4 at B2 128^3), so the per-step reductions are few.
        p_w = p * w[None, :]
        y_w = y * w[None, :]
        diff, m = _modulator(p_w, y_w, gamma, gamma_case, BLOCK_C, BLOCK_S)
        if SQUARED:
            p_k = p_w * p_w
            y_k = y_w * y_w
        else:
            p_k = p_w
            y_k = y_w
        acc_i += tl.sum(m * p_w * y_w, axis=1)
        acc_p += tl.sum(m * p_k, axis=1)
        acc_g += tl.sum(m * y_k, axis=1)
        acc_d += tl.sum(m * tl.abs(diff), axis=1)

        # 3. cross entropy on the softmax of the raw logits (padded rows: weight 0).
        if WITH_CE:
            weighted_log_q = ce_weight[:, None] * log_q
            if TARGET_IS_LABELS:
                picked = -tl.sum(y * log_q, axis=0)
                label_weight = tl.sum(ce_weight[:, None] * y, axis=0)
                smooth = -tl.sum(weighted_log_q, axis=0)
                ce_term = (1.0 - label_smoothing) * label_weight * picked + smooth_share * smooth
                acc_ce_num += counted * ce_term
                acc_ce_den += counted * label_weight
            else:
                smoothed = (1.0 - label_smoothing) * y + smooth_share
                acc_ce_num += counted * -tl.sum(smoothed * weighted_log_q, axis=0)
                acc_ce_den += counted
        if TARGET_IS_LABELS:
            acc_invalid += invalid
        offset += BLOCK_S

    # ------------------------------------------------------------------ 4. write this program's partial row
    sums_out = sums_partial_ptr + image * stride_sums_partial_b + program * stride_sums_partial_p + classes * 4
    tl.store(sums_out + 0, acc_i, mask=class_ok)
    tl.store(sums_out + 1, acc_p, mask=class_ok)
    tl.store(sums_out + 2, acc_g, mask=class_ok)
    tl.store(sums_out + 3, acc_d, mask=class_ok)
    extras_out = extras_partial_ptr + image * stride_extras_partial_b + program * stride_extras_partial_p
    tl.store(extras_out + 0, tl.sum(acc_ce_num, axis=0))
    tl.store(extras_out + 1, tl.sum(acc_ce_den, axis=0))
    tl.store(extras_out + 2, tl.sum(acc_invalid, axis=0))


# ------------------------------------------------------------------------------------------------------ backward


@triton.jit
def _dice_sums_bwd_kernel(
    # Output pointers
    grad_logits_ptr,
    # Input pointers
    grad_sums_ptr,
    grad_extras_ptr,
    logits_ptr,
    target_ptr,
    gamma_ptr,
    ce_weight_ptr,
    # Sizes and scalar options
    num_classes,
    num_pixels,
    pixels_per_program,
    ignore_index,
    label_smoothing,
    # Strides
    stride_grad_logits_b,
    stride_grad_logits_c,
    stride_grad_logits_s,
    stride_grad_sums_b,
    stride_grad_sums_c,
    stride_grad_sums_k,
    stride_grad_extras_b,
    stride_logits_b,
    stride_logits_c,
    stride_logits_s,
    stride_target_b,
    stride_target_c,
    stride_target_s,
    stride_gamma,
    stride_ce_weight,
    # Constexpr flags and blocks
    ACTIVATION: tl.constexpr,
    TARGET_IS_LABELS: tl.constexpr,
    MASK_MODE: tl.constexpr,
    SQUARED: tl.constexpr,
    WITH_CE: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Gradient of pixels [k * pixels_per_program, (k + 1) * pixels_per_program) of image b.

    grad_logits_ptr: (B, C, S) in the logits' dtype, any strides. grad_sums_ptr: (B, C, 4), grad_extras_ptr: (B, 3),
    any float dtype and strides (only columns I, P, D and ce_num are read). The other pointers as in the forward.
    Grid: (B, programs); pixels_per_program is a multiple of BLOCK_S.
    """
    image = tl.program_id(0).to(tl.int64)
    program = tl.program_id(1).to(tl.int64)
    logits_row = logits_ptr + image * stride_logits_b
    target_row = target_ptr + image * stride_target_b
    grad_row = grad_logits_ptr + image * stride_grad_logits_b
    first_pixel = program * pixels_per_program
    classes = tl.arange(0, BLOCK_C)
    if INT64_OFFSETS:
        classes = classes.to(tl.int64)
    else:
        first_pixel = first_pixel.to(tl.int32)
    class_ok = classes < num_classes

    gamma = tl.load(gamma_ptr + classes * stride_gamma, mask=class_ok, other=0.0).to(tl.float32)
    gamma_case = _gamma_case(gamma, class_ok)
    grad_sums_row = grad_sums_ptr + image * stride_grad_sums_b + classes * stride_grad_sums_c
    grad_i = tl.load(grad_sums_row, mask=class_ok, other=0.0).to(tl.float32)
    grad_p = tl.load(grad_sums_row + stride_grad_sums_k, mask=class_ok, other=0.0).to(tl.float32)
    grad_d = tl.load(grad_sums_row + 3 * stride_grad_sums_k, mask=class_ok, other=0.0).to(tl.float32)
    if SQUARED:
        grad_p = 2.0 * grad_p  # d(p'^2)/dp' = 2 p'
    if WITH_CE:
        grad_ce = tl.load(grad_extras_ptr + image * stride_grad_extras_b).to(tl.float32)
        ce_weight = tl.load(ce_weight_ptr + classes * stride_ce_weight, mask=class_ok, other=0.0).to(tl.float32)
        ce_weight_sum = tl.sum(ce_weight, axis=0)
        smooth_share = label_smoothing / num_classes

    offset = 0
    while offset < pixels_per_program:
        pixels = first_pixel + offset + tl.arange(0, BLOCK_S)
        tile_ok, x, p, q, log_q, y, w, counted, invalid = _tile(
            logits_row, target_row, classes, pixels, num_classes, num_pixels, ignore_index,
            stride_logits_c, stride_logits_s, stride_target_c, stride_target_s,
            ACTIVATION, TARGET_IS_LABELS, MASK_MODE, WITH_CE,
        )  # fmt: skip

        # ------------------------------------------------------------------ 1. the Dice part, dL/dp
        # dL/dp = w m (gI y' + gP k p'^(k-1) + gD sign(p' - y')): m is a constant (detached in the reference), and
        # sign(0) = 0, as torch.abs's gradient.
        p_w = p * w[None, :]
        y_w = y * w[None, :]
        diff, m = _modulator(p_w, y_w, gamma, gamma_case, BLOCK_C, BLOCK_S)
        sign = tl.where(diff > 0, 1.0, 0.0) - tl.where(diff < 0, 1.0, 0.0)
        if SQUARED:
            d_power = grad_p[:, None] * p_w
        else:
            d_power = grad_p[:, None]
        g = (m * (grad_i[:, None] * y_w + d_power + grad_d[:, None] * sign)) * w[None, :]

        # ------------------------------------------------------------------ 2. through the activation
        if ACTIVATION == 1:
            dx = p * (g - tl.sum(p * g, axis=0)[None, :])  # softmax: p_j (g_j - sum_c p_c g_c)
        elif ACTIVATION == 2:
            dx = g * p * (1.0 - p)
        else:
            dx = g

        # ------------------------------------------------------------------ 3. cross entropy
        # d(-log q_c)/dx_j = q_j - [j == c], weighted as in the reference's ce_num.
        if WITH_CE:
            if TARGET_IS_LABELS:
                label_weight = tl.sum(ce_weight[:, None] * y, axis=0)
                d_ce = (1.0 - label_smoothing) * label_weight[None, :] * (q - y)
                d_ce += smooth_share * (q * ce_weight_sum - ce_weight[:, None])
                dx += (grad_ce * counted)[None, :] * d_ce
            else:
                weighted = ce_weight[:, None] * ((1.0 - label_smoothing) * y + smooth_share)
                dx += grad_ce * (q * tl.sum(weighted, axis=0)[None, :] - weighted)

        out = grad_row + classes[:, None] * stride_grad_logits_c + pixels[None, :] * stride_grad_logits_s
        tl.store(out, dx.to(grad_logits_ptr.dtype.element_ty), mask=tile_ok)
        offset += BLOCK_S


# ------------------------------------------------------------------------------------------------------ launchers


def _launch_sizes(num_classes: int, num_pixels: int) -> tuple[int, int, int, int, int]:
    """Heuristic launch sizes: (BLOCK_C, BLOCK_S, num_warps, programs per image, pixels per program).

    BLOCK_C holds the whole class axis; BLOCK_S = _TILE_ELEMENTS / BLOCK_C clamped to [_MIN_BLOCK_S, _MAX_BLOCK_S]
    (C = 4: 512 pixels, C = 14: 128, C = 128: 16), with 4 warps, so a thread holds 16 values of a tile. Programs per
    image: one per BLOCK_S step up to _MAX_PROGRAMS_PER_IMAGE, then several steps each. Ceiling divisions
    throughout, so the partial buffer has a row for every program and no program starts past the end of the image.
    """
    block_c = triton.next_power_of_2(num_classes)
    block_s = min(_MAX_BLOCK_S, max(_MIN_BLOCK_S, _TILE_ELEMENTS // block_c))
    num_warps = 4
    steps = triton.cdiv(num_pixels, block_s)
    steps_per_program = triton.cdiv(steps, _MAX_PROGRAMS_PER_IMAGE)
    programs = triton.cdiv(steps, steps_per_program)
    return block_c, block_s, num_warps, programs, steps_per_program * block_s


def _needs_int64(span: int, block_c: int, *strides: tuple[int, int]) -> bool:
    """Whether an in-image element offset, over the padded index space the kernel computes, can reach 2**31.

    span: programs * pixels_per_program, the pixel indices the grid covers (>= S). strides: (class, pixel) stride
    pairs of every (B, C, S) or (B, S) operand. The batch offset is always int64 (image * stride_b on an int64
    program id), so only offsets inside one image need to fit int32.
    """
    limit = 2**31
    if _FORCE_INT64 or span >= limit:
        return True
    return any((block_c - 1) * abs(stride_c) + (span - 1) * abs(stride_s) >= limit for stride_c, stride_s in strides)


def _check(
    op: str,
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: torch.Tensor,
    ce_weight: torch.Tensor,
    activation: int,
    target_is_labels: bool,
    ignore_index: int,
    mask_mode: int,
    tensors: dict[str, torch.Tensor],
) -> None:
    """The launchers' checks: shapes, dtypes, devices and option values (none reads tensor data)."""
    if logits.dim() != 3:
        raise ValueError(f"{op}: logits must be 3-D (B, C, S), got shape {tuple(logits.shape)}.")
    if logits.dtype not in _LOGITS_DTYPES:
        raise ValueError(f"{op}: logits must be float32, bfloat16 or float16, got {logits.dtype}.")
    batch, num_classes, num_pixels = logits.shape
    if not 1 <= num_classes <= _MAX_CLASSES:
        raise ValueError(
            f"{op}: the number of classes (logits.shape[1]) must be in [1, {_MAX_CLASSES}] for the Triton kernel, "
            f"got {num_classes}; use the cuda or reference backend."
        )
    if target_is_labels:
        if tuple(target.shape) != (batch, num_pixels):
            raise ValueError(
                f"{op}: a label target must have shape (B, S) = {(batch, num_pixels)} for logits of shape "
                f"{tuple(logits.shape)}, got {tuple(target.shape)}."
            )
        if target.dtype not in _LABEL_DTYPES:
            raise ValueError(f"{op}: a label target must be uint8, int8, int16, int32 or int64, got {target.dtype}.")
    else:
        if target.shape != logits.shape:
            raise ValueError(
                f"{op}: a dense target must have the logits' shape {tuple(logits.shape)}, got {tuple(target.shape)}."
            )
        if not target.dtype.is_floating_point:
            raise ValueError(f"{op}: a dense target must be a float tensor, got {target.dtype}.")
    for name, vector in (("gamma", gamma), ("ce_weight", ce_weight)):
        if tuple(vector.shape) != (num_classes,) or not vector.dtype.is_floating_point:
            raise ValueError(
                f"{op}: {name} must be a float tensor of shape (C,) = ({num_classes},), got {vector.dtype} of shape "
                f"{tuple(vector.shape)}."
            )
    if activation not in (_ACTIVATION_NONE, _ACTIVATION_SOFTMAX, _ACTIVATION_SIGMOID):
        raise ValueError(f"{op}: activation must be 0 (none), 1 (softmax) or 2 (sigmoid), got {activation}.")
    if mask_mode not in (_MASK_NONE, _MASK_LABEL, _MASK_CHANNEL, _MASK_SENTINEL):
        raise ValueError(f"{op}: mask_mode must be 0, 1, 2 or 3, got {mask_mode}.")
    if mask_mode == _MASK_CHANNEL and not target_is_labels and not 0 <= ignore_index < num_classes:
        raise ValueError(
            f"{op}: mask_mode 2 (w = 1 - y[:, ignore_index]) needs 0 <= ignore_index < C = {num_classes}, "
            f"got {ignore_index}."
        )
    for name, tensor in tensors.items():
        if tensor.device != logits.device:
            raise ValueError(f"{op}: {name} is on {tensor.device}, the logits on {logits.device}.")


@triton_op("torch_medloss::dice_sums_fwd_triton", mutates_args=())
def dice_sums_fwd_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: torch.Tensor,
    ce_weight: torch.Tensor,
    activation: int,
    target_is_labels: bool,
    ignore_index: int,
    mask_mode: int,
    squared: bool,
    with_ce: bool,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check, allocate, launch: (sums (B, C, 4), extras (B, 3)) in float32, as reference.dice_sums.dice_sums_fwd."""
    op = "torch_medloss::dice_sums_fwd_triton"
    _check(op, logits, target, gamma, ce_weight, activation, target_is_labels, ignore_index, mask_mode,
           {"target": target, "gamma": gamma, "ce_weight": ce_weight})  # fmt: skip
    batch, num_classes, num_pixels = logits.shape
    if logits.numel() == 0:
        sums = logits.new_zeros((batch, num_classes, 4), dtype=torch.float32)
        return sums, logits.new_zeros((batch, 3), dtype=torch.float32)

    block_c, block_s, num_warps, programs, pixels_per_program = _launch_sizes(num_classes, num_pixels)
    target_stride_c = 0 if target_is_labels else target.stride(1)
    int64_offsets = _needs_int64(
        programs * pixels_per_program,
        block_c,
        (logits.stride(1), logits.stride(2)),
        (target_stride_c, target.stride(-1)),
    )
    sums_partial = logits.new_empty((batch, programs, num_classes, 4), dtype=torch.float32)
    extras_partial = logits.new_empty((batch, programs, 3), dtype=torch.float32)
    with on_device(sums_partial):
        wrap_triton(_dice_sums_fwd_kernel)[(batch, programs)](
            sums_partial,
            extras_partial,
            logits,
            target,
            gamma,
            ce_weight,
            num_classes,
            num_pixels,
            pixels_per_program,
            ignore_index,
            label_smoothing,
            logits.stride(0),
            logits.stride(1),
            logits.stride(2),
            target.stride(0),
            target_stride_c,
            target.stride(-1),
            gamma.stride(0),
            ce_weight.stride(0),
            sums_partial.stride(0),
            sums_partial.stride(1),
            extras_partial.stride(0),
            extras_partial.stride(1),
            ACTIVATION=activation,
            TARGET_IS_LABELS=target_is_labels,
            MASK_MODE=mask_mode,
            SQUARED=squared,
            WITH_CE=with_ce,
            INT64_OFFSETS=int64_offsets,
            BLOCK_C=block_c,
            BLOCK_S=block_s,
            num_warps=num_warps,
        )
    # Fixed-order reduction of the per-program rows: deterministic, no atomics.
    return sums_partial.sum(dim=1), extras_partial.sum(dim=1)


@triton_op("torch_medloss::dice_sums_bwd_triton", mutates_args=())
def dice_sums_bwd_triton(
    grad_sums: torch.Tensor,
    grad_extras: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: torch.Tensor,
    ce_weight: torch.Tensor,
    activation: int,
    target_is_labels: bool,
    ignore_index: int,
    mask_mode: int,
    squared: bool,
    with_ce: bool,
    label_smoothing: float,
) -> torch.Tensor:
    """Check, allocate, launch: grad_logits (B, C, S) in the logits' dtype and layout, as dice_sums_bwd."""
    op = "torch_medloss::dice_sums_bwd_triton"
    _check(op, logits, target, gamma, ce_weight, activation, target_is_labels, ignore_index, mask_mode,
           {"target": target, "gamma": gamma, "ce_weight": ce_weight, "grad_sums": grad_sums,
            "grad_extras": grad_extras})  # fmt: skip
    batch, num_classes, num_pixels = logits.shape
    if tuple(grad_sums.shape) != (batch, num_classes, 4) or not grad_sums.dtype.is_floating_point:
        raise ValueError(
            f"{op}: grad_sums must be a float tensor of shape (B, C, 4) = {(batch, num_classes, 4)}, got "
            f"{grad_sums.dtype} of shape {tuple(grad_sums.shape)}."
        )
    if tuple(grad_extras.shape) != (batch, 3) or not grad_extras.dtype.is_floating_point:
        raise ValueError(
            f"{op}: grad_extras must be a float tensor of shape (B, 3) = {(batch, 3)}, got {grad_extras.dtype} of "
            f"shape {tuple(grad_extras.shape)}."
        )
    # empty_like keeps the strides of a dense layout (a channels_last-derived (S*C, 1, C) view stays so), which makes
    # the gradient stores as coalesced as the logits loads.
    grad_logits = torch.empty_like(logits)
    if logits.numel() == 0:
        return grad_logits

    block_c, block_s, num_warps, programs, pixels_per_program = _launch_sizes(num_classes, num_pixels)
    target_stride_c = 0 if target_is_labels else target.stride(1)
    int64_offsets = _needs_int64(
        programs * pixels_per_program,
        block_c,
        (logits.stride(1), logits.stride(2)),
        (target_stride_c, target.stride(-1)),
        (grad_logits.stride(1), grad_logits.stride(2)),
    )
    with on_device(grad_logits):
        wrap_triton(_dice_sums_bwd_kernel)[(batch, programs)](
            grad_logits,
            grad_sums,
            grad_extras,
            logits,
            target,
            gamma,
            ce_weight,
            num_classes,
            num_pixels,
            pixels_per_program,
            ignore_index,
            label_smoothing,
            grad_logits.stride(0),
            grad_logits.stride(1),
            grad_logits.stride(2),
            grad_sums.stride(0),
            grad_sums.stride(1),
            grad_sums.stride(2),
            grad_extras.stride(0),
            logits.stride(0),
            logits.stride(1),
            logits.stride(2),
            target.stride(0),
            target_stride_c,
            target.stride(-1),
            gamma.stride(0),
            ce_weight.stride(0),
            ACTIVATION=activation,
            TARGET_IS_LABELS=target_is_labels,
            MASK_MODE=mask_mode,
            SQUARED=squared,
            WITH_CE=with_ce,
            INT64_OFFSETS=int64_offsets,
            BLOCK_C=block_c,
            BLOCK_S=block_s,
            num_warps=num_warps,
        )
    return grad_logits
