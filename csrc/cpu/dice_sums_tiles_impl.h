// The Dice tile functions (the per-tile math of dice_sums_kernel.cpp, whose header comment describes it), written
// once as always-inline code. Each dice_sums_isa_<isa>.cpp defines MEDLOSS_TILE_TARGET (the target attribute of
// its entry points, empty for the baseline), includes this file once, and exports the table make_tile_kernels()
// fills. Everything here is in an anonymous namespace: each instruction set's copy stays in its own file.
#pragma once

#ifndef MEDLOSS_TILE_TARGET
#error "define MEDLOSS_TILE_TARGET (the entry points' target attribute) before including dice_sums_tiles_impl.h"
#endif

#include "dice_sums_tiles.h"
#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace torch_medloss {
namespace dice_sums_cpu {
namespace {

// The modulator m = |p' - y'|^gamma of a class row, by gamma: 0 (m = 1, no pow, as the contract says), 1, 2, other.
constexpr int kModOne = 0, kModAbs = 1, kModSquare = 2, kModPow = 3;

// base^exponent for base >= 0 (or NaN). In float32, exp(exponent * log(base)): pow(0, g > 0) = 0 through
// log(0) = -inf. Its error grows with |exponent * log(base)| (the rounding of that product is magnified by exp):
// over base in [1e-4, 1], 2.6 ulp on average and 21 at most for gamma = 1.5, 5.3 and 43 for gamma = 3.25 (a
// relative 5e-6 on a modulator of 4e-13, a weight).
template <typename acc_t>
MEDLOSS_INLINE acc_t pow_acc(acc_t base, acc_t exponent) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return exp_f32(exponent * log_f32(base));
  } else {
    return std::pow(base, exponent);
  }
}

template <typename acc_t>
MEDLOSS_INLINE acc_t sigmoid_acc(acc_t x) {
  return acc_t(1) / (acc_t(1) + exp_acc(-x));
}

template <int kMod, typename acc_t>
MEDLOSS_INLINE acc_t modulator(acc_t diff, acc_t abs_diff, acc_t gamma) {
  if constexpr (kMod == kModOne) {
    return acc_t(1);
  } else if constexpr (kMod == kModAbs) {
    return abs_diff;
  } else if constexpr (kMod == kModSquare) {
    return diff * diff;
  } else {
    return pow_acc(abs_diff, gamma);
  }
}

int modulator_kind(double gamma) {
  return gamma == 0.0 ? kModOne : gamma == 1.0 ? kModAbs : gamma == 2.0 ? kModSquare : kModPow;
}

// --------------------------------------------------------------------------------------------- gather and scatter

// float32 to the bits of a bfloat16: round to nearest even, NaN to 0x7fc0 (as c10::BFloat16(float)), written so that
// it vectorises.
MEDLOSS_INLINE uint16_t bfloat16_bits(float value) {
  const uint32_t bits = bits_of(value);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(value != value ? 0x7fc0u : rounded);
}

// float32 to the bits of an IEEE half: round to nearest even, overflow to infinity, NaN to a quiet NaN of the same
// sign (as c10::Half(float)), written so that it vectorises.
MEDLOSS_INLINE uint16_t half_bits(float value) {
  const uint32_t bits = bits_of(value);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t magnitude = bits & 0x7fffffffu;
  // Normal halves (|x| >= 2^-14): the exponent rebiased from 127 to 15, the 13 dropped mantissa bits rounded (a
  // carry into the exponent is the right result).
  const uint32_t rebiased = magnitude - 0x38000000u;
  const uint32_t normal = (rebiased + 0x0fffu + ((rebiased >> 13) & 1u)) >> 13;
  // Subnormal halves: |x| / 2^-24 rounded, by adding 0.5 (whose ulp is 2^-24) and reading the mantissa.
  const uint32_t subnormal = bits_of(value_of<float>(magnitude) + 0.5f) - 0x3f000000u;
  uint32_t half = magnitude < 0x38800000u ? subnormal : normal;
  half = magnitude >= 0x477ff000u ? 0x7c00u : half;  // |x| >= 65520 rounds to infinity
  half = magnitude > 0x7f800000u ? 0x7e00u : half;   // NaN
  return static_cast<uint16_t>(sign | half);
}

template <typename scalar_t, typename acc_t>
MEDLOSS_INLINE void store_as(scalar_t* dst, acc_t value) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    const uint16_t bits = bfloat16_bits(value);
    std::memcpy(static_cast<void*>(dst), &bits, sizeof bits);
  } else if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<acc_t, float>) {
    const uint16_t bits = half_bits(value);
    std::memcpy(static_cast<void*>(dst), &bits, sizeof bits);
  } else {
    *dst = static_cast<scalar_t>(value);
  }
}

// Copies pixels [first, first + n) of one image of a (B, C, S) tensor (image points at its (c=0, i=0) element) into
// the class-major tile, converting to acc_t. One class row at a time, also for channels_last (a strided read of the
// few KiB the tile spans, which is in L1 after the first row, vectorises; a loop over the classes of each pixel
// does not).
template <typename scalar_t, typename acc_t>
MEDLOSS_INLINE void gather_body(const scalar_t* image, int64_t stride_c, int64_t stride_s, int64_t classes,
                                int64_t first, int64_t n, int64_t tile, acc_t* dst) {
  const scalar_t* start = image + first * stride_s;
  for (int64_t c = 0; c < classes; ++c) {
    const scalar_t* src = start + c * stride_c;
    acc_t* out = dst + c * tile;
    if (stride_s == 1) {
      MEDLOSS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        out[j] = static_cast<acc_t>(src[j]);
      }
    } else {
      MEDLOSS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        out[j] = static_cast<acc_t>(src[j * stride_s]);
      }
    }
  }
}

// The inverse of gather: writes the tile to pixels [first, first + n) of one image, converting to scalar_t.
template <typename scalar_t, typename acc_t>
MEDLOSS_INLINE void scatter_body(const acc_t* src, int64_t stride_c, int64_t stride_s, int64_t classes,
                                 int64_t first, int64_t n, int64_t tile, scalar_t* image) {
  scalar_t* start = image + first * stride_s;
  for (int64_t c = 0; c < classes; ++c) {
    const acc_t* in = src + c * tile;
    scalar_t* dst = start + c * stride_c;
    if (stride_s == 1) {
      MEDLOSS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        store_as(dst + j, in[j]);
      }
    } else {
      MEDLOSS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        store_as(dst + j * stride_s, in[j]);
      }
    }
  }
}

