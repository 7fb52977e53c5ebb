// CUDA kernels of the DBCE ops (schemas in csrc/dbce.cpp; the ground truth is torch_medloss/reference/dbce_ops.py;
// codes and scalars in the layout of csrc/contract.h):
//   dbce_loss_fwd / dbce_loss_bwd: the whole loss (masks, class weights, weighted cross entropy, reduction);
//   dbce_masks, dbce_ce_fwd / dbce_ce_bwd: the pieces, for the calls that stop between them.
// Logits float32, bfloat16 and float16 (float64 runs on the CPU only), any strides; float32 accumulation.
//
// Launches of the loss (device code in dbce_device.h), with no other PyTorch op and no host sync between them:
// one zeros for the counters, the masks passes (one when the element has at most DBCE_MAX_BOX_OFFSETS offsets, which
// covers every 1-D and 2-D element up to R ~ 7 voxels and 3-D balls up to R = 3; two in 3-D up to R ~ 7; three
// beyond), the last of which finishes the class weights in its last block; the cross entropy forward, whose last
// block finishes the loss; and the backward. So 4 launches for a 3-D R = 3 cube, 3 for a ball.
//
// The element. Every offset test is the reference's float64 inequality (structuring_element: the squares summed
// D, H, W, or the cube's per-axis bound), evaluated here on the host into small integer tables, so the masks are
// bitwise the reference's (CPython squares with pow(t, 2), we with t * t: they can differ only where pow is not
// correctly rounded, and then only for offsets within an ulp of the boundary). Large elements are split exactly:
// because fl(x + y) is monotone in x, the minimum of the partial sums over the first axes can be taken first (as a
// rank among the distinct partial sums, a small integer) and the last axis's square added after:
//   - 2 axes (X1, X2): rank pass along X1, then bit c iff some |k| has rank[i + k e2, c] <= max_rank[|k|], the
//     largest rank whose value v satisfies fl(v + q2(k)) <= R^2 (1 + 1e-9);
//   - 3 axes: rank pass over the (D, H) offsets as one list (when at most DBCE_MAX_BOX_OFFSETS pairs are inside),
//     else a pass along D (the nearest |a|) and one along H (the rank of fl(q_D(a) + q_H(b))); then W as above.
// The cube is the same code with all values 0.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "dbce_device.h"
#include "host_utils.h"

namespace torch_medloss {
namespace dbce_cuda {
namespace {

// Partial rows (image, chunk) at most over the batch and per image, for the launches whose last block reads them
// all (the final masks pass, the cross entropy forward); then a block walks several steps.
constexpr int64_t kMaxRows = 2048;
constexpr int64_t kMaxRowsPerImage = 1024;
// The reference's tolerance on the element's boundary (structuring_element).
constexpr double kBoundaryTolerance = 1e-9;

// (chunks per image, pixels per chunk): one step per chunk, or, with ``capped``, at most kMaxRowsPerImage chunks
// per image and kMaxRows over the batch. An empty image still has one (empty) chunk.
std::pair<int64_t, int64_t> chunk_layout(int64_t batch, int64_t pixels, bool capped) {
  const int64_t steps = std::max<int64_t>(1, ceil_div(pixels, kStepPixels));
  int64_t steps_per_chunk = 1;
  if (capped) {
    const int64_t cap = std::max<int64_t>(1, std::min(kMaxRowsPerImage, kMaxRows / std::max<int64_t>(batch, 1)));
    steps_per_chunk = ceil_div(steps, cap);
  }
  return {ceil_div(steps, steps_per_chunk), steps_per_chunk * kStepPixels};
}

void check_grid(const char* op, int64_t batch, int64_t chunks) {
  TORCH_CHECK(chunks <= INT_MAX && batch <= INT_MAX / chunks, op, ": too many pixels for one grid (B = ", batch,
              ", ", chunks, " blocks per image)");
}

at::ScalarType mask_dtype(int64_t classes) {
  return classes <= 8 ? at::kByte : classes <= 16 ? at::kShort : classes <= 32 ? at::kInt : at::kLong;
}

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

// Calls body(Type<index_t>{}) for rank buffers of ``bytes`` bytes per entry.
template <typename Body>
void dispatch_index(int bytes, const Body& body) {
  if (bytes == 1) {
    body(Type<uint8_t>{});
  } else if (bytes == 2) {
    body(Type<uint16_t>{});
  } else {
    body(Type<uint32_t>{});
  }
}

// Labels (B, D, H, W), any strides, as the kernels read them.
Volume make_volume(const at::Tensor& labels, int64_t classes, int64_t ignore_index) {
  Volume vol{};
  vol.depth = labels.size(1);
  vol.height = labels.size(2);
  vol.width = labels.size(3);
  vol.pixels = vol.depth * vol.height * vol.width;
  vol.l_b = labels.stride(0);
  vol.l_d = labels.stride(1);
  vol.l_h = labels.stride(2);
  vol.l_w = labels.stride(3);
  // Whether i = (d H + h) W + w is one stride away from i + 1 throughout: the innermost dim of size > 1 gives the
  // stride, every outer one of size > 1 must continue it.
  int64_t step = 0;
  int64_t span = 1;
  vol.flat = true;
  for (int dim = 3; dim >= 1; --dim) {
    if (labels.size(dim) == 1) {
      continue;
    }
    if (step == 0) {
      step = labels.stride(dim);
    } else if (labels.stride(dim) != step * span) {
      vol.flat = false;
    }
    span *= labels.size(dim);
  }
  vol.l_flat = step;
  vol.label_type = value_type(labels.scalar_type());
  vol.classes = classes;
  vol.ignore_index = ignore_index;
  return vol;
}

// ------------------------------------------------------------------------------------------ the element's plan

// The element along D, H, W: the offsets the reference enumerates (|o_k| <= reach[k]: the ball's extents
// min(floor(R / s_k (1 + 1e-9)), n_k - 1), the cube's windows inside them) and its float64 test.
struct Element {
  bool ball = true;
  double limit = 0.0;  // ball: R^2 (1 + 1e-9)
  double spacing[3] = {1.0, 1.0, 1.0};
  int64_t reach[3] = {0, 0, 0};

