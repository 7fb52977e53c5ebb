// Schema of torch_medloss::label_histogram, declared once; csrc/cpu and csrc/cuda register its kernels.
//
// label_histogram(labels, num_classes, ignore_index) -> counts
//   labels:  (B, N) tensor of uint8, int8, int16, int32 or int64, any strides (the pixels of image b are labels[b]).
//   counts:  (B, num_classes + 1) int64, contiguous. counts[b, c] for c < num_classes is the number of pixels of
//            image b labelled c; counts[b, num_classes] is the number of its invalid pixels (label neither in
//            [0, num_classes) nor ignore_index), so that a loss can turn a bad label into NaN without a host sync.
//            Pixels labelled ignore_index are not counted, even when ignore_index lies in [0, num_classes).
// The counts are integers, so every backend is deterministic.

#include <torch/library.h>

// A FRAGMENT, not TORCH_LIBRARY: a namespace may have only one TORCH_LIBRARY block in a process, and every op of
// the project adds its schema to torch_medloss from its own csrc/<stem>.cpp (the Triton ops add theirs from Python).
TORCH_LIBRARY_FRAGMENT(torch_medloss, m) {
  // The fake (meta) kernel is registered in Python, by this module.
  m.set_python_module("torch_medloss.label_histogram");
  m.def("label_histogram(Tensor labels, int num_classes, int ignore_index) -> Tensor");
}
