"""Triton kernels of the fused attention-transfer ops, with the contract of csrc/attention_transfer_fused.h
(same arguments and outputs as torch.ops.ofdkern.attention_map / attention_map_backward /
attention_transfer_maps / attention_transfer_forward), and the math of csrc/attention_transfer_math.h.

Loads are cast to the accumulation dtype (float32, float64 for float64 inputs) and the maps are float64;
every output element is written by one program and every sum runs in an order fixed by the shapes (no atomics).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_helpers import accumulation_dtype, check_dense, joined, launch, split_float

# Integer exponents up to this use repeated multiplication (exact, defined for negative bases).
_MAX_MULTIPLIED_EXPONENT = 8
# F.normalize's eps.
_NORMALIZE_EPS = 1e-12
_MAPS_BLOCK = 1024
# Channel blocks a map kernel sums in order in the accumulation dtype before adding them to its float64 sums.
_CHANNEL_LEAF = tl.constexpr(8)
_ACCUMULATION = {torch.float32: tl.float32, torch.float64: tl.float64}


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


def _check_feature(feature: torch.Tensor, p: float, op: str) -> None:
    if feature.dim() != 3 or not feature.is_floating_point():
        raise ValueError(f"{op}: feature must be a floating-point (N, C, S) tensor, got {feature.dtype} "
                         f"{tuple(feature.shape)}")
    if not (p > 0 and math.isfinite(p)):
        raise ValueError(f"{op}: p must be positive and finite, got {p}")


def _tile_shape(feature: torch.Tensor) -> tuple[int, int, int]:
    """(positions, channels, warps) of a feature tile: long runs along whichever dim is contiguous, so that
    loads coalesce for NCHW and channels_last alike."""
    channels = feature.shape[1]
    if feature.stride(1) == 1 and channels > 1:
        return 16, min(128, triton.next_power_of_2(channels)), 4
    return 128, 8, 4


def _position_blocks(batch: int, positions: int, block_p: int) -> tuple[int]:
    """The 1-D grid of the map kernels: one program per block of a sample's positions (a 2-D grid's second axis
    would stop at 65,535 blocks: a 1024x1024 channels_last map has 65,536)."""
    return (batch * triton.cdiv(positions, block_p),)


@triton.jit
def _position_block(positions, BLOCK_P: tl.constexpr):
    """(sample, its positions) of this program in the _position_blocks grid; 64-bit."""
    blocks = tl.cdiv(positions, BLOCK_P)
    pid = tl.program_id(0).to(tl.int64)
    n = pid // blocks
    return n, (pid - n * blocks) * BLOCK_P + tl.arange(0, BLOCK_P)


@triton.jit
def _attention_map_kernel(f_ptr, out_ptr, channels, positions, stride_n, stride_c, stride_s, p,
                          BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr, P_SMALL: tl.constexpr,
                          P_INTEGRAL: tl.constexpr, P_ODD: tl.constexpr):
    n, j = _position_block(positions, BLOCK_P)
    lanes = tl.arange(0, BLOCK_C)
    sums = tl.zeros([BLOCK_P, BLOCK_C], tl.float64)
    base = f_ptr + n * stride_n + j[:, None] * stride_s
    # Each lane sums a leaf of _CHANNEL_LEAF channel blocks in order in the accumulation dtype, then adds it to
    # its float64 total (the maps' dtype: csrc/attention_transfer_fused.h).
    for leaf_c0 in range(0, channels, BLOCK_C * _CHANNEL_LEAF):
        leaf = tl.zeros([BLOCK_P, BLOCK_C], ACC)
        for c0 in range(leaf_c0, tl.minimum(channels, leaf_c0 + BLOCK_C * _CHANNEL_LEAF), BLOCK_C):
            c = c0 + lanes
            mask = (j[:, None] < positions) & (c[None, :] < channels)
            x = tl.load(base + c[None, :].to(tl.int64) * stride_c, mask=mask, other=0).to(ACC)
            leaf += tl.where(mask, _pow(x, p, P_SMALL, P_INTEGRAL, P_ODD), 0.0)
        sums += leaf.to(tl.float64)
    tl.store(out_ptr + n * positions + j, tl.sum(sums, axis=1) / channels, mask=j < positions)


@triton.jit
def _attention_map_backward_kernel(f_ptr, g_ptr, out_ptr, channels, positions, stride_n, stride_c, stride_s,
                                   out_stride_n, out_stride_c, out_stride_s, p, BLOCK_P: tl.constexpr,
                                   BLOCK_C: tl.constexpr, ACC: tl.constexpr, P_SMALL: tl.constexpr,
                                   P_INTEGRAL: tl.constexpr, P_ODD: tl.constexpr):
    n, j = _position_block(positions, BLOCK_P)
    lanes = tl.arange(0, BLOCK_C)
    # The mean's backward (g / C, in float64 rounded once to ACC), then the power's, as autograd applies them.
    grad_mean = (tl.load(g_ptr + n * positions + j, mask=j < positions, other=0) / channels).to(ACC)
    base = n * stride_n + j[:, None] * stride_s
    out_base = n * out_stride_n + j[:, None] * out_stride_s
    for c0 in range(0, channels, BLOCK_C):
        c = (c0 + lanes).to(tl.int64)
        mask = (j[:, None] < positions) & (c[None, :] < channels)
        x = tl.load(f_ptr + base + c[None, :] * stride_c, mask=mask, other=0).to(ACC)
        grad = grad_mean[:, None] * _pow_grad(x, p, P_SMALL, P_INTEGRAL, P_ODD)
        tl.store(out_ptr + out_base + c[None, :] * out_stride_c, grad.to(out_ptr.dtype.element_ty), mask=mask)


def attention_map(feature: torch.Tensor, p: float) -> torch.Tensor:
    _check_feature(feature, p, "attention_map")
    batch, channels, positions = feature.shape
    out = feature.new_empty((batch, positions), dtype=torch.float64)
    if out.numel() == 0:
        return out
    block_p, block_c, warps = _tile_shape(feature)
    launch(_attention_map_kernel, _position_blocks(batch, positions, block_p), feature, out, channels, positions,
           *feature.stride(), float(p), device=feature.device, BLOCK_P=block_p, BLOCK_C=block_c,
           ACC=_ACCUMULATION[accumulation_dtype(feature.dtype)], num_warps=warps, **_exponent_args(p))
    return out


def attention_map_backward(feature: torch.Tensor, grad_map: torch.Tensor, p: float) -> torch.Tensor:
    _check_feature(feature, p, "attention_map_backward")
    batch, channels, positions = feature.shape
    if grad_map.shape != (batch, positions) or grad_map.dtype != torch.float64 or not grad_map.is_contiguous():
        raise ValueError(f"attention_map_backward: grad_map must be a contiguous ({batch}, {positions}) float64 "
                         f"tensor, got {grad_map.dtype} {tuple(grad_map.shape)}")
    check_dense("attention_map_backward", "feature", feature)  # the gradient takes its strides
    out = torch.empty_like(feature)
    if out.numel() == 0:
        return out
    block_p, block_c, warps = _tile_shape(feature)
    launch(_attention_map_backward_kernel, _position_blocks(batch, positions, block_p), feature, grad_map, out,
           channels, positions, *feature.stride(), *out.stride(), float(p), device=feature.device,
           BLOCK_P=block_p, BLOCK_C=block_c, ACC=_ACCUMULATION[accumulation_dtype(feature.dtype)], num_warps=warps,
           **_exponent_args(p))
    return out


@triton.jit
def _normalize_divisor(norm, eps):
    """max(norm, eps), keeping a NaN norm like clamp_min."""
    return tl.where(norm < eps, eps, norm)


@triton.jit
def _normalize_grad(g, u, g_dot_u, norm, eps):
    """F.normalize's backward: the projection off u divided by the norm above eps, g / eps below."""
    return tl.where(norm >= eps, (g - u * g_dot_u) / norm, g / eps)


