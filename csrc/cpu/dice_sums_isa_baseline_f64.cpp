// The Dice tile functions for float64, which always take the baseline instruction set (their math is libm's): see
// dice_sums_tiles_impl.h and isa.h. A file of their own, beside dice_sums_isa_baseline.cpp's float32 ones, so that
// the two build in parallel.
#define MEDLOSS_TILE_TARGET
#include "dice_sums_tiles_impl.h"

namespace torch_medloss {
namespace dice_sums_cpu {

const TileKernels<double>& double_tiles() {
  static const TileKernels<double> kernels = make_tile_kernels<double>();
  return kernels;
}

}  // namespace dice_sums_cpu
}  // namespace torch_medloss
