// The Dice kernels' interface between their op file (dice_sums_kernel.cpp: argument checks, the parallel drivers,
// the registration) and their per-instruction-set files (dice_sums_isa_<isa>.cpp, which compile
// dice_sums_tiles_impl.h's tile functions for one instruction set each): the constants, the task's buffers, and a
// table of entry points per instruction set. Named namespace, no ATen: both sides must see the same types.
#pragma once

#include "../contract.h"
#include "isa.h"

#include <cstdint>
#include <vector>

namespace torch_medloss {
namespace dice_sums_cpu {

// Running sums per (class, quantity) in the forward: lane m takes the pixels j = m mod kLanes of every tile. A
// constant, not the vector width: the sums are the same whatever instruction set runs them.
constexpr int64_t kLanes = 16;

// The contract's codes and sizes (csrc/contract.h), under the names the tile code uses.
using contract::ACTIVATION_NONE;
using contract::ACTIVATION_SIGMOID;
using contract::ACTIVATION_SOFTMAX;
using contract::ALPHA_NONE;
using contract::ALPHA_PER_CLASS;
using contract::ALPHA_SCALAR;
using contract::DICE_NUM_EXTRAS;
using contract::DICE_NUM_SUMS;
using contract::DICE_SUM_D;
using contract::DICE_SUM_F;
using contract::DICE_SUM_G;
using contract::DICE_SUM_I;
using contract::DICE_SUM_P;
using contract::FOCAL_NONE;
using contract::FOCAL_SIGMOID;
using contract::FOCAL_SOFTMAX;
using contract::MASK_CHANNEL;
using contract::MASK_LABEL;
using contract::MASK_NONE;
using contract::MASK_SENTINEL;

// A forward partial row: the sums of each class (DICE_NUM_SUMS per class), then these three.
constexpr int64_t kRowCeNum = 0, kRowCeDen = 1, kRowValid = 2, kRowExtras = 3;

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
  // The focal term (FOCAL_* and ALPHA_* of the contract), on the classes c >= drop.
  int64_t focal;
  int64_t alpha_mode;
  int64_t drop;
  acc_t focal_gamma;
  acc_t focal_alpha;           // ALPHA_SCALAR
  const acc_t* alpha;          // (C,), ALPHA_PER_CLASS
  const acc_t* focal_weight;   // (C,)
};

// The class rows of one tile: class c of the logits at x + c * x_row, of a dense target at y + c * y_row (unused
// for labels). In place in the tensors, or in the task's gather buffers (row = T).
template <typename acc_t>
struct Rows {
  const acc_t* x;
  int64_t x_row;
  const acc_t* y;
  int64_t y_row;
};

// One task's buffers: class-major (C * T) tiles and per-pixel (T) rows. lane_rows > 0: the forward's running sums.
// focal: the softmax focal term's tiles (empty otherwise).
template <typename acc_t>
struct Scratch {
  Scratch(int64_t classes, int64_t tile, int64_t lane_rows, bool backward, bool focal)
      : x(classes * tile),
        y(classes * tile),
        e(classes * tile),
        g(backward ? classes * tile : 0),
        w(tile),
        v(tile),
        max(tile),
        inv(tile),
        log_sum(tile),
        total(tile),
        dot(tile),
        label(tile),
        lanes(lane_rows * kLanes),
        focal_e(focal ? classes * tile : 0),
        focal_g(focal && backward ? classes * tile : 0),
        focal_max(focal ? tile : 0),
        focal_inv(focal ? tile : 0),
        focal_log(focal ? tile : 0),
        focal_dot(focal && backward ? tile : 0),
        focal_row(focal ? tile : 0) {}

