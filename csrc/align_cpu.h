// The elementwise passes of the CPU channel-wise alignment kernel (align_cpu.cpp): vectorized, and compiled
// once per instruction set (cpu_isa.h, align_cpu_kernels.h). Each pass runs on one column block of a tile, on
// the calling thread, and sums in an order fixed by the shapes alone. Sums are in the accumulation dtype.
#pragma once

#include <ATen/ATen.h>

#include "align_fused.h"
#include "cpu_isa.h"

namespace ofdkern {

struct AlignCpuPasses {
  // h = relu(h) in place; h: (rows, width) of the GEMM dtype, unit column stride.
  void (*relu)(const at::Tensor& h);
  // The loss pass of one column block: y (the block's columns of the tile's Y = W2 H) gets the bias b2 and
  // becomes d loss / d y in place; writes the block's teacher gradient when asked; adds each channel's sum of
  // the stored d loss / d y to bias_grad ((Ct,), when defined). Returns the block's loss.
  double (*loss)(const AlignProblem& p, const TileBuffer& y, const TileColumns& block, const at::Tensor& bias_grad);
  // dh = d relu / d x applied to dh in place, given h = relu(x) (same shape and strides as dh); adds each row's
  // sum of the stored dh to bias_grad ((rows,), when defined).
  void (*relu_backward)(const at::Tensor& dh, const at::Tensor& h, const at::Tensor& bias_grad);
};

OFDKERN_CPU_KERNEL_TABLE(AlignCpuPasses, kAlignCpuPasses)

}  // namespace ofdkern
