// The DBCE cross entropy's per-task code (one (image, chunk) of the forward or the backward; dbce_kernel.cpp's header
// comment describes it), written once as always-inline code. Each dbce_isa_<isa>.cpp defines MEDLOSS_TILE_TARGET
// (the target attribute of its entry points, empty for the baseline), includes this file once, and exports the table
// make_ce_kernels() fills. Everything here is in an anonymous namespace: each instruction set's copy stays in its
// own file.
#pragma once

#ifndef MEDLOSS_TILE_TARGET
#error "define MEDLOSS_TILE_TARGET (the entry points' target attribute) before including dbce_ce_tasks_impl.h"
#endif

#include "dbce_ce_tasks.h"
#include "vec_math.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace torch_medloss {
namespace dbce_cpu {
namespace {

// Copies pixels [first, first + n) of one image of a (B, C, S) tensor into the class-major tile (as acc_t), walking
// memory along the smaller stride.
template <typename scalar_t, typename acc_t>
MEDLOSS_INLINE void gather(const scalar_t* image, int64_t stride_c, int64_t stride_s, int64_t classes, int64_t first,
                           int64_t n, acc_t* dst) {
  const scalar_t* start = image + first * stride_s;
  if (stride_c < stride_s) {
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t* pixel = start + j * stride_s;
      for (int64_t c = 0; c < classes; ++c) {
        dst[c * kTilePixels + j] = static_cast<acc_t>(pixel[c * stride_c]);
      }
    }
    return;
  }
  for (int64_t c = 0; c < classes; ++c) {
    const scalar_t* src = start + c * stride_c;
    acc_t* out = dst + c * kTilePixels;
    if (stride_s == 1) {
      MEDLOSS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        out[j] = static_cast<acc_t>(src[j]);
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        out[j] = static_cast<acc_t>(src[j * stride_s]);
      }
    }
  }
}

// The inverse of gather: writes the tile to pixels [first, first + n), as scalar_t.
template <typename scalar_t, typename acc_t>
MEDLOSS_INLINE void scatter(const acc_t* src, int64_t stride_c, int64_t stride_s, int64_t classes, int64_t first,
                            int64_t n, scalar_t* image) {
  scalar_t* start = image + first * stride_s;
  if (stride_c < stride_s) {
    for (int64_t j = 0; j < n; ++j) {
      scalar_t* pixel = start + j * stride_s;
      for (int64_t c = 0; c < classes; ++c) {
        pixel[c * stride_c] = static_cast<scalar_t>(src[c * kTilePixels + j]);
      }
    }
    return;
  }
  for (int64_t c = 0; c < classes; ++c) {
    const acc_t* in = src + c * kTilePixels;
    scalar_t* dst = start + c * stride_c;
    if (stride_s == 1) {
      MEDLOSS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        dst[j] = static_cast<scalar_t>(in[j]);
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        dst[j * stride_s] = static_cast<scalar_t>(in[j]);
      }
    }
  }
}

// Loads the tile's labels, masks and logits, and computes w, the softmax max and sum (p = exp(x - max) kept in x
// when keep_exp) and the logit at the label.
template <typename scalar_t, typename acc_t>
MEDLOSS_INLINE void load_tile(const CeInputs<scalar_t, acc_t>& in, int64_t b, int64_t first, int64_t n,
                              CeScratch<acc_t>& s, bool keep_exp) {
  const int64_t C = in.classes;
  in.load.labels(static_cast<const char*>(in.labels) + b * in.labels_b * in.label_size, in.labels_s, first, n, C,
                 in.ignore_index, s.label.data());
  in.load.masks(static_cast<const char*>(in.masks) + b * in.masks_b * in.mask_size, in.masks_s, first, n,
                s.mask.data());
  gather(in.x + b * in.x_b, in.x_c, in.x_s, C, first, n, s.x.data());
  const acc_t* cw = in.weights + b * C;
  const int64_t* mask = s.mask.data();
  const int32_t* label = s.label.data();
  acc_t* w = s.w.data();
  acc_t* max = s.max.data();
  acc_t* sum = s.sum.data();
  acc_t* picked = s.picked.data();
  // w = max_c of (bit c ? cw_c : 0), the reference's amax of bits * weights; 0 where the label is not valid.
  MEDLOSS_SIMD
  for (int64_t j = 0; j < n; ++j) {
    w[j] = (mask[j] & 1) ? cw[0] : acc_t(0);
  }
  for (int64_t c = 1; c < C; ++c) {
    const acc_t weight = cw[c];
    MEDLOSS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      const acc_t v = ((mask[j] >> c) & 1) ? weight : acc_t(0);
      w[j] = v > w[j] ? v : w[j];
    }
  }
  const acc_t* x = s.x.data();
  MEDLOSS_SIMD
  for (int64_t j = 0; j < n; ++j) {
    w[j] = label[j] >= 0 ? w[j] : acc_t(0);
    max[j] = x[j];
    picked[j] = label[j] == 0 ? x[j] : acc_t(0);
  }
  for (int64_t c = 1; c < C; ++c) {
    const acc_t* xc = x + c * kTilePixels;
    const int32_t cls = static_cast<int32_t>(c);
    MEDLOSS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      max[j] = xc[j] > max[j] ? xc[j] : max[j];
      picked[j] = label[j] == cls ? xc[j] : picked[j];
    }
  }
  std::fill(sum, sum + n, acc_t(0));
  for (int64_t c = 0; c < C; ++c) {
    acc_t* xc = s.x.data() + c * kTilePixels;
    if (keep_exp) {
      MEDLOSS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        const acc_t e = exp_acc</*kNonPositive=*/true>(xc[j] - max[j]);
        sum[j] += e;
        xc[j] = e;
      }
    } else {
      MEDLOSS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        sum[j] += exp_acc</*kNonPositive=*/true>(xc[j] - max[j]);
      }
    }
  }
}