  std::vector<acc_t> x;  // gathered logits
  std::vector<acc_t> y;  // gathered dense target
  std::vector<acc_t> e;  // exp(x - max); the softmax backward replaces it by p
  std::vector<acc_t> g;  // backward: the gradient before the second pass, and the tile scatter writes out
  std::vector<acc_t> w;  // valid-pixel weight
  std::vector<acc_t> v;  // 1 where the pixel counts in the cross entropy
  std::vector<acc_t> max, inv, log_sum;  // softmax statistics: max_c x, 1 / sum_c exp(x - max), log of that sum
  std::vector<acc_t> total;              // cross entropy: sum over the classes (of the loss, or of the shares)
  std::vector<acc_t> dot;                // softmax backward: sum_c p_c g_c
  std::vector<int32_t> label;            // the tile's labels, -1 when out of range
  std::vector<acc_t> lanes;              // forward: lane m of partial-row entry k at k * kLanes + m
  // The focal term. Softmax form, over the kept classes of the masked logits x w: exp(x w - max) (then p), the
  // backward's upstream times d loss / d log p per class, and per pixel the max, 1 / sum, log(sum) and the class
  // sum of that product. Both forms: one class row of terms (forward) or of upstream gradients (backward).
  std::vector<acc_t> focal_e, focal_g, focal_max, focal_inv, focal_log, focal_dot, focal_row;
};

// Upstream gradients of one image: grad_sums row (C, DICE_NUM_SUMS), d/d ce_num and, for the focal map of the loss
// op (FocalLoss's reduction "none"), the upstream of each element of the map: class c - drop of the tile's pixel j
// at focal_map[(c - drop) * focal_map_row + j] (nullptr: the F row of sums is the focal term's upstream).
template <typename acc_t>
struct Upstream {
  const acc_t* sums;
  acc_t ce_num;
  const acc_t* focal_map;
  int64_t focal_map_row;
};

template <typename scalar_t, typename acc_t>
using Gather = void (*)(const scalar_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, acc_t*);
template <typename scalar_t, typename acc_t>
using Scatter = void (*)(const acc_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, scalar_t*);
template <typename label_t, typename acc_t>
using LoadLabels = int64_t (*)(const Options<acc_t>&, const label_t*, int64_t, int64_t, int64_t, Scratch<acc_t>&);
template <typename acc_t>
using ForwardTile = void (*)(const Options<acc_t>&, const Rows<acc_t>&, int64_t, Scratch<acc_t>&);
template <typename acc_t>
using BackwardTile = void (*)(const Options<acc_t>&, const Upstream<acc_t>&, const Rows<acc_t>&, int64_t,
                              Scratch<acc_t>&, acc_t*, int64_t);
// The focal term of one tile, run after the Dice tile (which has loaded w and the labels): the forward adds F to
// the lanes and, given a map (class c - drop at map + (c - drop) * map_row), writes each element there; the
// backward adds its gradient to the rows the Dice tile wrote.
template <typename acc_t>
using FocalForwardTile = void (*)(const Options<acc_t>&, const Rows<acc_t>&, int64_t, Scratch<acc_t>&, acc_t*,
                                  int64_t);
template <typename acc_t>
using FocalBackwardTile = void (*)(const Options<acc_t>&, const Upstream<acc_t>&, const Rows<acc_t>&, int64_t,
                                   Scratch<acc_t>&, acc_t*, int64_t);

// The entry points of one instruction set for one accumulation type. The tiles are indexed by [activation][squared]
// [target is labels], the focal tiles by [focal mode - 1][alpha mode][target is labels]: the switches that are
// template arguments of the tile functions. The focal term has entry points of its own, called only when it is on,
// so that it costs the Dice tiles nothing (and does not multiply their instantiations by three).
template <typename acc_t>
struct TileKernels {
  ForwardTile<acc_t> forward[3][2][2];
  BackwardTile<acc_t> backward[3][2][2];
  FocalForwardTile<acc_t> focal_forward[2][3][2];
  FocalBackwardTile<acc_t> focal_backward[2][3][2];
  PerFloatDtype<acc_t, Gather> gather;            // logits, and dense targets of any float dtype
  PerLogitDtype<acc_t, Scatter> scatter;          // the gradient, in the logits' dtype
  PerLabelDtype<acc_t, LoadLabels> load_labels;  // label maps of any integer dtype
};

// Defined in dice_sums_isa_baseline.cpp, dice_sums_isa_avx2.cpp (when MEDLOSS_WITH_AVX2), dice_sums_isa_avx512.cpp
// (when MEDLOSS_WITH_AVX512) and dice_sums_isa_baseline_f64.cpp (float64 always takes the baseline: its math is
// libm's anyway).
const TileKernels<float>& float_tiles_baseline();
const TileKernels<float>& float_tiles_avx2();
const TileKernels<float>& float_tiles_avx512();
const TileKernels<double>& double_tiles();

}  // namespace dice_sums_cpu
}  // namespace torch_medloss
