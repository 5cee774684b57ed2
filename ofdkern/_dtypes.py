"""The dtype rules every fused op shares (the kernels, C++ and Triton, follow the same: csrc/accumulation.h)."""
from __future__ import annotations

import torch


def accumulation_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels compute and accumulate in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if input_dtype == torch.float64 else torch.float32


def result_dtype(*tensors: torch.Tensor | None, at_least_float32: bool = False) -> torch.dtype:
    """The dtype an op's eager reference returns: the promotion of its (non-None) tensor arguments, and at
    least float32 when the reference multiplies by a float32 mask (OFD's partial L2)."""
    dtype = None
    for tensor in tensors:
        if tensor is not None:
            dtype = tensor.dtype if dtype is None else torch.promote_types(dtype, tensor.dtype)
    return torch.promote_types(dtype, torch.float32) if at_least_float32 else dtype
