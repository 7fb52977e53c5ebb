// CPU kernels of torch_medloss::dice_sums_fwd and dice_sums_bwd (schema and contract in csrc/dice_sums.cpp; the
// ground truth is torch_medloss/reference/dice_sums.py).
//
// Work split. Each image's S pixels are cut into chunks of kChunkPixels; one at::parallel_for task handles one
// (image, chunk). In the forward it writes its own row of a partial-sum buffer, and the rows of an image are added
// in chunk order at the end. The chunk size is a constant (never derived from the thread count), so every partial
// row, and so every sum, is bitwise the same run to run and for any number of threads. The backward has no
// reduction over pixels: each task writes the gradient of its own pixels.
//
// Tiles. Inside a task the pixels go through class-major tiles of T pixels: class c of the tile's pixel j is element
// j of row c. Logits and a dense target in the accumulation type with unit pixel stride (contiguous float32 or
// float64 NCHW) are read in place, a row being a slice of the tensor; any other dtype or layout is gathered into a
// tile buffer, one class row at a time (a strided read for channels_last). A label map stays a row of labels: the
// one-hot y of class c is the comparison label == c, made inside the loops that use it. Every inner loop then runs
// over the pixels of one class row with unit stride and no branch, so the compiler vectorises it whatever C is. (A
// per-pixel buffer of C classes, the other layout, would vectorise loops of 2 to 5 iterations for the usual C.)
//
// Passes. Per tile: the softmax statistics (max over the classes; exp(x - max) kept in a tile; 1 / sum and, with the
// cross entropy, log(sum) per pixel), then one fused loop per class row that makes p, y, the mask, the modulator
// and every sum (forward) or the gradient (backward) in registers; the softmax backward and the cross entropy,
// which need sums over the classes first, add a second loop per class row that writes the gradient (in place in
// the output when it is float32/float64 with unit pixel stride; otherwise a tile that is scattered, converting).
// The switches are hoisted: activation, squared and the target kind are template arguments of the tile functions,
// picked once per call; the modulator case (gamma 0: m = 1 without pow, 1, 2, other) and the cross entropy are
// template arguments of the class-row loops, picked once per row.
//
// Accumulation. The forward keeps kLanes running sums per (class, quantity): lane m adds the pixels j = m mod kLanes
// of each tile, in pixel order. Added elementwise, they vectorise without reassociating anything and stay in
// registers for a whole class row; the lanes are summed in lane order at the end of the chunk. kLanes is a constant,
// not the vector width, so the sums do not depend on the instruction set that computes them.
//
// Float math. exp, log and pow of float32 (and of bfloat16/float16, which accumulate in float32) are the inline
// exp_f32 and log_f32 below, not libm's scalar calls (most of the time of the earlier kernel): branch-free, written
// so that GCC and Clang vectorise them without -ffast-math (which would also let the compiler reorder the sums).
// exp_f32 is within 1 ulp over every float in [-100, 90] (subnormal results included), log_f32 over every positive
// float; the softmax's exp(x - max <= 0) uses a shorter variant that flushes results below 2^-125 to 0 (a
// probability of < 3e-38 instead of a subnormal one). float64 keeps std::exp, std::log and std::pow (gradcheck
// compares it with the reference to ~1e-12).
//
// Instruction sets. The float32 tile functions, label loaders, gathers and scatters are compiled three times from
// the same always-inline code: for the baseline (SSE2 on x86-64, NEON on aarch64), and, with GCC or Clang on x86-64,
// under target("avx2,fma") and target("avx512..."). cpu_isa() picks one at run time, as torch does for its own
// kernels; no compile flag is needed and the library runs on any CPU. The AVX2 and AVX-512 versions may fuse a
// multiply and an add (FMA), so their last bits can differ from the baseline's; on one machine the results are
// still the same run to run and for any number of threads. ATEN_CPU_CAPABILITY=default (or avx2) selects the
// baseline (or AVX2) version, to test it.
//
// Cost. logits (2, 4, 48, 48, 48) float32, int64 labels, softmax, one thread of an AVX-512 EPYC: forward 0.36 ms,
// backward 0.42 ms (the kernel with libm's calls: 2.3 and 2.5 ms); 0.58 and 0.62 ms with AVX2, 1.5 and 1.7 ms with
// SSE2.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include "vec_math.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

// Marks an inner loop over tile rows as safe to vectorise: the rows never alias, which the compiler cannot prove
// for several row pointers (it then gives up or adds run-time checks). OpenMP's simd, honoured under the -fopenmp
// the build uses. Only on elementwise loops (no floating-point reductions), so vectorising changes no result.
#define MEDLOSS_SIMD _Pragma("omp simd")

