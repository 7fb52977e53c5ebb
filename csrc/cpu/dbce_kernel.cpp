// CPU kernels of torch_medloss::dbce_masks, dbce_ce_fwd and dbce_ce_bwd (schema and contract in csrc/dbce.cpp; the
// ground truth is torch_medloss/reference/dbce_ops.py).
//
// dbce_masks, per image. The labels (any dtype and strides) are first copied into a compact int32 map: the label
// where it is valid, -1 where it is ignored or invalid; the same pass counts |M_c|, the invalid labels and each
// class's bounding box. The dilation is then separable:
//
//   cube: max_k |o_k s_k| <= R is a box of half-widths r_k, so D_c is three 1-D ORs of a 64-bit mask holding
//         1 << label at the valid pixels (along W, then H, then D), and-ed with the valid pixels at the end.
//   ball: sum_k (o_k s_k)^2 <= R^2 (1 + 1e-9) is an ellipsoid. For each present class, a truncated squared-distance
//         transform in double: along D, a(i) = min (k s_D)^2 over the members at offsets k; along H, b(i) =
//         min a(i + k e_H) + (k s_H)^2; along W, d(i) = min b(i + k e_W) + (k s_W)^2; bit c is set where i is valid
//         and d(i) <= R^2 (1 + 1e-9). Adding the terms in the reference's order (D, H, W) and taking minima, which
//         commute with a rounded addition of a constant, gives d(i) = the smallest of the reference's own rounded
//         sums over the members within the element's extents, so the boundary test is bitwise the reference's
//         (squares are x * x, which is what CPython's x ** 2 rounds to; Python >= 3.12 sums with compensation, which
//         can differ only within ~1e-16 of the limit, far inside its 1e-9 tolerance). Each pass is restricted to
//         the class's bounding box grown by the reach, so a small class costs little.
//
// Each pass is a loop over output rows (d, h) whose inner loop runs along W with unit stride, so it vectorises. The
// cost is O(pixels * (2 r + 1)) per pass and class: radius 10 costs about 3x radius 3 (21 vs 7 window taps).
// Images of fewer than kSmallImage pixels (or a batch with at least as many images as threads) run one image per
// task; larger ones run image after image with their rows spread over the threads. The masks are exact (minima,
// ORs, integer counts), so they do not depend on the split or on the thread count.
//
// dbce_ce_fwd / dbce_ce_bwd: one at::parallel_for task per (image, chunk of kChunkPixels pixels), as in
// dice_sums_kernel.cpp. Inside a task the logits go through class-major tiles of kTilePixels pixels (C <= 64, so a
// tile is at most 4096 elements), gathered along the smaller stride (pixels for NCHW, classes for channels_last).
// The forward writes one partial row (sum w CE, sum w) per task from per-lane sums; the rows of an image are added
// in chunk order, so the sums are bitwise the same for any thread count. exp and log are std::exp / std::log
// (scalar glibc calls: the project has no shared vector exp; dice_sums_kernel.cpp uses std::exp too).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

// Elementwise loops over rows that never alias (see dice_sums_kernel.cpp); no reductions, so no result changes.
#define MEDLOSS_SIMD _Pragma("omp simd")

