"""Triton kernels of the Dice-family ops: ``torch_medloss::dice_sums_{fwd,bwd}_triton`` (the per-class sums) and
``torch_medloss::dice_loss_{fwd,bwd}_triton`` (the sums and the loss head in one op).

Contract: torch_medloss.reference.dice_sums (the sums, as readable PyTorch) and torch_medloss.ops.dice_sums (the
head, composed from the reference losses' own formulas). Options arrive as the ``codes``/``scalars`` lists and the
``params`` (3, C) tensor of torch_medloss._contract. Logits (B, C, S) of any strides (fp32, bf16 or fp16); the
target is a label map (B, S) of any integer dtype and strides, read at its own dtype, or dense (B, C, S) floats.

Method. Three launches for a loss's forward and backward together, whatever the options:
  1. partials (forward): program (b, k) owns the k-th slice of the pixels of image b and walks it BLOCK_S pixels at
     a time. Each step loads a (BLOCK_C, BLOCK_S) tile of logits with the whole class axis in registers
     (BLOCK_C = next power of two of C), applies the activation in fp32, builds the target tile, the pixel weight w
     and the modulator m, and adds the tile's per-class sums [I, P, G, D] and the cross-entropy terms into
     registers; at the end it writes one row of a (B, programs, C, 4) / (B, programs, 3) fp32 partial buffer.
  2. finalize (forward, one program): adds the rows of each image in a fixed order (no atomics: bitwise the same
     run to run), then either stores the sums (the dice_sums op) or computes the loss head itself: the loss value
     (every reduction, batch Dice, class weights, the background left out, NaN for a bad label) and the
     coefficients d loss / d (I, P, D) per (image, class) and d loss / d ce_num that the backward needs.
  3. backward: recomputes each tile and writes the gradient in the logits' layout. It reads the coefficients and
     the upstream gradient itself (per class for reduction="none", a scalar otherwise), so no PyTorch op runs
     between the launches; in the dice_sums op it reads grad_sums and grad_extras instead.

Trade-off. Each pass reads the logits and the target once, and the backward writes the gradient once: the bandwidth
floor of shared/BASELINES.md. The price is arithmetic per element: an exp for the softmax, and a log2 and an exp2 for
m = |y' - p'|^gamma, skipped when every gamma is 0 or 2 (see _modulator). By estimate (not yet timed: no GPU where
this was written) an fp32 pass at 3 TB/s needs ~60% of an H100's special-function rate with the general gamma and
~20% without, so the kernels should stay memory-bound for the few classes of segmentation. They stop paying as C
grows: the tile keeps 16 values per thread, so BLOCK_S shrinks as 1/C, and past C = 16 the class axis of a tile
spans several warps, making every softmax max and sum a shared-memory round trip, with register pressure near the
255 limit (see _TILE_ELEMENTS). At C in the hundreds a class-tiled two-pass kernel would be the better design; the
launchers refuse C > DICE_MAX_CLASSES. The finalize program reads B * programs * C * 4 floats: the programs per
image shrink with B (_MAX_PROGRAMS) so that this stays a few hundred KiB, a few microseconds on one SM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from torch_medloss import _contract as K
from torch_medloss.kernels._device import on_device
from torch_medloss.kernels._tile import label_tile, logits_tile, softmax_tile

# No autotuning: the sizes below are a heuristic of C alone. An autotune key would have to include C (it sets BLOCK_C)
# and every flag (they change the arithmetic), and the first call of each combination would pay the search.

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
# Programs per image at most, and over the whole batch: enough to fill a GPU (B = 2 of 128^3 at C = 4 is 2048
# programs of 4 warps, about 15 per SM on an H100, each walking 4 tiles) while bounding the partial buffer that the
# one finalize program reads (2048 rows: 128 KiB at C = 4). Past the cap a program walks more tiles.
_MAX_PROGRAMS_PER_IMAGE = 1024
_MAX_PROGRAMS = 2048
# Elements of the finalize program's (BLOCK_P, BLOCK_C) tiles of partial rows: 4 per thread per sum.
_FINALIZE_TILE = 256
# Private switch for the tests: force the int64 offset path on tensors small enough for int32.
_FORCE_INT64 = False

_LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

# The contract's codes as Triton constants (a jitted function may read module globals only when they are constexpr).
_SOFTMAX = tl.constexpr(K.ACTIVATION_SOFTMAX)
_SIGMOID = tl.constexpr(K.ACTIVATION_SIGMOID)
_MASK_LABEL = tl.constexpr(K.MASK_LABEL)
_MASK_CHANNEL = tl.constexpr(K.MASK_CHANNEL)
_MASK_SENTINEL = tl.constexpr(K.MASK_SENTINEL)
_HEAD_GENERALIZED = tl.constexpr(K.HEAD_GENERALIZED)
_HEAD_TVERSKY = tl.constexpr(K.HEAD_TVERSKY)
_MEAN = tl.constexpr(K.REDUCTION_MEAN)
_NONE = tl.constexpr(K.REDUCTION_NONE)
_W_SQUARE = tl.constexpr(K.W_TYPE_SQUARE)
_W_SIMPLE = tl.constexpr(K.W_TYPE_SIMPLE)
_HEAD_NONE = tl.constexpr(K.HEAD_NONE)
_P_GAMMA = tl.constexpr(K.DICE_PARAM_GAMMA)
_P_WEIGHT = tl.constexpr(K.DICE_PARAM_WEIGHT)
_P_CE_WEIGHT = tl.constexpr(K.DICE_PARAM_CE_WEIGHT)
_P_FOCAL_ALPHA = tl.constexpr(K.DICE_PARAM_FOCAL_ALPHA)
_P_FOCAL_WEIGHT = tl.constexpr(K.DICE_PARAM_FOCAL_WEIGHT)
_ROW_I = tl.constexpr(K.DICE_SUM_I)
_ROW_P = tl.constexpr(K.DICE_SUM_P)
_ROW_D = tl.constexpr(K.DICE_SUM_D)
_ROW_F = tl.constexpr(K.DICE_SUM_F)
_SLOT_CE = tl.constexpr(K.DICE_SLOT_CE)
_SLOT_POISON = tl.constexpr(K.DICE_SLOT_POISON)
_FOCAL_SIGMOID = tl.constexpr(K.FOCAL_SIGMOID)
_FOCAL_SOFTMAX = tl.constexpr(K.FOCAL_SOFTMAX)
_ALPHA_SCALAR = tl.constexpr(K.ALPHA_SCALAR)
_ALPHA_PER_CLASS = tl.constexpr(K.ALPHA_PER_CLASS)
# float32's eps: MONAI clamps the focal term's valid-pixel count at it (torch.finfo(mask.dtype).eps).
_EPS = tl.constexpr(1.1920928955078125e-07)


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

    Returns (tile_ok, x, p, q, lse, y, w, counted, invalid): the in-bounds mask of the tile; the logits x; the
    activation p; the softmax q of the logits and the per-pixel logsumexp lse (only with softmax or WITH_CE, else
    placeholders), so that log_softmax = x - lse where a caller needs it (not kept as a tile: registers); the target
    y (one-hot of in-range labels, or dense); the pixel weight w (BLOCK_S,), 0 past the end; the pixels the cross
    entropy counts (in-range labels, or every in-bounds pixel of a dense target) and the invalid labels, both as
    (BLOCK_S,) 0/1 floats.
    """
    # 1. logits and activation. (With a sigmoid, padded class rows hold 0.5, which only their own rows see.)
    tile_ok, class_ok, pixel_ok, x = logits_tile(logits_row, classes, pixels, num_classes, num_pixels,
                                                 stride_logits_c, stride_logits_s)
    q = x
    lse = pixels * 0.0
    if ACTIVATION == _SOFTMAX or WITH_CE:
        q, _, shift, e_sum = softmax_tile(x, class_ok)
        lse = shift + tl.log(e_sum)
    if ACTIVATION == _SOFTMAX:
        p = q
    elif ACTIVATION == _SIGMOID:
        p = tl.sigmoid(x)
    else:
        p = x

    # 2. target and pixel weight w.
    if TARGET_IS_LABELS:
        label = label_tile(target_row, pixels, pixel_ok, stride_target_s)
        in_range = pixel_ok & (label >= 0) & (label < num_classes)
        if MASK_MODE == _MASK_LABEL:
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
        if MASK_MODE == _MASK_CHANNEL:
            # 1 - y[ignore_index], taken from the tile in registers (the launcher checks 0 <= ignore_index < C).
            w = (1.0 - tl.sum(tl.where(classes[:, None] == ignore_index, y, 0.0), axis=0)) * counted
        elif MASK_MODE == _MASK_SENTINEL:
            w = (tl.sum(y, axis=0) > 0).to(tl.float32) * counted
        else:
            w = counted
        invalid = counted * 0.0
    return tile_ok, x, p, q, lse, y, w, counted, invalid


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



