"""Triton kernel of the fused ops' backward: the saved unit gradient scaled in place by ``grad_output``
(the twin of the CUDA ``scale_`` in csrc/ofd_cuda.cu)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_helpers import accumulation_dtype, check_dense, check_dtype, check_shape, launch, launch_size

_GPU_BLOCK, _INTERPRETED_BLOCK = 4096, 256
_NUM_WARPS = 8


@triton.jit
def _scale_kernel(gradient_ptr, factor_ptr, numel, BLOCK: tl.constexpr):
    """gradient *= factor, in the factor's dtype (the accumulation dtype): one rounding per element."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < numel
    factor = tl.load(factor_ptr)
    gradient = tl.load(gradient_ptr + offsets, mask=in_bounds, other=0.0).to(factor.dtype)
    tl.store(gradient_ptr + offsets, (gradient * factor).to(gradient_ptr.dtype.element_ty), mask=in_bounds)


def scale_triton_(gradient: torch.Tensor, factor: torch.Tensor) -> None:
    """``gradient *= factor`` with ``factor`` a 0-dim tensor in the accumulation dtype on the gradient's
    device, read by the kernel (no host sync)."""
    op = "scale_triton_"
    check_dense(op, "gradient", gradient)
    check_shape(op, "factor", factor, ())
    check_dtype(op, "factor", factor, accumulation_dtype(gradient.dtype))
    if factor.device != gradient.device:
        raise ValueError(f"{op}: factor must be on {gradient.device}, got {factor.device}")
    numel = gradient.numel()
    if numel == 0:
        return
    block = launch_size(gpu=_GPU_BLOCK, interpreted=_INTERPRETED_BLOCK)
    launch(_scale_kernel, (triton.cdiv(numel, block),), gradient, factor, numel, device=gradient.device,
           BLOCK=block, num_warps=_NUM_WARPS)