namespace torch_medloss {
namespace {

constexpr int64_t kElementBall = 0, kElementCube = 1;
constexpr int64_t kMaxClasses = 64;  // one bit per class in an int64 mask
// The reference's relative tolerance on the element's boundary (torch_medloss/reference/dbce.py).
constexpr double kBoundaryTolerance = 1e-9;
// Images below this many pixels run one per task (rows of one image would be too little work per task).
constexpr int64_t kSmallImage = int64_t{1} << 16;
// Pixels of rows per task when the rows of one image are spread over the threads.
constexpr int64_t kRowTaskPixels = 4096;
// Cross entropy: pixels per task (a constant, never derived from the thread count) and per tile.
constexpr int64_t kChunkPixels = 8192;
constexpr int64_t kTilePixels = 64;
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

// Runs fn(begin, end) over [begin, end), on the threads when parallel, else here.
template <typename Fn>
void for_range(bool parallel, int64_t begin, int64_t end, int64_t grain, const Fn& fn) {
  if (begin >= end) {
    return;
  }
  if (parallel) {
    at::parallel_for(begin, end, grain, fn);
  } else {
    fn(begin, end);
  }
}

// ============================================================================================================ masks

struct MaskParams {
  int64_t classes;
  int64_t ignore_index;
  int64_t element;
  int64_t dims[3];   // D, H, W
  int64_t reach[3];  // half-width of the element along D, H, W (within the image)
  double limit;      // ball: R^2 (1 + 1e-9)
  std::vector<double> square[3];  // ball: (k s)^2 for k = 0 .. reach
};

MaskParams make_params(const at::Tensor& labels, int64_t classes, int64_t ignore_index, int64_t element,
                       double radius, const std::vector<double>& spacing) {
  MaskParams p;
  p.classes = classes;
  p.ignore_index = ignore_index;
  p.element = element;
  const double widened = radius * (1 + kBoundaryTolerance);
  p.limit = radius * radius * (1 + kBoundaryTolerance);
  for (int k = 0; k < 3; ++k) {
    const int64_t dim = labels.size(k + 1);
    p.dims[k] = dim;
    // The reference's extent floor(R / s (1 + 1e-9)), clamped to the image before the conversion to an integer.
    const double extent = std::floor(radius / spacing[k] * (1 + kBoundaryTolerance));
    int64_t reach = static_cast<int64_t>(std::min(extent, static_cast<double>(std::max<int64_t>(dim - 1, 0))));
    if (element == kElementCube) {
      // The reference also tests |o s| <= R (1 + 1e-9) itself; keep the offsets that pass it.
      while (reach > 0 && !(static_cast<double>(reach) * spacing[k] <= widened)) {
        --reach;
      }
    } else {
      p.square[k].resize(reach + 1);
      for (int64_t o = 0; o <= reach; ++o) {
        const double length = static_cast<double>(o) * spacing[k];
        p.square[k][o] = length * length;
      }
    }
    p.reach[k] = reach;
  }
  return p;
}

// Inclusive bounding box of a class's members: lo[k] > hi[k] when the class is absent.
struct Box {
  int64_t lo[3];
  int64_t hi[3];
};

// The working buffers of one image (the compact labels, the 64-bit masks and two planes of scratch).
struct Workspace {
  std::vector<int32_t> lab;      // label where valid, else -1
  std::vector<uint64_t> bits;    // the masks being built
  std::vector<uint64_t> or_tmp;  // cube: one pass's output
  std::vector<double> dist0, dist1;
  void reserve(const MaskParams& p, int64_t pixels) {
    lab.resize(pixels);
    bits.resize(pixels);
    if (p.element == kElementCube) {
      or_tmp.resize(pixels);
    } else {
      dist0.resize(pixels);
      dist1.resize(pixels);
    }
  }
};

// Per-image statistics gathered with the compact labels.
struct ImageStats {
  std::vector<int64_t> counts;  // (C,)
  int64_t invalid = 0;
  std::vector<Box> boxes;       // (C,)
};

// Copies image b's labels into ws.lab and gathers its counts, invalid count and class boxes. Rows (d, h) in chunks.
template <typename label_t>
void load_labels(const MaskParams& p, const label_t* image, const int64_t* strides, Workspace& ws, ImageStats& st,
                 bool parallel) {
  const int64_t D = p.dims[0], H = p.dims[1], W = p.dims[2];
  const int64_t C = p.classes;
  const int64_t rows = D * H;
  const int64_t rows_per_chunk = std::max<int64_t>(1, kRowTaskPixels / std::max<int64_t>(W, 1));
  const int64_t chunks = ceil_div(rows, rows_per_chunk);
  // Per chunk: C counts, 1 invalid, 6 C box bounds (integers: the order of the merge does not matter).
  const int64_t row_size = C + 1 + 6 * C;
  std::vector<int64_t> partial(chunks * row_size);
  for_range(parallel, 0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t chunk = first; chunk < last; ++chunk) {
      int64_t* counts = partial.data() + chunk * row_size;
      int64_t* invalid = counts + C;
      int64_t* box = invalid + 1;  // lo d, h, w, hi d, h, w per class
      for (int64_t c = 0; c < C; ++c) {
        counts[c] = 0;
        box[6 * c + 0] = box[6 * c + 1] = box[6 * c + 2] = std::numeric_limits<int64_t>::max();
        box[6 * c + 3] = box[6 * c + 4] = box[6 * c + 5] = -1;
      }
      *invalid = 0;
      const int64_t row_end = std::min(rows, (chunk + 1) * rows_per_chunk);
      for (int64_t row = chunk * rows_per_chunk; row < row_end; ++row) {
        const int64_t d = row / H, h = row % H;
        const label_t* src = image + d * strides[0] + h * strides[1];
        int32_t* dst = ws.lab.data() + row * W;
        for (int64_t w = 0; w < W; ++w) {
          const int64_t label = static_cast<int64_t>(src[w * strides[2]]);
          // One unsigned comparison rejects both label < 0 and label >= C.
          const bool in_range = static_cast<uint64_t>(label) < static_cast<uint64_t>(C);
          const bool ignored = label == p.ignore_index;
          if (in_range && !ignored) {
            dst[w] = static_cast<int32_t>(label);
            ++counts[label];
            int64_t* b = box + 6 * label;
            b[0] = std::min(b[0], d);
            b[1] = std::min(b[1], h);
            b[2] = std::min(b[2], w);
            b[3] = std::max(b[3], d);
            b[4] = std::max(b[4], h);
            b[5] = std::max(b[5], w);
          } else {
            dst[w] = -1;
            *invalid += ignored ? 0 : 1;
          }
        }
      }
    }
  });
  st.counts.assign(C, 0);
  st.invalid = 0;
  st.boxes.assign(C, Box{{std::numeric_limits<int64_t>::max(), std::numeric_limits<int64_t>::max(),
                          std::numeric_limits<int64_t>::max()},
                         {-1, -1, -1}});
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t* counts = partial.data() + chunk * row_size;
    const int64_t* box = counts + C + 1;
    st.invalid += counts[C];
    for (int64_t c = 0; c < C; ++c) {
      st.counts[c] += counts[c];
      for (int k = 0; k < 3; ++k) {
        st.boxes[c].lo[k] = std::min(st.boxes[c].lo[k], box[6 * c + k]);
        st.boxes[c].hi[k] = std::max(st.boxes[c].hi[k], box[6 * c + 3 + k]);
      }
    }
  }
}

