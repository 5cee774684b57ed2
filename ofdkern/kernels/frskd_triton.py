"""Triton kernels of the fused FRSKD ops, with the contracts of csrc/frskd_fused.h (same arguments and
outputs as torch.ops.ofdkern.attention_map / attention_map_backward / attention_transfer_maps / kd_fused), and
the math of csrc/frskd_math.h (see there for the KD formulation).

Loads are cast to the accumulation dtype (float32, float64 for float64 inputs); every output element is
written by one program and every sum runs in an order fixed by the shapes (no atomics).

KD: a row of at most _KD_CHUNK classes is one program that reads its logits once (exps kept in registers).
Wider rows are split into chunks over the grid's second axis: a first kernel writes each chunk's max and sum
of exps, the terms kernel merges its row's chunks in chunk order and writes the gradient and the chunk's share
of KL, and a third adds the shares per row (a fourth writes the teacher gradient, which needs the row's KL).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_helpers import accumulation_dtype, check_dense, launch

# Integer exponents up to this use repeated multiplication (exact, defined for negative bases).
_MAX_MULTIPLIED_EXPONENT = 8
# Classes per KD program; rows up to this width are one program.
_KD_CHUNK = 4096
# |r| below which g(r) = r - 1 + exp(-r) comes from its series (csrc/frskd_math.h). A constexpr: the
# compiler takes no other globals into a kernel (the interpreter takes any).
_KD_SERIES_BOUND = tl.constexpr(0.5)
# F.normalize's eps.
_NORMALIZE_EPS = 1e-12
_MAPS_BLOCK = 1024


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


def _split(value: float) -> tuple[float, float]:
    """value as float32 head and tail: Triton passes Python floats as float32, and head + tail keeps ~48 bits
    for the float64 kernels (float32 kernels see value rounded once)."""
    head = _to_float32(value)
    return head, _to_float32(value - head) if math.isfinite(head) else 0.0


def _to_float32(value: float) -> float:
    """value rounded to float32 (inf beyond its range)."""
    return torch.tensor(value, dtype=torch.float32).item()


@triton.jit
def _joined(head, tail, dtype: tl.constexpr):
    return tl.cast(head, dtype) + tl.cast(tail, dtype)


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
                          BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, P_SMALL: tl.constexpr,
                          P_INTEGRAL: tl.constexpr, P_ODD: tl.constexpr):
    n, j = _position_block(positions, BLOCK_P)
    lanes = tl.arange(0, BLOCK_C)
    acc_ty = out_ptr.dtype.element_ty
    sums = tl.zeros([BLOCK_P, BLOCK_C], acc_ty)
    base = f_ptr + n * stride_n + j[:, None] * stride_s
    for c0 in range(0, channels, BLOCK_C):
        c = c0 + lanes
        mask = (j[:, None] < positions) & (c[None, :] < channels)
        x = tl.load(base + c[None, :].to(tl.int64) * stride_c, mask=mask, other=0).to(acc_ty)
        sums += tl.where(mask, _pow(x, p, P_SMALL, P_INTEGRAL, P_ODD), 0.0)
    tl.store(out_ptr + n * positions + j, tl.sum(sums, axis=1) / channels, mask=j < positions)


@triton.jit
def _attention_map_backward_kernel(f_ptr, g_ptr, out_ptr, channels, positions, stride_n, stride_c, stride_s,
                                   out_stride_n, out_stride_c, out_stride_s, p, BLOCK_P: tl.constexpr,
                                   BLOCK_C: tl.constexpr, P_SMALL: tl.constexpr, P_INTEGRAL: tl.constexpr,
                                   P_ODD: tl.constexpr):
    n, j = _position_block(positions, BLOCK_P)
    lanes = tl.arange(0, BLOCK_C)
    acc_ty = g_ptr.dtype.element_ty
    # The mean's backward (g / C), then the power's, as autograd applies them.
    grad_mean = tl.load(g_ptr + n * positions + j, mask=j < positions, other=0) / channels
    base = n * stride_n + j[:, None] * stride_s
    out_base = n * out_stride_n + j[:, None] * out_stride_s
    for c0 in range(0, channels, BLOCK_C):
        c = (c0 + lanes).to(tl.int64)
        mask = (j[:, None] < positions) & (c[None, :] < channels)
        x = tl.load(f_ptr + base + c[None, :] * stride_c, mask=mask, other=0).to(acc_ty)
        grad = grad_mean[:, None] * _pow_grad(x, p, P_SMALL, P_INTEGRAL, P_ODD)
        tl.store(out_ptr + out_base + c[None, :] * out_stride_c, grad.to(out_ptr.dtype.element_ty), mask=mask)


def attention_map(feature: torch.Tensor, p: float) -> torch.Tensor:
    _check_feature(feature, p, "attention_map")
    batch, channels, positions = feature.shape
    out = feature.new_empty((batch, positions), dtype=accumulation_dtype(feature.dtype))
    if out.numel() == 0:
        return out
    block_p, block_c, warps = _tile_shape(feature)
    launch(_attention_map_kernel, _position_blocks(batch, positions, block_p), feature, out, channels, positions,
           *feature.stride(), float(p), device=feature.device, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps,
           **_exponent_args(p))
    return out


def attention_map_backward(feature: torch.Tensor, grad_map: torch.Tensor, p: float) -> torch.Tensor:
    _check_feature(feature, p, "attention_map_backward")
    batch, channels, positions = feature.shape
    acc = accumulation_dtype(feature.dtype)
    if grad_map.shape != (batch, positions) or grad_map.dtype != acc or not grad_map.is_contiguous():
        raise ValueError(f"attention_map_backward: grad_map must be a contiguous ({batch}, {positions}) tensor "
                         f"of dtype {acc}, got {grad_map.dtype} {tuple(grad_map.shape)}")
    check_dense("attention_map_backward", "feature", feature)  # the gradient takes its strides
    out = torch.empty_like(feature)
    if out.numel() == 0:
        return out
    block_p, block_c, warps = _tile_shape(feature)
    launch(_attention_map_backward_kernel, _position_blocks(batch, positions, block_p), feature, grad_map, out,
           channels, positions, *feature.stride(), *out.stride(), float(p), device=feature.device,
           BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps, **_exponent_args(p))
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
    eps = _joined(eps_head, eps_tail, acc_ty)
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
           *_split(_NORMALIZE_EPS), device=map_student.device, BLOCK=block, GRAD_STUDENT=grad_student,
           GRAD_TEACHER=grad_teacher)
    return row_loss, grad_s, grad_t


def attention_transfer_forward(student: torch.Tensor, teacher: torch.Tensor, p: float, count: int):
    """Both maps, their math and the loss over ``count``, as the C++ composite of csrc/frskd_op.cpp."""
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


# --- KD ---------------------------------------------------------------------------------------------------

@triton.jit
def _shift(row_max):
    """What logits are taken relative to: their max, or 0 while it is -inf (every value is -inf, exp gives 0)."""
    return tl.where(row_max == float("-inf"), 0.0, row_max)


@triton.jit
def _softmax_stats(v, inv_temperature):
    """(max, e, sum e) of a block of logits (masked lanes hold -inf), e = exp((v - shift(max)) / T)."""
    block_max = tl.max(v, axis=0)
    e = tl.exp((v - _shift(block_max)) * inv_temperature)
    return block_max, e, tl.sum(e, axis=0)


@triton.jit
def _merged_stats(stats_ptr, chunks, inv_temperature, which: tl.constexpr, CHUNKS: tl.constexpr):
    """The row's (max, sum) of the student (which = 0) or the teacher (which = 2) from its chunks' stats: the row
    max first, then each chunk's sum rescaled to it once."""
    c = tl.arange(0, CHUNKS)
    mask = c < chunks
    chunk_max = tl.load(stats_ptr + c * 4 + which, mask=mask, other=float("-inf"))
    chunk_sum = tl.load(stats_ptr + c * 4 + which + 1, mask=mask, other=0)
    row_max = tl.max(chunk_max, axis=0)
    rescaled = tl.where(chunk_max == float("-inf"), 0.0,
                        chunk_sum * tl.exp((chunk_max - _shift(row_max)) * inv_temperature))
    return row_max, tl.sum(rescaled, axis=0)


