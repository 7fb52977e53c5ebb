// CPU kernels of torch_medloss::dice_sums_fwd and dice_sums_bwd (schema and contract in csrc/dice_sums.cpp; the
// ground truth is torch_medloss/reference/dice_sums.py).
//
// Work split. Each image's S pixels are cut into chunks of kChunkPixels; one at::parallel_for task handles one
// (image, chunk). In the forward it writes its own row of a partial-sum buffer, and the rows of an image are added
// in chunk order at the end. The chunk size is a constant (never derived from the thread count), so every partial
// row, and so every sum, is bitwise the same run to run and for any number of threads. The backward has no
// reduction over pixels: each task writes the gradient of its own pixels.
//
// Tiles. Inside a task the pixels go through class-major tiles of T pixels: element (c, j), class c of the tile's
// pixel j, sits at c * T + j, in the accumulation type. The logits and a dense target, of any dtype and strides,
// are gathered into a tile once, walking memory along the smaller stride; a label map becomes a one-hot tile. Every
// inner loop then runs over the T pixels of one class row with unit stride and no branch, so the compiler
// vectorises it whatever C is. (A per-pixel buffer of C classes, the other layout, would vectorise loops of 2 to 5
// iterations for the usual medical C.) The switches are hoisted: activation and squared are template arguments of
// the tile functions, picked once per call; the gamma case (0: m = 1 without pow, 1, 2, other) is picked once per
// class row; the target kind is the dtype template of the loader.
//
// Accumulation. Each task keeps T running sums per (class, quantity), one per tile lane, added elementwise (which
// vectorises without reassociating anything) and summed lane by lane at the end of the chunk.
//
// Cost. exp, log and pow stay scalar calls (glibc's vector versions need -ffast-math, which would also let the
// compiler reorder the sums); everything else vectorises at the x86-64 baseline (SSE2). On one core, softmax +
// Dice + CE on 2 x 96^3 pixels: forward ~270 M logits/s at C = 3 (6x the reference), 17x the reference at C = 14.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

// Marks an inner loop over tile rows as safe to vectorise: the rows never alias, which the compiler cannot prove
// for several row pointers (it then gives up or adds run-time checks). OpenMP's simd, honoured under the -fopenmp
// the build uses. Only on elementwise loops (no reductions), so vectorising changes no result.
#define MEDLOSS_SIMD _Pragma("omp simd")

namespace torch_medloss {
namespace {

// Pixels per task: enough to amortise a task's scratch and its partial row, few enough to spread one image over
// the threads. A constant: the partial sums must not depend on the thread count.
constexpr int64_t kChunkPixels = 8192;
// Tile size in elements (C * T) aimed at: the ~7 tile-sized buffers of a task then stay in L2 (float: 112 KiB).
constexpr int64_t kTileElements = 4096;
// Pixels per tile: 64 at most (long enough rows to vectorise), 8 at least (for C > 512, whatever it costs).
constexpr int64_t kMaxTilePixels = 64;
constexpr int64_t kMinTilePixels = 8;
static_assert(kChunkPixels % kMaxTilePixels == 0, "a chunk must hold whole tiles");

constexpr int64_t kActivationNone = 0, kActivationSoftmax = 1, kActivationSigmoid = 2;
constexpr int64_t kMaskNone = 0, kMaskLabel = 1, kMaskChannel = 2, kMaskSentinel = 3;
constexpr int64_t kNumSums = 4;    // I, P, G, D
constexpr int64_t kNumExtras = 3;  // ce_num, ce_den, invalid

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

// One task's tiles: class-major (C * T) buffers and per-pixel (T) rows. lane_rows > 0: the forward's running sums;
// lane_rows = 0: the backward's gradient tile instead.
template <typename acc_t>
struct Scratch {
  Scratch(int64_t classes, int64_t tile, int64_t lane_rows)
      : x(classes * tile),
        p(classes * tile),
        y(classes * tile),
        g(lane_rows == 0 ? classes * tile : 0),
        w(tile),
        v(tile),
        max(tile),
        sum(tile),
        row(tile),
        pw(tile),
        yw(tile),
        diff(tile),
        m(tile),
        label(tile),
        lanes(lane_rows * tile) {}

