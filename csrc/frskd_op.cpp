// Schemas of the fused FRSKD ops (contracts in frskd_fused.h), added to the ofdkern library defined in
// library.cpp. Kernels register per dispatch key (frskd_cpu.cpp, frskd_cuda.cu); autograd and fake kernels
// live in Python.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(ofdkern, m) {
  m.def("attention_map(Tensor feature, float p) -> Tensor");
  m.def("attention_map_backward(Tensor feature, Tensor grad_map, float p) -> Tensor");
  m.def(
      "attention_transfer_maps(Tensor map_student, Tensor map_teacher, bool grad_student, bool grad_teacher) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "kd_fused(Tensor student, Tensor teacher, float temperature, bool grad_student, bool grad_teacher) "
      "-> (Tensor, Tensor, Tensor)");
}
