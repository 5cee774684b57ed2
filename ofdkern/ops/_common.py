"""Conventions every fused op shares: the reductions' counts and the (N, C, positions) view of features."""
from __future__ import annotations

import contextlib
import math

import torch


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


def gradient_scale(grad_loss: torch.Tensor, count: int) -> torch.Tensor:
    """What the backward multiplies the saved unit gradients by: ``grad_loss / count``. A count of 0 is a
    reduction over no element: every gradient is then an empty sum, exactly 0 (as autograd gives through the
    reference), not the 0 * inf = NaN of the division."""
    return torch.zeros_like(grad_loss) if count == 0 else divide_by_count(grad_loss, count)


def as_positions(feature: torch.Tensor) -> torch.Tensor:
    """``feature`` as a dense (N, C, positions) tensor: a view for NCHW and channels_last layouts (their
    spatial dims merge), a contiguous copy otherwise."""
    batch, channels = feature.shape[:2]
    positions = math.prod(feature.shape[2:])
    merged = feature.reshape(batch, channels, positions)
    return merged if merged.is_contiguous() or _channels_inner(merged) else merged.contiguous()


def _channels_inner(merged: torch.Tensor) -> bool:
    batch, channels, positions = merged.shape
    return merged.stride() == (channels * positions, 1, channels)


def empty_like_positions(feature: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialized tensor of ``feature``'s shape in the layout ``as_positions(feature)`` walks (channels
    innermost for channels_last features, NCHW otherwise), so that ``as_positions`` of it is a view."""
    batch, channels = feature.shape[:2]
    spatial = feature.shape[2:]
    if not _channels_inner(as_positions(feature)):
        return feature.new_empty(feature.shape, dtype=dtype)
    strides, step = [], channels
    for size in reversed(spatial):
        strides.append(step)
        step *= size
    return torch.empty_strided(feature.shape, (step, 1, *reversed(strides)), dtype=dtype or feature.dtype,
                               device=feature.device)


def autocast_off(device: torch.device):
    """The kernels and their ATen helpers run outside autocast: it would cast a GEMM's operands to half
    precision (custom ops fall through autocast, so its state is still on inside them)."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def autocast_loss(loss: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Under autocast a loss comes out in float32 (at least), like autocast gives the losses of the reference
    (mse_loss, log_softmax, kl_div run in float32 there); the kernels accumulated it in float32 anyway."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return loss.to(torch.promote_types(loss.dtype, torch.float32))
    return loss