@triton.jit
def _divergence_series(r, LAST: tl.constexpr):
    """g(r) = r - 1 + exp(-r) = r^2 / 2 (1 + x/3 (1 + x/4 (... (1 + x/LAST)))) with x = -r, for small |r|."""
    x = -r
    h = tl.full(r.shape, 1.0, r.dtype)
    for i in tl.static_range(LAST, 2, -1):
        h = 1.0 + h * x * (1.0 / i)
    return 0.5 * r * r * h


@triton.jit
def _kd_log_ratio(x, y, shift_s, shift_t, inv_temperature, log_ratio):
    """r = log p_t - log p_s = (b - a) + log(S_s / S_t)."""
    return ((y - shift_t) * inv_temperature - (x - shift_s) * inv_temperature) + log_ratio


@triton.jit
def _kd_row_stats(stats_ptr, row, chunks, inv_temperature, CHUNKS: tl.constexpr):
    """A wide row's (max, sum) of the student and of the teacher, merged from its chunks' stats."""
    max_s, sum_s = _merged_stats(stats_ptr + row * chunks * 4, chunks, inv_temperature, 0, CHUNKS)
    max_t, sum_t = _merged_stats(stats_ptr + row * chunks * 4, chunks, inv_temperature, 2, CHUNKS)
    return max_s, sum_s, max_t, sum_t


