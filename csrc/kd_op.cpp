// Schema of the fused KD op (contract in kd_fused.h); kernels in kd_cpu.cpp and kd_cuda.cu. Channel-wise
// distillation (ofdkern/ops/cwd.py) runs the same op on the rows of its NCHW maps (cwd_op.cpp: channels_last).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(ofdkern, m) {
  m.def(
      "kd_fused(Tensor student, Tensor teacher, float temperature, bool grad_student, bool grad_teacher) "
      "-> (Tensor, Tensor, Tensor)");
}
