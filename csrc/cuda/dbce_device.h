// Device code of the DBCE CUDA ops (csrc/cuda/dbce_kernel.cu plans and launches it): the class masks passes and
// the weighted cross entropy, forward and backward. The contract is torch_medloss/reference/dbce_ops.py; the
// constants come from csrc/contract.h. No ATen here, so the device code compiles (and reports its registers) on its
// own.
//
// Masks. Labels (B, D, H, W) of any integer dtype and strides are read in place; pixel i of an image is
// (d, h, w) with i = (d H + h) W + w. The element test is the reference's float64 inequality, evaluated on the host
// into small integer tables (dbce_kernel.cu), so the masks are bitwise the reference's. A pass is one of:
//   - final, list: each pixel ORs the class bits of the valid labels at the element's offsets (an explicit list of
//     at most DBCE_MAX_BOX_OFFSETS offsets, in shared memory): the whole dilation in one pass;
//   - final, window: along one axis, from the labels (1-D elements) or from a rank buffer: bit c is set when some
//     |k| <= reach has rank[i + k e, c] <= max_rank[|k|];
//   - rank, list or window: from the labels, the smallest rank over the offsets that hit class c, per (pixel,
//     class), into a (B, N, C) index buffer (the largest index value: no hit);
//   - middle (3 passes only): along H, rank[i, c] = min over |b| of table[nearest[i + b W, c]][|b|].
// The final pass also counts |M_c|, |D_c| and the invalid labels into one int32 row per block, and with
// ``finalize`` the last block to finish (an atomic ticket) adds the rows in a fixed order and writes the class
// weights w_c = N / (K A_c) and the batch's invalid count.
//
// Cross entropy. A block owns a chunk of pixels of one image; each thread walks it with stride kThreads, computes
// w_i from the mask bits and the image's class weights, and the logsumexp with an online max (one read of the
// logits). The forward reduces [sum w CE, sum w] in a fixed order into the block's row; with ``finalize`` the last
// block adds the rows in a fixed order and writes the loss and d loss / d sum w CE (norm). Integer atomics for the
// tickets only: no float atomics, bitwise reproducible.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../contract.h"
#include "integer_load.h"

namespace torch_medloss {
namespace dbce_cuda {
namespace {

namespace K = ::torch_medloss::contract;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// A step: the pixels a block covers with one pixel per thread, 16 times. Chunks are whole steps, a function of the
// shape only (never of the GPU).
constexpr int64_t kStepPixels = int64_t{kThreads} * 16;
constexpr int kMaxClasses = static_cast<int>(K::MAX_MASK_CLASSES);
constexpr int kMaxList = static_cast<int>(K::DBCE_MAX_BOX_OFFSETS);
// Backward: classes held in registers at most; above, the classes are read twice from memory (L1 hits).
constexpr int kBackwardCached = 16;
// The int32 counters of the dbce_loss op (zero before the launches): the two launches' tickets, then the batch's
// invalid labels (written by the masks pass's last block, read by the cross entropy).
constexpr int kMasksTicket = 0, kCeTicket = 1, kInvalid = 2, kNumCounters = 3;
// The element's tables travel as a kernel parameter (no copy, safe under CUDA graph capture) when they fit these
// int16 entries; larger ones (very large radii) are copied to device memory instead.
constexpr int kParamTable = 1024;
// The final pass's source.
constexpr int kFromList = 0, kFromLabelsWindow = 1, kFromRanks = 2;

// Bits 0 .. C-1.
__host__ __device__ __forceinline__ uint64_t class_bits(int64_t classes) {
  return classes >= 64 ? ~uint64_t{0} : (uint64_t{1} << classes) - 1;
}

// The element's tables (see dbce_kernel.cu): in the kernel parameter, or in device memory when ``memory`` is set.
struct Tables {
  int16_t v[kParamTable];
};

__device__ __forceinline__ int32_t table_at(const Tables& params, const int32_t* memory, int64_t index) {
  return memory != nullptr ? __ldg(memory + index) : static_cast<int32_t>(params.v[index]);
}

// Labels (B, D, H, W) and the pixel numbering.
struct Volume {
  int64_t depth, height, width, pixels;
  int64_t l_b, l_d, l_h, l_w;  // labels strides
  int64_t l_flat;              // with ``flat``: the stride of i (the spatial dims merge into one)
  bool flat;
  int label_type;
  int64_t classes, ignore_index;

