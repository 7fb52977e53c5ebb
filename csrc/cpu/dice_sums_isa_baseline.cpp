// The Dice tile functions compiled for the baseline instruction set (float32): see dice_sums_tiles_impl.h and isa.h.
#define MEDLOSS_TILE_TARGET
#include "dice_sums_tiles_impl.h"

namespace torch_medloss {
namespace dice_sums_cpu {

const TileKernels<float>& float_tiles_baseline() {
  static const TileKernels<float> kernels = make_tile_kernels<float>();
  return kernels;
}

}  // namespace dice_sums_cpu
}  // namespace torch_medloss