// Rows per task for rows of W pixels.
int64_t row_grain(int64_t W) {
  return std::max<int64_t>(1, kRowTaskPixels / std::max<int64_t>(W, 1));
}

// cube: bits = OR over the box of (1 << label) at valid pixels, and-ed with the valid pixels.
void dilate_cube(const MaskParams& p, Workspace& ws, bool parallel) {
  const int64_t D = p.dims[0], H = p.dims[1], W = p.dims[2];
  const int64_t HW = H * W;
  const int64_t rd = p.reach[0], rh = p.reach[1], rw = p.reach[2];
  const int32_t* lab = ws.lab.data();
  uint64_t* a = ws.bits.data();
  uint64_t* b = ws.or_tmp.data();
  const int64_t grain = row_grain(W);
  // Along W: lab -> b.
  for_range(parallel, 0, D * H, grain, [&](int64_t first, int64_t last) {
    std::vector<uint64_t> one(W);
    for (int64_t row = first; row < last; ++row) {
      const int32_t* in = lab + row * W;
      MEDLOSS_SIMD
      for (int64_t w = 0; w < W; ++w) {
        one[w] = in[w] >= 0 ? uint64_t{1} << (static_cast<uint32_t>(in[w]) & 63u) : uint64_t{0};
      }
      uint64_t* out = b + row * W;
      std::copy(one.begin(), one.end(), out);
      for (int64_t k = 1; k <= rw; ++k) {
        MEDLOSS_SIMD
        for (int64_t w = 0; w < W - k; ++w) {
          out[w] |= one[w + k];
        }
        MEDLOSS_SIMD
        for (int64_t w = k; w < W; ++w) {
          out[w] |= one[w - k];
        }
      }
    }
  });
  // Along H: b -> a.
  for_range(parallel, 0, D * H, grain, [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      const int64_t d = row / H, h = row % H;
      uint64_t* out = a + row * W;
      std::fill(out, out + W, uint64_t{0});
      for (int64_t k = std::max<int64_t>(-rh, -h); k <= std::min<int64_t>(rh, H - 1 - h); ++k) {
        const uint64_t* in = b + d * HW + (h + k) * W;
        MEDLOSS_SIMD
        for (int64_t w = 0; w < W; ++w) {
          out[w] |= in[w];
        }
      }
    }
  });
  // Along D: a -> b, then and-ed with the valid pixels into a (= ws.bits).
  for_range(parallel, 0, D * H, grain, [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      const int64_t d = row / H, h = row % H;
      uint64_t* out = b + row * W;
      std::fill(out, out + W, uint64_t{0});
      for (int64_t k = std::max<int64_t>(-rd, -d); k <= std::min<int64_t>(rd, D - 1 - d); ++k) {
        const uint64_t* in = a + (d + k) * HW + h * W;
        MEDLOSS_SIMD
        for (int64_t w = 0; w < W; ++w) {
          out[w] |= in[w];
        }
      }
    }
  });
  for_range(parallel, 0, D * H, grain, [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      const int32_t* valid = lab + row * W;
      const uint64_t* in = b + row * W;
      uint64_t* out = a + row * W;
      MEDLOSS_SIMD
      for (int64_t w = 0; w < W; ++w) {
        out[w] = valid[w] >= 0 ? in[w] : uint64_t{0};
      }
    }
  });
}

