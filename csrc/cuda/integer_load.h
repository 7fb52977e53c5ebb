// Integer tensors (label maps, class bitmasks) and dense float tensors read with their dtype chosen at run time in
// CUDA kernels: one uniform switch per load costs less than compiling every kernel once per dtype. Device code
// only, no ATen: the host maps a tensor's dtype to these codes with host_utils.h.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace torch_medloss {
namespace {

// The codes of the integer dtypes, then of the float dtypes.
enum ValueType : int { kU8, kI8, kI16, kI32, kI64, kF32, kF64, kF16, kBF16 };

__device__ __forceinline__ int64_t load_int(const void* base, int type, int64_t offset) {
  switch (type) {
    case kU8:
      return static_cast<const uint8_t*>(base)[offset];
    case kI8:
      return static_cast<const int8_t*>(base)[offset];
    case kI16:
      return static_cast<const int16_t*>(base)[offset];
    case kI32:
      return static_cast<const int32_t*>(base)[offset];
    default:
      return static_cast<const int64_t*>(base)[offset];
  }
}

__device__ __forceinline__ float load_float(const void* base, int type, int64_t offset) {
  switch (type) {
    case kF32:
      return static_cast<const float*>(base)[offset];
    case kF64:
      return static_cast<float>(static_cast<const double*>(base)[offset]);
    case kF16:
      return static_cast<float>(static_cast<const c10::Half*>(base)[offset]);
    default:
      return static_cast<float>(static_cast<const c10::BFloat16*>(base)[offset]);
  }
}

}  // namespace
}  // namespace torch_medloss