  std::vector<acc_t> x;  // logits
  std::vector<acc_t> p;  // exp(x - max), then the probabilities
  std::vector<acc_t> y;  // target (one-hot for labels)
  std::vector<acc_t> g;  // backward: dL/dp, then dL/dx
  std::vector<acc_t> w;  // valid-pixel weight
  std::vector<acc_t> v;  // 1 where the pixel counts in the cross entropy
  std::vector<acc_t> max, sum, row, pw, yw, diff, m;
  std::vector<int32_t> label;  // the tile's labels, -1 when out of range (int32: vectorises without SSE4)
  std::vector<acc_t> lanes;    // forward: lane j of partial-row entry k at k * T + j
};

// --------------------------------------------------------------------------------------------- gather and scatter

// Copies pixels [first, first + n) of one image of a (B, C, S) tensor (image points at its (c=0, i=0) element) into
// the class-major tile, converting to acc_t. Walks memory along the smaller stride: pixels for NCHW, classes for
// channels_last.
template <typename scalar_t, typename acc_t>
void gather(const scalar_t* image, int64_t stride_c, int64_t stride_s, int64_t classes, int64_t first, int64_t n,
            int64_t tile, acc_t* dst) {
  const scalar_t* start = image + first * stride_s;
  if (stride_c < stride_s) {
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t* pixel = start + j * stride_s;
      for (int64_t c = 0; c < classes; ++c) {
        dst[c * tile + j] = static_cast<acc_t>(pixel[c * stride_c]);
      }
    }
    return;
  }
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
void scatter(const acc_t* src, int64_t stride_c, int64_t stride_s, int64_t classes, int64_t first, int64_t n,
             int64_t tile, scalar_t* image) {
  scalar_t* start = image + first * stride_s;
  if (stride_c < stride_s) {
    for (int64_t j = 0; j < n; ++j) {
      scalar_t* pixel = start + j * stride_s;
      for (int64_t c = 0; c < classes; ++c) {
        pixel[c * stride_c] = static_cast<scalar_t>(src[c * tile + j]);
      }
    }
    return;
  }
  for (int64_t c = 0; c < classes; ++c) {
    const acc_t* in = src + c * tile;
    scalar_t* dst = start + c * stride_c;
    if (stride_s == 1) {
      MEDLOSS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        dst[j] = static_cast<scalar_t>(in[j]);
      }
    } else {
      MEDLOSS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        dst[j * stride_s] = static_cast<scalar_t>(in[j]);
      }
    }
  }
}

// Loads pixels [first, first + n) of one label map row (row points at its pixel 0): the labels, w, v and the one-hot
// y tile. Returns the number of invalid labels (outside [0, C) and not the masked ignore_index).
template <typename label_t, typename acc_t>
int64_t load_labels(const Options<acc_t>& o, const label_t* row, int64_t stride_s, int64_t first, int64_t n,
                    Scratch<acc_t>& s) {
  const label_t* start = row + first * stride_s;
  int64_t invalid = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t label = static_cast<int64_t>(start[j * stride_s]);
    // One unsigned comparison rejects both label < 0 and label >= C.
    const bool in_range = static_cast<uint64_t>(label) < static_cast<uint64_t>(o.classes);
    const bool ignored = o.mask_mode == kMaskLabel && label == o.ignore_index;
    invalid += (!in_range && !ignored) ? 1 : 0;
    s.label[j] = in_range ? static_cast<int32_t>(label) : -1;
    s.w[j] = (in_range && !ignored) ? acc_t(1) : acc_t(0);
    s.v[j] = in_range ? acc_t(1) : acc_t(0);
  }
  const int32_t* labels = s.label.data();
  for (int32_t c = 0; c < o.classes; ++c) {
    acc_t* out = s.y.data() + c * o.tile;
    MEDLOSS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      out[j] = labels[j] == c ? acc_t(1) : acc_t(0);
    }
  }
  return invalid;
}