namespace torch_medloss {
namespace {

// Pixels per task: enough to amortise a task's scratch and its partial row, few enough to spread one image over
// the threads. A constant: the partial sums must not depend on the thread count.
constexpr int64_t kChunkPixels = 8192;
// Tile size in elements (C * T) aimed at: the tile-sized buffers of a task then stay in L1/L2.
constexpr int64_t kTileElements = 4096;
// Pixels per tile: MAX at most (long rows amortise each loop's set-up), 8 at least (for C > 512).
constexpr int64_t kMaxTilePixels = 256;
constexpr int64_t kMinTilePixels = 8;
static_assert(kChunkPixels % kMaxTilePixels == 0, "a chunk must hold whole tiles");
// Running sums per (class, quantity) in the forward: lane m takes the pixels j = m mod kLanes of every tile. A
// constant, not the vector width: the sums are the same whatever instruction set runs them.
constexpr int64_t kLanes = 16;

constexpr int64_t kActivationNone = 0, kActivationSoftmax = 1, kActivationSigmoid = 2;
constexpr int64_t kMaskNone = 0, kMaskLabel = 1, kMaskChannel = 2, kMaskSentinel = 3;
constexpr int64_t kNumSums = 4;    // I, P, G, D
constexpr int64_t kNumExtras = 3;  // ce_num, ce_den, invalid

// The modulator m = |p' - y'|^gamma of a class row, by gamma: 0 (m = 1, no pow, as the contract says), 1, 2, other.
constexpr int kModOne = 0, kModAbs = 1, kModSquare = 2, kModPow = 3;

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// The largest power of two in [kMinTilePixels, kMaxTilePixels] with C * T <= kTileElements (else the smallest).
int64_t tile_pixels(int64_t classes) {
  int64_t tile = kMaxTilePixels;
  while (tile > kMinTilePixels && tile * classes > kTileElements) {
    tile /= 2;
  }
  return tile;
}

bool is_label_dtype(at::ScalarType dtype) {
  return dtype == at::kByte || dtype == at::kChar || dtype == at::kShort || dtype == at::kInt || dtype == at::kLong;
}

bool is_float_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}


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

// ------------------------------------------------------------------------------------------------- argument checks

void check_vector(const char* op, const char* name, const at::Tensor& vector, const at::Tensor& logits) {
  TORCH_CHECK(vector.dim() == 1 && vector.size(0) == logits.size(1), op, ": ", name, " must have shape (C,) = [",
              logits.size(1), "], got ", vector.sizes());
  TORCH_CHECK(is_float_dtype(vector.scalar_type()), op, ": ", name,
              " must be float32, float64, bfloat16 or float16, got ", vector.scalar_type());
  TORCH_CHECK(vector.device() == logits.device(), op, ": ", name, " must be on the logits' device (",
              logits.device(), "), got ", vector.device());
}

void check_inputs(const char* op, const at::Tensor& logits, const at::Tensor& target, const at::Tensor& gamma,
                  const at::Tensor& ce_weight, int64_t activation, bool target_is_labels, int64_t ignore_index,
                  int64_t mask_mode) {
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be 3-D (B, C, S), got shape ", logits.sizes());
  TORCH_CHECK(is_float_dtype(logits.scalar_type()), op,
              ": logits must be float32, float64, bfloat16 or float16, got ", logits.scalar_type());
  TORCH_CHECK(logits.size(1) >= 1, op, ": logits must have at least one class (C >= 1), got shape ",
              logits.sizes());
  // The tiles hold the labels as int32 (a value, not an index).
  TORCH_CHECK(logits.size(1) <= INT32_MAX, op, ": logits must have at most 2**31 - 1 classes, got shape ",
              logits.sizes());
  const int64_t batch = logits.size(0);
  const int64_t classes = logits.size(1);
  const int64_t pixels = logits.size(2);
  if (target_is_labels) {
    TORCH_CHECK(target.dim() == 2 && target.size(0) == batch && target.size(1) == pixels, op,
                ": target (labels) must have shape (B, S) = [", batch, ", ", pixels, "], got ", target.sizes());
    TORCH_CHECK(is_label_dtype(target.scalar_type()), op,
                ": target (labels) must be uint8, int8, int16, int32 or int64, got ", target.scalar_type());
  } else {
    TORCH_CHECK(target.sizes() == logits.sizes(), op, ": target (dense) must have the logits' shape (B, C, S) = ",
                logits.sizes(), ", got ", target.sizes());
    TORCH_CHECK(is_float_dtype(target.scalar_type()), op,
                ": target (dense) must be float32, float64, bfloat16 or float16, got ", target.scalar_type());
  }
  TORCH_CHECK(target.device() == logits.device(), op, ": target must be on the logits' device (", logits.device(),
              "), got ", target.device());
  check_vector(op, "gamma", gamma, logits);
  check_vector(op, "ce_weight", ce_weight, logits);
  TORCH_CHECK(activation >= kActivationNone && activation <= kActivationSigmoid, op,
              ": activation must be 0 (none), 1 (softmax) or 2 (sigmoid), got ", activation);
  TORCH_CHECK(mask_mode >= kMaskNone && mask_mode <= kMaskSentinel, op,
              ": mask_mode must be 0 (none), 1 (label), 2 (channel) or 3 (sentinel), got ", mask_mode);
  TORCH_CHECK(target_is_labels || mask_mode != kMaskChannel || (ignore_index >= 0 && ignore_index < classes), op,
              ": ignore_index must be a channel in [0, ", classes, ") for mask_mode 2 (channel), got ", ignore_index);
}

void check_upstream(const char* op, const at::Tensor& grad_sums, const at::Tensor& grad_extras,
                    const at::Tensor& logits) {
  const int64_t batch = logits.size(0);
  const int64_t classes = logits.size(1);
  TORCH_CHECK(grad_sums.dim() == 3 && grad_sums.size(0) == batch && grad_sums.size(1) == classes &&
                  grad_sums.size(2) == kNumSums,
              op, ": grad_sums must have shape (B, C, 4) = [", batch, ", ", classes, ", 4], got ", grad_sums.sizes());
  TORCH_CHECK(grad_extras.dim() == 2 && grad_extras.size(0) == batch && grad_extras.size(1) == kNumExtras, op,
              ": grad_extras must have shape (B, 3) = [", batch, ", 3], got ", grad_extras.sizes());
  const auto check_upstream_tensor = [&](const char* name, const at::Tensor& grad) {
    TORCH_CHECK(is_float_dtype(grad.scalar_type()), op, ": ", name,
                " must be float32, float64, bfloat16 or float16, got ", grad.scalar_type());
    TORCH_CHECK(grad.device() == logits.device(), op, ": ", name, " must be on the logits' device (",
                logits.device(), "), got ", grad.device());
  };
  check_upstream_tensor("grad_sums", grad_sums);
  check_upstream_tensor("grad_extras", grad_extras);
}


// ------------------------------------------------------------------------------------------------ options, scratch

template <typename acc_t>
struct Options {
  int64_t classes;
  int64_t tile;  // T, pixels per tile
  int64_t ignore_index;
  int64_t mask_mode;
  bool with_ce;
  acc_t keep;              // 1 - label_smoothing
  acc_t spread;            // label_smoothing / C
  const acc_t* gamma;      // (C,)
  const acc_t* ce_weight;  // (C,)
};

// The class rows of one tile: class c of the logits at x + c * x_row, of a dense target at y + c * y_row (unused
// for labels). In place in the tensors, or in the task's gather buffers (row = T).
template <typename acc_t>
struct Rows {
  const acc_t* x;
  int64_t x_row;
  const acc_t* y;
  int64_t y_row;
};

// One task's buffers: class-major (C * T) tiles and per-pixel (T) rows. lane_rows > 0: the forward's running sums.
template <typename acc_t>
struct Scratch {
  Scratch(int64_t classes, int64_t tile, int64_t lane_rows, bool backward)
      : x(classes * tile),
        y(classes * tile),
        e(classes * tile),
        g(backward ? classes * tile : 0),
        w(tile),
        v(tile),
        max(tile),
        inv(tile),
        log_sum(tile),
        total(tile),
        dot(tile),
        label(tile),
        lanes(lane_rows * kLanes) {}

