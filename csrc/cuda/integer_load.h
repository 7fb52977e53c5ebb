// Integer tensors (label maps, class bitmasks) read with their dtype chosen at run time in CUDA kernels: one uniform
// switch per load costs less than compiling every kernel once per integer dtype. Shared by the CUDA kernel files.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace torch_medloss {
namespace {

bool is_int_dtype(at::ScalarType dtype) {
  return dtype == at::kByte || dtype == at::kChar || dtype == at::kShort || dtype == at::kInt || dtype == at::kLong;
}

// The codes of the integer dtypes; kernels that also read floats number theirs after kI64.
enum IntType : int { kU8, kI8, kI16, kI32, kI64 };

int int_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kByte:
      return kU8;
    case at::kChar:
      return kI8;
    case at::kShort:
      return kI16;
    case at::kInt:
      return kI32;
    default:
      return kI64;
  }
}

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

}  // namespace
}  // namespace torch_medloss
