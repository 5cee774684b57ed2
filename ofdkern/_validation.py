"""Argument checks shared by the public ops: one clear error naming the argument, before any kernel runs."""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The reductions of each op: the losses with per-element (or per-row) values offer "none".
REDUCTIONS = ("sum", "mean", "batchmean", "none")
AT_REDUCTIONS = ("mean", "sum", "batchmean")
ALIGN_REDUCTIONS = ("sum", "mean", "batchmean")


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


def check_reduction(reduction, allowed: tuple[str, ...] = REDUCTIONS) -> None:
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {reduction!r}")


def check_pair(names: tuple[str, str], first, second, *, min_dim: int, max_dim: int,
               channels_may_differ: bool = False, hint: str = "") -> None:
    """A student and a teacher tensor: each floating point with ``min_dim`` to ``max_dim`` dims, and of one
    shape, or (``channels_may_differ``) of the same batch and spatial sizes."""
    for name, tensor in zip(names, (first, second)):
        check_tensor(name, tensor, min_dim=min_dim, max_dim=max_dim)
    if channels_may_differ:
        same, what = first.shape[:1] + first.shape[2:] == second.shape[:1] + second.shape[2:], (
            "the same batch and spatial sizes (channels may differ)")
    else:
        same, what = first.shape == second.shape, "the same shape"
    if not same:
        raise ValueError(f"{names[0]} and {names[1]} must have {what}, got {names[0]} {tuple(first.shape)} and "
                         f"{names[1]} {tuple(second.shape)}{hint}")


def check_ofd_args(student, teacher, margin, reduction) -> None:
    """Features of 2 to 5 dims with channels on dim 1, identical shapes, a per-channel margin."""
    check_pair(("student", "teacher"), student, teacher, min_dim=2, max_dim=5,
               hint=" (apply the connector to the student first)")
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


def as_number(name: str, value) -> float:
    """A real hyper-parameter given as a Python or NumPy number or a 0-dim real tensor, as a float (a tensor
    is read once, here); bools and anything else are refused."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real number or a 0-dim real tensor, got a {value.dtype} tensor "
                            f"of shape {tuple(value.shape)}")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def check_positive_int(name: str, value) -> int:
    """A count (channels, classes, a multiplier): a positive Python or NumPy integer, not a bool or a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_positive_number(name: str, value) -> float:
    """``as_number``, also required to be positive and finite."""
    number = as_number(name, value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return number


def check_non_negative_number(name: str, value) -> float:
    """``as_number``, also required to be finite and >= 0 (a loss weight)."""
    number = as_number(name, value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    return number


def check_attention_transfer_args(f_student, f_teacher, p, reduction) -> float:
    """Features of 2 to 5 dims, channels on dim 1 (they may differ: the maps average them out), equal batch
    and spatial sizes. Returns p as a float."""
    check_pair(("f_student", "f_teacher"), f_student, f_teacher, min_dim=2, max_dim=5, channels_may_differ=True)
    p = check_positive_number("p", p)
    check_same_device(f_student=f_student, f_teacher=f_teacher)
    check_reduction(reduction, AT_REDUCTIONS)
    return p


def check_kd_args(student_logits, teacher_logits, temperature, reduction) -> float:
    """(N, K) logits of the same shape, a positive temperature (returned as a float)."""
    check_pair(("student_logits", "teacher_logits"), student_logits, teacher_logits, min_dim=2, max_dim=2)
    temperature = check_positive_number("temperature", temperature)
    check_same_device(student_logits=student_logits, teacher_logits=teacher_logits)
    check_reduction(reduction)
    return temperature


def check_cwd_args(student, teacher, temperature, reduction) -> float:
    """(N, C, ...) maps of 2 to 5 dims and one shape, a positive temperature (returned as a float)."""
    check_pair(("student", "teacher"), student, teacher, min_dim=2, max_dim=5)
    temperature = check_positive_number("temperature", temperature)
    check_same_device(student=student, teacher=teacher)
    check_reduction(reduction)
    return temperature


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
    check_pair(("student", "teacher"), student, teacher, min_dim=2, max_dim=5, channels_may_differ=True)
    s_channels, t_channels = student.shape[1], teacher.shape[1]
    hidden = check_pointwise_weight("w1", w1, None, s_channels)
    check_pointwise_weight("w2", w2, t_channels, hidden)
    if min(s_channels, hidden, t_channels) < 1:
        raise ValueError(f"the MLP needs at least one channel in every layer, got student {s_channels}, hidden "
                         f"{hidden} (w1 {tuple(w1.shape)}) and teacher {t_channels} channels")
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
    check_reduction(reduction, ALIGN_REDUCTIONS)
