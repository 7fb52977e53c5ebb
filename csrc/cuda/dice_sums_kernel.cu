// CUDA kernels of the Dice-family ops (schemas in csrc/dice_sums.cpp; the ground truth is
// torch_medloss/reference/dice_sums.py; options in the codes/scalars/params layout of csrc/contract.h):
//   dice_sums_fwd / dice_sums_bwd: the per-(image, class) sums [I, P, G, D, F] and the extras [ce_num, ce_den,
//     invalid, valid]; dice_loss_fwd / dice_loss_bwd: the sums and the loss head (csrc/dice_head.h) in one op.
// float32, bfloat16 and float16 logits (float64 runs on the CPU only), any strides, float32 accumulation.
//
// Launches (device code in dice_sums_device.h), with no PyTorch op and no host sync between them:
//   1. partials: block (image, chunk, class group) sums its pixels into its own partial row (fixed-order block
//      reduction, no float atomics);
//   2. finalize: one block adds each image's rows in a fixed order, then one thread runs dice_head::finish (the
//      loss and the coefficients d loss / d sum the backward reads), or stores the sums (the dice_sums op);
//   3. backward: recomputes each pixel and writes its gradient, reading the coefficients and the loss's upstream
//      gradient (or grad_sums and grad_extras) itself.
// So a Dice-family loss costs 3 launches for forward and backward together, bitwise reproducible run to run: the
// chunking is a function of the shape only.
//
// Classes. Register arrays need compile-time sizes, so the forward is instantiated for C <= 4, 8 and 16 (the
// smallest bucket that holds C) with a pixel's logits cached in registers; above 16 the classes are split into
// groups of 16, one block per (image, chunk, group), each reading all classes for the softmax statistics. The
// backward caches up to 8 classes and streams them from memory (L1 hits) above.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <tuple>
#include <vector>

#include "dice_sums_device.h"
#include "host_utils.h"