  std::vector<acc_t> x;  // gathered logits
  std::vector<acc_t> y;  // gathered dense target
  std::vector<acc_t> e;  // exp(x - max); the softmax backward replaces it by p
  std::vector<acc_t> g;  // backward: the gradient before the second pass, and the tile scatter writes out
  std::vector<acc_t> w;  // valid-pixel weight
  std::vector<acc_t> v;  // 1 where the pixel counts in the cross entropy
  std::vector<acc_t> max, inv, log_sum;  // softmax statistics: max_c x, 1 / sum_c exp(x - max), log of that sum
  std::vector<acc_t> total;              // cross entropy: sum over the classes (of the loss, or of the shares)
  std::vector<acc_t> dot;                // softmax backward: sum_c p_c g_c
  std::vector<int32_t> label;            // the tile's labels, -1 when out of range
  std::vector<acc_t> lanes;              // forward: lane m of partial-row entry k at k * kLanes + m
};

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

template <typename scalar_t, typename acc_t>
using Gather = void (*)(const scalar_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, acc_t*);
template <typename scalar_t, typename acc_t>
using Scatter = void (*)(const acc_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, scalar_t*);

// The entry points (see MEDLOSS_INLINE).
template <typename scalar_t, typename acc_t>
void gather(const scalar_t* image, int64_t stride_c, int64_t stride_s, int64_t classes, int64_t first, int64_t n,
            int64_t tile, acc_t* dst) {
  gather_body(image, stride_c, stride_s, classes, first, n, tile, dst);
}

template <typename scalar_t, typename acc_t>
void scatter(const acc_t* src, int64_t stride_c, int64_t stride_s, int64_t classes, int64_t first, int64_t n,
             int64_t tile, scalar_t* image) {
  scatter_body(src, stride_c, stride_s, classes, first, n, tile, image);
}

#if MEDLOSS_X86_DISPATCH
template <typename scalar_t, typename acc_t>
MEDLOSS_TARGET_AVX2 void gather_avx2(const scalar_t* image, int64_t stride_c, int64_t stride_s, int64_t classes,
                                     int64_t first, int64_t n, int64_t tile, acc_t* dst) {
  gather_body(image, stride_c, stride_s, classes, first, n, tile, dst);
}

template <typename scalar_t, typename acc_t>
MEDLOSS_TARGET_AVX512 void gather_avx512(const scalar_t* image, int64_t stride_c, int64_t stride_s, int64_t classes,
                                         int64_t first, int64_t n, int64_t tile, acc_t* dst) {
  gather_body(image, stride_c, stride_s, classes, first, n, tile, dst);
}

template <typename scalar_t, typename acc_t>
MEDLOSS_TARGET_AVX2 void scatter_avx2(const acc_t* src, int64_t stride_c, int64_t stride_s, int64_t classes,
                                      int64_t first, int64_t n, int64_t tile, scalar_t* image) {
  scatter_body(src, stride_c, stride_s, classes, first, n, tile, image);
}

template <typename scalar_t, typename acc_t>
MEDLOSS_TARGET_AVX512 void scatter_avx512(const acc_t* src, int64_t stride_c, int64_t stride_s, int64_t classes,
                                          int64_t first, int64_t n, int64_t tile, scalar_t* image) {
  scatter_body(src, stride_c, stride_s, classes, first, n, tile, image);
}
#endif

template <typename scalar_t, typename acc_t>
Gather<scalar_t, acc_t> pick_gather(Isa isa) {
#if MEDLOSS_X86_DISPATCH
  if constexpr (std::is_same_v<acc_t, float>) {
    if (isa == Isa::kAvx512) {
      return &gather_avx512<scalar_t, acc_t>;
    }
    if (isa == Isa::kAvx2) {
      return &gather_avx2<scalar_t, acc_t>;
    }
  }
#endif
  (void)isa;
  return &gather<scalar_t, acc_t>;
}

template <typename scalar_t, typename acc_t>
Scatter<scalar_t, acc_t> pick_scatter(Isa isa) {
#if MEDLOSS_X86_DISPATCH
  if constexpr (std::is_same_v<acc_t, float>) {
    if (isa == Isa::kAvx512) {
      return &scatter_avx512<scalar_t, acc_t>;
    }
    if (isa == Isa::kAvx2) {
      return &scatter_avx2<scalar_t, acc_t>;
    }
  }
#endif
  (void)isa;
  return &scatter<scalar_t, acc_t>;
}

// The class rows of pixels [first, first + n) of one image of a (B, C, S) tensor (image points at its (c=0, i=0)
// element): in place when the tensor already holds acc_t with unit pixel stride, else gathered into buffer.
template <typename scalar_t, typename acc_t>
const acc_t* class_rows(Gather<scalar_t, acc_t> gather_fn, const scalar_t* image, int64_t stride_c, int64_t stride_s,
                        int64_t classes, int64_t first, int64_t n, int64_t tile, acc_t* buffer, int64_t& row) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (stride_s == 1) {
      row = stride_c;
      return image + first;
    }
  }
  gather_fn(image, stride_c, stride_s, classes, first, n, tile, buffer);
  row = tile;
  return buffer;
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
  const bool masked = o.mask_mode == kMaskLabel && o.ignore_index >= std::numeric_limits<value_t>::min() &&
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