  __device__ __forceinline__ int64_t label_at(const void* labels, int64_t image, int64_t i) const {
    if (flat) {
      return load_int(labels, label_type, image * l_b + i * l_flat);
    }
    const int64_t w = i % width;
    const int64_t h = (i / width) % height;
    const int64_t d = i / (width * height);
    return load_int(labels, label_type, image * l_b + d * l_d + h * l_h + w * l_w);
  }
  // A class of the dilation and the cross entropy: in [0, C) and not ignore_index.
  __device__ __forceinline__ bool valid(int64_t label) const {
    return static_cast<uint64_t>(label) < static_cast<uint64_t>(classes) && label != ignore_index;
  }
  // Neither a class nor ignore_index: counted, and NaN for the loss.
  __device__ __forceinline__ bool invalid(int64_t label) const {
    return static_cast<uint64_t>(label) >= static_cast<uint64_t>(classes) && label != ignore_index;
  }
};

// One masks pass.
struct MaskPass {
  int64_t batch, chunks, chunk_pixels;  // blocks: batch * chunks, each over chunk_pixels pixels of one image
  int64_t axis_stride, axis_size, reach;  // window passes: the axis in the pixel numbering
  int64_t table;                          // offset of the pass's table in the Tables
  int64_t list_size;                      // list passes: entries of 4 int32 (dD, dH, dW, rank) at ``table``
  int64_t pair_row;                       // middle pass: the table's row length (reach_h + 1)
  bool finalize, unit_batch;
};

// Adds this warp's count of the lanes where ``flag`` holds to row[slot] (lane 0 writes; no atomics).
__device__ __forceinline__ void warp_count(unsigned int* row, int slot, bool flag) {
  const unsigned int vote = __ballot_sync(0xffffffffu, flag);
  if (threadIdx.x % 32 == 0) {
    row[slot] += __popc(vote);
  }
}

// The pixel's coordinate along a window pass's axis.
__device__ __forceinline__ int64_t axis_coord(const MaskPass& mp, int64_t i) {
  return (i / mp.axis_stride) % mp.axis_size;
}

// The offset list of a list pass in shared memory: bounds deltas and the labels offset of each entry.
struct OffsetList {
  int32_t d[kMaxList], h[kMaxList], w[kMaxList], rank[kMaxList];
  int64_t delta[kMaxList];
};

__device__ __forceinline__ void load_list(OffsetList& list, const Tables& tables, const int32_t* memory,
                                          const MaskPass& mp, const Volume& vol) {
  for (int e = threadIdx.x; e < mp.list_size; e += blockDim.x) {
    const int64_t entry = mp.table + 4 * e;
    list.d[e] = table_at(tables, memory, entry);
    list.h[e] = table_at(tables, memory, entry + 1);
    list.w[e] = table_at(tables, memory, entry + 2);
    list.rank[e] = table_at(tables, memory, entry + 3);
    list.delta[e] = list.d[e] * vol.l_d + list.h[e] * vol.l_h + list.w[e] * vol.l_w;
  }
}

// --------------------------------------------------------------------------------------------- 1. rank passes

// ranks: (B, N, C) index_t, every entry written once: per class the smallest rank over the offsets whose
// neighbour is a valid pixel of that class (the largest index_t value if none). kList: the offsets of the list
// (sorted by rank, so the first hit of a class is its smallest); else a window along the pass's axis, rank
// table[|k|] (-1: outside the element). Grid: batch * chunks blocks.
template <typename index_t, bool kList>
__global__ void __launch_bounds__(kThreads) dbce_rank_first_kernel(index_t* __restrict__ ranks,
                                                                   const __grid_constant__ Tables tables,
                                                                   const int32_t* __restrict__ table_memory,
                                                                   const void* __restrict__ labels,
                                                                   const Volume vol, const MaskPass mp) {
  constexpr index_t kInf = static_cast<index_t>(~index_t{0});
  __shared__ OffsetList list;
  if constexpr (kList) {
    load_list(list, tables, table_memory, mp, vol);
    __syncthreads();
  }
  const int64_t image = static_cast<int64_t>(blockIdx.x) / mp.chunks;
  const int64_t begin = (static_cast<int64_t>(blockIdx.x) % mp.chunks) * mp.chunk_pixels;
  const int64_t end = min(vol.pixels, begin + mp.chunk_pixels);
  const uint64_t all = class_bits(vol.classes);
  const int64_t base = image * vol.l_b;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const int64_t w = i % vol.width;
    const int64_t h = (i / vol.width) % vol.height;
    const int64_t d = i / (vol.width * vol.height);
    const int64_t own = base + d * vol.l_d + h * vol.l_h + w * vol.l_w;
    index_t* out = ranks + (image * vol.pixels + i) * vol.classes;
    uint64_t found = 0;
    const auto hit = [&](int64_t offset, int32_t rank) {
      const int64_t label = load_int(labels, vol.label_type, offset);
      if (vol.valid(label) && !((found >> label) & 1)) {
        found |= uint64_t{1} << label;
        out[label] = static_cast<index_t>(rank);
      }
    };
    if constexpr (kList) {
      for (int e = 0; e < mp.list_size && found != all; ++e) {
        const int64_t nd = d + list.d[e], nh = h + list.h[e], nw = w + list.w[e];
        if (nd >= 0 && nd < vol.depth && nh >= 0 && nh < vol.height && nw >= 0 && nw < vol.width) {
          hit(own + list.delta[e], list.rank[e]);
        }
      }
    } else {
      const int64_t coord = axis_coord(mp, i);
      const int64_t label_stride = mp.axis_stride == 1 ? vol.l_w : mp.axis_stride == vol.width ? vol.l_h : vol.l_d;
      for (int64_t k = 0; k <= mp.reach && found != all; ++k) {
        const int32_t rank = table_at(tables, table_memory, mp.table + k);
        if (rank < 0) {
          continue;
        }
        if (coord - k >= 0) {
          hit(own - k * label_stride, rank);
        }
        if (k > 0 && coord + k < mp.axis_size) {
          hit(own + k * label_stride, rank);
        }
      }
    }
    uint64_t missing = all & ~found;
    while (missing != 0) {
      const int c = __ffsll(static_cast<long long>(missing)) - 1;
      missing &= missing - 1;
      out[c] = kInf;
    }
  }
}

// 3 passes only. out: (B, N, C) index_t: min over |b| <= reach (along the pass's axis) of
// table[in[i + b e, c] * pair_row + |b|] (-1: outside the element). Grid: batch * chunks blocks.
template <typename index_t>
__global__ void __launch_bounds__(kThreads) dbce_rank_middle_kernel(index_t* __restrict__ out,
                                                                    const index_t* __restrict__ in,
                                                                    const __grid_constant__ Tables tables,
                                                                    const int32_t* __restrict__ table_memory,
                                                                    const Volume vol, const MaskPass mp) {
  constexpr index_t kInf = static_cast<index_t>(~index_t{0});
  const int64_t image = static_cast<int64_t>(blockIdx.x) / mp.chunks;
  const int64_t begin = (static_cast<int64_t>(blockIdx.x) % mp.chunks) * mp.chunk_pixels;
  const int64_t end = min(vol.pixels, begin + mp.chunk_pixels);
  const int64_t step = mp.axis_stride * vol.classes;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const int64_t coord = axis_coord(mp, i);
    const int64_t low = max(-coord, -mp.reach);
    const int64_t high = min(mp.axis_size - 1 - coord, mp.reach);
    const int64_t at = (image * vol.pixels + i) * vol.classes;
    for (int64_t c = 0; c < vol.classes; ++c) {
      index_t best = kInf;
      for (int64_t b = low; b <= high; ++b) {
        const index_t a = in[at + c + b * step];
        if (a != kInf) {
          const int32_t r = table_at(tables, table_memory, mp.table + static_cast<int64_t>(a) * mp.pair_row +
                                                                  (b < 0 ? -b : b));
          if (r >= 0 && static_cast<index_t>(r) < best) {
            best = static_cast<index_t>(r);
          }
        }
      }
      out[at + c] = best;
    }
  }
}

// ---------------------------------------------------------------------------------------------- 2. final pass

// The last block of a finalized masks pass: adds the partial rows (B, chunks, 2C + 1) = [counts | areas | invalid]
// of each unit (an image, or the batch) and writes class_weights (B, C) float32 contiguous, w_c = N / (K A_c) in
// float64 rounded once to float32 (0 for absent classes; reference.dbce.class_weights_from_sums), and the batch's
// invalid count into counters[kInvalid]. Reads past L1 (other blocks wrote the rows during this launch).
__device__ void masks_class_weights(float* class_weights, int32_t* counters, const int32_t* partial,
                                    const Volume& vol, const MaskPass& mp) {
  __shared__ long long unit_sums[2 * kMaxClasses + 1];
  const int slots = 2 * static_cast<int>(vol.classes) + 1;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t units = mp.unit_batch ? 1 : mp.batch;
  const int64_t images_per_unit = mp.unit_batch ? mp.batch : 1;
  long long invalid_total = 0;  // thread 0's
  for (int64_t unit = 0; unit < units; ++unit) {
    const int64_t rows = images_per_unit * mp.chunks;
    const int32_t* first = partial + unit * images_per_unit * mp.chunks * slots;
    for (int s = warp; s < slots; s += kWarps) {
      long long total = 0;
      for (int64_t r = lane; r < rows; r += 32) {
        total += __ldcg(first + r * slots + s);
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) {
        total += __shfl_down_sync(0xffffffffu, total, offset);
      }
      if (lane == 0) {
        unit_sums[s] = total;
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      long long valid_count = 0, present = 0;
      for (int c = 0; c < vol.classes; ++c) {
        valid_count += unit_sums[c];
        present += unit_sums[c] > 0 ? 1 : 0;
      }
      invalid_total += unit_sums[slots - 1];
      for (int64_t b = unit * images_per_unit; b < (unit + 1) * images_per_unit; ++b) {
        for (int c = 0; c < vol.classes; ++c) {
          const double ratio = static_cast<double>(valid_count) /
                               (static_cast<double>(present) * static_cast<double>(unit_sums[vol.classes + c]));
          class_weights[b * vol.classes + c] = unit_sums[c] > 0 ? static_cast<float>(ratio) : 0.0f;
        }
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    counters[kInvalid] = static_cast<int32_t>(min(invalid_total, static_cast<long long>(INT32_MAX)));
  }
}

// masks: (B, N) mask_t contiguous, every entry written once. partial: (B, chunks, 2C + 1) int32, [counts | areas |
// invalid] of each block. kSource: kFromList (the list at table, labels), kFromLabelsWindow (a window along the
// pass's axis over the labels, table[|k|] >= 0 inside the element), kFromRanks (a window over ranks (B, N, C): bit
// c where rank[i + k e, c] <= table[|k|]). Grid: batch * chunks blocks. finalize: see masks_class_weights
// (class_weights (B, C); counters: the ticket and the invalid count).
template <typename mask_t, typename index_t, int kSource>
__global__ void __launch_bounds__(kThreads) dbce_masks_final_kernel(
    // Output
    mask_t* __restrict__ masks, int32_t* __restrict__ partial, float* __restrict__ class_weights,
    int32_t* __restrict__ counters,
    // Input
    const __grid_constant__ Tables tables, const int32_t* __restrict__ table_memory, const void* __restrict__ labels,
    const index_t* __restrict__ ranks,
    // Sizes
    const Volume vol, const MaskPass mp) {
  using bits_t = typename std::make_unsigned<mask_t>::type;
  __shared__ OffsetList list;
  __shared__ unsigned int warp_counts[kWarps][2 * kMaxClasses + 1];  // counts, areas, invalid
  __shared__ bool last;
  const int classes = static_cast<int>(vol.classes);
  const int slots = 2 * classes + 1;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  for (int s = lane; s < slots; s += 32) {
    warp_counts[warp][s] = 0;
  }
  if constexpr (kSource == kFromList) {
    load_list(list, tables, table_memory, mp, vol);
  }
  __syncthreads();

  const int64_t image = static_cast<int64_t>(blockIdx.x) / mp.chunks;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) % mp.chunks;
  const int64_t begin = chunk * mp.chunk_pixels;
  const int64_t end = min(vol.pixels, begin + mp.chunk_pixels);
  const uint64_t all = class_bits(vol.classes);
  const int64_t base = image * vol.l_b;
  // Uniform trip count: every lane takes part in the ballots.
  for (int64_t first = begin; first < end; first += kThreads) {
    const int64_t i = first + threadIdx.x;
    const bool inside = i < end;
    int64_t own_label = vol.ignore_index;
    uint64_t bits = 0;
    if (inside) {
      const int64_t w = i % vol.width;
      const int64_t h = (i / vol.width) % vol.height;
      const int64_t d = i / (vol.width * vol.height);
      const int64_t own = base + d * vol.l_d + h * vol.l_h + w * vol.l_w;
      own_label = load_int(labels, vol.label_type, own);
      if (vol.valid(own_label)) {
        if constexpr (kSource == kFromList) {
          for (int e = 0; e < mp.list_size && bits != all; ++e) {
            const int64_t nd = d + list.d[e], nh = h + list.h[e], nw = w + list.w[e];
            if (nd >= 0 && nd < vol.depth && nh >= 0 && nh < vol.height && nw >= 0 && nw < vol.width) {
              const int64_t label = load_int(labels, vol.label_type, own + list.delta[e]);
              bits |= vol.valid(label) ? uint64_t{1} << label : uint64_t{0};
            }
          }
        } else {
          const int64_t coord = axis_coord(mp, i);
          const int64_t left = min(coord, mp.reach);
          const int64_t right = min(mp.axis_size - 1 - coord, mp.reach);
          const int64_t far = max(left, right);
          if constexpr (kSource == kFromLabelsWindow) {
            const int64_t label_stride =
                mp.axis_stride == 1 ? vol.l_w : mp.axis_stride == vol.width ? vol.l_h : vol.l_d;
            for (int64_t k = 0; k <= far && bits != all; ++k) {
              if (table_at(tables, table_memory, mp.table + k) < 0) {
                break;  // non-increasing: no farther offset is inside
              }
              if (k <= left) {
                const int64_t label = load_int(labels, vol.label_type, own - k * label_stride);
                bits |= vol.valid(label) ? uint64_t{1} << label : uint64_t{0};
              }
              if (k > 0 && k <= right) {
                const int64_t label = load_int(labels, vol.label_type, own + k * label_stride);
                bits |= vol.valid(label) ? uint64_t{1} << label : uint64_t{0};
              }
            }
          } else {
            const index_t* column = ranks + (image * vol.pixels + i) * vol.classes;
            const int64_t step = mp.axis_stride * vol.classes;
            for (int c = 0; c < classes; ++c) {
              for (int64_t k = 0; k <= far; ++k) {
                const int32_t limit = table_at(tables, table_memory, mp.table + k);
                if (limit < 0) {
                  break;  // non-increasing in k
                }
                // (compared as int64: the no-hit value of a uint32 rank is not a small negative number)
                if ((k <= left && static_cast<int64_t>(column[c - k * step]) <= limit) ||
                    (k <= right && static_cast<int64_t>(column[c + k * step]) <= limit)) {
                  bits |= uint64_t{1} << c;
                  break;
                }
              }
            }
          }
        }
      }
      masks[image * vol.pixels + i] = static_cast<mask_t>(static_cast<bits_t>(bits));
    }
    const bool own_valid = inside && vol.valid(own_label);
    for (int c = 0; c < classes; ++c) {
      warp_count(warp_counts[warp], c, own_valid && own_label == c);
      warp_count(warp_counts[warp], classes + c, (bits >> c) & 1);
    }
    warp_count(warp_counts[warp], slots - 1, inside && vol.invalid(own_label));
  }

  // The block's row: the warps' counts in warp order (integers: exact in any order anyway).
  __syncthreads();
  int32_t* row = partial + static_cast<int64_t>(blockIdx.x) * slots;
  for (int s = threadIdx.x; s < slots; s += kThreads) {
    unsigned int total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      total += warp_counts[w][s];
    }
    row[s] = static_cast<int32_t>(total);
  }
  if (!mp.finalize) {
    return;
  }
  // Every thread's row stores are visible device-wide before the ticket; the last block then sees every block's
  // row.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int ticket = atomicAdd(reinterpret_cast<unsigned int*>(counters + kMasksTicket), 1u);
    last = ticket == gridDim.x - 1;
  }
  __syncthreads();
  if (last) {
    __threadfence();
    masks_class_weights(class_weights, counters, partial, vol, mp);
  }
}

// ------------------------------------------------------------------------------------------- 3. cross entropy

// Sizes, strides (in elements) and options of the cross entropy kernels.
struct CeProblem {
  int64_t classes, pixels, chunks, chunk_pixels;
  int64_t x_b, x_c, x_s;  // logits
  int64_t g_b, g_c, g_s;  // grad_logits (backward)
  int64_t m_b, m_s;       // masks (B, S)
  int64_t w_b, w_c;       // class_weights (B, C)
  int64_t s_b;            // grad_sums along the image (backward, column 0), or 0 for the loss's scalar gradient
  int64_t u_b, u_s;       // grad_map (B, S) (backward, with_map)
  int64_t map_b;          // the (B, S) map, unit pixel stride (forward, write_map)
  int mask_type, weight_type, sums_type, map_type, norm_type;
  bool write_map, finalize, mean, with_sum, scaled;
};

// The image's class weights into shared memory (C <= 64 floats).
__device__ __forceinline__ void load_weights(float* shared, const void* class_weights, const CeProblem& pr,
                                             int64_t image) {
  for (int c = threadIdx.x; c < pr.classes; c += kThreads) {
    shared[c] = load_float(class_weights, pr.weight_type, image * pr.w_b + c * pr.w_c);
  }
}

// w_i and the label of pixel i (-1 where it is not valid: out of range or ignore_index; then w = 0). The mask is
// read sign-extended like the reference's masks.long(); w = max over c < C of (bit c ? cw_c : 0), as amax does.
__device__ __forceinline__ float pixel_weight(const CeProblem& pr, const Volume& vol, const void* labels,
                                              const void* masks, const float* weights, int64_t image, int64_t i,
                                              int64_t& label) {
  const int64_t raw = vol.label_at(labels, image, i);
  const bool valid = vol.valid(raw);
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

// partial: (B, chunks, 2) float32, [sum w CE, sum w] of each block. map (write_map): (B, S) float32, w CE (plus
// the poison of counters[kInvalid] with finalize). logits: (B, C, S) with strides x_*; labels through ``vol``;
// masks (B, S), class_weights (B, C). Grid: B * chunks blocks. finalize without write_map: the last block (ticket
// counters[kCeTicket]) adds the rows in a fixed order and writes loss (the mean sum w CE / max(sum w, FLT_MIN), or
// the sum; NaN when counters[kInvalid] != 0) and norm = d loss / d sum w CE (1 / max(sum w, FLT_MIN), or 1). finalize
// with write_map: block 0 writes norm = 1 (unused by the backward).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) dbce_ce_fwd_kernel(
    // Output
    float* __restrict__ partial, float* __restrict__ map, float* __restrict__ loss, float* __restrict__ norm,
    int32_t* __restrict__ counters,
    // Input
    const scalar_t* __restrict__ logits, const void* __restrict__ labels, const void* __restrict__ masks,
    const void* __restrict__ class_weights,
    // Sizes, strides and options
    const Volume vol, const CeProblem pr) {
  __shared__ float weights[kMaxClasses];
  __shared__ float warp_sums[kWarps][2];
  __shared__ bool last;
  const int64_t image = static_cast<int64_t>(blockIdx.x) / pr.chunks;
  const int64_t begin = (static_cast<int64_t>(blockIdx.x) % pr.chunks) * pr.chunk_pixels;
  const int64_t end = min(pr.pixels, begin + pr.chunk_pixels);
  load_weights(weights, class_weights, pr, image);
  __syncthreads();
  // A label outside [0, C) (unchecked CUDA labels) makes the loss NaN, as the reference's poison; the masks pass
  // counted them (stream order: its last block has written the count).
  const float poison = pr.finalize && counters[kInvalid] != 0 ? __int_as_float(0x7fc00000) : 0.0f;

  float sum_wce = 0.0f;
  float sum_w = 0.0f;
  const scalar_t* x_image = logits + image * pr.x_b;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    int64_t label;
    const float w = pixel_weight(pr, vol, labels, masks, weights, image, i, label);
    float value = 0.0f;
    if (label >= 0) {
      // Online logsumexp: one read of each logit; CE = lse - x[label] from the label's logit alone, so a -inf
      // logit of another class (a masked class) never enters as 0 * -inf.
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
      value = w != 0.0f ? w * (max + logf(sum) - picked) : 0.0f;
      sum_wce += value;
      sum_w += w;
    }
    if (pr.write_map) {
      map[image * pr.map_b + i] = value + poison;
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
  if (!pr.finalize) {
    return;
  }
  if (pr.write_map) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      norm[0] = 1.0f;
    }
    return;
  }
  // The last block reduces the rows: the pattern of the masks' class weights (fence, ticket, L2 reads in a fixed
  // order).
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int ticket = atomicAdd(reinterpret_cast<unsigned int*>(counters + kCeTicket), 1u);
    last = ticket == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) {
    return;
  }
  __threadfence();
  if (warp < 2) {  // warp 0: sum w CE, warp 1: sum w; the lanes take every 32nd row, then a shuffle tree
    float total = 0.0f;
    const int64_t rows = static_cast<int64_t>(gridDim.x);
    for (int64_t r = lane; r < rows; r += 32) {
      total += __ldcg(partial + r * 2 + warp);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      total += __shfl_down_sync(0xffffffffu, total, offset);
    }
    if (lane == 0) {
      warp_sums[warp][0] = total;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const float total = warp_sums[0][0];
    if (pr.mean) {
      // reference.dbce.reduce_weighted: sum w CE / sum w, the normalizer clamped to the smallest normal float.
      const float normalizer = fmaxf(warp_sums[1][0], 1.17549435e-38f);
      loss[0] = total / normalizer + poison;
      norm[0] = 1.0f / normalizer;
    } else {
      loss[0] = total + poison;
      norm[0] = 1.0f;
    }
  }
}

