// Schema of CWD's channels_last kernel (contract in cwd_fused.h; CPU kernel in cwd_cpu.cpp). NCHW maps run the
// KD op (kd_op.cpp) on their rows.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(ofdkern, m) {
  m.def(
      "cwd_channels_last_fused(Tensor student, Tensor teacher, float temperature, bool grad_student, "
      "bool grad_teacher) -> (Tensor, Tensor, Tensor)");
}
