// Schema of the fused ops and the Python module `ofdkern._C` that loads them. Kernels register
// themselves per dispatch key (ofd_cpu.cpp, ofd_cuda.cu); autograd and the fake kernel live in Python.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing ofdkern._C runs the static op registrations below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(ofdkern, m) {
  m.def(
      "ofd_fused(Tensor student, Tensor teacher, Tensor margin, bool elementwise, "
      "bool grad_student, bool grad_teacher, bool grad_margin) -> (Tensor, Tensor, Tensor, Tensor)");
}
