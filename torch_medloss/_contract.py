"""The contract constants of the fused ops, defined once for Python (the references, the op layer and the Triton
kernels import them from here). C++ and CUDA define them once in csrc/contract.h; tests/test_contract.py checks
that the two definitions agree.

Nothing here imports torch: the Triton kernel modules read these as plain ints (``tl.constexpr`` values).

The Dice-family ops (``dice_sums_fwd``/``_bwd`` and ``dice_loss_fwd``/``_bwd``, all backends) take their options as
two lists, ``codes`` (ints) and ``scalars`` (floats), whose positions are the ``DICE_CODE_*`` and ``DICE_SCALAR_*``
indices below, and a ``params`` tensor (DICE_PARAM_ROWS, C) of per-class values (rows ``DICE_PARAM_*``). One list
layout instead of a dozen named arguments: every layer passes the lists through untouched, and only the two ends
(``torch_medloss.functional``, which builds them, and the kernels, which read them) know what is in them.
"""

# ------------------------------------------------------------------------------------------------ Dice family
# activation applied to the logits before the Dice sums
ACTIVATION_NONE, ACTIVATION_SOFTMAX, ACTIVATION_SIGMOID = 0, 1, 2
# which pixels count (w): none masked; label == ignore_index (label maps); MONAI's one-hot masks: 1 - y[ignore_index]
# when ignore_index is a channel, or "the one-hot vector is not all zero" for a sentinel ignore_index.
MASK_NONE, MASK_LABEL, MASK_CHANNEL, MASK_SENTINEL = 0, 1, 2, 3
# the loss computed from the sums: MONAI's Dice (also PM Dice), generalized Dice, Tversky, or none (FocalLoss: the
# focal term alone)
HEAD_DICE, HEAD_GENERALIZED, HEAD_TVERSKY, HEAD_NONE = 0, 1, 2, 3
REDUCTION_MEAN, REDUCTION_SUM, REDUCTION_NONE = 0, 1, 2
# generalized Dice class weights: 1/G^2, 1/G, 1
W_TYPE_SQUARE, W_TYPE_SIMPLE, W_TYPE_UNIFORM = 0, 1, 2
# MONAI's focal term on the raw logits: none, the sigmoid (binary) form, the softmax form over the kept classes
FOCAL_NONE, FOCAL_SIGMOID, FOCAL_SOFTMAX = 0, 1, 2
# the focal term's alpha: none; a scalar (sigmoid: t alpha + (1 - t)(1 - alpha); softmax: 1 - alpha for the first
# kept class, alpha for the others); one per class (sigmoid: on positives only, t == 1; softmax: per class)
ALPHA_NONE, ALPHA_SCALAR, ALPHA_PER_CLASS = 0, 1, 2

# positions in ``codes``
DICE_CODE_ACTIVATION = 0
DICE_CODE_TARGET_IS_LABELS = 1  # 1: target is a (B, S) label map; 0: a dense (B, C, S) float target
DICE_CODE_IGNORE_INDEX = 2  # read by MASK_LABEL and MASK_CHANNEL
DICE_CODE_MASK_MODE = 3
DICE_CODE_SQUARED = 4  # k = 2 in P and G
DICE_CODE_WITH_CE = 5  # also the cross entropy of the raw logits (Dice+CE)
DICE_CODE_HEAD = 6
DICE_CODE_DROP_BACKGROUND = 7  # the loss leaves class 0 out (include_background=False with C > 1)
DICE_CODE_BATCH = 8  # sums over the batch before the ratio
DICE_CODE_REDUCTION = 9
DICE_CODE_JACCARD = 10
DICE_CODE_SOFT_INTERSECTION = 11  # I = (P + G - D) / 2 (MONAI's soft_label with k = 1)
DICE_CODE_W_TYPE = 12
DICE_CODE_HAS_WEIGHT = 13  # multiply each class's loss by params[DICE_PARAM_WEIGHT]
DICE_CODE_FOCAL = 14  # FOCAL_*: also MONAI's focal term (FocalLoss, DiceFocalLoss, GeneralizedDiceFocalLoss)
DICE_CODE_FOCAL_ALPHA = 15  # ALPHA_*
DICE_CODE_FOCAL_MASK = 16  # MONAI's ignore mask is on (ignore_index set): the focal mean divides by valid pixels
DICE_NUM_CODES = 17

# positions in ``scalars``
DICE_SCALAR_LABEL_SMOOTHING = 0
DICE_SCALAR_SMOOTH_NR = 1
DICE_SCALAR_SMOOTH_DR = 2
DICE_SCALAR_ALPHA = 3  # Tversky
DICE_SCALAR_BETA = 4  # Tversky
DICE_SCALAR_LAMBDA_DICE = 5
DICE_SCALAR_LAMBDA_CE = 6
DICE_SCALAR_FOCAL_GAMMA = 7
DICE_SCALAR_FOCAL_ALPHA = 8  # with ALPHA_SCALAR
DICE_SCALAR_LAMBDA_FOCAL = 9
DICE_NUM_SCALARS = 10

# rows of ``params`` (DICE_PARAM_ROWS, C), indexed by the full class index c (class 0 included)
DICE_PARAM_GAMMA = 0  # PM Dice modulator exponent (0: m = 1)
DICE_PARAM_WEIGHT = 1  # the Dice class weights (HAS_WEIGHT)
DICE_PARAM_CE_WEIGHT = 2  # the cross-entropy class weights (1 without weights)
DICE_PARAM_FOCAL_ALPHA = 3  # with ALPHA_PER_CLASS
DICE_PARAM_FOCAL_WEIGHT = 4  # the focal term's class weights (1 without weights)
DICE_PARAM_ROWS = 5

