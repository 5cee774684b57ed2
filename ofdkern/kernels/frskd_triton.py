"""Triton kernels of the fused FRSKD ops, with the contracts of csrc/frskd_fused.h (same arguments and
outputs as torch.ops.ofdkern.attention_map / attention_map_backward / kd_fused).

Loads are cast to the accumulation dtype (float32, float64 for float64 inputs); every output element is
written by one program and every sum runs in a fixed order (no atomics).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_helpers import accumulation_dtype, check_dense, launch

# Integer exponents up to this use repeated multiplication (exact, defined for negative bases).
_MAX_MULTIPLIED_EXPONENT = 8
_POSITION_BLOCK = 128
_CLASS_BLOCK = 1024


@triton.jit
def _pow(x, e, E_SMALL: tl.constexpr, E_INTEGRAL: tl.constexpr, E_ODD: tl.constexpr):
    """x**e as torch.pow gives it. E_SMALL > 0: e == E_SMALL, by multiplication; otherwise through exp/log,
    with the sign of an integral e restored for negative x (a fractional e gives NaN there, like torch)."""
    if E_SMALL > 0:
        result = x
        for _ in tl.static_range(E_SMALL - 1):
            result = result * x
    elif E_INTEGRAL:
        magnitude = tl.exp(e * tl.log(tl.abs(x)))
        result = tl.where((x < 0) & E_ODD, -magnitude, magnitude)
    else:
        result = tl.exp(e * tl.log(x))
    return result


@triton.jit
def _pow_grad(x, p, P_SMALL: tl.constexpr, P_INTEGRAL: tl.constexpr, P_ODD: tl.constexpr):
    """p * x**(p - 1)."""
    if P_SMALL == 1:
        result = tl.full(x.shape, 1.0, x.dtype)
    elif P_SMALL > 1:
        result = p * _pow(x, p - 1, P_SMALL - 1, True, False)
    else:
        result = p * _pow(x, p - 1, 0, P_INTEGRAL, not P_ODD)
    return result


def _exponent_args(p: float) -> dict:
    integral = float(p).is_integer()
    small = int(p) if integral and 1 <= p <= _MAX_MULTIPLIED_EXPONENT else 0
    return dict(P_SMALL=small, P_INTEGRAL=integral, P_ODD=integral and int(p) % 2 == 1)


@triton.jit
def _attention_map_kernel(f_ptr, out_ptr, channels, positions, stride_n, stride_c, stride_s, p,
                          BLOCK: tl.constexpr, P_SMALL: tl.constexpr, P_INTEGRAL: tl.constexpr,
                          P_ODD: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = j < positions
    acc_ty = out_ptr.dtype.element_ty
    sums = tl.zeros([BLOCK], acc_ty)
    base = f_ptr + n * stride_n + j * stride_s
    for c in range(0, channels):  # ascending channel order, like the CPU kernel
        x = tl.load(base + c * stride_c, mask=mask, other=0).to(acc_ty)
        sums += _pow(x, p, P_SMALL, P_INTEGRAL, P_ODD)
    tl.store(out_ptr + n * positions + j, sums / channels, mask=mask)


@triton.jit
def _attention_map_backward_kernel(f_ptr, g_ptr, out_ptr, channels, positions, stride_n, stride_c, stride_s, p,
                                   BLOCK: tl.constexpr, P_SMALL: tl.constexpr, P_INTEGRAL: tl.constexpr,
                                   P_ODD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n = row // channels
    c = row % channels
    j = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = j < positions
    acc_ty = g_ptr.dtype.element_ty
    grad_mean = tl.load(g_ptr + n * positions + j, mask=mask, other=0) / channels
    offsets = n * stride_n + c * stride_c + j * stride_s
    x = tl.load(f_ptr + offsets, mask=mask, other=0).to(acc_ty)
    grad = grad_mean * _pow_grad(x, p, P_SMALL, P_INTEGRAL, P_ODD)
    tl.store(out_ptr + offsets, grad.to(out_ptr.dtype.element_ty), mask=mask)


def _check_feature(feature: torch.Tensor, op: str) -> None:
    if feature.dim() != 3 or not feature.is_floating_point():
        raise ValueError(f"{op}: feature must be a floating-point (N, C, S) tensor, got {feature.dtype} "
                         f"{tuple(feature.shape)}")


def attention_map(feature: torch.Tensor, p: float) -> torch.Tensor:
    _check_feature(feature, "attention_map")
    batch, channels, positions = feature.shape
    out = feature.new_empty((batch, positions), dtype=accumulation_dtype(feature.dtype))
    if out.numel() == 0:
        return out
    grid = (batch, triton.cdiv(positions, _POSITION_BLOCK))
    launch(_attention_map_kernel, grid, feature, out, channels, positions, *feature.stride(), float(p),
           device=feature.device, BLOCK=_POSITION_BLOCK, **_exponent_args(p))
    return out


def attention_map_backward(feature: torch.Tensor, grad_map: torch.Tensor, p: float) -> torch.Tensor:
    _check_feature(feature, "attention_map_backward")
    batch, channels, positions = feature.shape
    acc = accumulation_dtype(feature.dtype)
    if grad_map.shape != (batch, positions) or grad_map.dtype != acc or not grad_map.is_contiguous():
        raise ValueError(f"attention_map_backward: grad_map must be a contiguous ({batch}, {positions}) tensor "
                         f"of dtype {acc}, got {grad_map.dtype} {tuple(grad_map.shape)}")
    check_dense("attention_map_backward", "feature", feature)  # the gradient takes its strides
    out = torch.empty_strided(feature.shape, feature.stride(), dtype=feature.dtype, device=feature.device)
    if out.numel() == 0:
        return out
    grid = (batch * channels, triton.cdiv(positions, _POSITION_BLOCK))
    launch(_attention_map_backward_kernel, grid, feature, grad_map, out, channels, positions, *feature.stride(),
           float(p), device=feature.device, BLOCK=_POSITION_BLOCK, **_exponent_args(p))
    return out


@triton.jit
def _rescale(old_max, new_max):
    """exp(old_max - new_max) for sums kept against old_max; 0 while nothing was summed (old_max = -inf)."""
    return tl.where(old_max == float("-inf"), 0.0, tl.exp(old_max - new_max))


@triton.jit
def _shift(running_max):
    """What exp is taken against: the max, or 0 while it is -inf (every value seen is -inf, exp gives 0)."""
    return tl.where(running_max == float("-inf"), 0.0, running_max)


@triton.jit
def _kd_kernel(s_ptr, t_ptr, loss_ptr, gs_ptr, gt_ptr, classes, temperature,
               BLOCK: tl.constexpr, GRAD_STUDENT: tl.constexpr, GRAD_TEACHER: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * classes
    t_row = t_ptr + row * classes
    acc_ty = loss_ptr.dtype.element_ty
    lanes = tl.arange(0, BLOCK)
    # Online state per lane (see KDRowState in csrc/frskd_math.h), merged across lanes at the end.
    max_s = tl.full([BLOCK], float("-inf"), acc_ty)
    max_t = tl.full([BLOCK], float("-inf"), acc_ty)
    sum_s = tl.zeros([BLOCK], acc_ty)
    sum_t = tl.zeros([BLOCK], acc_ty)
    cross = tl.zeros([BLOCK], acc_ty)
    for start in range(0, classes, BLOCK):
        k = start + lanes
        mask = k < classes
        x = tl.load(s_row + k, mask=mask, other=float("-inf")).to(acc_ty) / temperature
        y = tl.load(t_row + k, mask=mask, other=float("-inf")).to(acc_ty) / temperature
        new_max_s = tl.maximum(max_s, x)
        new_max_t = tl.maximum(max_t, y)
        sum_s = sum_s * _rescale(max_s, new_max_s) + tl.exp(x - _shift(new_max_s))
        e_t = tl.exp(y - _shift(new_max_t))
        factor_t = _rescale(max_t, new_max_t)
        sum_t = sum_t * factor_t + e_t
        cross = cross * factor_t + tl.where(e_t > 0, e_t * (y - x), 0.0)
        max_s = new_max_s
        max_t = new_max_t
    row_max_s = tl.max(max_s, axis=0)
    row_max_t = tl.max(max_t, axis=0)
    total_s = tl.sum(sum_s * _rescale(max_s, row_max_s), axis=0)
    lane_factor_t = _rescale(max_t, row_max_t)
    total_t = tl.sum(sum_t * lane_factor_t, axis=0)
    total_cross = tl.sum(cross * lane_factor_t, axis=0)
    log_z_s = _shift(row_max_s) + tl.log(total_s)
    log_z_t = _shift(row_max_t) + tl.log(total_t)
    kl = total_cross / total_t - log_z_t + log_z_s
    tl.store(loss_ptr + row, kl * temperature * temperature)
    if GRAD_STUDENT or GRAD_TEACHER:
        for start in range(0, classes, BLOCK):
            k = start + lanes
            mask = k < classes
            x = tl.load(s_row + k, mask=mask, other=0).to(acc_ty) / temperature
            y = tl.load(t_row + k, mask=mask, other=0).to(acc_ty) / temperature
            log_p_s = x - log_z_s
            log_p_t = y - log_z_t
            p_t = tl.exp(log_p_t)
            if GRAD_STUDENT:
                d_s = temperature * (tl.exp(log_p_s) - p_t)
                tl.store(gs_ptr + row * classes + k, d_s.to(gs_ptr.dtype.element_ty), mask=mask)
            if GRAD_TEACHER:
                d_t = tl.where(p_t > 0, temperature * p_t * (log_p_t - log_p_s - kl), 0.0)
                tl.store(gt_ptr + row * classes + k, d_t.to(gt_ptr.dtype.element_ty), mask=mask)


def kd_fused(student: torch.Tensor, teacher: torch.Tensor, temperature: float, grad_student: bool,
             grad_teacher: bool):
    if student.dim() != 2 or student.shape != teacher.shape or student.dtype != teacher.dtype:
        raise ValueError(f"kd_fused: student and teacher must be (N, K) logits of one shape and dtype, got "
                         f"{student.dtype} {tuple(student.shape)} and {teacher.dtype} {tuple(teacher.shape)}")
    if not (student.is_contiguous() and teacher.is_contiguous()):
        raise ValueError("kd_fused: logits must be contiguous")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"kd_fused: temperature must be positive and finite, got {temperature}")
    rows, classes = student.shape
    row_loss = student.new_empty((rows,), dtype=accumulation_dtype(student.dtype))
    d_student = torch.empty_like(student) if grad_student else student.new_empty((0,))
    d_teacher = torch.empty_like(teacher) if grad_teacher else teacher.new_empty((0,))
    if rows == 0:
        return row_loss, d_student, d_teacher
    block = min(_CLASS_BLOCK, triton.next_power_of_2(max(classes, 1)))
    # Unused gradient pointers get the row buffer: the kernel never touches them.
    launch(_kd_kernel, (rows,), student, teacher, row_loss, d_student if grad_student else row_loss,
           d_teacher if grad_teacher else row_loss, classes, float(temperature), device=student.device,
           BLOCK=block, GRAD_STUDENT=grad_student, GRAD_TEACHER=grad_teacher)
    return row_loss, d_student, d_teacher
