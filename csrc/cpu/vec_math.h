// Shared by the CPU kernels: the branch-free, vectorisable float32 exp and log, and the bit tricks (select) their
// loops need. Everything is in an anonymous namespace and forced inline, so each file gets its own copy, compiled
// for the entry points that inline it (see isa.h).
#pragma once

#include "isa.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace torch_medloss {
namespace {

// ------------------------------------------------------------------------------------------ vectorisable math

// The unsigned integer as wide as the float type T.
template <typename T>
using bits_t = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;

template <typename T>
MEDLOSS_INLINE bits_t<T> bits_of(T value) {
  bits_t<T> bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

template <typename T>
MEDLOSS_INLINE T value_of(bits_t<T> bits) {
  T value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// cond ? a : b through a bit mask, both operands computed. Written with ?: instead, a choice between constants (a
// clamp bound, 0 or 1) lets GCC thread that branch through the rest of the loop body; under -ftrapping-math (the
// default) it may not then execute the branch's floating-point operations unconditionally, so the loop no longer
// vectorises. Loops that use it vectorise with SSE2's and/andnot/or.
template <typename T>
MEDLOSS_INLINE T select(bool cond, T a, T b) {
  const bits_t<T> mask = bits_t<T>(0) - static_cast<bits_t<T>>(cond);
  return value_of<T>((bits_of(a) & mask) | (bits_of(b) & ~mask));
}

// 1 where cond, else 0.
template <typename T>
MEDLOSS_INLINE T indicator(bool cond) {
  return select(cond, T(1), T(0));
}

// exp(x) for float32, within 1 ulp of the exact value over every float in [-100, 90] (at most 0.98 ulp, 1.01 where
// FMA is used; 0.065 on average; subnormal results included), 0 below -104 (where exp rounds to 0), +inf above
// 88.73, NaN for NaN. x = n ln2 + r, |r| <= ln2 / 2, with n = round(x / ln2) by the 1.5 * 2^23 shifter (the sum's
// low mantissa bits hold n) and r by a two-part ln2 (n * kLn2Hi is exact: kLn2Hi has 15 significant bits and
// |n| <= 151); then exp(r) = 1 + r + r^2 q(r) with q a degree-4 minimax fit (relative error 3.3e-9 on |r| <= 0.35),
// and 2^n = 2^(n - n/2) 2^(n/2), two normal powers of two built in the exponent field, so that results down to the
// subnormals and up to the overflow are rounded once.
// kNonPositive, for the softmax's x - max (<= 0, or NaN; positive x give garbage): no upper clamp, and n added to
// the exponent field, which flushes results below 2^-125 to 0 (the same error above).
template <bool kNonPositive = false>
MEDLOSS_INLINE float exp_f32(float x) {
  constexpr float kLog2e = 1.44269502f;
  constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23
  constexpr float kLn2Hi = 0.693145751953125f;
  constexpr float kLn2Lo = 1.42860677e-06f;  // ln2 - kLn2Hi
  x = select(x < -104.0f, -104.0f, x);  // NaN fails both comparisons and stays NaN
  if constexpr (!kNonPositive) {
    x = select(x > 89.0f, 89.0f, x);
  }
  const float shifted = x * kLog2e + kShifter;
  const float n = shifted - kShifter;
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float q = 1.3812477e-3f;
  q = q * r + 8.3694225e-3f;
  q = q * r + 4.1668467e-2f;
  q = q * r + 1.6666515e-1f;
  q = q * r + 4.9999994e-1f;
  const float poly = 1.0f + (r + (r * r) * q);
  // n as an integer, from the low mantissa bits (the difference of the bit patterns; no float-to-int conversion,
  // which is undefined for NaN). Unsigned arithmetic: no overflow for the garbage that NaN gives.
  const uint32_t k = bits_of(shifted) - bits_of(kShifter);
  if constexpr (kNonPositive) {
    // 2^n poly by adding n to poly's exponent field: exact while the result is normal, which n >= -125 ensures
    // (poly >= 0.7); below, the result (< 2^-125) is flushed to 0. Adding x - x (0, or NaN for NaN) keeps NaN,
    // whose garbage n could otherwise turn the exponent field into a number's.
    const float scaled = value_of<float>(bits_of(poly) + (k << 23));
    return select(n < -125.5f, 0.0f, scaled) + (x - x);
  }
  const uint32_t half = static_cast<uint32_t>(static_cast<int32_t>(k) >> 1);
  const float scale_a = value_of<float>((half + 127u) << 23);
  const float scale_b = value_of<float>((k - half + 127u) << 23);
  return poly * scale_a * scale_b;
}

// log(x) for float32, within 1 ulp of the exact value for every positive float (0.93 ulp at most), subnormals
// included; log(0) = -inf, log(+inf) = +inf, NaN for x < 0 and for NaN. x = 2^e m with m in [sqrt(1/2), sqrt(2))
// (from the bit pattern; subnormals are scaled by 2^23 first), f = m - 1 (exact), log(1 + f) = f - f^2 / 2 +
// f^3 q(f) with q a degree-7 minimax fit (relative error 6e-9), plus e ln2 in two parts.
MEDLOSS_INLINE float log_f32(float x) {
  constexpr uint32_t kSqrtHalfBits = 0x3f3504f3u;  // sqrt(1/2)
  constexpr float kLn2Hi = 0.693145751953125f;
  constexpr float kLn2Lo = 1.42860677e-06f;
  const bool tiny = x < 1.17549435e-38f;  // subnormal, zero or negative
  const float scaled = select(tiny, x * 8388608.0f, x);
  const uint32_t offset = bits_of(scaled) - kSqrtHalfBits;
  const uint32_t tiny_mask = 0u - static_cast<uint32_t>(tiny);  // as select(): no ?: on a constant here
  const int32_t e = (static_cast<int32_t>(offset) >> 23) - static_cast<int32_t>(tiny_mask & 23u);
  const float f = value_of<float>((offset & 0x007fffffu) + kSqrtHalfBits) - 1.0f;
  float q = -0.076342866f;
  q = q * f + 0.12769286f;
  q = q * f - 0.13163829f;
  q = q * f + 0.14200978f;
  q = q * f - 0.16622931f;
  q = q * f + 0.20001245f;
  q = q * f - 0.2500083f;
  q = q * f + 0.3333333f;
  const float ef = static_cast<float>(e);
  const float tail = (f * f) * (f * q - 0.5f) + ef * kLn2Lo;
  float y = ef * kLn2Hi + (f + tail);
  y = select(x < std::numeric_limits<float>::infinity(), y, x);  // +inf and NaN give themselves
  y = select(x == 0.0f, -std::numeric_limits<float>::infinity(), y);
  y = select(x < 0.0f, std::numeric_limits<float>::quiet_NaN(), y);
  return y;
}

// The accumulation type's exp, log and pow: the inline float versions above, the libm ones for double.
template <bool kNonPositive = false, typename acc_t>
MEDLOSS_INLINE acc_t exp_acc(acc_t x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return exp_f32<kNonPositive>(x);
  } else {
    return std::exp(x);
  }
}

template <typename acc_t>
MEDLOSS_INLINE acc_t log_acc(acc_t x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return log_f32(x);
  } else {
    return std::log(x);
  }
}

}  // namespace
}  // namespace torch_medloss