// Loads pixels [first, first + n) of one label map row (start points at pixel first): the labels, w and v. Returns
// the number of invalid labels (outside [0, C) and not the masked ignore_index). kUnit: unit pixel stride.
template <bool kUnit, typename label_t, typename acc_t>
MEDLOSS_INLINE int64_t load_labels_body(const Options<acc_t>& o, const label_t* start, int64_t stride_s, int64_t n,
                                        Scratch<acc_t>& s) {
  // Labels of up to 32 bits are compared as int32, int64 ones as themselves.
  using value_t = std::conditional_t<(sizeof(label_t) <= 4), int32_t, int64_t>;
  using unsigned_t = std::make_unsigned_t<value_t>;
  const unsigned_t classes = static_cast<unsigned_t>(o.classes);
  // The ignored label, when mode 1 masks one that value_t can hold (no label equals any other).
  const bool masked = o.mask_mode == MASK_LABEL && o.ignore_index >= std::numeric_limits<value_t>::min() &&
                      o.ignore_index <= std::numeric_limits<value_t>::max();
  const value_t ignored_label = masked ? static_cast<value_t>(o.ignore_index) : value_t(0);
  int32_t* labels = s.label.data();
  acc_t* w = s.w.data();
  acc_t* v = s.v.data();
  int32_t invalid = 0;
  _Pragma("omp simd reduction(+ : invalid)")
  for (int64_t j = 0; j < n; ++j) {
    const value_t label = static_cast<value_t>(start[kUnit ? j : j * stride_s]);
    // One unsigned comparison rejects both label < 0 and label >= C.
    const bool in_range = static_cast<unsigned_t>(label) < classes;
    const bool ignored = masked & (label == ignored_label);
    invalid += static_cast<int32_t>(!in_range & !ignored);
    labels[j] = in_range ? static_cast<int32_t>(label) : -1;
    w[j] = indicator<acc_t>(in_range & !ignored);
    v[j] = indicator<acc_t>(in_range);
  }
  return invalid;
}

template <typename label_t, typename acc_t>
MEDLOSS_INLINE int64_t load_labels_any(const Options<acc_t>& o, const label_t* row, int64_t stride_s, int64_t first,
                                       int64_t n, Scratch<acc_t>& s) {
  return stride_s == 1 ? load_labels_body<true>(o, row + first, stride_s, n, s)
                       : load_labels_body<false>(o, row + first * stride_s, stride_s, n, s);
}

// ------------------------------------------------------------------------------------------------- tile math

// Softmax statistics of the raw logits over the classes: max, e = exp(x - max) (the tile s.e), inv = 1 / sum_c e
// and, when with_log, log_sum = log(sum_c e).
template <typename acc_t>
MEDLOSS_INLINE void softmax_stats(const Options<acc_t>& o, const Rows<acc_t>& rows, int64_t n, bool with_log,
                                  Scratch<acc_t>& s) {
  const int64_t tile = o.tile;
  acc_t* max = s.max.data();
  acc_t* sum = s.inv.data();  // the sum, then its inverse in place
  std::copy(rows.x, rows.x + n, max);
  for (int64_t c = 1; c < o.classes; ++c) {
    const acc_t* xc = rows.x + c * rows.x_row;
    MEDLOSS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      max[j] = xc[j] > max[j] ? xc[j] : max[j];
    }
  }
  for (int64_t c = 0; c < o.classes; ++c) {
    const acc_t* xc = rows.x + c * rows.x_row;
    acc_t* ec = s.e.data() + c * tile;
    if (c == 0) {
      MEDLOSS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        ec[j] = exp_acc</*kNonPositive=*/true>(xc[j] - max[j]);
        sum[j] = ec[j];
      }
    } else {
      MEDLOSS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        ec[j] = exp_acc</*kNonPositive=*/true>(xc[j] - max[j]);
        sum[j] += ec[j];
      }
    }
  }
  if (with_log) {
    acc_t* log_sum = s.log_sum.data();
    MEDLOSS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      log_sum[j] = log_acc(sum[j]);
    }
  }
  MEDLOSS_SIMD
  for (int64_t j = 0; j < n; ++j) {
    sum[j] = acc_t(1) / sum[j];
  }
}

// The activation of one logit: softmax from e = exp(x - max) and inv = 1 / sum, the sigmoid, or x itself.
template <int64_t kActivation, typename acc_t>
MEDLOSS_INLINE acc_t probability(acc_t x, acc_t e, acc_t inv) {
  if constexpr (kActivation == ACTIVATION_SOFTMAX) {
    return e * inv;
  } else if constexpr (kActivation == ACTIVATION_SIGMOID) {
    return sigmoid_acc(x);
  } else {
    return x;
  }
}

// The target of class c at pixel j: the one-hot of the label row, or the dense row.
template <bool kLabels, typename acc_t>
MEDLOSS_INLINE acc_t target_at(const int32_t* labels, int32_t c, const acc_t* yc, int64_t j) {
  if constexpr (kLabels) {
    return indicator<acc_t>(labels[j] == c);
  } else {
    return yc[j];
  }
}

// The masked target w y of class c at pixel j. For labels (w is 0 or 1) w y is w where the label is c, else 0: one
// select instead of building y and multiplying.
template <bool kLabels, typename acc_t>
MEDLOSS_INLINE acc_t masked_target_at(const int32_t* labels, int32_t c, const acc_t* yc, const acc_t* w, int64_t j) {
  if constexpr (kLabels) {
    return select(labels[j] == c, w[j], acc_t(0));
  } else {
    return w[j] * yc[j];
  }
}

// ------------------------------------------------------------------------------------------------ forward tile

// The inputs of class row c of one tile in the forward (see forward_row).
template <typename acc_t>
struct ForwardRow {
  const acc_t* x;  // logits
  const acc_t* y;  // dense target (unused for labels)
  const acc_t* e;  // exp(x - max) (softmax)
  const acc_t* inv;
  const acc_t* max;
  const acc_t* log_sum;
  const acc_t* w;
  const int32_t* labels;
  acc_t* total;
  acc_t gamma, weight, keep, spread;
  int32_t cls;
};

