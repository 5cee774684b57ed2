"""How the kernels see a feature map: (N, C, positions), walked in place when it is NCHW or channels_last."""
from __future__ import annotations

import math

import torch


def channels_innermost(feature: torch.Tensor) -> bool:
    """Dense with the channels innermost: the strides channels_last (channels_last_3d, an (N, L, C) transpose)
    gives an (N, C, ...) tensor. A size-1 dim's stride is free. (The C++ twin: channels_innermost
    in csrc/layout.h.)"""
    step = feature.shape[1]
    expected = [0] * feature.dim()
    for dim in range(feature.dim() - 1, 1, -1):
        expected[dim] = step
        step *= feature.shape[dim]
    expected[1], expected[0] = 1, step
    return all(size == 1 or stride == want for size, stride, want in zip(feature.shape, feature.stride(), expected))


def walks_in_place(feature: torch.Tensor) -> bool:
    """Whether the kernels read ``feature`` where it is: NCHW (contiguous) or channels innermost."""
    return feature.is_contiguous() or channels_innermost(feature)


def walkable(feature: torch.Tensor) -> torch.Tensor:
    """``feature`` itself when the kernels walk it in place, else a contiguous copy."""
    return feature if walks_in_place(feature) else feature.contiguous()


def as_positions(feature: torch.Tensor) -> torch.Tensor:
    """``feature`` as a dense (N, C, positions) tensor: a view for the layouts the kernels walk in place, a
    contiguous copy otherwise."""
    batch, channels = feature.shape[:2]
    positions = math.prod(feature.shape[2:])
    if feature.is_contiguous() or not walks_in_place(feature):
        return feature.reshape(batch, channels, positions).contiguous()
    return feature.as_strided((batch, channels, positions), (positions * channels, 1, channels))
