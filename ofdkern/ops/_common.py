"""Conventions every fused op shares."""
from __future__ import annotations

import math

import torch


def accumulation_dtype(feature_dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels compute and accumulate in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if feature_dtype == torch.float64 else torch.float32


def reduction_count(shape: torch.Size, reduction: str) -> int:
    """What the summed loss is divided by: every element ("mean"), the batch ("batchmean"), else 1."""
    if reduction == "mean":
        return shape.numel()
    if reduction == "batchmean":
        return shape[0]
    return 1


def divide_by_count(total: torch.Tensor, count: int) -> torch.Tensor:
    """``total / count``, without a kernel launch for the count of 1 ("sum"): the same bits."""
    return total if count == 1 else total / count


def as_positions(feature: torch.Tensor) -> torch.Tensor:
    """``feature`` as a dense (N, C, positions) tensor: a view for NCHW and channels_last layouts (their
    spatial dims merge), a contiguous copy otherwise."""
    batch, channels = feature.shape[:2]
    positions = math.prod(feature.shape[2:])
    merged = feature.reshape(batch, channels, positions)
    channels_inner = merged.stride() == (channels * positions, 1, channels)
    return merged if merged.is_contiguous() or channels_inner else merged.contiguous()
