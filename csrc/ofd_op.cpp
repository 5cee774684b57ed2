// Schema of the fused OFD op (contract in ofd_fused.h); kernels in ofd_cpu.cpp and ofd_cuda.cu.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(ofdkern, m) {
  m.def(
      "ofd_fused(Tensor student, Tensor teacher, Tensor margin, bool elementwise, "
      "bool grad_student, bool grad_teacher, bool grad_margin) -> (Tensor, Tensor, Tensor, Tensor)");
}
