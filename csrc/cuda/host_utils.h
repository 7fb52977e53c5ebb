// Host helpers shared by the CUDA kernel files: dtype codes for integer_load.h, launch arithmetic, dtype dispatch.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "integer_load.h"

namespace torch_medloss {
namespace {

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

inline bool is_int_dtype(at::ScalarType dtype) {
  return dtype == at::kByte || dtype == at::kChar || dtype == at::kShort || dtype == at::kInt || dtype == at::kLong;
}

inline bool is_float_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

// The integer_load.h code of an integer or float dtype (checked by the caller).
inline int value_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kByte:
      return kU8;
    case at::kChar:
      return kI8;
    case at::kShort:
      return kI16;
    case at::kInt:
      return kI32;
    case at::kLong:
      return kI64;
    case at::kFloat:
      return kF32;
    case at::kDouble:
      return kF64;
    case at::kHalf:
      return kF16;
    default:
      return kBF16;
  }
}

// A dtype as a value, for generic lambdas: Type<T>{} carries T.
template <typename T>
struct Type {
  using type = T;
};

// Calls body(Type<scalar_t>{}) for CUDA logits of float32, float16 or bfloat16 (checked by the caller).
template <typename Body>
void dispatch_logits(at::ScalarType dtype, const Body& body) {
  switch (dtype) {
    case at::kFloat:
      body(Type<float>{});
      break;
    case at::kHalf:
      body(Type<at::Half>{});
      break;
    case at::kBFloat16:
      body(Type<at::BFloat16>{});
      break;
    default:
      TORCH_INTERNAL_ASSERT(false, "torch_medloss CUDA: unexpected logits dtype ", dtype);
  }
}

}  // namespace
}  // namespace torch_medloss
