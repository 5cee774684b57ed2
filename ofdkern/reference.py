"""Eager PyTorch references: the oracle the fused kernels are tested and benchmarked against.

``ofd_loss`` mirrors ``distillation_loss`` of the official OFD code (clovaai/overhaul-distillation,
``distiller.py``) op for op, so values, dtype promotion, NaN/Inf behaviour and autograd gradients are the
reference's own; it only adds the margin reshape and the reductions of ``ofdkern.ofd_loss``.
"""
from __future__ import annotations

import math

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
    # The explicit casts are the promotion mse_loss does anyway (a float64 student against a bfloat16 target
    # computes in float64); on CUDA (torch 2.11) its backward rejects mixed dtypes instead of promoting.
    dtype = torch.promote_types(student.dtype, target.dtype)
    loss = F.mse_loss(student.to(dtype), target.to(dtype), reduction="none")
    loss = loss * ((student > target) | (target > 0)).float()
    return reduce_loss(loss, reduction)


# FRSKD (Ji et al., CVPR 2021; MingiJi/FRSKD, classification/distill_loss/AT.py and KD.py).

def attention_map(feature: torch.Tensor, p: float = 2) -> torch.Tensor:
    """The reference ``at``: per sample, mean over channels of ``feature**p``, L2-normalized over positions."""
    return F.normalize(feature.pow(p).mean(1).view(feature.size(0), -1))


def attention_transfer_loss(f_student: torch.Tensor, f_teacher: torch.Tensor, p: float = 2,
                            reduction: str = "mean") -> torch.Tensor:
    """The reference ``at_loss`` (= ``reduction="mean"``): squared difference of the attention maps."""
    return reduce_loss((attention_map(f_student, p) - attention_map(f_teacher, p)).pow(2), reduction)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0,
            reduction: str = "batchmean") -> torch.Tensor:
    """Soft-label KD ``KL(softmax(t/T) || softmax(s/T)) * T^2`` (the reference ``DistillKL`` without its
    detach: the teacher gets the gradient autograd gives). "none" gives one value per row."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits / temperature, dim=1)
    per_class = F.kl_div(log_p_student, p_teacher, reduction="none") * temperature ** 2
    if reduction == "mean":  # F.kl_div's "mean": over every element
        return per_class.sum() / per_class.numel()
    return reduce_loss(per_class.sum(dim=1), reduction)


# Channel-wise distillation (Shu et al., ICCV 2021; mmrazor's ChannelWiseDivergence).

def cwd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
             reduction: str = "mean") -> torch.Tensor:
    """Per sample n and channel c, ``T^2 * KL(softmax(t[n, c] / T) || softmax(s[n, c] / T))`` over the positions
    of that channel's map: soft-label KD whose rows are the (N * C) maps. mmrazor writes the KL as
    ``sum(p_t * log_softmax(t / T) - p_t * log_softmax(s / T))``, the same value where p_t > 0; where p_t is 0
    this (F.kl_div's xlogy) adds 0 instead of mmrazor's 0 * log 0 = NaN. "mean" divides the sum by N * C
    (mmrazor's normalization), "batchmean" by N; "none" gives the (N, C) terms."""
    batch, channels, positions = student.shape[0], student.shape[1], math.prod(student.shape[2:])
    rows = kd_loss(student.reshape(batch * channels, positions), teacher.reshape(batch * channels, positions),
                   temperature, "none").view(batch, channels)
    return reduce_loss(rows, reduction)


# Channel-wise transformation (Liu et al., ICCVW 2023; no official code): a per-pixel MLP on the student
# feature, then L2 (or OFD's margin ReLU + partial L2) against the teacher.

def pointwise_conv(feature: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution of (N, C, ...) features with an (out, in) or (out, in, 1, ...) weight."""
    weight = weight.reshape(weight.shape[0], weight.shape[1])
    spatial = feature.dim() - 2
    if spatial == 0:
        return F.linear(feature, weight, bias)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return conv(feature, weight.reshape(*weight.shape, *([1] * spatial)), bias)


def channel_align_loss(student: torch.Tensor, teacher: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                       w2: torch.Tensor, b2: torch.Tensor, margin: torch.Tensor | None = None,
                       reduction: str = "sum") -> torch.Tensor:
    """``conv1x1(w2, b2) . relu . conv1x1(w1, b1)`` on the student, then ``sum (MLP(s) - t)^2`` or, with a
    margin, ``ofd_loss(MLP(s), t, margin)``. Every tensor is first cast to their promoted dtype (a convolution
    needs one dtype)."""
    dtype = student.dtype
    for tensor in (teacher, w1, b1, w2, b2):
        dtype = torch.promote_types(dtype, tensor.dtype)
    w1, b1, w2, b2, student, teacher = (x.to(dtype) for x in (w1, b1, w2, b2, student, teacher))
    projected = pointwise_conv(torch.relu(pointwise_conv(student, w1, b1)), w2, b2)
    if margin is not None:
        return ofd_loss(projected, teacher, margin, reduction)
    return reduce_loss(F.mse_loss(projected, teacher, reduction="none"), reduction)
