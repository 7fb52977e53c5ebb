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
// Instruction sets. The float32 tile functions, label loaders, gathers and scatters (dice_sums_tiles_impl.h) are
// compiled three times from the same always-inline code, each in its own file so that ninja builds them in
// parallel: dice_sums_isa_baseline.cpp (SSE2 on x86-64, NEON on aarch64; it also holds every float64 tile) and, with
// GCC or Clang on x86-64, dice_sums_isa_avx2.cpp under target("avx2,fma") and dice_sums_isa_avx512.cpp under
// target("avx512..."). This file (the checks, the drivers, the registration) is baseline code. cpu_isa() picks the
// tiles at run time, as torch does for its own kernels; no compile flag is needed and the library runs on any CPU
// (isa.h). The AVX2 and AVX-512 versions may fuse a multiply and an add (FMA), so their last bits can differ from
// the baseline's; on one machine the results are still the same run to run and for any number of threads.
// ATEN_CPU_CAPABILITY=default (or avx2) selects the baseline (or AVX2) version, to test it.
//
// Cost. logits (2, 4, 48, 48, 48) float32, int64 labels, softmax, one thread of an AVX-512 EPYC: forward 0.36 ms,
// backward 0.42 ms (the kernel with libm's calls: 2.3 and 2.5 ms); 0.58 and 0.62 ms with AVX2, 1.5 and 1.7 ms with
// SSE2.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "cpu_isa.h"
#include "dice_sums_tiles.h"
#include "vec_math.h"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

namespace torch_medloss {
namespace {

using namespace dice_sums_cpu;  // the tiles' interface (dice_sums_tiles.h)

// Pixels per task: enough to amortise a task's scratch and its partial row, few enough to spread one image over
// the threads. A constant: the partial sums must not depend on the thread count.
constexpr int64_t kChunkPixels = 8192;
// Tile size in elements (C * T) aimed at: the tile-sized buffers of a task then stay in L1/L2.
constexpr int64_t kTileElements = 4096;
// Pixels per tile: MAX at most (long rows amortise each loop's set-up), 8 at least (for C > 512).
constexpr int64_t kMaxTilePixels = 256;
constexpr int64_t kMinTilePixels = 8;
static_assert(kChunkPixels % kMaxTilePixels == 0, "a chunk must hold whole tiles");

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

// ------------------------------------------------------------------------------------------------ tile loading

// The entry points of the instruction set in use.
template <typename acc_t>
const TileKernels<acc_t>& tile_kernels(Isa isa) {
  if constexpr (std::is_same_v<acc_t, double>) {
    (void)isa;
    return double_tiles();
  } else {
#if MEDLOSS_WITH_AVX512
    if (isa == Isa::kAvx512) {
      return float_tiles_avx512();
    }
#endif
#if MEDLOSS_WITH_AVX2
    if (isa == Isa::kAvx2) {
      return float_tiles_avx2();
    }
#endif
    (void)isa;
    return float_tiles_baseline();
  }
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
  Source(const at::Tensor& logits, const at::Tensor& target, const TileKernels<acc_t>& kernels)
      : x(logits.const_data_ptr<scalar_t>()),
        t(target.const_data_ptr<target_t>()),
        gather_x(std::get<Gather<scalar_t, acc_t>>(kernels.gather)) {
    for (int64_t d = 0; d < 3; ++d) {
      x_strides[d] = logits.stride(d);
    }
    if constexpr (std::is_integral_v<target_t>) {
      t_strides[0] = target.stride(0);
      t_strides[1] = 0;
      t_strides[2] = target.stride(1);
      labels = std::get<LoadLabels<target_t, acc_t>>(kernels.load_labels);
    } else {
      for (int64_t d = 0; d < 3; ++d) {
        t_strides[d] = target.stride(d);
      }
      gather_t = std::get<Gather<target_t, acc_t>>(kernels.gather);
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

  const TileKernels<acc_t>& kernels = tile_kernels<acc_t>(cpu_isa());
  const Source<scalar_t, target_t, acc_t> source(logits, target, kernels);
  // activation is 0, 1 or 2 (check_inputs).
  const ForwardTile<acc_t> tile_fn = kernels.forward[activation][squared][kLabels];

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

  const TileKernels<acc_t>& kernels = tile_kernels<acc_t>(cpu_isa());
  const Source<scalar_t, target_t, acc_t> source(logits, target, kernels);
  scalar_t* dx = grad.mutable_data_ptr<scalar_t>();
  const acc_t* up_sums = grad_sums.const_data_ptr<acc_t>();
  const acc_t* up_extras = grad_extras.const_data_ptr<acc_t>();
  const int64_t g_b = grad.stride(0), g_c = grad.stride(1), g_s = grad.stride(2);
  const BackwardTile<acc_t> tile_fn = kernels.backward[activation][squared][kLabels];
  const Scatter<scalar_t, acc_t> scatter_fn = std::get<Scatter<scalar_t, acc_t>>(kernels.scatter);

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
