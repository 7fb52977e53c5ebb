// Schema of torch_medloss::dice_sums_fwd and dice_sums_bwd, declared once; csrc/cpu and csrc/cuda register their
// kernels. The contract, as readable PyTorch, is torch_medloss/reference/dice_sums.py (the ground truth).
//
// dice_sums_fwd(logits, target, gamma, ce_weight, activation, target_is_labels, ignore_index, mask_mode, squared,
//               with_ce, label_smoothing) -> (sums, extras)
//   logits:    (B, C, S) float32, float64, bfloat16 or float16 (float64 on the CPU only), any strides: the spatial
//              dims are flattened into S, and the kernels read the tensor in place through its strides.
//   target:    labels (B, S) of uint8, int8, int16, int32 or int64 when target_is_labels, else dense (B, C, S) of
//              any float dtype; any strides, read without conversion.
//   gamma:     (C,) float, the PM Dice modulator exponent per class (m = |y' - p'|^gamma, m = 1 where gamma = 0).
//   ce_weight: (C,) float, the cross-entropy class weights (read only with with_ce).
//   activation: 0 none, 1 softmax over C, 2 sigmoid.
//   mask_mode: 0 none; 1 (labels) label == ignore_index is masked; 2 (dense) w = 1 - y[:, ignore_index], which
//              needs ignore_index in [0, C); 3 (dense) w = (sum_c y_c > 0). Modes 2 and 3 mask nothing for labels
//              and mode 1 masks nothing for dense targets, as in the reference.
//   sums:      (B, C, 4) = [I, P, G, D] per (image, class); extras: (B, 3) = [ce_num, ce_den, invalid_count].
//              float32 (float64 for float64 logits), contiguous; accumulated in that type.
//   A label outside [0, C) that is not the masked ignore_index gets w = 0 and is counted in invalid_count.
//
// dice_sums_bwd(grad_sums, grad_extras, logits, target, gamma, ce_weight, <the same options>) -> grad_logits
//   grad_sums (B, C, 4), grad_extras (B, 3): the upstream gradients of sums and extras (any float dtype).
//   grad_logits: (B, C, S) in logits' dtype and memory layout (at::empty_like), d(<grad_sums, sums> +
//   <grad_extras, extras>)/d(logits). G and ce_den have no gradient, nor has invalid_count.
//
// Both kernels are deterministic: the CPU sums fixed-size pixel chunks into their own rows and adds the rows in a
// fixed order; the CUDA kernel reduces each block in a fixed order and sums the block rows with torch.

#include <torch/library.h>

// A FRAGMENT: every op of the project adds its schema to the torch_medloss namespace from its own csrc/<stem>.cpp.
TORCH_LIBRARY_FRAGMENT(torch_medloss, m) {
  // The fake kernels and the autograd formula are registered in Python, by this module.
  m.set_python_module("torch_medloss.ops.dice_sums");
  m.def(
      "dice_sums_fwd(Tensor logits, Tensor target, Tensor gamma, Tensor ce_weight, int activation, "
      "bool target_is_labels, int ignore_index, int mask_mode, bool squared, bool with_ce, float label_smoothing) "
      "-> (Tensor, Tensor)");
  m.def(
      "dice_sums_bwd(Tensor grad_sums, Tensor grad_extras, Tensor logits, Tensor target, Tensor gamma, "
      "Tensor ce_weight, int activation, bool target_is_labels, int ignore_index, int mask_mode, bool squared, "
      "bool with_ce, float label_smoothing) -> Tensor");
}