// One pixel j of a class row: p, y, the masked p' = w p and y' = w y, the modulator m = |p' - y'|^gamma; adds
// m p' y', m p'^k, m y'^k and m |p' - y'| to the lane's I, P, G, D; with the cross entropy, adds this class's share
// of the pixel's -(cross entropy) to total[j] and, for labels, its class weight (cw_c y_c, nonzero for the label's
// class only) to the lane's ce_den.
template <typename acc_t, int64_t kActivation, bool kSquared, bool kLabels, int kMod, bool kCE>
MEDLOSS_INLINE void forward_pixel(const ForwardRow<acc_t>& r, int64_t j, acc_t& sum_i, acc_t& sum_p, acc_t& sum_g,
                                  acc_t& sum_d, acc_t& ce_den) {
  const acc_t p = probability<kActivation>(r.x[j], r.e[j], r.inv[j]);
  const acc_t pw = r.w[j] * p;
  const acc_t yw = masked_target_at<kLabels>(r.labels, r.cls, r.y, r.w, j);
  const acc_t diff = pw - yw;
  const acc_t abs_diff = std::abs(diff);
  const acc_t m = modulator<kMod>(diff, abs_diff, r.gamma);
  sum_i += m * pw * yw;
  sum_p += m * (kSquared ? pw * pw : pw);
  sum_g += m * (kSquared ? yw * yw : yw);
  sum_d += m * abs_diff;
  if constexpr (kCE) {
    // -(cross entropy) = sum_c a_c log q_c, a_c = cw_c ((1 - eps) y_c + eps / C), log q_c = x_c - max - log_sum.
    // For a one-hot y this is the reference's (1 - eps) cw[L] log q_L + (eps / C) sum_c cw_c log q_c.
    // A term with a zero share is selected away, not multiplied: a -inf logit (a masked class) has log q = -inf,
    // and torch's cross entropy reads it only at the label or where label smoothing and the class weight put weight.
    const acc_t y = target_at<kLabels>(r.labels, r.cls, r.y, j);
    const acc_t share = r.weight * (r.keep * y + r.spread);
    r.total[j] += select(share != acc_t(0), share * (r.x[j] - r.max[j] - r.log_sum[j]), acc_t(0));
    if constexpr (kLabels) {
      ce_den += r.weight * y;
    }
  }
}

// Class row c of one tile, one pass: forward_pixel for each pixel, the sums in kLanes accumulators (lane m takes
// pixels j = m mod kLanes), which live in registers for the whole row and in s.lanes between rows.
template <typename acc_t, int64_t kActivation, bool kSquared, bool kLabels, int kMod, bool kCE>
MEDLOSS_INLINE void forward_row(const Options<acc_t>& o, const Rows<acc_t>& rows, int64_t c, int64_t n,
                                Scratch<acc_t>& s) {
  const ForwardRow<acc_t> r{rows.x + c * rows.x_row,
                            kLabels ? nullptr : rows.y + c * rows.y_row,
                            s.e.data() + c * o.tile,
                            s.inv.data(),
                            s.max.data(),
                            s.log_sum.data(),
                            s.w.data(),
                            s.label.data(),
                            s.total.data(),
                            o.gamma[c],
                            o.ce_weight[c],
                            o.keep,
                            o.spread,
                            static_cast<int32_t>(c)};
  acc_t* lanes = s.lanes.data() + c * DICE_NUM_SUMS * kLanes;
  acc_t* den_lanes = s.lanes.data() + (o.classes * DICE_NUM_SUMS + kRowCeDen) * kLanes;
  acc_t sum_i[kLanes], sum_p[kLanes], sum_g[kLanes], sum_d[kLanes], den[kLanes];
  for (int64_t m = 0; m < kLanes; ++m) {
    sum_i[m] = lanes[DICE_SUM_I * kLanes + m];
    sum_p[m] = lanes[DICE_SUM_P * kLanes + m];
    sum_g[m] = lanes[DICE_SUM_G * kLanes + m];
    sum_d[m] = lanes[DICE_SUM_D * kLanes + m];
    den[m] = den_lanes[m];
  }
  int64_t q = 0;
  for (; q + kLanes <= n; q += kLanes) {
    MEDLOSS_SIMD
    for (int64_t m = 0; m < kLanes; ++m) {
      forward_pixel<acc_t, kActivation, kSquared, kLabels, kMod, kCE>(r, q + m, sum_i[m], sum_p[m], sum_g[m],
                                                                      sum_d[m], den[m]);
    }
  }
  for (int64_t m = 0; q + m < n; ++m) {
    forward_pixel<acc_t, kActivation, kSquared, kLabels, kMod, kCE>(r, q + m, sum_i[m], sum_p[m], sum_g[m], sum_d[m],
                                                                    den[m]);
  }
  for (int64_t m = 0; m < kLanes; ++m) {
    lanes[DICE_SUM_I * kLanes + m] = sum_i[m];
    lanes[DICE_SUM_P * kLanes + m] = sum_p[m];
    lanes[DICE_SUM_G * kLanes + m] = sum_g[m];
    lanes[DICE_SUM_D * kLanes + m] = sum_d[m];
    den_lanes[m] = den[m];
  }
}

// forward_row for the modulator kind of class c's gamma.
template <typename acc_t, int64_t kActivation, bool kSquared, bool kLabels, bool kCE>
MEDLOSS_INLINE void forward_row_any(const Options<acc_t>& o, const Rows<acc_t>& rows, int64_t c, int64_t n,
                                    Scratch<acc_t>& s) {
  switch (modulator_kind(o.gamma[c])) {
    case kModOne:
      return forward_row<acc_t, kActivation, kSquared, kLabels, kModOne, kCE>(o, rows, c, n, s);
    case kModAbs:
      return forward_row<acc_t, kActivation, kSquared, kLabels, kModAbs, kCE>(o, rows, c, n, s);
    case kModSquare:
      return forward_row<acc_t, kActivation, kSquared, kLabels, kModSquare, kCE>(o, rows, c, n, s);
    default:
      return forward_row<acc_t, kActivation, kSquared, kLabels, kModPow, kCE>(o, rows, c, n, s);
  }
}

// lanes[m] += values[j] (kNegate: -= ) for the pixels j = m mod kLanes of a tile, in pixel order, where keep[j] != 0
// (nullptr: every pixel). A pixel left out is selected away, not multiplied by 0 (its value may be infinite). The
// lanes live in registers for the whole tile (a local copy: the compiler cannot tell that they do not alias values).
template <bool kNegate = false, typename acc_t>
MEDLOSS_INLINE void add_to_lanes(const acc_t* values, int64_t n, acc_t* lanes, const acc_t* keep = nullptr) {
  acc_t sum[kLanes];
  for (int64_t m = 0; m < kLanes; ++m) {
    sum[m] = lanes[m];
  }
  int64_t q = 0;
  if (keep == nullptr) {
    for (; q + kLanes <= n; q += kLanes) {
      MEDLOSS_SIMD
      for (int64_t m = 0; m < kLanes; ++m) {
        sum[m] = kNegate ? sum[m] - values[q + m] : sum[m] + values[q + m];
      }
    }
    for (int64_t m = 0; q + m < n; ++m) {
      sum[m] = kNegate ? sum[m] - values[q + m] : sum[m] + values[q + m];
    }
  } else {
    for (; q + kLanes <= n; q += kLanes) {
      MEDLOSS_SIMD
      for (int64_t m = 0; m < kLanes; ++m) {
        const acc_t value = select(keep[q + m] != acc_t(0), values[q + m], acc_t(0));
        sum[m] = kNegate ? sum[m] - value : sum[m] + value;
      }
    }
    for (int64_t m = 0; q + m < n; ++m) {
      const acc_t value = select(keep[q + m] != acc_t(0), values[q + m], acc_t(0));
      sum[m] = kNegate ? sum[m] - value : sum[m] + value;
    }
  }
  for (int64_t m = 0; m < kLanes; ++m) {
    lanes[m] = sum[m];
  }
}

