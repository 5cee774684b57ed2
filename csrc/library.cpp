// The root of the `ofdkern` operator library and the Python module `ofdkern._C` that loads it. Each op adds
// its own schemas with TORCH_LIBRARY_FRAGMENT (<op>_op.cpp) and its kernels per dispatch
// key; autograd and the fake kernels live in Python (ofdkern/ops/).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing ofdkern._C runs the static op registrations; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// Whether at::parallel_for runs the CPU kernels on torch's threads: its `#pragma omp parallel` is inline,
// so it is serial unless this extension itself was compiled with OpenMP.
bool cpu_kernels_parallel() {
#if defined(_OPENMP)
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(ofdkern, m) {
  m.def("cpu_kernels_parallel() -> bool", &cpu_kernels_parallel);
  // The backward of every fused op: gradient *= factor (a 0-dim tensor in the accumulation dtype, read on
  // the device), each element rounded once. Kernels: cpu_scale.cpp, cuda_scale.cu.
  m.def("scale_(Tensor(a!) gradient, Tensor factor) -> ()");
}
