"""Triton kernels of the fused OFD op and of its backward's scaling: same contracts as the C++ ops
(csrc/ofd_fused.h, scale_ in csrc/ofd_op.cpp), same per-element math (csrc/ofd_math.h).

One pass over student and teacher in memory order writes the loss (one partial sum per program, or the
per-element losses) and the requested gradients. Runs on CUDA tensors, and on CPU tensors under
TRITON_INTERPRET=1. (The interpreter truncates float32 -> bfloat16 stores where the GPU rounds to nearest
even: bfloat16 gradients can differ by one ulp between the two.)
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from ..ops._common import accumulation_dtype

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# GPU: 4096 elements per program, 16 per thread over 8 warps, so each thread issues several 128-bit loads
# and the partial vector stays ~1/4096 of the features. Interpreter: tiny test shapes should still span
# several programs (partials, masked tails, channels wrapping across program boundaries).
_BLOCK = 256 if _INTERPRET else 4096
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

    # margin_relu: t != t keeps a NaN teacher like torch.maximum (a NaN margin stays via the select).
    t_prime = tl.where((t > m) | (t != t), t, m)
    # The mask multiplies (not a select) so inf * 0 gives NaN as in the reference.
    mask = ((s > t_prime) | (t_prime > 0.0)).to(acc_dtype)
    diff = s - t_prime
    loss = diff * diff * mask
    d_student = 2.0 * diff * mask

    if ELEMENTWISE:
        tl.store(loss_ptr + offsets, loss, mask=in_bounds)
    else:
        # Fixed-shape tree sum: the same bits every run, no atomics.
        tl.store(loss_ptr + tl.program_id(0), tl.sum(tl.where(in_bounds, loss, 0.0), axis=0))
    if GRAD_STUDENT:
        tl.store(grad_student_ptr + offsets, d_student.to(grad_student_ptr.dtype.element_ty), mask=in_bounds)
    if GRAD_TEACHER or GRAD_MARGIN:
        # torch.maximum's gradient: all of d loss / d t' to the larger side, half to each at a tie;
        # selects, so the other side gets exactly 0 even when d_student is NaN or inf.
        share = tl.where(t == m, -d_student * 0.5, -d_student)
        if GRAD_TEACHER:
            grad_teacher = tl.where(t < m, 0.0, share)
            tl.store(grad_teacher_ptr + offsets, grad_teacher.to(grad_teacher_ptr.dtype.element_ty),
                     mask=in_bounds)
        if GRAD_MARGIN:
            tl.store(grad_margin_ptr + offsets, tl.where(t > m, 0.0, share), mask=in_bounds)


def _launch_device(tensor: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's one."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


@triton.jit
def _scale_kernel(gradient_ptr, factor_ptr, numel, BLOCK: tl.constexpr):
    """gradient *= factor, in the factor's dtype (the accumulation dtype): one rounding per element."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < numel
    factor = tl.load(factor_ptr)
    gradient = tl.load(gradient_ptr + offsets, mask=in_bounds, other=0.0).to(factor.dtype)
    tl.store(gradient_ptr + offsets, (gradient * factor).to(gradient_ptr.dtype.element_ty), mask=in_bounds)


def scale_triton_(gradient: torch.Tensor, factor: torch.Tensor) -> None:
    """The fused op's backward, in place: ``gradient *= factor`` with ``factor`` a 0-dim tensor in the
    accumulation dtype on the gradient's device, read by the kernel (no host sync)."""
    assert gradient.stride() == torch.empty_like(gradient, device="meta").stride(), "gradient must be dense"
    assert factor.dim() == 0 and factor.dtype == accumulation_dtype(gradient.dtype)
    assert factor.device == gradient.device
    numel = gradient.numel()
    if numel == 0:
        return
    with _launch_device(gradient):
        _scale_kernel[(triton.cdiv(numel, _BLOCK),)](gradient, factor, numel, BLOCK=_BLOCK, num_warps=_NUM_WARPS)


def _magic_divider(divisor: int) -> tuple[int, int]:
    """(magic, shift) such that n // divisor == (umulhi(n, magic) + n) >> shift for 0 <= n < 2^32 and
    1 <= divisor < 2^32 (Granlund and Montgomery, 1994: magic is floor(2^(32 + shift) / divisor) + 1
    less its 2^32 bit, which the "+ n" restores)."""
    shift = (divisor - 1).bit_length()
    return (((1 << shift) - divisor) << 32) // divisor + 1, shift


def _allocate_fused_outputs(student, teacher, margin, elementwise, grad_student, grad_teacher, grad_margin,
                            partial_count):
    """The Python twin of allocate_fused_outputs (csrc/ofd_fused.h): the contract asserted (the Python
    layer already validated the user's arguments), the outputs allocated."""
    acc = accumulation_dtype(student.dtype)
    assert student.dim() >= 2 and student.shape == teacher.shape, (student.shape, teacher.shape)
    assert student.dtype == teacher.dtype and student.stride() == teacher.stride()
    # empty_like keeps the strides of a non-overlapping and dense tensor only.
    assert student.stride() == torch.empty_like(student, device="meta").stride(), "student must be dense"
    assert margin.shape == (student.shape[1],) and margin.is_contiguous() and margin.dtype == acc, (
        margin.shape, margin.dtype)
    assert student.device == teacher.device == margin.device

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
    programs = triton.cdiv(numel, _BLOCK)
    outputs = _allocate_fused_outputs(student, teacher, margin, elementwise, grad_student, grad_teacher,
                                      grad_margin, programs)
    if numel == 0:
        return outputs
    channels = student.shape[1]
    # A size-1 channel dim may carry any stride: every element is then channel 0.
    channel_stride = 1 if channels == 1 else student.stride(1)
    # Per-element dividends must stay under 2^31 for the magic-number division; else 64-bit division.
    wide_index = max(channel_stride, channels) + _BLOCK > 2**31
    with _launch_device(student):
        _ofd_fused_kernel[(programs,)](
            student, teacher, margin, *outputs,
            numel, channel_stride, channels, *_magic_divider(channel_stride), *_magic_divider(channels),
            ELEMENTWISE=elementwise, GRAD_STUDENT=grad_student, GRAD_TEACHER=grad_teacher,
            GRAD_MARGIN=grad_margin, WIDE_INDEX=wide_index, BLOCK=_BLOCK, num_warps=_NUM_WARPS,
        )
    return outputs
