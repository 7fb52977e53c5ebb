// CPU kernels of torch_medloss::dbce_masks, dbce_ce_fwd and dbce_ce_bwd, and of the loss op dbce_loss_fwd / _bwd
// (schema and contract in csrc/dbce.cpp; the ground truth is torch_medloss/reference/dbce_ops.py).
//
// dbce_loss_fwd composes the pieces below without leaving C++: the masks pass (with each image's counts, areas and
// bad labels), the class weights of each unit on the host (O(B C), in double, rounded once, as the reference's
// class_weights_from_sums with float64), the cross-entropy pass, and the reduction from the per-image sums added in
// image order. Its backward is the cross entropy's, with the upstream per pixel ("none") or per image.
//
// dbce_masks: each element (ball or cube, any spacing) is a down-set: offset o is in it iff |o_W| <= T[|o_D|][|o_H|]
// (make_params; for the ball T[a][b] is the largest c with ((a s_D)^2 + (b s_H)^2) + (c s_W)^2 <= R^2 (1 + 1e-9), the
// reference's test summed in its order with x * x squares, so the boundary is bitwise the reference's). The labels
// become one word per pixel with bit c set at the members of class c (uint8 for C <= 8 ... uint64), all classes
// at once. Slice d of the dilation is then, with X_a = OR of the words of slices d - a .. d + a (nested in a) and
// Z_b = OR over a of X_a dilated along W by T[a][b], the OR over o of Z_|o| shifted by o rows, and-ed with the valid
// pixels. Everything is an OR of shifted slices (slices carry zero margins, so a shift is one flat loop): about
// 2 r_D + sum_a T[a][0] + (#Z planes) + 2 r_H slice passes of 16 lanes for C <= 8, whatever the class layout; pairs
// (a, b) that a wider a covers are skipped, and the cube needs one a and one Z plane. Radius 10 costs about 3.5x
// radius 3. Counts |M_c|, invalid labels and areas |D_c| are integer sums per slice added in slice order; tasks are
// slices (both passes at::parallel_for over (image, slice)), so the masks do not depend on the thread count.
//
// dbce_ce_fwd / dbce_ce_bwd: one at::parallel_for task per (image, chunk of kChunkPixels pixels), as in
// dice_sums_kernel.cpp. Inside a task the logits go through class-major tiles of kTilePixels pixels (C <= 64, so a
// tile is at most 4096 elements), gathered along the smaller stride (pixels for NCHW, classes for channels_last).
// The forward writes one partial row (sum w CE, sum w) per task from per-lane sums; the rows of an image are added
// in chunk order, so the sums are bitwise the same for any thread count. exp and log of float32 (and of
// bfloat16/float16, which accumulate in float32) are exp_f32 / log_f32 of vec_math.h (branch-free, within 1 ulp;
// the softmax's exp(x - max) flushes results below 2^-125 to 0), float64 keeps std::exp / std::log. The per-task
// code (dbce_ce_tasks_impl.h) is always-inline and compiled into a baseline, an AVX2 and an AVX-512 entry point, each
// in its own file (dbce_isa_<isa>.cpp, built in parallel; isa.h), picked at run time by cpu_isa() (as in
// dice_sums_kernel.cpp); the AVX2/AVX-512 versions may fuse multiply-adds, so their results can differ from the
// baseline's in the last bits, but each is the same run to run and for any number of threads. The masks and
// everything else in this file are baseline code.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../contract.h"
#include "cpu_isa.h"
#include "dbce_ce_tasks.h"
#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace torch_medloss {
namespace {

using namespace dbce_cpu;  // the cross entropy tasks' interface (dbce_ce_tasks.h)

using contract::ELEMENT_BALL;
using contract::ELEMENT_CUBE;
using contract::MAX_MASK_CLASSES;  // one bit per class in an int64 mask
// The reference's relative tolerance on the element's boundary (torch_medloss/reference/dbce.py).
constexpr double kBoundaryTolerance = 1e-9;
// Masks: at least this many pixels of slices per task (a constant; the results are exact integers anyway).
constexpr int64_t kSliceTaskPixels = 16384;
// Cross entropy: pixels per task (a constant, never derived from the thread count); a chunk holds whole tiles.
constexpr int64_t kChunkPixels = 8192;
static_assert(kChunkPixels % kTilePixels == 0, "a chunk must hold whole tiles");

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

bool is_label_dtype(at::ScalarType dtype) {
  return dtype == at::kByte || dtype == at::kChar || dtype == at::kShort || dtype == at::kInt || dtype == at::kLong;
}

bool is_float_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

at::ScalarType mask_dtype(int64_t classes) {
  return classes <= 8 ? at::kByte : classes <= 16 ? at::kShort : classes <= 32 ? at::kInt : at::kLong;
}

// ============================================================================================================ masks

// The element as a down-set: offset (o_D, o_H, o_W) is in it iff |o_W| <= reach_w[|o_D|][|o_H|] (-1: no o_W fits).
// For the ball the entry is the largest c with ((a s_D)^2 + (b s_H)^2) + (c s_W)^2 <= R^2 (1 + 1e-9), summed in the
// reference's order with x * x squares; each term grows with its index, so the set of c that pass is a prefix. For
// the cube it is r_W for every a <= r_D, b <= r_H.
struct MaskParams {
  int64_t classes;
  int64_t ignore_index;
  int64_t dims[3];   // D, H, W
  int64_t reach[3];  // half-width of the element along D, H, W (within the image)
  std::vector<int64_t> reach_w;  // (reach[0] + 1) x (reach[1] + 1), row-major in a
  int64_t w_of(int64_t a, int64_t b) const {
    return reach_w[a * (reach[1] + 1) + b];
  }
};

MaskParams make_params(const at::Tensor& labels, int64_t classes, int64_t ignore_index, int64_t element,
                       double radius, const std::vector<double>& spacing) {
  MaskParams p;
  p.classes = classes;
  p.ignore_index = ignore_index;
  const double widened = radius * (1 + kBoundaryTolerance);
  const double limit = radius * radius * (1 + kBoundaryTolerance);
  std::vector<double> square[3];
  for (int k = 0; k < 3; ++k) {
    const int64_t dim = labels.size(k + 1);
    p.dims[k] = dim;
    // The reference's extent floor(R / s (1 + 1e-9)), clamped to the image before the conversion to an integer.
    const double extent = std::floor(radius / spacing[k] * (1 + kBoundaryTolerance));
    int64_t reach = static_cast<int64_t>(std::min(extent, static_cast<double>(std::max<int64_t>(dim - 1, 0))));
    if (element == ELEMENT_CUBE) {
      // The reference also tests |o s| <= R (1 + 1e-9) itself; keep the offsets that pass it.
      while (reach > 0 && !(static_cast<double>(reach) * spacing[k] <= widened)) {
        --reach;
      }
    } else {
      square[k].resize(reach + 1);
      for (int64_t o = 0; o <= reach; ++o) {
        const double length = static_cast<double>(o) * spacing[k];
        square[k][o] = length * length;
      }
    }
    p.reach[k] = reach;
  }
  p.reach_w.assign((p.reach[0] + 1) * (p.reach[1] + 1), p.reach[2]);
  if (element == ELEMENT_BALL) {
    for (int64_t a = 0; a <= p.reach[0]; ++a) {
      for (int64_t b = 0; b <= p.reach[1]; ++b) {
        const double partial = square[0][a] + square[1][b];
        int64_t c = p.reach[2];
        while (c >= 0 && !(partial + square[2][c] <= limit)) {
          --c;
        }
        p.reach_w[a * (p.reach[1] + 1) + b] = c;
      }
    }
  }
  return p;
}

// How one slice is dilated, from MaskParams. With X_a the members dilated by |o_D| <= a (nested in a), the slice's
// dilation is OR over o_H of Z_|o_H| shifted by o_H rows, where Z_b = OR over a of X_a dilated along W by
// reach_w[a][b]. A pair (a, b) is skipped when reach_w[a + 1][b] is as wide (X_a is inside X_(a+1)), and rows b with
// the same pairs share one Z plane (for the cube every b shares one).
struct SlicePlan {
  struct Use {
    int64_t a, width, plane;  // Z plane `plane` |= X_a dilated along W by `width`
  };
  std::vector<Use> uses;         // by a, then width
  std::vector<int64_t> plane_of;  // b -> Z plane, -1 when Z_b is empty
  int64_t planes = 0;
  int64_t last_a = -1;           // the largest a used
};

SlicePlan make_plan(const MaskParams& p) {
  SlicePlan plan;
  const int64_t rd = p.reach[0], rh = p.reach[1];
  std::vector<std::vector<std::pair<int64_t, int64_t>>> pairs(rh + 1);  // b -> (a, width)
  for (int64_t b = 0; b <= rh; ++b) {
    for (int64_t a = 0; a <= rd; ++a) {
      const int64_t width = p.w_of(a, b);
      if (width >= 0 && (a == rd || p.w_of(a + 1, b) < width)) {
        pairs[b].emplace_back(a, width);
      }
    }
  }
  plan.plane_of.assign(rh + 1, -1);
  for (int64_t b = 0; b <= rh; ++b) {
    if (pairs[b].empty()) {
      continue;
    }
    if (b > 0 && pairs[b] == pairs[b - 1]) {
      plan.plane_of[b] = plan.plane_of[b - 1];
      continue;
    }
    plan.plane_of[b] = plan.planes++;
    for (const auto& pair : pairs[b]) {
      plan.uses.push_back({pair.first, pair.second, plan.plane_of[b]});
      plan.last_a = std::max(plan.last_a, pair.first);
    }
  }
  std::sort(plan.uses.begin(), plan.uses.end(), [](const SlicePlan::Use& x, const SlicePlan::Use& y) {
    return x.a != y.a ? x.a < y.a : x.width < y.width;
  });
  return plan;
}

// Slices are stored with zero margins: reach[1] rows above and below, reach[2] columns left and right, so every shift
// along H or W is one flat loop over the slice (a column never leaves its row: the margins are at least as wide as
// the shift). Only the interior rows are written; the margin rows stay zero.
struct SliceGeometry {
  int64_t H, W, mh, mw, row, size, first, last;  // row: padded row length; [first, last): the interior rows
  explicit SliceGeometry(const MaskParams& p)
      : H(p.dims[1]), W(p.dims[2]), mh(p.reach[1]), mw(p.reach[2]), row(W + 2 * mw), size((H + 2 * mh) * row),
        first(mh * row), last((mh + H) * row) {}
  int64_t at(int64_t h, int64_t w) const {
    return (h + mh) * row + w + mw;
  }
};

// Adds, for each class c < C, the number of elements of row[0, n) with bit c set to count[c].
template <typename bits_t>
void count_bits(const bits_t* row, int64_t n, int64_t C, int64_t* count) {
  if (C <= 16) {
    for (int64_t c = 0; c < C; ++c) {
      uint32_t total = 0;  // n <= H * W < 2**31
      MEDLOSS_SIMD
      for (int64_t i = 0; i < n; ++i) {
        total += static_cast<uint32_t>((row[i] >> c) & 1u);
      }
      count[c] += total;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      for (uint64_t bits = row[i]; bits != 0; bits &= bits - 1) {
        ++count[__builtin_ctzll(bits)];
      }
    }
  }
}

// out[i] |= in[i] for i in [first, last); in is a shifted view of another slice (its reads stay inside the padding).
template <typename bits_t>
void or_shifted(bits_t* __restrict__ out, const bits_t* __restrict__ in, int64_t first, int64_t last) {
  MEDLOSS_SIMD
  for (int64_t i = first; i < last; ++i) {
    out[i] |= in[i];
  }
}

// out[i] |= in0[i] | in1[i] for i in [first, last), both views of other slices.
template <typename bits_t>
void or_shifted2(bits_t* __restrict__ out, const bits_t* __restrict__ in0, const bits_t* __restrict__ in1,
                 int64_t first, int64_t last) {
  MEDLOSS_SIMD
  for (int64_t i = first; i < last; ++i) {
    out[i] |= in0[i] | in1[i];
  }
}

// Slice (b, d) of the labels into bits (1 << label at the valid pixels, 0 elsewhere), with its counts |M_c| and
// invalid labels added to count[0, C) and count[C].
template <typename label_t, typename bits_t>
void load_slice(const MaskParams& p, const SliceGeometry& g, const label_t* slice, const int64_t* strides,
                bits_t* bits, int64_t* count) {
  const int64_t C = p.classes;
  const int64_t sh = strides[1], sw = strides[2];
  int64_t invalid = 0;
  for (int64_t h = 0; h < g.H; ++h) {
    const label_t* src = slice + h * sh;
    bits_t* dst = bits + g.at(h, 0);
    for (int64_t w = 0; w < g.W; ++w) {
      const int64_t label = static_cast<int64_t>(src[w * sw]);
      // One unsigned comparison rejects both label < 0 and label >= C.
      const bool in_range = static_cast<uint64_t>(label) < static_cast<uint64_t>(C);
      const bool ignored = label == p.ignore_index;
      dst[w] = in_range && !ignored ? static_cast<bits_t>(bits_t{1} << (static_cast<uint32_t>(label) & 63u))
                                    : bits_t{0};
      invalid += !in_range && !ignored ? 1 : 0;
    }
    count_bits(dst, g.W, C, count);
  }
  count[C] += invalid;
}

// Slice d of one image's bits (the padded volume `bits`) dilated into out (the mask dtype), with |D_c| added to
// area[c]. x, wide, out_bits and z (plan.planes slices) are scratch of g.size elements whose margin rows are zero.
template <typename bits_t, typename mask_t>
void dilate_slice(const MaskParams& p, const SlicePlan& plan, const SliceGeometry& g, const bits_t* bits, int64_t d,
                  bits_t* x, bits_t* wide, bits_t* z, bits_t* acc, mask_t* out, int64_t* area) {
  const int64_t D = p.dims[0];
  const int64_t first = g.first, last = g.last;
  const bits_t* own = bits + d * g.size;
  const bits_t* result = own;
  if (plan.last_a >= 0 && (p.reach[0] > 0 || p.reach[1] > 0 || p.reach[2] > 0)) {
    for (int64_t k = 0; k < plan.planes; ++k) {
      std::fill(z + k * g.size + first, z + k * g.size + last, bits_t{0});
    }
    std::copy(own + first, own + last, x + first);
    int64_t a = 0;  // x holds X_a
    size_t u = 0;
    while (u < plan.uses.size()) {
      const int64_t want = plan.uses[u].a;
      for (; a < want;) {
        ++a;
        if (d - a >= 0 && d + a < D) {
          or_shifted2(x, bits + (d - a) * g.size, bits + (d + a) * g.size, first, last);
        } else if (d - a >= 0) {
          or_shifted(x, bits + (d - a) * g.size, first, last);
        } else if (d + a < D) {
          or_shifted(x, bits + (d + a) * g.size, first, last);
        }
      }
      // Along W: wide = X_a dilated by t, t growing through this a's widths.
      std::copy(x + first, x + last, wide + first);
      int64_t t = 0;
      for (; u < plan.uses.size() && plan.uses[u].a == a; ++u) {
        for (; t < plan.uses[u].width;) {
          ++t;
          or_shifted2(wide, x - t, x + t, first, last);
        }
        or_shifted(z + plan.uses[u].plane * g.size, wide, first, last);
      }
    }
    // Along H: acc = OR over o of Z_|o| shifted by o rows.
    std::copy(z + plan.plane_of[0] * g.size + first, z + plan.plane_of[0] * g.size + last, acc + first);
    for (int64_t o = 1; o <= p.reach[1]; ++o) {
      if (plan.plane_of[o] < 0) {
        break;  // Z_b is nested: empty from here on
      }
      const bits_t* zo = z + plan.plane_of[o] * g.size;
      or_shifted2(acc, zo - o * g.row, zo + o * g.row, first, last);
    }
    result = acc;
  } else if (plan.last_a < 0) {
    std::fill(acc + first, acc + last, bits_t{0});
    result = acc;
  }
  for (int64_t h = 0; h < g.H; ++h) {
    const bits_t* in = result + g.at(h, 0);
    const bits_t* valid = own + g.at(h, 0);
    bits_t* masked = wide + g.at(h, 0);  // wide is free again
    mask_t* dst = out + h * g.W;
    MEDLOSS_SIMD
    for (int64_t w = 0; w < g.W; ++w) {
      const bits_t m = valid[w] != 0 ? in[w] : bits_t{0};
      masked[w] = m;
      dst[w] = static_cast<mask_t>(m);
    }
    count_bits(masked, g.W, p.classes, area);
  }
}

template <typename label_t, typename mask_t>
void masks_impl(const MaskParams& p, const at::Tensor& labels, at::Tensor& masks, int64_t* counts_out,
                int64_t* areas_out, int64_t* invalid_out) {
  using bits_t = std::make_unsigned_t<mask_t>;
  const int64_t batch = labels.size(0), D = p.dims[0], C = p.classes;
  const int64_t slice_pixels = p.dims[1] * p.dims[2];
  const SliceGeometry g(p);
  const SlicePlan plan = make_plan(p);
  const label_t* data = labels.const_data_ptr<label_t>();
  const int64_t strides[3] = {labels.stride(1), labels.stride(2), labels.stride(3)};
  const int64_t stride_b = labels.stride(0);
  mask_t* out = masks.mutable_data_ptr<mask_t>();
  const int64_t slices = batch * D;
  // Padded slices of every image (zero margins), and per-slice integer partials (added in slice order).
  std::vector<bits_t> bits(slices * g.size, bits_t{0});
  std::vector<int64_t> partial(slices * (C + 1), 0);  // counts, then invalid
  std::vector<int64_t> area(slices * C, 0);
  const int64_t grain = std::max<int64_t>(1, kSliceTaskPixels / std::max<int64_t>(slice_pixels, 1));
  at::parallel_for(0, slices, grain, [&](int64_t first, int64_t last) {
    for (int64_t s = first; s < last; ++s) {
      const int64_t b = s / D, d = s % D;
      load_slice(p, g, data + b * stride_b + d * strides[0], strides, bits.data() + s * g.size,
                 partial.data() + s * (C + 1));
    }
  });
  at::parallel_for(0, slices, grain, [&](int64_t first, int64_t last) {
    // Scratch: X_a, its W dilation, the result, and the Z planes (margins zero, never written).
    std::vector<bits_t> scratch((3 + plan.planes) * g.size, bits_t{0});
    bits_t* x = scratch.data();
    bits_t* wide = x + g.size;
    bits_t* acc = wide + g.size;
    bits_t* z = acc + g.size;
    for (int64_t s = first; s < last; ++s) {
      const int64_t b = s / D, d = s % D;
      dilate_slice(p, plan, g, bits.data() + b * D * g.size, d, x, wide, z, acc, out + s * slice_pixels,
                   area.data() + s * C);
    }
  });
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t d = 0; d < D; ++d) {
      const int64_t s = b * D + d;
      for (int64_t c = 0; c < C; ++c) {
        counts_out[b * C + c] += partial[s * (C + 1) + c];
        areas_out[b * C + c] += area[s * C + c];
      }
      invalid_out[b] += partial[s * (C + 1) + C];
    }
  }
}

