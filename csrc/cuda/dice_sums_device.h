// Device code of the Dice-family CUDA ops (csrc/cuda/dice_sums_kernel.cu launches it): the partials kernel, the
// one-block finalize kernel and the backward kernel. The contract is torch_medloss/reference/dice_sums.py; the
// constants come from csrc/contract.h and the loss head from csrc/dice_head.h (shared with the CPU). The Triton
// kernels in kernels/dice_sums.py compute the same quantities (_dice_partials_kernel, _dice_finalize_kernel,
// _dice_bwd_kernel, _focal). No ATen here, so the device code compiles (and reports its registers) on its own.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../contract.h"
#include "../dice_head.h"
#include "integer_load.h"

namespace torch_medloss {
namespace dice_cuda {
namespace {

namespace K = ::torch_medloss::contract;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// A step: the pixels a block covers with one pixel per thread, 16 times. A forward block owns a chunk of whole
// steps (a function of the shape only, never of the GPU, so the sums are bitwise the same on any card); a backward
// block owns one step.
constexpr int64_t kStepPixels = int64_t{kThreads} * 16;
// Forward: classes held in registers at most (the largest bucket), and the class-group size above it.
constexpr int kForwardGroup = 16;
// Backward: classes held in registers at most; above, the classes are streamed from memory (L1 hits).
constexpr int kBackwardCached = 8;
constexpr int kMaxClasses = static_cast<int>(K::DICE_MAX_CLASSES);
constexpr int kFinalizeThreads = 256;

// Sizes, strides (in elements) and options of one call, passed by value.
struct Problem {
  int64_t classes, pixels;
  int64_t chunk_pixels;  // forward: pixels per block, a multiple of kStepPixels
  int64_t chunks;        // forward: blocks per image and class group; backward: blocks per image
  int64_t groups;        // forward: class groups (1 when the classes are cached)
  int64_t x_b, x_c, x_s;  // logits
  int64_t t_b, t_c, t_s;  // target (labels: t_c unused)
  int64_t g_b, g_c, g_s;  // grad_logits (backward)
  int64_t p_row, p_c;     // params (5, C)
  int64_t map_b, map_c;   // the focal map (B, C', S), unit pixel stride (forward, focal_map)
  int64_t u_b, u_c, u_s;  // grad_loss along (image, kept class, pixel) (backward, scaled)
  int64_t k_b, k_c, k_k;  // coefficients or grad_sums along (image, class, sum row) (backward)
  int64_t e_b;            // grad_extras along the image (backward, not scaled; column 0 is ce_num's)
  int64_t ignore_index;
  int target_type, params_type, coef_type, upstream_type, extras_type;
  int activation, mask_mode, focal, alpha_mode, drop;
  bool squared, with_ce, focal_map, scaled;
  float keep;    // 1 - label_smoothing
  float spread;  // label_smoothing / C
  float focal_gamma, focal_alpha;
};

// The per-class parameters of one block, in shared memory (float32), by full class index.
struct ClassParams {
  float gamma[kMaxClasses];
  float ce_weight[kMaxClasses];
  float alpha[kMaxClasses];
  float focal_weight[kMaxClasses];
};

__device__ __forceinline__ void load_class_params(ClassParams& s, const void* params, const Problem& pr) {
  for (int c = threadIdx.x; c < pr.classes; c += blockDim.x) {
    const int64_t at = c * pr.p_c;
    s.gamma[c] = load_float(params, pr.params_type, K::DICE_PARAM_GAMMA * pr.p_row + at);
    s.ce_weight[c] = load_float(params, pr.params_type, K::DICE_PARAM_CE_WEIGHT * pr.p_row + at);
    s.alpha[c] = load_float(params, pr.params_type, K::DICE_PARAM_FOCAL_ALPHA * pr.p_row + at);
    s.focal_weight[c] = load_float(params, pr.params_type, K::DICE_PARAM_FOCAL_WEIGHT * pr.p_row + at);
  }
}

// ------------------------------------------------------------------------------------------------ pixel math

// The target of one pixel: w (the pixel weight), v (1 where the cross entropy counts the pixel), the label (-1 when
// out of range; label maps only) and whether the label is invalid (neither a class nor the masked ignore_index).
struct PixelTarget {
  float w;
  float v;
  int64_t label;
  bool invalid;
};

template <bool kLabels>
__device__ __forceinline__ PixelTarget load_pixel_target(const Problem& pr, const void* target, int64_t pixel) {
  PixelTarget t{1.0f, 1.0f, -1, false};
  if constexpr (kLabels) {
    const int64_t raw = load_int(target, pr.target_type, pixel);
    // One unsigned comparison rejects both raw < 0 and raw >= C.
    const bool in_range = static_cast<uint64_t>(raw) < static_cast<uint64_t>(pr.classes);
    const bool ignored = pr.mask_mode == K::MASK_LABEL && raw == pr.ignore_index;
    t.invalid = !in_range && !ignored;
    t.label = in_range ? raw : -1;
    t.w = (in_range && !ignored) ? 1.0f : 0.0f;
    t.v = in_range ? 1.0f : 0.0f;
  } else {
    if (pr.mask_mode == K::MASK_CHANNEL) {
      t.w = 1.0f - load_float(target, pr.target_type, pixel + pr.ignore_index * pr.t_c);
    } else if (pr.mask_mode == K::MASK_SENTINEL) {
      float total = 0.0f;
      for (int64_t c = 0; c < pr.classes; ++c) {
        total += load_float(target, pr.target_type, pixel + c * pr.t_c);
      }
      t.w = total > 0.0f ? 1.0f : 0.0f;
    }
  }
  return t;
}

template <bool kLabels>
__device__ __forceinline__ float target_value(const Problem& pr, const void* target, int64_t pixel,
                                              const PixelTarget& t, int64_t c) {
  if constexpr (kLabels) {
    return t.label == c ? 1.0f : 0.0f;
  } else {
    return load_float(target, pr.target_type, pixel + c * pr.t_c);
  }
}

// The activation p of one class from its logit and the pixel's softmax statistics (max, sum exp(x - max)).
__device__ __forceinline__ float activate(int activation, float x, float max, float sum) {
  if (activation == K::ACTIVATION_SOFTMAX) {
    return expf(x - max) / sum;
  }
  if (activation == K::ACTIVATION_SIGMOID) {
    return 1.0f / (1.0f + expf(-x));
  }
  return x;
}

// m = |p' - y'|^gamma, 1 where gamma = 0 (torch's pow(0, 0) = 1); no pow for the usual exponents.
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

// base^exponent for base >= 0, with torch's pow(0, 0) = 1 (Triton's _pow).
__device__ __forceinline__ float pow_nonnegative(float base, float exponent) {
  return exponent == 0.0f ? 1.0f : exp2f(exponent * log2f(base));
}

__device__ __forceinline__ float log_sigmoid(float z) {
  return fminf(z, 0.0f) - log1pf(expf(-fabsf(z)));
}

__device__ __forceinline__ float sigmoid(float z) {
  return 1.0f / (1.0f + expf(-z));
}

// The softmax statistics of the focal term's softmax form: over the kept classes of x w (max, log sum exp(. - max)).
struct FocalStats {
  float max = 0.0f;
  float sum = 1.0f;
  float log_sum = 0.0f;
};

// MONAI's focal loss of one kept class at one pixel, masked as MONAI masks it (the terms of (x w, y w), times w),
// times the focal class weight (kernels/dice_sums.py _focal; reference.focal). With ``grad``, *d receives
// d term / dx (sigmoid form) or d term / d log p (softmax form, whose class sum is the caller's), and *p_out the
// softmax form's p. Terms with y' = 0 are selected away in the softmax form, not multiplied: a -inf logit of a
// non-label class has log p = -inf.
template <bool kGrad>
__device__ __forceinline__ float focal_term(const Problem& pr, const ClassParams& cp, int64_t c, float x, float y,
                                            float w, const FocalStats& fs, float* d, float* p_out) {
  float xw = x * w;
  const float yw = y * w;
  const float scale = cp.focal_weight[c] * w;
  const float gamma = pr.focal_gamma;
  if (pr.focal == K::FOCAL_SIGMOID) {
    // Infinite logits clamped to +-1e30, as the reference: each term is then its limit (0 for x = -inf, y = 0, where
    // x - x y would be NaN), with the clamp's zero gradient outside. Compares, not fminf/fmaxf: NaN stays NaN.
    const bool inside = xw >= -1e30f && xw <= 1e30f;
    xw = xw < -1e30f ? -1e30f : (xw > 1e30f ? 1e30f : xw);
    float factor = 1.0f;
    if (pr.alpha_mode == K::ALPHA_SCALAR) {
      factor = yw * pr.focal_alpha + (1.0f - yw) * (1.0f - pr.focal_alpha);
    } else if (pr.alpha_mode == K::ALPHA_PER_CLASS) {
      factor = yw == 1.0f ? cp.alpha[c] : 1.0f;
    }
    const float bce = xw - xw * yw - log_sigmoid(xw);
    const float s = 2.0f * yw - 1.0f;
    const float a = expf(gamma * log_sigmoid(-xw * s));
    if constexpr (kGrad) {
      const float d_term = a * (-gamma * s * sigmoid(xw * s) * bce + sigmoid(xw) - yw);
      *d = inside ? d_term * factor * scale * w : 0.0f;  // d/dx of t(x w) w: the chain rule's w, the mask's w
    }
    return a * bce * factor * scale;
  }
  float factor = 1.0f;
  if (pr.alpha_mode == K::ALPHA_SCALAR) {
    factor = c == pr.drop ? 1.0f - pr.focal_alpha : pr.focal_alpha;
  } else if (pr.alpha_mode == K::ALPHA_PER_CLASS) {
    factor = cp.alpha[c];
  }
  const float p = expf(xw - fs.max) / fs.sum;
  const float log_p = (xw - fs.max) - fs.log_sum;
  const float rest = 1.0f - p;
  const float pw = pow_nonnegative(rest, gamma);
  const bool hit = yw != 0.0f;
  if constexpr (kGrad) {
    // gamma p log p (1 - p)^(gamma - 1): torch's pow gradient, 0 for gamma = 0 and 1 * 0^0 for gamma = 1.
    const float slope = gamma == 1.0f ? 1.0f : pow_nonnegative(rest, gamma - 1.0f);
    const float inner = gamma == 0.0f ? 0.0f : gamma * p * log_p * slope;
    *d = hit ? -yw * (pw - inner) * factor * scale * w : 0.0f;
    *p_out = p;
  }
  return hit ? -pw * log_p * yw * factor * scale : 0.0f;
}

// Calls body(c, x) for every class c of the pixel, x its logit as float: from the register cache (kCache > 0,
// unrolled so that the cache stays in registers) or from memory.
template <int kCache, typename scalar_t, typename Body>
__device__ __forceinline__ void for_classes(int64_t classes, const scalar_t* x_pixel, int64_t x_c,
                                            const float (&cache)[kCache > 0 ? kCache : 1], const Body& body) {
  if constexpr (kCache > 0) {
#pragma unroll
    for (int c = 0; c < kCache; ++c) {
      if (c < classes) {
        body(static_cast<int64_t>(c), cache[c]);
      }
    }
  } else {
    for (int64_t c = 0; c < classes; ++c) {
      body(c, static_cast<float>(x_pixel[c * x_c]));
    }
  }
}

// The pixel's softmax statistics over all classes (activation softmax, cross entropy) and over the kept classes of
// x w (the focal term's softmax form).
template <int kCache, typename scalar_t>
__device__ __forceinline__ void pixel_stats(const Problem& pr, const scalar_t* x_pixel,
                                            const float (&cache)[kCache > 0 ? kCache : 1], float w, float& max,
                                            float& sum, FocalStats& fs) {
  max = 0.0f;
  sum = 1.0f;
  if (pr.activation == K::ACTIVATION_SOFTMAX || pr.with_ce) {
    max = -INFINITY;
    for_classes<kCache>(pr.classes, x_pixel, pr.x_c, cache, [&](int64_t, float x) { max = fmaxf(max, x); });
    sum = 0.0f;
    for_classes<kCache>(pr.classes, x_pixel, pr.x_c, cache, [&](int64_t, float x) { sum += expf(x - max); });
  }
  if (pr.focal == K::FOCAL_SOFTMAX) {
    float fmax = -INFINITY;
    for_classes<kCache>(pr.classes, x_pixel, pr.x_c, cache, [&](int64_t c, float x) {
      if (c >= pr.drop) {
        fmax = fmaxf(fmax, x * w);
      }
    });
    float fsum = 0.0f;
    for_classes<kCache>(pr.classes, x_pixel, pr.x_c, cache, [&](int64_t c, float x) {
      if (c >= pr.drop) {
        fsum += expf(x * w - fmax);
      }
    });
    fs.max = fmax;
    fs.sum = fsum;
    fs.log_sum = logf(fsum);
  }
}

// The cross entropy's share of class c at a pixel: cw_c ((1 - eps) y_c + eps / C), so that
// ce_num = -sum_c share_c log q_c (the reference's label and dense forms alike).
__device__ __forceinline__ float ce_share(const Problem& pr, const ClassParams& cp, int64_t c, float y) {
  return cp.ce_weight[c] * (pr.keep * y + pr.spread);
}

// --------------------------------------------------------------------------------------- 1. forward partials

// partial_sums: (B, chunks, C, 5) and partial_extras: (B, chunks, groups, 4), float32 contiguous, every entry
// written once. focal_map (pr.focal_map): the (B, C', S) float32 map of the focal term. logits: (B, C, S) with
// strides x_*; target: labels (B, S) or dense (B, C, S) with strides t_*; params: (5, C) with strides p_*.
// Grid: B * chunks * groups blocks, block (image * chunks + chunk) * groups + group handling the pixels
// [chunk * chunk_pixels, (chunk + 1) * chunk_pixels) and classes [group * kGroup, (group + 1) * kGroup). kCached:
// one group holds all C classes (C <= kGroup) and their logits stay in registers; otherwise the groups of a chunk
// are adjacent in the grid (they share its logits in L2), and every block reads all classes for the softmax
// statistics. Each thread keeps its running sums in registers; the block reduces them in a fixed order (a shuffle
// tree in each warp, then the warps in order) into its own row: no float atomics, bitwise reproducible.
template <typename scalar_t, int kGroup, bool kLabels, bool kCached>
__global__ void __launch_bounds__(kThreads) dice_partials_kernel(
    // Output
    float* __restrict__ partial_sums, float* __restrict__ partial_extras, float* __restrict__ focal_map,
    // Input
    const scalar_t* __restrict__ logits, const void* __restrict__ target, const void* __restrict__ params,
    // Sizes, strides and options
    const Problem pr) {
  constexpr int kSums = static_cast<int>(K::DICE_NUM_SUMS);
  constexpr int kExtras = static_cast<int>(K::DICE_NUM_EXTRAS);
  constexpr int kCount = kGroup * kSums + kExtras;  // per-thread sums: I, P, G, D, F per class, then the extras
  constexpr int kCache = kCached ? kGroup : 0;
  __shared__ ClassParams cp;
  __shared__ float warp_sums[kWarps][kCount];

  const int64_t block_row = static_cast<int64_t>(blockIdx.x) / pr.groups;  // image * chunks + chunk
  const int64_t group = static_cast<int64_t>(blockIdx.x) % pr.groups;
  const int64_t image = block_row / pr.chunks;
  const int64_t chunk = block_row % pr.chunks;
  const int64_t first_class = group * kGroup;
  const int64_t group_classes = min(static_cast<int64_t>(kGroup), pr.classes - first_class);
  load_class_params(cp, params, pr);
  __syncthreads();

  float acc[kCount];
#pragma unroll
  for (int q = 0; q < kCount; ++q) {
    acc[q] = 0.0f;
  }
  float& ce_num = acc[kGroup * kSums + K::DICE_EXTRA_CE_NUM];
  float& ce_den = acc[kGroup * kSums + K::DICE_EXTRA_CE_DEN];
  float& invalid = acc[kGroup * kSums + K::DICE_EXTRA_INVALID];
  float& valid = acc[kGroup * kSums + K::DICE_EXTRA_VALID];

  const scalar_t* x_image = logits + image * pr.x_b;
  const int64_t begin = chunk * pr.chunk_pixels;
  const int64_t end = min(pr.pixels, begin + pr.chunk_pixels);
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const int64_t t_pixel = image * pr.t_b + i * pr.t_s;
    const PixelTarget t = load_pixel_target<kLabels>(pr, target, t_pixel);
    if (group == 0) {  // the per-pixel extras, once per pixel
      invalid += t.invalid ? 1.0f : 0.0f;
      valid += t.w;
      if (pr.with_ce) {
        ce_den += kLabels ? (t.label >= 0 ? cp.ce_weight[t.label] : 0.0f) : 1.0f;
      }
    }
    const scalar_t* x_pixel = x_image + i * pr.x_s;
    float cache[kCache > 0 ? kCache : 1];
    if constexpr (kCached) {
#pragma unroll
      for (int c = 0; c < kCache; ++c) {
        cache[c] = c < pr.classes ? static_cast<float>(x_pixel[c * pr.x_c]) : 0.0f;
      }
    }
    float max, sum;
    FocalStats fs;
    pixel_stats<kCache>(pr, x_pixel, cache, t.w, max, sum, fs);
    const float lse = max + logf(sum);
    float ce_pixel = 0.0f;
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      if (k < group_classes) {
        const int64_t c = first_class + k;
        float x;
        if constexpr (kCached) {
          x = cache[k];
        } else {
          x = static_cast<float>(x_pixel[c * pr.x_c]);
        }
        const float y = target_value<kLabels>(pr, target, t_pixel, t, c);
        const float p = activate(pr.activation, x, max, sum);
        const float pw = t.w * p;
        const float yw = t.w * y;
        const float diff = pw - yw;
        const float m = modulator(cp.gamma[c], diff);
        acc[k * kSums + K::DICE_SUM_I] += m * pw * yw;
        acc[k * kSums + K::DICE_SUM_P] += m * (pr.squared ? pw * pw : pw);
        acc[k * kSums + K::DICE_SUM_G] += m * (pr.squared ? yw * yw : yw);
        acc[k * kSums + K::DICE_SUM_D] += m * fabsf(diff);
        if (pr.with_ce) {
          // Terms with a zero share are selected away, not multiplied: a -inf logit (a masked class) has
          // log q = -inf, and torch's cross entropy never reads it unless it is the label or label smoothing
          // spreads weight onto it.
          const float share = ce_share(pr, cp, c, y);
          ce_pixel += share != 0.0f ? share * (x - lse) : 0.0f;
        }
        if (pr.focal != K::FOCAL_NONE && c >= pr.drop) {
          const float term = focal_term<false>(pr, cp, c, x, y, t.w, fs, nullptr, nullptr);
          acc[k * kSums + K::DICE_SUM_F] += term;
          if (pr.focal_map) {
            focal_map[image * pr.map_b + (c - pr.drop) * pr.map_c + i] = term;
          }
        }
      }
    }
    if (pr.with_ce && t.v != 0.0f) {
      ce_num -= ce_pixel;
    }
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
    if (q < kGroup * kSums) {
      if (q < group_classes * kSums) {
        partial_sums[(block_row * pr.classes + first_class) * kSums + q] = total;
      }
    } else {
      partial_extras[(block_row * pr.groups + group) * kExtras + (q - kGroup * kSums)] = total;
    }
  }
}

// --------------------------------------------------------------------------------------- 2. forward finalize

// One block. Adds the partial rows of every (image, class, sum) and every (image, extra) in a fixed order (the
// lanes of a warp take every 32nd row, then a shuffle tree) into sums (B, C, 5) and extras (B, 4), float32
// contiguous; then, unless sums_only, one thread runs dice_head::finish on them: the loss (contiguous, of
// _contract.dice_loss_shape; not the focal map of HEAD_NONE with "none", which the partials kernel wrote) and the
// coefficients (B, 5, C + 1) contiguous. scratch: dice_head::scratch_size(C) + C floats (batch Dice's unit sums,
// then the Dice class weights by full class index, read from params). No atomics: bitwise reproducible.
__global__ void __launch_bounds__(kFinalizeThreads, 1) dice_finalize_kernel(
    // Output
    float* __restrict__ sums, float* __restrict__ extras, float* __restrict__ loss, float* __restrict__ coef,
    float* __restrict__ scratch,
    // Input
    const float* __restrict__ partial_sums, const float* __restrict__ partial_extras, const void* __restrict__ params,
    // Sizes and options
    const int64_t batch, const int64_t classes, const int64_t chunks, const int64_t groups, const int params_type,
    const int64_t p_row, const int64_t p_c, const bool sums_only, const dice_head::Options options) {
  constexpr int64_t kSums = K::DICE_NUM_SUMS;
  constexpr int64_t kExtras = K::DICE_NUM_EXTRAS;
  constexpr int kFinalizeWarps = kFinalizeThreads / 32;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t num_sums = batch * classes * kSums;
  const int64_t outputs = num_sums + batch * kExtras;
  for (int64_t o = warp; o < outputs; o += kFinalizeWarps) {
    float total = 0.0f;
    if (o < num_sums) {
      // o = (image * C + class) * 5 + row; its partial rows are chunks apart.
      const int64_t image = o / (classes * kSums);
      const int64_t inner = o % (classes * kSums);
      const float* column = partial_sums + image * chunks * classes * kSums + inner;
      for (int64_t r = lane; r < chunks; r += 32) {
        total += column[r * classes * kSums];
      }
    } else {
      // the extras of an image: chunks * groups rows of 4
      const int64_t e = o - num_sums;
      const int64_t image = e / kExtras;
      const float* column = partial_extras + image * chunks * groups * kExtras + e % kExtras;
      for (int64_t r = lane; r < chunks * groups; r += 32) {
        total += column[r * kExtras];
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      total += __shfl_down_sync(0xffffffffu, total, offset);
    }
    if (lane == 0) {
      if (o < num_sums) {
        sums[o] = total;
      } else {
        extras[o - num_sums] = total;
      }
    }
  }
  if (sums_only) {
    return;
  }
  float* weight = scratch + dice_head::scratch_size(classes);
  for (int64_t c = threadIdx.x; c < classes; c += kFinalizeThreads) {
    weight[c] = load_float(params, params_type, K::DICE_PARAM_WEIGHT * p_row + c * p_c);
  }
  // The block's global writes above are visible to every thread of the block after the barrier.
  __syncthreads();
  if (threadIdx.x == 0) {
    dice_head::finish<float>(sums, extras, weight, batch, classes, options, loss, coef, scratch);
  }
}

// ------------------------------------------------------------------------------------------------ 3. backward

// grad: (B, C, S) with strides g_*, every element written once. Scaled (the dice_loss op): coef is the forward's
// coefficients (float32, strides k_*: image, class, row) and upstream grad_loss, read at u_b image + u_c (class -
// drop) (+ u_s pixel for the focal map); the cross entropy's coefficient is at (0, C, DICE_SLOT_CE), times
// grad_loss[0]. Not scaled (the dice_sums op): coef is grad_sums (B, C, 5) and grad_extras (B, 4), any float dtype.
// Grid: B * chunks blocks of one step each. kCache > 0: C <= kCache, the logits and dL/dp of a pixel stay in
// registers; kCache == 0: the classes are streamed from memory (any C).
template <typename scalar_t, int kCache, bool kLabels>
__global__ void __launch_bounds__(kThreads) dice_bwd_kernel(
    // Output
    scalar_t* __restrict__ grad,
    // Input
    const void* __restrict__ coef, const void* __restrict__ upstream, const void* __restrict__ grad_extras,
    const scalar_t* __restrict__ logits, const void* __restrict__ target, const void* __restrict__ params,
    // Sizes, strides and options
    const Problem pr) {
  constexpr bool kCached = kCache > 0;
  constexpr int kSlots = kCached ? kCache : 1;
  __shared__ ClassParams cp;
  __shared__ float s_grad[4][kMaxClasses];  // d loss / d (I, P, D, F) per class, P's doubled when squared
  __shared__ float s_grad_ce;
  float* const g_i = s_grad[0];
  float* const g_p = s_grad[1];
  float* const g_d = s_grad[2];
  float* const g_f = s_grad[3];

  const int64_t image = static_cast<int64_t>(blockIdx.x) / pr.chunks;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) % pr.chunks;
  load_class_params(cp, params, pr);
  for (int c = threadIdx.x; c < pr.classes; c += kThreads) {
    const int64_t at = image * pr.k_b + c * pr.k_c;
    float gi = load_float(coef, pr.coef_type, at + K::DICE_SUM_I * pr.k_k);
    float gp = load_float(coef, pr.coef_type, at + K::DICE_SUM_P * pr.k_k);
    float gd = load_float(coef, pr.coef_type, at + K::DICE_SUM_D * pr.k_k);
    float gf = c >= pr.drop ? load_float(coef, pr.coef_type, at + K::DICE_SUM_F * pr.k_k) : 0.0f;
    if (pr.scaled && !pr.focal_map) {
      // (FocalLoss's "none": the map's upstream is read per pixel below, and the Dice rows are 0.)
      const float up =
          c >= pr.drop ? load_float(upstream, pr.upstream_type, image * pr.u_b + (c - pr.drop) * pr.u_c) : 0.0f;
      gi *= up;
      gp *= up;
      gd *= up;
      gf *= up;
    }
    g_i[c] = gi;
    g_p[c] = pr.squared ? 2.0f * gp : gp;  // d(p'^2)/dp' = 2 p'
    g_d[c] = gd;
    g_f[c] = gf;
  }
  if (threadIdx.x == 0) {
    float grad_ce = 0.0f;
    if (pr.with_ce) {
      grad_ce = pr.scaled ? load_float(coef, pr.coef_type, pr.classes * pr.k_c + K::DICE_SLOT_CE * pr.k_k) *
                                load_float(upstream, pr.upstream_type, 0)
                          : load_float(grad_extras, pr.extras_type, image * pr.e_b);
    }
    s_grad_ce = grad_ce;
  }
  __syncthreads();
  const float grad_ce = s_grad_ce;

  const scalar_t* x_image = logits + image * pr.x_b;
  scalar_t* g_image = grad + image * pr.g_b;
  const int64_t begin = chunk * kStepPixels;
  const int64_t end = min(pr.pixels, begin + kStepPixels);
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const int64_t t_pixel = image * pr.t_b + i * pr.t_s;
    const PixelTarget t = load_pixel_target<kLabels>(pr, target, t_pixel);
    const scalar_t* x_pixel = x_image + i * pr.x_s;
    float cache[kSlots];
    if constexpr (kCached) {
#pragma unroll
      for (int c = 0; c < kSlots; ++c) {
        cache[c] = c < pr.classes ? static_cast<float>(x_pixel[c * pr.x_c]) : 0.0f;
      }
    }
    float max, sum;
    FocalStats fs;
    pixel_stats<kCache>(pr, x_pixel, cache, t.w, max, sum, fs);

    // dL/dp_c = w m (gI y' + gP k p'^(k-1) + gD sign(p' - y')): m is a constant (detached in the reference), and
    // sign(0) = 0, as torch.abs's gradient.
    const auto dice_grad = [&](int64_t c, float p, float y) {
      const float pw = t.w * p;
      const float yw = t.w * y;
      const float diff = pw - yw;
      const float sign = static_cast<float>(diff > 0.0f) - static_cast<float>(diff < 0.0f);
      const float d_power = pr.squared ? g_p[c] * pw : g_p[c];
      return (modulator(cp.gamma[c], diff) * (g_i[c] * yw + d_power + g_d[c] * sign)) * t.w;
    };
    // d loss / d F_c at this pixel: the coefficient, times the focal map's upstream for FocalLoss's "none".
    const auto focal_upstream = [&](int64_t c) {
      float up = g_f[c];
      if (pr.focal_map) {
        up *= load_float(upstream, pr.upstream_type, image * pr.u_b + (c - pr.drop) * pr.u_c + i * pr.u_s);
      }
      return up;
    };

    // 1. The class sums: sum_c p_c dL/dp_c (softmax), A = sum_c share_c (cross entropy), and the focal softmax
    //    form's sum_c d loss / d log p_c.
    float dot = 0.0f;
    float total_share = 0.0f;
    float focal_dot = 0.0f;
    float grad_p[kSlots];
    float focal_scaled[kSlots];
    for_classes<kCache>(pr.classes, x_pixel, pr.x_c, cache, [&](int64_t c, float x) {
      const float y = target_value<kLabels>(pr, target, t_pixel, t, c);
      const float p = activate(pr.activation, x, max, sum);
      const float gp = dice_grad(c, p, y);
      if constexpr (kCached) {
        grad_p[c] = gp;
      }
      dot += p * gp;
      if (pr.with_ce) {
        total_share += ce_share(pr, cp, c, y);
      }
      if (pr.focal == K::FOCAL_SOFTMAX && c >= pr.drop) {
        float d, p_focal;
        focal_term<true>(pr, cp, c, x, y, t.w, fs, &d, &p_focal);
        const float scaled = focal_upstream(c) * d;
        if constexpr (kCached) {
          focal_scaled[c] = scaled;
        }
        focal_dot += scaled;
      }
    });

    // 2. dx_c: the Dice part through the activation, the cross entropy grad_ce v (q_c A - share_c), and the focal
    //    term (sigmoid: its derivative; softmax: log_softmax's backward over the kept classes).
    const float ce_scale = pr.with_ce && t.v != 0.0f ? grad_ce : 0.0f;
    scalar_t* g_pixel = g_image + i * pr.g_s;
    for_classes<kCache>(pr.classes, x_pixel, pr.x_c, cache, [&](int64_t c, float x) {
      const float y = target_value<kLabels>(pr, target, t_pixel, t, c);
      const float p = activate(pr.activation, x, max, sum);
      float gp;
      if constexpr (kCached) {
        gp = grad_p[c];
      } else {
        gp = dice_grad(c, p, y);
      }
      float dx = gp;
      if (pr.activation == K::ACTIVATION_SOFTMAX) {
        dx = p * (gp - dot);  // softmax: p_c (g_c - sum_j p_j g_j)
      } else if (pr.activation == K::ACTIVATION_SIGMOID) {
        dx = gp * p * (1.0f - p);
      }
      if (ce_scale != 0.0f) {
        const float q = pr.activation == K::ACTIVATION_SOFTMAX ? p : expf(x - max) / sum;
        dx += ce_scale * (q * total_share - ce_share(pr, cp, c, y));
      }
      if (pr.focal != K::FOCAL_NONE && c >= pr.drop) {
        float d, p_focal;
        if (pr.focal == K::FOCAL_SIGMOID) {
          focal_term<true>(pr, cp, c, x, y, t.w, fs, &d, &p_focal);
          dx += focal_upstream(c) * d;
        } else {
          float scaled;
          if constexpr (kCached) {
            scaled = focal_scaled[c];
            p_focal = expf(x * t.w - fs.max) / fs.sum;
          } else {
            focal_term<true>(pr, cp, c, x, y, t.w, fs, &d, &p_focal);
            scaled = focal_upstream(c) * d;
          }
          dx += scaled - p_focal * focal_dot;
        }
      }
      g_pixel[c * pr.g_c] = static_cast<scalar_t>(dx);
    });
  }
}

}  // namespace
}  // namespace dice_cuda
}  // namespace torch_medloss
