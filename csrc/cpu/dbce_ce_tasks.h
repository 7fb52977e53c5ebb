// The DBCE cross entropy's interface between its op file (dbce_kernel.cpp: checks, drivers, registration) and its
// per-instruction-set files (dbce_isa_<isa>.cpp, which compile dbce_ce_tasks_impl.h's per-task code for one
// instruction set each): the task's inputs and buffers, and a table of entry points per instruction set. Named
// namespace, no ATen: both sides must see the same types.
#pragma once

#include "isa.h"

#include <cstdint>
#include <vector>

namespace torch_medloss {
namespace dbce_cpu {

// Cross entropy: pixels per tile (C <= 64, so a tile is at most 4096 elements).
constexpr int64_t kTilePixels = 64;

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

// Reads n labels (from row[first * stride]) as int32 labels, -1 where out of [0, C) or == ignore_index.
using LoadLabels = void (*)(const void* row, int64_t stride, int64_t first, int64_t n, int64_t classes,
                            int64_t ignore_index, int32_t* out);
// Reads n masks as int64 (sign-extended).
using LoadMasks = void (*)(const void* row, int64_t stride, int64_t first, int64_t n, int64_t* out);

struct Loaders {
  LoadLabels labels;
  LoadMasks masks;
};

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

template <typename scalar_t, typename acc_t>
using ForwardTask = void (*)(const CeInputs<scalar_t, acc_t>&, int64_t, int64_t, int64_t, CeScratch<acc_t>&, acc_t*,
                             acc_t*);
template <typename scalar_t, typename acc_t>
using BackwardTask = void (*)(const CeInputs<scalar_t, acc_t>&, int64_t, int64_t, int64_t, CeScratch<acc_t>&, acc_t,
                              const acc_t*, scalar_t*, int64_t, int64_t);

// The entry points of one instruction set for one accumulation type, one per logits dtype that accumulates in it.
template <typename acc_t>
struct CeKernels {
  PerLogitDtype<acc_t, ForwardTask> forward;
  PerLogitDtype<acc_t, BackwardTask> backward;
};

// Defined in dbce_isa_baseline.cpp (float32 and float64: float64 always takes the baseline, its math is libm's
// anyway), dbce_isa_avx2.cpp (when MEDLOSS_WITH_AVX2) and dbce_isa_avx512.cpp (when MEDLOSS_WITH_AVX512).
const CeKernels<float>& float_tasks_baseline();
const CeKernels<float>& float_tasks_avx2();
const CeKernels<float>& float_tasks_avx512();
const CeKernels<double>& double_tasks();

}  // namespace dbce_cpu
}  // namespace torch_medloss