  double square(int axis, int64_t o) const {
    const double t = static_cast<double>(o) * spacing[axis];
    return t * t;
  }
  // The reference's sum over the axes in order (Python's sum starts from 0; axes left out add 0.0, exactly).
  double value(int64_t a, int64_t b, int64_t k) const {
    return (square(0, a) + square(1, b)) + square(2, k);
  }
  bool inside(int64_t a, int64_t b, int64_t k) const {
    if (!ball) {
      return std::abs(a) <= reach[0] && std::abs(b) <= reach[1] && std::abs(k) <= reach[2];
    }
    return value(a, b, k) <= limit;
  }
};

Element make_element(int64_t element, double radius, at::ArrayRef<double> spacing, const int64_t sizes[3]) {
  const double scale = 1.0 + kBoundaryTolerance;
  Element el;
  el.ball = element == K::ELEMENT_BALL;
  el.limit = radius * radius * scale;
  for (int k = 0; k < 3; ++k) {
    el.spacing[k] = spacing[k];
    // reference.dbce._element_within: min(floor(R / s (1 + tol)), n - 1), clamped first (R / s may be inf).
    const double reach = radius / spacing[k] * scale;
    el.reach[k] = reach >= static_cast<double>(sizes[k] - 1) ? sizes[k] - 1 : static_cast<int64_t>(std::floor(reach));
    if (!el.ball) {
      // max_k |o_k s_k| <= R (1 + tol): the window is the largest such o within the extent.
      const double bound = radius * scale;
      while (el.reach[k] > 0 && !(static_cast<double>(el.reach[k]) * spacing[k] <= bound)) {
        --el.reach[k];
      }
    }
  }
  return el;
}

enum PassKind { kRankList, kRankWindow, kMiddle, kFinalList, kFinalLabelsWindow, kFinalRanks };

struct PlannedPass {
  PassKind kind;
  int axis = 2;  // window passes: 0 D, 1 H, 2 W
  int64_t reach = 0;
  int64_t table = 0;  // offset in Plan::tables
  int64_t list_size = 0;
  int64_t pair_row = 0;
};

struct Plan {
  std::vector<PlannedPass> passes;
  std::vector<int32_t> tables;
  int index_bytes = 1;  // the rank buffers' entries
};

// Dense ranks of ``values`` among the sorted distinct ``inside`` ones.
int64_t dense_rank(const std::vector<double>& distinct, double value) {
  return std::lower_bound(distinct.begin(), distinct.end(), value) - distinct.begin();
}

// max_rank[k], k = 0 .. reach along the last axis: the largest rank r whose value v (distinct[r]) is inside with
// the offset k (fl(v + q(k)) <= limit; the cube: every in-window offset), -1 if none. Non-increasing in k.
std::vector<int32_t> max_ranks(const Element& el, int axis, const std::vector<double>& distinct) {
  std::vector<int32_t> out(el.reach[axis] + 1);
  int64_t r = static_cast<int64_t>(distinct.size()) - 1;
  for (int64_t k = 0; k <= el.reach[axis]; ++k) {
    if (el.ball) {
      const double q = el.square(axis, k);
      while (r >= 0 && !(distinct[r] + q <= el.limit)) {
        --r;
      }
    }
    out[k] = static_cast<int32_t>(r);
  }
  return out;
}

int index_bytes_for(int64_t largest) {
  // The largest value of the type marks "no hit", so it must exceed every stored index.
  if (largest < std::numeric_limits<uint8_t>::max()) {
    return 1;
  }
  if (largest < std::numeric_limits<uint16_t>::max()) {
    return 2;
  }
  TORCH_CHECK(largest < static_cast<int64_t>(std::numeric_limits<uint32_t>::max()),
              "torch_medloss::dbce CUDA: the element is too large (", largest, " distinct offset lengths)");
  return 4;
}

Plan make_plan(const Element& el) {
  Plan plan;
  std::vector<int> active;
  for (int k = 0; k < 3; ++k) {
    if (el.reach[k] > 0) {
      active.push_back(k);
    }
  }
  const auto add_table = [&](const std::vector<int32_t>& table) {
    const int64_t at = static_cast<int64_t>(plan.tables.size());
    plan.tables.insert(plan.tables.end(), table.begin(), table.end());
    return at;
  };

  // 1. The whole element as one list of offsets, when it is small (every element with up to kMaxList offsets).
  std::vector<int32_t> list;
  int64_t count = 0;
  for (int64_t a = -el.reach[0]; a <= el.reach[0] && count <= kMaxList; ++a) {
    for (int64_t b = -el.reach[1]; b <= el.reach[1] && count <= kMaxList; ++b) {
      for (int64_t k = -el.reach[2]; k <= el.reach[2] && count <= kMaxList; ++k) {
        if (el.inside(a, b, k)) {
          list.insert(list.end(), {static_cast<int32_t>(a), static_cast<int32_t>(b), static_cast<int32_t>(k), 0});
          ++count;
        }
      }
    }
  }
  if (count <= kMaxList) {
    PlannedPass pass{kFinalList};
    pass.list_size = count;
    pass.table = add_table(list);
    plan.passes.push_back(pass);
    return plan;
  }

  // 2. One axis: a window over the labels, table[k] >= 0 where the offset is inside.
  if (active.size() == 1) {
    const int axis = active[0];
    std::vector<int32_t> table(el.reach[axis] + 1);
    for (int64_t k = 0; k <= el.reach[axis]; ++k) {
      const int64_t o[3] = {axis == 0 ? k : 0, axis == 1 ? k : 0, axis == 2 ? k : 0};
      table[k] = el.inside(o[0], o[1], o[2]) ? 0 : -1;
    }
    PlannedPass pass{kFinalLabelsWindow};
    pass.axis = axis;
    pass.reach = el.reach[axis];
    pass.table = add_table(table);
    plan.passes.push_back(pass);
    return plan;
  }

  const int last = active.back();
  // The partial sums of the first axes: ball values (0 for the cube, whose offsets are all inside the windows).
  const auto first_value = [&](int64_t a, int64_t b) {
    if (!el.ball) {
      return 0.0;
    }
    return el.square(0, a) + el.square(1, b);  // the axes after the first group add their squares later
  };
  if (active.size() == 2) {
    // 3. Two axes X1, X2: ranks of q1(a) along X1, then the window along X2.
    const int axis = active[0];
    std::vector<double> values(el.reach[axis] + 1);
    std::vector<double> distinct;
    for (int64_t a = 0; a <= el.reach[axis]; ++a) {
      values[a] = first_value(axis == 0 ? a : 0, axis == 1 ? a : 0);
      if (!el.ball || values[a] <= el.limit) {
        distinct.push_back(values[a]);
      }
    }
    std::sort(distinct.begin(), distinct.end());
    distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
    std::vector<int32_t> ranks(values.size());
    for (size_t a = 0; a < values.size(); ++a) {
      ranks[a] = (!el.ball || values[a] <= el.limit) ? static_cast<int32_t>(dense_rank(distinct, values[a])) : -1;
    }
    PlannedPass first{kRankWindow};
    first.axis = axis;
    first.reach = el.reach[axis];
    first.table = add_table(ranks);
    PlannedPass final_pass{kFinalRanks};
    final_pass.axis = last;
    final_pass.reach = el.reach[last];
    final_pass.table = add_table(max_ranks(el, last, distinct));
    plan.passes = {first, final_pass};
    plan.index_bytes = index_bytes_for(static_cast<int64_t>(distinct.size()) - 1);
    return plan;
  }

  // 4. Three axes: the (D, H) pairs inside the element.
  std::vector<std::pair<double, std::pair<int64_t, int64_t>>> pairs;
  for (int64_t a = -el.reach[0]; a <= el.reach[0] && static_cast<int64_t>(pairs.size()) <= kMaxList; ++a) {
    for (int64_t b = -el.reach[1]; b <= el.reach[1] && static_cast<int64_t>(pairs.size()) <= kMaxList; ++b) {
      const double v = first_value(a, b);
      if (!el.ball || v <= el.limit) {
        pairs.push_back({v, {a, b}});
      }
    }
  }
  if (static_cast<int64_t>(pairs.size()) <= kMaxList) {
    // One rank pass over the pairs as a list, sorted by value (the first hit of a class is its smallest rank).
    std::stable_sort(pairs.begin(), pairs.end(),
                     [](const auto& x, const auto& y) { return x.first < y.first; });
    std::vector<double> distinct;
    for (const auto& p : pairs) {
      distinct.push_back(p.first);
    }
    distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
    std::vector<int32_t> entries;
    for (const auto& p : pairs) {
      entries.insert(entries.end(), {static_cast<int32_t>(p.second.first), static_cast<int32_t>(p.second.second), 0,
                                     static_cast<int32_t>(dense_rank(distinct, p.first))});
    }
    PlannedPass first{kRankList};
    first.list_size = static_cast<int64_t>(pairs.size());
    first.table = add_table(entries);
    PlannedPass final_pass{kFinalRanks};
    final_pass.axis = 2;
    final_pass.reach = el.reach[2];
    final_pass.table = add_table(max_ranks(el, 2, distinct));
    plan.passes = {first, final_pass};
    plan.index_bytes = 1;
    return plan;
  }
  // Three passes: the nearest |a| along D, the rank of (|a|, |b|) along H, then W.
  std::vector<int32_t> nearest(el.reach[0] + 1);
  for (int64_t a = 0; a <= el.reach[0]; ++a) {
    nearest[a] = static_cast<int32_t>(a);
  }
  const int64_t row = el.reach[1] + 1;
  std::vector<double> values((el.reach[0] + 1) * row);
  std::vector<double> distinct;
  for (int64_t a = 0; a <= el.reach[0]; ++a) {
    for (int64_t b = 0; b <= el.reach[1]; ++b) {
      const double v = first_value(a, b);
      values[a * row + b] = v;
      if (!el.ball || v <= el.limit) {
        distinct.push_back(v);
      }
    }
  }
  std::sort(distinct.begin(), distinct.end());
  distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
  std::vector<int32_t> pair_ranks(values.size());
  for (size_t p = 0; p < values.size(); ++p) {
    pair_ranks[p] =
        (!el.ball || values[p] <= el.limit) ? static_cast<int32_t>(dense_rank(distinct, values[p])) : -1;
  }
  PlannedPass first{kRankWindow};
  first.axis = 0;
  first.reach = el.reach[0];
  first.table = add_table(nearest);
  PlannedPass middle{kMiddle};
  middle.axis = 1;
  middle.reach = el.reach[1];
  middle.table = add_table(pair_ranks);
  middle.pair_row = row;
  PlannedPass final_pass{kFinalRanks};
  final_pass.axis = 2;
  final_pass.reach = el.reach[2];
  final_pass.table = add_table(max_ranks(el, 2, distinct));
  plan.passes = {first, middle, final_pass};
  plan.index_bytes = index_bytes_for(std::max(el.reach[0], static_cast<int64_t>(distinct.size()) - 1));
  return plan;
}

// ------------------------------------------------------------------------------------------ masks: launches

struct MasksRun {
  at::Tensor partial;  // the final pass's (B * chunks, 2C + 1) int32 rows
  int64_t chunks = 0;
};

// Runs the plan's passes over labels (B, D, H, W) into masks (B, N). finalize: the final pass's last block writes
// class_weights (B, C) float32 and counters[kInvalid] (see masks_class_weights).
MasksRun run_masks(const char* op, const at::Tensor& labels, const Volume& vol, const Plan& plan, at::Tensor& masks,
                   float* class_weights, int32_t* counters, bool finalize, bool unit_batch, cudaStream_t stream) {
  const int64_t batch = labels.size(0);
  // The tables: a kernel parameter when they fit int16 entries, else device memory (one copy from pinned memory).
  Tables params{};
  at::Tensor memory;
  const bool small =
      plan.tables.size() <= static_cast<size_t>(kParamTable) &&
      std::all_of(plan.tables.begin(), plan.tables.end(), [](int32_t v) { return v >= INT16_MIN && v <= INT16_MAX; });
  if (small) {
    for (size_t t = 0; t < plan.tables.size(); ++t) {
      params.v[t] = static_cast<int16_t>(plan.tables[t]);
    }
  } else {
    at::Tensor host = at::empty({static_cast<int64_t>(plan.tables.size())},
                                at::TensorOptions().dtype(at::kInt).pinned_memory(true));
    std::memcpy(host.mutable_data_ptr<int32_t>(), plan.tables.data(), plan.tables.size() * sizeof(int32_t));
    memory = host.to(labels.device(), at::kInt, /*non_blocking=*/true);
  }
  const int32_t* table_memory = small ? nullptr : memory.const_data_ptr<int32_t>();

  // Rank buffers (B, N, C), ping-ponged.
  const at::ScalarType index_dtype = plan.index_bytes == 1 ? at::kByte : plan.index_bytes == 2 ? at::kShort : at::kInt;
  std::vector<at::Tensor> buffers;
  const int64_t entries = batch * vol.pixels * vol.classes;
  for (size_t p = 0; p + 1 < plan.passes.size() && p < 2; ++p) {
    buffers.push_back(at::empty({entries}, labels.options().dtype(index_dtype)));
  }

  const auto [final_chunks, final_chunk_pixels] = chunk_layout(batch, vol.pixels, /*capped=*/true);
  const auto [step_chunks, step_pixels] = chunk_layout(batch, vol.pixels, /*capped=*/false);
  check_grid(op, batch, step_chunks);
  MasksRun run;
  run.chunks = final_chunks;
  run.partial = at::empty({batch * final_chunks * (2 * vol.classes + 1)}, labels.options().dtype(at::kInt));
  const int64_t axis_strides[3] = {vol.height * vol.width, vol.width, 1};
  const int64_t axis_sizes[3] = {vol.depth, vol.height, vol.width};

  for (size_t p = 0; p < plan.passes.size(); ++p) {
    const PlannedPass& pass = plan.passes[p];
    const bool is_final = p + 1 == plan.passes.size();
    MaskPass mp{};
    mp.batch = batch;
    mp.chunks = is_final ? final_chunks : step_chunks;
    mp.chunk_pixels = is_final ? final_chunk_pixels : step_pixels;
    mp.axis_stride = axis_strides[pass.axis];
    mp.axis_size = axis_sizes[pass.axis];
    mp.reach = pass.reach;
    mp.table = pass.table;
    mp.list_size = pass.list_size;
    mp.pair_row = pass.pair_row;
    mp.finalize = is_final && finalize;
    mp.unit_batch = unit_batch;
    const dim3 grid(static_cast<unsigned>(batch * mp.chunks));
    void* out = p < 2 && !is_final ? buffers[p % 2].data_ptr() : nullptr;
    const void* in = p > 0 ? buffers[(p - 1) % 2].const_data_ptr() : nullptr;
    dispatch_index(plan.index_bytes, [&](auto index_type) {
      using index_t = typename decltype(index_type)::type;
      switch (pass.kind) {
        case kRankList:
          dbce_rank_first_kernel<uint8_t, true><<<grid, kThreads, 0, stream>>>(
              static_cast<uint8_t*>(out), params, table_memory, labels.const_data_ptr(), vol, mp);
          break;
        case kRankWindow:
          dbce_rank_first_kernel<index_t, false><<<grid, kThreads, 0, stream>>>(
              static_cast<index_t*>(out), params, table_memory, labels.const_data_ptr(), vol, mp);
          break;
        case kMiddle:
          dbce_rank_middle_kernel<index_t><<<grid, kThreads, 0, stream>>>(
              static_cast<index_t*>(out), static_cast<const index_t*>(in), params, table_memory, vol, mp);
          break;
        default:
          dispatch_mask(masks.scalar_type(), [&](auto mask_type) {
            using mask_t = typename decltype(mask_type)::type;
            mask_t* masks_ptr = static_cast<mask_t*>(masks.data_ptr());
            int32_t* partial = run.partial.mutable_data_ptr<int32_t>();
            if (pass.kind == kFinalList) {
              dbce_masks_final_kernel<mask_t, uint8_t, kFromList><<<grid, kThreads, 0, stream>>>(
                  masks_ptr, partial, class_weights, counters, params, table_memory, labels.const_data_ptr(),
                  nullptr, vol, mp);
            } else if (pass.kind == kFinalLabelsWindow) {
              dbce_masks_final_kernel<mask_t, uint8_t, kFromLabelsWindow><<<grid, kThreads, 0, stream>>>(
                  masks_ptr, partial, class_weights, counters, params, table_memory, labels.const_data_ptr(),
                  nullptr, vol, mp);
            } else {
              dbce_masks_final_kernel<mask_t, index_t, kFromRanks><<<grid, kThreads, 0, stream>>>(
                  masks_ptr, partial, class_weights, counters, params, table_memory, labels.const_data_ptr(),
                  static_cast<const index_t*>(in), vol, mp);
            }
          });
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return run;
}

// ------------------------------------------------------------------------------------------------ checks

void check_element(const char* op, int64_t num_classes, int64_t element, double radius,
                   at::ArrayRef<double> spacing) {
  TORCH_CHECK(num_classes >= 1 && num_classes <= K::MAX_MASK_CLASSES, op, ": num_classes must be in [1, ",
              K::MAX_MASK_CLASSES, "] (one bit per class in the mask), got ", num_classes);
  TORCH_CHECK(element == K::ELEMENT_BALL || element == K::ELEMENT_CUBE, op,
              ": element must be 0 (ball) or 1 (cube), got ", element);
  TORCH_CHECK(std::isfinite(radius) && radius >= 0.0, op, ": radius must be finite and >= 0, got ", radius);
  TORCH_CHECK(spacing.size() == 3, op, ": spacing must hold 3 voxel sizes (D, H, W), got ", spacing.size(),
              " values");
  for (const double s : spacing) {
    TORCH_CHECK(std::isfinite(s) && s > 0.0, op, ": spacing must be finite and > 0, got ", spacing);
  }
}

void check_labels(const char* op, const at::Tensor& labels) {
  TORCH_CHECK(labels.dim() == 4, op, ": labels must be 4-D (B, D, H, W), got shape ", labels.sizes());
  TORCH_CHECK(is_int_dtype(labels.scalar_type()), op, ": labels must be uint8, int8, int16, int32 or int64, got ",
              labels.scalar_type());
}

// The logits' rank and dtype (the class count is checked by the caller).
void check_logits(const char* op, const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be 3-D (B, C, S), got shape ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kHalf ||
                  logits.scalar_type() == at::kBFloat16,
              op, ": CUDA logits must be float32, bfloat16 or float16 (float64 runs on the CPU only), got ",
              logits.scalar_type());
}

void check_same_device(const char* op, const at::Tensor& logits,
                       std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors) {
  for (const auto& [name, tensor] : tensors) {
    TORCH_CHECK(tensor->device() == logits.device(), op, ": ", name, " must be on the logits' device (",
                logits.device(), "), got ", tensor->device());
  }
}

void check_class_weights(const char* op, const at::Tensor& class_weights, int64_t batch, int64_t classes) {
  TORCH_CHECK(class_weights.dim() == 2 && class_weights.size(0) == batch && class_weights.size(1) == classes, op,
              ": class_weights must have shape (B, C) = [", batch, ", ", classes, "], got ", class_weights.sizes());
  TORCH_CHECK(is_float_dtype(class_weights.scalar_type()), op,
              ": class_weights must be float32, float64, bfloat16 or float16, got ", class_weights.scalar_type());
}

// The dbce_loss ops' checks, in the CPU kernels' order and words (csrc/cpu/dbce_kernel.cpp).
void check_loss_inputs(const char* op, const at::Tensor& logits, const at::Tensor& labels, at::IntArrayRef codes,
                       at::ArrayRef<double> scalars) {
  TORCH_CHECK(static_cast<int64_t>(codes.size()) == K::DBCE_NUM_CODES, op, ": codes must have ", K::DBCE_NUM_CODES,
              " entries (the DBCE_CODE_* positions of torch_medloss._contract), got ", codes.size());
  TORCH_CHECK(static_cast<int64_t>(scalars.size()) == K::DBCE_NUM_SCALARS, op, ": scalars must have ",
              K::DBCE_NUM_SCALARS, " entries (the radius and the spacing along D, H, W), got ", scalars.size());
  check_logits(op, logits);
  TORCH_CHECK(labels.dim() == 4 && labels.size(0) == logits.size(0) &&
                  labels.size(1) * labels.size(2) * labels.size(3) == logits.size(2),
              op, ": labels must be (B, D, H, W) with B = ", logits.size(0), " and D H W = S = ", logits.size(2),
              " for logits of shape ", logits.sizes(), ", got ", labels.sizes());
  check_same_device(op, logits, {{"labels", &labels}});
  const int64_t reduction = codes[K::DBCE_CODE_REDUCTION];
  TORCH_CHECK(reduction >= K::REDUCTION_MEAN && reduction <= K::REDUCTION_NONE, op,
              ": codes[DBCE_CODE_REDUCTION] must be 0 (mean), 1 (sum) or 2 (none), got ", reduction);
  check_labels(op, labels);
  check_element(op, logits.size(1), codes[K::DBCE_CODE_ELEMENT], scalars[K::DBCE_SCALAR_RADIUS],
                scalars.slice(K::DBCE_SCALAR_SPACING, 3));
}

// ------------------------------------------------------------------------------------------ cross entropy

// The cross entropy's sizes and the strides of masks (B, S) and class_weights (B, C); the caller sets the rest.
CeProblem make_ce_problem(const at::Tensor& logits, const at::Tensor& masks, const at::Tensor& class_weights,
                          bool capped) {
  CeProblem pr{};
  pr.classes = logits.size(1);
  pr.pixels = logits.size(2);
  std::tie(pr.chunks, pr.chunk_pixels) = chunk_layout(logits.size(0), pr.pixels, capped);
  pr.x_b = logits.stride(0);
  pr.x_c = logits.stride(1);
  pr.x_s = logits.stride(2);
  pr.m_b = masks.stride(0);
  pr.m_s = masks.stride(1);
  pr.w_b = class_weights.stride(0);
  pr.w_c = class_weights.stride(1);
  pr.mask_type = value_type(masks.scalar_type());
  pr.weight_type = value_type(class_weights.scalar_type());
  return pr;
}

void launch_ce_fwd(const at::Tensor& logits, const void* labels, const at::Tensor& masks,
                   const at::Tensor& class_weights, const Volume& vol, const CeProblem& pr, float* partial, float* map,
                   float* loss, float* norm, int32_t* counters, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(logits.size(0) * pr.chunks));
  dispatch_logits(logits.scalar_type(), [&](auto type) {
    using scalar_t = typename decltype(type)::type;
    dbce_ce_fwd_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        partial, map, loss, norm, counters, logits.const_data_ptr<scalar_t>(), labels, masks.const_data_ptr(),
        class_weights.const_data_ptr(), vol, pr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_ce_bwd(at::Tensor& grad, const void* grad_sums, const void* grad_map, const void* norm,
                   const at::Tensor& logits, const void* labels, const at::Tensor& masks,
                   const at::Tensor& class_weights, const Volume& vol, const CeProblem& pr, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(logits.size(0) * pr.chunks));
  const int64_t classes = logits.size(1);
  dispatch_logits(logits.scalar_type(), [&](auto type) {
    using scalar_t = typename decltype(type)::type;
    const auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, 0, stream>>>(grad.mutable_data_ptr<scalar_t>(), grad_sums, grad_map, norm,
                                            logits.const_data_ptr<scalar_t>(), labels, masks.const_data_ptr(),
                                            class_weights.const_data_ptr(), vol, pr);
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
}

// Labels (B, S) of the piece ops as a (B, 1, 1, S) volume.
Volume flat_volume(const at::Tensor& labels, int64_t classes, int64_t ignore_index) {
  return make_volume(labels.unsqueeze(1).unsqueeze(1), classes, ignore_index);
}

// ------------------------------------------------------------------------------------------------- the ops

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dbce_loss_fwd_cuda(const at::Tensor& logits,
                                                                              const at::Tensor& labels,
                                                                              at::IntArrayRef codes,
                                                                              at::ArrayRef<double> scalars) {
  constexpr const char* op = "torch_medloss::dbce_loss_fwd";
  check_loss_inputs(op, logits, labels, codes, scalars);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const int64_t batch = logits.size(0);
  const int64_t classes = logits.size(1);
  const int64_t pixels = logits.size(2);
  const bool none = codes[K::DBCE_CODE_REDUCTION] == K::REDUCTION_NONE;
  const at::TensorOptions options = logits.options().dtype(at::kFloat);
  at::Tensor loss = none ? at::empty({batch, pixels}, options) : at::empty({}, options);
  at::Tensor masks = at::empty({batch, pixels}, logits.options().dtype(mask_dtype(classes)));
  at::Tensor class_weights = at::empty({batch, classes}, options);
  at::Tensor norm = at::empty({1}, options);
  if (batch == 0 || pixels == 0) {
    // Nothing is valid: the mean is 0 (reference.dbce.reduce_weighted's clamped normalizer), the sum 0.
    loss.zero_();
    class_weights.zero_();
    norm.zero_();
    return {loss, masks, class_weights, norm};
  }
  const int64_t ignore_index = codes[K::DBCE_CODE_IGNORE_INDEX];
  const Volume vol = make_volume(labels, classes, ignore_index);
  const int64_t sizes[3] = {vol.depth, vol.height, vol.width};
  const Plan plan = make_plan(make_element(codes[K::DBCE_CODE_ELEMENT], scalars[K::DBCE_SCALAR_RADIUS],
                                           scalars.slice(K::DBCE_SCALAR_SPACING, 3), sizes));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // The launches' tickets and the invalid count: the one op besides the kernels.
  at::Tensor counters = at::zeros({kNumCounters}, logits.options().dtype(at::kInt));
  run_masks(op, labels, vol, plan, masks, class_weights.mutable_data_ptr<float>(),
            counters.mutable_data_ptr<int32_t>(), /*finalize=*/true, codes[K::DBCE_CODE_BATCH] != 0, stream);

  CeProblem pr = make_ce_problem(logits, masks, class_weights, /*capped=*/true);
  check_grid(op, batch, pr.chunks);
  pr.write_map = none;
  pr.map_b = pixels;
  pr.finalize = true;
  pr.mean = codes[K::DBCE_CODE_REDUCTION] == K::REDUCTION_MEAN;
  at::Tensor partial = at::empty({batch * pr.chunks * 2}, options);
  launch_ce_fwd(logits, labels.const_data_ptr(), masks, class_weights, vol, pr, partial.mutable_data_ptr<float>(),
                none ? loss.mutable_data_ptr<float>() : nullptr, none ? nullptr : loss.mutable_data_ptr<float>(),
                norm.mutable_data_ptr<float>(), counters.mutable_data_ptr<int32_t>(), stream);
  return {loss, masks, class_weights, norm};
}

at::Tensor dbce_loss_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& masks, const at::Tensor& class_weights,
                              const at::Tensor& norm, const at::Tensor& logits, const at::Tensor& labels,
                              at::IntArrayRef codes, at::ArrayRef<double> scalars) {
  constexpr const char* op = "torch_medloss::dbce_loss_bwd";
  check_loss_inputs(op, logits, labels, codes, scalars);
  const int64_t batch = logits.size(0);
  const int64_t classes = logits.size(1);
  const int64_t pixels = logits.size(2);
  const bool none = codes[K::DBCE_CODE_REDUCTION] == K::REDUCTION_NONE;
  const std::vector<int64_t> shape = none ? std::vector<int64_t>{batch, pixels} : std::vector<int64_t>{};
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
  check_same_device(op, logits, {{"grad_loss", &grad_loss}, {"masks", &masks}, {"class_weights", &class_weights},
                                 {"norm", &norm}});
  const c10::cuda::CUDAGuard device_guard(logits.device());
  at::Tensor grad = at::empty_like(logits);
  if (logits.numel() == 0) {
    return grad;
  }
  const Volume vol = make_volume(labels, classes, codes[K::DBCE_CODE_IGNORE_INDEX]);
  CeProblem pr = make_ce_problem(logits, masks, class_weights, /*capped=*/false);
  check_grid(op, batch, pr.chunks);
  pr.g_b = grad.stride(0);
  pr.g_c = grad.stride(1);
  pr.g_s = grad.stride(2);
  pr.with_sum = !none;
  pr.scaled = !none;
  pr.s_b = 0;
  pr.sums_type = value_type(grad_loss.scalar_type());
  pr.write_map = none;
  pr.map_type = value_type(grad_loss.scalar_type());
  pr.u_b = none ? grad_loss.stride(0) : 0;
  pr.u_s = none ? grad_loss.stride(1) : 0;
  pr.norm_type = value_type(norm.scalar_type());
  launch_ce_bwd(grad, none ? nullptr : grad_loss.const_data_ptr(), none ? grad_loss.const_data_ptr() : nullptr,
                norm.const_data_ptr(), logits, labels.const_data_ptr(), masks, class_weights, vol, pr,
                c10::cuda::getCurrentCUDAStream());
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dbce_masks_cuda(const at::Tensor& labels,
                                                                          int64_t num_classes, int64_t ignore_index,
                                                                          int64_t element, double radius,
                                                                          at::ArrayRef<double> spacing) {
  constexpr const char* op = "torch_medloss::dbce_masks";
  check_labels(op, labels);
  check_element(op, num_classes, element, radius, spacing);
  const c10::cuda::CUDAGuard device_guard(labels.device());
  const int64_t batch = labels.size(0);
  const at::TensorOptions long_options = labels.options().dtype(at::kLong);
  at::Tensor masks = at::empty(labels.sizes(), labels.options().dtype(mask_dtype(num_classes)));
  if (labels.numel() == 0) {
    return {masks, at::zeros({batch, num_classes}, long_options), at::zeros({batch, num_classes}, long_options),
            at::zeros({batch}, long_options)};
  }
  const Volume vol = make_volume(labels, num_classes, ignore_index);
  const int64_t sizes[3] = {vol.depth, vol.height, vol.width};
  const Plan plan = make_plan(make_element(element, radius, spacing, sizes));
  const MasksRun run = run_masks(op, labels, vol, plan, masks, nullptr, nullptr, /*finalize=*/false,
                                 /*unit_batch=*/false, c10::cuda::getCurrentCUDAStream());
  // Integer sums of the blocks' rows: exact, so deterministic.
  const at::Tensor totals = run.partial.view({batch, run.chunks, 2 * num_classes + 1}).sum(at::IntArrayRef{1}, false, at::kLong);
  return {masks, totals.narrow(1, 0, num_classes).clone(), totals.narrow(1, num_classes, num_classes).clone(),
          totals.select(1, 2 * num_classes).clone()};
}

void check_ce_inputs(const char* op, const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& masks,
                     const at::Tensor& class_weights) {
  check_logits(op, logits);
  TORCH_CHECK(logits.size(1) >= 1 && logits.size(1) <= K::MAX_MASK_CLASSES, op, ": logits must have between 1 and ",
              K::MAX_MASK_CLASSES, " classes (one mask bit per class), got shape ", logits.sizes());
  const int64_t batch = logits.size(0);
  const int64_t pixels = logits.size(2);
  for (const auto& [name, tensor] : {std::pair<const char*, const at::Tensor*>{"labels", &labels},
                                     std::pair<const char*, const at::Tensor*>{"masks", &masks}}) {
    TORCH_CHECK(tensor->dim() == 2 && tensor->size(0) == batch && tensor->size(1) == pixels, op, ": ", name,
                " must have shape (B, S) = [", batch, ", ", pixels, "], got ", tensor->sizes());
    TORCH_CHECK(is_int_dtype(tensor->scalar_type()), op, ": ", name,
                " must be uint8, int8, int16, int32 or int64, got ", tensor->scalar_type());
  }
  check_class_weights(op, class_weights, batch, logits.size(1));
  check_same_device(op, logits, {{"labels", &labels}, {"masks", &masks}, {"class_weights", &class_weights}});
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
  const Volume vol = flat_volume(labels, logits.size(1), ignore_index);
  CeProblem pr = make_ce_problem(logits, masks, class_weights, /*capped=*/true);
  check_grid(op, batch, pr.chunks);
  pr.write_map = write_map;
  pr.map_b = pixels;
  at::Tensor partial = at::empty({batch, pr.chunks, 2}, options);
  launch_ce_fwd(logits, labels.const_data_ptr(), masks, class_weights, vol, pr, partial.mutable_data_ptr<float>(),
                write_map ? map.mutable_data_ptr<float>() : nullptr, nullptr, nullptr, nullptr,
                c10::cuda::getCurrentCUDAStream());
  // torch's CUDA sum is deterministic (a fixed reduction tree, no atomics).
  return {pr.chunks == 1 ? partial.view({batch, 2}) : partial.sum(1), map};
}

at::Tensor dbce_ce_bwd_cuda(const at::Tensor& grad_sums, const at::Tensor& grad_map, const at::Tensor& logits,
                            const at::Tensor& labels, const at::Tensor& masks, const at::Tensor& class_weights,
                            int64_t ignore_index, bool write_map) {
  constexpr const char* op = "torch_medloss::dbce_ce_bwd";
  check_ce_inputs(op, logits, labels, masks, class_weights);
  const int64_t batch = logits.size(0);
  const int64_t pixels = logits.size(2);
  TORCH_CHECK(grad_sums.dim() == 2 && grad_sums.size(0) == batch && grad_sums.size(1) == 2, op,
              ": grad_sums must have shape (B, 2) = [", batch, ", 2], got ", grad_sums.sizes());
  TORCH_CHECK(is_float_dtype(grad_sums.scalar_type()), op,
              ": grad_sums must be float32, float64, bfloat16 or float16, got ", grad_sums.scalar_type());
  if (write_map) {
    TORCH_CHECK(grad_map.dim() == 2 && grad_map.size(0) == batch && grad_map.size(1) == pixels, op,
                ": grad_map must have shape (B, S) = [", batch, ", ", pixels, "] when write_map, got ",
                grad_map.sizes());
    TORCH_CHECK(is_float_dtype(grad_map.scalar_type()), op,
                ": grad_map must be float32, float64, bfloat16 or float16, got ", grad_map.scalar_type());
    check_same_device(op, logits, {{"grad_map", &grad_map}});
  }
  check_same_device(op, logits, {{"grad_sums", &grad_sums}});
  const c10::cuda::CUDAGuard device_guard(logits.device());
  // Same strides as the logits for a dense, non-overlapping layout (channels_last stays channels_last).
  at::Tensor grad = at::empty_like(logits);
  if (logits.numel() == 0) {
    return grad;
  }
  const Volume vol = flat_volume(labels, logits.size(1), ignore_index);
  CeProblem pr = make_ce_problem(logits, masks, class_weights, /*capped=*/false);
  check_grid(op, batch, pr.chunks);
  pr.g_b = grad.stride(0);
  pr.g_c = grad.stride(1);
  pr.g_s = grad.stride(2);
  pr.with_sum = true;
  pr.s_b = grad_sums.stride(0);
  pr.sums_type = value_type(grad_sums.scalar_type());
  pr.write_map = write_map;
  if (write_map) {
    pr.map_type = value_type(grad_map.scalar_type());
    pr.u_b = grad_map.stride(0);
    pr.u_s = grad_map.stride(1);
  }
  launch_ce_bwd(grad, grad_sums.const_data_ptr(), write_map ? grad_map.const_data_ptr() : nullptr, nullptr, logits,
                labels.const_data_ptr(), masks, class_weights, vol, pr, c10::cuda::getCurrentCUDAStream());
  return grad;
}

}  // namespace
}  // namespace dbce_cuda

TORCH_LIBRARY_IMPL(torch_medloss, CUDA, m) {
  m.impl("dbce_loss_fwd", &dbce_cuda::dbce_loss_fwd_cuda);
  m.impl("dbce_loss_bwd", &dbce_cuda::dbce_loss_bwd_cuda);
  m.impl("dbce_masks", &dbce_cuda::dbce_masks_cuda);
  m.impl("dbce_ce_fwd", &dbce_cuda::dbce_ce_fwd_cuda);
  m.impl("dbce_ce_bwd", &dbce_cuda::dbce_ce_bwd_cuda);
}

}  // namespace torch_medloss
