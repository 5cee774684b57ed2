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
