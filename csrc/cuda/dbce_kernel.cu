// CUDA kernels of torch_medloss::dbce_masks, dbce_ce_fwd and dbce_ce_bwd (schema and contract in csrc/dbce.cpp; the
// ground truth is torch_medloss/reference/dbce_ops.py). Logits float32, bfloat16 and float16; float64 logits are
// rejected (the CPU kernel takes them). Accumulation in float32.
//
// ---- dbce_masks: an exact, separable dilation in four passes over the labels.
//
// The element E is symmetric and down-closed in every axis (shrinking |o_k| never leaves it: squares and IEEE sums
// are monotone), so "pixel i is in D_c" depends, along each axis, only on the nearest class-c pixel at each offset of
// the other axes. For the ball, with q_k(o) = (o s_k)^2 in float64 and the reference's summation order,
//   i in D_c  <=>  min over (a, b, k) with i + (a, b, k) in M_c of fl(fl(q_D(a) + q_H(b)) + q_W(k)) <= R^2 (1 + 1e-9),
// each |o_k| bounded by the reference's extent floor(R / s_k (1 + 1e-9)) (and by the image size minus one). Because
// fl(x + y) is monotone in x, the minimum can be taken one axis at a time, and every intermediate value lies in a
// small finite set that the host enumerates, so the passes carry small integer indices, not floats:
//   0. classify: labels (any dtype, any strides) -> cls (B, P) uint8, the class of each valid pixel or kNoClass;
//      counts (B, C) and invalid (B,) from per-warp ballot counts (integer atomics only: order-independent).
//   1. along D: nearest[b, c, i] = min |a| <= e_D with i + a e_D in M_c (kInf if none).
//   2. along H: rank[b, c, i] = min over |b'| <= e_H of table[nearest[i + b' e_H]][|b'|], where table[a][b'] is the
//      rank of fl(q_D(a) + q_H(b')) among the sorted distinct such values <= R^2 (1 + 1e-9) (kInf above): the rank
//      of a minimum is the minimum of the ranks.
//   3. along W: bit c of masks[i] iff i is valid and some |k| <= e_W has rank[c, i + k e_W] <= max_rank[|k|], the
//      largest rank r with fl(value[r] + q_W(k)) <= R^2 (1 + 1e-9); areas from per-warp ballot counts.
// The cube is the same code with other tables: windows r_k = the largest o <= e_k with o s_k <= R (1 + 1e-9),
// table[a][b'] = 0 and max_rank[k] = 0 inside the windows. So the masks are bitwise those of the float64 reference
// (CPython squares with pow(t, 2), we with t * t: they can differ only where pow is not correctly rounded, beyond
// 0.5 ulp, and then only for offsets within an ulp of the boundary). Passes 1-3 store one index per class and pixel
// in uint8 when the windows and the number of distinct values fit 8 bits (R = 10 isotropic: ~90 values), else
// uint16, else uint32. Cost per pixel and class: 2 e + 1 one-byte loads per pass, mostly L1 hits; no float atomics.
//
// ---- dbce_ce_fwd / dbce_ce_bwd: one pass over the logits.
//
// A block handles one (image, chunk of kChunkPixels pixels); each thread walks the chunk with stride kThreads
// (coalesced for NCHW; channels_last reads each pixel's C contiguous values), computes w_i from the mask bits and a
// shared-memory copy of the image's class weights, and the logsumexp with an online max (one read of the logits, no
// register array, any C <= 64). The forward reduces [sum w CE, sum w] in a fixed order (shuffle tree in each warp,
// then the warps in order) into its own row of a partial buffer that a torch sum finishes: bitwise the same run to
// run. The backward caches a pixel's logits in registers for C <= 16 (buckets 4, 8, 16) and streams them twice from
// memory above; pixels whose scale w (g_sum + g_map) is 0 (ignored, invalid, empty mask) get zeros without reading
// their logits.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "integer_load.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace torch_medloss {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Pixels per block of the chunked kernels: 16 per thread, enough to amortise the block reduction or histogram flush.
// A constant: the partial sums, and so the results, must not depend on the GPU.
constexpr int64_t kChunkPixels = int64_t{kThreads} * 16;
// Grid-stride kernels (passes 1 and 2) launch at most this many blocks.
constexpr int64_t kMaxStrideBlocks = int64_t{1} << 16;
// A mask holds one bit per class.
constexpr int64_t kMaxClasses = 64;
// Backward: classes held in registers at most; above, the classes are streamed.
constexpr int kBackwardCached = 16;
// cls value of ignored and invalid pixels.
constexpr uint8_t kNoClass = 255;
constexpr int64_t kElementBall = 0, kElementCube = 1;
// The reference's tolerance on the element's boundary (structuring_element).
constexpr double kBoundaryTolerance = 1e-9;

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Bits 0 .. C-1.
__host__ __device__ __forceinline__ uint64_t class_bits(int64_t classes) {
  return classes >= 64 ? ~uint64_t{0} : (uint64_t{1} << classes) - 1;
}

// ============================================================================================= dbce_masks kernels

// Sizes and strides of the labels (B, D, H, W), P = D * H * W pixels per image; windows of passes 1-3.
struct MaskProblem {
  int64_t batch, depth, height, width, pixels, classes, chunks;
  int64_t l_b, l_d, l_h, l_w;  // labels strides
  int64_t ignore_index;
  int64_t reach_d, reach_h, reach_w;  // window half-widths (e_D, e_H, e_W or the cube's r_k), <= size - 1
  int label_type;
};