@triton.jit
def _log_sigmoid(z):
    """log(sigmoid(z)) without overflow: min(z, 0) - log(1 + exp(-|z|))."""
    return tl.minimum(z, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(z)))


@triton.jit
def _pow(base, exponent):
    """base^exponent for base >= 0 and a scalar exponent, with torch's pow(0, 0) = 1."""
    return tl.where(exponent == 0.0, 1.0, tl.exp2(exponent * tl.log2(base)))


@triton.jit
def _focal(x, y, w, kept, classes, alpha, focal_weight, gamma, alpha_scalar, DROP: tl.constexpr,
           FOCAL: tl.constexpr, ALPHA: tl.constexpr, GRAD: tl.constexpr):
    """MONAI's focal loss per element of a tile, masked as MONAI masks it (the terms of (x w, y w), times w), times
    the focal class weight; 0 outside the kept classes. With GRAD, returns (term, d term / d x) for the sigmoid form
    and (term, d term / d log p, p) for the softmax form (its class sum is the caller's: it needs the upstream).

    Sigmoid (reference.focal.sigmoid_focal_terms): t = A bce, A = sigmoid(-x s)^gamma with s = 2y - 1, bce = x - x y
    - log sigmoid(x); d t / dx = A (-gamma s sigmoid(x s) bce + sigmoid(x) - y). Softmax (softmax_focal_terms, over
    the kept classes only, as MONAI drops the background first): t_c = -(1 - p_c)^gamma log p_c y_c, and
    d t_c / d log p_c = -y_c ((1 - p_c)^gamma - gamma p_c log p_c (1 - p_c)^(gamma - 1)). Terms with y = 0 are
    selected away, not multiplied (a -inf logit has log p = -inf).
    """
    x_w = x * w[None, :]
    y_w = y * w[None, :]
    scale = focal_weight[:, None] * w[None, :]
    if FOCAL == _FOCAL_SIGMOID:
        # Infinite logits clamped to +-1e30, as the reference: each term is then its limit (0 for x = -inf, y = 0,
        # where x - x y would be NaN), with the clamp's zero gradient outside. Compares, not min/max: a NaN logit
        # must stay NaN (PTX max.f32 would return the other operand).
        inside = (x_w >= -1e30) & (x_w <= 1e30)
        x_w = tl.where(x_w < -1e30, -1e30, tl.where(x_w > 1e30, 1e30, x_w))
        if ALPHA == _ALPHA_SCALAR:
            factor = y_w * alpha_scalar + (1.0 - y_w) * (1.0 - alpha_scalar)
        elif ALPHA == _ALPHA_PER_CLASS:
            factor = tl.where(y_w == 1.0, alpha[:, None], 1.0)
        else:
            factor = y_w * 0.0 + 1.0
        bce = x_w - x_w * y_w - _log_sigmoid(x_w)
        s = 2.0 * y_w - 1.0
        a = tl.exp(gamma * _log_sigmoid(-x_w * s))
        term = tl.where(kept[:, None], a * bce * factor * scale, 0.0)
        if GRAD:
            d_term = a * (-gamma * s * tl.exp(_log_sigmoid(x_w * s)) * bce + tl.sigmoid(x_w) - y_w)
            # d/dx of t(x w) w: the chain rule's w and the mask's w
            return term, tl.where(kept[:, None] & inside, d_term * factor * scale * w[None, :], 0.0), x_w
        return term, term, x_w
    else:
        if ALPHA == _ALPHA_SCALAR:
            factor = tl.where(classes == DROP, 1.0 - alpha_scalar, alpha_scalar)
        elif ALPHA == _ALPHA_PER_CLASS:
            factor = alpha
        else:
            factor = focal_weight * 0.0 + 1.0
        shifted = tl.where(kept[:, None], x_w, float("-inf"))
        shift = tl.max(shifted, axis=0)
        e = tl.exp(shifted - shift[None, :])
        e_sum = tl.sum(e, axis=0)
        p = e * (1.0 / e_sum)[None, :]
        log_p = (x_w - shift[None, :]) - tl.log(e_sum)[None, :]
        rest = 1.0 - p
        pw = _pow(rest, gamma)
        hit = kept[:, None] & (y_w != 0.0)
        term = tl.where(hit, -pw * log_p * y_w * factor[:, None] * scale, 0.0)
        if GRAD:
            # gamma p log p (1 - p)^(gamma - 1): torch's pow gradient, 0 for gamma = 0 and 1 * 0^0 for gamma = 1.
            slope = tl.where(gamma == 1.0, 1.0, _pow(rest, gamma - 1.0))
            inner = tl.where(gamma == 0.0, 0.0, gamma * p * log_p * slope)
            d_log_p = tl.where(hit, -y_w * (pw - inner) * factor[:, None] * scale * w[None, :], 0.0)
            return term, d_log_p, p
        return term, term, p


# ------------------------------------------------------------------------------------------- 1. forward partials


