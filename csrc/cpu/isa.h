// How the CPU kernels are compiled for several instruction sets, shared by every csrc/cpu file. No ATen here: the
// per-instruction-set files (<op>_isa_<isa>.cpp) include only this, vec_math.h and their op's tile headers, so that
// they compile in seconds of parsing, in parallel with the op's own file.
//
// The tile math is written once, as always-inline functions, and compiled into several entry points: one for the
// baseline instruction set (SSE2 on x86-64, NEON on aarch64) and, with GCC or Clang on x86-64, one per target
// attribute below. A function inlined into an entry point is compiled for that entry point's instruction set, which
// is why everything the entry points call in their loops is forced inline. The attribute is on the entry points
// only, never a file-wide flag or pragma: an out-of-line copy of anything else (a std:: or ATen inline function) is
// then baseline code, so the linker cannot hand AVX-512 code to a caller on another CPU. cpu_isa() (cpu_isa.h) picks
// the entry points at run time; the library runs on any CPU of its architecture.
//
// Each instruction set lives in its own translation unit, <op>_isa_baseline.cpp, <op>_isa_avx2.cpp and
// <op>_isa_avx512.cpp, so that ninja compiles them in parallel. torch_medloss/_extension.py leaves out the files of
// an instruction set it does not build and says which it builds with -DMEDLOSS_WITH_AVX2=0/1 and
// -DMEDLOSS_WITH_AVX512=0/1; cpu_isa() never picks one that is not built.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <tuple>
#include <type_traits>

#if defined(__GNUC__)
#define MEDLOSS_INLINE inline __attribute__((always_inline))
#else
#define MEDLOSS_INLINE inline
#endif
#if defined(__GNUC__) && defined(__x86_64__)
#define MEDLOSS_X86_DISPATCH 1
#define MEDLOSS_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define MEDLOSS_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#else
#define MEDLOSS_X86_DISPATCH 0
#endif

// Which of the optional instruction sets this build has (default: both, where the target attributes exist).
#if !MEDLOSS_X86_DISPATCH
#undef MEDLOSS_WITH_AVX2
#undef MEDLOSS_WITH_AVX512
#define MEDLOSS_WITH_AVX2 0
#define MEDLOSS_WITH_AVX512 0
#endif
#ifndef MEDLOSS_WITH_AVX2
#define MEDLOSS_WITH_AVX2 1
#endif
#ifndef MEDLOSS_WITH_AVX512
#define MEDLOSS_WITH_AVX512 1
#endif

// Marks an inner loop over tile rows as safe to vectorise: the rows never alias, which the compiler cannot prove
// for several row pointers (it then gives up or adds run-time checks). OpenMP's simd, honoured under the -fopenmp
// the build uses. Only on elementwise loops (no floating-point reductions), so vectorising changes no result.
#define MEDLOSS_SIMD _Pragma("omp simd")

namespace torch_medloss {

// The instruction set of the float32 tile functions.
enum class Isa { kBaseline, kAvx2, kAvx512 };

// Fn<scalar_t, acc_t> for each logits dtype whose accumulation type (at::opmath_type) is acc_t: the entry points a
// per-instruction-set file exports for one accumulation type, no more (a float64 tile never meets float16 logits).
template <typename acc_t, template <typename, typename> class Fn>
using PerLogitDtype = std::conditional_t<std::is_same_v<acc_t, double>, std::tuple<Fn<double, double>>,
                                         std::tuple<Fn<float, float>, Fn<c10::Half, float>, Fn<c10::BFloat16, float>>>;

// Fn<scalar_t, acc_t> for each floating dtype a dense target may have (any of them, whatever the logits' dtype).
template <typename acc_t, template <typename, typename> class Fn>
using PerFloatDtype = std::tuple<Fn<float, acc_t>, Fn<double, acc_t>, Fn<c10::Half, acc_t>, Fn<c10::BFloat16, acc_t>>;

// Fn<label_t, acc_t> for each label dtype (AT_DISPATCH_INTEGRAL_TYPES's).
template <typename acc_t, template <typename, typename> class Fn>
using PerLabelDtype =
    std::tuple<Fn<uint8_t, acc_t>, Fn<int8_t, acc_t>, Fn<int16_t, acc_t>, Fn<int32_t, acc_t>, Fn<int64_t, acc_t>>;

}  // namespace torch_medloss
