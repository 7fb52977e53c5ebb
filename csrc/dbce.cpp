// Schema of the fused DBCE ops, declared once; csrc/cpu and csrc/cuda register their kernels. The contract, as
// readable PyTorch, is torch_medloss/reference/dbce_ops.py (the ground truth).
//
// dbce_masks(labels, num_classes, ignore_index, element, radius, spacing) -> (masks, counts, areas, invalid)
//   labels:  (B, D, H, W) of uint8, int8, int16, int32 or int64, any strides (1-D and 2-D maps come with leading
//            size-1 spatial dims). element: 0 ball, 1 cube. radius >= 0; spacing: 3 voxel sizes > 0 (D, H, W).
//   masks:   (B, D, H, W) contiguous, uint8 / int16 / int32 / int64 for C <= 8 / 16 / 32 / 64: bit c is set when
//            the pixel is valid and lies in D_c, class c's valid pixels dilated by the element inside the image.
//   counts, areas: (B, C) int64, |M_c| and |D_c|; invalid: (B,) int64, labels neither in [0, C) nor ignore_index.
//
// dbce_ce_fwd(logits, labels, masks, class_weights, ignore_index, write_map) -> (sums, map)
//   logits (B, C, S) float32/bfloat16/float16 (float64 on the CPU), any strides; labels (B, S); masks (B, S);
//   class_weights (B, C) float32. w_i = max class weight over the bits of masks[i]; CE_i = logsumexp - x[label].
//   sums (B, 2) = [sum w*CE, sum w]; map (B, S) = w*CE when write_map, else an empty tensor. fp32 accumulation.
//
// dbce_ce_bwd(grad_sums, grad_map, logits, labels, masks, class_weights, ignore_index, write_map) -> grad_logits
//   grad_logits (B, C, S) in logits' dtype and layout: w_i (grad_sums[b, 0] + grad_map[b, i]) (softmax - onehot).
//
// dbce_loss_fwd(logits, labels, codes, scalars) -> (loss, masks, class_weights, norm)
//   The whole loss in one op (reference.dbce_ops.dbce_loss_fwd): logits (B, C, S) as above, labels (B, D, H, W) with
//   D H W = S; codes: DBCE_NUM_CODES ints (DBCE_CODE_*: element, batch, reduction, ignore_index); scalars: the
//   radius and the spacing along D, H, W (DBCE_SCALAR_*). loss: () for mean and sum, the (B, S) map w*CE for "none";
//   NaN (all of it) where a label is neither a class nor ignore_index. masks (B, S) in the mask dtype, class_weights
//   (B, C) (w_c = N / (K A_c) of each unit, in float64 rounded once; the batch's for every image with batch) and
//   norm (1,) = d loss / d sum w CE are in the accumulation dtype but the masks, for the backward.
//
// dbce_loss_bwd(grad_loss, masks, class_weights, norm, logits, labels, codes, scalars) -> grad_logits
//   The gradient of <grad_loss, loss> in logits' dtype and layout: dbce_ce_bwd with grad_sums[b, 0] = grad_loss
//   norm (mean, sum) or grad_map = grad_loss ("none").
//
// All reductions are deterministic (fixed-order partial sums, no float atomics).

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(torch_medloss, m) {
  // The fake kernels and the autograd formula are registered in Python, by this module.
  m.set_python_module("torch_medloss.ops.dbce");
  m.def(
      "dbce_masks(Tensor labels, int num_classes, int ignore_index, int element, float radius, float[] spacing) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "dbce_ce_fwd(Tensor logits, Tensor labels, Tensor masks, Tensor class_weights, int ignore_index, "
      "bool write_map) -> (Tensor, Tensor)");
  m.def(
      "dbce_ce_bwd(Tensor grad_sums, Tensor grad_map, Tensor logits, Tensor labels, Tensor masks, "
      "Tensor class_weights, int ignore_index, bool write_map) -> Tensor");
  m.def(
      "dbce_loss_fwd(Tensor logits, Tensor labels, int[] codes, float[] scalars) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "dbce_loss_bwd(Tensor grad_loss, Tensor masks, Tensor class_weights, Tensor norm, Tensor logits, Tensor labels, "
      "int[] codes, float[] scalars) -> Tensor");
}