// Adds this warp's count of the threads where `flag` holds to row[slot] (one lane writes: no atomics).
__device__ __forceinline__ void warp_count(unsigned int* row, int slot, bool flag) {
  const unsigned int vote = __ballot_sync(0xffffffffu, flag);
  if (threadIdx.x % 32 == 0) {
    row[slot] += __popc(vote);
  }
}

// Flushes the per-warp counters warp_counts[kWarps][slots] (in warp order) to out[0 .. slots) with integer atomics.
__device__ __forceinline__ void flush_counts(unsigned long long* out, unsigned int (*warp_counts)[kMaxClasses + 1],
                                             int slots) {
  __syncthreads();
  for (int s = threadIdx.x; s < slots; s += kThreads) {
    unsigned long long total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      total += warp_counts[w][s];
    }
    if (total != 0) {
      atomicAdd(out + s, total);
    }
  }
}

// ---------------------------------------------------------------------------------------------- 0. classify

// cls: (B, P) uint8, every entry written once. counts: (B, C), invalid: (B,), int64 zeroed (added to atomically;
// integer sums do not depend on the order). labels: (B, D, H, W) with strides l_*. Grid: B * chunks blocks.
__global__ void __launch_bounds__(kThreads) dbce_classify_kernel(
    // Output
    uint8_t* __restrict__ cls, unsigned long long* __restrict__ counts, unsigned long long* __restrict__ invalid,
    // Input
    const void* __restrict__ labels,
    // Sizes, strides and options
    const MaskProblem pr) {
  __shared__ unsigned int warp_counts[kWarps][kMaxClasses + 1];  // C classes, then invalid at slot C
  const int slots = static_cast<int>(pr.classes) + 1;
  const int warp = threadIdx.x / 32;
  for (int s = threadIdx.x % 32; s < slots; s += 32) {
    warp_counts[warp][s] = 0;
  }
  __syncwarp();

  const int64_t image = static_cast<int64_t>(blockIdx.x) / pr.chunks;
  const int64_t begin = (static_cast<int64_t>(blockIdx.x) % pr.chunks) * kChunkPixels;
  const int64_t end = min(pr.pixels, begin + kChunkPixels);
  const int64_t plane = pr.height * pr.width;
  // Uniform trip count: every lane takes part in the ballots.
  for (int64_t base = begin; base < end; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    int64_t label = pr.ignore_index;
    if (i < end) {
      const int64_t d = i / plane;
      const int64_t h = (i / pr.width) % pr.height;
      const int64_t w = i % pr.width;
      label = load_int(labels, pr.label_type, image * pr.l_b + d * pr.l_d + h * pr.l_h + w * pr.l_w);
    }
    // One unsigned comparison rejects both label < 0 and label >= C.
    const bool in_range = static_cast<uint64_t>(label) < static_cast<uint64_t>(pr.classes);
    const bool ignored = label == pr.ignore_index;
    const bool valid = in_range && !ignored;
    if (i < end) {
      cls[image * pr.pixels + i] = valid ? static_cast<uint8_t>(label) : kNoClass;
    }
    for (int c = 0; c < pr.classes; ++c) {
      warp_count(warp_counts[warp], c, valid && label == c);
    }
    warp_count(warp_counts[warp], slots - 1, i < end && !in_range && !ignored);
  }

  flush_counts(counts + image * pr.classes, warp_counts, slots - 1);
  if (threadIdx.x == 0) {
    unsigned long long total = 0;
    for (int w = 0; w < kWarps; ++w) {
      total += warp_counts[w][slots - 1];
    }
    if (total != 0) {
      atomicAdd(invalid + image, total);
    }
  }
}

// ----------------------------------------------------------------------------------------------- 1. along D

// nearest: (B, C, P) index_t, every entry written once: min |a| <= reach_d with cls[i + a H W] == c, else kInf.
// cls: (B, P). Grid-stride over the B * P pixels; each thread finds every class of its pixel's D-column window.
template <typename index_t>
__global__ void __launch_bounds__(kThreads) dbce_nearest_d_kernel(
    // Output
    index_t* __restrict__ nearest,
    // Input
    const uint8_t* __restrict__ cls,
    // Sizes
    const MaskProblem pr) {
  constexpr index_t kInf = static_cast<index_t>(~index_t{0});  // the largest value (unsigned)
  const int64_t plane = pr.height * pr.width;
  const uint64_t all = class_bits(pr.classes);
  const int64_t total = pr.batch * pr.pixels;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total; e += stride) {
    const int64_t image = e / pr.pixels;
    const int64_t i = e % pr.pixels;
    const int64_t d = i / plane;
    index_t* out = nearest + image * pr.classes * pr.pixels + i;
    uint64_t found = 0;
    for (int64_t dist = 0; dist <= pr.reach_d && found != all; ++dist) {
      uint64_t bits = 0;
      if (d - dist >= 0) {
        const uint8_t v = cls[e - dist * plane];
        bits |= v < 64 ? uint64_t{1} << v : 0;
      }
      if (dist > 0 && d + dist < pr.depth) {
        const uint8_t v = cls[e + dist * plane];
        bits |= v < 64 ? uint64_t{1} << v : 0;
      }
      uint64_t fresh = bits & ~found;
      found |= bits;
      while (fresh != 0) {
        const int c = __ffsll(static_cast<long long>(fresh)) - 1;
        fresh &= fresh - 1;
        out[c * pr.pixels] = static_cast<index_t>(dist);
      }
    }
    uint64_t missing = all & ~found;
    while (missing != 0) {
      const int c = __ffsll(static_cast<long long>(missing)) - 1;
      missing &= missing - 1;
      out[c * pr.pixels] = kInf;
    }
  }
}

// ----------------------------------------------------------------------------------------------- 2. along H

