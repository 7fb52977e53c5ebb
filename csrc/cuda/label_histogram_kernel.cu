// CUDA kernel of torch_medloss::label_histogram (schema and contract in csrc/label_histogram.cpp).
//
// Each block counts a strided slice of one image into a histogram in shared memory, then adds it to the image's
// row of the output with one global atomic per non-empty bin. The atomics are integer additions, so the result does
// not depend on their order: the kernel is deterministic. When C + 1 bins do not fit in shared memory, the blocks
// count straight into global memory (slower under contention, same result).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>

namespace torch_medloss {
namespace {

using counter_t = unsigned long long;  // atomicAdd's 64-bit type; the int64 output is reinterpreted as it
static_assert(sizeof(counter_t) == sizeof(int64_t), "counter_t must be 64-bit");

constexpr int kThreads = 256;
// Pixels per thread below which an image gets fewer blocks: a block should amortise zeroing and flushing its bins.
constexpr int64_t kPixelsPerThread = 16;
// Blocks per SM that the grid aims for (256-thread blocks: 8 fill an SM's 2048 threads).
constexpr int64_t kBlocksPerSm = 8;

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

bool is_label_dtype(at::ScalarType dtype) {
  return dtype == at::kByte || dtype == at::kChar || dtype == at::kShort || dtype == at::kInt || dtype == at::kLong;
}

// counts: (B, num_classes + 1) int64, zeroed. labels: (B, N), pixel i of image b at labels[b * stride_b +
// i * stride_n]. The grid is 1-D, blocks_per_image blocks per image; block k of image b counts pixels
// k * blockDim.x + threadIdx.x, stepping by blocks_per_image * blockDim.x.
template <typename label_t, bool kSharedBins>
__global__ void label_histogram_kernel(
    // Output
    int64_t* __restrict__ counts,
    // Input
    const label_t* __restrict__ labels,
    // Sizes
    int64_t pixels, int64_t num_classes, int64_t ignore_index, int64_t blocks_per_image,
    // Strides
    int64_t stride_b, int64_t stride_n) {
  extern __shared__ counter_t shared_bins[];
  const int64_t bins = num_classes + 1;
  const int64_t image = static_cast<int64_t>(blockIdx.x) / blocks_per_image;
  const int64_t block_in_image = static_cast<int64_t>(blockIdx.x) % blocks_per_image;
  counter_t* global_bins = reinterpret_cast<counter_t*>(counts + image * bins);
  counter_t* hist = kSharedBins ? shared_bins : global_bins;

  if (kSharedBins) {
    for (int64_t c = threadIdx.x; c < bins; c += blockDim.x) {
      hist[c] = 0;
    }
    __syncthreads();
  }

  const label_t* row = labels + image * stride_b;
  const int64_t step = blocks_per_image * static_cast<int64_t>(blockDim.x);
  for (int64_t i = block_in_image * blockDim.x + threadIdx.x; i < pixels; i += step) {
    const int64_t label = static_cast<int64_t>(row[i * stride_n]);
    if (label == ignore_index) {
      continue;
    }
    // One unsigned comparison rejects both label < 0 and label >= num_classes.
    const bool is_class = static_cast<uint64_t>(label) < static_cast<uint64_t>(num_classes);
    atomicAdd(hist + (is_class ? label : num_classes), counter_t{1});
  }

  if (kSharedBins) {
    __syncthreads();
    for (int64_t c = threadIdx.x; c < bins; c += blockDim.x) {
      if (hist[c] != 0) {
        atomicAdd(global_bins + c, hist[c]);
      }
    }
  }
}

at::Tensor label_histogram_cuda(const at::Tensor& labels, int64_t num_classes, int64_t ignore_index) {
  TORCH_CHECK(labels.dim() == 2, "torch_medloss::label_histogram: labels must be 2-D (B, N), got shape ",
              labels.sizes());
  TORCH_CHECK(is_label_dtype(labels.scalar_type()),
              "torch_medloss::label_histogram: labels must be uint8, int8, int16, int32 or int64, got ",
              labels.scalar_type());
  TORCH_CHECK(num_classes >= 1, "torch_medloss::label_histogram: num_classes must be >= 1, got ", num_classes);
  TORCH_CHECK(num_classes < INT64_MAX, "torch_medloss::label_histogram: num_classes must be < 2**63 - 1, got ",
              num_classes);

  const c10::cuda::CUDAGuard device_guard(labels.device());
  const int64_t batch = labels.size(0);
  const int64_t pixels = labels.size(1);
  const int64_t bins = num_classes + 1;
  at::Tensor counts = at::zeros({batch, bins}, labels.options().dtype(at::kLong));
  if (labels.numel() == 0) {
    return counts;
  }

  int device = 0;
  int sm_count = 0;
  int shared_bytes_max = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&shared_bytes_max, cudaDevAttrMaxSharedMemoryPerBlock, device));

  // Blocks per image: enough to fill the GPU across the batch, but none with fewer than kPixelsPerThread pixels
  // per thread. The 1-D grid holds batch * blocks_per_image blocks, at most 2**31 - 1.
  const int64_t wanted = ceil_div(kBlocksPerSm * sm_count, batch);
  const int64_t blocks_per_image =
      std::clamp<int64_t>(std::min(wanted, ceil_div(pixels, kThreads * kPixelsPerThread)), 1, INT_MAX);
  TORCH_CHECK(batch <= INT_MAX / blocks_per_image, "torch_medloss::label_histogram: labels must have at most ",
              INT_MAX / blocks_per_image, " images (B) for a ", blocks_per_image, "-block-per-image grid, got ",
              batch);
  const int64_t grid = batch * blocks_per_image;
  const int64_t shared_bytes = bins * static_cast<int64_t>(sizeof(counter_t));
  const bool shared_bins = shared_bytes <= shared_bytes_max;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_INTEGRAL_TYPES(labels.scalar_type(), "label_histogram_cuda", [&] {
    const scalar_t* data = labels.const_data_ptr<scalar_t>();
    int64_t* out = counts.mutable_data_ptr<int64_t>();
    if (shared_bins) {
      label_histogram_kernel<scalar_t, true><<<grid, kThreads, shared_bytes, stream>>>(
          out, data, pixels, num_classes, ignore_index, blocks_per_image, labels.stride(0), labels.stride(1));
    } else {
      label_histogram_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(
          out, data, pixels, num_classes, ignore_index, blocks_per_image, labels.stride(0), labels.stride(1));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_medloss, CUDA, m) {
  m.impl("label_histogram", &label_histogram_cuda);
}

}  // namespace torch_medloss
