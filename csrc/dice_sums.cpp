// Schema of the Dice-family ops, declared once; csrc/cpu and csrc/cuda register their kernels. The contract, as
// readable PyTorch, is torch_medloss/reference/dice_sums.py (the ground truth); the positions and codes of the
// option lists are those of torch_medloss/_contract.py, csrc/contract.h in C++.
//
// dice_sums_fwd(logits, target, params, codes, scalars) -> (sums, extras)
//   logits:  (B, C, S) float32, float64, bfloat16 or float16 (float64 on the CPU only), any strides: the spatial
//            dims are flattened into S, and the kernels read the tensor in place through its strides.
//   target:  labels (B, S) of uint8, int8, int16, int32 or int64 when codes[DICE_CODE_TARGET_IS_LABELS], else dense
//            (B, C, S) of any float dtype; any strides, read without conversion.
//   params:  (DICE_PARAM_ROWS, C) floats by full class index: the PM Dice exponent gamma, the Dice class weights, the
//            cross-entropy class weights, the focal alpha and the focal class weights (rows DICE_PARAM_*).
//   codes:   DICE_NUM_CODES ints (DICE_CODE_*: activation, target kind, ignore_index, mask mode, squared, cross
//            entropy, head, background, batch, reduction, Jaccard, soft intersection, w_type, class weights, focal
//            form, focal alpha mode, focal mask); scalars: DICE_NUM_SCALARS floats (DICE_SCALAR_*).
//   sums:    (B, C, DICE_NUM_SUMS) = [I, P, G, D, F] per (image, class), F the focal term's sum (0 without one and
//            for a left-out class 0); extras: (B, DICE_NUM_EXTRAS) = [ce_num, ce_den, invalid, valid], valid the
//            sum of the pixel weight w. float32 (float64 for float64 logits), contiguous; accumulated in that type.
//   A label outside [0, C) that is not the masked ignore_index gets w = 0 and is counted in invalid.
//
// dice_sums_bwd(grad_sums, grad_extras, logits, target, params, codes, scalars) -> grad_logits
//   d(<grad_sums, sums> + <grad_extras, extras>)/d(logits), in logits' dtype and memory layout (empty_like). G,
//   ce_den, invalid and valid have no gradient.
//
// dice_loss_fwd(logits, target, params, codes, scalars) -> (loss, coefficients)
//   The sums and the loss head of codes in one op (csrc/dice_head.h; reference.dice_sums.loss_from_sums). loss:
//   shape _contract.dice_loss_shape, accumulation dtype; for HEAD_NONE with reduction "none" the (B, C', S) focal
//   map, without the poison (the caller adds coefficients[0, DICE_SLOT_POISON, C]). coefficients: (B,
//   DICE_NUM_SUMS, C + 1), d loss / d sums[b, c, k] at [b, k, c] (row G is 0), and in column C of image 0
//   d loss / d ce_num (row DICE_SLOT_CE) and the poison, 0 or NaN for a bad label (row DICE_SLOT_POISON).
//
// dice_loss_bwd(grad_loss, coefficients, logits, target, params, codes, scalars) -> grad_logits
//   grad_loss: the loss's shape. The gradient of <grad_loss, loss>: the sums' backward with grad_sums[b, c, k] =
//   coefficients[b, k, c] times the upstream of the loss element of (b, c) (per element for the focal map).
//
// Every kernel is deterministic: the CPU sums fixed-size pixel chunks into their own rows and adds the rows in a
// fixed order; the CUDA kernels reduce in a fixed order too (no float atomics).

#include <torch/library.h>

// A FRAGMENT: every op of the project adds its schema to the torch_medloss namespace from its own csrc/<stem>.cpp.
TORCH_LIBRARY_FRAGMENT(torch_medloss, m) {
  // The fake kernels and the autograd formula are registered in Python, by this module.
  m.set_python_module("torch_medloss.ops.dice_sums");
  m.def("dice_sums_fwd(Tensor logits, Tensor target, Tensor params, int[] codes, float[] scalars) -> (Tensor, Tensor)");
  m.def(
      "dice_sums_bwd(Tensor grad_sums, Tensor grad_extras, Tensor logits, Tensor target, Tensor params, int[] codes, "
      "float[] scalars) -> Tensor");
  m.def("dice_loss_fwd(Tensor logits, Tensor target, Tensor params, int[] codes, float[] scalars) -> (Tensor, Tensor)");
  m.def(
      "dice_loss_bwd(Tensor grad_loss, Tensor coefficients, Tensor logits, Tensor target, Tensor params, int[] codes, "
      "float[] scalars) -> Tensor");
}
