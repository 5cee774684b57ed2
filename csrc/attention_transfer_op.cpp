// Schemas of the fused attention-transfer ops (contract in attention_transfer_fused.h), added to the ofdkern
// library defined in library.cpp. Kernels register per dispatch key (attention_transfer_cpu.cpp,
// attention_transfer_cuda.cu); autograd and fake kernels live in Python (ofdkern/ops/attention_transfer.py).
// attention_transfer_forward is the one composite: it runs the device's own kernels.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "attention_transfer_fused.h"

namespace ofdkern {
namespace {

AttentionMapsOutputs attention_transfer_forward(const at::Tensor& student, const at::Tensor& teacher, double p,
                                                int64_t count) {
  static const auto attention_map = c10::Dispatcher::singleton()
                                        .findSchemaOrThrow("ofdkern::attention_map", "")
                                        .typed<at::Tensor(const at::Tensor&, double)>();
  static const auto maps = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("ofdkern::attention_transfer_maps", "")
                               .typed<AttentionMapsOutputs(const at::Tensor&, const at::Tensor&, bool, bool)>();
  check_attention_transfer_features(student, teacher);
  // The teacher's map first: the student's feature, which the backward reads again, is then the one read last
  // (still in the last-level cache when it fits there).
  const at::Tensor map_teacher = attention_map.call(teacher, p);
  const at::Tensor map_student = attention_map.call(student, p);
  // The maps' math in their promoted dtype (float64 if either feature is), each gradient in its map's dtype.
  const auto dtype = at::promote_types(map_student.scalar_type(), map_teacher.scalar_type());
  const auto [row_loss, grad_student, grad_teacher] =
      maps.call(map_student.to(dtype), map_teacher.to(dtype), true, true);
  at::Tensor loss = row_loss.sum();
  if (count != 1) loss = loss / count;
  return {loss.to(at::promote_types(student.scalar_type(), teacher.scalar_type())),
          grad_student.to(map_student.scalar_type()), grad_teacher.to(map_teacher.scalar_type())};
}

}  // namespace
}  // namespace ofdkern

TORCH_LIBRARY_FRAGMENT(ofdkern, m) {
  m.def("attention_map(Tensor feature, float p) -> Tensor");
  m.def("attention_map_backward(Tensor feature, Tensor grad_map, float p) -> Tensor");
  m.def(
      "attention_transfer_maps(Tensor map_student, Tensor map_teacher, bool grad_student, bool grad_teacher) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("attention_transfer_forward(Tensor student, Tensor teacher, float p, int count) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ofdkern, CompositeExplicitAutograd, m) {
  m.impl("attention_transfer_forward", &ofdkern::attention_transfer_forward);
}