// rank: (B, C, P) index_t, every entry written once: min over |b| <= reach_h of table[nearest[i + b W]][|b|].
// nearest: (B, C, P); table: (reach_d + 1, reach_h + 1) index_t (kInf where the pair is outside the element).
template <typename index_t>
__global__ void __launch_bounds__(kThreads) dbce_rank_h_kernel(
    // Output
    index_t* __restrict__ rank,
    // Input
    const index_t* __restrict__ nearest, const index_t* __restrict__ table,
    // Sizes
    const MaskProblem pr) {
  constexpr index_t kInf = static_cast<index_t>(~index_t{0});  // the largest value (unsigned)
  const int64_t row = pr.reach_h + 1;
  const int64_t total = pr.batch * pr.classes * pr.pixels;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total; e += stride) {
    const int64_t h = (e / pr.width) % pr.height;
    const int64_t low = max(-h, -pr.reach_h);
    const int64_t high = min(pr.height - 1 - h, pr.reach_h);
    index_t best = kInf;
    for (int64_t b = low; b <= high; ++b) {
      const index_t a = nearest[e + b * pr.width];
      if (a != kInf) {
        const index_t r = __ldg(table + static_cast<int64_t>(a) * row + (b < 0 ? -b : b));
        best = r < best ? r : best;
      }
    }
    rank[e] = best;
  }
}

// ------------------------------------------------------------------------------------------ 3. along W, masks

// masks: (B, P) mask_t, every entry written once. areas: (B, C) int64 zeroed (integer atomics). rank: (B, C, P);
// cls: (B, P); max_rank: (reach_w + 1,) int32, non-increasing, -1 where no rank fits. Grid: B * chunks blocks.
template <typename index_t, typename mask_t>
__global__ void __launch_bounds__(kThreads) dbce_masks_w_kernel(
    // Output
    mask_t* __restrict__ masks, unsigned long long* __restrict__ areas,
    // Input
    const index_t* __restrict__ rank, const uint8_t* __restrict__ cls, const int32_t* __restrict__ max_rank,
    // Sizes
    const MaskProblem pr) {
  using bits_t = std::make_unsigned_t<mask_t>;
  __shared__ unsigned int warp_counts[kWarps][kMaxClasses + 1];
  const int classes = static_cast<int>(pr.classes);
  const int warp = threadIdx.x / 32;
  for (int s = threadIdx.x % 32; s < classes; s += 32) {
    warp_counts[warp][s] = 0;
  }
  __syncwarp();

  const int64_t image = static_cast<int64_t>(blockIdx.x) / pr.chunks;
  const int64_t begin = (static_cast<int64_t>(blockIdx.x) % pr.chunks) * kChunkPixels;
  const int64_t end = min(pr.pixels, begin + kChunkPixels);
  for (int64_t base = begin; base < end; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    uint64_t bits = 0;
    if (i < end && cls[image * pr.pixels + i] != kNoClass) {
      const int64_t w = i % pr.width;
      const int64_t left = min(w, pr.reach_w);
      const int64_t right = min(pr.width - 1 - w, pr.reach_w);
      const index_t* column = rank + image * pr.classes * pr.pixels + i;
      for (int c = 0; c < classes; ++c, column += pr.pixels) {
        for (int64_t k = 0; k <= max(left, right); ++k) {
          const int32_t limit = __ldg(max_rank + k);
          if (limit < 0) {
            break;
          }
          if ((k <= left && static_cast<int32_t>(column[-k]) <= limit) ||
              (k <= right && static_cast<int32_t>(column[k]) <= limit)) {
            bits |= uint64_t{1} << c;
            break;
          }
        }
      }
    }
    if (i < end) {
      masks[image * pr.pixels + i] = static_cast<mask_t>(static_cast<bits_t>(bits));
    }
    for (int c = 0; c < classes; ++c) {
      warp_count(warp_counts[warp], c, (bits >> c) & 1);
    }
  }
  flush_counts(areas + image * pr.classes, warp_counts, classes);
}

// ============================================================================================ dbce_ce kernels

// Sizes, strides (in elements) and options of the cross entropy ops.
struct CeProblem {
  int64_t classes, pixels, chunks;
  int64_t x_b, x_c, x_s;  // logits
  int64_t g_b, g_c, g_s;  // grad_logits (backward)
  int64_t l_b, l_s;       // labels
  int64_t m_b, m_s;       // masks
  int64_t ignore_index;
  int label_type, mask_type;
  bool write_map;
};

// The image's class weights into shared memory (C <= 64 floats).
__device__ __forceinline__ void load_weights(float* shared, const float* class_weights, const CeProblem& pr,
                                             int64_t image) {
  for (int c = threadIdx.x; c < pr.classes; c += kThreads) {
    shared[c] = class_weights[image * pr.classes + c];
  }
  __syncthreads();
}

// w_i and the label of pixel i (-1 where it is not valid: out of range or ignore_index; then w = 0). The mask is
// sign-extended like the reference's masks.long(); w = max over c < C of (bit c ? cw_c : 0), as amax does.
__device__ __forceinline__ float pixel_weight(const CeProblem& pr, const void* labels, const void* masks,
                                              const float* weights, int64_t image, int64_t i, int64_t& label) {
  const int64_t raw = load_int(labels, pr.label_type, image * pr.l_b + i * pr.l_s);
  const bool valid = static_cast<uint64_t>(raw) < static_cast<uint64_t>(pr.classes) && raw != pr.ignore_index;
  label = valid ? raw : -1;
  if (!valid) {
    return 0.0f;
  }
  const uint64_t all = class_bits(pr.classes);
  uint64_t bits = static_cast<uint64_t>(load_int(masks, pr.mask_type, image * pr.m_b + i * pr.m_s)) & all;
  float w = bits == all ? -INFINITY : 0.0f;  // an unset bit contributes a 0 to the reference's amax
  while (bits != 0) {
    const int c = __ffsll(static_cast<long long>(bits)) - 1;
    bits &= bits - 1;
    w = fmaxf(w, weights[c]);
  }
  return w;
}