template <typename acc_t, int64_t kActivation, bool kSquared, bool kLabels>
MEDLOSS_INLINE void forward_tile_body(const Options<acc_t>& o, const Rows<acc_t>& rows, int64_t n,
                                      Scratch<acc_t>& s) {
  if (kActivation == ACTIVATION_SOFTMAX || o.with_ce) {
    softmax_stats(o, rows, n, o.with_ce, s);
  }
  acc_t* total = s.total.data();
  acc_t* extra_lanes = s.lanes.data() + o.classes * DICE_NUM_SUMS * kLanes;
  if (o.with_ce) {
    std::fill(total, total + n, acc_t(0));
    for (int64_t c = 0; c < o.classes; ++c) {
      forward_row_any<acc_t, kActivation, kSquared, kLabels, true>(o, rows, c, n, s);
    }
    // ce_num -= total (-(cross entropy)) at the pixels that count; an invalid label's pixel is selected away (its
    // total may be infinite under label smoothing with a -inf logit), as the reference's where(in_range, ...).
    add_to_lanes</*kNegate=*/true>(total, n, extra_lanes + kRowCeNum * kLanes, s.v.data());
  } else {
    for (int64_t c = 0; c < o.classes; ++c) {
      forward_row_any<acc_t, kActivation, kSquared, kLabels, false>(o, rows, c, n, s);
    }
  }
  add_to_lanes(s.w.data(), n, extra_lanes + kRowValid * kLanes);  // the valid pixels: sum of w
}

// First pass over class row c: dL/dp_c = w m (gI y' + gP k p'^(k-1) + gD sign(p' - y')), then through the sigmoid.
// The softmax keeps p (over e, in s.e) and dL/dp (in s.g) for the second pass and adds p dL/dp to s.dot; with the
// cross entropy, the class's share a_c is added to s.total and dL/dp goes to s.g; otherwise the row is final and goes
// to out.
template <typename acc_t, int64_t kActivation, bool kSquared, bool kLabels, int kMod, bool kCE>
MEDLOSS_INLINE void backward_row(const Options<acc_t>& o, const Upstream<acc_t>& up, const Rows<acc_t>& rows,
                                 int64_t c, int64_t n, Scratch<acc_t>& s, acc_t* out) {
  const int64_t tile = o.tile;
  const acc_t* xc = rows.x + c * rows.x_row;
  const acc_t* yc = kLabels ? nullptr : rows.y + c * rows.y_row;
  acc_t* ec = s.e.data() + c * tile;
  acc_t* gc = s.g.data() + c * tile;
  const acc_t* inv = s.inv.data();
  const acc_t* w = s.w.data();
  const int32_t* labels = s.label.data();
  acc_t* total = s.total.data();
  acc_t* dot = s.dot.data();
  const acc_t gamma = o.gamma[c];
  const acc_t weight = o.ce_weight[c];
  const acc_t keep = o.keep;
  const acc_t spread = o.spread;
  const acc_t grad_i = up.sums[c * DICE_NUM_SUMS + DICE_SUM_I];
  const acc_t grad_p = up.sums[c * DICE_NUM_SUMS + DICE_SUM_P];
  const acc_t grad_d = up.sums[c * DICE_NUM_SUMS + DICE_SUM_D];
  const int32_t cls = static_cast<int32_t>(c);
  MEDLOSS_SIMD
  for (int64_t j = 0; j < n; ++j) {
    const acc_t p = probability<kActivation>(xc[j], ec[j], inv[j]);
    const acc_t pw = w[j] * p;
    const acc_t yw = masked_target_at<kLabels>(labels, cls, yc, w, j);
    const acc_t diff = pw - yw;
    const acc_t m = modulator<kMod>(diff, std::abs(diff), gamma);
    const acc_t d_pred = kSquared ? acc_t(2) * pw : acc_t(1);
    // gD sign(p' - y') as a choice between gD, -gD and 0.
    const acc_t grad_sign = select(diff > acc_t(0), grad_d, select(diff < acc_t(0), -grad_d, acc_t(0)));
    acc_t g = (grad_i * yw + grad_p * d_pred + grad_sign) * m * w[j];
    if constexpr (kActivation == ACTIVATION_SIGMOID) {
      g = g * p * (acc_t(1) - p);
    }
    if constexpr (kCE) {
      total[j] += weight * (keep * target_at<kLabels>(labels, cls, yc, j) + spread);
    }
    if constexpr (kActivation == ACTIVATION_SOFTMAX) {
      ec[j] = p;
      gc[j] = g;
      dot[j] += p * g;
    } else if constexpr (kCE) {
      gc[j] = g;
    } else {
      out[j] = g;
    }
  }
}

// Second pass over class row c (softmax or cross entropy): dx_c = p_c (g_c - sum_k p_k g_k) for the softmax, plus
// the cross entropy's d(-v sum_k a_k log q_k)/dx_c = v (q_c A - a_c), A = sum_k a_k (q = p for the softmax, else
// e * inv from the raw logits); to out.
template <typename acc_t, int64_t kActivation, bool kLabels, bool kCE>
MEDLOSS_INLINE void backward_finish_row(const Options<acc_t>& o, const Upstream<acc_t>& up, const Rows<acc_t>& rows,
                                        int64_t c, int64_t n, Scratch<acc_t>& s, acc_t* out) {
  const int64_t tile = o.tile;
  const acc_t* yc = kLabels ? nullptr : rows.y + c * rows.y_row;
  const acc_t* ec = s.e.data() + c * tile;  // p for the softmax, else exp(x - max)
  const acc_t* gc = s.g.data() + c * tile;
  const acc_t* inv = s.inv.data();
  const acc_t* v = s.v.data();
  const acc_t* total = s.total.data();
  const acc_t* dot = s.dot.data();
  const int32_t* labels = s.label.data();
  const acc_t weight = o.ce_weight[c];
  const acc_t keep = o.keep;
  const acc_t spread = o.spread;
  const acc_t grad_ce = up.ce_num;
  const int32_t cls = static_cast<int32_t>(c);
  MEDLOSS_SIMD
  for (int64_t j = 0; j < n; ++j) {
    acc_t g = gc[j];
    if constexpr (kActivation == ACTIVATION_SOFTMAX) {
      g = ec[j] * (g - dot[j]);
    }
    if constexpr (kCE) {
      const acc_t q = kActivation == ACTIVATION_SOFTMAX ? ec[j] : ec[j] * inv[j];
      const acc_t share = weight * (keep * target_at<kLabels>(labels, cls, yc, j) + spread);
      g += grad_ce * v[j] * (q * total[j] - share);
    }
    out[j] = g;
  }
}