// Calls body(mask_t{}) for the mask dtypes mask_dtype() gives: AT_DISPATCH_INTEGRAL_TYPES would also compile an
// int8 copy of masks_impl that no call reaches.
template <typename Body>
void dispatch_mask_type(at::ScalarType dtype, const Body& body) {
  switch (dtype) {
    case at::kByte:
      return body(uint8_t{});
    case at::kShort:
      return body(int16_t{});
    case at::kInt:
      return body(int32_t{});
    default:
      TORCH_INTERNAL_ASSERT(dtype == at::kLong, "dbce_masks: unexpected mask dtype ", dtype);
      return body(int64_t{});
  }
}

// The masks' arguments (dbce_masks, and the dbce_loss ops through their codes and scalars).
void check_masks_inputs(const char* op, const at::Tensor& labels, int64_t num_classes, int64_t element,
                        double radius, at::ArrayRef<double> spacing) {
  TORCH_CHECK(labels.dim() == 4, op, ": labels must be 4-D (B, D, H, W), got shape ", labels.sizes());
  TORCH_CHECK(is_label_dtype(labels.scalar_type()), op, ": labels must be uint8, int8, int16, int32 or int64, got ",
              labels.scalar_type());
  TORCH_CHECK(num_classes >= 1 && num_classes <= MAX_MASK_CLASSES, op, ": num_classes must be in [1, ",
              MAX_MASK_CLASSES, "] (one bit per class in the mask), got ", num_classes);
  TORCH_CHECK(element == ELEMENT_BALL || element == ELEMENT_CUBE, op,
              ": element must be 0 (ball) or 1 (cube), got ", element);
  TORCH_CHECK(std::isfinite(radius) && radius >= 0, op, ": radius must be finite and >= 0, got ", radius);
  TORCH_CHECK(spacing.size() == 3, op, ": spacing must hold 3 voxel sizes (D, H, W), got ", spacing.size(),
              " values");
  for (double s : spacing) {
    TORCH_CHECK(std::isfinite(s) && s > 0, op, ": spacing must be finite and > 0, got ", spacing);
  }
  TORCH_CHECK(labels.size(2) * labels.size(3) <= INT32_MAX, op,
              ": labels must have at most 2**31 - 1 pixels per slice (H * W), got shape ", labels.sizes());
}