// ball: for each present class, the truncated squared-distance transform over its grown box; sets bit c in ws.bits.
void dilate_ball(const MaskParams& p, const ImageStats& st, Workspace& ws, bool parallel) {
  const int64_t H = p.dims[1], W = p.dims[2];
  const int64_t HW = H * W;
  const double inf = std::numeric_limits<double>::infinity();
  const int32_t* lab = ws.lab.data();
  double* m = ws.dist0.data();
  double* a = ws.dist1.data();
  std::fill(ws.bits.begin(), ws.bits.end(), uint64_t{0});
  const int64_t grain = row_grain(W);
  for (int64_t c = 0; c < p.classes; ++c) {
    if (st.counts[c] == 0) {
      continue;  // D_c is empty
    }
    const Box& box = st.boxes[c];
    int64_t lo[3], hi[3];  // the box grown by the reach, inside the image
    for (int k = 0; k < 3; ++k) {
      lo[k] = std::max<int64_t>(0, box.lo[k] - p.reach[k]);
      hi[k] = std::min<int64_t>(p.dims[k] - 1, box.hi[k] + p.reach[k]);
    }
    const int64_t w0 = box.lo[2], wn = box.hi[2] - box.lo[2] + 1;  // member columns
    const int32_t cls = static_cast<int32_t>(c);
    // 0. m = 0 at the members, inf elsewhere, over the member box.
    const int64_t member_rows_h = box.hi[1] - box.lo[1] + 1;
    for_range(parallel, 0, (box.hi[0] - box.lo[0] + 1) * member_rows_h, grain, [&](int64_t first, int64_t last) {
      for (int64_t r = first; r < last; ++r) {
        const int64_t offset = (box.lo[0] + r / member_rows_h) * HW + (box.lo[1] + r % member_rows_h) * W + w0;
        const int32_t* in = lab + offset;
        double* out = m + offset;
        MEDLOSS_SIMD
        for (int64_t w = 0; w < wn; ++w) {
          out[w] = in[w] == cls ? 0.0 : inf;
        }
      }
    });
    // 1. Along D: a = min_k m(d + k) + (k s_D)^2, rows d in the grown range, h in the member range.
    const std::vector<double>& sd = p.square[0];
    const int64_t rd = p.reach[0];
    for_range(parallel, 0, (hi[0] - lo[0] + 1) * member_rows_h, grain, [&](int64_t first, int64_t last) {
      for (int64_t r = first; r < last; ++r) {
        const int64_t d = lo[0] + r / member_rows_h, h = box.lo[1] + r % member_rows_h;
        double* out = a + d * HW + h * W + w0;
        std::fill(out, out + wn, inf);
        const int64_t k_first = std::max(-rd, box.lo[0] - d), k_last = std::min(rd, box.hi[0] - d);
        for (int64_t k = k_first; k <= k_last; ++k) {
          const double* in = m + (d + k) * HW + h * W + w0;
          const double add = sd[k < 0 ? -k : k];
          MEDLOSS_SIMD
          for (int64_t w = 0; w < wn; ++w) {
            const double v = in[w] + add;
            out[w] = v < out[w] ? v : out[w];
          }
        }
      }
    });
    // 2. Along H: m = min_k a(h + k) + (k s_H)^2, rows d, h in the grown ranges (m is free again).
    const std::vector<double>& sh = p.square[1];
    const int64_t rh = p.reach[1];
    const int64_t grown_rows_h = hi[1] - lo[1] + 1;
    for_range(parallel, 0, (hi[0] - lo[0] + 1) * grown_rows_h, grain, [&](int64_t first, int64_t last) {
      for (int64_t r = first; r < last; ++r) {
        const int64_t d = lo[0] + r / grown_rows_h, h = lo[1] + r % grown_rows_h;
        double* out = m + d * HW + h * W + w0;
        std::fill(out, out + wn, inf);
        const int64_t k_first = std::max(-rh, box.lo[1] - h), k_last = std::min(rh, box.hi[1] - h);
        for (int64_t k = k_first; k <= k_last; ++k) {
          const double* in = a + d * HW + (h + k) * W + w0;
          const double add = sh[k < 0 ? -k : k];
          MEDLOSS_SIMD
          for (int64_t w = 0; w < wn; ++w) {
            const double v = in[w] + add;
            out[w] = v < out[w] ? v : out[w];
          }
        }
      }
    });
    // 3. Along W: dist = min_k m(w + k) + (k s_W)^2 over the grown columns; bit c where valid and dist <= limit.
    const std::vector<double>& sw = p.square[2];
    const int64_t rw = p.reach[2];
    const int64_t cols = hi[2] - lo[2] + 1;
    const double limit = p.limit;
    const uint64_t bit = uint64_t{1} << c;
    for_range(parallel, 0, (hi[0] - lo[0] + 1) * grown_rows_h, grain, [&](int64_t first, int64_t last) {
      std::vector<double> dist(cols);
      for (int64_t r = first; r < last; ++r) {
        const int64_t d = lo[0] + r / grown_rows_h, h = lo[1] + r % grown_rows_h;
        const int64_t row = d * HW + h * W;
        std::fill(dist.begin(), dist.end(), inf);
        double* out = dist.data();
        for (int64_t k = -rw; k <= rw; ++k) {
          // Output columns w in [lo, hi] whose source w + k lies among the member columns.
          const int64_t first_w = std::max(lo[2], box.lo[2] - k), last_w = std::min(hi[2], box.hi[2] - k);
          if (first_w > last_w) {
            continue;
          }
          const double* in = m + row + k;
          const double add = sw[k < 0 ? -k : k];
          MEDLOSS_SIMD
          for (int64_t w = first_w; w <= last_w; ++w) {
            const double v = in[w] + add;
            out[w - lo[2]] = v < out[w - lo[2]] ? v : out[w - lo[2]];
          }
        }
        const int32_t* valid = lab + row + lo[2];
        uint64_t* bits = ws.bits.data() + row + lo[2];
        MEDLOSS_SIMD
        for (int64_t w = 0; w < cols; ++w) {
          bits[w] |= (valid[w] >= 0 && out[w] <= limit) ? bit : uint64_t{0};
        }
      }
    });
  }
}