@triton.jit
def _dice_partials_kernel(
    # Output pointers
    sums_partial_ptr,
    extras_partial_ptr,
    map_ptr,
    # Input pointers
    logits_ptr,
    target_ptr,
    params_ptr,
    # Sizes and scalar options
    num_classes,
    num_pixels,
    pixels_per_program,
    ignore_index,
    label_smoothing,
    focal_gamma,
    focal_alpha,
    # Strides
    stride_params_row,
    stride_map_b,
    stride_map_c,
    stride_logits_b,
    stride_logits_c,
    stride_logits_s,
    stride_target_b,
    stride_target_c,
    stride_target_s,
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
    FOCAL: tl.constexpr,
    ALPHA: tl.constexpr,
    DROP: tl.constexpr,
    FOCAL_MAP: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Sum pixels [k * pixels_per_program, (k + 1) * pixels_per_program) of image b into partial row (b, k).

    sums_partial_ptr: (B, programs, C, 5) fp32, contiguous in its last two dims; [I, P, G, D, F] of the slice.
    extras_partial_ptr: (B, programs, 4) fp32, contiguous in its last dim; [ce_num, ce_den, invalid, valid].
    map_ptr (FOCAL_MAP): the (B, C - DROP, S) fp32 map of the focal term (reduction "none" of FocalLoss), unit
    pixel stride. logits_ptr: (B, C, S) fp32/bf16/fp16. target_ptr: labels (B, S) of any integer dtype
    (stride_target_c unused), or dense (B, C, S) of any float dtype. params_ptr: (5, C) rows of
    _contract.DICE_PARAM_*, unit class stride. Grid: (B, programs); pixels_per_program is a multiple of BLOCK_S.
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

    kept = class_ok & (classes >= DROP)
    gamma = tl.load(params_ptr + _P_GAMMA * stride_params_row + classes, mask=class_ok, other=0.0).to(tl.float32)
    gamma_case = _gamma_case(gamma, class_ok)
    ce_weight = tl.load(params_ptr + _P_CE_WEIGHT * stride_params_row + classes, mask=class_ok,
                        other=0.0).to(tl.float32)
    smooth_share = label_smoothing / num_classes
    ce_weight_sum = tl.sum(ce_weight, axis=0)
    alpha = tl.load(params_ptr + _P_FOCAL_ALPHA * stride_params_row + classes, mask=kept, other=0.0).to(tl.float32)
    focal_weight = tl.load(params_ptr + _P_FOCAL_WEIGHT * stride_params_row + classes, mask=kept,
                           other=0.0).to(tl.float32)

    acc_i = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_p = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_d = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_ce_num = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc_ce_den = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc_invalid = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc_f = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_valid = tl.zeros([BLOCK_S], dtype=tl.float32)

    # 1. walk the slice, BLOCK_S pixels at a time. A while loop, not `for offset in range(...)`: with numpy >= 2.4
    #    the Triton 3.6 interpreter cannot use a runtime argument as a range bound (triton-lang/triton#9171).
    offset = 0
    while offset < pixels_per_program:
        pixels = first_pixel + offset + tl.arange(0, BLOCK_S)
        tile_ok, x, p, q, lse, y, w, counted, invalid = _tile(
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

        # 3. cross entropy on the softmax of the raw logits (padded rows: weight 0). Terms with a zero factor are
        #    selected away, not multiplied: a -inf logit (a masked class) has log_q = -inf, and torch's cross
        #    entropy never reads it unless it is the label or label smoothing spreads weight onto it.
        if WITH_CE:
            if TARGET_IS_LABELS:
                # -log q at the label = lse - x[label], from the label's logit alone.
                picked = lse - tl.sum(tl.where(y != 0.0, x, 0.0), axis=0)
                label_weight = tl.sum(ce_weight[:, None] * y, axis=0)
                ce_term = (1.0 - label_smoothing) * label_weight * picked
                # sum_c cw_c (-log q_c) = lse sum_c cw_c - sum_c cw_c x_c: no (C, S) log-softmax tile; a -inf
                # logit of a class with cw_c != 0 makes it inf (as torch), and eps = 0 must not multiply that.
                smooth = lse * ce_weight_sum - tl.sum(tl.where(ce_weight[:, None] != 0.0, ce_weight[:, None] * x, 0.0),
                                                      axis=0)
                ce_term += tl.where(label_smoothing != 0.0, smooth_share * smooth, 0.0)
                acc_ce_num += counted * ce_term
                acc_ce_den += counted * label_weight
            else:
                smoothed = ce_weight[:, None] * ((1.0 - label_smoothing) * y + smooth_share)
                terms = tl.where(tile_ok & (smoothed != 0.0), smoothed * (x - lse[None, :]), 0.0)
                acc_ce_num -= counted * tl.sum(terms, axis=0)
                acc_ce_den += counted
        if TARGET_IS_LABELS:
            acc_invalid += invalid

        # 4. the valid pixels (which the focal term averages over), and the focal term on the raw logits.
        acc_valid += w
        if FOCAL != 0:
            focal, _, _ = _focal(x, y, w, kept, classes, alpha, focal_weight, focal_gamma, focal_alpha, DROP, FOCAL,
                                 ALPHA, False)
            acc_f += tl.sum(focal, axis=1)
            if FOCAL_MAP:
                out = map_ptr + image * stride_map_b + (classes - DROP)[:, None] * stride_map_c + pixels[None, :]
                tl.store(out, focal, mask=kept[:, None] & (pixels < num_pixels)[None, :])
        offset += BLOCK_S

    # 5. write this program's partial row
    sums_out = sums_partial_ptr + image * stride_sums_partial_b + program * stride_sums_partial_p + classes * 5
    tl.store(sums_out + 0, acc_i, mask=class_ok)
    tl.store(sums_out + 1, acc_p, mask=class_ok)
    tl.store(sums_out + 2, acc_g, mask=class_ok)
    tl.store(sums_out + 3, acc_d, mask=class_ok)
    tl.store(sums_out + 4, acc_f, mask=class_ok)
    extras_out = extras_partial_ptr + image * stride_extras_partial_b + program * stride_extras_partial_p
    tl.store(extras_out + 0, tl.sum(acc_ce_num, axis=0))
    tl.store(extras_out + 1, tl.sum(acc_ce_den, axis=0))
    tl.store(extras_out + 2, tl.sum(acc_invalid, axis=0))
    tl.store(extras_out + 3, tl.sum(acc_valid, axis=0))


# ------------------------------------------------------------------------------------------- 2. forward finalize


@triton.jit
def _image_sums(sums_partial_ptr, image, programs, classes, class_ok, stride_b, stride_p,
                BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """(I, P, G, D, F) of one image, (BLOCK_C,) each: its partial rows added in a fixed order (tiles of BLOCK_P rows,
    then one reduction over the tile)."""
    acc_i = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc_p = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc_d = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc_f = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    first = 0
    while first < programs:
        rows = first + tl.arange(0, BLOCK_P)
        ok = (rows < programs)[:, None] & class_ok[None, :]
        at = sums_partial_ptr + image * stride_b + rows[:, None] * stride_p + classes[None, :] * 5
        acc_i += tl.load(at + 0, mask=ok, other=0.0)
        acc_p += tl.load(at + 1, mask=ok, other=0.0)
        acc_g += tl.load(at + 2, mask=ok, other=0.0)
        acc_d += tl.load(at + 3, mask=ok, other=0.0)
        acc_f += tl.load(at + 4, mask=ok, other=0.0)
        first += BLOCK_P
    return (tl.sum(acc_i, axis=0), tl.sum(acc_p, axis=0), tl.sum(acc_g, axis=0), tl.sum(acc_d, axis=0),
            tl.sum(acc_f, axis=0))


@triton.jit
def _image_extras(extras_partial_ptr, image, programs, stride_b, stride_p, BLOCK_P: tl.constexpr):
    """(ce_num, ce_den, invalid, valid) of one image: its partial rows added in a fixed order."""
    acc_num = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc_den = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc_invalid = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc_valid = tl.zeros([BLOCK_P], dtype=tl.float32)
    first = 0
    while first < programs:
        rows = first + tl.arange(0, BLOCK_P)
        ok = rows < programs
        at = extras_partial_ptr + image * stride_b + rows * stride_p
        acc_num += tl.load(at + 0, mask=ok, other=0.0)
        acc_den += tl.load(at + 1, mask=ok, other=0.0)
        acc_invalid += tl.load(at + 2, mask=ok, other=0.0)
        acc_valid += tl.load(at + 3, mask=ok, other=0.0)
        first += BLOCK_P
    return tl.sum(acc_num, axis=0), tl.sum(acc_den, axis=0), tl.sum(acc_invalid, axis=0), tl.sum(acc_valid, axis=0)


@triton.jit
def _class_head(i_sum, p_sum, g_sum, d_sum, kept, smooth_nr, smooth_dr, alpha, beta,
                HEAD: tl.constexpr, JACCARD: tl.constexpr, SOFT: tl.constexpr):
    """The per-class loss f and d f / d (I, P, D), (BLOCK_C,) each, of the Dice and Tversky heads.

    Dice (reference.dice.dice_from_sums): f = 1 - (2 I' + nr) / (den + dr), den = P + G or, for Jaccard,
    2 (P + G - I'). Tversky (reference.dice.tversky_from_sums): f = 1 - (I' + nr) / (I' + alpha (P - I') +
    beta (G - I') + dr). I' = I, or MONAI's soft-label intersection (P + G - D) / 2 with SOFT. G has no gradient
    (it holds only the target and the detached modulator).
    """
    if SOFT:
        inter = (p_sum + g_sum - d_sum) * 0.5
    else:
        inter = i_sum
    if HEAD == _HEAD_TVERSKY:
        numerator = inter + smooth_nr
        denominator = inter + alpha * (p_sum - inter) + beta * (g_sum - inter) + smooth_dr
        f = 1.0 - numerator / denominator
        df_inter = -1.0 / denominator + numerator * (1.0 - alpha - beta) / (denominator * denominator)
        df_p = numerator * alpha / (denominator * denominator)
    else:
        numerator = 2.0 * inter + smooth_nr
        if JACCARD:
            denominator = 2.0 * (p_sum + g_sum - inter) + smooth_dr
            df_inter = -2.0 / denominator - 2.0 * numerator / (denominator * denominator)
            df_p = 2.0 * numerator / (denominator * denominator)
        else:
            denominator = p_sum + g_sum + smooth_dr
            df_inter = -2.0 / denominator
            df_p = numerator / (denominator * denominator)
        f = 1.0 - numerator / denominator
    if SOFT:
        df_i = df_inter * 0.0
        df_p = df_p + 0.5 * df_inter
        df_d = -0.5 * df_inter
    else:
        df_i = df_inter
        df_d = df_inter * 0.0
    zero = f * 0.0
    return tl.where(kept, f, zero), tl.where(kept, df_i, zero), tl.where(kept, df_p, zero), tl.where(kept, df_d, zero)


@triton.jit
def _generalized_head(i_sum, p_sum, g_sum, d_sum, kept, smooth_nr, smooth_dr,
                      W_TYPE: tl.constexpr, SOFT: tl.constexpr):
    """Generalized Dice of one unit (reference.dice.generalized_dice_from_sums): the scalar f and d f / d (I, P, D).

    w_c = 1/G_c^2, 1/G_c or 1; an absent class (infinite weight) takes the largest finite weight of the unit.
    f = 1 - (2 sum_c w_c I'_c + nr) / (sum_c w_c (P_c + G_c) + dr); the weights carry no gradient.
    """
    if W_TYPE == _W_SQUARE:
        w = 1.0 / (g_sum * g_sum)
    elif W_TYPE == _W_SIMPLE:
        w = 1.0 / g_sum
    else:
        w = g_sum * 0.0 + 1.0
    infinite = kept & (w == float("inf"))
    w = tl.where(kept & ~infinite, w, 0.0)
    w = w + tl.where(infinite, tl.max(w, axis=0), 0.0)
    if SOFT:
        inter = (p_sum + g_sum - d_sum) * 0.5
    else:
        inter = i_sum
    numerator = 2.0 * tl.sum(inter * w, axis=0) + smooth_nr
    denominator = tl.sum((p_sum + g_sum) * w, axis=0) + smooth_dr
    f = 1.0 - numerator / denominator
    df_inter = -2.0 * w / denominator
    df_p = numerator * w / (denominator * denominator)
    if SOFT:
        return f, df_inter * 0.0, df_p + 0.5 * df_inter, -0.5 * df_inter
    return f, df_inter, df_p, df_inter * 0.0


@triton.jit
def _dice_finalize_kernel(
    # Output pointers
    loss_ptr,
    coef_ptr,
    # Input pointers
    sums_partial_ptr,
    extras_partial_ptr,
    params_ptr,
    # Sizes and scalar options
    batch_size,
    num_classes,
    programs,
    smooth_nr,
    smooth_dr,
    alpha,
    beta,
    lambda_dice,
    lambda_ce,
    lambda_focal,
    # Strides
    stride_sums_partial_b,
    stride_sums_partial_p,
    stride_extras_partial_b,
    stride_extras_partial_p,
    stride_params_row,
    stride_coef_b,
    stride_coef_k,
    # Constexpr flags and blocks
    SUMS_ONLY: tl.constexpr,
    HEAD: tl.constexpr,
    DROP: tl.constexpr,
    BATCH: tl.constexpr,
    REDUCTION: tl.constexpr,
    JACCARD: tl.constexpr,
    SOFT: tl.constexpr,
    W_TYPE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    WITH_CE: tl.constexpr,
    FOCAL: tl.constexpr,
    FOCAL_MASK: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """One program: the per-image sums from the partial rows, then (unless SUMS_ONLY) the loss and its coefficients.

    SUMS_ONLY: loss_ptr receives sums (B, C, 5) and coef_ptr extras (B, 4), both contiguous (the dice_sums op).
    Otherwise loss_ptr: the loss, contiguous, of _contract.dice_loss_shape (the focal map of HEAD_NONE with "none"
    is written by the partials kernel); coef_ptr: (B, 5, C + 1) fp32 with strides (stride_coef_b, stride_coef_k,
    1): rows I, P, D, F hold d loss / d sum per (image, class), already scaled by the reduction's 1/count, the class
    weight and the lambdas; column C of image 0 holds d loss / d ce_num (row DICE_SLOT_CE) and the poison, 0 or
    NaN (row DICE_SLOT_POISON). params_ptr: (5, C) by full class index.
    """
    classes = tl.arange(0, BLOCK_C)
    class_ok = classes < num_classes
    kept = class_ok & (classes >= DROP)

    if SUMS_ONLY:
        image = 0
        while image < batch_size:
            i_sum, p_sum, g_sum, d_sum, f_sum = _image_sums(sums_partial_ptr, image, programs, classes, class_ok,
                                                            stride_sums_partial_b, stride_sums_partial_p, BLOCK_C,
                                                            BLOCK_P)
            out = loss_ptr + image * num_classes * 5 + classes * 5
            tl.store(out + 0, i_sum, mask=class_ok)
            tl.store(out + 1, p_sum, mask=class_ok)
            tl.store(out + 2, g_sum, mask=class_ok)
            tl.store(out + 3, d_sum, mask=class_ok)
            tl.store(out + 4, f_sum, mask=class_ok)
            ce_num, ce_den, invalid, valid = _image_extras(extras_partial_ptr, image, programs,
                                                           stride_extras_partial_b, stride_extras_partial_p, BLOCK_P)
            tl.store(coef_ptr + image * 4 + 0, ce_num)
            tl.store(coef_ptr + image * 4 + 1, ce_den)
            tl.store(coef_ptr + image * 4 + 2, invalid)
            tl.store(coef_ptr + image * 4 + 3, valid)
            image += 1
    else:
        # 1. the batch's totals: cross entropy, bad labels, valid pixels (the coefficients below need them first).
        ce_num = 0.0
        ce_den = 0.0
        invalid = 0.0
        valid = 0.0
        image = 0
        while image < batch_size:
            num, den, bad, good = _image_extras(extras_partial_ptr, image, programs, stride_extras_partial_b,
                                                stride_extras_partial_p, BLOCK_P)
            ce_num += num
            ce_den += den
            invalid += bad
            valid += good
            image += 1
        # A label outside [0, C) (unchecked CUDA labels) makes the loss NaN, as the reference's poison does; the
        # gradient stays that of the valid pixels, as the reference's (the poison is a constant).
        poison = tl.where(invalid > 0.0, float("nan"), 0.0)

        # The Dice part's values: (B or 1) units times (C' kept classes, or 1 for generalized Dice). The mean's
        # 1 / count, lambda_dice and the class weights go into the coefficients here, once.
        kept_classes = num_classes - DROP
        units = batch_size
        if BATCH:
            units = 1
        count = units * 1.0
        if HEAD != _HEAD_GENERALIZED:
            count = count * kept_classes
        scale = lambda_dice
        if REDUCTION == _MEAN:
            scale = lambda_dice / count
        if HAS_WEIGHT:
            weight = tl.load(params_ptr + _P_WEIGHT * stride_params_row + classes, mask=kept,
                             other=0.0).to(tl.float32)
        else:
            weight = tl.where(kept, 1.0, 0.0)
        # The focal part: "sum" averages each (image, class) over its valid pixels, "mean" divides by the valid
        # pixels (with MONAI's ignore mask) or all elements (without).
        focal_count = valid
        if FOCAL_MASK:
            focal_count = tl.maximum(valid, _EPS)
        else:
            focal_count = valid * kept_classes

        # 2. the Dice part, per unit (the whole batch, or each image), and the coefficients of every image.
        total = 0.0
        focal_total = 0.0
        image = 0
        while image < batch_size:
            i_b, p_b, g_b, d_b, f_b = _image_sums(sums_partial_ptr, image, programs, classes, class_ok,
                                                  stride_sums_partial_b, stride_sums_partial_p, BLOCK_C, BLOCK_P)
            coef_row = coef_ptr + image * stride_coef_b + classes
            # the focal term of this image (no class weight here: the kernel's F already carries it)
            # (with "none", 1: the upstream map carries each element's gradient)
            df_f = tl.where(kept, 1.0, 0.0)
            if FOCAL != 0:
                if REDUCTION == _MEAN:
                    df_f = df_f * (lambda_focal / focal_count)
                    focal_total += tl.sum(tl.where(kept, f_b, 0.0), axis=0) / focal_count
                elif REDUCTION != _NONE:
                    _, _, _, good = _image_extras(extras_partial_ptr, image, programs, stride_extras_partial_b,
                                                  stride_extras_partial_p, BLOCK_P)
                    if FOCAL_MASK:
                        good = tl.maximum(good, _EPS)
                    df_f = df_f * (lambda_focal / good)
                    focal_total += tl.sum(tl.where(kept, f_b, 0.0), axis=0) / good
            tl.store(coef_row + _ROW_F * stride_coef_k, df_f, mask=class_ok)
            if HEAD != _HEAD_NONE and not BATCH:
                values, df_i, df_p, df_d = _unit_head(i_b, p_b, g_b, d_b, kept, classes, weight, smooth_nr,
                                                      smooth_dr, alpha, beta, HEAD, JACCARD, SOFT, W_TYPE, DROP)
                total += tl.sum(values, axis=0)
                if REDUCTION == _NONE:
                    _store_none(loss_ptr, image, values, kept, classes, kept_classes, poison, HEAD, DROP)
                tl.store(coef_row + _ROW_I * stride_coef_k, df_i * scale, mask=class_ok)
                tl.store(coef_row + _ROW_P * stride_coef_k, df_p * scale, mask=class_ok)
                tl.store(coef_row + _ROW_D * stride_coef_k, df_d * scale, mask=class_ok)
            else:
                zero = tl.zeros([BLOCK_C], dtype=tl.float32)
                tl.store(coef_row + _ROW_I * stride_coef_k, zero, mask=class_ok)
                tl.store(coef_row + _ROW_P * stride_coef_k, zero, mask=class_ok)
                tl.store(coef_row + _ROW_D * stride_coef_k, zero, mask=class_ok)
            tl.store(coef_row + 2 * stride_coef_k, tl.zeros([BLOCK_C], dtype=tl.float32), mask=class_ok)
            # column C (the scalar slots of image 0, 0 elsewhere): every element of an op's output is defined
            column = coef_ptr + image * stride_coef_b + num_classes + tl.arange(0, 8) * stride_coef_k
            tl.store(column, tl.zeros([8], dtype=tl.float32), mask=tl.arange(0, 8) < 5)
            image += 1
        if HEAD != _HEAD_NONE and BATCH:
            # batch Dice: the sums over the images, one head, the same coefficients for every image.
            i_sum = tl.zeros([BLOCK_C], dtype=tl.float32)
            p_sum = tl.zeros([BLOCK_C], dtype=tl.float32)
            g_sum = tl.zeros([BLOCK_C], dtype=tl.float32)
            d_sum = tl.zeros([BLOCK_C], dtype=tl.float32)
            image = 0
            while image < batch_size:
                i_b, p_b, g_b, d_b, f_b = _image_sums(sums_partial_ptr, image, programs, classes, class_ok,
                                                      stride_sums_partial_b, stride_sums_partial_p, BLOCK_C, BLOCK_P)
                i_sum += i_b
                p_sum += p_b
                g_sum += g_b
                d_sum += d_b
                image += 1
            values, df_i, df_p, df_d = _unit_head(i_sum, p_sum, g_sum, d_sum, kept, classes, weight, smooth_nr,
                                                  smooth_dr, alpha, beta, HEAD, JACCARD, SOFT, W_TYPE, DROP)
            total += tl.sum(values, axis=0)
            if REDUCTION == _NONE:
                _store_none(loss_ptr, 0, values, kept, classes, kept_classes, poison, HEAD, DROP)
            image = 0
            while image < batch_size:
                coef_row = coef_ptr + image * stride_coef_b + classes
                tl.store(coef_row + _ROW_I * stride_coef_k, df_i * scale, mask=class_ok)
                tl.store(coef_row + _ROW_P * stride_coef_k, df_p * scale, mask=class_ok)
                tl.store(coef_row + _ROW_D * stride_coef_k, df_d * scale, mask=class_ok)
                image += 1

        # 3. the loss value (mean or sum), the cross entropy's coefficient and the poison (column C of image 0).
        has_image = batch_size > 0
        slot = coef_ptr + num_classes
        ce_coefficient = 0.0
        if REDUCTION != _NONE:
            loss = total * scale
            if WITH_CE:
                if REDUCTION == _MEAN:
                    loss += lambda_ce * (ce_num / ce_den)
                    ce_coefficient = lambda_ce / ce_den
                else:
                    loss += lambda_ce * ce_num
                    ce_coefficient = lambda_ce
            if FOCAL != 0:
                loss += lambda_focal * focal_total
            tl.store(loss_ptr, loss + poison)
        tl.store(slot + _SLOT_CE * stride_coef_k, ce_coefficient, mask=has_image)
        tl.store(slot + _SLOT_POISON * stride_coef_k, poison, mask=has_image)


@triton.jit
def _unit_head(i_sum, p_sum, g_sum, d_sum, kept, classes, weight, smooth_nr, smooth_dr, alpha, beta,
               HEAD: tl.constexpr, JACCARD: tl.constexpr, SOFT: tl.constexpr, W_TYPE: tl.constexpr,
               DROP: tl.constexpr):
    """One unit's loss values and d f / d (I, P, D) per class, the class weights applied. The values are a
    (BLOCK_C,) vector: one per kept class (Dice, Tversky), or generalized Dice's one value at the first kept class."""
    if HEAD == _HEAD_GENERALIZED:
        f, df_i, df_p, df_d = _generalized_head(i_sum, p_sum, g_sum, d_sum, kept, smooth_nr, smooth_dr, W_TYPE,
                                                SOFT)
        return tl.where(classes == DROP, f, 0.0), df_i, df_p, df_d
    f, df_i, df_p, df_d = _class_head(i_sum, p_sum, g_sum, d_sum, kept, smooth_nr, smooth_dr, alpha, beta, HEAD,
                                      JACCARD, SOFT)
    return f * weight, df_i * weight, df_p * weight, df_d * weight


@triton.jit
def _store_none(loss_ptr, unit, values, kept, classes, kept_classes, poison, HEAD: tl.constexpr,
                DROP: tl.constexpr):
    """Reduction "none": the unit's row of the loss, (C',) for Dice and Tversky, one value for generalized Dice."""
    if HEAD == _HEAD_GENERALIZED:
        tl.store(loss_ptr + unit, tl.sum(values, axis=0) + poison)
    else:
        tl.store(loss_ptr + unit * kept_classes + classes - DROP, values + poison, mask=kept)


# ------------------------------------------------------------------------------------------------------ 3. backward


@triton.jit
def _dice_bwd_kernel(
    # Output pointers
    grad_logits_ptr,
    # Input pointers
    coef_ptr,
    grad_loss_ptr,
    grad_extras_ptr,
    logits_ptr,
    target_ptr,
    params_ptr,
    # Sizes and scalar options
    num_classes,
    num_pixels,
    pixels_per_program,
    ignore_index,
    label_smoothing,
    focal_gamma,
    focal_alpha,
    num_kept_slot,
    # Strides
    stride_grad_logits_b,
    stride_grad_logits_c,
    stride_grad_logits_s,
    stride_coef_b,
    stride_coef_c,
    stride_coef_k,
    stride_grad_loss_b,
    stride_grad_loss_c,
    stride_grad_loss_s,
    stride_grad_extras_b,
    stride_params_row,
    stride_logits_b,
    stride_logits_c,
    stride_logits_s,
    stride_target_b,
    stride_target_c,
    stride_target_s,
    # Constexpr flags and blocks
    SCALED: tl.constexpr,
    DROP: tl.constexpr,
    ACTIVATION: tl.constexpr,
    TARGET_IS_LABELS: tl.constexpr,
    MASK_MODE: tl.constexpr,
    SQUARED: tl.constexpr,
    WITH_CE: tl.constexpr,
    FOCAL: tl.constexpr,
    ALPHA: tl.constexpr,
    FOCAL_MAP: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Gradient of pixels [k * pixels_per_program, (k + 1) * pixels_per_program) of image b.

    grad_logits_ptr: (B, C, S) in the logits' dtype, any strides. The other inputs as in the forward, and:
      - SCALED (the dice_loss op): coef_ptr the finalize kernel's coefficients (strides b, c, k) and grad_loss_ptr
        the loss's upstream gradient, read at image * stride_grad_loss_b + (class - DROP) * stride_grad_loss_c
        (zero strides for a scalar loss; FOCAL_MAP: the (B, C', S) map's, + pixel * stride_grad_loss_s); the cross
        entropy's coefficient is in column num_kept_slot (= C) of image 0, row DICE_SLOT_CE.
      - not SCALED (the dice_sums op): coef_ptr is grad_sums (B, C, 5) (strides b, c, k) and grad_extras_ptr
        grad_extras (B, 4) (stride_grad_extras_b; column 0 is ce_num's).
    The rows of both layouts have the same indices (I, P, G, D, F). Grid: (B, programs).
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
    kept = class_ok & (classes >= DROP)

    gamma = tl.load(params_ptr + _P_GAMMA * stride_params_row + classes, mask=class_ok, other=0.0).to(tl.float32)
    gamma_case = _gamma_case(gamma, class_ok)

    # 0. d loss / d (I, P, D, F) of this image's classes, and d loss / d ce_num.
    coef_row = coef_ptr + image * stride_coef_b + classes * stride_coef_c
    grad_i = tl.load(coef_row + _ROW_I * stride_coef_k, mask=class_ok, other=0.0).to(tl.float32)
    grad_p = tl.load(coef_row + _ROW_P * stride_coef_k, mask=class_ok, other=0.0).to(tl.float32)
    grad_d = tl.load(coef_row + _ROW_D * stride_coef_k, mask=class_ok, other=0.0).to(tl.float32)
    grad_f = tl.load(coef_row + _ROW_F * stride_coef_k, mask=kept, other=0.0).to(tl.float32)
    if SCALED and not FOCAL_MAP:
        upstream = tl.load(grad_loss_ptr + image * stride_grad_loss_b + (classes - DROP) * stride_grad_loss_c,
                           mask=kept, other=0.0).to(tl.float32)
        grad_i = grad_i * upstream
        grad_p = grad_p * upstream
        grad_d = grad_d * upstream
        grad_f = grad_f * upstream
    if SQUARED:
        grad_p = 2.0 * grad_p  # d(p'^2)/dp' = 2 p'
    if WITH_CE:
        if SCALED:
            grad_ce = (tl.load(coef_ptr + num_kept_slot + _SLOT_CE * stride_coef_k).to(tl.float32)
                       * tl.load(grad_loss_ptr).to(tl.float32))
        else:
            grad_ce = tl.load(grad_extras_ptr + image * stride_grad_extras_b).to(tl.float32)
        ce_weight = tl.load(params_ptr + _P_CE_WEIGHT * stride_params_row + classes, mask=class_ok,
                            other=0.0).to(tl.float32)
        ce_weight_sum = tl.sum(ce_weight, axis=0)
        smooth_share = label_smoothing / num_classes
    if FOCAL != 0:
        alpha = tl.load(params_ptr + _P_FOCAL_ALPHA * stride_params_row + classes, mask=kept,
                        other=0.0).to(tl.float32)
        focal_weight = tl.load(params_ptr + _P_FOCAL_WEIGHT * stride_params_row + classes, mask=kept,
                               other=0.0).to(tl.float32)

    offset = 0
    while offset < pixels_per_program:
        pixels = first_pixel + offset + tl.arange(0, BLOCK_S)
        tile_ok, x, p, q, lse, y, w, counted, invalid = _tile(
            logits_row, target_row, classes, pixels, num_classes, num_pixels, ignore_index,
            stride_logits_c, stride_logits_s, stride_target_c, stride_target_s,
            ACTIVATION, TARGET_IS_LABELS, MASK_MODE, WITH_CE,
        )  # fmt: skip

        # 1. the Dice part, dL/dp = w m (gI y' + gP k p'^(k-1) + gD sign(p' - y')): m is a constant (detached in the
        #    reference), and sign(0) = 0, as torch.abs's gradient. (None for the focal map: FocalLoss alone.)
        if FOCAL_MAP:
            dx = x * 0.0
        else:
            p_w = p * w[None, :]
            y_w = y * w[None, :]
            diff, m = _modulator(p_w, y_w, gamma, gamma_case, BLOCK_C, BLOCK_S)
            sign = tl.where(diff > 0, 1.0, 0.0) - tl.where(diff < 0, 1.0, 0.0)
            if SQUARED:
                d_power = grad_p[:, None] * p_w
            else:
                d_power = grad_p[:, None]
            g = (m * (grad_i[:, None] * y_w + d_power + grad_d[:, None] * sign)) * w[None, :]

            # 2. through the activation
            if ACTIVATION == _SOFTMAX:
                dx = p * (g - tl.sum(p * g, axis=0)[None, :])  # softmax: p_j (g_j - sum_c p_c g_c)
            elif ACTIVATION == _SIGMOID:
                dx = g * p * (1.0 - p)
            else:
                dx = g

        # 3. cross entropy: d(-log q_c)/dx_j = q_j - [j == c], weighted as in the reference's ce_num.
        if WITH_CE:
            if TARGET_IS_LABELS:
                label_weight = tl.sum(ce_weight[:, None] * y, axis=0)
                d_ce = (1.0 - label_smoothing) * label_weight[None, :] * (q - y)
                d_ce += smooth_share * (q * ce_weight_sum - ce_weight[:, None])
                dx += (grad_ce * counted)[None, :] * d_ce
            else:
                weighted = ce_weight[:, None] * ((1.0 - label_smoothing) * y + smooth_share)
                dx += grad_ce * (q * tl.sum(weighted, axis=0)[None, :] - weighted)

        # 4. the focal term on the raw logits.
        if FOCAL != 0:
            if FOCAL_MAP:
                upstream_f = grad_f[:, None] * tl.load(
                    grad_loss_ptr + image * stride_grad_loss_b + (classes - DROP)[:, None] * stride_grad_loss_c
                    + pixels[None, :] * stride_grad_loss_s, mask=kept[:, None] & (pixels < num_pixels)[None, :],
                    other=0.0).to(tl.float32)
            else:
                upstream_f = grad_f[:, None]
            _, d_focal, p_focal = _focal(x, y, w, kept, classes, alpha, focal_weight, focal_gamma, focal_alpha, DROP,
                                         FOCAL, ALPHA, True)
            if FOCAL == _FOCAL_SOFTMAX:
                scaled = upstream_f * d_focal  # d loss / d log p per class, then log_softmax's backward
                dx += tl.where(kept[:, None], scaled - p_focal * tl.sum(scaled, axis=0)[None, :], 0.0)
            else:
                dx += upstream_f * d_focal

        out = grad_row + classes[:, None] * stride_grad_logits_c + pixels[None, :] * stride_grad_logits_s
        tl.store(out, dx.to(grad_logits_ptr.dtype.element_ty), mask=tile_ok)
        offset += BLOCK_S


# ------------------------------------------------------------------------------------------------------ launchers


def _launch_sizes(batch: int, num_classes: int, num_pixels: int) -> tuple[int, int, int, int]:
    """Heuristic launch sizes: (BLOCK_C, BLOCK_S, programs per image, pixels per program), with 4 warps.

    BLOCK_C holds the whole class axis; BLOCK_S = _TILE_ELEMENTS / BLOCK_C clamped to [_MIN_BLOCK_S, _MAX_BLOCK_S]
    (C = 4: 512 pixels, C = 14: 128, C = 128: 16), so a thread holds 16 values of a tile. Programs per image: one per
    BLOCK_S step, up to _MAX_PROGRAMS_PER_IMAGE and _MAX_PROGRAMS over the batch; then several steps each. Ceiling
    divisions throughout, so the partial buffer has a row for every program and no program starts past the end.
    """
    block_c = triton.next_power_of_2(num_classes)
    block_s = min(_MAX_BLOCK_S, max(_MIN_BLOCK_S, _TILE_ELEMENTS // block_c))
    steps = max(1, triton.cdiv(num_pixels, block_s))  # an empty image still has one (empty) program
    cap = max(1, min(_MAX_PROGRAMS_PER_IMAGE, _MAX_PROGRAMS // max(batch, 1)))
    steps_per_program = triton.cdiv(steps, cap)
    programs = triton.cdiv(steps, steps_per_program)
    return block_c, block_s, programs, steps_per_program * block_s


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


def _check(op: str, logits: torch.Tensor, target: torch.Tensor, params: torch.Tensor, codes: list[int],
           scalars: list[float], tensors: dict[str, torch.Tensor]) -> None:
    """The launchers' checks: shapes, dtypes, devices and option values (none reads tensor data)."""
    if len(codes) != K.DICE_NUM_CODES or len(scalars) != K.DICE_NUM_SCALARS:
        raise ValueError(f"{op}: codes must have {K.DICE_NUM_CODES} entries and scalars {K.DICE_NUM_SCALARS} "
                         f"(torch_medloss._contract), got {len(codes)} and {len(scalars)}.")
    if logits.dim() != 3:
        raise ValueError(f"{op}: logits must be 3-D (B, C, S), got shape {tuple(logits.shape)}.")
    if logits.dtype not in _LOGITS_DTYPES:
        raise ValueError(f"{op}: logits must be float32, bfloat16 or float16, got {logits.dtype}.")
    batch, num_classes, num_pixels = logits.shape
    if not 1 <= num_classes <= K.DICE_MAX_CLASSES:
        raise ValueError(
            f"{op}: the number of classes (logits.shape[1]) must be in [1, {K.DICE_MAX_CLASSES}] for the Triton "
            f"kernel, got {num_classes}; use the reference backend."
        )
    if codes[K.DICE_CODE_TARGET_IS_LABELS]:
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
    if tuple(params.shape) != (K.DICE_PARAM_ROWS, num_classes) or not params.dtype.is_floating_point \
            or params.stride(1) != 1:
        raise ValueError(f"{op}: params must be a float tensor of shape ({K.DICE_PARAM_ROWS}, C) = "
                         f"({K.DICE_PARAM_ROWS}, {num_classes}) with unit class stride, got {params.dtype} of shape "
                         f"{tuple(params.shape)}.")
    activation, mask_mode = codes[K.DICE_CODE_ACTIVATION], codes[K.DICE_CODE_MASK_MODE]
    if activation not in (K.ACTIVATION_NONE, K.ACTIVATION_SOFTMAX, K.ACTIVATION_SIGMOID):
        raise ValueError(f"{op}: activation must be 0 (none), 1 (softmax) or 2 (sigmoid), got {activation}.")
    if mask_mode not in (K.MASK_NONE, K.MASK_LABEL, K.MASK_CHANNEL, K.MASK_SENTINEL):
        raise ValueError(f"{op}: mask_mode must be 0, 1, 2 or 3, got {mask_mode}.")
    ignore_index = codes[K.DICE_CODE_IGNORE_INDEX]
    if mask_mode == K.MASK_CHANNEL and not codes[K.DICE_CODE_TARGET_IS_LABELS] and not 0 <= ignore_index < num_classes:
        raise ValueError(f"{op}: mask_mode 2 (w = 1 - y[:, ignore_index]) needs 0 <= ignore_index < C = "
                         f"{num_classes}, got {ignore_index}.")
    if codes[K.DICE_CODE_DROP_BACKGROUND] and num_classes < 2:
        raise ValueError(f"{op}: drop_background needs C >= 2, got {num_classes}.")
    if codes[K.DICE_CODE_FOCAL] and codes[K.DICE_CODE_HEAD] != K.HEAD_NONE \
            and codes[K.DICE_CODE_REDUCTION] == K.REDUCTION_NONE:
        raise ValueError(f"{op}: reduction 'none' with a Dice head and a focal term is not an op output (a Dice "
                         "value per class plus a focal map); the front end runs the reference for it.")
    for name, tensor in tensors.items():
        if tensor.device != logits.device:
            raise ValueError(f"{op}: {name} is on {tensor.device}, the logits on {logits.device}.")


def _layout(logits: torch.Tensor, target: torch.Tensor, codes: list[int], *others: torch.Tensor):
    """(block_c, block_s, programs, pixels_per_program, target class stride, int64 offsets) of a launch."""
    batch, num_classes, num_pixels = logits.shape
    block_c, block_s, programs, pixels_per_program = _launch_sizes(batch, num_classes, num_pixels)
    target_stride_c = 0 if codes[K.DICE_CODE_TARGET_IS_LABELS] else target.stride(1)
    strides = [(logits.stride(1), logits.stride(2)), (target_stride_c, target.stride(-1))]
    strides += [(t.stride(1), t.stride(2)) for t in others]
    int64_offsets = _needs_int64(programs * pixels_per_program, block_c, *strides)
    return block_c, block_s, programs, pixels_per_program, target_stride_c, int64_offsets


def _kernel_flags(codes: list[int]) -> dict:
    return {
        "ACTIVATION": codes[K.DICE_CODE_ACTIVATION],
        "TARGET_IS_LABELS": bool(codes[K.DICE_CODE_TARGET_IS_LABELS]),
        "MASK_MODE": codes[K.DICE_CODE_MASK_MODE],
        "SQUARED": bool(codes[K.DICE_CODE_SQUARED]),
        "WITH_CE": bool(codes[K.DICE_CODE_WITH_CE]),
        "FOCAL": codes[K.DICE_CODE_FOCAL],
        "ALPHA": codes[K.DICE_CODE_FOCAL_ALPHA],
        "DROP": codes[K.DICE_CODE_DROP_BACKGROUND],
    }


def _focal_map(codes: list[int]) -> bool:
    """FocalLoss's reduction "none": the loss is the focal term's (B, C', S) map, written by the partials kernel."""
    return codes[K.DICE_CODE_HEAD] == K.HEAD_NONE and codes[K.DICE_CODE_REDUCTION] == K.REDUCTION_NONE


def _forward(logits, target, params, codes, scalars, loss, coef, sums_only: bool) -> None:
    """Launch the partials and the finalize kernels into ``loss`` and ``coef`` (see _dice_finalize_kernel)."""
    batch, num_classes, num_pixels = logits.shape
    block_c, block_s, programs, pixels_per_program, target_stride_c, int64_offsets = _layout(logits, target, codes)
    sums_partial = logits.new_empty((batch, programs, num_classes, K.DICE_NUM_SUMS), dtype=torch.float32)
    extras_partial = logits.new_empty((batch, programs, K.DICE_NUM_EXTRAS), dtype=torch.float32)
    block_p = max(1, _FINALIZE_TILE // block_c)
    focal_map = not sums_only and _focal_map(codes)
    map_arg = loss if focal_map else sums_partial  # never written without FOCAL_MAP
    with on_device(sums_partial):
        # An empty batch launches no partials; the finalize still gives its loss (NaN for a mean over nothing, as
        # the reference's mean of an empty tensor; 0 for a sum, and batch Dice of zero sums).
        if batch > 0:
            wrap_triton(_dice_partials_kernel)[(batch, programs)](
                sums_partial,
                extras_partial,
                map_arg,
                logits,
                target,
                params,
                num_classes,
                num_pixels,
                pixels_per_program,
                codes[K.DICE_CODE_IGNORE_INDEX],
                scalars[K.DICE_SCALAR_LABEL_SMOOTHING],
                scalars[K.DICE_SCALAR_FOCAL_GAMMA],
                scalars[K.DICE_SCALAR_FOCAL_ALPHA],
                params.stride(0),
                map_arg.stride(0) if focal_map else 0,
                map_arg.stride(1) if focal_map else 0,
                logits.stride(0),
                logits.stride(1),
                logits.stride(2),
                target.stride(0),
                target_stride_c,
                target.stride(-1),
                sums_partial.stride(0),
                sums_partial.stride(1),
                extras_partial.stride(0),
                extras_partial.stride(1),
                FOCAL_MAP=focal_map,
                INT64_OFFSETS=int64_offsets,
                BLOCK_C=block_c,
                BLOCK_S=block_s,
                num_warps=4,
                **_kernel_flags(codes),
            )
        wrap_triton(_dice_finalize_kernel)[(1,)](
            loss,
            coef,
            sums_partial,
            extras_partial,
            params,
            batch,
            num_classes,
            programs,
            scalars[K.DICE_SCALAR_SMOOTH_NR],
            scalars[K.DICE_SCALAR_SMOOTH_DR],
            scalars[K.DICE_SCALAR_ALPHA],
            scalars[K.DICE_SCALAR_BETA],
            scalars[K.DICE_SCALAR_LAMBDA_DICE],
            scalars[K.DICE_SCALAR_LAMBDA_CE],
            scalars[K.DICE_SCALAR_LAMBDA_FOCAL],
            sums_partial.stride(0),
            sums_partial.stride(1),
            extras_partial.stride(0),
            extras_partial.stride(1),
            params.stride(0),
            0 if sums_only else coef.stride(0),
            0 if sums_only else coef.stride(1),
            SUMS_ONLY=sums_only,
            HEAD=codes[K.DICE_CODE_HEAD],
            DROP=codes[K.DICE_CODE_DROP_BACKGROUND],
            BATCH=bool(codes[K.DICE_CODE_BATCH]),
            REDUCTION=codes[K.DICE_CODE_REDUCTION],
            JACCARD=bool(codes[K.DICE_CODE_JACCARD]),
            SOFT=bool(codes[K.DICE_CODE_SOFT_INTERSECTION]),
            W_TYPE=codes[K.DICE_CODE_W_TYPE],
            HAS_WEIGHT=bool(codes[K.DICE_CODE_HAS_WEIGHT]),
            WITH_CE=bool(codes[K.DICE_CODE_WITH_CE]),
            FOCAL=codes[K.DICE_CODE_FOCAL],
            FOCAL_MASK=bool(codes[K.DICE_CODE_FOCAL_MASK]),
            BLOCK_C=block_c,
            BLOCK_P=block_p,
            num_warps=4,
        )


def _backward(grad_logits, coef, grad_loss, grad_extras, logits, target, params, codes, scalars, coef_strides,
              loss_strides, scaled: bool) -> None:
    batch, num_classes, num_pixels = logits.shape
    block_c, block_s, programs, pixels_per_program, target_stride_c, int64_offsets = _layout(
        logits, target, codes, grad_logits)
    with on_device(grad_logits):
        wrap_triton(_dice_bwd_kernel)[(batch, programs)](
            grad_logits,
            coef,
            grad_loss,
            grad_extras,
            logits,
            target,
            params,
            num_classes,
            num_pixels,
            pixels_per_program,
            codes[K.DICE_CODE_IGNORE_INDEX],
            scalars[K.DICE_SCALAR_LABEL_SMOOTHING],
            scalars[K.DICE_SCALAR_FOCAL_GAMMA],
            scalars[K.DICE_SCALAR_FOCAL_ALPHA],
            num_classes,
            grad_logits.stride(0),
            grad_logits.stride(1),
            grad_logits.stride(2),
            *coef_strides,
            *loss_strides,
            grad_extras.stride(0),
            params.stride(0),
            logits.stride(0),
            logits.stride(1),
            logits.stride(2),
            target.stride(0),
            target_stride_c,
            target.stride(-1),
            SCALED=scaled,
            FOCAL_MAP=scaled and _focal_map(codes),
            INT64_OFFSETS=int64_offsets,
            BLOCK_C=block_c,
            BLOCK_S=block_s,
            num_warps=4,
            **_kernel_flags(codes),
        )


# ------------------------------------------------------------------------------------------------------------ ops


@triton_op("torch_medloss::dice_sums_fwd_triton", mutates_args=())
def dice_sums_fwd_triton(logits: torch.Tensor, target: torch.Tensor, params: torch.Tensor, codes: list[int],
                         scalars: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums (B, C, 5), extras (B, 4)) in float32, as reference.dice_sums.dice_sums_fwd: two launches."""
    _check("torch_medloss::dice_sums_fwd_triton", logits, target, params, codes, scalars,
           {"target": target, "params": params})
    batch, num_classes, _ = logits.shape
    sums = logits.new_empty((batch, num_classes, K.DICE_NUM_SUMS), dtype=torch.float32)
    extras = logits.new_empty((batch, K.DICE_NUM_EXTRAS), dtype=torch.float32)
    if logits.numel() == 0:
        return sums.zero_(), extras.zero_()
    _forward(logits, target, params, codes, scalars, sums, extras, sums_only=True)
    return sums, extras


@triton_op("torch_medloss::dice_sums_bwd_triton", mutates_args=())
def dice_sums_bwd_triton(grad_sums: torch.Tensor, grad_extras: torch.Tensor, logits: torch.Tensor,
                         target: torch.Tensor, params: torch.Tensor, codes: list[int],
                         scalars: list[float]) -> torch.Tensor:
    """d(<grad_sums, sums> + <grad_extras, extras>)/d(logits) in the logits' dtype and layout: one launch."""
    op = "torch_medloss::dice_sums_bwd_triton"
    _check(op, logits, target, params, codes, scalars,
           {"target": target, "params": params, "grad_sums": grad_sums, "grad_extras": grad_extras})
    batch, num_classes, _ = logits.shape
    for name, grad, shape in (("grad_sums", grad_sums, (batch, num_classes, K.DICE_NUM_SUMS)),
                              ("grad_extras", grad_extras, (batch, K.DICE_NUM_EXTRAS))):
        if tuple(grad.shape) != shape or not grad.dtype.is_floating_point:
            raise ValueError(f"{op}: {name} must be a float tensor of shape {shape}, got {grad.dtype} of shape "
                             f"{tuple(grad.shape)}.")
    # empty_like keeps the strides of a dense layout (a channels_last-derived (S*C, 1, C) view stays so), which makes
    # the gradient stores as coalesced as the logits loads.
    grad_logits = torch.empty_like(logits)
    if logits.numel() == 0:
        return grad_logits
    _backward(grad_logits, grad_sums, grad_sums, grad_extras, logits, target, params, codes, scalars,
              (grad_sums.stride(0), grad_sums.stride(1), grad_sums.stride(2)), (0, 0, 0), scaled=False)
    return grad_logits


@triton_op("torch_medloss::dice_loss_fwd_triton", mutates_args=())
def dice_loss_fwd_triton(logits: torch.Tensor, target: torch.Tensor, params: torch.Tensor, codes: list[int],
                         scalars: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, coefficients): the loss of the codes' head (shape _contract.dice_loss_shape, float32) and the
    coefficients (B, 5, C + 1) its backward reads. Two launches."""
    _check("torch_medloss::dice_loss_fwd_triton", logits, target, params, codes, scalars,
           {"target": target, "params": params})
    batch, num_classes, num_pixels = logits.shape
    loss = logits.new_empty(K.dice_loss_shape(batch, num_classes, codes, num_pixels), dtype=torch.float32)
    coef = logits.new_empty((batch, K.DICE_NUM_SUMS, num_classes + 1), dtype=torch.float32)
    # An empty image or batch still has a loss (of zero sums, or NaN for the mean over no image), so the kernels run.
    _forward(logits, target, params, codes, scalars, loss, coef, sums_only=False)
    return loss, coef


@triton_op("torch_medloss::dice_loss_bwd_triton", mutates_args=())
def dice_loss_bwd_triton(grad_loss: torch.Tensor, coefficients: torch.Tensor, logits: torch.Tensor,
                         target: torch.Tensor, params: torch.Tensor, codes: list[int],
                         scalars: list[float]) -> torch.Tensor:
    """The logits' gradient from the loss's upstream gradient and the forward's coefficients: one launch."""
    op = "torch_medloss::dice_loss_bwd_triton"
    _check(op, logits, target, params, codes, scalars,
           {"target": target, "params": params, "grad_loss": grad_loss, "coefficients": coefficients})
    batch, num_classes, num_pixels = logits.shape
    shape = K.dice_loss_shape(batch, num_classes, codes, num_pixels)
    if tuple(grad_loss.shape) != shape:
        raise ValueError(f"{op}: grad_loss must have the loss's shape {shape}, got {tuple(grad_loss.shape)}.")
    grad_logits = torch.empty_like(logits)
    if logits.numel() == 0:
        return grad_logits
    # The upstream gradient's (image, class, pixel) strides: stride 0 along what the loss does not have (the images
    # with batch, the classes of generalized Dice, all of them for a scalar loss).
    image_stride = grad_loss.stride(0) if len(shape) >= 2 else 0
    per_class = len(shape) > 0 and codes[K.DICE_CODE_HEAD] != K.HEAD_GENERALIZED
    class_stride = (grad_loss.stride(1) if len(shape) == 3 else grad_loss.stride(-1)) if per_class else 0
    loss_strides = (image_stride, class_stride, grad_loss.stride(2) if len(shape) == 3 else 0)
    coef_strides = (coefficients.stride(0), coefficients.stride(2), coefficients.stride(1))
    _backward(grad_logits, coefficients, grad_loss, coefficients, logits, target, params, codes, scalars,
              coef_strides, loss_strides, scaled=True)
    return grad_logits