// grad: (B, C, S) with strides g_*, every element written once. with_sum: the upstream of sum w CE is
// grad_sums[image * s_b] (the dbce_ce op's (B, 2), column 0), or with ``scaled`` the loss's scalar gradient
// grad_sums[0] times norm[0] (any float dtype). write_map: plus grad_map[image * u_b + i * u_s]. Grid: B * chunks blocks. kCache > 0:
// C <= kCache, a pixel's logits stay in registers; kCache == 0: they are read twice from memory (L1 hits).
template <typename scalar_t, int kCache>
__global__ void __launch_bounds__(kThreads) dbce_ce_bwd_kernel(
    // Output
    scalar_t* __restrict__ grad,
    // Input
    const void* __restrict__ grad_sums, const void* __restrict__ grad_map, const void* __restrict__ norm,
    const scalar_t* __restrict__ logits, const void* __restrict__ labels, const void* __restrict__ masks,
    const void* __restrict__ class_weights,
    // Sizes, strides and options
    const Volume vol, const CeProblem pr) {
  constexpr bool kCached = kCache > 0;
  constexpr int kSlots = kCached ? kCache : 1;
  __shared__ float weights[kMaxClasses];
  const int64_t image = static_cast<int64_t>(blockIdx.x) / pr.chunks;
  const int64_t begin = (static_cast<int64_t>(blockIdx.x) % pr.chunks) * pr.chunk_pixels;
  const int64_t end = min(pr.pixels, begin + pr.chunk_pixels);
  load_weights(weights, class_weights, pr, image);
  __syncthreads();
  float grad_sum = 0.0f;
  if (pr.with_sum) {
    grad_sum = load_float(grad_sums, pr.sums_type, image * pr.s_b);
    if (pr.scaled) {
      grad_sum *= load_float(norm, pr.norm_type, 0);
    }
  }
  const scalar_t* x_image = logits + image * pr.x_b;
  scalar_t* g_image = grad + image * pr.g_b;

  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    int64_t label;
    const float w = pixel_weight(pr, vol, labels, masks, weights, image, i, label);
    // d loss / d CE_i, as the reference's autograd forms it: (g_sum + g_map) w.
    const float upstream =
        pr.write_map ? grad_sum + load_float(grad_map, pr.map_type, image * pr.u_b + i * pr.u_s) : grad_sum;
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

}  // namespace
}  // namespace dbce_cuda
}  // namespace torch_medloss