template <typename label_t, typename acc_t>
using LoadLabels = int64_t (*)(const Options<acc_t>&, const label_t*, int64_t, int64_t, int64_t, Scratch<acc_t>&);

template <typename label_t, typename acc_t>
int64_t load_labels(const Options<acc_t>& o, const label_t* row, int64_t stride_s, int64_t first, int64_t n,
                    Scratch<acc_t>& s) {
  return load_labels_any(o, row, stride_s, first, n, s);
}

#if MEDLOSS_X86_DISPATCH
template <typename label_t, typename acc_t>
MEDLOSS_TARGET_AVX2 int64_t load_labels_avx2(const Options<acc_t>& o, const label_t* row, int64_t stride_s,
                                             int64_t first, int64_t n, Scratch<acc_t>& s) {
  return load_labels_any(o, row, stride_s, first, n, s);
}

template <typename label_t, typename acc_t>
MEDLOSS_TARGET_AVX512 int64_t load_labels_avx512(const Options<acc_t>& o, const label_t* row, int64_t stride_s,
                                                 int64_t first, int64_t n, Scratch<acc_t>& s) {
  return load_labels_any(o, row, stride_s, first, n, s);
}
#endif

template <typename label_t, typename acc_t>
LoadLabels<label_t, acc_t> pick_load_labels(Isa isa) {
#if MEDLOSS_X86_DISPATCH
  if constexpr (std::is_same_v<acc_t, float>) {
    if (isa == Isa::kAvx512) {
      return &load_labels_avx512<label_t, acc_t>;
    }
    if (isa == Isa::kAvx2) {
      return &load_labels_avx2<label_t, acc_t>;
    }
  }
#endif
  (void)isa;
  return &load_labels<label_t, acc_t>;
}