// Fills masks (the labels' pixels, contiguous, mask_dtype(C)) and adds |M_c|, |D_c| (B, C) and the invalid labels
// (B,) of each image to counts_out, areas_out and invalid_out.
void run_masks(const at::Tensor& labels, int64_t num_classes, int64_t ignore_index, int64_t element, double radius,
               at::ArrayRef<double> spacing, at::Tensor& masks, int64_t* counts_out, int64_t* areas_out,
               int64_t* invalid_out) {
  const MaskParams p = make_params(labels, num_classes, ignore_index, element, radius, spacing.vec());
  AT_DISPATCH_INTEGRAL_TYPES(labels.scalar_type(), "dbce_masks_cpu", [&] {
    using label_t = scalar_t;
    dispatch_mask_type(masks.scalar_type(), [&](auto mask) {
      masks_impl<label_t, decltype(mask)>(p, labels, masks, counts_out, areas_out, invalid_out);
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dbce_masks_cpu(const at::Tensor& labels,
                                                                          int64_t num_classes, int64_t ignore_index,
                                                                          int64_t element, double radius,
                                                                          at::ArrayRef<double> spacing) {
  constexpr const char* op = "torch_medloss::dbce_masks";
  check_masks_inputs(op, labels, num_classes, element, radius, spacing);
  const int64_t batch = labels.size(0);
  const int64_t C = num_classes;
  const at::TensorOptions longs = labels.options().dtype(at::kLong);
  at::Tensor masks = at::empty(labels.sizes(), labels.options().dtype(mask_dtype(C)));
  at::Tensor counts = at::zeros({batch, C}, longs);
  at::Tensor areas = at::zeros({batch, C}, longs);
  at::Tensor invalid = at::zeros({batch}, longs);
  const int64_t pixels = labels.size(1) * labels.size(2) * labels.size(3);
  if (batch == 0 || pixels == 0) {
    return {masks, counts, areas, invalid};
  }
  run_masks(labels, C, ignore_index, element, radius, spacing, masks, counts.mutable_data_ptr<int64_t>(),
            areas.mutable_data_ptr<int64_t>(), invalid.mutable_data_ptr<int64_t>());
  return {masks, counts, areas, invalid};
}

// ==================================================================================================== cross entropy

template <typename label_t>
void load_ce_labels(const void* row, int64_t stride, int64_t first, int64_t n, int64_t classes, int64_t ignore_index,
                    int32_t* out) {
  const label_t* start = static_cast<const label_t*>(row) + first * stride;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t label = static_cast<int64_t>(start[j * stride]);
    const bool valid = static_cast<uint64_t>(label) < static_cast<uint64_t>(classes) && label != ignore_index;
    out[j] = valid ? static_cast<int32_t>(label) : -1;
  }
}

template <typename mask_t>
void load_ce_masks(const void* row, int64_t stride, int64_t first, int64_t n, int64_t* out) {
  const mask_t* start = static_cast<const mask_t*>(row) + first * stride;
  for (int64_t j = 0; j < n; ++j) {
    out[j] = static_cast<int64_t>(start[j * stride]);
  }
}

Loaders pick_loaders(const at::Tensor& labels, const at::Tensor& masks) {
  Loaders loaders{};
  AT_DISPATCH_INTEGRAL_TYPES(labels.scalar_type(), "dbce_ce_cpu", [&] { loaders.labels = &load_ce_labels<scalar_t>; });
  AT_DISPATCH_INTEGRAL_TYPES(masks.scalar_type(), "dbce_ce_cpu", [&] { loaders.masks = &load_ce_masks<scalar_t>; });
  return loaders;
}

template <typename scalar_t, typename acc_t>
CeInputs<scalar_t, acc_t> make_inputs(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& masks,
                                      const at::Tensor& weights, int64_t ignore_index) {
  CeInputs<scalar_t, acc_t> in;
  in.classes = logits.size(1);
  in.pixels = logits.size(2);
  in.ignore_index = ignore_index;
  in.x = logits.const_data_ptr<scalar_t>();
  in.x_b = logits.stride(0);
  in.x_c = logits.stride(1);
  in.x_s = logits.stride(2);
  in.labels = labels.const_data_ptr();
  in.labels_b = labels.stride(0);
  in.labels_s = labels.stride(1);
  in.label_size = static_cast<int64_t>(labels.element_size());
  in.masks = masks.const_data_ptr();
  in.masks_b = masks.stride(0);
  in.masks_s = masks.stride(1);
  in.mask_size = static_cast<int64_t>(masks.element_size());
  in.weights = weights.const_data_ptr<acc_t>();
  in.load = pick_loaders(labels, masks);
  return in;
}

// The entry points of the instruction set in use.
template <typename acc_t>
const CeKernels<acc_t>& ce_kernels(Isa isa) {
  if constexpr (std::is_same_v<acc_t, double>) {
    (void)isa;
    return double_tasks();
  } else {
#if MEDLOSS_WITH_AVX512
    if (isa == Isa::kAvx512) {
      return float_tasks_avx512();
    }
#endif
#if MEDLOSS_WITH_AVX2
    if (isa == Isa::kAvx2) {
      return float_tasks_avx2();
    }
#endif
    (void)isa;
    return float_tasks_baseline();
  }
}

template <typename scalar_t, typename acc_t>
void ce_forward_impl(const CeInputs<scalar_t, acc_t>& in, int64_t batch, at::Tensor& sums, at::Tensor& map,
                     bool write_map) {
  const int64_t pixels = in.pixels;
  const int64_t chunks = ceil_div(pixels, kChunkPixels);
  std::vector<acc_t> partial(batch * chunks * 2);
  acc_t* map_out = write_map ? map.mutable_data_ptr<acc_t>() : nullptr;
  const ForwardTask<scalar_t, acc_t> run_task =
      std::get<ForwardTask<scalar_t, acc_t>>(ce_kernels<acc_t>(cpu_isa()).forward);
  at::parallel_for(0, batch * chunks, /*grain_size=*/1, [&](int64_t first_task, int64_t last_task) {
    CeScratch<acc_t> s(in.classes);
    for (int64_t task = first_task; task < last_task; ++task) {
      const int64_t b = task / chunks;
      const int64_t begin = (task % chunks) * kChunkPixels;
      const int64_t end = std::min(pixels, begin + kChunkPixels);
      run_task(in, b, begin, end, s, map_out, partial.data() + task * 2);
    }
  });
  // Chunk rows summed in chunk order.
  acc_t* out = sums.mutable_data_ptr<acc_t>();
  for (int64_t b = 0; b < batch; ++b) {
    acc_t total_ce = 0, total_w = 0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      total_ce += partial[(b * chunks + chunk) * 2 + 0];
      total_w += partial[(b * chunks + chunk) * 2 + 1];
    }
    out[b * 2 + 0] = total_ce;
    out[b * 2 + 1] = total_w;
  }
}

template <typename scalar_t, typename acc_t>
void ce_backward_impl(const CeInputs<scalar_t, acc_t>& in, int64_t batch, const acc_t* grad_sums,
                      const acc_t* grad_map, at::Tensor& grad) {
  const int64_t C = in.classes;
  const int64_t pixels = in.pixels;
  const int64_t chunks = ceil_div(pixels, kChunkPixels);
  scalar_t* dx = grad.mutable_data_ptr<scalar_t>();
  const int64_t g_b = grad.stride(0), g_c = grad.stride(1), g_s = grad.stride(2);
  const BackwardTask<scalar_t, acc_t> run_task =
      std::get<BackwardTask<scalar_t, acc_t>>(ce_kernels<acc_t>(cpu_isa()).backward);
  at::parallel_for(0, batch * chunks, /*grain_size=*/1, [&](int64_t first_task, int64_t last_task) {
    CeScratch<acc_t> s(C);
    for (int64_t task = first_task; task < last_task; ++task) {
      const int64_t b = task / chunks;
      const int64_t begin = (task % chunks) * kChunkPixels;
      const int64_t end = std::min(pixels, begin + kChunkPixels);
      run_task(in, b, begin, end, s, grad_sums[b * 2], grad_map, dx + b * g_b, g_c, g_s);
    }
  });
}

void check_ce_inputs(const char* op, const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& masks,
                     const at::Tensor& class_weights) {
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be 3-D (B, C, S), got shape ", logits.sizes());
  TORCH_CHECK(is_float_dtype(logits.scalar_type()), op,
              ": logits must be float32, float64, bfloat16 or float16, got ", logits.scalar_type());
  const int64_t batch = logits.size(0), classes = logits.size(1), pixels = logits.size(2);
  TORCH_CHECK(classes >= 1 && classes <= MAX_MASK_CLASSES, op, ": logits must have between 1 and ", MAX_MASK_CLASSES,
              " classes (one mask bit per class), got shape ", logits.sizes());
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == batch && labels.size(1) == pixels, op,
              ": labels must have shape (B, S) = [", batch, ", ", pixels, "], got ", labels.sizes());
  TORCH_CHECK(is_label_dtype(labels.scalar_type()), op, ": labels must be uint8, int8, int16, int32 or int64, got ",
              labels.scalar_type());
  TORCH_CHECK(masks.dim() == 2 && masks.size(0) == batch && masks.size(1) == pixels, op,
              ": masks must have shape (B, S) = [", batch, ", ", pixels, "], got ", masks.sizes());
  TORCH_CHECK(is_label_dtype(masks.scalar_type()), op, ": masks must be uint8, int8, int16, int32 or int64, got ",
              masks.scalar_type());
  TORCH_CHECK(class_weights.dim() == 2 && class_weights.size(0) == batch && class_weights.size(1) == classes, op,
              ": class_weights must have shape (B, C) = [", batch, ", ", classes, "], got ", class_weights.sizes());
  TORCH_CHECK(is_float_dtype(class_weights.scalar_type()), op,
              ": class_weights must be float32, float64, bfloat16 or float16, got ", class_weights.scalar_type());
  const auto same_device = [&](const char* name, const at::Tensor& tensor) {
    TORCH_CHECK(tensor.device() == logits.device(), op, ": ", name, " must be on the logits' device (",
                logits.device(), "), got ", tensor.device());
  };
  same_device("labels", labels);
  same_device("masks", masks);
  same_device("class_weights", class_weights);
}

at::ScalarType accumulator(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> dbce_ce_fwd_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                   const at::Tensor& masks, const at::Tensor& class_weights,
                                                   int64_t ignore_index, bool write_map) {
  constexpr const char* op = "torch_medloss::dbce_ce_fwd";
  check_ce_inputs(op, logits, labels, masks, class_weights);
  const int64_t batch = logits.size(0), pixels = logits.size(2);
  const at::ScalarType acc = accumulator(logits);
  at::Tensor sums = at::zeros({batch, 2}, logits.options().dtype(acc));
  at::Tensor map = write_map ? at::empty({batch, pixels}, logits.options().dtype(acc))
                             : at::empty({0}, logits.options().dtype(acc));
  if (logits.numel() == 0) {
    return {sums, map};
  }
  const at::Tensor weights = class_weights.to(acc).contiguous();  // (B, C): cheap beside the logits
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "dbce_ce_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = make_inputs<scalar_t, acc_t>(logits, labels, masks, weights, ignore_index);
    ce_forward_impl<scalar_t, acc_t>(in, batch, sums, map, write_map);
  });
  return {sums, map};
}

