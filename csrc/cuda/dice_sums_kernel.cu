// CUDA kernels of torch_medloss::dice_sums_fwd and dice_sums_bwd (schema and contract in csrc/dice_sums.cpp; the
// ground truth is torch_medloss/reference/dice_sums.py). float32, bfloat16 and float16 logits; float64 logits are
// rejected (the CPU kernel takes them). Accumulation in float32.
//
// Forward. A block handles one (image, chunk of kChunkPixels pixels, group of classes). Each thread walks the
// chunk's pixels with stride kThreads (coalesced for NCHW) and keeps its running I, P, G, D of the group's classes,
// and ce_num, ce_den, invalid, in registers. The block then reduces them in a fixed order, a shuffle tree inside
// each warp and the warps in warp order through shared memory, into its own row of a partial buffer, and a torch
// sum over the chunks finishes. There are no float atomics, and the chunking is a constant, so the sums are bitwise
// the same run to run (and on any GPU with the same instruction set).
//
// Classes. Register arrays need compile-time sizes, so the forward is instantiated for C <= 4, 8 and 16 (the
// smallest bucket that holds C), with the logits of all classes cached in registers (4 C + 3 running sums). On
// sm_90 ptxas gives these buckets 78-80 (16 B spilled by the label kernels), 128 and 200-250 registers and no other
// spill; a 32 bucket spilled up to 3.4 KB per thread, so 16 is the largest (8 warps per SM: to be tuned on a GPU).
// Above 16 classes a slower path takes over, not a limit: the classes are split into groups of 16, one block per
// (image, chunk, group), the groups of a chunk adjacent in the grid so that they share its logits in L2; each block
// reads the logits of all classes for the softmax statistics, then its group's (ce_num is a sum of per-group parts).
// The backward caches up to 8 classes and streams the classes from memory (three passes per pixel, L1 hits) above.
//
// Backward. The same (image, chunk) blocks, one pixel per thread at a time, no reduction: it recomputes the
// activation, dL/dp, the softmax and cross-entropy dot products, and writes the pixel's gradient.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "integer_load.h"

#include <climits>
#include <cstdint>
#include <tuple>

