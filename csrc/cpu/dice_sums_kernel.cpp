// CPU kernels of torch_medloss::dice_sums_fwd / _bwd and dice_loss_fwd / _bwd (schema and contract in
// csrc/dice_sums.cpp; the ground truth is torch_medloss/reference/dice_sums.py). The loss ops are the sums ops plus
// the loss head of csrc/dice_head.h, run on the host after the sums (O(B C) serial work); their backward turns the
// head's coefficients and the loss's upstream gradient into the sums' upstream gradients on the host and runs the
// sums' backward pass.
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
// Focal term. MONAI's focal loss on the raw logits (the F sums) has entry points of its own (focal form, alpha mode
// and target kind as template arguments), called after the Dice tile only when the codes ask for it: off, it costs
// one pointer test per tile. On, it is vectorised like the rest (exp_f32, log_f32; the softmax form's statistics
// over the kept classes of x w in a tile of its own), and its backward adds to the gradient rows the Dice tile
// wrote.
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
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../contract.h"
#include "../dice_head.h"
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

// The options of an op call, read from codes and scalars (the positions of csrc/contract.h) and checked.
struct OpCodes {
  int64_t activation, ignore_index, mask_mode, focal, alpha_mode, drop, head, reduction;
  bool labels, squared, with_ce, batch;
  double label_smoothing, focal_gamma, focal_alpha;
  // Whether the passes compute the Dice sums and their gradient: always for the sums ops; the loss op of the focal
  // term alone (HEAD_NONE without cross entropy: FocalLoss) skips them, as its head never reads them.
  bool dice_part = true;
};

// A code that must be one of `count` values 0, 1, ...: names the position, lists the values.
void check_code(const char* op, at::IntArrayRef codes, int64_t position, const char* name, int64_t count,
                const char* values) {
  const int64_t code = codes[position];
  TORCH_CHECK(code >= 0 && code < count, op, ": codes[", name, "] must be ", values, ", got ", code);
}

