// Schema of the fused channel-wise alignment op (contract in align_fused.h); kernels in align_cpu.cpp and
// align_cuda.cu.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(ofdkern, m) {
  m.def(
      "align_fused(Tensor student, Tensor teacher, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor? margin, "
      "bool grad_student, bool grad_teacher, bool grad_weights) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
