"""Argument checks shared by the public ops: one clear error naming the argument, before any kernel runs."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("sum", "mean", "batchmean", "none")


def check_tensor(name: str, value, *, min_dim: int = 0, max_dim: int = 64) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")
    if not min_dim <= value.dim() <= max_dim:
        raise ValueError(f"{name} must have {min_dim} to {max_dim} dims, got shape {tuple(value.shape)}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"tensors must be on one device, got {listed}")


def check_reduction(reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_ofd_args(student, teacher, margin, reduction) -> None:
    """Features of 2 to 5 dims with channels on dim 1, identical shapes, a per-channel margin."""
    check_tensor("student", student, min_dim=2, max_dim=5)
    check_tensor("teacher", teacher, min_dim=2, max_dim=5)
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher must have the same shape, got student {tuple(student.shape)} and "
            f"teacher {tuple(teacher.shape)} (apply the connector to the student first)")
    check_tensor("margin", margin)
    channels = student.shape[1]
    spatial_ones = (1,) * (student.dim() - 2)
    # (C,); the reference's (1, C, 1, ...) buffer; (C, 1, ...), which broadcasts against the features from the right.
    shapes = list(dict.fromkeys([(channels,), (1, channels) + spatial_ones, (channels,) + spatial_ones]))
    if tuple(margin.shape) not in shapes:
        raise ValueError(
            f"margin must have shape {' or '.join(map(str, shapes))} for features of shape "
            f"{tuple(student.shape)}, got {tuple(margin.shape)}")
    check_same_device(student=student, teacher=teacher, margin=margin)
    check_reduction(reduction)


def check_positive_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


AT_REDUCTIONS = ("mean", "sum", "batchmean")


def check_attention_transfer_args(f_student, f_teacher, p, reduction) -> None:
    """Features of 2 to 5 dims, channels on dim 1 (they may differ: the maps average them out), equal batch
    and spatial sizes."""
    check_tensor("f_student", f_student, min_dim=2, max_dim=5)
    check_tensor("f_teacher", f_teacher, min_dim=2, max_dim=5)
    if f_student.shape[:1] + f_student.shape[2:] != f_teacher.shape[:1] + f_teacher.shape[2:]:
        raise ValueError(
            f"f_student and f_teacher must have the same batch and spatial sizes (channels may differ), got "
            f"f_student {tuple(f_student.shape)} and f_teacher {tuple(f_teacher.shape)}")
    check_positive_number("p", p)
    check_same_device(f_student=f_student, f_teacher=f_teacher)
    if reduction not in AT_REDUCTIONS:
        raise ValueError(f"reduction must be one of {AT_REDUCTIONS}, got {reduction!r}")


def check_kd_args(student_logits, teacher_logits, temperature, reduction) -> None:
    """(N, K) logits of the same shape, a positive temperature."""
    check_tensor("student_logits", student_logits, min_dim=2, max_dim=2)
    check_tensor("teacher_logits", teacher_logits, min_dim=2, max_dim=2)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape (N, K), got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    check_positive_number("temperature", temperature)
    check_same_device(student_logits=student_logits, teacher_logits=teacher_logits)
    check_reduction(reduction)


ALIGN_REDUCTIONS = ("sum", "mean", "batchmean")


def check_pointwise_weight(name: str, weight, out_channels: int | None, in_channels: int) -> int:
    """An (out, in) matrix or an (out, in, 1, ...) 1x1-conv weight; returns out (checked when given)."""
    check_tensor(name, weight, min_dim=2, max_dim=5)
    shape = tuple(weight.shape)
    out_ok = out_channels is None or shape[0] == out_channels
    if not out_ok or shape[1] != in_channels or any(size != 1 for size in shape[2:]):
        out = "out" if out_channels is None else out_channels
        raise ValueError(f"{name} must have shape ({out}, {in_channels}) or ({out}, {in_channels}, 1, 1), "
                         f"got {shape}")
    return shape[0]


def check_channel_align_args(student, teacher, w1, b1, w2, b2, margin, reduction) -> None:
    """(N, Cs, ...) student and (N, Ct, ...) teacher of equal batch and spatial sizes, an MLP
    Cs -> hidden -> Ct, an optional per-channel margin of the teacher."""
    check_tensor("student", student, min_dim=2, max_dim=5)
    check_tensor("teacher", teacher, min_dim=2, max_dim=5)
    if student.shape[:1] + student.shape[2:] != teacher.shape[:1] + teacher.shape[2:]:
        raise ValueError(
            f"student and teacher must have the same batch and spatial sizes (channels may differ), got "
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)}")
    s_channels, t_channels = student.shape[1], teacher.shape[1]
    hidden = check_pointwise_weight("w1", w1, None, s_channels)
    check_pointwise_weight("w2", w2, t_channels, hidden)
    for name, bias, channels in (("b1", b1, hidden), ("b2", b2, t_channels)):
        check_tensor(name, bias)
        if tuple(bias.shape) != (channels,):
            raise ValueError(f"{name} must have shape ({channels},), got {tuple(bias.shape)}")
    tensors = dict(student=student, teacher=teacher, w1=w1, b1=b1, w2=w2, b2=b2)
    if margin is not None:
        check_tensor("margin", margin)
        broadcast = (1, t_channels) + (1,) * (teacher.dim() - 2)
        if tuple(margin.shape) not in ((t_channels,), broadcast):
            raise ValueError(f"margin must have shape ({t_channels},) or {broadcast} (teacher channels), "
                             f"got {tuple(margin.shape)}")
        tensors["margin"] = margin
    check_same_device(**tensors)
    if reduction not in ALIGN_REDUCTIONS:
        raise ValueError(f"reduction must be one of {ALIGN_REDUCTIONS}, got {reduction!r}")