OpCodes check_inputs(const char* op, const at::Tensor& logits, const at::Tensor& target, const at::Tensor& params,
                     at::IntArrayRef codes, at::ArrayRef<double> scalars) {
  using namespace contract;
  TORCH_CHECK(static_cast<int64_t>(codes.size()) == DICE_NUM_CODES, op, ": codes must have ", DICE_NUM_CODES,
              " entries (the DICE_CODE_* positions of torch_medloss._contract), got ", codes.size());
  TORCH_CHECK(static_cast<int64_t>(scalars.size()) == DICE_NUM_SCALARS, op, ": scalars must have ",
              DICE_NUM_SCALARS, " entries (the DICE_SCALAR_* positions of torch_medloss._contract), got ",
              scalars.size());
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
  OpCodes k;
  k.labels = codes[DICE_CODE_TARGET_IS_LABELS] != 0;
  if (k.labels) {
    TORCH_CHECK(target.dim() == 2 && target.size(0) == batch && target.size(1) == pixels, op,
                ": target must have shape (B, S) = [", batch, ", ", pixels,
                "] (a label map: codes[DICE_CODE_TARGET_IS_LABELS] = 1), got ", target.sizes());
    TORCH_CHECK(is_label_dtype(target.scalar_type()), op,
                ": target must be uint8, int8, int16, int32 or int64 (a label map), got ", target.scalar_type());
  } else {
    TORCH_CHECK(target.sizes() == logits.sizes(), op, ": target must have the logits' shape (B, C, S) = ",
                logits.sizes(), " (a dense target: codes[DICE_CODE_TARGET_IS_LABELS] = 0), got ", target.sizes());
    TORCH_CHECK(is_float_dtype(target.scalar_type()), op,
                ": target must be float32, float64, bfloat16 or float16 (a dense target), got ",
                target.scalar_type());
  }
  TORCH_CHECK(target.device() == logits.device(), op, ": target must be on the logits' device (", logits.device(),
              "), got ", target.device());
  TORCH_CHECK(params.dim() == 2 && params.size(0) == DICE_PARAM_ROWS && params.size(1) == classes, op,
              ": params must have shape (DICE_PARAM_ROWS, C) = [", DICE_PARAM_ROWS, ", ", classes, "], got ",
              params.sizes());
  TORCH_CHECK(is_float_dtype(params.scalar_type()), op,
              ": params must be float32, float64, bfloat16 or float16, got ", params.scalar_type());
  TORCH_CHECK(params.device() == logits.device(), op, ": params must be on the logits' device (", logits.device(),
              "), got ", params.device());
  check_code(op, codes, DICE_CODE_ACTIVATION, "DICE_CODE_ACTIVATION", 3, "0 (none), 1 (softmax) or 2 (sigmoid)");
  check_code(op, codes, DICE_CODE_MASK_MODE, "DICE_CODE_MASK_MODE", 4,
             "0 (none), 1 (label), 2 (channel) or 3 (sentinel)");
  check_code(op, codes, DICE_CODE_HEAD, "DICE_CODE_HEAD", 4,
             "0 (Dice), 1 (generalized Dice), 2 (Tversky) or 3 (none)");
  check_code(op, codes, DICE_CODE_REDUCTION, "DICE_CODE_REDUCTION", 3, "0 (mean), 1 (sum) or 2 (none)");
  check_code(op, codes, DICE_CODE_W_TYPE, "DICE_CODE_W_TYPE", 3, "0 (square), 1 (simple) or 2 (uniform)");
  check_code(op, codes, DICE_CODE_FOCAL, "DICE_CODE_FOCAL", 3, "0 (none), 1 (sigmoid) or 2 (softmax)");
  check_code(op, codes, DICE_CODE_FOCAL_ALPHA, "DICE_CODE_FOCAL_ALPHA", 3,
             "0 (none), 1 (scalar) or 2 (per class)");
  check_code(op, codes, DICE_CODE_DROP_BACKGROUND, "DICE_CODE_DROP_BACKGROUND", 2, "0 or 1");
  TORCH_CHECK(codes[DICE_CODE_DROP_BACKGROUND] == 0 || classes >= 2, op,
              ": codes[DICE_CODE_DROP_BACKGROUND] = 1 (leave class 0 out) needs C >= 2 classes, got shape ",
              logits.sizes());
  k.activation = codes[DICE_CODE_ACTIVATION];
  k.ignore_index = codes[DICE_CODE_IGNORE_INDEX];
  k.mask_mode = codes[DICE_CODE_MASK_MODE];
  TORCH_CHECK(k.labels || k.mask_mode != MASK_CHANNEL || (k.ignore_index >= 0 && k.ignore_index < classes), op,
              ": codes[DICE_CODE_IGNORE_INDEX] must be a channel in [0, ", classes,
              ") for mask mode 2 (channel: w = 1 - y[ignore_index]), got ", k.ignore_index);
  k.squared = codes[DICE_CODE_SQUARED] != 0;
  k.with_ce = codes[DICE_CODE_WITH_CE] != 0;
  k.batch = codes[DICE_CODE_BATCH] != 0;
  k.focal = codes[DICE_CODE_FOCAL];
  k.alpha_mode = codes[DICE_CODE_FOCAL_ALPHA];
  k.drop = codes[DICE_CODE_DROP_BACKGROUND];
  k.head = codes[DICE_CODE_HEAD];
  k.reduction = codes[DICE_CODE_REDUCTION];
  k.label_smoothing = scalars[DICE_SCALAR_LABEL_SMOOTHING];
  k.focal_gamma = scalars[DICE_SCALAR_FOCAL_GAMMA];
  k.focal_alpha = scalars[DICE_SCALAR_FOCAL_ALPHA];
  return k;
}

// A tensor the backward reads: its shape, a float dtype, the logits' device.
void check_upstream(const char* op, const char* name, const at::Tensor& grad, at::IntArrayRef shape,
                    const char* shape_name, const at::Tensor& logits) {
  TORCH_CHECK(grad.sizes() == shape, op, ": ", name, " must have shape ", shape_name, " = ", shape, ", got ",
              grad.sizes());
  TORCH_CHECK(is_float_dtype(grad.scalar_type()), op, ": ", name,
              " must be float32, float64, bfloat16 or float16, got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == logits.device(), op, ": ", name, " must be on the logits' device (",
              logits.device(), "), got ", grad.device());
}