// w (by mask_mode) and v = 1 for the pixels of a dense target's tile.
template <typename acc_t>
MEDLOSS_INLINE void dense_masks(const Options<acc_t>& o, const Rows<acc_t>& rows, int64_t n, Scratch<acc_t>& s) {
  acc_t* w = s.w.data();
  if (o.mask_mode == kMaskChannel) {
    const acc_t* ignored = rows.y + o.ignore_index * rows.y_row;
    MEDLOSS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      w[j] = acc_t(1) - ignored[j];
    }
  } else if (o.mask_mode == kMaskSentinel) {
    acc_t* total = s.total.data();
    std::fill(total, total + n, acc_t(0));
    for (int64_t c = 0; c < o.classes; ++c) {
      const acc_t* yc = rows.y + c * rows.y_row;
      MEDLOSS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        total[j] += yc[j];
      }
    }
    MEDLOSS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      w[j] = indicator<acc_t>(total[j] > acc_t(0));
    }
  } else {
    std::fill(w, w + n, acc_t(1));
  }
  std::fill(s.v.data(), s.v.data() + n, acc_t(1));
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
  if constexpr (kActivation == kActivationSoftmax) {
    return e * inv;
  } else if constexpr (kActivation == kActivationSigmoid) {
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
    const acc_t y = target_at<kLabels>(r.labels, r.cls, r.y, j);
    const acc_t share = r.weight * (r.keep * y + r.spread);
    r.total[j] += share * (r.x[j] - r.max[j] - r.log_sum[j]);
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
  acc_t* lanes = s.lanes.data() + c * kNumSums * kLanes;
  acc_t* den_lanes = s.lanes.data() + (o.classes * kNumSums + 1) * kLanes;
  acc_t sum_i[kLanes], sum_p[kLanes], sum_g[kLanes], sum_d[kLanes], den[kLanes];
  for (int64_t m = 0; m < kLanes; ++m) {
    sum_i[m] = lanes[m];
    sum_p[m] = lanes[kLanes + m];
    sum_g[m] = lanes[2 * kLanes + m];
    sum_d[m] = lanes[3 * kLanes + m];
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
    lanes[m] = sum_i[m];
    lanes[kLanes + m] = sum_p[m];
    lanes[2 * kLanes + m] = sum_g[m];
    lanes[3 * kLanes + m] = sum_d[m];
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

template <typename acc_t, int64_t kActivation, bool kSquared, bool kLabels>
MEDLOSS_INLINE void forward_tile_body(const Options<acc_t>& o, const Rows<acc_t>& rows, int64_t n,
                                      Scratch<acc_t>& s) {
  if (kActivation == kActivationSoftmax || o.with_ce) {
    softmax_stats(o, rows, n, o.with_ce, s);
  }
  acc_t* total = s.total.data();
  if (o.with_ce) {
    std::fill(total, total + n, acc_t(0));
    for (int64_t c = 0; c < o.classes; ++c) {
      forward_row_any<acc_t, kActivation, kSquared, kLabels, true>(o, rows, c, n, s);
    }
    const acc_t* v = s.v.data();
    acc_t* ce_num = s.lanes.data() + o.classes * kNumSums * kLanes;
    int64_t q = 0;
    for (; q + kLanes <= n; q += kLanes) {
      MEDLOSS_SIMD
      for (int64_t m = 0; m < kLanes; ++m) {
        ce_num[m] -= v[q + m] * total[q + m];
      }
    }
    for (int64_t m = 0; q + m < n; ++m) {
      ce_num[m] -= v[q + m] * total[q + m];
    }
  } else {
    for (int64_t c = 0; c < o.classes; ++c) {
      forward_row_any<acc_t, kActivation, kSquared, kLabels, false>(o, rows, c, n, s);
    }
  }
}

template <typename acc_t>
using ForwardTile = void (*)(const Options<acc_t>&, const Rows<acc_t>&, int64_t, Scratch<acc_t>&);

// The entry points (see MEDLOSS_INLINE).
template <typename acc_t, int64_t kActivation, bool kSquared, bool kLabels>
void forward_tile(const Options<acc_t>& o, const Rows<acc_t>& rows, int64_t n, Scratch<acc_t>& s) {
  forward_tile_body<acc_t, kActivation, kSquared, kLabels>(o, rows, n, s);
}

#if MEDLOSS_X86_DISPATCH
template <typename acc_t, int64_t kActivation, bool kSquared, bool kLabels>
MEDLOSS_TARGET_AVX2 void forward_tile_avx2(const Options<acc_t>& o, const Rows<acc_t>& rows, int64_t n,
                                           Scratch<acc_t>& s) {
  forward_tile_body<acc_t, kActivation, kSquared, kLabels>(o, rows, n, s);
}

template <typename acc_t, int64_t kActivation, bool kSquared, bool kLabels>
MEDLOSS_TARGET_AVX512 void forward_tile_avx512(const Options<acc_t>& o, const Rows<acc_t>& rows, int64_t n,
                                               Scratch<acc_t>& s) {
  forward_tile_body<acc_t, kActivation, kSquared, kLabels>(o, rows, n, s);
}
#endif

template <typename acc_t, int64_t kActivation, bool kSquared, bool kLabels>
ForwardTile<acc_t> forward_tile_for(Isa isa) {
#if MEDLOSS_X86_DISPATCH
  if constexpr (std::is_same_v<acc_t, float>) {
    if (isa == Isa::kAvx512) {
      return &forward_tile_avx512<acc_t, kActivation, kSquared, kLabels>;
    }
    if (isa == Isa::kAvx2) {
      return &forward_tile_avx2<acc_t, kActivation, kSquared, kLabels>;
    }
  }
#endif
  (void)isa;
  return &forward_tile<acc_t, kActivation, kSquared, kLabels>;
}

template <typename acc_t, bool kLabels>
ForwardTile<acc_t> pick_forward_tile(int64_t activation, bool squared, Isa isa) {
  switch (activation) {
    case kActivationSoftmax:
      return squared ? forward_tile_for<acc_t, kActivationSoftmax, true, kLabels>(isa)
                     : forward_tile_for<acc_t, kActivationSoftmax, false, kLabels>(isa);
    case kActivationSigmoid:
      return squared ? forward_tile_for<acc_t, kActivationSigmoid, true, kLabels>(isa)
                     : forward_tile_for<acc_t, kActivationSigmoid, false, kLabels>(isa);
    default:
      return squared ? forward_tile_for<acc_t, kActivationNone, true, kLabels>(isa)
                     : forward_tile_for<acc_t, kActivationNone, false, kLabels>(isa);
  }
}

// ------------------------------------------------------------------------------------------------ backward tile

// Upstream gradients of one image: grad_sums row (C, 4) and d/d ce_num.
template <typename acc_t>
struct Upstream {
  const acc_t* sums;
  acc_t ce_num;
};

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
  const acc_t grad_i = up.sums[c * kNumSums + 0];
  const acc_t grad_p = up.sums[c * kNumSums + 1];
  const acc_t grad_d = up.sums[c * kNumSums + 3];
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
    if constexpr (kActivation == kActivationSigmoid) {
      g = g * p * (acc_t(1) - p);
    }
    if constexpr (kCE) {
      total[j] += weight * (keep * target_at<kLabels>(labels, cls, yc, j) + spread);
    }
    if constexpr (kActivation == kActivationSoftmax) {
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
    if constexpr (kActivation == kActivationSoftmax) {
      g = ec[j] * (g - dot[j]);
    }
    if constexpr (kCE) {
      const acc_t q = kActivation == kActivationSoftmax ? ec[j] : ec[j] * inv[j];
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
  constexpr bool kSoftmax = kActivation == kActivationSoftmax;
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

template <typename acc_t>
using BackwardTile = void (*)(const Options<acc_t>&, const Upstream<acc_t>&, const Rows<acc_t>&, int64_t,
                              Scratch<acc_t>&, acc_t*, int64_t);

// The entry points (see MEDLOSS_INLINE).
template <typename acc_t, int64_t kActivation, bool kSquared, bool kLabels>
void backward_tile(const Options<acc_t>& o, const Upstream<acc_t>& up, const Rows<acc_t>& rows, int64_t n,
                   Scratch<acc_t>& s, acc_t* out, int64_t out_row) {
  backward_tile_body<acc_t, kActivation, kSquared, kLabels>(o, up, rows, n, s, out, out_row);
}

#if MEDLOSS_X86_DISPATCH
template <typename acc_t, int64_t kActivation, bool kSquared, bool kLabels>
MEDLOSS_TARGET_AVX2 void backward_tile_avx2(const Options<acc_t>& o, const Upstream<acc_t>& up,
                                            const Rows<acc_t>& rows, int64_t n, Scratch<acc_t>& s, acc_t* out,
                                            int64_t out_row) {
  backward_tile_body<acc_t, kActivation, kSquared, kLabels>(o, up, rows, n, s, out, out_row);
}

template <typename acc_t, int64_t kActivation, bool kSquared, bool kLabels>
MEDLOSS_TARGET_AVX512 void backward_tile_avx512(const Options<acc_t>& o, const Upstream<acc_t>& up,
                                                const Rows<acc_t>& rows, int64_t n, Scratch<acc_t>& s, acc_t* out,
                                                int64_t out_row) {
  backward_tile_body<acc_t, kActivation, kSquared, kLabels>(o, up, rows, n, s, out, out_row);
}
#endif

template <typename acc_t, int64_t kActivation, bool kSquared, bool kLabels>
BackwardTile<acc_t> backward_tile_for(Isa isa) {
#if MEDLOSS_X86_DISPATCH
  if constexpr (std::is_same_v<acc_t, float>) {
    if (isa == Isa::kAvx512) {
      return &backward_tile_avx512<acc_t, kActivation, kSquared, kLabels>;
    }
    if (isa == Isa::kAvx2) {
      return &backward_tile_avx2<acc_t, kActivation, kSquared, kLabels>;
    }
  }
#endif
  (void)isa;
  return &backward_tile<acc_t, kActivation, kSquared, kLabels>;
}

template <typename acc_t, bool kLabels>
BackwardTile<acc_t> pick_backward_tile(int64_t activation, bool squared, Isa isa) {
  switch (activation) {
    case kActivationSoftmax:
      return squared ? backward_tile_for<acc_t, kActivationSoftmax, true, kLabels>(isa)
                     : backward_tile_for<acc_t, kActivationSoftmax, false, kLabels>(isa);
    case kActivationSigmoid:
      return squared ? backward_tile_for<acc_t, kActivationSigmoid, true, kLabels>(isa)
                     : backward_tile_for<acc_t, kActivationSigmoid, false, kLabels>(isa);
    default:
      return squared ? backward_tile_for<acc_t, kActivationNone, true, kLabels>(isa)
                     : backward_tile_for<acc_t, kActivationNone, false, kLabels>(isa);
  }
}

// ------------------------------------------------------------------------------------------------- drivers

template <typename acc_t>
Options<acc_t> make_options(int64_t classes, int64_t ignore_index, int64_t mask_mode, bool with_ce,
                            double label_smoothing, const at::Tensor& gamma, const at::Tensor& ce_weight) {
  Options<acc_t> o;
  o.classes = classes;
  o.tile = tile_pixels(classes);
  o.ignore_index = ignore_index;
  o.mask_mode = mask_mode;
  o.with_ce = with_ce;
  // As in the reference: the Python floats 1 - eps and eps / C, rounded once to the accumulation type.
  o.keep = static_cast<acc_t>(1.0 - label_smoothing);
  o.spread = static_cast<acc_t>(label_smoothing / static_cast<double>(classes));
  o.gamma = gamma.const_data_ptr<acc_t>();
  o.ce_weight = ce_weight.const_data_ptr<acc_t>();
  return o;
}

// Where the tiles come from: the logits and the target, with their (batch, class, pixel) strides (a label map
// (B, S) has no class stride), and the label loader of the instruction set in use.
template <typename scalar_t, typename target_t, typename acc_t>
struct Source {
  Source(const at::Tensor& logits, const at::Tensor& target, Isa isa)
      : x(logits.const_data_ptr<scalar_t>()),
        t(target.const_data_ptr<target_t>()),
        gather_x(pick_gather<scalar_t, acc_t>(isa)) {
    for (int64_t d = 0; d < 3; ++d) {
      x_strides[d] = logits.stride(d);
    }
    if constexpr (std::is_integral_v<target_t>) {
      t_strides[0] = target.stride(0);
      t_strides[1] = 0;
      t_strides[2] = target.stride(1);
      labels = pick_load_labels<target_t, acc_t>(isa);
    } else {
      for (int64_t d = 0; d < 3; ++d) {
        t_strides[d] = target.stride(d);
      }
      gather_t = pick_gather<target_t, acc_t>(isa);
    }
  }

  // The rows of one tile (pixels [first, first + n) of image b) and its per-pixel masks; returns the number of
  // invalid labels (0 for a dense target).
  int64_t load(const Options<acc_t>& o, int64_t b, int64_t first, int64_t n, Scratch<acc_t>& s,
               Rows<acc_t>& rows) const {
    rows.x = class_rows(gather_x, x + b * x_strides[0], x_strides[1], x_strides[2], o.classes, first, n, o.tile,
                        s.x.data(), rows.x_row);
    if constexpr (std::is_integral_v<target_t>) {
      rows.y = nullptr;
      rows.y_row = 0;
      return labels(o, t + b * t_strides[0], t_strides[2], first, n, s);
    } else {
      rows.y = class_rows(gather_t, t + b * t_strides[0], t_strides[1], t_strides[2], o.classes, first, n, o.tile,
                          s.y.data(), rows.y_row);
      dense_masks(o, rows, n, s);
      return 0;
    }
  }

  const scalar_t* x;
  const target_t* t;
  int64_t x_strides[3];
  int64_t t_strides[3];
  Gather<scalar_t, acc_t> gather_x;
  Gather<target_t, acc_t> gather_t = nullptr;  // dense targets
  LoadLabels<target_t, acc_t> labels = nullptr;  // label maps
};

// Fills sums (B, C, 4) and extras (B, 3), both contiguous acc_t.
template <typename scalar_t, typename target_t, typename acc_t>
void forward_impl(const Options<acc_t>& o, int64_t activation, bool squared, const at::Tensor& logits,
                  const at::Tensor& target, at::Tensor& sums, at::Tensor& extras) {
  constexpr bool kLabels = std::is_integral_v<target_t>;
  const int64_t batch = logits.size(0);
  const int64_t classes = o.classes;
  const int64_t pixels = logits.size(2);
  const int64_t tile = o.tile;
  const int64_t chunks = ceil_div(pixels, kChunkPixels);
  // A partial row: I, P, G, D of each class, then ce_num and ce_den.
  const int64_t row = classes * kNumSums + 2;
  std::vector<acc_t> partial(batch * chunks * row);
  std::vector<int64_t> invalid(batch * chunks);

  const Isa isa = cpu_isa();
  const Source<scalar_t, target_t, acc_t> source(logits, target, isa);
  const ForwardTile<acc_t> tile_fn = pick_forward_tile<acc_t, kLabels>(activation, squared, isa);

  at::parallel_for(0, batch * chunks, /*grain_size=*/1, [&](int64_t first_task, int64_t last_task) {
    Scratch<acc_t> s(classes, tile, row, /*backward=*/false);
    Rows<acc_t> rows;
    for (int64_t task = first_task; task < last_task; ++task) {
      const int64_t b = task / chunks;
      const int64_t begin = (task % chunks) * kChunkPixels;
      const int64_t end = std::min(pixels, begin + kChunkPixels);
      std::fill(s.lanes.begin(), s.lanes.end(), acc_t(0));
      int64_t bad = 0;
      for (int64_t first = begin; first < end; first += tile) {
        const int64_t n = std::min(tile, end - first);
        bad += source.load(o, b, first, n, s, rows);
        tile_fn(o, rows, n, s);
      }
      // Lanes summed in lane order.
      acc_t* out = partial.data() + task * row;
      for (int64_t k = 0; k < row; ++k) {
        const acc_t* lane = s.lanes.data() + k * kLanes;
        acc_t total = 0;
        for (int64_t m = 0; m < kLanes; ++m) {
          total += lane[m];
        }
        out[k] = total;
      }
      invalid[task] = bad;
    }
  });

  // Chunk rows summed in chunk order; the outputs of different images are independent.
  acc_t* sums_out = sums.mutable_data_ptr<acc_t>();
  acc_t* extras_out = extras.mutable_data_ptr<acc_t>();
  at::parallel_for(0, batch, /*grain_size=*/1, [&](int64_t first_image, int64_t last_image) {
    std::vector<acc_t> total(row);
    for (int64_t b = first_image; b < last_image; ++b) {
      std::fill(total.begin(), total.end(), acc_t(0));
      int64_t bad = 0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const acc_t* in = partial.data() + (b * chunks + chunk) * row;
        for (int64_t k = 0; k < row; ++k) {
          total[k] += in[k];
        }
        bad += invalid[b * chunks + chunk];
      }
      std::copy(total.begin(), total.begin() + classes * kNumSums, sums_out + b * classes * kNumSums);
      acc_t* extra = extras_out + b * kNumExtras;
      extra[0] = total[classes * kNumSums];
      // Dense targets: ce_den is the pixel count, as the reference's float(S).
      extra[1] = kLabels || !o.with_ce ? total[classes * kNumSums + 1] : static_cast<acc_t>(pixels);
      extra[2] = static_cast<acc_t>(bad);
    }
  });
}

// Fills grad (B, C, S), in logits' dtype and with its own strides.
template <typename scalar_t, typename target_t, typename acc_t>
void backward_impl(const Options<acc_t>& o, int64_t activation, bool squared, const at::Tensor& grad_sums,
                   const at::Tensor& grad_extras, const at::Tensor& logits, const at::Tensor& target,
                   at::Tensor& grad) {
  constexpr bool kLabels = std::is_integral_v<target_t>;
  const int64_t batch = logits.size(0);
  const int64_t classes = o.classes;
  const int64_t pixels = logits.size(2);
  const int64_t tile = o.tile;
  const int64_t chunks = ceil_div(pixels, kChunkPixels);

  const Isa isa = cpu_isa();
  const Source<scalar_t, target_t, acc_t> source(logits, target, isa);
  scalar_t* dx = grad.mutable_data_ptr<scalar_t>();
  const acc_t* up_sums = grad_sums.const_data_ptr<acc_t>();
  const acc_t* up_extras = grad_extras.const_data_ptr<acc_t>();
  const int64_t g_b = grad.stride(0), g_c = grad.stride(1), g_s = grad.stride(2);
  const BackwardTile<acc_t> tile_fn = pick_backward_tile<acc_t, kLabels>(activation, squared, isa);
  const Scatter<scalar_t, acc_t> scatter_fn = pick_scatter<scalar_t, acc_t>(isa);

  at::parallel_for(0, batch * chunks, /*grain_size=*/1, [&](int64_t first_task, int64_t last_task) {
    Scratch<acc_t> s(classes, tile, 0, /*backward=*/true);
    Rows<acc_t> rows;
    for (int64_t task = first_task; task < last_task; ++task) {
      const int64_t b = task / chunks;
      const int64_t begin = (task % chunks) * kChunkPixels;
      const int64_t end = std::min(pixels, begin + kChunkPixels);
      const Upstream<acc_t> up{up_sums + b * classes * kNumSums, up_extras[b * kNumExtras]};
      for (int64_t first = begin; first < end; first += tile) {
        const int64_t n = std::min(tile, end - first);
        source.load(o, b, first, n, s, rows);
        // An acc_t gradient with unit pixel stride is written in place, row by row; any other is scattered.
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          if (g_s == 1) {
            tile_fn(o, up, rows, n, s, dx + b * g_b + first, g_c);
            continue;
          }
        }
        tile_fn(o, up, rows, n, s, s.g.data(), tile);
        scatter_fn(s.g.data(), g_c, g_s, classes, first, n, tile, dx + b * g_b);
      }
    }
  });
}

// A dtype as a value, for generic lambdas: Type<T>{} carries T.
template <typename T>
struct Type {
  using type = T;
};

// Calls body(Type<logits dtype>{}, Type<target dtype>{}) for the runtime dtypes of the logits and the target.
template <typename Body>
void dispatch(const at::Tensor& logits, const at::Tensor& target, bool target_is_labels,
              const Body& body) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "dice_sums_cpu", [&] {
    using logit_t = scalar_t;
    if (target_is_labels) {
      AT_DISPATCH_INTEGRAL_TYPES(target.scalar_type(), "dice_sums_cpu",
                                 [&] { body(Type<logit_t>{}, Type<scalar_t>{}); });
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, target.scalar_type(), "dice_sums_cpu",
                                      [&] { body(Type<logit_t>{}, Type<scalar_t>{}); });
    }
  });
}