// backward_row for the modulator kind of class c's gamma.
template <typename acc_t, int64_t kActivation, bool kSquared, bool kLabels, bool kCE>
MEDLOSS_INLINE void backward_row_any(const Options<acc_t>& o, const Upstream<acc_t>& up, const Rows<acc_t>& rows,
                                     int64_t c, int64_t n, Scratch<acc_t>& s, acc_t* out) {
  switch (modulator_kind(o.gamma[c])) {
    case kModOne:
      return backward_row<acc_t, kActivation, kSquared, kLabels, kModOne, kCE>(o, up, rows, c, n, s, out);
    case kModAbs:
      return backward_row<acc_t, kActivation, kSquared, kLabels, kModAbs, kCE>(o, up, rows, c, n, s, out);
    case kModSquare:
      return backward_row<acc_t, kActivation, kSquared, kLabels, kModSquare, kCE>(o, up, rows, c, n, s, out);
    default:
      return backward_row<acc_t, kActivation, kSquared, kLabels, kModPow, kCE>(o, up, rows, c, n, s, out);
  }
}

// Writes dL/dx of the tile's pixels to out (class c at out + c * out_row): the gradient rows in the output tensor,
// or s.g for a scatter.
template <typename acc_t, int64_t kActivation, bool kSquared, bool kLabels>
MEDLOSS_INLINE void backward_tile_body(const Options<acc_t>& o, const Upstream<acc_t>& up, const Rows<acc_t>& rows,
                                       int64_t n, Scratch<acc_t>& s, acc_t* out, int64_t out_row) {
  constexpr bool kSoftmax = kActivation == ACTIVATION_SOFTMAX;
  if (kSoftmax || o.with_ce) {
    softmax_stats(o, rows, n, /*with_log=*/false, s);
  }
  if (kSoftmax) {
    std::fill(s.dot.data(), s.dot.data() + n, acc_t(0));
  }
  if (o.with_ce) {
    std::fill(s.total.data(), s.total.data() + n, acc_t(0));
    for (int64_t c = 0; c < o.classes; ++c) {
      backward_row_any<acc_t, kActivation, kSquared, kLabels, true>(o, up, rows, c, n, s, out + c * out_row);
    }
    for (int64_t c = 0; c < o.classes; ++c) {
      backward_finish_row<acc_t, kActivation, kLabels, true>(o, up, rows, c, n, s, out + c * out_row);
    }
  } else {
    for (int64_t c = 0; c < o.classes; ++c) {
      backward_row_any<acc_t, kActivation, kSquared, kLabels, false>(o, up, rows, c, n, s, out + c * out_row);
    }
    if (kSoftmax) {
      for (int64_t c = 0; c < o.classes; ++c) {
        backward_finish_row<acc_t, kActivation, kLabels, false>(o, up, rows, c, n, s, out + c * out_row);
      }
    }
  }
}

// -------------------------------------------------------------------------------------------------- focal term
// MONAI's focal loss on the raw logits, masked as MONAI masks it: the terms of (x w, y w), times w, times the focal
// class weight, on the kept classes c >= drop (reference.dice_sums.focal_terms; kernels/dice_sums.py _focal has the
// same formulas). Its own entry points, run after the Dice tile, so that it costs nothing when it is off. A term
// with y' = 0 is selected away, not multiplied (a -inf logit has log p = -inf); select() computes both sides, so
// the NaN of the side not taken never reaches a sum.

// log(sigmoid(z)) without overflow from e = exp(-|z|): min(z, 0) - log(1 + e).
template <typename acc_t>
MEDLOSS_INLINE acc_t log_sigmoid_from(acc_t z, acc_t e) {
  return select(z < acc_t(0), z, acc_t(0)) - log_acc(acc_t(1) + e);
}

// sigmoid(z) from e = exp(-|z|): 1 / (1 + e) for z >= 0, e / (1 + e) below (no overflow either way).
template <typename acc_t>
MEDLOSS_INLINE acc_t sigmoid_from(acc_t z, acc_t e) {
  const acc_t inv = acc_t(1) / (acc_t(1) + e);
  return select(z >= acc_t(0), inv, e * inv);
}

// The sigmoid form's alpha factor of one element: 1; y' alpha + (1 - y')(1 - alpha) (a scalar alpha); or alpha_c on
// the positives (y' == 1) only, 1 elsewhere (per-class alpha).
template <int64_t kAlpha, typename acc_t>
MEDLOSS_INLINE acc_t sigmoid_alpha(acc_t yw, acc_t alpha_scalar, acc_t alpha_class) {
  if constexpr (kAlpha == ALPHA_SCALAR) {
    return yw * alpha_scalar + (acc_t(1) - yw) * (acc_t(1) - alpha_scalar);
  } else if constexpr (kAlpha == ALPHA_PER_CLASS) {
    return select(yw == acc_t(1), alpha_class, acc_t(1));
  } else {
    return acc_t(1);
  }
}

// The softmax form's alpha factor of class c, a constant of the row: 1; 1 - alpha for the first kept class and alpha
// for the others (a scalar alpha); alpha_c (per-class alpha).
template <typename acc_t>
acc_t softmax_alpha(const Options<acc_t>& o, int64_t c) {
  if (o.alpha_mode == ALPHA_SCALAR) {
    return c == o.drop ? acc_t(1) - o.focal_alpha : o.focal_alpha;
  }
  return o.alpha_mode == ALPHA_PER_CLASS ? o.alpha[c] : acc_t(1);
}