at::Tensor dbce_ce_bwd_cpu(const at::Tensor& grad_sums, const at::Tensor& grad_map, const at::Tensor& logits,
                           const at::Tensor& labels, const at::Tensor& masks, const at::Tensor& class_weights,
                           int64_t ignore_index, bool write_map) {
  constexpr const char* op = "torch_medloss::dbce_ce_bwd";
  check_ce_inputs(op, logits, labels, masks, class_weights);
  const int64_t batch = logits.size(0), pixels = logits.size(2);
  TORCH_CHECK(grad_sums.dim() == 2 && grad_sums.size(0) == batch && grad_sums.size(1) == 2, op,
              ": grad_sums must have shape (B, 2) = [", batch, ", 2], got ", grad_sums.sizes());
  TORCH_CHECK(is_float_dtype(grad_sums.scalar_type()), op,
              ": grad_sums must be float32, float64, bfloat16 or float16, got ", grad_sums.scalar_type());
  TORCH_CHECK(grad_sums.device() == logits.device(), op, ": grad_sums must be on the logits' device (",
              logits.device(), "), got ", grad_sums.device());
  if (write_map) {
    TORCH_CHECK(grad_map.dim() == 2 && grad_map.size(0) == batch && grad_map.size(1) == pixels, op,
                ": grad_map must have shape (B, S) = [", batch, ", ", pixels, "] when write_map, got ",
                grad_map.sizes());
    TORCH_CHECK(is_float_dtype(grad_map.scalar_type()), op,
                ": grad_map must be float32, float64, bfloat16 or float16, got ", grad_map.scalar_type());
    TORCH_CHECK(grad_map.device() == logits.device(), op, ": grad_map must be on the logits' device (",
                logits.device(), "), got ", grad_map.device());
  }
  // Same strides as the logits for a dense, non-overlapping layout (channels_last stays channels_last).
  at::Tensor grad = at::empty_like(logits);
  if (logits.numel() == 0) {
    return grad;
  }
  const at::ScalarType acc = accumulator(logits);
  const at::Tensor weights = class_weights.to(acc).contiguous();
  const at::Tensor up_sums = grad_sums.to(acc).contiguous();
  const at::Tensor up_map = write_map ? grad_map.to(acc).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "dbce_ce_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = make_inputs<scalar_t, acc_t>(logits, labels, masks, weights, ignore_index);
    ce_backward_impl<scalar_t, acc_t>(in, batch, up_sums.const_data_ptr<acc_t>(),
                                      write_map ? up_map.const_data_ptr<acc_t>() : nullptr, grad);
  });
  return grad;
}


