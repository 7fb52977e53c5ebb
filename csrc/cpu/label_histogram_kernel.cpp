// CPU kernel of torch_medloss::label_histogram (schema and contract in csrc/label_histogram.cpp).
//
// Each image is split into chunks; one task counts one (image, chunk) into its own row of a partial-histogram
// buffer, and the rows are then summed. Integer counts make the result independent of the thread count and of
// the order of the sum. at::parallel_for runs the tasks on ATen's OpenMP pool.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace torch_medloss {
namespace {

// Pixels per task: enough to amortise a task's start and its (C + 1)-bin row, small enough to balance the threads.
constexpr int64_t kPixelsPerTask = int64_t{1} << 15;
// Tasks per image at most, per thread: more only grows the partial buffer.
constexpr int64_t kTasksPerThread = 4;

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// The dtypes AT_DISPATCH_INTEGRAL_TYPES covers: isIntegralType would also admit uint16/32/64.
bool is_label_dtype(at::ScalarType dtype) {
  return dtype == at::kByte || dtype == at::kChar || dtype == at::kShort || dtype == at::kInt || dtype == at::kLong;
}

// Counts pixels [begin, end) of one image whose pixel i sits at row[i * stride] into hist[0 .. num_classes].
template <typename label_t>
void count_pixels(const label_t* row, int64_t stride, int64_t begin, int64_t end, int64_t num_classes,
                  int64_t ignore_index, int64_t* hist) {
  const label_t* pixel = row + begin * stride;
  for (int64_t i = begin; i < end; ++i, pixel += stride) {
    const int64_t label = static_cast<int64_t>(*pixel);
    if (label == ignore_index) {
      continue;
    }
    // One unsigned comparison rejects both label < 0 and label >= num_classes.
    const bool is_class = static_cast<uint64_t>(label) < static_cast<uint64_t>(num_classes);
    ++hist[is_class ? label : num_classes];
  }
}

at::Tensor label_histogram_cpu(const at::Tensor& labels, int64_t num_classes, int64_t ignore_index) {
  TORCH_CHECK(labels.dim() == 2, "torch_medloss::label_histogram: labels must be 2-D (B, N), got shape ",
              labels.sizes());
  TORCH_CHECK(is_label_dtype(labels.scalar_type()),
              "torch_medloss::label_histogram: labels must be uint8, int8, int16, int32 or int64, got ",
              labels.scalar_type());
  TORCH_CHECK(num_classes >= 1, "torch_medloss::label_histogram: num_classes must be >= 1, got ", num_classes);
  TORCH_CHECK(num_classes < INT64_MAX, "torch_medloss::label_histogram: num_classes must be < 2**63 - 1, got ",
              num_classes);

  const int64_t batch = labels.size(0);
  const int64_t pixels = labels.size(1);
  const int64_t bins = num_classes + 1;
  if (labels.numel() == 0) {
    return at::zeros({batch, bins}, labels.options().dtype(at::kLong));
  }

  // Chunks per image: a chunk holds at least kPixelsPerTask pixels and at least `bins` pixels (so that the partial
  // buffer never outgrows the labels), and there are at most kTasksPerThread chunks per thread.
  const int64_t max_chunks = std::max<int64_t>(1, kTasksPerThread * at::get_num_threads());
  int64_t chunks = std::clamp<int64_t>(
      std::min(ceil_div(pixels, kPixelsPerTask), pixels / bins), 1, max_chunks);
  const int64_t chunk_pixels = ceil_div(pixels, chunks);
  chunks = ceil_div(pixels, chunk_pixels);  // no chunk starts past the end
  at::Tensor partial = at::zeros({batch, chunks, bins}, labels.options().dtype(at::kLong));

  const int64_t stride_b = labels.stride(0);
  const int64_t stride_n = labels.stride(1);
  AT_DISPATCH_INTEGRAL_TYPES(labels.scalar_type(), "label_histogram_cpu", [&] {
    const scalar_t* data = labels.const_data_ptr<scalar_t>();
    int64_t* hist = partial.mutable_data_ptr<int64_t>();
    at::parallel_for(0, batch * chunks, /*grain_size=*/1, [&](int64_t first, int64_t last) {
      for (int64_t task = first; task < last; ++task) {
        const int64_t b = task / chunks;
        const int64_t begin = (task % chunks) * chunk_pixels;
        const int64_t end = std::min(pixels, begin + chunk_pixels);
        count_pixels(data + b * stride_b, stride_n, begin, end, num_classes, ignore_index, hist + task * bins);
      }
    });
  });
  return chunks == 1 ? partial.view({batch, bins}) : partial.sum(1);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_medloss, CPU, m) {
  m.impl("label_histogram", &label_histogram_cpu);
}

}  // namespace torch_medloss
