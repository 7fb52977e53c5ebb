// The Dice tile functions compiled for AVX2 and FMA (float32): see dice_sums_tiles_impl.h and isa.h.
#include "isa.h"

#if MEDLOSS_WITH_AVX2

#define MEDLOSS_TILE_TARGET MEDLOSS_TARGET_AVX2
#include "dice_sums_tiles_impl.h"

namespace torch_medloss {
namespace dice_sums_cpu {

const TileKernels<float>& float_tiles_avx2() {
  static const TileKernels<float> kernels = make_tile_kernels<float>();
  return kernels;
}

}  // namespace dice_sums_cpu
}  // namespace torch_medloss

#endif  // MEDLOSS_WITH_AVX2
