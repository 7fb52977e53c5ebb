// The Dice-family loss head, for the CPU and the CUDA kernels alike (host and device code): from the per-image sums
// (B, C, 5) and extras (B, 4) of the dice_sums contract to the loss of the codes' head and the coefficients
// (B, 5, C + 1) the backward reads (contract.h). The readable ground truth is loss_from_sums in
// torch_medloss/reference/dice_sums.py; the Triton kernels compute the same in _dice_finalize_kernel
// (kernels/dice_sums.py). Serial code: the CPU runs it once per call, the CUDA finalize kernel on one thread after
// the block has added the partial rows; both are O(B C) operations.
#pragma once

#include "contract.h"

#include <cmath>
#include <cstdint>
#include <limits>

#ifdef __CUDACC__
#define MEDLOSS_HD __host__ __device__
#else
#define MEDLOSS_HD
#endif

namespace torch_medloss {
namespace dice_head {

// NaN in host and device code alike (std::numeric_limits is host-only without --expt-relaxed-constexpr).
template <typename T>
MEDLOSS_HD inline T quiet_nan() {
#ifdef __CUDA_ARCH__
  return T(__longlong_as_double(0x7ff8000000000000ULL));
#else
  return std::numeric_limits<T>::quiet_NaN();
#endif
}

// Generalized Dice's class weight from the target volume G, in float32 (the reference's ``ground.float()``); +inf
// for an absent class (1/0), which the caller replaces.
MEDLOSS_HD inline float class_weight(float g, int64_t w_type) {
  return w_type == contract::W_TYPE_SQUARE ? 1.0f / (g * g) : w_type == contract::W_TYPE_SIMPLE ? 1.0f / g : 1.0f;
}

MEDLOSS_HD inline bool is_infinite(float w) {
  return w == HUGE_VALF;
}

// The options of the head, read once from ``codes`` and ``scalars``.
struct Options {
  int64_t head, drop, batch, reduction, jaccard, soft, w_type, has_weight, with_ce, focal, focal_mask;
  double smooth_nr, smooth_dr, alpha, beta, lambda_dice, lambda_ce, lambda_focal;
};

MEDLOSS_HD inline Options read_options(const int64_t* codes, const double* scalars) {
  using namespace contract;
  return Options{codes[DICE_CODE_HEAD], codes[DICE_CODE_DROP_BACKGROUND], codes[DICE_CODE_BATCH],
                 codes[DICE_CODE_REDUCTION], codes[DICE_CODE_JACCARD], codes[DICE_CODE_SOFT_INTERSECTION],
                 codes[DICE_CODE_W_TYPE], codes[DICE_CODE_HAS_WEIGHT], codes[DICE_CODE_WITH_CE],
                 codes[DICE_CODE_FOCAL], codes[DICE_CODE_FOCAL_MASK], scalars[DICE_SCALAR_SMOOTH_NR],
                 scalars[DICE_SCALAR_SMOOTH_DR], scalars[DICE_SCALAR_ALPHA], scalars[DICE_SCALAR_BETA],
                 scalars[DICE_SCALAR_LAMBDA_DICE], scalars[DICE_SCALAR_LAMBDA_CE], scalars[DICE_SCALAR_LAMBDA_FOCAL]};
}

// The loss's element count (contract.h: dice_loss_shape in _contract.py), for allocating it.
MEDLOSS_HD inline int64_t loss_numel(const Options& o, int64_t batch, int64_t classes, int64_t pixels) {
  if (o.reduction != contract::REDUCTION_NONE) return 1;
  const int64_t kept = classes - o.drop;
  if (o.head == contract::HEAD_NONE) return batch * kept * pixels;
  const int64_t per_unit = o.head == contract::HEAD_GENERALIZED ? 1 : kept;
  return o.batch ? per_unit : batch * per_unit;
}

// The scratch ``finish`` needs.
MEDLOSS_HD inline int64_t scratch_size(int64_t classes) {
  return classes * (contract::DICE_NUM_SUMS + 3);
}

// d f / d (I, P, D) of one class, and f, for the Dice and Tversky heads (reference.dice.dice_from_sums and
// tversky_from_sums). I' = I, or MONAI's soft-label intersection (P + G - D) / 2. G has no gradient.
template <typename T>
struct ClassTerms {
  T f, df_i, df_p, df_d;
};

template <typename T>
MEDLOSS_HD ClassTerms<T> class_head(T i, T p, T g, T d, const Options& o) {
  const T inter = o.soft ? (p + g - d) / T(2) : i;
  const T nr = T(o.smooth_nr), dr = T(o.smooth_dr);
  T f, df_inter, df_p;
  if (o.head == contract::HEAD_TVERSKY) {
    const T alpha = T(o.alpha), beta = T(o.beta);
    const T numerator = inter + nr;
    const T denominator = inter + alpha * (p - inter) + beta * (g - inter) + dr;
    f = T(1) - numerator / denominator;
    df_inter = -T(1) / denominator + numerator * (T(1) - alpha - beta) / (denominator * denominator);
    df_p = numerator * alpha / (denominator * denominator);
  } else {
    const T numerator = T(2) * inter + nr;
    const T denominator = (o.jaccard ? T(2) * (p + g - inter) : p + g) + dr;
    f = T(1) - numerator / denominator;
    df_inter = o.jaccard ? -T(2) / denominator - T(2) * numerator / (denominator * denominator)
                         : -T(2) / denominator;
    df_p = (o.jaccard ? T(2) : T(1)) * numerator / (denominator * denominator);
  }
  if (o.soft) return ClassTerms<T>{f, T(0), df_p + df_inter / T(2), -df_inter / T(2)};
  return ClassTerms<T>{f, df_inter, df_p, T(0)};
}

// Generalized Dice of one unit (reference.dice.generalized_dice_from_sums): writes d f / d (I, P, D) per class into
// the three coefficient rows (stride ``row``) and returns f. The weights 1/G^2, 1/G or 1 are computed in float32,
// as the reference's ``ground.float()``; an absent class takes the unit's largest finite weight.
template <typename T>
MEDLOSS_HD T generalized_head(const T* sums, int64_t classes, const Options& o, T* df_i, T* df_p, T* df_d,
                              int64_t stride) {
  using namespace contract;
  float largest = 0.0f;
  for (int64_t c = o.drop; c < classes; ++c) {
    const float w = class_weight(float(sums[c * DICE_NUM_SUMS + DICE_SUM_G]), o.w_type);
    if (!is_infinite(w) && w > largest) largest = w;
  }
  T numerator = T(0), denominator = T(0);
  for (int64_t c = o.drop; c < classes; ++c) {
    const T* s = sums + c * DICE_NUM_SUMS;
    float w = class_weight(float(s[DICE_SUM_G]), o.w_type);
    if (is_infinite(w)) w = largest;
    const T inter = o.soft ? (s[DICE_SUM_P] + s[DICE_SUM_G] - s[DICE_SUM_D]) / T(2) : s[DICE_SUM_I];
    numerator += inter * T(w);
    denominator += (s[DICE_SUM_P] + s[DICE_SUM_G]) * T(w);
  }
  numerator = T(2) * numerator + T(o.smooth_nr);
  denominator = denominator + T(o.smooth_dr);
  for (int64_t c = 0; c < classes; ++c) {
    T dinter = T(0), dp = T(0);
    if (c >= o.drop) {
      float w = class_weight(float(sums[c * DICE_NUM_SUMS + DICE_SUM_G]), o.w_type);
      if (is_infinite(w)) w = largest;
      dinter = -T(2) * T(w) / denominator;
      dp = numerator * T(w) / (denominator * denominator);
    }
    df_i[c * stride] = o.soft ? T(0) : dinter;
    df_p[c * stride] = o.soft ? dp + dinter / T(2) : dp;
    df_d[c * stride] = o.soft ? -dinter / T(2) : T(0);
  }
  return T(1) - numerator / denominator;
}

// The loss and the coefficients from the per-image sums (B, C, 5) and extras (B, 4), both contiguous. ``weight``:
// the Dice class weights by full class index (read with has_weight). ``loss``: contiguous, loss_numel elements
// (the focal map of HEAD_NONE with "none" is the caller's: only the coefficients are written then).
// ``coef``: (B, 5, C + 1) contiguous. ``unit_sums``: scratch of scratch_size(C) values (batch Dice's summed sums
// and its coefficients).
template <typename T>
MEDLOSS_HD void finish(const T* sums, const T* extras, const T* weight, int64_t batch, int64_t classes,
                       const Options& o, T* loss, T* coef, T* unit_sums) {
  using namespace contract;
  const T nan = quiet_nan<T>();
  const int64_t width = classes + 1;  // a coefficient row: C classes and the scalar column
  const int64_t row = width;
  const int64_t image_stride = DICE_NUM_SUMS * width;
  const bool mean = o.reduction == REDUCTION_MEAN, none = o.reduction == REDUCTION_NONE;
  const int64_t kept = classes - o.drop;

  // 1. the batch's totals: cross entropy, bad labels, valid pixels.
  T ce_num = T(0), ce_den = T(0), invalid = T(0), valid = T(0);
  for (int64_t b = 0; b < batch; ++b) {
    ce_num += extras[b * DICE_NUM_EXTRAS + DICE_EXTRA_CE_NUM];
    ce_den += extras[b * DICE_NUM_EXTRAS + DICE_EXTRA_CE_DEN];
    invalid += extras[b * DICE_NUM_EXTRAS + DICE_EXTRA_INVALID];
    valid += extras[b * DICE_NUM_EXTRAS + DICE_EXTRA_VALID];
  }
  const T poison = invalid > T(0) ? nan : T(0);
  const T eps = T(1.1920928955078125e-07);  // MONAI clamps the focal term's valid count at float32's eps
  const T focal_count = o.focal_mask ? (valid > eps ? valid : eps) : valid * T(kept);
  const T count = T((o.batch ? 1 : batch) * (o.head == HEAD_GENERALIZED ? 1 : kept));
  const T scale = mean ? T(o.lambda_dice) / count : T(o.lambda_dice);

  // 2. per image: the focal coefficients and, without batch, the Dice head.
  T total = T(0), focal_total = T(0);
  for (int64_t b = 0; b < batch; ++b) {
    const T* s = sums + b * classes * DICE_NUM_SUMS;
    T* cb = coef + b * image_stride;
    T focal_den = T(1);
    if (o.focal != FOCAL_NONE && !none) {
      if (mean) {
        focal_den = focal_count;
      } else {
        const T v = extras[b * DICE_NUM_EXTRAS + DICE_EXTRA_VALID];
        focal_den = o.focal_mask ? (v > eps ? v : eps) : v;
      }
    }
    for (int64_t c = 0; c < classes; ++c) {
      const bool is_kept = c >= o.drop;
      if (o.focal != FOCAL_NONE && !none && is_kept) focal_total += s[c * DICE_NUM_SUMS + DICE_SUM_F] / focal_den;
      cb[DICE_SUM_F * row + c] = is_kept ? (none || o.focal == FOCAL_NONE ? T(1) : T(o.lambda_focal) / focal_den)
                                         : T(0);
      cb[DICE_SUM_G * row + c] = T(0);
      cb[DICE_SUM_I * row + c] = T(0);
      cb[DICE_SUM_P * row + c] = T(0);
      cb[DICE_SUM_D * row + c] = T(0);
    }
    if (o.head == HEAD_NONE || o.batch) continue;
    if (o.head == HEAD_GENERALIZED) {
      const T f = generalized_head(s, classes, o, cb + DICE_SUM_I * row, cb + DICE_SUM_P * row,
                                   cb + DICE_SUM_D * row, int64_t{1});
      total += f;
      if (none) loss[b] = f + poison;
    } else {
      for (int64_t c = o.drop; c < classes; ++c) {
        const T* sc = s + c * DICE_NUM_SUMS;
        const ClassTerms<T> t = class_head(sc[DICE_SUM_I], sc[DICE_SUM_P], sc[DICE_SUM_G], sc[DICE_SUM_D], o);
        const T w = o.has_weight ? weight[c] : T(1);
        total += t.f * w;
        if (none) loss[b * kept + c - o.drop] = t.f * w + poison;
        cb[DICE_SUM_I * row + c] = t.df_i * w;
        cb[DICE_SUM_P * row + c] = t.df_p * w;
        cb[DICE_SUM_D * row + c] = t.df_d * w;
      }
    }
    for (int64_t c = 0; c < classes; ++c) {  // the mean's 1 / count and lambda_dice, once
      cb[DICE_SUM_I * row + c] *= scale;
      cb[DICE_SUM_P * row + c] *= scale;
      cb[DICE_SUM_D * row + c] *= scale;
    }
  }

  // 3. batch Dice: the sums over the images, one head, the same coefficients for every image (with an empty batch,
  //    the head of zero sums, as the reference's sums over no image).
  if (o.head != HEAD_NONE && o.batch) {
    T* unit_coef = unit_sums + classes * DICE_NUM_SUMS;  // rows I, P, D of the unit, C values each
    for (int64_t k = 0; k < classes * DICE_NUM_SUMS; ++k) unit_sums[k] = T(0);
    for (int64_t k = 0; k < 3 * classes; ++k) unit_coef[k] = T(0);
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t k = 0; k < classes * DICE_NUM_SUMS; ++k) unit_sums[k] += sums[b * classes * DICE_NUM_SUMS + k];
    }
    if (o.head == HEAD_GENERALIZED) {
      const T f = generalized_head(unit_sums, classes, o, unit_coef, unit_coef + classes, unit_coef + 2 * classes,
                                   int64_t{1});
      total += f;
      if (none) loss[0] = f + poison;
    } else {
      for (int64_t c = o.drop; c < classes; ++c) {
        const T* sc = unit_sums + c * DICE_NUM_SUMS;
        const ClassTerms<T> t = class_head(sc[DICE_SUM_I], sc[DICE_SUM_P], sc[DICE_SUM_G], sc[DICE_SUM_D], o);
        const T w = o.has_weight ? weight[c] : T(1);
        total += t.f * w;
        if (none) loss[c - o.drop] = t.f * w + poison;
        unit_coef[c] = t.df_i * w;
        unit_coef[classes + c] = t.df_p * w;
        unit_coef[2 * classes + c] = t.df_d * w;
      }
    }
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t c = 0; c < classes; ++c) {
        coef[b * image_stride + DICE_SUM_I * row + c] = unit_coef[c] * scale;
        coef[b * image_stride + DICE_SUM_P * row + c] = unit_coef[classes + c] * scale;
        coef[b * image_stride + DICE_SUM_D * row + c] = unit_coef[2 * classes + c] * scale;
      }
    }
  }

  // 4. the loss value, the cross entropy's coefficient and the poison (column C of image 0; the rest of column C is
  //    0, so that every element of the coefficients is defined: they are an op output, compared by opcheck).
  T ce_coefficient = T(0);
  if (!none) {
    T value = total * scale;
    if (o.with_ce) {
      value += mean ? T(o.lambda_ce) * (ce_num / ce_den) : T(o.lambda_ce) * ce_num;
      ce_coefficient = mean ? T(o.lambda_ce) / ce_den : T(o.lambda_ce);
    }
    if (o.focal != FOCAL_NONE) value += T(o.lambda_focal) * focal_total;
    loss[0] = value + poison;
  }
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t k = 0; k < DICE_NUM_SUMS; ++k) coef[b * image_stride + k * row + classes] = T(0);
  }
  if (batch > 0) {
    coef[DICE_SLOT_CE * row + classes] = ce_coefficient;
    coef[DICE_SLOT_POISON * row + classes] = poison;
  }
}

}  // namespace dice_head
}  // namespace torch_medloss