// ================================================================================================ the loss op

// The class weights of one unit (reference.dbce.class_weights_from_sums with dtype float64): w_c = N / (K A_c) for
// the present classes (|M_c| > 0), 0 for the others, N = sum_c |M_c|, K the number of present classes; in double,
// rounded once to acc_t.
template <typename acc_t>
void unit_class_weights(const int64_t* counts, const int64_t* areas, int64_t classes, acc_t* weights) {
  int64_t valid = 0, present = 0;
  for (int64_t c = 0; c < classes; ++c) {
    valid += counts[c];
    present += counts[c] > 0 ? 1 : 0;
  }
  for (int64_t c = 0; c < classes; ++c) {
    const double ratio = static_cast<double>(valid) / (static_cast<double>(present) * static_cast<double>(areas[c]));
    weights[c] = counts[c] > 0 ? static_cast<acc_t>(ratio) : acc_t(0);
  }
}

// The dbce_loss ops' arguments.
struct LossCodes {
  int64_t element, reduction, ignore_index;
  bool batch;
  double radius;
  std::vector<double> spacing;
};

LossCodes check_loss_inputs(const char* op, const at::Tensor& logits, const at::Tensor& labels, at::IntArrayRef codes,
                            at::ArrayRef<double> scalars) {
  using namespace contract;
  TORCH_CHECK(static_cast<int64_t>(codes.size()) == DBCE_NUM_CODES, op, ": codes must have ", DBCE_NUM_CODES,
              " entries (the DBCE_CODE_* positions of torch_medloss._contract), got ", codes.size());
  TORCH_CHECK(static_cast<int64_t>(scalars.size()) == DBCE_NUM_SCALARS, op, ": scalars must have ", DBCE_NUM_SCALARS,
              " entries (the radius and the spacing along D, H, W), got ", scalars.size());
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be 3-D (B, C, S), got shape ", logits.sizes());
  TORCH_CHECK(is_float_dtype(logits.scalar_type()), op,
              ": logits must be float32, float64, bfloat16 or float16, got ", logits.scalar_type());
  TORCH_CHECK(labels.dim() == 4 && labels.size(0) == logits.size(0) &&
                  labels.size(1) * labels.size(2) * labels.size(3) == logits.size(2),
              op, ": labels must be (B, D, H, W) with B = ", logits.size(0), " and D H W = S = ", logits.size(2),
              " for logits of shape ", logits.sizes(), ", got ", labels.sizes());
  TORCH_CHECK(labels.device() == logits.device(), op, ": labels must be on the logits' device (", logits.device(),
              "), got ", labels.device());
  LossCodes k;
  k.element = codes[DBCE_CODE_ELEMENT];
  k.batch = codes[DBCE_CODE_BATCH] != 0;
  k.reduction = codes[DBCE_CODE_REDUCTION];
  k.ignore_index = codes[DBCE_CODE_IGNORE_INDEX];
  k.radius = scalars[DBCE_SCALAR_RADIUS];
  k.spacing.assign(scalars.begin() + DBCE_SCALAR_SPACING, scalars.begin() + DBCE_SCALAR_SPACING + 3);
  TORCH_CHECK(k.reduction >= REDUCTION_MEAN && k.reduction <= REDUCTION_NONE, op,
              ": codes[DBCE_CODE_REDUCTION] must be 0 (mean), 1 (sum) or 2 (none), got ", k.reduction);
  check_masks_inputs(op, labels, logits.size(1), k.element, k.radius, k.spacing);
  return k;
}