// Loads pixels [first, first + n) of one image of a dense (B, C, S) target: the y tile, w (by mask_mode) and v = 1.
template <typename target_t, typename acc_t>
void load_dense(const Options<acc_t>& o, const target_t* image, int64_t stride_c, int64_t stride_s, int64_t first,
                int64_t n, Scratch<acc_t>& s) {
  const int64_t tile = o.tile;
  gather(image, stride_c, stride_s, o.classes, first, n, tile, s.y.data());
  acc_t* w = s.w.data();
  if (o.mask_mode == kMaskChannel) {
    const acc_t* ignored = s.y.data() + o.ignore_index * tile;
    MEDLOSS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      w[j] = acc_t(1) - ignored[j];
    }
  } else if (o.mask_mode == kMaskSentinel) {
    acc_t* total = s.row.data();
    std::fill(total, total + n, acc_t(0));
    for (int64_t c = 0; c < o.classes; ++c) {
      const acc_t* yc = s.y.data() + c * tile;
      MEDLOSS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        total[j] += yc[j];
      }
    }
    MEDLOSS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      w[j] = total[j] > acc_t(0) ? acc_t(1) : acc_t(0);
    }
  } else {
    std::fill(w, w + n, acc_t(1));
  }
  std::fill(s.v.data(), s.v.data() + n, acc_t(1));
}

// ------------------------------------------------------------------------------------------------- tile math

// Softmax statistics of the raw logits over the classes: max[j], sum[j] = sum_c exp(x - max), and p = exp(x - max).
template <typename acc_t>
void softmax_stats(const Options<acc_t>& o, int64_t n, Scratch<acc_t>& s) {
  const int64_t tile = o.tile;
  const acc_t* x = s.x.data();
  acc_t* max = s.max.data();
  acc_t* sum = s.sum.data();
  std::copy(x, x + n, max);
  for (int64_t c = 1; c < o.classes; ++c) {
    const acc_t* xc = x + c * tile;
    MEDLOSS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      max[j] = xc[j] > max[j] ? xc[j] : max[j];
    }
  }
  std::fill(sum, sum + n, acc_t(0));
  for (int64_t c = 0; c < o.classes; ++c) {
    const acc_t* xc = x + c * tile;
    acc_t* ec = s.p.data() + c * tile;
    MEDLOSS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      const acc_t e = std::exp(xc[j] - max[j]);
      ec[j] = e;
      sum[j] += e;
    }
  }
}

// The probabilities of the activation (softmax needs softmax_stats first, and normalises p in place).
template <int64_t kActivation, typename acc_t>
const acc_t* activate(const Options<acc_t>& o, int64_t n, Scratch<acc_t>& s) {
  const int64_t tile = o.tile;
  if constexpr (kActivation == kActivationSoftmax) {
    const acc_t* sum = s.sum.data();
    for (int64_t c = 0; c < o.classes; ++c) {
      acc_t* pc = s.p.data() + c * tile;
      MEDLOSS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        pc[j] = pc[j] / sum[j];
      }
    }
    return s.p.data();
  } else if constexpr (kActivation == kActivationSigmoid) {
    for (int64_t c = 0; c < o.classes; ++c) {
      const acc_t* xc = s.x.data() + c * tile;
      acc_t* pc = s.p.data() + c * tile;
      MEDLOSS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        pc[j] = acc_t(1) / (acc_t(1) + std::exp(-xc[j]));
      }
    }
    return s.p.data();
  } else {
    return s.x.data();
  }
}

