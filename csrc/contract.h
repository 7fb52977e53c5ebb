// The contract constants of the fused ops for C++ and CUDA, defined once here (Python's are in
// torch_medloss/_contract.py; tests/test_contract.py checks that the two agree, name by name). Every kernel file
// includes this header instead of spelling a code or a position itself.
#pragma once

#include <cstdint>

namespace torch_medloss {
namespace contract {

// ------------------------------------------------------------------------------------------------ Dice family
constexpr int64_t ACTIVATION_NONE = 0, ACTIVATION_SOFTMAX = 1, ACTIVATION_SIGMOID = 2;
constexpr int64_t MASK_NONE = 0, MASK_LABEL = 1, MASK_CHANNEL = 2, MASK_SENTINEL = 3;
constexpr int64_t HEAD_DICE = 0, HEAD_GENERALIZED = 1, HEAD_TVERSKY = 2, HEAD_NONE = 3;
constexpr int64_t REDUCTION_MEAN = 0, REDUCTION_SUM = 1, REDUCTION_NONE = 2;
constexpr int64_t W_TYPE_SQUARE = 0, W_TYPE_SIMPLE = 1, W_TYPE_UNIFORM = 2;
constexpr int64_t FOCAL_NONE = 0, FOCAL_SIGMOID = 1, FOCAL_SOFTMAX = 2;
constexpr int64_t ALPHA_NONE = 0, ALPHA_SCALAR = 1, ALPHA_PER_CLASS = 2;

// positions in ``codes``
constexpr int64_t DICE_CODE_ACTIVATION = 0;
constexpr int64_t DICE_CODE_TARGET_IS_LABELS = 1;
constexpr int64_t DICE_CODE_IGNORE_INDEX = 2;
constexpr int64_t DICE_CODE_MASK_MODE = 3;
constexpr int64_t DICE_CODE_SQUARED = 4;
constexpr int64_t DICE_CODE_WITH_CE = 5;
constexpr int64_t DICE_CODE_HEAD = 6;
constexpr int64_t DICE_CODE_DROP_BACKGROUND = 7;
constexpr int64_t DICE_CODE_BATCH = 8;
constexpr int64_t DICE_CODE_REDUCTION = 9;
constexpr int64_t DICE_CODE_JACCARD = 10;
constexpr int64_t DICE_CODE_SOFT_INTERSECTION = 11;
constexpr int64_t DICE_CODE_W_TYPE = 12;
constexpr int64_t DICE_CODE_HAS_WEIGHT = 13;
constexpr int64_t DICE_CODE_FOCAL = 14;
constexpr int64_t DICE_CODE_FOCAL_ALPHA = 15;
constexpr int64_t DICE_CODE_FOCAL_MASK = 16;
constexpr int64_t DICE_NUM_CODES = 17;

// positions in ``scalars``
constexpr int64_t DICE_SCALAR_LABEL_SMOOTHING = 0;
constexpr int64_t DICE_SCALAR_SMOOTH_NR = 1;
constexpr int64_t DICE_SCALAR_SMOOTH_DR = 2;
constexpr int64_t DICE_SCALAR_ALPHA = 3;
constexpr int64_t DICE_SCALAR_BETA = 4;
constexpr int64_t DICE_SCALAR_LAMBDA_DICE = 5;
constexpr int64_t DICE_SCALAR_LAMBDA_CE = 6;
constexpr int64_t DICE_SCALAR_FOCAL_GAMMA = 7;
constexpr int64_t DICE_SCALAR_FOCAL_ALPHA = 8;
constexpr int64_t DICE_SCALAR_LAMBDA_FOCAL = 9;
constexpr int64_t DICE_NUM_SCALARS = 10;

// rows of ``params`` (DICE_PARAM_ROWS, C), by full class index
constexpr int64_t DICE_PARAM_GAMMA = 0;
constexpr int64_t DICE_PARAM_WEIGHT = 1;
constexpr int64_t DICE_PARAM_CE_WEIGHT = 2;
constexpr int64_t DICE_PARAM_FOCAL_ALPHA = 3;
constexpr int64_t DICE_PARAM_FOCAL_WEIGHT = 4;
constexpr int64_t DICE_PARAM_ROWS = 5;

// sums (B, C, DICE_NUM_SUMS), extras (B, DICE_NUM_EXTRAS); the coefficients (B, DICE_NUM_SUMS, C + 1) use the sums'
// row indices, and column C holds two scalars of image 0 in rows DICE_SLOT_*
constexpr int64_t DICE_SUM_I = 0, DICE_SUM_P = 1, DICE_SUM_G = 2, DICE_SUM_D = 3, DICE_SUM_F = 4;
constexpr int64_t DICE_NUM_SUMS = 5;
constexpr int64_t DICE_EXTRA_CE_NUM = 0, DICE_EXTRA_CE_DEN = 1, DICE_EXTRA_INVALID = 2, DICE_EXTRA_VALID = 3;
constexpr int64_t DICE_NUM_EXTRAS = 4;
constexpr int64_t DICE_SLOT_CE = 0, DICE_SLOT_POISON = 1;
constexpr int64_t DICE_MAX_CLASSES = 128;

// -------------------------------------------------------------------------------------------------------- DBCE
constexpr int64_t ELEMENT_BALL = 0, ELEMENT_CUBE = 1;
constexpr int64_t MAX_MASK_CLASSES = 64;
constexpr int64_t DBCE_CODE_ELEMENT = 0;
constexpr int64_t DBCE_CODE_BATCH = 1;
constexpr int64_t DBCE_CODE_REDUCTION = 2;
constexpr int64_t DBCE_CODE_IGNORE_INDEX = 3;
constexpr int64_t DBCE_NUM_CODES = 4;
constexpr int64_t DBCE_SCALAR_RADIUS = 0;
constexpr int64_t DBCE_SCALAR_SPACING = 1;
constexpr int64_t DBCE_NUM_SCALARS = 4;
constexpr int64_t DBCE_MAX_BOX_OFFSETS = 169;

}  // namespace contract
}  // namespace torch_medloss
