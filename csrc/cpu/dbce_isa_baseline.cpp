// The DBCE cross entropy's tasks compiled for the baseline instruction set (float32, and float64, which always
// takes the baseline: its math is libm's): see dbce_ce_tasks_impl.h and isa.h.
#define MEDLOSS_TILE_TARGET
#include "dbce_ce_tasks_impl.h"

namespace torch_medloss {
namespace dbce_cpu {

const CeKernels<float>& float_tasks_baseline() {
  static const CeKernels<float> kernels = make_ce_kernels<float>();
  return kernels;
}

const CeKernels<double>& double_tasks() {
  static const CeKernels<double> kernels = make_ce_kernels<double>();
  return kernels;
}

}  // namespace dbce_cpu
}  // namespace torch_medloss