at::ScalarType accumulator(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> dice_sums_fwd_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                     const at::Tensor& gamma, const at::Tensor& ce_weight,
                                                     int64_t activation, bool target_is_labels, int64_t ignore_index,
                                                     int64_t mask_mode, bool squared, bool with_ce,
                                                     double label_smoothing) {
  constexpr const char* op = "torch_medloss::dice_sums_fwd";
  check_inputs(op, logits, target, gamma, ce_weight, activation, target_is_labels, ignore_index, mask_mode);
  const int64_t batch = logits.size(0);
  const int64_t classes = logits.size(1);
  const at::ScalarType acc = accumulator(logits);
  at::Tensor sums = at::zeros({batch, classes, kNumSums}, logits.options().dtype(acc));
  at::Tensor extras = at::zeros({batch, kNumExtras}, logits.options().dtype(acc));
  if (logits.numel() == 0) {
    return {sums, extras};  // empty S: every sum is 0, ce_den (S) included
  }
  // gamma and ce_weight are (C,) parameters: converting them is cheap, unlike the logits and the target.
  const at::Tensor gamma_acc = gamma.to(acc).contiguous();
  const at::Tensor weight_acc = ce_weight.to(acc).contiguous();
  dispatch(logits, target, target_is_labels, [&](auto logit_type, auto target_type) {
    using scalar_t = typename decltype(logit_type)::type;
    using target_t = typename decltype(target_type)::type;
    using acc_t = at::opmath_type<scalar_t>;
    const Options<acc_t> o =
        make_options<acc_t>(classes, ignore_index, mask_mode, with_ce, label_smoothing, gamma_acc, weight_acc);
    forward_impl<scalar_t, target_t, acc_t>(o, activation, squared, logits, target, sums, extras);
  });
  return {sums, extras};
}