@triton.jit
def _attention_maps_kernel(ms_ptr, mt_ptr, loss_ptr, gs_ptr, gt_ptr, positions, eps_head, eps_tail,
                           BLOCK: tl.constexpr, GRAD_STUDENT: tl.constexpr, GRAD_TEACHER: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    ms_row = ms_ptr + n * positions
    mt_row = mt_ptr + n * positions
    acc_ty = loss_ptr.dtype.element_ty
    eps = joined(eps_head, eps_tail, acc_ty)
    lanes = tl.arange(0, BLOCK)
    squares_s = tl.zeros([BLOCK], acc_ty)
    squares_t = tl.zeros([BLOCK], acc_ty)
    for j0 in range(0, positions, BLOCK):
        j = j0 + lanes
        a_s = tl.load(ms_row + j, mask=j < positions, other=0)
        a_t = tl.load(mt_row + j, mask=j < positions, other=0)
        squares_s += a_s * a_s
        squares_t += a_t * a_t
    norm_s = tl.sqrt(tl.sum(squares_s, axis=0))
    norm_t = tl.sqrt(tl.sum(squares_t, axis=0))
    divisor_s = _normalize_divisor(norm_s, eps)
    divisor_t = _normalize_divisor(norm_t, eps)
    total = tl.zeros([BLOCK], acc_ty)
    dot_s = tl.zeros([BLOCK], acc_ty)
    dot_t = tl.zeros([BLOCK], acc_ty)
    for j0 in range(0, positions, BLOCK):
        j = j0 + lanes
        u_s = tl.load(ms_row + j, mask=j < positions, other=0) / divisor_s
        u_t = tl.load(mt_row + j, mask=j < positions, other=0) / divisor_t
        diff = u_s - u_t
        total += diff * diff
        dot_s += u_s * diff
        dot_t += u_t * diff
    tl.store(loss_ptr + n, tl.sum(total, axis=0))
    if GRAD_STUDENT or GRAD_TEACHER:
        # d total / d u_s = 2 diff, d total / d u_t = -2 diff.
        two_dot_s = 2 * tl.sum(dot_s, axis=0)
        two_dot_t = 2 * tl.sum(dot_t, axis=0)
        for j0 in range(0, positions, BLOCK):
            j = j0 + lanes
            u_s = tl.load(ms_row + j, mask=j < positions, other=0) / divisor_s
            u_t = tl.load(mt_row + j, mask=j < positions, other=0) / divisor_t
            diff = u_s - u_t
            if GRAD_STUDENT:
                tl.store(gs_ptr + n * positions + j, _normalize_grad(2 * diff, u_s, two_dot_s, norm_s, eps),
                         mask=j < positions)
            if GRAD_TEACHER:
                tl.store(gt_ptr + n * positions + j, _normalize_grad(-2 * diff, u_t, -two_dot_t, norm_t, eps),
                         mask=j < positions)


def attention_transfer_maps(map_student: torch.Tensor, map_teacher: torch.Tensor, grad_student: bool,
                            grad_teacher: bool):
    if map_student.dim() != 2 or map_student.shape != map_teacher.shape:
        raise ValueError(f"attention_transfer_maps: maps must be (N, S) of one shape, got "
                         f"{tuple(map_student.shape)} and {tuple(map_teacher.shape)}")
    if map_student.dtype not in (torch.float32, torch.float64) or map_teacher.dtype != map_student.dtype:
        raise TypeError(f"attention_transfer_maps: maps must be float32 or float64 of one dtype, got "
                        f"{map_student.dtype} and {map_teacher.dtype}")
    if not (map_student.is_contiguous() and map_teacher.is_contiguous()):
        raise ValueError("attention_transfer_maps: maps must be contiguous")
    batch, positions = map_student.shape
    row_loss = map_student.new_empty((batch,))
    grad_s = torch.empty_like(map_student) if grad_student else map_student.new_empty((0,))
    grad_t = torch.empty_like(map_teacher) if grad_teacher else map_teacher.new_empty((0,))
    if batch == 0:
        return row_loss, grad_s, grad_t
    block = min(_MAPS_BLOCK, triton.next_power_of_2(max(positions, 1)))
    # Unused gradient pointers get the loss buffer: the kernel never touches them.
    launch(_attention_maps_kernel, (batch,), map_student, map_teacher, row_loss,
           grad_s if grad_student else row_loss, grad_t if grad_teacher else row_loss, positions,
           *split_float(_NORMALIZE_EPS), device=map_student.device, BLOCK=block, GRAD_STUDENT=grad_student,
           GRAD_TEACHER=grad_teacher)
    return row_loss, grad_s, grad_t


def attention_transfer_forward(student: torch.Tensor, teacher: torch.Tensor, p: float, count: int):
    """Both maps, their math and the loss over ``count``, as the C++ composite of csrc/attention_transfer_op.cpp."""
    if (student.dim() != 3 or teacher.dim() != 3 or student.shape[0] != teacher.shape[0]
            or student.shape[2] != teacher.shape[2]):
        raise ValueError(f"attention_transfer_forward: student and teacher must be (N, C, S) with equal N and S, "
                         f"got shapes {tuple(student.shape)} and {tuple(teacher.shape)}")
    map_student, map_teacher = attention_map(student, p), attention_map(teacher, p)
    dtype = torch.promote_types(map_student.dtype, map_teacher.dtype)
    row_loss, grad_student, grad_teacher = attention_transfer_maps(map_student.to(dtype), map_teacher.to(dtype),
                                                                   True, True)
    loss = row_loss.sum()
    if count != 1:
        loss = loss / count
    return (loss.to(torch.promote_types(student.dtype, teacher.dtype)), grad_student.to(map_student.dtype),
            grad_teacher.to(map_teacher.dtype))