std::vector<int64_t> dbce_loss_shape(const LossCodes& k, int64_t batch, int64_t pixels) {
  return k.reduction == contract::REDUCTION_NONE ? std::vector<int64_t>{batch, pixels} : std::vector<int64_t>{};
}

// dbce_loss_fwd: the masks, the class weights of each unit, the weighted cross entropy and the reduction in one op
// (reference.dbce_ops.dbce_loss_fwd). Returns (loss, masks (B, S), class_weights (B, C), norm (1,)), the last three
// in the accumulation dtype but the masks; norm = d loss / d sum w CE (1 / max(sum w, float32's smallest normal)
// for the mean, 1 otherwise). A bad label makes the loss NaN (all of the map for "none"), not the gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dbce_loss_fwd_cpu(const at::Tensor& logits,
                                                                             const at::Tensor& labels,
                                                                             at::IntArrayRef codes,
                                                                             at::ArrayRef<double> scalars) {
  constexpr const char* op = "torch_medloss::dbce_loss_fwd";
  const LossCodes k = check_loss_inputs(op, logits, labels, codes, scalars);
  const int64_t batch = logits.size(0), classes = logits.size(1), pixels = logits.size(2);
  const at::TensorOptions acc = logits.options().dtype(accumulator(logits));
  at::Tensor loss = at::zeros(dbce_loss_shape(k, batch, pixels), acc);
  at::Tensor masks = at::empty({batch, pixels}, labels.options().dtype(mask_dtype(classes)));
  at::Tensor class_weights = at::zeros({batch, classes}, acc);
  at::Tensor norm = at::zeros({1}, acc);
  if (batch == 0 || pixels == 0) {
    return {loss, masks, class_weights, norm};  // nothing is valid: the mean is 0 (the clamped normalizer), the sum 0
  }
  // 1. masks, and the counts, areas and bad labels of every image (integers: exact in any order).
  std::vector<int64_t> counts(batch * classes, 0), areas(batch * classes, 0), invalid(batch, 0);
  run_masks(labels, classes, k.ignore_index, k.element, k.radius, k.spacing, masks, counts.data(), areas.data(),
            invalid.data());
  int64_t bad = 0;
  for (int64_t b = 0; b < batch; ++b) {
    bad += invalid[b];
  }
  const bool none = k.reduction == contract::REDUCTION_NONE;
  at::Tensor sums = at::zeros({batch, 2}, acc);
  // The cross entropy reads the labels as (B, S): a view unless the spatial dims cannot merge (then one copy).
  const at::Tensor flat_labels = labels.reshape({batch, pixels});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "dbce_loss_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // 2. the class weights of each unit: the image, or the batch (its summed counts and areas, for every image).
    acc_t* weights = class_weights.mutable_data_ptr<acc_t>();
    if (k.batch) {
      std::vector<int64_t> unit_counts(classes, 0), unit_areas(classes, 0);
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t c = 0; c < classes; ++c) {
          unit_counts[c] += counts[b * classes + c];
          unit_areas[c] += areas[b * classes + c];
        }
      }
      unit_class_weights(unit_counts.data(), unit_areas.data(), classes, weights);
      for (int64_t b = 1; b < batch; ++b) {
        std::copy(weights, weights + classes, weights + b * classes);
      }
    } else {
      for (int64_t b = 0; b < batch; ++b) {
        unit_class_weights(counts.data() + b * classes, areas.data() + b * classes, classes, weights + b * classes);
      }
    }
    // 3. the weighted cross entropy, its map written into the loss for "none".
    const auto in = make_inputs<scalar_t, acc_t>(logits, flat_labels, masks, class_weights, k.ignore_index);
    ce_forward_impl<scalar_t, acc_t>(in, batch, sums, loss, none);
    // 4. the reduction, images added in order; the poison is a constant (no gradient).
    const acc_t poison = bad > 0 ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(0);
    const acc_t* image_sums = sums.const_data_ptr<acc_t>();
    acc_t total = 0, normalizer = 0;
    for (int64_t b = 0; b < batch; ++b) {
      total += image_sums[b * 2 + 0];
      normalizer += image_sums[b * 2 + 1];
    }
    acc_t* out = loss.mutable_data_ptr<acc_t>();
    acc_t* d_total = norm.mutable_data_ptr<acc_t>();
    if (none) {
      if (bad > 0) {
        std::fill(out, out + batch * pixels, poison);
      }
      *d_total = acc_t(1);
    } else if (k.reduction == contract::REDUCTION_MEAN) {
      // reference.dbce.reduce_weighted: sum w CE / sum w, the normalizer clamped to float32's smallest normal.
      const acc_t clamped = std::max(normalizer, static_cast<acc_t>(std::numeric_limits<float>::min()));
      *out = total / clamped + poison;
      *d_total = acc_t(1) / clamped;
    } else {
      *out = total + poison;
      *d_total = acc_t(1);
    }
  });
  return {loss, masks, class_weights, norm};
}