at::Tensor dice_sums_bwd_cpu(const at::Tensor& grad_sums, const at::Tensor& grad_extras, const at::Tensor& logits,
                             const at::Tensor& target, const at::Tensor& gamma, const at::Tensor& ce_weight,
                             int64_t activation, bool target_is_labels, int64_t ignore_index, int64_t mask_mode,
                             bool squared, bool with_ce, double label_smoothing) {
  constexpr const char* op = "torch_medloss::dice_sums_bwd";
  check_inputs(op, logits, target, gamma, ce_weight, activation, target_is_labels, ignore_index, mask_mode);
  check_upstream(op, grad_sums, grad_extras, logits);
  // Same strides as the logits for a dense, non-overlapping layout (channels_last stays channels_last).
  at::Tensor grad = at::empty_like(logits);
  if (logits.numel() == 0) {
    return grad;
  }
  const at::ScalarType acc = accumulator(logits);
  const int64_t classes = logits.size(1);
  const at::Tensor gamma_acc = gamma.to(acc).contiguous();
  const at::Tensor weight_acc = ce_weight.to(acc).contiguous();
  const at::Tensor up_sums = grad_sums.to(acc).contiguous();
  const at::Tensor up_extras = grad_extras.to(acc).contiguous();
  dispatch(logits, target, target_is_labels, [&](auto logit_type, auto target_type) {
    using scalar_t = typename decltype(logit_type)::type;
    using target_t = typename decltype(target_type)::type;
    using acc_t = at::opmath_type<scalar_t>;
    const Options<acc_t> o =
        make_options<acc_t>(classes, ignore_index, mask_mode, with_ce, label_smoothing, gamma_acc, weight_acc);
    backward_impl<scalar_t, target_t, acc_t>(o, activation, squared, up_sums, up_extras, logits, target, grad);
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_medloss, CPU, m) {
  m.impl("dice_sums_fwd", &dice_sums_fwd_cpu);
  m.impl("dice_sums_bwd", &dice_sums_bwd_cpu);
}

}  // namespace torch_medloss