# the dice_sums ops' outputs: sums (B, C, DICE_NUM_SUMS) and extras (B, DICE_NUM_EXTRAS)
DICE_SUM_I, DICE_SUM_P, DICE_SUM_G, DICE_SUM_D, DICE_SUM_F = 0, 1, 2, 3, 4  # F: the focal term's sum over pixels
DICE_NUM_SUMS = 5
DICE_EXTRA_CE_NUM, DICE_EXTRA_CE_DEN, DICE_EXTRA_INVALID, DICE_EXTRA_VALID = 0, 1, 2, 3  # VALID: sum of w
DICE_NUM_EXTRAS = 4
# the dice_loss ops' coefficients (B or 1, DICE_NUM_SUMS, C + 1): d loss / d (I, P, D, F) per class in the rows of
# the same index as the sums (G has no gradient: its row is 0), so the backward kernels read either layout with the
# same row indices; column C holds two scalars of the first image: d loss / d ce_num (row DICE_SLOT_CE) and the
# poison, 0 or NaN for a bad label (row DICE_SLOT_POISON).
DICE_SLOT_CE, DICE_SLOT_POISON = 0, 1
# the fused kernels keep a pixel's classes in registers; past this many classes the reference runs instead
DICE_MAX_CLASSES = 128


def dice_loss_shape(batch_size: int, num_classes: int, codes, num_pixels: int = 0) -> tuple[int, ...]:
    """The shape of the dice_loss op's loss: () for mean/sum; for "none", (B, C') or (C',) with batch for Dice and
    Tversky (C' the kept classes), (B, 1) or (1,) for generalized Dice, the (B, C', S) map of the focal term alone
    (HEAD_NONE)."""
    if codes[DICE_CODE_REDUCTION] != REDUCTION_NONE:
        return ()
    kept = num_classes - codes[DICE_CODE_DROP_BACKGROUND]
    if codes[DICE_CODE_HEAD] == HEAD_NONE:
        return (batch_size, kept, num_pixels)
    per_unit = (1,) if codes[DICE_CODE_HEAD] == HEAD_GENERALIZED else (kept,)
    return per_unit if codes[DICE_CODE_BATCH] else (batch_size, *per_unit)


# ------------------------------------------------------------------------------------------------------- DBCE
# the structuring element
ELEMENT_BALL, ELEMENT_CUBE = 0, 1
# class masks: one bit per class, in the narrowest integer dtype that holds C bits
MAX_MASK_CLASSES = 64

# positions in the dbce_loss ops' ``codes`` and ``scalars``
DBCE_CODE_ELEMENT = 0
DBCE_CODE_BATCH = 1  # class weights from the whole batch instead of each image
DBCE_CODE_REDUCTION = 2  # REDUCTION_*: "none" gives the (B, S) map w * CE
DBCE_CODE_IGNORE_INDEX = 3
DBCE_NUM_CODES = 4
DBCE_SCALAR_RADIUS = 0
DBCE_SCALAR_SPACING = 1  # three values from here: the voxel size along D, H, W
DBCE_NUM_SCALARS = 4
# Offsets of the element's first pass, which walks two axes at once (a disk or a rectangle) when their window has
# at most this many offsets; beyond, each axis takes a pass of its own (one more launch).
DBCE_MAX_BOX_OFFSETS = 169


def dbce_loss_shape(batch_size: int, num_pixels: int, codes) -> tuple[int, ...]:
    """The dbce_loss op's loss: () for mean/sum, the (B, S) map for "none"."""
    return (batch_size, num_pixels) if codes[DBCE_CODE_REDUCTION] == REDUCTION_NONE else ()


# ------------------------------------------------------------------------------------------------ denoising ops
# concat_conv2d and frequency_split: Python only (no C++ kernels, so csrc/contract.h has no counterpart). Read by
# the front ends (torch_medloss.functional), the ops (torch_medloss.ops), the references and the Triton kernels.

# concat_conv2d: at most this many inputs (the Triton kernels have one pointer slot per input), and the K of the
# K x K kernels they take.
CONCAT_CONV_MAX_INPUTS = 8
CONCAT_CONV_KERNEL_SIZES = (1, 3)

# frequency_split: at or below this sigma every off-centre tap exp(-k^2 / (2 sigma^2)) <= exp(-1250) is 0 in float64
# (and in every narrower dtype), so the taps are exactly [0, 1, 0] (r = 1) and low = x. The taps of such a sigma are
# computed at FREQUENCY_SPLIT_IDENTITY_SIGMA itself, which gives those same taps bit for bit: below ~1e-162 sigma^2
# underflows to 0 and the centre tap would be exp(-0 / 0) = NaN. The reference and the Triton kernels both clamp.
FREQUENCY_SPLIT_IDENTITY_SIGMA = 0.02
# Largest r = ceil(3 sigma) the Triton kernels take (sigma <= 16 / 3): windows of 64 pixels, 32 interior. Past it
# the 128-pixel windows spill heavily on sm_90 (ptxas: 12 KB forward, 39 KB backward per thread at r = 32, local
# memory a driver may reserve by the GB), so larger radii run the reference (a fusion blocker).
FREQUENCY_SPLIT_TRITON_MAX_RADIUS = 16