namespace torch_medloss {
namespace dice_cuda {
namespace {

// Partial rows (image, chunk) at most over the batch, so that the one finalize block reads a few hundred KiB at
// most: 2048 rows up to 16 classes, fewer above (rows * C <= kMaxPartialClassRows), at least 64.
constexpr int64_t kMaxRows = 2048;
constexpr int64_t kMaxRowsPerImage = 1024;
constexpr int64_t kMaxPartialClassRows = 2048 * 16;
constexpr int64_t kMinRows = 64;

// ---------------------------------------------------------------------------------------------------- checks

void check_inputs(const char* op, const at::Tensor& logits, const at::Tensor& target, const at::Tensor& params,
                  at::IntArrayRef codes, at::ArrayRef<double> scalars) {
  TORCH_CHECK(static_cast<int64_t>(codes.size()) == K::DICE_NUM_CODES &&
                  static_cast<int64_t>(scalars.size()) == K::DICE_NUM_SCALARS,
              op, ": codes must have ", K::DICE_NUM_CODES, " entries and scalars ", K::DICE_NUM_SCALARS,
              " (torch_medloss._contract), got ", codes.size(), " and ", scalars.size());
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be 3-D (B, C, S), got shape ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kHalf ||
                  logits.scalar_type() == at::kBFloat16,
              op, ": CUDA logits must be float32, bfloat16 or float16 (float64 runs on the CPU only), got ",
              logits.scalar_type());
  const int64_t batch = logits.size(0);
  const int64_t classes = logits.size(1);
  const int64_t pixels = logits.size(2);
  TORCH_CHECK(classes >= 1 && classes <= K::DICE_MAX_CLASSES, op,
              ": logits must have 1 to ", K::DICE_MAX_CLASSES, " classes (logits.shape[1]) for the CUDA kernels, ",
              "got shape ", logits.sizes());
  if (codes[K::DICE_CODE_TARGET_IS_LABELS]) {
    TORCH_CHECK(target.dim() == 2 && target.size(0) == batch && target.size(1) == pixels, op,
                ": target must be labels of shape (B, S) = [", batch, ", ", pixels, "], got ", target.sizes());
    TORCH_CHECK(is_int_dtype(target.scalar_type()), op,
                ": target must be labels of uint8, int8, int16, int32 or int64, got ", target.scalar_type());
  } else {
    TORCH_CHECK(target.sizes() == logits.sizes(), op, ": target must be dense with the logits' shape (B, C, S) = ",
                logits.sizes(), ", got ", target.sizes());
    TORCH_CHECK(is_float_dtype(target.scalar_type()), op,
                ": target must be dense float32, float64, bfloat16 or float16, got ", target.scalar_type());
  }
  TORCH_CHECK(params.dim() == 2 && params.size(0) == K::DICE_PARAM_ROWS && params.size(1) == classes, op,
              ": params must have shape (", K::DICE_PARAM_ROWS, ", C) = [", K::DICE_PARAM_ROWS, ", ", classes,
              "], got ", params.sizes());
  TORCH_CHECK(is_float_dtype(params.scalar_type()), op, ": params must be float32, float64, bfloat16 or float16, got ",
              params.scalar_type());
  for (const auto& [name, tensor] : {std::pair<const char*, const at::Tensor*>{"target", &target},
                                     std::pair<const char*, const at::Tensor*>{"params", &params}}) {
    TORCH_CHECK(tensor->device() == logits.device(), op, ": ", name, " must be on the logits' device (",
                logits.device(), "), got ", tensor->device());
  }
  const int64_t activation = codes[K::DICE_CODE_ACTIVATION];
  const int64_t mask_mode = codes[K::DICE_CODE_MASK_MODE];
  TORCH_CHECK(activation >= K::ACTIVATION_NONE && activation <= K::ACTIVATION_SIGMOID, op,
              ": activation must be 0 (none), 1 (softmax) or 2 (sigmoid), got ", activation);
  TORCH_CHECK(mask_mode >= K::MASK_NONE && mask_mode <= K::MASK_SENTINEL, op,
              ": mask_mode must be 0 (none), 1 (label), 2 (channel) or 3 (sentinel), got ", mask_mode);
  const int64_t ignore_index = codes[K::DICE_CODE_IGNORE_INDEX];
  TORCH_CHECK(codes[K::DICE_CODE_TARGET_IS_LABELS] || mask_mode != K::MASK_CHANNEL ||
                  (ignore_index >= 0 && ignore_index < classes),
              op, ": ignore_index must be a channel in [0, ", classes, ") for mask_mode 2 (channel), got ",
              ignore_index);
  const int64_t head = codes[K::DICE_CODE_HEAD];
  TORCH_CHECK(head >= K::HEAD_DICE && head <= K::HEAD_NONE, op, ": head must be 0 to 3, got ", head);
  const int64_t reduction = codes[K::DICE_CODE_REDUCTION];
  TORCH_CHECK(reduction >= K::REDUCTION_MEAN && reduction <= K::REDUCTION_NONE, op,
              ": reduction must be 0 (mean), 1 (sum) or 2 (none), got ", reduction);
  const int64_t w_type = codes[K::DICE_CODE_W_TYPE];
  TORCH_CHECK(w_type >= K::W_TYPE_SQUARE && w_type <= K::W_TYPE_UNIFORM, op, ": w_type must be 0 to 2, got ",
              w_type);
  const int64_t focal = codes[K::DICE_CODE_FOCAL];
  TORCH_CHECK(focal >= K::FOCAL_NONE && focal <= K::FOCAL_SOFTMAX, op, ": focal must be 0 to 2, got ", focal);
  const int64_t alpha = codes[K::DICE_CODE_FOCAL_ALPHA];
  TORCH_CHECK(alpha >= K::ALPHA_NONE && alpha <= K::ALPHA_PER_CLASS, op, ": focal alpha mode must be 0 to 2, got ",
              alpha);
  const int64_t drop = codes[K::DICE_CODE_DROP_BACKGROUND];
  TORCH_CHECK(drop == 0 || drop == 1, op, ": drop_background must be 0 or 1, got ", drop);
  TORCH_CHECK(drop == 0 || classes >= 2, op, ": drop_background needs C >= 2, got ", classes);
}

void check_upstream_tensor(const char* op, const char* name, const at::Tensor& tensor, const at::Tensor& logits,
                           at::IntArrayRef shape) {
  TORCH_CHECK(tensor.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", tensor.sizes());
  TORCH_CHECK(is_float_dtype(tensor.scalar_type()), op, ": ", name,
              " must be float32, float64, bfloat16 or float16, got ", tensor.scalar_type());
  TORCH_CHECK(tensor.device() == logits.device(), op, ": ", name, " must be on the logits' device (",
              logits.device(), "), got ", tensor.device());
}

// ---------------------------------------------------------------------------------------------- launch set-up

// The loss's shape (_contract.dice_loss_shape).
std::vector<int64_t> loss_shape(int64_t batch, int64_t classes, int64_t pixels, at::IntArrayRef codes) {
  if (codes[K::DICE_CODE_REDUCTION] != K::REDUCTION_NONE) {
    return {};
  }
  const int64_t kept = classes - codes[K::DICE_CODE_DROP_BACKGROUND];
  if (codes[K::DICE_CODE_HEAD] == K::HEAD_NONE) {
    return {batch, kept, pixels};
  }
  const int64_t per_unit = codes[K::DICE_CODE_HEAD] == K::HEAD_GENERALIZED ? 1 : kept;
  if (codes[K::DICE_CODE_BATCH]) {
    return {per_unit};
  }
  return {batch, per_unit};
}

bool focal_map(at::IntArrayRef codes) {
  return codes[K::DICE_CODE_HEAD] == K::HEAD_NONE && codes[K::DICE_CODE_REDUCTION] == K::REDUCTION_NONE;
}

// The options every kernel reads, from the op's arguments. The chunking is left to forward_layout /
// backward_layout.
Problem make_problem(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& params,
                     at::IntArrayRef codes, at::ArrayRef<double> scalars) {
  const bool labels = codes[K::DICE_CODE_TARGET_IS_LABELS] != 0;
  Problem pr{};
  pr.classes = logits.size(1);
  pr.pixels = logits.size(2);
  pr.x_b = logits.stride(0);
  pr.x_c = logits.stride(1);
  pr.x_s = logits.stride(2);
  pr.t_b = target.stride(0);
  pr.t_c = labels ? 0 : target.stride(1);
  pr.t_s = labels ? target.stride(1) : target.stride(2);
  pr.p_row = params.stride(0);
  pr.p_c = params.stride(1);
  pr.ignore_index = codes[K::DICE_CODE_IGNORE_INDEX];
  pr.target_type = value_type(target.scalar_type());
  pr.params_type = value_type(params.scalar_type());
  pr.activation = static_cast<int>(codes[K::DICE_CODE_ACTIVATION]);
  pr.mask_mode = static_cast<int>(codes[K::DICE_CODE_MASK_MODE]);
  pr.focal = static_cast<int>(codes[K::DICE_CODE_FOCAL]);
  pr.alpha_mode = static_cast<int>(codes[K::DICE_CODE_FOCAL_ALPHA]);
  pr.drop = static_cast<int>(codes[K::DICE_CODE_DROP_BACKGROUND]);
  pr.squared = codes[K::DICE_CODE_SQUARED] != 0;
  pr.with_ce = codes[K::DICE_CODE_WITH_CE] != 0;
  const double smoothing = scalars[K::DICE_SCALAR_LABEL_SMOOTHING];
  // As in the reference: the Python floats 1 - eps and eps / C, rounded once to float32.
  pr.keep = static_cast<float>(1.0 - smoothing);
  pr.spread = static_cast<float>(smoothing / static_cast<double>(pr.classes));
  pr.focal_gamma = static_cast<float>(scalars[K::DICE_SCALAR_FOCAL_GAMMA]);
  pr.focal_alpha = static_cast<float>(scalars[K::DICE_SCALAR_FOCAL_ALPHA]);
  return pr;
}

// Forward chunking: one chunk per step up to kMaxRowsPerImage per image and the row budget over the batch, then
// several steps each; an empty image still has one (empty) chunk, so every partial row is written. A function of
// the shape only.
void forward_layout(Problem& pr, int64_t batch) {
  const int64_t steps = std::max<int64_t>(1, ceil_div(pr.pixels, kStepPixels));
  const int64_t rows = std::max(kMinRows, std::min(kMaxRows, kMaxPartialClassRows / pr.classes));
  const int64_t cap = std::max<int64_t>(1, std::min(kMaxRowsPerImage, rows / std::max<int64_t>(batch, 1)));
  const int64_t steps_per_chunk = ceil_div(steps, cap);
  pr.chunks = ceil_div(steps, steps_per_chunk);
  pr.chunk_pixels = steps_per_chunk * kStepPixels;
  pr.groups = pr.classes <= kForwardGroup ? 1 : ceil_div(pr.classes, kForwardGroup);
}

void backward_layout(const char* op, Problem& pr, int64_t batch) {
  pr.chunks = std::max<int64_t>(1, ceil_div(pr.pixels, kStepPixels));
  TORCH_CHECK(pr.chunks <= INT_MAX && batch <= INT_MAX / pr.chunks, op, ": logits of shape (B, C, S) must have B * ",
              "ceil(S / ", kStepPixels, ") <= 2**31 - 1, got B = ", batch, " and S = ", pr.pixels);
}

// ---------------------------------------------------------------------------------------------------- launches

template <typename scalar_t, bool kLabels>
void launch_partials(const Problem& pr, int64_t batch, float* partial_sums, float* partial_extras, float* map,
                     const scalar_t* logits, const void* target, const void* params, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(batch * pr.chunks * pr.groups));
  if (pr.classes <= 4) {
    dice_partials_kernel<scalar_t, 4, kLabels, true>
        <<<grid, kThreads, 0, stream>>>(partial_sums, partial_extras, map, logits, target, params, pr);
  } else if (pr.classes <= 8) {
    dice_partials_kernel<scalar_t, 8, kLabels, true>
        <<<grid, kThreads, 0, stream>>>(partial_sums, partial_extras, map, logits, target, params, pr);
  } else if (pr.classes <= kForwardGroup) {
    dice_partials_kernel<scalar_t, kForwardGroup, kLabels, true>
        <<<grid, kThreads, 0, stream>>>(partial_sums, partial_extras, map, logits, target, params, pr);
  } else {
    dice_partials_kernel<scalar_t, kForwardGroup, kLabels, false>
        <<<grid, kThreads, 0, stream>>>(partial_sums, partial_extras, map, logits, target, params, pr);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, bool kLabels>
void launch_backward(const Problem& pr, int64_t batch, scalar_t* grad, const void* coef, const void* upstream,
                     const void* grad_extras, const scalar_t* logits, const void* target, const void* params,
                     cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(batch * pr.chunks));
  if (pr.classes <= 4) {
    dice_bwd_kernel<scalar_t, 4, kLabels>
        <<<grid, kThreads, 0, stream>>>(grad, coef, upstream, grad_extras, logits, target, params, pr);
  } else if (pr.classes <= kBackwardCached) {
    dice_bwd_kernel<scalar_t, kBackwardCached, kLabels>
        <<<grid, kThreads, 0, stream>>>(grad, coef, upstream, grad_extras, logits, target, params, pr);
  } else {
    dice_bwd_kernel<scalar_t, 0, kLabels>
        <<<grid, kThreads, 0, stream>>>(grad, coef, upstream, grad_extras, logits, target, params, pr);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches the partials (when there is an image) and the finalize kernel. sums_only: ``first`` and ``second``
// are the op's sums (B, C, 5) and extras (B, 4); else the loss and the coefficients (B, 5, C + 1).
void forward(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& params, at::IntArrayRef codes,
             at::ArrayRef<double> scalars, at::Tensor& first, at::Tensor& second, bool sums_only) {
  const int64_t batch = logits.size(0);
  const int64_t classes = logits.size(1);
  Problem pr = make_problem(logits, target, params, codes, scalars);
  forward_layout(pr, batch);
  const bool map = !sums_only && focal_map(codes);
  pr.focal_map = map;
  if (map) {
    pr.map_b = first.stride(0);
    pr.map_c = first.stride(1);
  }
  const at::TensorOptions options = logits.options().dtype(at::kFloat);
  const int64_t num_sums = batch * classes * K::DICE_NUM_SUMS;
  const int64_t num_extras = batch * K::DICE_NUM_EXTRAS;
  // One allocation: the partial rows, then (the loss op) the sums, the extras and finish's scratch.
  const int64_t partial_sums_size = batch * pr.chunks * classes * K::DICE_NUM_SUMS;
  const int64_t partial_extras_size = batch * pr.chunks * pr.groups * K::DICE_NUM_EXTRAS;
  const int64_t head_size = sums_only ? 0 : num_sums + num_extras + dice_head::scratch_size(classes) + classes;
  at::Tensor buffer = at::empty({partial_sums_size + partial_extras_size + head_size}, options);
  float* partial_sums = buffer.mutable_data_ptr<float>();
  float* partial_extras = partial_sums + partial_sums_size;
  float* sums = sums_only ? first.mutable_data_ptr<float>() : partial_extras + partial_extras_size;
  float* extras = sums_only ? second.mutable_data_ptr<float>() : sums + num_sums;
  float* scratch = sums_only ? nullptr : extras + num_extras;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  if (batch > 0) {
    TORCH_CHECK(batch <= INT_MAX / (pr.chunks * pr.groups), "torch_medloss::dice CUDA: too many images (", batch,
                ") for one grid");
    dispatch_logits(logits.scalar_type(), [&](auto type) {
      using scalar_t = typename decltype(type)::type;
      (codes[K::DICE_CODE_TARGET_IS_LABELS] ? launch_partials<scalar_t, true> : launch_partials<scalar_t, false>)(
          pr, batch, partial_sums, partial_extras, map ? first.mutable_data_ptr<float>() : nullptr,
          logits.const_data_ptr<scalar_t>(), target.const_data_ptr(), params.const_data_ptr(), stream);
    });
  }
  // The head's options, read once on the host from the lists (the same read_options as the CPU's).
  const std::vector<int64_t> code_values(codes.begin(), codes.end());
  const std::vector<double> scalar_values(scalars.begin(), scalars.end());
  const dice_head::Options head = dice_head::read_options(code_values.data(), scalar_values.data());
  dice_finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(
      sums, extras, sums_only ? nullptr : first.mutable_data_ptr<float>(),
      sums_only ? nullptr : second.mutable_data_ptr<float>(), scratch, partial_sums, partial_extras,
      params.const_data_ptr(), batch, classes, pr.chunks, pr.groups, pr.params_type, pr.p_row, pr.p_c, sums_only,
      head);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------------------------------------------- ops

std::tuple<at::Tensor, at::Tensor> dice_sums_fwd_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                      const at::Tensor& params, at::IntArrayRef codes,
                                                      at::ArrayRef<double> scalars) {
  constexpr const char* op = "torch_medloss::dice_sums_fwd";
  check_inputs(op, logits, target, params, codes, scalars);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const int64_t batch = logits.size(0);
  const int64_t classes = logits.size(1);
  const at::TensorOptions options = logits.options().dtype(at::kFloat);
  at::Tensor sums = at::empty({batch, classes, K::DICE_NUM_SUMS}, options);
  at::Tensor extras = at::empty({batch, K::DICE_NUM_EXTRAS}, options);
  if (batch == 0) {
    return {sums, extras};
  }
  forward(logits, target, params, codes, scalars, sums, extras, /*sums_only=*/true);
  return {sums, extras};
}

at::Tensor dice_sums_bwd_cuda(const at::Tensor& grad_sums, const at::Tensor& grad_extras, const at::Tensor& logits,
                              const at::Tensor& target, const at::Tensor& params, at::IntArrayRef codes,
                              at::ArrayRef<double> scalars) {
  constexpr const char* op = "torch_medloss::dice_sums_bwd";
  check_inputs(op, logits, target, params, codes, scalars);
  const int64_t batch = logits.size(0);
  const int64_t classes = logits.size(1);
  check_upstream_tensor(op, "grad_sums", grad_sums, logits, {batch, classes, K::DICE_NUM_SUMS});
  check_upstream_tensor(op, "grad_extras", grad_extras, logits, {batch, K::DICE_NUM_EXTRAS});
  const c10::cuda::CUDAGuard device_guard(logits.device());
  // Same strides as the logits for a dense, non-overlapping layout (channels_last stays channels_last).
  at::Tensor grad = at::empty_like(logits);
  if (logits.numel() == 0) {
    return grad;
  }
  Problem pr = make_problem(logits, target, params, codes, scalars);
  backward_layout(op, pr, batch);
  pr.g_b = grad.stride(0);
  pr.g_c = grad.stride(1);
  pr.g_s = grad.stride(2);
  pr.k_b = grad_sums.stride(0);
  pr.k_c = grad_sums.stride(1);
  pr.k_k = grad_sums.stride(2);
  pr.coef_type = value_type(grad_sums.scalar_type());
  pr.e_b = grad_extras.stride(0);
  pr.extras_type = value_type(grad_extras.scalar_type());
  pr.scaled = false;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_logits(logits.scalar_type(), [&](auto type) {
    using scalar_t = typename decltype(type)::type;
    (codes[K::DICE_CODE_TARGET_IS_LABELS] ? launch_backward<scalar_t, true> : launch_backward<scalar_t, false>)(
        pr, batch, grad.mutable_data_ptr<scalar_t>(), grad_sums.const_data_ptr(), nullptr,
        grad_extras.const_data_ptr(), logits.const_data_ptr<scalar_t>(), target.const_data_ptr(),
        params.const_data_ptr(), stream);
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor> dice_loss_fwd_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                      const at::Tensor& params, at::IntArrayRef codes,
                                                      at::ArrayRef<double> scalars) {
  constexpr const char* op = "torch_medloss::dice_loss_fwd";
  check_inputs(op, logits, target, params, codes, scalars);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const int64_t batch = logits.size(0);
  const int64_t classes = logits.size(1);
  const at::TensorOptions options = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty(loss_shape(batch, classes, logits.size(2), codes), options);
  at::Tensor coef = at::empty({batch, K::DICE_NUM_SUMS, classes + 1}, options);
  // An empty image or batch still has a loss (of zero sums, or NaN for the mean over no image): the finalize
  // kernel runs whatever the sizes.
  forward(logits, target, params, codes, scalars, loss, coef, /*sums_only=*/false);
  return {loss, coef};
}

at::Tensor dice_loss_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& coefficients, const at::Tensor& logits,
                              const at::Tensor& target, const at::Tensor& params, at::IntArrayRef codes,
                              at::ArrayRef<double> scalars) {
  constexpr const char* op = "torch_medloss::dice_loss_bwd";
  check_inputs(op, logits, target, params, codes, scalars);
  const int64_t batch = logits.size(0);
  const int64_t classes = logits.size(1);
  const std::vector<int64_t> shape = loss_shape(batch, classes, logits.size(2), codes);
  check_upstream_tensor(op, "grad_loss", grad_loss, logits, shape);
  check_upstream_tensor(op, "coefficients", coefficients, logits, {batch, K::DICE_NUM_SUMS, classes + 1});
  const c10::cuda::CUDAGuard device_guard(logits.device());
  at::Tensor grad = at::empty_like(logits);
  if (logits.numel() == 0) {
    return grad;
  }
  Problem pr = make_problem(logits, target, params, codes, scalars);
  backward_layout(op, pr, batch);
  pr.g_b = grad.stride(0);
  pr.g_c = grad.stride(1);
  pr.g_s = grad.stride(2);
  // The coefficients along (image, class, row), and the upstream gradient along (image, kept class, pixel):
  // stride 0 along what the loss does not have (the images with batch, the classes of generalized Dice, all of
  // them for a scalar loss).
  pr.k_b = coefficients.stride(0);
  pr.k_c = coefficients.stride(2);
  pr.k_k = coefficients.stride(1);
  pr.coef_type = value_type(coefficients.scalar_type());
  const int64_t dims = static_cast<int64_t>(shape.size());
  const bool per_class = dims > 0 && codes[K::DICE_CODE_HEAD] != K::HEAD_GENERALIZED;
  pr.u_b = dims >= 2 ? grad_loss.stride(0) : 0;
  pr.u_c = per_class ? (dims == 3 ? grad_loss.stride(1) : grad_loss.stride(dims - 1)) : 0;
  pr.u_s = dims == 3 ? grad_loss.stride(2) : 0;
  pr.upstream_type = value_type(grad_loss.scalar_type());
  pr.focal_map = focal_map(codes);
  pr.scaled = true;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_logits(logits.scalar_type(), [&](auto type) {
    using scalar_t = typename decltype(type)::type;
    (codes[K::DICE_CODE_TARGET_IS_LABELS] ? launch_backward<scalar_t, true> : launch_backward<scalar_t, false>)(
        pr, batch, grad.mutable_data_ptr<scalar_t>(), coefficients.const_data_ptr(), grad_loss.const_data_ptr(),
        nullptr, logits.const_data_ptr<scalar_t>(), target.const_data_ptr(), params.const_data_ptr(), stream);
  });
  return grad;
}

}  // namespace
}  // namespace dice_cuda

TORCH_LIBRARY_IMPL(torch_medloss, CUDA, m) {
  m.impl("dice_sums_fwd", &dice_cuda::dice_sums_fwd_cuda);
  m.impl("dice_sums_bwd", &dice_cuda::dice_sums_bwd_cuda);
  m.impl("dice_loss_fwd", &dice_cuda::dice_loss_fwd_cuda);
  m.impl("dice_loss_bwd", &dice_cuda::dice_loss_bwd_cuda);
}

}  // namespace torch_medloss