// The masked p' = w p and y' = w y of class row c into s.pw, s.yw, and p' - y' into s.diff.
template <typename acc_t>
void masked_row(const acc_t* pc, const acc_t* yc, int64_t n, Scratch<acc_t>& s) {
  const acc_t* w = s.w.data();
  acc_t* pw = s.pw.data();
  acc_t* yw = s.yw.data();
  acc_t* diff = s.diff.data();
  MEDLOSS_SIMD
  for (int64_t j = 0; j < n; ++j) {
    pw[j] = w[j] * pc[j];
    yw[j] = w[j] * yc[j];
    diff[j] = pw[j] - yw[j];
  }
}

// The modulator row m = |p' - y'|^gamma for s.diff, or nullptr for m = 1 (gamma = 0: no pow, as the contract says).
template <typename acc_t>
const acc_t* modulator(acc_t gamma, int64_t n, Scratch<acc_t>& s) {
  if (gamma == acc_t(0)) {
    return nullptr;
  }
  const acc_t* diff = s.diff.data();
  acc_t* m = s.m.data();
  if (gamma == acc_t(1)) {
    MEDLOSS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      m[j] = std::abs(diff[j]);
    }
  } else if (gamma == acc_t(2)) {
    MEDLOSS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      m[j] = diff[j] * diff[j];
    }
  } else {
    MEDLOSS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      m[j] = std::pow(std::abs(diff[j]), gamma);
    }
  }
  return m;
}

// ------------------------------------------------------------------------------------------------ forward tile

// Adds one tile's I, P, G, D of class row c to its lanes (I, P, G, D at rows 4c .. 4c + 3 of s.lanes).
template <bool kSquared, typename acc_t>
void add_dice_row(const acc_t* m, int64_t c, int64_t n, int64_t tile, Scratch<acc_t>& s) {
  const acc_t* pw = s.pw.data();
  const acc_t* yw = s.yw.data();
  const acc_t* diff = s.diff.data();
  acc_t* sum_i = s.lanes.data() + (c * kNumSums + 0) * tile;
  acc_t* sum_p = s.lanes.data() + (c * kNumSums + 1) * tile;
  acc_t* sum_g = s.lanes.data() + (c * kNumSums + 2) * tile;
  acc_t* sum_d = s.lanes.data() + (c * kNumSums + 3) * tile;
  if (m == nullptr) {
    MEDLOSS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      sum_i[j] += pw[j] * yw[j];
      sum_p[j] += kSquared ? pw[j] * pw[j] : pw[j];
      sum_g[j] += kSquared ? yw[j] * yw[j] : yw[j];
      sum_d[j] += std::abs(diff[j]);
    }
  } else {
    MEDLOSS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      sum_i[j] += m[j] * pw[j] * yw[j];
      sum_p[j] += m[j] * (kSquared ? pw[j] * pw[j] : pw[j]);
      sum_g[j] += m[j] * (kSquared ? yw[j] * yw[j] : yw[j]);
      sum_d[j] += m[j] * std::abs(diff[j]);
    }
  }
}

// Adds the tile's cross-entropy numerator, -v sum_c cw_c ((1 - eps) y_c + eps / C) log q_c, to its lanes (row 4C).
// For a one-hot y this is the reference's (1 - eps) cw[L] (-log q_L) + (eps / C) sum_c cw_c (-log q_c).
template <typename acc_t>
void add_cross_entropy(const Options<acc_t>& o, int64_t n, Scratch<acc_t>& s) {
  const int64_t tile = o.tile;
  const acc_t* max = s.max.data();
  acc_t* log_sum = s.sum.data();  // sum is not needed after this (the softmax activation has run)
  acc_t* total = s.row.data();
  MEDLOSS_SIMD
  for (int64_t j = 0; j < n; ++j) {
    log_sum[j] = std::log(log_sum[j]);
    total[j] = acc_t(0);
  }
  for (int64_t c = 0; c < o.classes; ++c) {
    const acc_t weight = o.ce_weight[c];
    const acc_t* xc = s.x.data() + c * tile;
    const acc_t* yc = s.y.data() + c * tile;
    MEDLOSS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      const acc_t share = weight * (o.keep * yc[j] + o.spread);
      total[j] += share * (xc[j] - max[j] - log_sum[j]);
    }
  }
  const acc_t* v = s.v.data();
  acc_t* ce_num = s.lanes.data() + o.classes * kNumSums * tile;
  MEDLOSS_SIMD
  for (int64_t j = 0; j < n; ++j) {
    ce_num[j] -= v[j] * total[j];
  }
}

