// The DBCE cross entropy's tasks compiled for AVX-512 (float32): see dbce_ce_tasks_impl.h and isa.h.
#include "isa.h"

#if MEDLOSS_WITH_AVX512

#define MEDLOSS_TILE_TARGET MEDLOSS_TARGET_AVX512
#include "dbce_ce_tasks_impl.h"

namespace torch_medloss {
namespace dbce_cpu {

const CeKernels<float>& float_tasks_avx512() {
  static const CeKernels<float> kernels = make_ce_kernels<float>();
  return kernels;
}

}  // namespace dbce_cpu
}  // namespace torch_medloss

#endif  // MEDLOSS_WITH_AVX512
