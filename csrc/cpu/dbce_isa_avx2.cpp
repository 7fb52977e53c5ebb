// The DBCE cross entropy's tasks compiled for AVX2 and FMA (float32): see dbce_ce_tasks_impl.h and isa.h.
#include "isa.h"

#if MEDLOSS_WITH_AVX2

#define MEDLOSS_TILE_TARGET MEDLOSS_TARGET_AVX2
#include "dbce_ce_tasks_impl.h"

namespace torch_medloss {
namespace dbce_cpu {

const CeKernels<float>& float_tasks_avx2() {
  static const CeKernels<float> kernels = make_ce_kernels<float>();
  return kernels;
}

}  // namespace dbce_cpu
}  // namespace torch_medloss

#endif  // MEDLOSS_WITH_AVX2