// One forward task: pixels [begin, end) of image b; returns (sum w CE, sum w) through out[0..1] from per-lane sums.
template <typename scalar_t, typename acc_t>
MEDLOSS_INLINE void forward_task_body(const CeInputs<scalar_t, acc_t>& in, int64_t b, int64_t begin, int64_t end,
                                      CeScratch<acc_t>& s, acc_t* map_out, acc_t* out) {
  const int64_t pixels = in.pixels;
  acc_t* lane_ce = s.lanes.data();
  acc_t* lane_w = s.lanes.data() + kTilePixels;
  std::fill(s.lanes.begin(), s.lanes.end(), acc_t(0));
  for (int64_t first = begin; first < end; first += kTilePixels) {
    const int64_t n = std::min(kTilePixels, end - first);
    load_tile(in, b, first, n, s, false);
    const acc_t* w = s.w.data();
    const acc_t* max = s.max.data();
    const acc_t* picked = s.picked.data();
    const int32_t* label = s.label.data();
    acc_t* sum = s.sum.data();
    acc_t* wce = s.wce.data();
    MEDLOSS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      sum[j] = log_acc(sum[j]);
    }
    MEDLOSS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      const acc_t ce = (max[j] + sum[j]) - picked[j];  // logsumexp - x[label]
      wce[j] = label[j] >= 0 ? w[j] * ce : acc_t(0);
      lane_ce[j] += wce[j];
      lane_w[j] += w[j];
    }
    if (map_out != nullptr) {
      std::copy(wce, wce + n, map_out + b * pixels + first);
    }
  }
  acc_t total_ce = 0, total_w = 0;
  for (int64_t j = 0; j < kTilePixels; ++j) {
    total_ce += lane_ce[j];
    total_w += lane_w[j];
  }
  out[0] = total_ce;
  out[1] = total_w;
}

// One backward task: the gradient of pixels [begin, end) of image b.
template <typename scalar_t, typename acc_t>
MEDLOSS_INLINE void backward_task_body(const CeInputs<scalar_t, acc_t>& in, int64_t b, int64_t begin, int64_t end,
                                       CeScratch<acc_t>& s, acc_t up, const acc_t* grad_map, scalar_t* dx,
                                       int64_t g_c, int64_t g_s) {
  const int64_t C = in.classes;
  const int64_t pixels = in.pixels;
  for (int64_t first = begin; first < end; first += kTilePixels) {
    const int64_t n = std::min(kTilePixels, end - first);
    load_tile(in, b, first, n, s, true);
    const acc_t* w = s.w.data();
    const int32_t* label = s.label.data();
    acc_t* g = s.wce.data();  // the per-pixel factor w (grad_sums[b, 0] + grad_map[b, i]) / sum
    const acc_t* sum = s.sum.data();
    acc_t* scale = s.picked.data();  // w (grad_sums[b, 0] + grad_map[b, i])
    if (grad_map != nullptr) {
      const acc_t* gm = grad_map + b * pixels + first;
      MEDLOSS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        scale[j] = w[j] * (up + gm[j]);
      }
    } else {
      MEDLOSS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        scale[j] = w[j] * up;
      }
    }
    MEDLOSS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      g[j] = scale[j] / sum[j];
    }
    for (int64_t c = 0; c < C; ++c) {
      acc_t* xc = s.x.data() + c * kTilePixels;  // exp(x - max), becomes the gradient
      const int32_t cls = static_cast<int32_t>(c);
      MEDLOSS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        const acc_t v = g[j] * xc[j] - (label[j] == cls ? scale[j] : acc_t(0));
        xc[j] = w[j] != acc_t(0) ? v : acc_t(0);
      }
    }
    scatter(s.x.data(), g_c, g_s, C, first, n, dx);
  }
}

// ------------------------------------------------------------------------------------------------- entry points

template <typename scalar_t, typename acc_t>
MEDLOSS_TILE_TARGET void forward_task(const CeInputs<scalar_t, acc_t>& in, int64_t b, int64_t begin, int64_t end,
                                      CeScratch<acc_t>& s, acc_t* map_out, acc_t* out) {
  forward_task_body(in, b, begin, end, s, map_out, out);
}

template <typename scalar_t, typename acc_t>
MEDLOSS_TILE_TARGET void backward_task(const CeInputs<scalar_t, acc_t>& in, int64_t b, int64_t begin, int64_t end,
                                       CeScratch<acc_t>& s, acc_t up, const acc_t* grad_map, scalar_t* dx,
                                       int64_t g_c, int64_t g_s) {
  backward_task_body(in, b, begin, end, s, up, grad_map, dx, g_c, g_s);
}

template <typename acc_t>
CeKernels<acc_t> make_ce_kernels() {
  CeKernels<acc_t> k{};
  if constexpr (std::is_same_v<acc_t, double>) {
    k.forward = {&forward_task<double, double>};
    k.backward = {&backward_task<double, double>};
  } else {
    k.forward = {&forward_task<float, float>, &forward_task<c10::Half, float>, &forward_task<c10::BFloat16, float>};
    k.backward = {&backward_task<float, float>, &backward_task<c10::Half, float>,
                  &backward_task<c10::BFloat16, float>};
  }
  return k;
}

}  // namespace
}  // namespace dbce_cpu
}  // namespace torch_medloss
