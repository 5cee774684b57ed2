"""Conventions every fused op shares: the reductions' counts, and autocast around the kernels."""
from __future__ import annotations

import contextlib

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