// The sigmoid form of one element, t = A bce alpha, with A = sigmoid(-x' s)^gamma, s = 2 y' - 1, bce = x' - x' y' -
// log sigmoid(x') (reference.focal.sigmoid_focal_terms), on x' = x w, y' = y w. With GRAD it also gives d t / dx'
// = A (-gamma s sigmoid(x' s) bce + sigmoid(x') - y') alpha. For labels s = +-1, so |x' s| = |x'| and one exp(-|x'|)
// serves every log sigmoid and sigmoid of the element; a soft dense target takes its own for x' s.
template <bool kGrad, int64_t kAlpha, bool kLabels, typename acc_t>
MEDLOSS_INLINE acc_t sigmoid_focal(acc_t xw, acc_t yw, acc_t gamma, acc_t alpha_scalar, acc_t alpha_class,
                                   acc_t& d_term) {
  const acc_t sign = acc_t(2) * yw - acc_t(1);
  const acc_t z = -xw * sign;  // A = exp(gamma log sigmoid(z))
  const acc_t e = exp_acc</*kNonPositive=*/true>(-std::abs(xw));
  acc_t e_z = e;
  if constexpr (!kLabels) {
    e_z = exp_acc</*kNonPositive=*/true>(-std::abs(z));
  }
  const acc_t bce = xw - xw * yw - log_sigmoid_from(xw, e);
  const acc_t a = exp_acc(gamma * log_sigmoid_from(z, e_z));
  const acc_t factor = sigmoid_alpha<kAlpha>(yw, alpha_scalar, alpha_class);
  if constexpr (kGrad) {
    // sigmoid(x' s) = sigmoid(-z)
    const acc_t slope = -gamma * sign * sigmoid_from(-z, e_z) * bce + sigmoid_from(xw, e) - yw;
    d_term = a * slope * factor;
  }
  return a * bce * factor;
}

// The sigmoid form's bound on |x'|: infinite logits are clamped to it, as the reference does (each term is then its
// limit, 0 for x = -inf and y = 0, where MONAI's x - x y is NaN), and the clamp's gradient is 0 outside.
template <typename acc_t>
constexpr acc_t kFocalLogitBound = acc_t(1e30);

// Class row c of a tile, sigmoid form: the terms t w fw into row (the focal_row buffer), or, with GRAD, the gradient
// d(upstream t(x w) w fw)/dx = upstream d t / dx' w^2 fw added to out; up: the upstream per pixel.
template <bool kGrad, int64_t kAlpha, bool kLabels, typename acc_t>
MEDLOSS_INLINE void sigmoid_focal_row(const Options<acc_t>& o, const Rows<acc_t>& rows, int64_t c, int64_t n,
                                      Scratch<acc_t>& s, const acc_t* up, acc_t* row) {
  const acc_t* xc = rows.x + c * rows.x_row;
  const acc_t* yc = kLabels ? nullptr : rows.y + c * rows.y_row;
  const acc_t* w = s.w.data();
  const int32_t* labels = s.label.data();
  const int32_t cls = static_cast<int32_t>(c);
  const acc_t gamma = o.focal_gamma;
  const acc_t alpha_scalar = o.focal_alpha;
  const acc_t alpha_class = o.alpha[c];
  const acc_t weight = o.focal_weight[c];
  constexpr acc_t kBound = kFocalLogitBound<acc_t>;
  MEDLOSS_SIMD
  for (int64_t j = 0; j < n; ++j) {
    const acc_t product = xc[j] * w[j];
    // Compares, not min/max: a NaN logit stays NaN.
    const acc_t xw = select(product < -kBound, -kBound, select(product > kBound, kBound, product));
    const acc_t yw = masked_target_at<kLabels>(labels, cls, yc, w, j);
    acc_t d_term = acc_t(0);
    const acc_t term = sigmoid_focal<kGrad, kAlpha, kLabels>(xw, yw, gamma, alpha_scalar, alpha_class, d_term);
    if constexpr (kGrad) {
      const bool inside = (product >= -kBound) & (product <= kBound);
      row[j] += select(inside, up[j] * (d_term * (weight * w[j]) * w[j]), acc_t(0));
    } else {
      row[j] = term * (weight * w[j]);
    }
  }
}

// The softmax form's statistics over the kept classes of x' = x w: max, e = exp(x' - max) (s.focal_e), 1 / sum_c e
// and log(sum_c e).
template <typename acc_t>
MEDLOSS_INLINE void softmax_focal_stats(const Options<acc_t>& o, const Rows<acc_t>& rows, int64_t n,
                                        Scratch<acc_t>& s) {
  const acc_t* w = s.w.data();
  acc_t* max = s.focal_max.data();
  acc_t* sum = s.focal_inv.data();  // the sum, then its inverse in place
  acc_t* log_sum = s.focal_log.data();
  const acc_t* first = rows.x + o.drop * rows.x_row;
  MEDLOSS_SIMD
  for (int64_t j = 0; j < n; ++j) {
    max[j] = first[j] * w[j];
    sum[j] = acc_t(0);
  }
  for (int64_t c = o.drop + 1; c < o.classes; ++c) {
    const acc_t* xc = rows.x + c * rows.x_row;
    MEDLOSS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      const acc_t xw = xc[j] * w[j];
      max[j] = xw > max[j] ? xw : max[j];
    }
  }
  for (int64_t c = o.drop; c < o.classes; ++c) {
    const acc_t* xc = rows.x + c * rows.x_row;
    acc_t* ec = s.focal_e.data() + c * o.tile;
    MEDLOSS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      ec[j] = exp_acc</*kNonPositive=*/true>(xc[j] * w[j] - max[j]);
      sum[j] += ec[j];
    }
  }
  MEDLOSS_SIMD
  for (int64_t j = 0; j < n; ++j) {
    log_sum[j] = log_acc(sum[j]);
    sum[j] = acc_t(1) / sum[j];
  }
}