// ---------------------------------------------------------------------------------------------------- forward

// partial: (B, chunks, 2) float32, every entry written once; map: (B, S) float32 contiguous when write_map (every
// entry written), else unused. logits: (B, C, S) with strides x_*; labels, masks: (B, S) with strides l_*, m_*;
// class_weights: (B, C) float32 contiguous. Grid: B * chunks blocks.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) dbce_ce_fwd_kernel(
    // Output
    float* __restrict__ partial, float* __restrict__ map,
    // Input
    const scalar_t* __restrict__ logits, const void* __restrict__ labels, const void* __restrict__ masks,
    const float* __restrict__ class_weights,
    // Sizes, strides and options
    const CeProblem pr) {
  __shared__ float weights[kMaxClasses];
  __shared__ float warp_sums[kWarps][2];
  const int64_t image = static_cast<int64_t>(blockIdx.x) / pr.chunks;
  const int64_t begin = (static_cast<int64_t>(blockIdx.x) % pr.chunks) * kChunkPixels;
  const int64_t end = min(pr.pixels, begin + kChunkPixels);
  load_weights(weights, class_weights, pr, image);

  float sum_wce = 0.0f;
  float sum_w = 0.0f;
  const scalar_t* x_image = logits + image * pr.x_b;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    int64_t label;
    const float w = pixel_weight(pr, labels, masks, weights, image, i, label);
    float value = 0.0f;
    if (label >= 0) {
      // Online logsumexp: one read of each logit; the label's logit is picked up on the way.
      const scalar_t* x_pixel = x_image + i * pr.x_s;
      float max = -INFINITY;
      float sum = 0.0f;
      float picked = 0.0f;
      for (int64_t c = 0; c < pr.classes; ++c) {
        const float x = static_cast<float>(x_pixel[c * pr.x_c]);
        if (x > max) {
          sum = sum * expf(max - x) + 1.0f;
          max = x;
        } else {
          sum += expf(x - max);
        }
        picked = c == label ? x : picked;
      }
      value = w * (max + logf(sum) - picked);
      sum_wce += value;
      sum_w += w;
    }
    if (pr.write_map) {
      map[image * pr.pixels + i] = value;
    }
  }

  // Fixed-order block reduction: a shuffle tree in each warp, then the warps in order.
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    sum_wce += __shfl_down_sync(0xffffffffu, sum_wce, offset);
    sum_w += __shfl_down_sync(0xffffffffu, sum_w, offset);
  }
  if (lane == 0) {
    warp_sums[warp][0] = sum_wce;
    warp_sums[warp][1] = sum_w;
  }
  __syncthreads();
  if (threadIdx.x < 2) {
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      total += warp_sums[w][threadIdx.x];
    }
    partial[static_cast<int64_t>(blockIdx.x) * 2 + threadIdx.x] = total;
  }
}

// --------------------------------------------------------------------------------------------------- backward

// grad: (B, C, S) with strides g_*, every element written once. grad_sums: (B, 2) float32 contiguous; grad_map:
// (B, S) float32 contiguous when write_map, else unused. Grid: B * chunks blocks. kCache > 0: C <= kCache, a pixel's
// logits stay in registers; kCache == 0: they are read twice from memory (L1 hits).
template <typename scalar_t, int kCache>
__global__ void __launch_bounds__(kThreads) dbce_ce_bwd_kernel(
    // Output
    scalar_t* __restrict__ grad,
    // Input
    const float* __restrict__ grad_sums, const float* __restrict__ grad_map, const scalar_t* __restrict__ logits,
    const void* __restrict__ labels, const void* __restrict__ masks, const float* __restrict__ class_weights,
    // Sizes, strides and options
    const CeProblem pr) {
  constexpr bool kCached = kCache > 0;
  constexpr int kSlots = kCached ? kCache : 1;
  __shared__ float weights[kMaxClasses];
  const int64_t image = static_cast<int64_t>(blockIdx.x) / pr.chunks;
  const int64_t begin = (static_cast<int64_t>(blockIdx.x) % pr.chunks) * kChunkPixels;
  const int64_t end = min(pr.pixels, begin + kChunkPixels);
  load_weights(weights, class_weights, pr, image);
  const float grad_sum = grad_sums[image * 2];
  const scalar_t* x_image = logits + image * pr.x_b;
  scalar_t* g_image = grad + image * pr.g_b;

  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    int64_t label;
    const float w = pixel_weight(pr, labels, masks, weights, image, i, label);
    // d loss / d CE_i, as the reference's autograd forms it: (g_sum + g_map) w.
    const float upstream = pr.write_map ? grad_sum + grad_map[image * pr.pixels + i] : grad_sum;
    const float scale = label >= 0 ? upstream * w : 0.0f;
    scalar_t* g_pixel = g_image + i * pr.g_s;
    if (scale == 0.0f) {
      for (int64_t c = 0; c < pr.classes; ++c) {
        g_pixel[c * pr.g_c] = static_cast<scalar_t>(0.0f);
      }
      continue;
    }
    const scalar_t* x_pixel = x_image + i * pr.x_s;
    // 1. max and sum_c exp(x_c - max), then lse.
    float cache[kSlots];
    float max = -INFINITY;
    if constexpr (kCached) {
#pragma unroll
      for (int c = 0; c < kSlots; ++c) {
        cache[c] = c < pr.classes ? static_cast<float>(x_pixel[c * pr.x_c]) : -INFINITY;
        max = fmaxf(max, cache[c]);
      }
    } else {
      for (int64_t c = 0; c < pr.classes; ++c) {
        max = fmaxf(max, static_cast<float>(x_pixel[c * pr.x_c]));
      }
    }
    float sum = 0.0f;
    if constexpr (kCached) {
#pragma unroll
      for (int c = 0; c < kSlots; ++c) {
        sum += c < pr.classes ? expf(cache[c] - max) : 0.0f;
      }
    } else {
      for (int64_t c = 0; c < pr.classes; ++c) {
        sum += expf(static_cast<float>(x_pixel[c * pr.x_c]) - max);
      }
    }
    const float lse = max + logf(sum);
    // 2. dx_c = scale softmax_c - scale [c = label], softmax as the reference's logsumexp backward: exp(x - lse).
    const auto write = [&](int64_t c, float x) {
      const float dx = scale * expf(x - lse) - (c == label ? scale : 0.0f);
      g_pixel[c * pr.g_c] = static_cast<scalar_t>(dx);
    };
    if constexpr (kCached) {
#pragma unroll
      for (int c = 0; c < kSlots; ++c) {
        if (c < pr.classes) {
          write(c, cache[c]);
        }
      }
    } else {
      for (int64_t c = 0; c < pr.classes; ++c) {
        write(c, static_cast<float>(x_pixel[c * pr.x_c]));
      }
    }
  }
}