namespace torch_medloss {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Pixels per block: 16 per thread, enough to amortise the block reduction of up to 4 * 32 + 3 sums. A constant: the
// partial sums, and so the result, must not depend on the GPU.
constexpr int64_t kChunkPixels = int64_t{kThreads} * 16;
// Forward: classes held in registers at most (the largest bucket), and the class-group size above it.
constexpr int kForwardGroup = 16;
// Backward: classes held in registers at most; above, the classes are streamed.
constexpr int kBackwardCached = 8;

constexpr int kActivationNone = 0, kActivationSoftmax = 1, kActivationSigmoid = 2;
constexpr int kMaskNone = 0, kMaskLabel = 1, kMaskChannel = 2, kMaskSentinel = 3;
constexpr int kNumSums = 4;    // I, P, G, D
constexpr int kNumExtras = 3;  // ce_num, ce_den, invalid

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

__device__ __forceinline__ int64_t ceil_div_device(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

bool is_float_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

// The target's dtype, read at run time: integer codes from integer_load.h, then the float dtypes of dense targets.
enum DenseType : int { kF32 = kI64 + 1, kF64, kF16, kBF16 };

int target_type(at::ScalarType dtype) {
  if (is_int_dtype(dtype)) {
    return int_type(dtype);
  }
  switch (dtype) {
    case at::kFloat:
      return kF32;
    case at::kDouble:
      return kF64;
    case at::kHalf:
      return kF16;
    default:
      return kBF16;
  }
}

__device__ __forceinline__ float load_dense(const void* base, int type, int64_t offset) {
  switch (type) {
    case kF32:
      return static_cast<const float*>(base)[offset];
    case kF64:
      return static_cast<float>(static_cast<const double*>(base)[offset]);
    case kF16:
      return static_cast<float>(static_cast<const c10::Half*>(base)[offset]);
    default:
      return static_cast<float>(static_cast<const c10::BFloat16*>(base)[offset]);
  }
}

// Sizes, strides (in elements) and options, passed by value.
struct Problem {
  int64_t classes;
  int64_t pixels;
  int64_t chunks;  // per image
  int64_t x_b, x_c, x_s;  // logits
  int64_t t_b, t_c, t_s;  // target (labels: t_c unused)
  int64_t g_b, g_c, g_s;  // grad_logits (backward)
  int64_t ignore_index;
  int target_type;
  int activation;
  int mask_mode;
  bool squared;
  bool with_ce;
  float keep;    // 1 - label_smoothing
  float spread;  // label_smoothing / C
};

// The target of pixel i of an image: w (the Dice weight), v (1 where the pixel counts in the cross entropy), the
// label (-1 when out of range; labels only) and whether it is invalid.
struct PixelTarget {
  float w;
  float v;
  int64_t label;
  bool invalid;
};

template <bool kLabels>
__device__ __forceinline__ PixelTarget load_pixel_target(const Problem& pr, const void* target, int64_t pixel_offset) {
  PixelTarget t{1.0f, 1.0f, -1, false};
  if constexpr (kLabels) {
    const int64_t raw = load_int(target, pr.target_type, pixel_offset);
    // One unsigned comparison rejects both raw < 0 and raw >= C.
    const bool in_range = static_cast<uint64_t>(raw) < static_cast<uint64_t>(pr.classes);
    const bool ignored = pr.mask_mode == kMaskLabel && raw == pr.ignore_index;
    t.invalid = !in_range && !ignored;
    t.label = in_range ? raw : -1;
    t.w = (in_range && !ignored) ? 1.0f : 0.0f;
    t.v = in_range ? 1.0f : 0.0f;
  } else {
    if (pr.mask_mode == kMaskChannel) {
      t.w = 1.0f - load_dense(target, pr.target_type, pixel_offset + pr.ignore_index * pr.t_c);
    } else if (pr.mask_mode == kMaskSentinel) {
      float total = 0.0f;
      for (int64_t c = 0; c < pr.classes; ++c) {
        total += load_dense(target, pr.target_type, pixel_offset + c * pr.t_c);
      }
      t.w = total > 0.0f ? 1.0f : 0.0f;
    }
  }
  return t;
}

template <bool kLabels>
__device__ __forceinline__ float target_value(const Problem& pr, const void* target, int64_t pixel_offset,
                                              const PixelTarget& t, int64_t c) {
  if constexpr (kLabels) {
    return t.label == c ? 1.0f : 0.0f;
  } else {
    return load_dense(target, pr.target_type, pixel_offset + c * pr.t_c);
  }
}

__device__ __forceinline__ float activate(int activation, float x, float max, float sum) {
  if (activation == kActivationSoftmax) {
    return expf(x - max) / sum;
  }
  if (activation == kActivationSigmoid) {
    return 1.0f / (1.0f + expf(-x));
  }
  return x;
}

// m = |p' - y'|^gamma, 1 where gamma = 0 (no pow).
__device__ __forceinline__ float modulator(float gamma, float diff) {
  if (gamma == 0.0f) {
    return 1.0f;
  }
  if (gamma == 1.0f) {
    return fabsf(diff);
  }
  if (gamma == 2.0f) {
    return diff * diff;
  }
  return powf(fabsf(diff), gamma);
}

// The softmax statistics of one pixel's raw logits over all C classes: max and sum_c exp(x_c - max). From the
// register cache when kCached, else from memory.
template <typename scalar_t, int kCache, bool kCached>
__device__ __forceinline__ void softmax_stats(const Problem& pr, const scalar_t* x_pixel, const float (&cache)[kCache],
                                              float& max, float& sum) {
  max = -INFINITY;
  sum = 0.0f;
  if constexpr (kCached) {
#pragma unroll
    for (int c = 0; c < kCache; ++c) {
      if (c < pr.classes) {
        max = fmaxf(max, cache[c]);
      }
    }
#pragma unroll
    for (int c = 0; c < kCache; ++c) {
      if (c < pr.classes) {
        sum += expf(cache[c] - max);
      }
    }
  } else {
    for (int64_t c = 0; c < pr.classes; ++c) {
      max = fmaxf(max, static_cast<float>(x_pixel[c * pr.x_c]));
    }
    for (int64_t c = 0; c < pr.classes; ++c) {
      sum += expf(static_cast<float>(x_pixel[c * pr.x_c]) - max);
    }
  }
}

// ----------------------------------------------------------------------------------------------------- forward

// partial_sums: (B, chunks, C, 4), partial_extras: (B, chunks, groups, 3), both float32 contiguous, every entry
// written once. logits: (B, C, S) with strides x_*; target: labels (B, S) or dense (B, C, S) with strides t_*.
// Grid: B * chunks * groups blocks, block (image * chunks + chunk) * groups + group handling classes
// [group * kGroup, (group + 1) * kGroup). kCached: one group holds all C classes (C <= kGroup), and their logits
// are cached in registers.
template <typename scalar_t, int kGroup, bool kLabels, bool kCached>
__global__ void __launch_bounds__(kThreads) dice_sums_fwd_kernel(
    // Output
    float* __restrict__ partial_sums, float* __restrict__ partial_extras,
    // Input
    const scalar_t* __restrict__ logits, const void* __restrict__ target, const float* __restrict__ gamma,
    const float* __restrict__ ce_weight,
    // Sizes, strides and options
    const Problem pr) {
  constexpr int kCount = kGroup * kNumSums + kNumExtras;  // per-thread sums: I, P, G, D per class, then extras
  constexpr int kCache = kCached ? kGroup : 1;
  __shared__ float group_gamma[kGroup];
  __shared__ float group_weight[kGroup];
  __shared__ float warp_sums[kWarps][kCount];

  const int64_t groups = ceil_div_device(pr.classes, kGroup);
  const int64_t block_row = static_cast<int64_t>(blockIdx.x) / groups;  // image * chunks + chunk
  const int64_t group = static_cast<int64_t>(blockIdx.x) % groups;
  const int64_t image = block_row / pr.chunks;
  const int64_t chunk = block_row % pr.chunks;
  const int64_t first_class = group * kGroup;
  const int64_t group_classes = min(static_cast<int64_t>(kGroup), pr.classes - first_class);
  for (int k = threadIdx.x; k < kGroup; k += kThreads) {
    group_gamma[k] = k < group_classes ? gamma[first_class + k] : 0.0f;
    group_weight[k] = k < group_classes ? ce_weight[first_class + k] : 0.0f;
  }
  __syncthreads();

  float acc[kCount];
#pragma unroll
  for (int q = 0; q < kCount; ++q) {
    acc[q] = 0.0f;
  }
  float& ce_num = acc[kGroup * kNumSums + 0];
  float& ce_den = acc[kGroup * kNumSums + 1];
  float& invalid = acc[kGroup * kNumSums + 2];

  const bool stats = pr.activation == kActivationSoftmax || pr.with_ce;
  const scalar_t* x_image = logits + image * pr.x_b;
  const int64_t begin = chunk * kChunkPixels;
  const int64_t end = min(pr.pixels, begin + kChunkPixels);
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const int64_t t_pixel = image * pr.t_b + i * pr.t_s;
    const PixelTarget t = load_pixel_target<kLabels>(pr, target, t_pixel);
    if (kLabels && group == 0) {
      invalid += t.invalid ? 1.0f : 0.0f;
      if (pr.with_ce && t.label >= 0) {
        ce_den += ce_weight[t.label];
      }
    }
    const scalar_t* x_pixel = x_image + i * pr.x_s;
    float cache[kCache];
    if constexpr (kCached) {
#pragma unroll
      for (int c = 0; c < kCache; ++c) {
        cache[c] = c < pr.classes ? static_cast<float>(x_pixel[c * pr.x_c]) : 0.0f;
      }
    }
    float max = 0.0f;
    float sum = 1.0f;
    if (stats) {
      softmax_stats<scalar_t, kCache, kCached>(pr, x_pixel, cache, max, sum);
    }
    const float log_sum = pr.with_ce ? logf(sum) : 0.0f;
    float ce_pixel = 0.0f;
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      if (k < group_classes) {
        const int64_t c = first_class + k;
        const float x = kCached ? cache[k < kCache ? k : 0] : static_cast<float>(x_pixel[c * pr.x_c]);
        const float y = target_value<kLabels>(pr, target, t_pixel, t, c);
        const float p = activate(pr.activation, x, max, sum);
        const float pw = t.w * p;
        const float yw = t.w * y;
        const float diff = pw - yw;
        const float m = modulator(group_gamma[k], diff);
        acc[k * kNumSums + 0] += m * pw * yw;
        acc[k * kNumSums + 1] += m * (pr.squared ? pw * pw : pw);
        acc[k * kNumSums + 2] += m * (pr.squared ? yw * yw : yw);
        acc[k * kNumSums + 3] += m * fabsf(diff);
        if (pr.with_ce) {
          ce_pixel += group_weight[k] * (pr.keep * y + pr.spread) * (x - max - log_sum);
        }
      }
    }
    ce_num -= t.v * ce_pixel;
  }

