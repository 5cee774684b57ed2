"""Eager PyTorch references: the oracle the fused kernels are tested and benchmarked against.

``ofd_loss`` mirrors ``distillation_loss`` of the official OFD code (clovaai/overhaul-distillation,
``distiller.py``) op for op, so values, dtype promotion, NaN/Inf behaviour and autograd gradients are the
reference's own; it only adds the margin reshape and the reductions of ``ofdkern.ofd_loss``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def margin_as_channels(margin: torch.Tensor, ndim: int) -> torch.Tensor:
    """A (C,) or (1, C, 1, ...) margin as a (1, C, 1, ...) tensor broadcasting over ``ndim``-dim features."""
    return margin.reshape(1, -1, *([1] * (ndim - 2)))


def reduce_loss(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / loss.numel()
    if reduction == "batchmean":
        return loss.sum() / loss.shape[0]
    raise ValueError(f"reduction must be 'sum', 'mean', 'batchmean' or 'none', got {reduction!r}")


def ofd_loss(student: torch.Tensor, teacher: torch.Tensor, margin: torch.Tensor,
             reduction: str = "sum") -> torch.Tensor:
    """Margin-ReLU teacher transform + partial L2 distance, as in the reference code."""
    target = torch.max(teacher, margin_as_channels(margin, teacher.dim()))
    loss = F.mse_loss(student, target, reduction="none")
    loss = loss * ((student > target) | (target > 0)).float()
    return reduce_loss(loss, reduction)
