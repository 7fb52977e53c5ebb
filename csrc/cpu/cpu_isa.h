// cpu_isa(): the instruction set of the float32 tile functions, picked once per process (see isa.h). Included by
// the op files only (<op>_kernel.cpp): it needs ATen, which the per-instruction-set files do without.
#pragma once

#include <ATen/Version.h>

#include "isa.h"

#include <string>

namespace torch_medloss {
namespace {

// The one torch picked for its own CPU kernels (torch.backends.cpu.get_cpu_capability(): the best the CPU and the OS
// support, or the ATEN_CPU_CAPABILITY environment variable, which can force "default" to test the baseline), checked
// against the CPU once more, and capped to the instruction sets this build has (MEDLOSS_WITH_*).
inline Isa cpu_isa() {
#if MEDLOSS_X86_DISPATCH
  static const Isa isa = [] {
    const std::string capability = at::get_cpu_capability();
    __builtin_cpu_init();
    const bool avx2 = MEDLOSS_WITH_AVX2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = MEDLOSS_WITH_AVX512 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    if (capability == "AVX512" && avx512) {
      return Isa::kAvx512;
    }
    if ((capability == "AVX512" || capability == "AVX2") && avx2) {
      return Isa::kAvx2;
    }
    return Isa::kBaseline;
  }();
  return isa;
#else
  return Isa::kBaseline;
#endif
}

}  // namespace
}  // namespace torch_medloss