template <typename acc_t>
using ForwardTile = void (*)(const Options<acc_t>&, int64_t, Scratch<acc_t>&);

template <typename acc_t, int64_t kActivation, bool kSquared>
void forward_tile(const Options<acc_t>& o, int64_t n, Scratch<acc_t>& s) {
  if (kActivation == kActivationSoftmax || o.with_ce) {
    softmax_stats(o, n, s);
  }
  // The activation first: the softmax needs sum, which the cross entropy then turns into log(sum).
  const acc_t* prob = activate<kActivation>(o, n, s);
  if (o.with_ce) {
    add_cross_entropy(o, n, s);
  }
  const int64_t tile = o.tile;
  for (int64_t c = 0; c < o.classes; ++c) {
    masked_row(prob + c * tile, s.y.data() + c * tile, n, s);
    add_dice_row<kSquared>(modulator(o.gamma[c], n, s), c, n, tile, s);
  }
}

template <typename acc_t>
ForwardTile<acc_t> pick_forward_tile(int64_t activation, bool squared) {
  switch (activation) {
    case kActivationSoftmax:
      return squared ? &forward_tile<acc_t, kActivationSoftmax, true> : &forward_tile<acc_t, kActivationSoftmax, false>;
    case kActivationSigmoid:
      return squared ? &forward_tile<acc_t, kActivationSigmoid, true> : &forward_tile<acc_t, kActivationSigmoid, false>;
    default:
      return squared ? &forward_tile<acc_t, kActivationNone, true> : &forward_tile<acc_t, kActivationNone, false>;
  }
}

// ------------------------------------------------------------------------------------------------ backward tile

// Upstream gradients of one image: grad_sums row (C, 4) and d/d ce_num.
template <typename acc_t>
struct Upstream {
  const acc_t* sums;
  acc_t ce_num;
};

template <typename acc_t>
using BackwardTile = void (*)(const Options<acc_t>&, const Upstream<acc_t>&, int64_t, Scratch<acc_t>&);