// ============================================================================================= host: dbce_masks

// The separable form of the element (see the top of the file): windows, the (reach_d + 1, reach_h + 1) rank table
// and max_rank (reach_w + 1). Computed in float64 with the reference's expressions and operation order.
struct Element {
  int64_t reach_d = 0, reach_h = 0, reach_w = 0;
  int64_t values = 0;        // distinct ranks
  std::vector<int64_t> table;  // rank, or -1 outside the element
  std::vector<int32_t> max_rank;
};

Element make_element(int64_t element, double radius, const std::vector<double>& spacing,
                     const std::vector<int64_t>& sizes) {
  const double scale = 1.0 + kBoundaryTolerance;
  int64_t extent[3];
  for (int k = 0; k < 3; ++k) {
    // floor(radius / s * (1 + tol)) as in structuring_element; offsets past the image never land in it.
    const double e = std::floor(radius / spacing[k] * scale);
    extent[k] = static_cast<int64_t>(std::min(e, static_cast<double>(sizes[k] - 1)));
  }
  Element el;
  if (element == kElementCube) {
    // max_k |o_k s_k| <= radius (1 + tol): an interval per axis.
    const double bound = radius * scale;
    int64_t reach[3];
    for (int k = 0; k < 3; ++k) {
      reach[k] = extent[k];
      while (reach[k] > 0 && !(static_cast<double>(reach[k]) * spacing[k] <= bound)) {
        --reach[k];
      }
    }
    el.reach_d = reach[0];
    el.reach_h = reach[1];
    el.reach_w = reach[2];
    el.values = 1;
    el.table.assign((el.reach_d + 1) * (el.reach_h + 1), 0);
    el.max_rank.assign(el.reach_w + 1, 0);
    return el;
  }
  // Ball: sum_k (o_k s_k)^2 <= radius^2 (1 + tol), summed D, H, W as the reference's sum() does.
  const double limit = radius * radius * scale;
  el.reach_d = extent[0];
  el.reach_h = extent[1];
  el.reach_w = extent[2];
  const auto square = [&](int64_t o, int k) {
    const double t = static_cast<double>(o) * spacing[k];
    return t * t;
  };
  std::vector<double> pair((el.reach_d + 1) * (el.reach_h + 1));
  std::vector<double> inside;
  for (int64_t a = 0; a <= el.reach_d; ++a) {
    for (int64_t b = 0; b <= el.reach_h; ++b) {
      const double v = square(a, 0) + square(b, 1);
      pair[a * (el.reach_h + 1) + b] = v;
      if (v <= limit) {
        inside.push_back(v);
      }
    }
  }
  std::sort(inside.begin(), inside.end());
  inside.erase(std::unique(inside.begin(), inside.end()), inside.end());
  el.values = static_cast<int64_t>(inside.size());  // >= 1: (0, 0) is inside
  el.table.resize(pair.size());
  for (size_t p = 0; p < pair.size(); ++p) {
    const auto it = std::lower_bound(inside.begin(), inside.end(), pair[p]);
    el.table[p] = (it != inside.end() && *it == pair[p]) ? static_cast<int64_t>(it - inside.begin()) : -1;
  }
  el.max_rank.resize(el.reach_w + 1);
  int64_t r = el.values - 1;
  for (int64_t k = 0; k <= el.reach_w; ++k) {  // non-increasing in k
    const double q = square(k, 2);
    while (r >= 0 && !(inside[r] + q <= limit)) {
      --r;
    }
    el.max_rank[k] = static_cast<int32_t>(r);
  }
  return el;
}

// A dtype as a value, for generic lambdas: Type<T>{} carries T.
template <typename T>
struct Type {
  using type = T;
};

// Calls body(Type<mask_t>{}) for the mask dtype of C classes.
template <typename Body>
void dispatch_mask(at::ScalarType dtype, const Body& body) {
  switch (dtype) {
    case at::kByte:
      body(Type<uint8_t>{});
      break;
    case at::kShort:
      body(Type<int16_t>{});
      break;
    case at::kInt:
      body(Type<int32_t>{});
      break;
    default:
      body(Type<int64_t>{});
      break;
  }
}