// Class row c of a tile, softmax form (reference.focal.softmax_focal_terms over the kept classes): p = e / sum,
// t = -(1 - p)^gamma log p y' alpha_c, times w fw, into row. With GRAD: replaces e by p in s.focal_e, writes
// upstream d t / d log p w^2 fw to s.focal_g and adds it to s.focal_dot, where d t / d log p = -y' ((1 - p)^gamma -
// gamma p log p (1 - p)^(gamma - 1)) alpha_c (torch's pow gradient: 0 for gamma = 0, the power 1 for gamma = 1).
// kMod: gamma 0, 1, 2 or other (the modulator kinds).
template <bool kGrad, int kMod, bool kLabels, typename acc_t>
MEDLOSS_INLINE void softmax_focal_row(const Options<acc_t>& o, const Rows<acc_t>& rows, int64_t c, int64_t n,
                                      Scratch<acc_t>& s, const acc_t* up, acc_t* row) {
  const acc_t* xc = rows.x + c * rows.x_row;
  const acc_t* yc = kLabels ? nullptr : rows.y + c * rows.y_row;
  const acc_t* w = s.w.data();
  const int32_t* labels = s.label.data();
  const int32_t cls = static_cast<int32_t>(c);
  acc_t* ec = s.focal_e.data() + c * o.tile;
  const acc_t* max = s.focal_max.data();
  const acc_t* inv = s.focal_inv.data();
  const acc_t* log_sum = s.focal_log.data();
  const acc_t gamma = o.focal_gamma;
  const acc_t scale = softmax_alpha(o, c) * o.focal_weight[c];
  acc_t* gc = kGrad ? s.focal_g.data() + c * o.tile : nullptr;
  acc_t* dot = kGrad ? s.focal_dot.data() : nullptr;
  MEDLOSS_SIMD
  for (int64_t j = 0; j < n; ++j) {
    const acc_t yw = masked_target_at<kLabels>(labels, cls, yc, w, j);
    const acc_t p = ec[j] * inv[j];
    const acc_t log_p = (xc[j] * w[j] - max[j]) - log_sum[j];
    const acc_t rest = acc_t(1) - p;
    const acc_t power = modulator<kMod>(rest, std::abs(rest), gamma);
    const bool hit = yw != acc_t(0);
    if constexpr (kGrad) {
      acc_t inner;
      if constexpr (kMod == kModOne) {
        inner = acc_t(0);
      } else if constexpr (kMod == kModAbs) {
        inner = p * log_p;
      } else if constexpr (kMod == kModSquare) {
        inner = acc_t(2) * p * log_p * rest;
      } else {
        inner = gamma * p * log_p * pow_acc(std::abs(rest), gamma - acc_t(1));
      }
      const acc_t d_log_p = select(hit, -yw * (power - inner) * scale * w[j] * w[j], acc_t(0));
      const acc_t g = up[j] * d_log_p;
      ec[j] = p;
      gc[j] = g;
      dot[j] += g;
    } else {
      row[j] = select(hit, -(power * log_p) * yw * scale * w[j], acc_t(0));
    }
  }
}

template <bool kGrad, bool kLabels, typename acc_t>
MEDLOSS_INLINE void softmax_focal_row_any(const Options<acc_t>& o, const Rows<acc_t>& rows, int64_t c, int64_t n,
                                          Scratch<acc_t>& s, const acc_t* up, acc_t* row) {
  switch (modulator_kind(o.focal_gamma)) {
    case kModOne:
      return softmax_focal_row<kGrad, kModOne, kLabels>(o, rows, c, n, s, up, row);
    case kModAbs:
      return softmax_focal_row<kGrad, kModAbs, kLabels>(o, rows, c, n, s, up, row);
    case kModSquare:
      return softmax_focal_row<kGrad, kModSquare, kLabels>(o, rows, c, n, s, up, row);
    default:
      return softmax_focal_row<kGrad, kModPow, kLabels>(o, rows, c, n, s, up, row);
  }
}

// The focal forward of one tile: F of each kept class into its lanes and, given a map, the terms into its rows.
template <int64_t kFocal, int64_t kAlpha, bool kLabels, typename acc_t>
MEDLOSS_INLINE void focal_forward_body(const Options<acc_t>& o, const Rows<acc_t>& rows, int64_t n, Scratch<acc_t>& s,
                                       acc_t* map, int64_t map_row) {
  if constexpr (kFocal == FOCAL_SOFTMAX) {
    softmax_focal_stats(o, rows, n, s);
  }
  acc_t* row = s.focal_row.data();
  const acc_t* no_upstream = nullptr;
  for (int64_t c = o.drop; c < o.classes; ++c) {
    if constexpr (kFocal == FOCAL_SOFTMAX) {
      softmax_focal_row_any</*kGrad=*/false, kLabels>(o, rows, c, n, s, no_upstream, row);
    } else {
      sigmoid_focal_row</*kGrad=*/false, kAlpha, kLabels>(o, rows, c, n, s, no_upstream, row);
    }
    add_to_lanes(row, n, s.lanes.data() + (c * DICE_NUM_SUMS + DICE_SUM_F) * kLanes);
    if (map != nullptr) {
      std::copy(row, row + n, map + (c - o.drop) * map_row);
    }
  }
}