  // Fixed-order block reduction: a shuffle tree in each warp, then the warps in order.
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int q = 0; q < kCount; ++q) {
    float value = acc[q];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      value += __shfl_down_sync(0xffffffffu, value, offset);
    }
    if (lane == 0) {
      warp_sums[warp][q] = value;
    }
  }
  __syncthreads();
  for (int q = threadIdx.x; q < kCount; q += kThreads) {
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      total += warp_sums[w][q];
    }
    if (q < kGroup * kNumSums) {
      if (q < group_classes * kNumSums) {
        partial_sums[(block_row * pr.classes + first_class) * kNumSums + q] = total;
      }
    } else {
      partial_extras[(block_row * groups + group) * kNumExtras + (q - kGroup * kNumSums)] = total;
    }
  }
}

// ---------------------------------------------------------------------------------------------------- backward

// grad: (B, C, S) with strides g_*, every element written once. grad_sums: (B, C, 4), grad_extras: (B, 3), float32
// contiguous. Grid: x = B * chunks, as in the forward. kCache > 0: C <= kCache, the logits and dL/dp of a pixel stay
// in registers; kCache == 0: the classes are streamed from memory (any C).
template <typename scalar_t, int kCache, bool kLabels>
__global__ void __launch_bounds__(kThreads) dice_sums_bwd_kernel(
    // Output
    scalar_t* __restrict__ grad,
    // Input
    const float* __restrict__ grad_sums, const float* __restrict__ grad_extras, const scalar_t* __restrict__ logits,
    const void* __restrict__ target, const float* __restrict__ gamma, const float* __restrict__ ce_weight,
    // Sizes, strides and options
    const Problem pr) {
  constexpr bool kCached = kCache > 0;
  constexpr int kSlots = kCached ? kCache : 1;
  const int64_t image = static_cast<int64_t>(blockIdx.x) / pr.chunks;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) % pr.chunks;
  const float* up = grad_sums + image * pr.classes * kNumSums;  // (C, 4) of this image
  const float grad_ce = grad_extras[image * kNumExtras];
  const bool stats = pr.activation == kActivationSoftmax || pr.with_ce;
  const scalar_t* x_image = logits + image * pr.x_b;
  scalar_t* g_image = grad + image * pr.g_b;
  const int64_t begin = chunk * kChunkPixels;
  const int64_t end = min(pr.pixels, begin + kChunkPixels);

  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const int64_t t_pixel = image * pr.t_b + i * pr.t_s;
    const PixelTarget t = load_pixel_target<kLabels>(pr, target, t_pixel);
    const scalar_t* x_pixel = x_image + i * pr.x_s;
    float cache[kSlots];
    float grad_p[kSlots];
    if constexpr (kCached) {
#pragma unroll
      for (int c = 0; c < kSlots; ++c) {
        cache[c] = c < pr.classes ? static_cast<float>(x_pixel[c * pr.x_c]) : 0.0f;
      }
    }
    float max = 0.0f;
    float sum = 1.0f;
    if (stats) {
      softmax_stats<scalar_t, kSlots, kCached>(pr, x_pixel, cache, max, sum);
    }

    // dL/dp_c = w m (gI y' + gP k p'^(k-1) + gD sign(p' - y')), as a function of the class.
    const auto dice_grad = [&](int64_t c, float p, float y) {
      const float pw = t.w * p;
      const float yw = t.w * y;
      const float diff = pw - yw;
      const float sign = static_cast<float>(diff > 0.0f) - static_cast<float>(diff < 0.0f);
      const float d_pred = pr.squared ? 2.0f * pw : 1.0f;
      const float* g = up + c * kNumSums;
      const float value = g[0] * yw + g[1] * d_pred + g[3] * sign;
      return t.w * (modulator(gamma[c], diff) * value);
    };
    const auto share = [&](int64_t c, float y) { return ce_weight[c] * (pr.keep * y + pr.spread); };

    // 1. The dot products: sum_c p_c dL/dp_c (softmax) and A = sum_c cw_c ((1 - eps) y_c + eps / C) (CE).
    float dot = 0.0f;
    float total_share = 0.0f;
    if constexpr (kCached) {
#pragma unroll
      for (int c = 0; c < kSlots; ++c) {
        if (c < pr.classes) {
          const float y = target_value<kLabels>(pr, target, t_pixel, t, c);
          const float p = activate(pr.activation, cache[c], max, sum);
          grad_p[c] = dice_grad(c, p, y);
          dot += p * grad_p[c];
          total_share += pr.with_ce ? share(c, y) : 0.0f;
        }
      }
    } else if (stats) {  // without softmax or CE, neither dot product is used
      for (int64_t c = 0; c < pr.classes; ++c) {
        const float y = target_value<kLabels>(pr, target, t_pixel, t, c);
        if (pr.activation == kActivationSoftmax) {
          const float p = activate(pr.activation, static_cast<float>(x_pixel[c * pr.x_c]), max, sum);
          dot += p * dice_grad(c, p, y);
        }
        total_share += pr.with_ce ? share(c, y) : 0.0f;
      }
    }

    // 2. dx_c: the Dice part through the activation, plus grad_ce v (q_c A - a_c) with q = softmax(x).
    const auto write = [&](int64_t c, float x, float y, float gp) {
      const float p = activate(pr.activation, x, max, sum);
      float dx = gp;
      if (pr.activation == kActivationSoftmax) {
        dx = p * (gp - dot);
      } else if (pr.activation == kActivationSigmoid) {
        dx = gp * p * (1.0f - p);
      }
      if (pr.with_ce) {
        const float q = pr.activation == kActivationSoftmax ? p : expf(x - max) / sum;
        dx += grad_ce * t.v * (q * total_share - share(c, y));
      }
      g_image[c * pr.g_c + i * pr.g_s] = static_cast<scalar_t>(dx);
    };
    if constexpr (kCached) {
#pragma unroll
      for (int c = 0; c < kSlots; ++c) {
        if (c < pr.classes) {
          write(c, cache[c], target_value<kLabels>(pr, target, t_pixel, t, c), grad_p[c]);
        }
      }
    } else {
      for (int64_t c = 0; c < pr.classes; ++c) {
        const float x = static_cast<float>(x_pixel[c * pr.x_c]);
        const float y = target_value<kLabels>(pr, target, t_pixel, t, c);
        write(c, x, y, dice_grad(c, activate(pr.activation, x, max, sum), y));
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------- host side

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
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kHalf ||
                  logits.scalar_type() == at::kBFloat16,
              op, ": CUDA logits must be float32, bfloat16 or float16 (float64 runs on the CPU only), got ",
              logits.scalar_type());
  TORCH_CHECK(logits.size(1) >= 1, op, ": logits must have at least one class (C >= 1), got shape ",
              logits.sizes());
  const int64_t batch = logits.size(0);
  const int64_t classes = logits.size(1);
  const int64_t pixels = logits.size(2);
  if (target_is_labels) {
    TORCH_CHECK(target.dim() == 2 && target.size(0) == batch && target.size(1) == pixels, op,
                ": target (labels) must have shape (B, S) = [", batch, ", ", pixels, "], got ", target.sizes());
    TORCH_CHECK(is_int_dtype(target.scalar_type()), op,
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

Problem make_problem(const at::Tensor& logits, const at::Tensor& target, bool target_is_labels, int64_t activation,
                     int64_t ignore_index, int64_t mask_mode, bool squared, bool with_ce, double label_smoothing) {
  Problem pr{};
  pr.classes = logits.size(1);
  pr.pixels = logits.size(2);
  pr.chunks = ceil_div(pr.pixels, kChunkPixels);
  pr.x_b = logits.stride(0);
  pr.x_c = logits.stride(1);
  pr.x_s = logits.stride(2);
  pr.t_b = target.stride(0);
  pr.t_c = target_is_labels ? 0 : target.stride(1);
  pr.t_s = target_is_labels ? target.stride(1) : target.stride(2);
  pr.ignore_index = ignore_index;
  pr.target_type = target_type(target.scalar_type());
  pr.activation = static_cast<int>(activation);
  pr.mask_mode = static_cast<int>(mask_mode);
  pr.squared = squared;
  pr.with_ce = with_ce;
  // As in the reference: the Python floats 1 - eps and eps / C, rounded once to float32.
  pr.keep = static_cast<float>(1.0 - label_smoothing);
  pr.spread = static_cast<float>(label_smoothing / static_cast<double>(pr.classes));
  return pr;
}

// The grid, B * chunks * groups blocks, must fit in gridDim.x.
void check_grid(const char* op, int64_t batch, int64_t chunks, int64_t groups) {
  const int64_t per_image = chunks * groups;
  TORCH_CHECK(per_image <= INT_MAX && batch <= INT_MAX / per_image, op, ": logits of shape (B, C, S) must have B * ",
              "ceil(S / ", kChunkPixels, ") * ceil(C / ", kForwardGroup, ") <= 2**31 - 1, got B = ", batch, " and ",
              per_image, " blocks per image");
}

// A dtype as a value, for generic lambdas: Type<T>{} carries T.
template <typename T>
struct Type {
  using type = T;
};

// Calls body(Type<scalar_t>{}) for the logits' dtype (checked by check_inputs: float32, float16 or bfloat16).
template <typename Body>
void dispatch_logits(at::ScalarType dtype, const Body& body) {
  switch (dtype) {
    case at::kFloat:
      body(Type<float>{});
      break;
    case at::kHalf:
      body(Type<at::Half>{});
      break;
    case at::kBFloat16:
      body(Type<at::BFloat16>{});
      break;
    default:
      TORCH_INTERNAL_ASSERT(false, "dice_sums CUDA: unexpected logits dtype ", dtype);
  }
}

template <typename scalar_t, bool kLabels>
void launch_forward(const Problem& pr, int64_t batch, float* partial_sums, float* partial_extras,
                    const scalar_t* logits, const void* target, const float* gamma, const float* ce_weight,
                    int64_t groups, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(batch * pr.chunks * groups));
  if (pr.classes <= 4) {
    dice_sums_fwd_kernel<scalar_t, 4, kLabels, true>
        <<<grid, kThreads, 0, stream>>>(partial_sums, partial_extras, logits, target, gamma, ce_weight, pr);
  } else if (pr.classes <= 8) {
    dice_sums_fwd_kernel<scalar_t, 8, kLabels, true>
        <<<grid, kThreads, 0, stream>>>(partial_sums, partial_extras, logits, target, gamma, ce_weight, pr);
  } else if (pr.classes <= kForwardGroup) {
    dice_sums_fwd_kernel<scalar_t, kForwardGroup, kLabels, true>
        <<<grid, kThreads, 0, stream>>>(partial_sums, partial_extras, logits, target, gamma, ce_weight, pr);
  } else {
    dice_sums_fwd_kernel<scalar_t, kForwardGroup, kLabels, false>
        <<<grid, kThreads, 0, stream>>>(partial_sums, partial_extras, logits, target, gamma, ce_weight, pr);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, bool kLabels>
void launch_backward(const Problem& pr, int64_t batch, scalar_t* grad, const float* grad_sums,
                     const float* grad_extras, const scalar_t* logits, const void* target, const float* gamma,
                     const float* ce_weight, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(batch * pr.chunks));
  if (pr.classes <= 4) {
    dice_sums_bwd_kernel<scalar_t, 4, kLabels>
        <<<grid, kThreads, 0, stream>>>(grad, grad_sums, grad_extras, logits, target, gamma, ce_weight, pr);
  } else if (pr.classes <= kBackwardCached) {
    dice_sums_bwd_kernel<scalar_t, kBackwardCached, kLabels>
        <<<grid, kThreads, 0, stream>>>(grad, grad_sums, grad_extras, logits, target, gamma, ce_weight, pr);
  } else {
    dice_sums_bwd_kernel<scalar_t, 0, kLabels>
        <<<grid, kThreads, 0, stream>>>(grad, grad_sums, grad_extras, logits, target, gamma, ce_weight, pr);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> dice_sums_fwd_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                      const at::Tensor& gamma, const at::Tensor& ce_weight,
                                                      int64_t activation, bool target_is_labels, int64_t ignore_index,
                                                      int64_t mask_mode, bool squared, bool with_ce,
                                                      double label_smoothing) {
  constexpr const char* op = "torch_medloss::dice_sums_fwd";
  check_inputs(op, logits, target, gamma, ce_weight, activation, target_is_labels, ignore_index, mask_mode);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const int64_t batch = logits.size(0);
  const int64_t classes = logits.size(1);
  const at::TensorOptions options = logits.options().dtype(at::kFloat);
  if (logits.numel() == 0) {
    return {at::zeros({batch, classes, kNumSums}, options), at::zeros({batch, kNumExtras}, options)};
  }
  const Problem pr = make_problem(logits, target, target_is_labels, activation, ignore_index, mask_mode, squared,
                                  with_ce, label_smoothing);
  const int64_t groups = ceil_div(classes, kForwardGroup);
  check_grid(op, batch, pr.chunks, groups);
  const at::Tensor gamma_f = gamma.to(at::kFloat).contiguous();
  const at::Tensor weight_f = ce_weight.to(at::kFloat).contiguous();
  at::Tensor partial_sums = at::empty({batch, pr.chunks, classes, kNumSums}, options);
  at::Tensor partial_extras = at::empty({batch, pr.chunks, groups, kNumExtras}, options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  dispatch_logits(logits.scalar_type(), [&](auto type) {
    using scalar_t = typename decltype(type)::type;
    (target_is_labels ? launch_forward<scalar_t, true> : launch_forward<scalar_t, false>)(
        pr, batch, partial_sums.mutable_data_ptr<float>(), partial_extras.mutable_data_ptr<float>(),
        logits.const_data_ptr<scalar_t>(), target.const_data_ptr(), gamma_f.const_data_ptr<float>(),
        weight_f.const_data_ptr<float>(), groups, stream);
  });

  // torch's CUDA sum is deterministic (a fixed reduction tree, no atomics).
  at::Tensor sums = pr.chunks == 1 ? partial_sums.view({batch, classes, kNumSums}) : partial_sums.sum(1);
  at::Tensor extras = partial_extras.sum(at::IntArrayRef{1, 2});
  if (with_ce && !target_is_labels) {
    extras.select(1, 1).fill_(static_cast<double>(pr.pixels));  // dense targets: ce_den is S, as in the reference
  }
  return {sums, extras};
}

at::Tensor dice_sums_bwd_cuda(const at::Tensor& grad_sums, const at::Tensor& grad_extras, const at::Tensor& logits,
                              const at::Tensor& target, const at::Tensor& gamma, const at::Tensor& ce_weight,
                              int64_t activation, bool target_is_labels, int64_t ignore_index, int64_t mask_mode,
                              bool squared, bool with_ce, double label_smoothing) {
  constexpr const char* op = "torch_medloss::dice_sums_bwd";
  check_inputs(op, logits, target, gamma, ce_weight, activation, target_is_labels, ignore_index, mask_mode);
  check_upstream(op, grad_sums, grad_extras, logits);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  // Same strides as the logits for a dense, non-overlapping layout (channels_last stays channels_last).
  at::Tensor grad = at::empty_like(logits);
  if (logits.numel() == 0) {
    return grad;
  }
  const int64_t batch = logits.size(0);
  Problem pr = make_problem(logits, target, target_is_labels, activation, ignore_index, mask_mode, squared, with_ce,
                            label_smoothing);
  pr.g_b = grad.stride(0);
  pr.g_c = grad.stride(1);
  pr.g_s = grad.stride(2);
  check_grid(op, batch, pr.chunks, 1);
  const at::Tensor gamma_f = gamma.to(at::kFloat).contiguous();
  const at::Tensor weight_f = ce_weight.to(at::kFloat).contiguous();
  const at::Tensor up_sums = grad_sums.to(at::kFloat).contiguous();
  const at::Tensor up_extras = grad_extras.to(at::kFloat).contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  dispatch_logits(logits.scalar_type(), [&](auto type) {
    using scalar_t = typename decltype(type)::type;
    (target_is_labels ? launch_backward<scalar_t, true> : launch_backward<scalar_t, false>)(
        pr, batch, grad.mutable_data_ptr<scalar_t>(), up_sums.const_data_ptr<float>(),
        up_extras.const_data_ptr<float>(), logits.const_data_ptr<scalar_t>(), target.const_data_ptr(),
        gamma_f.const_data_ptr<float>(), weight_f.const_data_ptr<float>(), stream);
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_medloss, CUDA, m) {
  m.impl("dice_sums_fwd", &dice_sums_fwd_cuda);
  m.impl("dice_sums_bwd", &dice_sums_bwd_cuda);
}

}  // namespace torch_medloss