// Leaves dL/dx of the tile in s.g.
template <typename acc_t, int64_t kActivation, bool kSquared>
void backward_tile(const Options<acc_t>& o, const Upstream<acc_t>& up, int64_t n, Scratch<acc_t>& s) {
  const int64_t tile = o.tile;
  const int64_t classes = o.classes;
  const bool stats = kActivation == kActivationSoftmax || o.with_ce;
  if (stats) {
    softmax_stats(o, n, s);
  }
  const acc_t* prob = activate<kActivation>(o, n, s);

  // 1. dL/dp_c = w m (gI y' + gP k p'^(k-1) + gD sign(p' - y')), then through the activation, into s.g.
  std::vector<acc_t>& grad = s.g;
  for (int64_t c = 0; c < classes; ++c) {
    masked_row(prob + c * tile, s.y.data() + c * tile, n, s);
    const acc_t* m = modulator(o.gamma[c], n, s);
    const acc_t grad_i = up.sums[c * kNumSums + 0];
    const acc_t grad_p = up.sums[c * kNumSums + 1];
    const acc_t grad_d = up.sums[c * kNumSums + 3];
    const acc_t* w = s.w.data();
    const acc_t* pw = s.pw.data();
    const acc_t* yw = s.yw.data();
    const acc_t* diff = s.diff.data();
    acc_t* gc = grad.data() + c * tile;
    MEDLOSS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      const acc_t sign = acc_t(diff[j] > acc_t(0)) - acc_t(diff[j] < acc_t(0));
      const acc_t d_pred = kSquared ? acc_t(2) * pw[j] : acc_t(1);
      gc[j] = grad_i * yw[j] + grad_p * d_pred + grad_d * sign;
    }
    if (m != nullptr) {
      MEDLOSS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        gc[j] *= m[j];
      }
    }
    MEDLOSS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      gc[j] *= w[j];
    }
  }
  if constexpr (kActivation == kActivationSoftmax) {
    // dx_j = p_j (g_j - sum_c p_c g_c)
    acc_t* dot = s.row.data();
    std::fill(dot, dot + n, acc_t(0));
    for (int64_t c = 0; c < classes; ++c) {
      const acc_t* pc = prob + c * tile;
      const acc_t* gc = grad.data() + c * tile;
      MEDLOSS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        dot[j] += pc[j] * gc[j];
      }
    }
    for (int64_t c = 0; c < classes; ++c) {
      const acc_t* pc = prob + c * tile;
      acc_t* gc = grad.data() + c * tile;
      MEDLOSS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        gc[j] = pc[j] * (gc[j] - dot[j]);
      }
    }
  } else if constexpr (kActivation == kActivationSigmoid) {
    for (int64_t c = 0; c < classes; ++c) {
      const acc_t* pc = prob + c * tile;
      acc_t* gc = grad.data() + c * tile;
      MEDLOSS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        gc[j] = gc[j] * pc[j] * (acc_t(1) - pc[j]);
      }
    }
  }

  // 2. Cross entropy: d(-v sum_c a_c log q_c)/dx_j = v (q_j A - a_j), a_c = cw_c ((1 - eps) y_c + eps / C),
  // A = sum_c a_c. q is p for the softmax activation; otherwise exp(x - max) / sum, rebuilt from x (p now holds the
  // sigmoid, or x is the probability).
  if (!o.with_ce) {
    return;
  }
  const acc_t* max = s.max.data();
  const acc_t* sum = s.sum.data();
  const acc_t* v = s.v.data();
  acc_t* total = s.row.data();
  std::fill(total, total + n, acc_t(0));
  for (int64_t c = 0; c < classes; ++c) {
    const acc_t weight = o.ce_weight[c];
    const acc_t* yc = s.y.data() + c * tile;
    MEDLOSS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      total[j] += weight * (o.keep * yc[j] + o.spread);
    }
  }
  acc_t* q = s.pw.data();  // one class row of q at a time
  for (int64_t c = 0; c < classes; ++c) {
    const acc_t weight = o.ce_weight[c];
    const acc_t* yc = s.y.data() + c * tile;
    const acc_t* xc = s.x.data() + c * tile;
    if constexpr (kActivation == kActivationSoftmax) {
      std::copy(prob + c * tile, prob + c * tile + n, q);
    } else {
      MEDLOSS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        q[j] = std::exp(xc[j] - max[j]) / sum[j];
      }
    }
    acc_t* gc = grad.data() + c * tile;
    MEDLOSS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      const acc_t share = weight * (o.keep * yc[j] + o.spread);
      gc[j] += up.ce_num * v[j] * (q[j] * total[j] - share);
    }
  }
}

