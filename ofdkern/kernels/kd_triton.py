"""Triton kernels of the fused KD op, with the contract of csrc/kd_fused.h (same arguments and outputs as
torch.ops.ofdkern.kd_fused), and the math of csrc/kd_math.h (see there for the formulation).

Loads are cast to the accumulation dtype (float32, float64 for float64 inputs); every output element is
written by one program and every sum runs in an order fixed by the shapes (no atomics).

A row of at most _KD_CHUNK classes is one program that reads its logits once (exps kept in registers).
Wider rows are split into chunks over the grid's second axis: a first kernel writes each chunk's max and sum
of exps, the terms kernel merges its row's chunks in chunk order and writes the gradient and the chunk's share
of KL, and a third adds the shares per row (a fourth writes the teacher gradient, which needs the row's KL).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_helpers import accumulation_dtype, joined, launch, split_float

# Classes per KD program; rows up to this width are one program.
_KD_CHUNK = 4096
# |r| below which g(r) = r - 1 + exp(-r) comes from its series (csrc/kd_math.h). A constexpr: the
# compiler takes no other globals into a kernel (the interpreter takes any).
_KD_SERIES_BOUND = tl.constexpr(0.5)

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
    inv_temperature = joined(inv_t_head, inv_t_tail, acc_ty)
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
    temperature = joined(t_head, t_tail, acc_ty)
    inv_temperature = joined(inv_t_head, inv_t_tail, acc_ty)
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
        tl.store(loss_ptr + row, kl * joined(t2_head, t2_tail, acc_ty))
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
    tl.store(loss_ptr + row, kl * joined(t2_head, t2_tail, partial_ptr.dtype.element_ty))
    tl.store(row_kl_ptr + row, kl)


@triton.jit
def _kd_teacher_grad_kernel(s_ptr, t_ptr, stats_ptr, row_kl_ptr, gt_ptr, classes, chunks, t_head, t_tail,
                            inv_t_head, inv_t_tail, BLOCK: tl.constexpr, CHUNKS: tl.constexpr):
    acc_ty = row_kl_ptr.dtype.element_ty
    temperature = joined(t_head, t_tail, acc_ty)
    inv_temperature = joined(inv_t_head, inv_t_tail, acc_ty)
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
    t, inv_t, t2 = split_float(temperature), split_float(1 / temperature), split_float(temperature * temperature)
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