// The dice_loss op's loss shape (_contract.dice_loss_shape): () for mean and sum; for "none" the focal map
// (B, C', S) of HEAD_NONE, else (B or nothing with batch) x (C' kept classes, or 1 for generalized Dice).
std::vector<int64_t> loss_shape(const OpCodes& k, int64_t batch, int64_t classes, int64_t pixels) {
  using namespace contract;
  if (k.reduction != REDUCTION_NONE) {
    return {};
  }
  const int64_t kept = classes - k.drop;
  if (k.head == HEAD_NONE) {
    return {batch, kept, pixels};
  }
  const int64_t per_unit = k.head == HEAD_GENERALIZED ? 1 : kept;
  return k.batch ? std::vector<int64_t>{per_unit} : std::vector<int64_t>{batch, per_unit};
}

// The loss ops' codes: the focal term alone skips the Dice part.
OpCodes loss_codes(OpCodes k) {
  k.dice_part = k.head != contract::HEAD_NONE || k.with_ce;
  return k;
}

// FocalLoss's reduction "none": the loss is the (B, C', S) map of the focal terms, written by the forward pass.
bool is_focal_map(const OpCodes& k) {
  return k.head == contract::HEAD_NONE && k.reduction == contract::REDUCTION_NONE;
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
  if (o.mask_mode == MASK_CHANNEL) {
    const acc_t* ignored = rows.y + o.ignore_index * rows.y_row;
    MEDLOSS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      w[j] = acc_t(1) - ignored[j];
    }
  } else if (o.mask_mode == MASK_SENTINEL) {
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

// The tile options: the codes, and the per-class rows of params (DICE_PARAM_ROWS, C), contiguous acc_t.
template <typename acc_t>
Options<acc_t> make_options(const OpCodes& k, int64_t classes, const acc_t* params) {
  using namespace contract;
  Options<acc_t> o;
  o.classes = classes;
  o.tile = tile_pixels(classes);
  o.ignore_index = k.ignore_index;
  o.mask_mode = k.mask_mode;
  o.with_ce = k.with_ce;
  // As in the reference: the Python floats 1 - eps and eps / C, rounded once to the accumulation type.
  o.keep = static_cast<acc_t>(1.0 - k.label_smoothing);
  o.spread = static_cast<acc_t>(k.label_smoothing / static_cast<double>(classes));
  o.gamma = params + DICE_PARAM_GAMMA * classes;
  o.ce_weight = params + DICE_PARAM_CE_WEIGHT * classes;
  o.focal = k.focal;
  o.alpha_mode = k.alpha_mode;
  o.drop = k.drop;
  o.focal_gamma = static_cast<acc_t>(k.focal_gamma);
  o.focal_alpha = static_cast<acc_t>(k.focal_alpha);
  o.alpha = params + DICE_PARAM_FOCAL_ALPHA * classes;
  o.focal_weight = params + DICE_PARAM_FOCAL_WEIGHT * classes;
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

// Fills sums (B, C, DICE_NUM_SUMS) and extras (B, DICE_NUM_EXTRAS), both contiguous acc_t and zero on entry, and,
// given a map ((B, C', S) contiguous acc_t), the focal terms of every element.
template <typename scalar_t, typename target_t, typename acc_t>
void forward_impl(const Options<acc_t>& o, int64_t activation, bool squared, bool dice_part, const at::Tensor& logits,
                  const at::Tensor& target, acc_t* sums_out, acc_t* extras_out, acc_t* map) {
  constexpr bool kLabels = std::is_integral_v<target_t>;
  const int64_t batch = logits.size(0);
  const int64_t classes = o.classes;
  const int64_t pixels = logits.size(2);
  const int64_t kept = classes - o.drop;
  const int64_t tile = o.tile;
  const int64_t chunks = ceil_div(pixels, kChunkPixels);
  // A partial row: the sums of each class, then ce_num, ce_den and the valid pixels (kRow*).
  const int64_t sums_width = classes * DICE_NUM_SUMS;
  const int64_t row = sums_width + kRowExtras;
  std::vector<acc_t> partial(batch * chunks * row);
  std::vector<int64_t> invalid(batch * chunks);

  const TileKernels<acc_t>& kernels = tile_kernels<acc_t>(cpu_isa());
  const Source<scalar_t, target_t, acc_t> source(logits, target, kernels);
  // activation is 0, 1 or 2, focal and the alpha mode in range (check_inputs).
  const ForwardTile<acc_t> tile_fn = kernels.forward[activation][squared][kLabels];
  const FocalForwardTile<acc_t> focal_fn =
      o.focal == FOCAL_NONE ? nullptr : kernels.focal_forward[o.focal - 1][o.alpha_mode][kLabels];

  at::parallel_for(0, batch * chunks, /*grain_size=*/1, [&](int64_t first_task, int64_t last_task) {
    Scratch<acc_t> s(classes, tile, row, /*backward=*/false, /*focal=*/focal_fn != nullptr);
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
        if (dice_part) {
          tile_fn(o, rows, n, s);
        } else {
          // Only the valid pixels, added to their lanes as the tile adds them.
          acc_t* valid = s.lanes.data() + (sums_width + kRowValid) * kLanes;
          for (int64_t j = 0; j < n; ++j) {
            valid[j % kLanes] += s.w[j];
          }
        }
        if (focal_fn != nullptr) {
          focal_fn(o, rows, n, s, map == nullptr ? nullptr : map + b * kept * pixels + first, pixels);
        }
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
      std::copy(total.begin(), total.begin() + sums_width, sums_out + b * sums_width);
      acc_t* extra = extras_out + b * DICE_NUM_EXTRAS;
      extra[contract::DICE_EXTRA_CE_NUM] = total[sums_width + kRowCeNum];
      // Dense targets: ce_den is the pixel count, as the reference's float(S).
      extra[contract::DICE_EXTRA_CE_DEN] =
          kLabels || !o.with_ce ? total[sums_width + kRowCeDen] : static_cast<acc_t>(pixels);
      extra[contract::DICE_EXTRA_INVALID] = static_cast<acc_t>(bad);
      extra[contract::DICE_EXTRA_VALID] = total[sums_width + kRowValid];
    }
  });
}

// Fills grad (B, C, S), in logits' dtype and with its own strides. up_sums: (B, C, DICE_NUM_SUMS) and up_ce: (B,)
// (d / d ce_num), contiguous acc_t; focal_map: the upstream of the focal map ((B, C', S) contiguous acc_t), or
// nullptr.
template <typename scalar_t, typename target_t, typename acc_t>
void backward_impl(const Options<acc_t>& o, int64_t activation, bool squared, bool dice_part, const acc_t* up_sums,
                   const acc_t* up_ce, const acc_t* focal_map, const at::Tensor& logits, const at::Tensor& target,
                   at::Tensor& grad) {
  constexpr bool kLabels = std::is_integral_v<target_t>;
  const int64_t batch = logits.size(0);
  const int64_t classes = o.classes;
  const int64_t pixels = logits.size(2);
  const int64_t kept = classes - o.drop;
  const int64_t tile = o.tile;
  const int64_t chunks = ceil_div(pixels, kChunkPixels);

  const TileKernels<acc_t>& kernels = tile_kernels<acc_t>(cpu_isa());
  const Source<scalar_t, target_t, acc_t> source(logits, target, kernels);
  scalar_t* dx = grad.mutable_data_ptr<scalar_t>();
  const int64_t g_b = grad.stride(0), g_c = grad.stride(1), g_s = grad.stride(2);
  const BackwardTile<acc_t> tile_fn = kernels.backward[activation][squared][kLabels];
  const FocalBackwardTile<acc_t> focal_fn =
      o.focal == FOCAL_NONE ? nullptr : kernels.focal_backward[o.focal - 1][o.alpha_mode][kLabels];
  const Scatter<scalar_t, acc_t> scatter_fn = std::get<Scatter<scalar_t, acc_t>>(kernels.scatter);

  at::parallel_for(0, batch * chunks, /*grain_size=*/1, [&](int64_t first_task, int64_t last_task) {
    Scratch<acc_t> s(classes, tile, 0, /*backward=*/true, /*focal=*/focal_fn != nullptr);
    Rows<acc_t> rows;
    for (int64_t task = first_task; task < last_task; ++task) {
      const int64_t b = task / chunks;
      const int64_t begin = (task % chunks) * kChunkPixels;
      const int64_t end = std::min(pixels, begin + kChunkPixels);
      const Upstream<acc_t> up{up_sums + b * classes * DICE_NUM_SUMS, up_ce[b], nullptr, pixels};
      for (int64_t first = begin; first < end; first += tile) {
        const int64_t n = std::min(tile, end - first);
        source.load(o, b, first, n, s, rows);
        Upstream<acc_t> tile_up = up;  // the focal map's upstream at this tile's pixels
        if (focal_map != nullptr) {
          tile_up.focal_map = focal_map + b * kept * pixels + first;
        }
        // An acc_t gradient with unit pixel stride is written in place, row by row; any other is scattered.
        acc_t* out = s.g.data();
        int64_t out_row = tile;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          if (g_s == 1) {
            out = dx + b * g_b + first;
            out_row = g_c;
          }
        }
        if (dice_part) {
          tile_fn(o, up, rows, n, s, out, out_row);
        } else {
          for (int64_t c = 0; c < classes; ++c) {
            std::fill(out + c * out_row, out + c * out_row + n, acc_t(0));
          }
        }
        if (focal_fn != nullptr) {
          focal_fn(o, tile_up, rows, n, s, out, out_row);
        }
        if (out == s.g.data()) {
          scatter_fn(s.g.data(), g_c, g_s, classes, first, n, tile, dx + b * g_b);
        }
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

// The forward pass of both ops into sums and extras (zero, contiguous, accumulation dtype) and, given one, the focal
// map (the loss op's (B, C', S) loss).
void run_forward(const OpCodes& k, const at::Tensor& logits, const at::Tensor& target, const at::Tensor& params,
                 at::Tensor& sums, at::Tensor& extras, at::Tensor* map) {
  if (logits.numel() == 0) {
    return;  // empty S: every sum is 0, ce_den (S) included
  }
  // params is (5, C): converting it is cheap, unlike the logits and the target.
  const at::Tensor params_acc = params.to(accumulator(logits)).contiguous();
  dispatch(logits, target, k.labels, [&](auto logit_type, auto target_type) {
    using scalar_t = typename decltype(logit_type)::type;
    using target_t = typename decltype(target_type)::type;
    using acc_t = at::opmath_type<scalar_t>;
    const Options<acc_t> o = make_options<acc_t>(k, logits.size(1), params_acc.const_data_ptr<acc_t>());
    forward_impl<scalar_t, target_t, acc_t>(o, k.activation, k.squared, k.dice_part, logits, target,
                                            sums.mutable_data_ptr<acc_t>(), extras.mutable_data_ptr<acc_t>(),
                                            map == nullptr ? nullptr : map->mutable_data_ptr<acc_t>());
  });
}

// The backward pass of both ops: up_sums (B, C, DICE_NUM_SUMS), up_ce (B,) and the focal map's upstream (or an
// undefined tensor), contiguous in the accumulation dtype.
at::Tensor run_backward(const OpCodes& k, const at::Tensor& up_sums, const at::Tensor& up_ce,
                        const at::Tensor& focal_map, const at::Tensor& logits, const at::Tensor& target,
                        const at::Tensor& params) {
  // Same strides as the logits for a dense, non-overlapping layout (channels_last stays channels_last).
  at::Tensor grad = at::empty_like(logits);
  if (logits.numel() == 0) {
    return grad;
  }
  const at::Tensor params_acc = params.to(accumulator(logits)).contiguous();
  dispatch(logits, target, k.labels, [&](auto logit_type, auto target_type) {
    using scalar_t = typename decltype(logit_type)::type;
    using target_t = typename decltype(target_type)::type;
    using acc_t = at::opmath_type<scalar_t>;
    const Options<acc_t> o = make_options<acc_t>(k, logits.size(1), params_acc.const_data_ptr<acc_t>());
    backward_impl<scalar_t, target_t, acc_t>(o, k.activation, k.squared, k.dice_part,
                                             up_sums.const_data_ptr<acc_t>(), up_ce.const_data_ptr<acc_t>(),
                                             focal_map.defined() ? focal_map.const_data_ptr<acc_t>() : nullptr,
                                             logits, target, grad);
  });
  return grad;
}

// ---------------------------------------------------------------------------------------------------------- ops

std::tuple<at::Tensor, at::Tensor> dice_sums_fwd_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                     const at::Tensor& params, at::IntArrayRef codes,
                                                     at::ArrayRef<double> scalars) {
  constexpr const char* op = "torch_medloss::dice_sums_fwd";
  const OpCodes k = check_inputs(op, logits, target, params, codes, scalars);
  const at::TensorOptions acc = logits.options().dtype(accumulator(logits));
  at::Tensor sums = at::zeros({logits.size(0), logits.size(1), DICE_NUM_SUMS}, acc);
  at::Tensor extras = at::zeros({logits.size(0), DICE_NUM_EXTRAS}, acc);
  run_forward(k, logits, target, params, sums, extras, nullptr);
  return {sums, extras};
}

at::Tensor dice_sums_bwd_cpu(const at::Tensor& grad_sums, const at::Tensor& grad_extras, const at::Tensor& logits,
                             const at::Tensor& target, const at::Tensor& params, at::IntArrayRef codes,
                             at::ArrayRef<double> scalars) {
  constexpr const char* op = "torch_medloss::dice_sums_bwd";
  const OpCodes k = check_inputs(op, logits, target, params, codes, scalars);
  const int64_t batch = logits.size(0), classes = logits.size(1);
  check_upstream(op, "grad_sums", grad_sums, {batch, classes, DICE_NUM_SUMS}, "(B, C, DICE_NUM_SUMS)", logits);
  check_upstream(op, "grad_extras", grad_extras, {batch, DICE_NUM_EXTRAS}, "(B, DICE_NUM_EXTRAS)", logits);
  const at::ScalarType acc = accumulator(logits);
  // Only ce_num of the extras has a gradient (ce_den, the invalid and the valid counts are constants).
  return run_backward(k, grad_sums.to(acc).contiguous(),
                      grad_extras.select(1, contract::DICE_EXTRA_CE_NUM).to(acc).contiguous(), at::Tensor(), logits,
                      target, params);
}

std::tuple<at::Tensor, at::Tensor> dice_loss_fwd_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                     const at::Tensor& params, at::IntArrayRef codes,
                                                     at::ArrayRef<double> scalars) {
  constexpr const char* op = "torch_medloss::dice_loss_fwd";
  const OpCodes k = loss_codes(check_inputs(op, logits, target, params, codes, scalars));
  const int64_t batch = logits.size(0), classes = logits.size(1), pixels = logits.size(2);
  const at::TensorOptions acc = logits.options().dtype(accumulator(logits));
  const bool focal_map = is_focal_map(k);
  // The focal map is written by the forward pass; without a focal term it is the reference's map of zeros.
  at::Tensor loss = focal_map && k.focal == FOCAL_NONE ? at::zeros(loss_shape(k, batch, classes, pixels), acc)
                                                       : at::empty(loss_shape(k, batch, classes, pixels), acc);
  // Zeros: the head leaves column C of all but the two slots of image 0 unwritten (the backward never reads them),
  // and an output must not hold whatever the allocator had (opcheck compares two calls).
  at::Tensor coefficients = at::zeros({batch, DICE_NUM_SUMS, classes + 1}, acc);
  at::Tensor sums = at::zeros({batch, classes, DICE_NUM_SUMS}, acc);
  at::Tensor extras = at::zeros({batch, DICE_NUM_EXTRAS}, acc);
  run_forward(k, logits, target, params, sums, extras, focal_map ? &loss : nullptr);
  // The head (csrc/dice_head.h) on the host: O(B C) serial work, deterministic.
  const dice_head::Options head = dice_head::read_options(codes.data(), scalars.data());
  const at::Tensor params_acc = params.to(acc.dtype()).contiguous();
  AT_DISPATCH_FLOATING_TYPES(sums.scalar_type(), "dice_loss_fwd_cpu", [&] {
    std::vector<scalar_t> scratch(dice_head::scratch_size(classes));
    dice_head::finish<scalar_t>(sums.const_data_ptr<scalar_t>(), extras.const_data_ptr<scalar_t>(),
                                params_acc.const_data_ptr<scalar_t>() + contract::DICE_PARAM_WEIGHT * classes, batch,
                                classes, head, loss.mutable_data_ptr<scalar_t>(),
                                coefficients.mutable_data_ptr<scalar_t>(), scratch.data());
  });
  return {loss, coefficients};
}

// grad_sums (B, C, DICE_NUM_SUMS) and d / d ce_num (B,) from the coefficients and the loss's upstream gradient:
// grad_sums[b, c, k] = coefficients[b, k, c] times the upstream of the loss element of (b, c) (the whole loss for
// mean and sum; for "none" the element of image b, or of the batch, and of class c - drop, or the unit's one value
// of generalized Dice). With the focal map the F row's upstream is per element (the backward pass reads it), and
// there is no Dice part. The cross entropy's coefficient is in column C of image 0.
template <typename acc_t>
void upstream_from_coefficients(const OpCodes& k, const acc_t* coef, const acc_t* up, int64_t up_numel,
                                int64_t batch, int64_t classes, acc_t* grad_sums, acc_t* grad_ce) {
  using namespace contract;
  const int64_t width = classes + 1;
  const int64_t kept = classes - k.drop;
  const bool none = k.reduction == REDUCTION_NONE;
  const bool focal_map = is_focal_map(k);
  for (int64_t b = 0; b < batch; ++b) {
    const acc_t* cb = coef + b * DICE_NUM_SUMS * width;
    for (int64_t c = 0; c < classes; ++c) {
      acc_t u = acc_t(0);
      if (!none) {
        u = up[0];
      } else if (!focal_map && k.head == HEAD_GENERALIZED) {
        u = up[k.batch ? 0 : b];
      } else if (!focal_map && c >= k.drop) {
        u = up[(k.batch ? 0 : b * kept) + c - k.drop];
      }
      acc_t* g = grad_sums + (b * classes + c) * DICE_NUM_SUMS;
      g[DICE_SUM_I] = cb[DICE_SUM_I * width + c] * u;
      g[DICE_SUM_P] = cb[DICE_SUM_P * width + c] * u;
      g[DICE_SUM_G] = acc_t(0);
      g[DICE_SUM_D] = cb[DICE_SUM_D * width + c] * u;
      g[DICE_SUM_F] = focal_map ? cb[DICE_SUM_F * width + c] : cb[DICE_SUM_F * width + c] * u;
    }
  }
  const acc_t ce = batch > 0 && !none && up_numel > 0 ? coef[DICE_SLOT_CE * width + classes] * up[0] : acc_t(0);
  std::fill(grad_ce, grad_ce + batch, ce);
}

at::Tensor dice_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& coefficients, const at::Tensor& logits,
                             const at::Tensor& target, const at::Tensor& params, at::IntArrayRef codes,
                             at::ArrayRef<double> scalars) {
  constexpr const char* op = "torch_medloss::dice_loss_bwd";
  const OpCodes k = loss_codes(check_inputs(op, logits, target, params, codes, scalars));
  const int64_t batch = logits.size(0), classes = logits.size(1), pixels = logits.size(2);
  check_upstream(op, "grad_loss", grad_loss, loss_shape(k, batch, classes, pixels),
                 "the loss's (_contract.dice_loss_shape)", logits);
  check_upstream(op, "coefficients", coefficients, {batch, DICE_NUM_SUMS, classes + 1}, "(B, DICE_NUM_SUMS, C + 1)",
                 logits);
  const at::TensorOptions acc = logits.options().dtype(accumulator(logits));
  const at::Tensor up = grad_loss.to(acc.dtype()).contiguous();
  const at::Tensor coef = coefficients.to(acc.dtype()).contiguous();
  at::Tensor up_sums = at::empty({batch, classes, DICE_NUM_SUMS}, acc);
  at::Tensor up_ce = at::empty({batch}, acc);
  AT_DISPATCH_FLOATING_TYPES(up_sums.scalar_type(), "dice_loss_bwd_cpu", [&] {
    upstream_from_coefficients<scalar_t>(k, coef.const_data_ptr<scalar_t>(), up.const_data_ptr<scalar_t>(),
                                         up.numel(), batch, classes, up_sums.mutable_data_ptr<scalar_t>(),
                                         up_ce.mutable_data_ptr<scalar_t>());
  });
  return run_backward(k, up_sums, up_ce, is_focal_map(k) ? up : at::Tensor(), logits, target, params);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_medloss, CPU, m) {
  m.impl("dice_sums_fwd", &dice_sums_fwd_cpu);
  m.impl("dice_sums_bwd", &dice_sums_bwd_cpu);
  m.impl("dice_loss_fwd", &dice_loss_fwd_cpu);
  m.impl("dice_loss_bwd", &dice_loss_bwd_cpu);
}

}  // namespace torch_medloss
