"""Triton kernel of the fused OFD op: the contract of the C++ op (csrc/ofd_fused.h), the per-element math of
triton_helpers (the twin of csrc/ofd_math.h).

One pass over student and teacher in memory order writes the loss (one partial sum per program, or the
per-element losses) and the requested gradients. Runs on CUDA tensors, and on CPU tensors under
TRITON_INTERPRET=1. (The interpreter truncates float32 -> bfloat16 stores where the GPU rounds to nearest
even: bfloat16 gradients can differ by one ulp between the two.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_helpers import (accumulation_dtype, check_dense, check_dtype, check_same_device, check_shape, launch,
                             launch_size, margin_share, ofd_point, teacher_share)

# GPU: 4096 elements per program, 16 per thread over 8 warps, so each thread issues several 128-bit loads
# and the partial vector stays ~1/4096 of the features. Interpreter: tiny test shapes should still span
# several programs (partials, masked tails, channels wrapping across program boundaries).
_GPU_BLOCK, _INTERPRETED_BLOCK = 4096, 256
_NUM_WARPS = 8


@triton.jit
def _divide(n, magic, shift):
    """n // divisor for uint32 n < 2^31 (so that high + n does not wrap), with (magic, shift) from
    _magic_divider(divisor)."""
    high = tl.umulhi(n, magic.to(tl.uint32))
    return (high + n) >> shift.to(tl.uint32)


# Runtime values, not specializations: no recompile per shape, and channels == 1 must not turn into a
# constexpr (it is cast in the kernel).
@triton.jit(do_not_specialize=["channels", "stride_magic", "stride_shift", "channels_magic", "channels_shift"])
def _ofd_fused_kernel(
    student_ptr, teacher_ptr, margin_ptr,
    loss_ptr,  # per-element losses (ELEMENTWISE) or one partial sum per program
    grad_student_ptr, grad_teacher_ptr, grad_margin_ptr,
    numel, channel_stride, channels, stride_magic, stride_shift, channels_magic, channels_shift,
    ELEMENTWISE: tl.constexpr, GRAD_STUDENT: tl.constexpr, GRAD_TEACHER: tl.constexpr,
    GRAD_MARGIN: tl.constexpr, WIDE_INDEX: tl.constexpr, BLOCK: tl.constexpr,
):
    # The margin is stored in the accumulation dtype: float64 for float64 features, float32 otherwise.
    acc_dtype = margin_ptr.dtype.element_ty
    # int64 before the multiply: offsets of tensors over 2^31 elements must not wrap.
    block_start = tl.program_id(0).to(tl.int64) * BLOCK
    lane = tl.arange(0, BLOCK)
    offsets = block_start + lane
    in_bounds = offsets < numel

    # Channel of offset i: (i // channel_stride) % channels.
    if WIDE_INDEX:
        channel = (offsets // channel_stride) % channels
    else:
        # Per-element 64-bit division would cost more than the memory traffic: divide the block start
        # once, then the per-element dividends (< channel_stride + BLOCK and < channels + BLOCK, both
        # under 2^31 here) by multiplying with precomputed magic numbers.
        first_group = block_start // channel_stride
        start_in_group = (block_start - first_group * channel_stride).to(tl.uint32)
        groups_in = _divide(start_in_group + lane.to(tl.uint32), stride_magic, stride_shift)
        group = (first_group % channels).to(tl.uint32) + groups_in
        channel = group - channels.to(tl.uint32) * _divide(group, channels_magic, channels_shift)

    s = tl.load(student_ptr + offsets, mask=in_bounds, other=0.0).to(acc_dtype)
    t = tl.load(teacher_ptr + offsets, mask=in_bounds, other=0.0).to(acc_dtype)
    m = tl.load(margin_ptr + channel, mask=in_bounds, other=0.0)

    loss, d_student = ofd_point(s, t, m)

    if ELEMENTWISE:
        tl.store(loss_ptr + offsets, loss, mask=in_bounds)
    else:
        # Fixed-shape tree sum: the same bits every run, no atomics.
        tl.store(loss_ptr + tl.program_id(0), tl.sum(tl.where(in_bounds, loss, 0.0), axis=0))
    if GRAD_STUDENT:
        tl.store(grad_student_ptr + offsets, d_student.to(grad_student_ptr.dtype.element_ty), mask=in_bounds)
    if GRAD_TEACHER:
        tl.store(grad_teacher_ptr + offsets, teacher_share(d_student, t, m).to(grad_teacher_ptr.dtype.element_ty),
                 mask=in_bounds)
    if GRAD_MARGIN:
        tl.store(grad_margin_ptr + offsets, margin_share(d_student, t, m), mask=in_bounds)


def _magic_divider(divisor: int) -> tuple[int, int]:
    """(magic, shift) such that n // divisor == (umulhi(n, magic) + n) >> shift for 0 <= n < 2^32 and
    1 <= divisor < 2^32 (Granlund and Montgomery, 1994: magic is floor(2^(32 + shift) / divisor) + 1
    less its 2^32 bit, which the "+ n" restores)."""
    shift = (divisor - 1).bit_length()
    return (((1 << shift) - divisor) << 32) // divisor + 1, shift


def _allocate_fused_outputs(student, teacher, margin, elementwise, grad_student, grad_teacher, grad_margin,
                            partial_count):
    """The Python twin of allocate_fused_outputs (csrc/ofd_fused.h): the contract checked, the outputs
    allocated."""
    op = "ofd_fused_triton"
    if student.dim() < 2:
        raise ValueError(f"{op}: student must have a channel dim 1, got shape {tuple(student.shape)}")
    check_shape(op, "teacher", teacher, student.shape)
    check_dtype(op, "teacher", teacher, student.dtype)
    check_dense(op, "student", student)
    if teacher.stride() != student.stride():
        raise ValueError(f"{op}: student and teacher must share strides, got {student.stride()} and "
                         f"{teacher.stride()}")
    acc = accumulation_dtype(student.dtype)
    check_shape(op, "margin", margin, (student.shape[1],))
    check_dtype(op, "margin", margin, acc)
    check_dense(op, "margin", margin)
    check_same_device(op, student=student, teacher=teacher, margin=margin)

    loss = (torch.empty_like(student, dtype=acc) if elementwise
            else student.new_empty((partial_count,), dtype=acc))

    def maybe(wanted, like, dtype):
        return torch.empty_like(like, dtype=dtype) if wanted else student.new_empty((0,), dtype=dtype)

    return (loss, maybe(grad_student, student, student.dtype), maybe(grad_teacher, teacher, teacher.dtype),
            maybe(grad_margin, student, acc))


def ofd_fused_triton(student: torch.Tensor, teacher: torch.Tensor, margin: torch.Tensor, elementwise: bool,
                     grad_student: bool, grad_teacher: bool, grad_margin: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused OFD op (schema in csrc/ofd_fused.h): (loss, grad_student, grad_teacher, grad_margin).
    When the loss is reduced it is a vector of partial sums whose fixed-order sum is the loss."""
    numel = student.numel()
    block = launch_size(gpu=_GPU_BLOCK, interpreted=_INTERPRETED_BLOCK)
    programs = triton.cdiv(numel, block)
    outputs = _allocate_fused_outputs(student, teacher, margin, elementwise, grad_student, grad_teacher,
                                      grad_margin, programs)
    if numel == 0:
        return outputs
    channels = student.shape[1]
    # A size-1 channel dim may carry any stride: every element is then channel 0.
    channel_stride = 1 if channels == 1 else student.stride(1)
    # Per-element dividends must stay under 2^31 for the magic-number division; else 64-bit division.
    wide_index = max(channel_stride, channels) + block > 2**31
    launch(_ofd_fused_kernel, (programs,), student, teacher, margin, *outputs,
           numel, channel_stride, channels, *_magic_divider(channel_stride), *_magic_divider(channels),
           device=student.device, ELEMENTWISE=elementwise, GRAD_STUDENT=grad_student, GRAD_TEACHER=grad_teacher,
           GRAD_MARGIN=grad_margin, WIDE_INDEX=wide_index, BLOCK=block, num_warps=_NUM_WARPS)
    return outputs