// dbce_loss_bwd: the cross entropy's backward with the forward's masks and class weights, its upstream per pixel
// (the map's gradient for "none") or per image (the scalar loss's gradient times norm).
at::Tensor dbce_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& masks, const at::Tensor& class_weights,
                             const at::Tensor& norm, const at::Tensor& logits, const at::Tensor& labels,
                             at::IntArrayRef codes, at::ArrayRef<double> scalars) {
  constexpr const char* op = "torch_medloss::dbce_loss_bwd";
  const LossCodes k = check_loss_inputs(op, logits, labels, codes, scalars);
  const int64_t batch = logits.size(0), classes = logits.size(1), pixels = logits.size(2);
  const std::vector<int64_t> shape = dbce_loss_shape(k, batch, pixels);
  TORCH_CHECK(grad_loss.sizes() == at::IntArrayRef(shape), op, ": grad_loss must have the loss's shape ",
              at::IntArrayRef(shape), ", got ", grad_loss.sizes());
  TORCH_CHECK(is_float_dtype(grad_loss.scalar_type()), op,
              ": grad_loss must be float32, float64, bfloat16 or float16, got ", grad_loss.scalar_type());
  TORCH_CHECK(masks.dim() == 2 && masks.size(0) == batch && masks.size(1) == pixels &&
                  masks.scalar_type() == mask_dtype(classes),
              op, ": masks must be the forward's (B, S) = [", batch, ", ", pixels, "] ", mask_dtype(classes),
              " masks, got ", masks.scalar_type(), " of shape ", masks.sizes());
  TORCH_CHECK(class_weights.dim() == 2 && class_weights.size(0) == batch && class_weights.size(1) == classes &&
                  is_float_dtype(class_weights.scalar_type()),
              op, ": class_weights must be a float tensor of shape (B, C) = [", batch, ", ", classes, "], got ",
              class_weights.scalar_type(), " of shape ", class_weights.sizes());
  TORCH_CHECK(norm.numel() == 1 && is_float_dtype(norm.scalar_type()), op,
              ": norm must be a float tensor of one element (d loss / d sum w CE), got ", norm.scalar_type(),
              " of shape ", norm.sizes());
  for (const auto& [name, tensor] : {std::pair<const char*, const at::Tensor*>{"grad_loss", &grad_loss},
                                     {"masks", &masks}, {"class_weights", &class_weights}, {"norm", &norm}}) {
    TORCH_CHECK(tensor->device() == logits.device(), op, ": ", name, " must be on the logits' device (",
                logits.device(), "), got ", tensor->device());
  }
  // Same strides as the logits for a dense, non-overlapping layout (channels_last stays channels_last).
  at::Tensor grad = at::empty_like(logits);
  if (logits.numel() == 0) {
    return grad;
  }
  const at::ScalarType acc = accumulator(logits);
  const bool none = k.reduction == contract::REDUCTION_NONE;
  const at::Tensor weights = class_weights.to(acc).contiguous();
  const at::Tensor up = grad_loss.to(acc).contiguous();
  const at::Tensor d_total = norm.to(acc);
  const at::Tensor flat_labels = labels.reshape({batch, pixels});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "dbce_loss_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // The upstream of sum w CE of each image: the scalar loss's, times d loss / d sum w CE; 0 for the map.
    const acc_t per_image = none ? acc_t(0) : up.const_data_ptr<acc_t>()[0] * d_total.const_data_ptr<acc_t>()[0];
    std::vector<acc_t> up_sums(batch * 2, acc_t(0));
    for (int64_t b = 0; b < batch; ++b) {
      up_sums[b * 2] = per_image;
    }
    const auto in = make_inputs<scalar_t, acc_t>(logits, flat_labels, masks, weights, k.ignore_index);
    ce_backward_impl<scalar_t, acc_t>(in, batch, up_sums.data(), none ? up.const_data_ptr<acc_t>() : nullptr, grad);
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_medloss, CPU, m) {
  m.impl("dbce_masks", &dbce_masks_cpu);
  m.impl("dbce_ce_fwd", &dbce_ce_fwd_cpu);
  m.impl("dbce_ce_bwd", &dbce_ce_bwd_cpu);
  m.impl("dbce_loss_fwd", &dbce_loss_fwd_cpu);
  m.impl("dbce_loss_bwd", &dbce_loss_bwd_cpu);
}

}  // namespace torch_medloss