at::ScalarType mask_dtype(int64_t classes) {
  return classes <= 8 ? at::kByte : classes <= 16 ? at::kShort : classes <= 32 ? at::kInt : at::kLong;
}

int grid_stride_blocks(int64_t total) {
  return static_cast<int>(std::max<int64_t>(1, std::min(ceil_div(total, kThreads), kMaxStrideBlocks)));
}

// A signed dtype of index_t's width stores the indices (only bytes are copied; the kernels read index_t).
template <typename index_t>
at::ScalarType index_storage() {
  return sizeof(index_t) == 1 ? at::kByte : sizeof(index_t) == 2 ? at::kShort : at::kInt;
}

template <typename index_t>
void launch_masks(const MaskProblem& pr, const Element& el, const at::Tensor& cls, at::Tensor& masks,
                  at::Tensor& areas, cudaStream_t stream) {
  constexpr int64_t kInf = std::numeric_limits<index_t>::max();
  const at::TensorOptions on_device = cls.options();
  // The tables, from pinned memory: the copy is asynchronous (no hidden sync).
  const at::TensorOptions pinned = at::TensorOptions().pinned_memory(true);
  at::Tensor table_host = at::empty({static_cast<int64_t>(el.table.size())},
                                    pinned.dtype(index_storage<index_t>()));
  index_t* table_ptr = static_cast<index_t*>(table_host.data_ptr());
  for (size_t p = 0; p < el.table.size(); ++p) {
    table_ptr[p] = el.table[p] < 0 ? static_cast<index_t>(kInf) : static_cast<index_t>(el.table[p]);
  }
  at::Tensor max_rank_host = at::empty({static_cast<int64_t>(el.max_rank.size())}, pinned.dtype(at::kInt));
  std::copy(el.max_rank.begin(), el.max_rank.end(), max_rank_host.mutable_data_ptr<int32_t>());
  const at::Tensor table = table_host.to(on_device.dtype(table_host.scalar_type()), /*non_blocking=*/true);
  const at::Tensor max_rank = max_rank_host.to(on_device.dtype(at::kInt), /*non_blocking=*/true);

  const int64_t entries = pr.batch * pr.classes * pr.pixels;
  at::Tensor nearest = at::empty({entries}, on_device.dtype(table.scalar_type()));
  at::Tensor rank = at::empty({entries}, on_device.dtype(table.scalar_type()));
  dbce_nearest_d_kernel<index_t><<<grid_stride_blocks(pr.batch * pr.pixels), kThreads, 0, stream>>>(
      static_cast<index_t*>(nearest.data_ptr()), cls.const_data_ptr<uint8_t>(), pr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  dbce_rank_h_kernel<index_t><<<grid_stride_blocks(entries), kThreads, 0, stream>>>(
      static_cast<index_t*>(rank.data_ptr()), static_cast<const index_t*>(nearest.const_data_ptr()),
      static_cast<const index_t*>(table.const_data_ptr()), pr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  dispatch_mask(masks.scalar_type(), [&](auto type) {
    using mask_t = typename decltype(type)::type;
    dbce_masks_w_kernel<index_t, mask_t><<<static_cast<unsigned>(pr.batch * pr.chunks), kThreads, 0, stream>>>(
        static_cast<mask_t*>(masks.data_ptr()), reinterpret_cast<unsigned long long*>(areas.data_ptr<int64_t>()),
        static_cast<const index_t*>(rank.const_data_ptr()), cls.const_data_ptr<uint8_t>(),
        max_rank.const_data_ptr<int32_t>(), pr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dbce_masks_cuda(const at::Tensor& labels,
                                                                          int64_t num_classes, int64_t ignore_index,
                                                                          int64_t element, double radius,
                                                                          at::ArrayRef<double> spacing) {
  constexpr const char* op = "torch_medloss::dbce_masks";
  TORCH_CHECK(labels.dim() == 4, op, ": labels must be 4-D (B, D, H, W), got shape ", labels.sizes());
  TORCH_CHECK(is_int_dtype(labels.scalar_type()), op, ": labels must be uint8, int8, int16, int32 or int64, got ",
              labels.scalar_type());
  TORCH_CHECK(num_classes >= 1 && num_classes <= kMaxClasses, op, ": num_classes must be in [1, ", kMaxClasses,
              "] (one mask bit per class), got ", num_classes);
  TORCH_CHECK(element == kElementBall || element == kElementCube, op,
              ": element must be 0 (ball) or 1 (cube), got ", element);
  TORCH_CHECK(std::isfinite(radius) && radius >= 0.0, op, ": radius must be finite and >= 0, got ", radius);
  TORCH_CHECK(spacing.size() == 3, op, ": spacing must hold 3 voxel sizes (D, H, W), got ", spacing.size());
  for (const double s : spacing) {
    TORCH_CHECK(std::isfinite(s) && s > 0.0, op, ": spacing must be finite and > 0, got ", spacing);
  }

  const c10::cuda::CUDAGuard device_guard(labels.device());
  const int64_t batch = labels.size(0);
  const at::TensorOptions long_options = labels.options().dtype(at::kLong);
  at::Tensor masks = at::empty(labels.sizes(), labels.options().dtype(mask_dtype(num_classes)));
  at::Tensor counts = at::zeros({batch, num_classes}, long_options);
  at::Tensor areas = at::zeros({batch, num_classes}, long_options);
  at::Tensor invalid = at::zeros({batch}, long_options);
  if (labels.numel() == 0) {
    return {masks, counts, areas, invalid};
  }

  MaskProblem pr{};
  pr.batch = batch;
  pr.depth = labels.size(1);
  pr.height = labels.size(2);
  pr.width = labels.size(3);
  pr.pixels = pr.depth * pr.height * pr.width;
  pr.classes = num_classes;
  pr.chunks = ceil_div(pr.pixels, kChunkPixels);
  pr.l_b = labels.stride(0);
  pr.l_d = labels.stride(1);
  pr.l_h = labels.stride(2);
  pr.l_w = labels.stride(3);
  pr.ignore_index = ignore_index;
  pr.label_type = int_type(labels.scalar_type());
  TORCH_CHECK(pr.chunks <= INT_MAX && batch <= INT_MAX / pr.chunks, op, ": labels of shape (B, D, H, W) must have ",
              "B * ceil(D H W / ", kChunkPixels, ") <= 2**31 - 1, got shape ", labels.sizes());
  const Element el = make_element(element, radius, spacing.vec(), {pr.depth, pr.height, pr.width});
  pr.reach_d = el.reach_d;
  pr.reach_h = el.reach_h;
  pr.reach_w = el.reach_w;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor cls = at::empty({batch, pr.pixels}, labels.options().dtype(at::kByte));
  dbce_classify_kernel<<<static_cast<unsigned>(batch * pr.chunks), kThreads, 0, stream>>>(
      cls.mutable_data_ptr<uint8_t>(), reinterpret_cast<unsigned long long*>(counts.mutable_data_ptr<int64_t>()),
      reinterpret_cast<unsigned long long*>(invalid.mutable_data_ptr<int64_t>()), labels.const_data_ptr(), pr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // The narrowest index type that holds every distance along D and every rank, with its maximum left for kInf.
  const int64_t largest = std::max(el.reach_d, el.values - 1);
  if (largest < std::numeric_limits<uint8_t>::max()) {
    launch_masks<uint8_t>(pr, el, cls, masks, areas, stream);
  } else if (largest < std::numeric_limits<uint16_t>::max()) {
    launch_masks<uint16_t>(pr, el, cls, masks, areas, stream);
  } else {
    TORCH_CHECK(largest < std::numeric_limits<uint32_t>::max(), op, ": radius ", radius, " with spacing ", spacing,
                " gives too large an element (", el.values, " distinct offsets lengths)");
    launch_masks<uint32_t>(pr, el, cls, masks, areas, stream);
  }
  return {masks, counts, areas, invalid};
}

// ============================================================================================ host: dbce_ce ops

void check_ce_inputs(const char* op, const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& masks,
                     const at::Tensor& class_weights) {
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be 3-D (B, C, S), got shape ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kHalf ||
                  logits.scalar_type() == at::kBFloat16,
              op, ": CUDA logits must be float32, bfloat16 or float16 (float64 runs on the CPU only), got ",
              logits.scalar_type());
  const int64_t batch = logits.size(0);
  const int64_t classes = logits.size(1);
  const int64_t pixels = logits.size(2);
  TORCH_CHECK(classes >= 1 && classes <= kMaxClasses, op, ": logits must have 1 to ", kMaxClasses,
              " classes (one mask bit per class), got shape ", logits.sizes());
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == batch && labels.size(1) == pixels, op,
              ": labels must have shape (B, S) = [", batch, ", ", pixels, "], got ", labels.sizes());
  TORCH_CHECK(is_int_dtype(labels.scalar_type()), op, ": labels must be uint8, int8, int16, int32 or int64, got ",
              labels.scalar_type());
  TORCH_CHECK(masks.dim() == 2 && masks.size(0) == batch && masks.size(1) == pixels, op,
              ": masks must have shape (B, S) = [", batch, ", ", pixels, "], got ", masks.sizes());
  TORCH_CHECK(is_int_dtype(masks.scalar_type()), op, ": masks must be uint8, int8, int16, int32 or int64, got ",
              masks.scalar_type());
  TORCH_CHECK(class_weights.dim() == 2 && class_weights.size(0) == batch && class_weights.size(1) == classes, op,
              ": class_weights must have shape (B, C) = [", batch, ", ", classes, "], got ", class_weights.sizes());
  TORCH_CHECK(class_weights.scalar_type() == at::kFloat, op, ": class_weights must be float32, got ",
              class_weights.scalar_type());
  for (const at::Tensor* t : {&labels, &masks, &class_weights}) {
    TORCH_CHECK(t->device() == logits.device(), op, ": labels, masks and class_weights must be on the logits' ",
                "device (", logits.device(), "), got ", t->device());
  }
}

CeProblem make_ce_problem(const char* op, const at::Tensor& logits, const at::Tensor& labels,
                          const at::Tensor& masks, int64_t ignore_index, bool write_map) {
  CeProblem pr{};
  pr.classes = logits.size(1);
  pr.pixels = logits.size(2);
  pr.chunks = ceil_div(pr.pixels, kChunkPixels);
  pr.x_b = logits.stride(0);
  pr.x_c = logits.stride(1);
  pr.x_s = logits.stride(2);
  pr.l_b = labels.stride(0);
  pr.l_s = labels.stride(1);
  pr.m_b = masks.stride(0);
  pr.m_s = masks.stride(1);
  pr.ignore_index = ignore_index;
  pr.label_type = int_type(labels.scalar_type());
  pr.mask_type = int_type(masks.scalar_type());
  pr.write_map = write_map;
  const int64_t batch = logits.size(0);
  TORCH_CHECK(pr.chunks <= INT_MAX && batch <= INT_MAX / pr.chunks, op, ": logits of shape (B, C, S) must have ",
              "B * ceil(S / ", kChunkPixels, ") <= 2**31 - 1, got shape ", logits.sizes());
  return pr;
}

// Calls body(Type<scalar_t>{}) for the logits' dtype (checked: float32, float16 or bfloat16).
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
      TORCH_INTERNAL_ASSERT(false, "dbce CUDA: unexpected logits dtype ", dtype);
  }
}

std::tuple<at::Tensor, at::Tensor> dbce_ce_fwd_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                    const at::Tensor& masks, const at::Tensor& class_weights,
                                                    int64_t ignore_index, bool write_map) {
  constexpr const char* op = "torch_medloss::dbce_ce_fwd";
  check_ce_inputs(op, logits, labels, masks, class_weights);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const int64_t batch = logits.size(0);
  const int64_t pixels = logits.size(2);
  const at::TensorOptions options = logits.options().dtype(at::kFloat);
  at::Tensor map = write_map ? at::empty({batch, pixels}, options) : at::empty({0}, options);
  if (logits.numel() == 0) {
    return {at::zeros({batch, 2}, options), map};
  }
  const CeProblem pr = make_ce_problem(op, logits, labels, masks, ignore_index, write_map);
  const at::Tensor weights = class_weights.contiguous();
  at::Tensor partial = at::empty({batch, pr.chunks, 2}, options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_logits(logits.scalar_type(), [&](auto type) {
    using scalar_t = typename decltype(type)::type;
    dbce_ce_fwd_kernel<scalar_t><<<static_cast<unsigned>(batch * pr.chunks), kThreads, 0, stream>>>(
        partial.mutable_data_ptr<float>(), write_map ? map.mutable_data_ptr<float>() : nullptr,
        logits.const_data_ptr<scalar_t>(), labels.const_data_ptr(), masks.const_data_ptr(),
        weights.const_data_ptr<float>(), pr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // torch's CUDA sum is deterministic (a fixed reduction tree, no atomics).
  at::Tensor sums = pr.chunks == 1 ? partial.view({batch, 2}) : partial.sum(1);
  return {sums, map};
}

at::Tensor dbce_ce_bwd_cuda(const at::Tensor& grad_sums, const at::Tensor& grad_map, const at::Tensor& logits,
                            const at::Tensor& labels, const at::Tensor& masks, const at::Tensor& class_weights,
                            int64_t ignore_index, bool write_map) {
  constexpr const char* op = "torch_medloss::dbce_ce_bwd";
  check_ce_inputs(op, logits, labels, masks, class_weights);
  const int64_t batch = logits.size(0);
  const int64_t classes = logits.size(1);
  const int64_t pixels = logits.size(2);
  TORCH_CHECK(grad_sums.dim() == 2 && grad_sums.size(0) == batch && grad_sums.size(1) == 2, op,
              ": grad_sums must have shape (B, 2) = [", batch, ", 2], got ", grad_sums.sizes());
  TORCH_CHECK(at::isFloatingType(grad_sums.scalar_type()), op, ": grad_sums must be floating point, got ",
              grad_sums.scalar_type());
  TORCH_CHECK(grad_sums.device() == logits.device(), op, ": grad_sums must be on the logits' device (",
              logits.device(), "), got ", grad_sums.device());
  if (write_map) {
    TORCH_CHECK(grad_map.dim() == 2 && grad_map.size(0) == batch && grad_map.size(1) == pixels, op,
                ": grad_map must have shape (B, S) = [", batch, ", ", pixels, "] when write_map, got ",
                grad_map.sizes());
    TORCH_CHECK(at::isFloatingType(grad_map.scalar_type()), op, ": grad_map must be floating point, got ",
                grad_map.scalar_type());
    TORCH_CHECK(grad_map.device() == logits.device(), op, ": grad_map must be on the logits' device (",
                logits.device(), "), got ", grad_map.device());
  }
  const c10::cuda::CUDAGuard device_guard(logits.device());
  // Same strides as the logits for a dense, non-overlapping layout (channels_last stays channels_last).
  at::Tensor grad = at::empty_like(logits);
  if (logits.numel() == 0) {
    return grad;
  }
  CeProblem pr = make_ce_problem(op, logits, labels, masks, ignore_index, write_map);
  pr.g_b = grad.stride(0);
  pr.g_c = grad.stride(1);
  pr.g_s = grad.stride(2);
  const at::Tensor weights = class_weights.contiguous();
  const at::Tensor up_sums = grad_sums.to(at::kFloat).contiguous();
  const at::Tensor up_map = write_map ? grad_map.to(at::kFloat).contiguous() : at::Tensor();
  const float* up_map_ptr = write_map ? up_map.const_data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(batch * pr.chunks));
  dispatch_logits(logits.scalar_type(), [&](auto type) {
    using scalar_t = typename decltype(type)::type;
    const auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, 0, stream>>>(grad.mutable_data_ptr<scalar_t>(), up_sums.const_data_ptr<float>(),
                                            up_map_ptr, logits.const_data_ptr<scalar_t>(), labels.const_data_ptr(),
                                            masks.const_data_ptr(), weights.const_data_ptr<float>(), pr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (classes <= 4) {
      launch(dbce_ce_bwd_kernel<scalar_t, 4>);
    } else if (classes <= 8) {
      launch(dbce_ce_bwd_kernel<scalar_t, 8>);
    } else if (classes <= kBackwardCached) {
      launch(dbce_ce_bwd_kernel<scalar_t, kBackwardCached>);
    } else {
      launch(dbce_ce_bwd_kernel<scalar_t, 0>);
    }
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_medloss, CUDA, m) {
  m.impl("dbce_masks", &dbce_masks_cuda);
  m.impl("dbce_ce_fwd", &dbce_ce_fwd_cuda);
  m.impl("dbce_ce_bwd", &dbce_ce_bwd_cuda);
}

}  // namespace torch_medloss