// Writes ws.bits to the image's masks (mask dtype) and counts |D_c| into areas.
template <typename mask_t>
void store_masks(const MaskParams& p, const Workspace& ws, mask_t* out, int64_t* areas, bool parallel) {
  const int64_t W = p.dims[2];
  const int64_t rows = p.dims[0] * p.dims[1];
  const int64_t C = p.classes;
  const int64_t rows_per_chunk = row_grain(W);
  const int64_t chunks = ceil_div(rows, rows_per_chunk);
  std::vector<int64_t> partial(chunks * C, 0);
  for_range(parallel, 0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t chunk = first; chunk < last; ++chunk) {
      int64_t* count = partial.data() + chunk * C;
      const int64_t begin = chunk * rows_per_chunk * W, end = std::min(rows, (chunk + 1) * rows_per_chunk) * W;
      const uint64_t* in = ws.bits.data();
      MEDLOSS_SIMD
      for (int64_t i = begin; i < end; ++i) {
        out[i] = static_cast<mask_t>(in[i]);
      }
      for (int64_t i = begin; i < end; ++i) {
        for (uint64_t bits = in[i]; bits != 0; bits &= bits - 1) {
          ++count[__builtin_ctzll(bits)];
        }
      }
    }
  });
  std::fill(areas, areas + C, int64_t{0});
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    for (int64_t c = 0; c < C; ++c) {
      areas[c] += partial[chunk * C + c];
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dbce_masks_cpu(const at::Tensor& labels,
                                                                          int64_t num_classes, int64_t ignore_index,
                                                                          int64_t element, double radius,
                                                                          at::ArrayRef<double> spacing) {
  constexpr const char* op = "torch_medloss::dbce_masks";
  TORCH_CHECK(labels.dim() == 4, op, ": labels must be 4-D (B, D, H, W), got shape ", labels.sizes());
  TORCH_CHECK(is_label_dtype(labels.scalar_type()), op, ": labels must be uint8, int8, int16, int32 or int64, got ",
              labels.scalar_type());
  TORCH_CHECK(num_classes >= 1 && num_classes <= kMaxClasses, op, ": num_classes must be in [1, ", kMaxClasses,
              "] (one bit per class in the mask), got ", num_classes);
  TORCH_CHECK(element == kElementBall || element == kElementCube, op,
              ": element must be 0 (ball) or 1 (cube), got ", element);
  TORCH_CHECK(std::isfinite(radius) && radius >= 0, op, ": radius must be finite and >= 0, got ", radius);
  TORCH_CHECK(spacing.size() == 3, op, ": spacing must hold 3 voxel sizes (D, H, W), got ", spacing.size(),
              " values");
  for (double s : spacing) {
    TORCH_CHECK(std::isfinite(s) && s > 0, op, ": spacing must be finite and > 0, got ", spacing);
  }
  TORCH_CHECK(labels.size(2) * labels.size(3) <= INT32_MAX, op,
              ": labels must have at most 2**31 - 1 pixels per slice (H * W), got shape ", labels.sizes());

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
  const MaskParams p = make_params(labels, C, ignore_index, element, radius, spacing.vec());
  const int64_t strides[3] = {labels.stride(1), labels.stride(2), labels.stride(3)};
  int64_t* counts_out = counts.mutable_data_ptr<int64_t>();
  int64_t* areas_out = areas.mutable_data_ptr<int64_t>();
  int64_t* invalid_out = invalid.mutable_data_ptr<int64_t>();

  AT_DISPATCH_INTEGRAL_TYPES(labels.scalar_type(), "dbce_masks_cpu", [&] {
    using label_t = scalar_t;
    const label_t* data = labels.const_data_ptr<label_t>();
    const int64_t stride_b = labels.stride(0);
    AT_DISPATCH_INTEGRAL_TYPES(masks.scalar_type(), "dbce_masks_cpu", [&] {
      using mask_t = scalar_t;
      mask_t* out = masks.mutable_data_ptr<mask_t>();
      // One image: parallel spreads its rows over the threads, else it runs on this thread.
      const auto image = [&](int64_t b, Workspace& ws, ImageStats& st, bool parallel) {
        load_labels(p, data + b * stride_b, strides, ws, st, parallel);
        if (p.element == kElementCube) {
          dilate_cube(p, ws, parallel);
        } else {
          dilate_ball(p, st, ws, parallel);
        }
        store_masks(p, ws, out + b * pixels, areas_out + b * C, parallel);
        std::copy(st.counts.begin(), st.counts.end(), counts_out + b * C);
        invalid_out[b] = st.invalid;
      };
      const bool per_image = batch > 1 && (pixels < kSmallImage || batch >= at::get_num_threads());
      if (per_image) {
        at::parallel_for(0, batch, 1, [&](int64_t first, int64_t last) {
          Workspace ws;
          ws.reserve(p, pixels);
          ImageStats st;
          for (int64_t b = first; b < last; ++b) {
            image(b, ws, st, false);
          }
        });
      } else {
        Workspace ws;
        ws.reserve(p, pixels);
        ImageStats st;
        for (int64_t b = 0; b < batch; ++b) {
          image(b, ws, st, true);
        }
      }
    });
  });
  return {masks, counts, areas, invalid};
}

// ==================================================================================================== cross entropy

// One image's view of the inputs, and the task's tiles.
template <typename acc_t>
struct CeScratch {
  explicit CeScratch(int64_t classes)
      : x(classes * kTilePixels), max(kTilePixels), sum(kTilePixels), picked(kTilePixels), w(kTilePixels),
        wce(kTilePixels), mask(kTilePixels), label(kTilePixels), lanes(2 * kTilePixels) {}
  std::vector<acc_t> x;  // logits, class-major: (c, j) at c * T + j; the backward's gradient afterwards
  std::vector<acc_t> max, sum, picked, w, wce;
  std::vector<int64_t> mask;   // the tile's masks, sign-extended like the reference's masks.long()
  std::vector<int32_t> label;  // the tile's labels, -1 when out of range or ignored
  std::vector<acc_t> lanes;    // forward: lane j of sum w CE at j, of sum w at T + j
};

// Copies pixels [first, first + n) of one image of a (B, C, S) tensor into the class-major tile (as acc_t), walking
// memory along the smaller stride.
template <typename scalar_t, typename acc_t>
void gather(const scalar_t* image, int64_t stride_c, int64_t stride_s, int64_t classes, int64_t first, int64_t n,
            acc_t* dst) {
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
void scatter(const acc_t* src, int64_t stride_c, int64_t stride_s, int64_t classes, int64_t first, int64_t n,
             scalar_t* image) {
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

// Reads n labels (from row[first * stride]) as int32 labels, -1 where out of [0, C) or == ignore_index.
using LoadLabels = void (*)(const void* row, int64_t stride, int64_t first, int64_t n, int64_t classes,
                            int64_t ignore_index, int32_t* out);
// Reads n masks as int64 (sign-extended).
using LoadMasks = void (*)(const void* row, int64_t stride, int64_t first, int64_t n, int64_t* out);

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

struct Loaders {
  LoadLabels labels;
  LoadMasks masks;
};

Loaders pick_loaders(const at::Tensor& labels, const at::Tensor& masks) {
  Loaders loaders{};
  AT_DISPATCH_INTEGRAL_TYPES(labels.scalar_type(), "dbce_ce_cpu", [&] { loaders.labels = &load_ce_labels<scalar_t>; });
  AT_DISPATCH_INTEGRAL_TYPES(masks.scalar_type(), "dbce_ce_cpu", [&] { loaders.masks = &load_ce_masks<scalar_t>; });
  return loaders;
}

// The inputs every task reads.
template <typename scalar_t, typename acc_t>
struct CeInputs {
  int64_t classes, pixels, ignore_index;
  const scalar_t* x;
  int64_t x_b, x_c, x_s;
  const void* labels;
  int64_t labels_b, labels_s, label_size;
  const void* masks;
  int64_t masks_b, masks_s, mask_size;
  const acc_t* weights;  // (B, C) contiguous, in acc_t
  Loaders load;
};

// Loads the tile's labels, masks and logits, and computes w, the softmax max and sum (p = exp(x - max) kept in x
// when keep_exp) and the logit at the label.
template <typename scalar_t, typename acc_t>
void load_tile(const CeInputs<scalar_t, acc_t>& in, int64_t b, int64_t first, int64_t n, CeScratch<acc_t>& s,
               bool keep_exp) {
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
    for (int64_t j = 0; j < n; ++j) {
      const acc_t e = std::exp(xc[j] - max[j]);
      sum[j] += e;
      if (keep_exp) {
        xc[j] = e;
      }
    }
  }
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

template <typename scalar_t, typename acc_t>
void ce_forward_impl(const CeInputs<scalar_t, acc_t>& in, int64_t batch, at::Tensor& sums, at::Tensor& map,
                     bool write_map) {
  const int64_t pixels = in.pixels;
  const int64_t chunks = ceil_div(pixels, kChunkPixels);
  std::vector<acc_t> partial(batch * chunks * 2);
  acc_t* map_out = write_map ? map.mutable_data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, batch * chunks, /*grain_size=*/1, [&](int64_t first_task, int64_t last_task) {
    CeScratch<acc_t> s(in.classes);
    for (int64_t task = first_task; task < last_task; ++task) {
      const int64_t b = task / chunks;
      const int64_t begin = (task % chunks) * kChunkPixels;
      const int64_t end = std::min(pixels, begin + kChunkPixels);
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
        for (int64_t j = 0; j < n; ++j) {
          sum[j] = std::log(sum[j]);
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
      partial[task * 2 + 0] = total_ce;
      partial[task * 2 + 1] = total_w;
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
  at::parallel_for(0, batch * chunks, /*grain_size=*/1, [&](int64_t first_task, int64_t last_task) {
    CeScratch<acc_t> s(C);
    for (int64_t task = first_task; task < last_task; ++task) {
      const int64_t b = task / chunks;
      const int64_t begin = (task % chunks) * kChunkPixels;
      const int64_t end = std::min(pixels, begin + kChunkPixels);
      const acc_t up = grad_sums[b * 2];
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
        scatter(s.x.data(), g_c, g_s, C, first, n, dx + b * g_b);
      }
    }
  });
}

void check_ce_inputs(const char* op, const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& masks,
                     const at::Tensor& class_weights) {
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be 3-D (B, C, S), got shape ", logits.sizes());
  TORCH_CHECK(is_float_dtype(logits.scalar_type()), op,
              ": logits must be float32, float64, bfloat16 or float16, got ", logits.scalar_type());
  const int64_t batch = logits.size(0), classes = logits.size(1), pixels = logits.size(2);
  TORCH_CHECK(classes >= 1 && classes <= kMaxClasses, op, ": logits must have between 1 and ", kMaxClasses,
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

}  // namespace

TORCH_LIBRARY_IMPL(torch_medloss, CPU, m) {
  m.impl("dbce_masks", &dbce_masks_cpu);
  m.impl("dbce_ce_fwd", &dbce_ce_fwd_cpu);
  m.impl("dbce_ce_bwd", &dbce_ce_bwd_cpu);
}

}  // namespace torch_medloss