template <typename acc_t>
BackwardTile<acc_t> pick_backward_tile(int64_t activation, bool squared) {
  switch (activation) {
    case kActivationSoftmax:
      return squared ? &backward_tile<acc_t, kActivationSoftmax, true>
                     : &backward_tile<acc_t, kActivationSoftmax, false>;
    case kActivationSigmoid:
      return squared ? &backward_tile<acc_t, kActivationSigmoid, true>
                     : &backward_tile<acc_t, kActivationSigmoid, false>;
    default:
      return squared ? &backward_tile<acc_t, kActivationNone, true> : &backward_tile<acc_t, kActivationNone, false>;
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

// Loads the target part of one tile; returns the number of invalid labels (0 for a dense target).
template <typename target_t, typename acc_t>
int64_t load_target(const Options<acc_t>& o, const target_t* image, int64_t stride_c, int64_t stride_s,
                    int64_t first, int64_t n, Scratch<acc_t>& s) {
  if constexpr (std::is_integral_v<target_t>) {
    return load_labels(o, image, stride_s, first, n, s);
  } else {
    load_dense(o, image, stride_c, stride_s, first, n, s);
    return 0;
  }
}

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

  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  const target_t* t = target.const_data_ptr<target_t>();
  const int64_t x_b = logits.stride(0), x_c = logits.stride(1), x_s = logits.stride(2);
  const int64_t t_b = target.stride(0);
  const int64_t t_c = kLabels ? 0 : target.stride(1);
  const int64_t t_s = kLabels ? target.stride(1) : target.stride(2);
  const ForwardTile<acc_t> tile_fn = pick_forward_tile<acc_t>(activation, squared);

  at::parallel_for(0, batch * chunks, /*grain_size=*/1, [&](int64_t first_task, int64_t last_task) {
    Scratch<acc_t> s(classes, tile, row);
    for (int64_t task = first_task; task < last_task; ++task) {
      const int64_t b = task / chunks;
      const int64_t begin = (task % chunks) * kChunkPixels;
      const int64_t end = std::min(pixels, begin + kChunkPixels);
      std::fill(s.lanes.begin(), s.lanes.end(), acc_t(0));
      int64_t bad = 0;
      acc_t* ce_den = s.lanes.data() + (row - 1) * tile;
      for (int64_t first = begin; first < end; first += tile) {
        const int64_t n = std::min(tile, end - first);
        gather(x + b * x_b, x_c, x_s, classes, first, n, tile, s.x.data());
        bad += load_target(o, t + b * t_b, t_c, t_s, first, n, s);
        if (kLabels && o.with_ce) {
          MEDLOSS_SIMD
          for (int64_t j = 0; j < n; ++j) {
            ce_den[j] += s.label[j] >= 0 ? o.ce_weight[s.label[j]] : acc_t(0);
          }
        }
        tile_fn(o, n, s);
      }
      // Lanes summed in lane order.
      acc_t* out = partial.data() + task * row;
      for (int64_t k = 0; k < row; ++k) {
        const acc_t* lane = s.lanes.data() + k * tile;
        acc_t total = 0;
        for (int64_t j = 0; j < tile; ++j) {
          total += lane[j];
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

  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  const target_t* t = target.const_data_ptr<target_t>();
  scalar_t* dx = grad.mutable_data_ptr<scalar_t>();
  const acc_t* up_sums = grad_sums.const_data_ptr<acc_t>();
  const acc_t* up_extras = grad_extras.const_data_ptr<acc_t>();
  const int64_t x_b = logits.stride(0), x_c = logits.stride(1), x_s = logits.stride(2);
  const int64_t g_b = grad.stride(0), g_c = grad.stride(1), g_s = grad.stride(2);
  const int64_t t_b = target.stride(0);
  const int64_t t_c = kLabels ? 0 : target.stride(1);
  const int64_t t_s = kLabels ? target.stride(1) : target.stride(2);
  const BackwardTile<acc_t> tile_fn = pick_backward_tile<acc_t>(activation, squared);

  at::parallel_for(0, batch * chunks, /*grain_size=*/1, [&](int64_t first_task, int64_t last_task) {
    Scratch<acc_t> s(classes, tile, 0);
    for (int64_t task = first_task; task < last_task; ++task) {
      const int64_t b = task / chunks;
      const int64_t begin = (task % chunks) * kChunkPixels;
      const int64_t end = std::min(pixels, begin + kChunkPixels);
      const Upstream<acc_t> up{up_sums + b * classes * kNumSums, up_extras[b * kNumExtras]};
      for (int64_t first = begin; first < end; first += tile) {
        const int64_t n = std::min(tile, end - first);
        gather(x + b * x_b, x_c, x_s, classes, first, n, tile, s.x.data());
        load_target(o, t + b * t_b, t_c, t_s, first, n, s);
        tile_fn(o, up, n, s);
        scatter(s.g.data(), g_c, g_s, classes, first, n, tile, dx + b * g_b);
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