// The focal backward of one tile: adds d(upstream F)/dx to the gradient rows (class c at out + c * out_row). The
// upstream of class c: its F row of up.sums, times each element's of up.focal_map when there is one.
template <int64_t kFocal, int64_t kAlpha, bool kLabels, typename acc_t>
MEDLOSS_INLINE void focal_backward_body(const Options<acc_t>& o, const Upstream<acc_t>& up, const Rows<acc_t>& rows,
                                        int64_t n, Scratch<acc_t>& s, acc_t* out, int64_t out_row) {
  if constexpr (kFocal == FOCAL_SOFTMAX) {
    softmax_focal_stats(o, rows, n, s);
    std::fill(s.focal_dot.data(), s.focal_dot.data() + n, acc_t(0));
  }
  acc_t* upstream = s.focal_row.data();
  acc_t* no_row = nullptr;  // the softmax rows go to s.focal_g first
  for (int64_t c = o.drop; c < o.classes; ++c) {
    const acc_t grad_f = up.sums[c * DICE_NUM_SUMS + DICE_SUM_F];
    if (up.focal_map != nullptr) {
      const acc_t* element = up.focal_map + (c - o.drop) * up.focal_map_row;
      MEDLOSS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        upstream[j] = grad_f * element[j];
      }
    } else {
      std::fill(upstream, upstream + n, grad_f);
    }
    if constexpr (kFocal == FOCAL_SOFTMAX) {
      softmax_focal_row_any</*kGrad=*/true, kLabels>(o, rows, c, n, s, upstream, no_row);
    } else {
      sigmoid_focal_row</*kGrad=*/true, kAlpha, kLabels>(o, rows, c, n, s, upstream, out + c * out_row);
    }
  }
  if constexpr (kFocal == FOCAL_SOFTMAX) {
    // log_softmax's backward over the kept classes: g_c - p_c sum_k g_k.
    const acc_t* dot = s.focal_dot.data();
    for (int64_t c = o.drop; c < o.classes; ++c) {
      const acc_t* pc = s.focal_e.data() + c * o.tile;
      const acc_t* gc = s.focal_g.data() + c * o.tile;
      acc_t* oc = out + c * out_row;
      MEDLOSS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        oc[j] += gc[j] - pc[j] * dot[j];
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------- entry points

template <typename scalar_t, typename acc_t>
MEDLOSS_TILE_TARGET void gather(const scalar_t* image, int64_t stride_c, int64_t stride_s, int64_t classes,
                                int64_t first, int64_t n, int64_t tile, acc_t* dst) {
  gather_body(image, stride_c, stride_s, classes, first, n, tile, dst);
}

template <typename scalar_t, typename acc_t>
MEDLOSS_TILE_TARGET void scatter(const acc_t* src, int64_t stride_c, int64_t stride_s, int64_t classes, int64_t first,
                                 int64_t n, int64_t tile, scalar_t* image) {
  scatter_body(src, stride_c, stride_s, classes, first, n, tile, image);
}

template <typename label_t, typename acc_t>
MEDLOSS_TILE_TARGET int64_t load_labels(const Options<acc_t>& o, const label_t* row, int64_t stride_s, int64_t first,
                                        int64_t n, Scratch<acc_t>& s) {
  return load_labels_any(o, row, stride_s, first, n, s);
}

template <typename acc_t, int64_t kActivation, bool kSquared, bool kLabels>
MEDLOSS_TILE_TARGET void forward_tile(const Options<acc_t>& o, const Rows<acc_t>& rows, int64_t n,
                                      Scratch<acc_t>& s) {
  forward_tile_body<acc_t, kActivation, kSquared, kLabels>(o, rows, n, s);
}

template <typename acc_t, int64_t kActivation, bool kSquared, bool kLabels>
MEDLOSS_TILE_TARGET void backward_tile(const Options<acc_t>& o, const Upstream<acc_t>& up, const Rows<acc_t>& rows,
                                       int64_t n, Scratch<acc_t>& s, acc_t* out, int64_t out_row) {
  backward_tile_body<acc_t, kActivation, kSquared, kLabels>(o, up, rows, n, s, out, out_row);
}

template <int64_t kFocal, int64_t kAlpha, bool kLabels, typename acc_t>
MEDLOSS_TILE_TARGET void focal_forward(const Options<acc_t>& o, const Rows<acc_t>& rows, int64_t n, Scratch<acc_t>& s,
                                       acc_t* map, int64_t map_row) {
  focal_forward_body<kFocal, kAlpha, kLabels>(o, rows, n, s, map, map_row);
}

template <int64_t kFocal, int64_t kAlpha, bool kLabels, typename acc_t>
MEDLOSS_TILE_TARGET void focal_backward(const Options<acc_t>& o, const Upstream<acc_t>& up, const Rows<acc_t>& rows,
                                        int64_t n, Scratch<acc_t>& s, acc_t* out, int64_t out_row) {
  focal_backward_body<kFocal, kAlpha, kLabels>(o, up, rows, n, s, out, out_row);
}

// The sigmoid form for each alpha mode; the softmax form's alpha is a constant per class row, so one function
// serves every mode.
template <typename acc_t, bool kLabels>
void add_focal_tiles(TileKernels<acc_t>& k) {
  constexpr int64_t kSigmoid = FOCAL_SIGMOID - 1, kSoftmax = FOCAL_SOFTMAX - 1;
  k.focal_forward[kSigmoid][ALPHA_NONE][kLabels] = &focal_forward<FOCAL_SIGMOID, ALPHA_NONE, kLabels, acc_t>;
  k.focal_forward[kSigmoid][ALPHA_SCALAR][kLabels] = &focal_forward<FOCAL_SIGMOID, ALPHA_SCALAR, kLabels, acc_t>;
  k.focal_forward[kSigmoid][ALPHA_PER_CLASS][kLabels] =
      &focal_forward<FOCAL_SIGMOID, ALPHA_PER_CLASS, kLabels, acc_t>;
  k.focal_backward[kSigmoid][ALPHA_NONE][kLabels] = &focal_backward<FOCAL_SIGMOID, ALPHA_NONE, kLabels, acc_t>;
  k.focal_backward[kSigmoid][ALPHA_SCALAR][kLabels] = &focal_backward<FOCAL_SIGMOID, ALPHA_SCALAR, kLabels, acc_t>;
  k.focal_backward[kSigmoid][ALPHA_PER_CLASS][kLabels] =
      &focal_backward<FOCAL_SIGMOID, ALPHA_PER_CLASS, kLabels, acc_t>;
  for (int64_t alpha = 0; alpha < 3; ++alpha) {
    k.focal_forward[kSoftmax][alpha][kLabels] = &focal_forward<FOCAL_SOFTMAX, ALPHA_NONE, kLabels, acc_t>;
    k.focal_backward[kSoftmax][alpha][kLabels] = &focal_backward<FOCAL_SOFTMAX, ALPHA_NONE, kLabels, acc_t>;
  }
}

template <typename acc_t, int64_t kActivation, bool kSquared>
void add_tiles(TileKernels<acc_t>& k) {
  k.forward[kActivation][kSquared][0] = &forward_tile<acc_t, kActivation, kSquared, false>;
  k.forward[kActivation][kSquared][1] = &forward_tile<acc_t, kActivation, kSquared, true>;
  k.backward[kActivation][kSquared][0] = &backward_tile<acc_t, kActivation, kSquared, false>;
  k.backward[kActivation][kSquared][1] = &backward_tile<acc_t, kActivation, kSquared, true>;
}

template <typename acc_t>
TileKernels<acc_t> make_tile_kernels() {
  TileKernels<acc_t> k{};
  add_tiles<acc_t, ACTIVATION_NONE, false>(k);
  add_tiles<acc_t, ACTIVATION_NONE, true>(k);
  add_tiles<acc_t, ACTIVATION_SOFTMAX, false>(k);
  add_tiles<acc_t, ACTIVATION_SOFTMAX, true>(k);
  add_tiles<acc_t, ACTIVATION_SIGMOID, false>(k);
  add_tiles<acc_t, ACTIVATION_SIGMOID, true>(k);
  add_focal_tiles<acc_t, false>(k);
  add_focal_tiles<acc_t, true>(k);
  k.gather = {&gather<float, acc_t>, &gather<double, acc_t>, &gather<c10::Half, acc_t>, &gather<c10::BFloat16, acc_t>};
  if constexpr (std::is_same_v<acc_t, double>) {
    k.scatter = {&scatter<double, double>};
  } else {
    k.scatter = {&scatter<float, float>, &scatter<c10::Half, float>, &scatter<c10::BFloat16, float>};
  }
  k.load_labels = {&load_labels<uint8_t, acc_t>, &load_labels<int8_t, acc_t>, &load_labels<int16_t, acc_t>,
                   &load_labels<int32_t, acc_t>, &load_labels<int64_t, acc_t>};
  return k;
}

}  // namespace
}  // namespace dice_sums_cpu
}  // namespace torch_medloss