@triton.jit
def _kd_chunk(s_ptr, t_ptr, classes, FILL: tl.constexpr, acc_ty: tl.constexpr, BLOCK: tl.constexpr):
    """This program's (row, chunk, class offsets, mask, student logits, teacher logits) in the accumulation
    dtype; classes past the row read as FILL."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    k = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = k < classes
    x = tl.load(s_ptr + row * classes + k, mask=mask, other=FILL).to(acc_ty)
    y = tl.load(t_ptr + row * classes + k, mask=mask, other=FILL).to(acc_ty)
    return row, chunk, k, mask, x, y


@triton.jit
def _kd_stats_kernel(s_ptr, t_ptr, stats_ptr, classes, chunks, inv_t_head, inv_t_tail, BLOCK: tl.constexpr):
    acc_ty = stats_ptr.dtype.element_ty
    inv_temperature = _joined(inv_t_head, inv_t_tail, acc_ty)
    row, chunk, k, mask, x, y = _kd_chunk(s_ptr, t_ptr, classes, float("-inf"), acc_ty, BLOCK)
    max_s, _, sum_s = _softmax_stats(x, inv_temperature)
    max_t, _, sum_t = _softmax_stats(y, inv_temperature)
    out = stats_ptr + (row * chunks + chunk) * 4
    tl.store(out, max_s)
    tl.store(out + 1, sum_s)
    tl.store(out + 2, max_t)
    tl.store(out + 3, sum_t)


@triton.jit
def _kd_terms_kernel(s_ptr, t_ptr, stats_ptr, partial_ptr, loss_ptr, gs_ptr, gt_ptr, classes, chunks, t_head, t_tail,
                     inv_t_head, inv_t_tail, t2_head, t2_tail, BLOCK: tl.constexpr, CHUNKS: tl.constexpr,
                     SERIES_LAST: tl.constexpr, GRAD_STUDENT: tl.constexpr, GRAD_TEACHER: tl.constexpr):
    """CHUNKS == 1: the whole row (stats, terms, loss and both gradients); else one chunk's terms, student
    gradient and share of KL, with the row merged from the stats kernel's output."""
    acc_ty = partial_ptr.dtype.element_ty
    temperature = _joined(t_head, t_tail, acc_ty)
    inv_temperature = _joined(inv_t_head, inv_t_tail, acc_ty)
    row, chunk, k, mask, x, y = _kd_chunk(s_ptr, t_ptr, classes, float("-inf"), acc_ty, BLOCK)
    if CHUNKS == 1:
        max_s, e_s, sum_s = _softmax_stats(x, inv_temperature)
        max_t, e_t, sum_t = _softmax_stats(y, inv_temperature)
    else:
        max_s, sum_s, max_t, sum_t = _kd_row_stats(stats_ptr, row, chunks, inv_temperature, CHUNKS)
        e_s = tl.exp((x - _shift(max_s)) * inv_temperature)
        e_t = tl.exp((y - _shift(max_t)) * inv_temperature)
    p_s = e_s * (1.0 / sum_s)
    p_t = e_t * (1.0 / sum_t)
    # Masked lanes: logits 0 there keep r finite; their terms are dropped below.
    x = tl.where(mask, x, 0.0)
    y = tl.where(mask, y, 0.0)
    r = _kd_log_ratio(x, y, _shift(max_s), _shift(max_t), inv_temperature, tl.log(sum_s / sum_t))
    near_zero = tl.abs(r) < _KD_SERIES_BOUND
    g = _divergence_series(r, SERIES_LAST)
    loss = tl.where(near_zero, p_t * g, tl.where(p_t > 0, p_t * r, 0.0) + (p_s - p_t))
    kl = tl.sum(tl.where(mask, loss, 0.0), axis=0)
    if GRAD_STUDENT:
        d_s = temperature * tl.where(near_zero, p_t * (g - r), p_s - p_t)
        tl.store(gs_ptr + row * classes + k, d_s.to(gs_ptr.dtype.element_ty), mask=mask)
    if CHUNKS == 1:
        tl.store(loss_ptr + row, kl * _joined(t2_head, t2_tail, acc_ty))
        if GRAD_TEACHER:
            d_t = tl.where(p_t > 0, temperature * p_t * (r - kl), 0.0)
            tl.store(gt_ptr + row * classes + k, d_t.to(gt_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(partial_ptr + row * chunks + chunk, kl)


@triton.jit
def _kd_finish_kernel(partial_ptr, loss_ptr, row_kl_ptr, chunks, t2_head, t2_tail, CHUNKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, CHUNKS)
    kl = tl.sum(tl.load(partial_ptr + row * chunks + c, mask=c < chunks, other=0), axis=0)
    tl.store(loss_ptr + row, kl * _joined(t2_head, t2_tail, partial_ptr.dtype.element_ty))
    tl.store(row_kl_ptr + row, kl)


@triton.jit
def _kd_teacher_grad_kernel(s_ptr, t_ptr, stats_ptr, row_kl_ptr, gt_ptr, classes, chunks, t_head, t_tail,
                            inv_t_head, inv_t_tail, BLOCK: tl.constexpr, CHUNKS: tl.constexpr):
    acc_ty = row_kl_ptr.dtype.element_ty
    temperature = _joined(t_head, t_tail, acc_ty)
    inv_temperature = _joined(inv_t_head, inv_t_tail, acc_ty)
    row, chunk, k, mask, x, y = _kd_chunk(s_ptr, t_ptr, classes, 0.0, acc_ty, BLOCK)
    max_s, sum_s, max_t, sum_t = _kd_row_stats(stats_ptr, row, chunks, inv_temperature, CHUNKS)
    p_t = tl.exp((y - _shift(max_t)) * inv_temperature) * (1.0 / sum_t)
    r = _kd_log_ratio(x, y, _shift(max_s), _shift(max_t), inv_temperature, tl.log(sum_s / sum_t))
    kl = tl.load(row_kl_ptr + row)
    d_t = tl.where(p_t > 0, temperature * p_t * (r - kl), 0.0)
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
    acc = accumulation_dtype(student.dtype)
    row_loss = student.new_empty((rows,), dtype=acc)
    d_student = torch.empty_like(student) if grad_student else student.new_empty((0,))
    d_teacher = torch.empty_like(teacher) if grad_teacher else teacher.new_empty((0,))
    if rows == 0:
        return row_loss, d_student, d_teacher
    if classes == 0:  # KL over nothing
        return row_loss.zero_(), d_student, d_teacher
    block = min(_KD_CHUNK, triton.next_power_of_2(classes))
    chunks = triton.cdiv(classes, block)
    chunks_pow2 = triton.next_power_of_2(chunks)
    warps = 8 if block >= 2048 else 4
    temperature = float(temperature)
    t, inv_t, t2 = _split(temperature), _split(1 / temperature), _split(temperature * temperature)
    # Per chunk: student max and sum, teacher max and sum (the wide-row path only).
    stats = student.new_empty((rows, chunks, 4) if chunks > 1 else (0,), dtype=acc)
    partial = student.new_empty((rows, chunks), dtype=acc)
    grid = (rows, chunks)
    if chunks > 1:
        launch(_kd_stats_kernel, grid, student, teacher, stats, classes, chunks, *inv_t, device=student.device,
               BLOCK=block, num_warps=warps)
    # Unused pointers get the partial buffer: the kernels never touch them.
    launch(_kd_terms_kernel, grid, student, teacher, stats if chunks > 1 else partial, partial, row_loss,
           d_student if grad_student else partial, d_teacher if grad_teacher else partial, classes, chunks, *t,
           *inv_t, *t2, device=student.device, BLOCK=block, CHUNKS=chunks_pow2,
           SERIES_LAST=16 if acc == torch.float64 else 9, GRAD_STUDENT=grad_student,
           GRAD_TEACHER=grad_teacher and chunks == 1, num_warps=warps)
    if chunks > 1:
        row_kl = student.new_empty((rows,), dtype=acc)
        launch(_kd_finish_kernel, (rows,), partial, row_loss, row_kl, chunks, *t2, device=student.device,
               CHUNKS=chunks_pow2)
        if grad_teacher:
            launch(_kd_teacher_grad_kernel, grid, student, teacher, stats, row_kl, d_teacher, classes, chunks, *t,
                   *inv_t, device=student.device, BLOCK=block, CHUNKS=chunks_pow2, num_warps=warps)
    return row_loss, d_student, d_teacher
