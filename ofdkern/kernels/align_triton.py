"""Triton kernels of the fused channel-wise alignment loss, with the contract of the C++ op (csrc/align_fused.h):
for narrow layers (every channel count up to ``FUSED_MAX_CHANNELS``) one fused kernel, below; for any other, the
tiled pipeline of align_tiled_triton.py.

A fixed number of programs each walk every ``num_programs``-th tile of BLOCK_P pixels. Per tile: load the
student pixels (BLOCK_P x Cs), ``h = relu(x W1^T + b1)`` and ``y = h W2^T + b2`` with tl.dot, the loss terms and
``dL/dy`` in registers, then back-propagation of the tile in the same program: ``dW2 += dy^T h``,
``db2 += sum dy``, ``dh = dy W2`` masked by the ReLU, ``dW1 += dh^T x``, ``db1 += sum dh``, ``dx = dh W1``.
Nothing of size pixels x channels is stored besides the feature gradients. Each program keeps its weight-gradient
and loss sums in registers and writes them once to its row of a partial buffer; the rows are summed in a fixed
order afterwards (deterministic, no atomics). Every channel dimension fits one tile; the dots run in the
accumulation dtype on loads cast to it, float32 ones in TF32 as torch's matmul precision allows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._layout import as_positions, walks_in_place
from .align_tiled_triton import align_tiled_triton
from .triton_helpers import (accumulation_dtype, check_dense, check_dtype, check_same_device, check_shape,
                             dot_precision, launch, launch_size, ofd_point, relu, relu_backward, stored_as,
                             teacher_share)

_INTERPRETED_PROGRAMS = 3  # few programs under the interpreter, each looping over several tiles
_PROGRAMS_PER_SM = 2
# Largest channel count (student, hidden or teacher) the fused kernel keeps in one tile, per accumulation dtype:
# its dot operands are staged in shared memory, which for sm_90 PTX came to 96 KiB at 64 fp32 channels (64-pixel
# tiles) and 57 KiB at 32 fp64 channels (16-pixel tiles); the next power of two would pass the 164 KiB an A100
# block can have.
FUSED_MAX_CHANNELS = {torch.float32: 64, torch.float64: 32}


@triton.jit
def _align_kernel(x_ptr, t_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, m_ptr, dx_ptr, dt_ptr,
                  loss_part_ptr, dw1_part_ptr, db1_part_ptr, dw2_part_ptr, db2_part_ptr,
                  positions, pixels, s_channels, hidden, t_channels,
                  sx_n, sx_c, sx_s, st_n, st_c, st_s, sdx_n, sdx_c, sdx_s, sdt_n, sdt_c, sdt_s,
                  BLOCK_P: tl.constexpr, BLOCK_CS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_CT: tl.constexpr,
                  HAS_MARGIN: tl.constexpr, GRAD_STUDENT: tl.constexpr, GRAD_TEACHER: tl.constexpr,
                  GRAD_WEIGHTS: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    acc_ty = loss_part_ptr.dtype.element_ty
    cs = tl.arange(0, BLOCK_CS)
    hh = tl.arange(0, BLOCK_H)
    ct = tl.arange(0, BLOCK_CT)
    cs_ok = cs < s_channels
    hh_ok = hh < hidden
    ct_ok = ct < t_channels
    # Channel offsets into the features in 64 bits: a channel times its stride (an NCHW map's positions) can
    # pass 2^31.
    cs_far = cs.to(tl.int64)
    ct_far = ct.to(tl.int64)
    # Weights are contiguous in the accumulation dtype; padded rows and columns load as 0, so padded hidden units
    # stay at relu(0) = 0 and padded channels contribute nothing.
    w1 = tl.load(w1_ptr + hh[:, None] * s_channels + cs[None, :], mask=hh_ok[:, None] & cs_ok[None, :], other=0)
    b1 = tl.load(b1_ptr + hh, mask=hh_ok, other=0)
    w2 = tl.load(w2_ptr + ct[:, None] * hidden + hh[None, :], mask=ct_ok[:, None] & hh_ok[None, :], other=0)
    b2 = tl.load(b2_ptr + ct, mask=ct_ok, other=0)
    if HAS_MARGIN:
        margin = tl.load(m_ptr + ct, mask=ct_ok, other=0)
    loss_sum = tl.zeros([BLOCK_P], acc_ty)
    d_w1 = tl.zeros([BLOCK_H, BLOCK_CS], acc_ty)
    d_b1 = tl.zeros([BLOCK_H], acc_ty)
    d_w2 = tl.zeros([BLOCK_CT, BLOCK_H], acc_ty)
    d_b2 = tl.zeros([BLOCK_CT], acc_ty)
    first_tile = pid.to(tl.int64)
    for step in range(0, tl.cdiv(tl.cdiv(pixels, BLOCK_P) - pid, programs)):
        p = (first_tile + step * programs) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = p < pixels
        n = p // positions
        s = p % positions
        x_mask = p_ok[:, None] & cs_ok[None, :]
        x = tl.load(x_ptr + n[:, None] * sx_n + cs_far[None, :] * sx_c + s[:, None] * sx_s, mask=x_mask,
                    other=0).to(acc_ty)
        pre = tl.dot(x, tl.trans(w1), input_precision=PRECISION) + b1[None, :]
        h = relu(pre)
        y = tl.dot(h, tl.trans(w2), input_precision=PRECISION) + b2[None, :]
        valid = p_ok[:, None] & ct_ok[None, :]
        t_offsets = n[:, None] * st_n + ct_far[None, :] * st_c + s[:, None] * st_s
        t = tl.load(t_ptr + t_offsets, mask=valid, other=0).to(acc_ty)
        if HAS_MARGIN:
            terms, d_y = ofd_point(y, t, margin[None, :])
        else:
            diff = y - t
            terms = diff * diff
            d_y = 2 * diff
        # Padded pixels see x = 0 but still get relu(b1) -> y = W2 relu(b1) + b2: keep them out.
        loss_sum += tl.sum(tl.where(valid, terms, 0.0), axis=1)
        d_y = tl.where(valid, d_y, 0.0)
        if GRAD_TEACHER:
            if HAS_MARGIN:
                d_t = teacher_share(d_y, t, margin[None, :])
            else:
                d_t = -d_y
            dt_offsets = n[:, None] * sdt_n + ct_far[None, :] * sdt_c + s[:, None] * sdt_s
            tl.store(dt_ptr + dt_offsets, stored_as(d_t, dt_ptr), mask=valid)
        if GRAD_STUDENT or GRAD_WEIGHTS:
            d_h = relu_backward(tl.dot(d_y, w2, input_precision=PRECISION), pre)
            if GRAD_WEIGHTS:
                d_w2 += tl.dot(tl.trans(d_y), h, input_precision=PRECISION)
                d_b2 += tl.sum(d_y, axis=0)
                d_w1 += tl.dot(tl.trans(d_h), x, input_precision=PRECISION)
                d_b1 += tl.sum(d_h, axis=0)
            if GRAD_STUDENT:
                d_x = tl.dot(d_h, w1, input_precision=PRECISION)
                dx_offsets = n[:, None] * sdx_n + cs_far[None, :] * sdx_c + s[:, None] * sdx_s
                tl.store(dx_ptr + dx_offsets, stored_as(d_x, dx_ptr), mask=x_mask)
    row = pid.to(tl.int64)
    tl.store(loss_part_ptr + row, tl.sum(loss_sum, axis=0))
    if GRAD_WEIGHTS:
        tl.store(dw1_part_ptr + row * hidden * s_channels + hh[:, None] * s_channels + cs[None, :], d_w1,
                 mask=hh_ok[:, None] & cs_ok[None, :])
        tl.store(db1_part_ptr + row * hidden + hh, d_b1, mask=hh_ok)
        tl.store(dw2_part_ptr + row * t_channels * hidden + ct[:, None] * hidden + hh[None, :], d_w2,
                 mask=ct_ok[:, None] & hh_ok[None, :])
        tl.store(db2_part_ptr + row * t_channels + ct, d_b2, mask=ct_ok)


def _block(size: int) -> int:
    return max(16, triton.next_power_of_2(size))  # tl.dot needs every dim >= 16


def _program_count(device: torch.device, tiles: int) -> int:
    if device.type == "cuda":
        limit = _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        limit = _INTERPRETED_PROGRAMS
    return max(1, min(tiles, limit))


def _check_contract(student, teacher, w1, b1, w2, b2, margin) -> None:
    """The contract of csrc/align_fused.h, checked: the Python layer gave the user a clear error already, these
    guard direct calls (the kernel would read and write out of bounds)."""
    op = "align_fused_triton"
    for name, feature in (("student", student), ("teacher", teacher)):
        if not 2 <= feature.dim() <= 5 or not feature.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating-point tensor of 2 to 5 dims, got {feature.dtype} "
                             f"{tuple(feature.shape)}")
        if not walks_in_place(feature):
            raise ValueError(f"{op}: {name} must be contiguous or channels_last, got strides {feature.stride()}")
    if student.shape[:1] + student.shape[2:] != teacher.shape[:1] + teacher.shape[2:]:
        raise ValueError(f"{op}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have the "
                         f"same batch and spatial sizes")
    if w1.dim() != 2 or not w1.is_floating_point():
        raise ValueError(f"{op}: w1 must be a floating-point (hidden, {student.shape[1]}) matrix, got "
                         f"{w1.dtype} {tuple(w1.shape)}")
    hidden = w1.shape[0]
    for name, weight, shape in (("w1", w1, (hidden, student.shape[1])), ("b1", b1, (hidden,)),
                                ("w2", w2, (teacher.shape[1], hidden)), ("b2", b2, (teacher.shape[1],))):
        check_shape(op, name, weight, shape)
        check_dtype(op, name, weight, w1.dtype)
        check_dense(op, name, weight)
    tensors = dict(student=student, teacher=teacher, w1=w1, b1=b1, w2=w2, b2=b2)
    if margin is not None:
        check_shape(op, "margin", margin, (teacher.shape[1],))
        check_dtype(op, "margin", margin, accumulation_dtype(w1.dtype))
        check_dense(op, "margin", margin)
        tensors["margin"] = margin
    check_same_device(op, **tensors)


def align_fused_triton(student, teacher, w1, b1, w2, b2, margin, grad_student: bool, grad_teacher: bool,
                       grad_weights: bool):
    """The fused op with the contract of csrc/align_fused.h: (loss, grad_student, grad_teacher, grad_w1,
    grad_b1, grad_w2, grad_b2)."""
    _check_contract(student, teacher, w1, b1, w2, b2, margin)
    compute, acc = w1.dtype, accumulation_dtype(w1.dtype)
    student3, teacher3 = as_positions(student), as_positions(teacher)
    batch, s_channels, positions = student3.shape
    hidden, t_channels = w1.shape[0], w2.shape[0]

    def feature_grad(wanted, feature):
        if not wanted:
            return feature.new_empty((0,))
        return torch.empty_strided(feature.shape, feature.stride(), dtype=feature.dtype, device=feature.device)

    d_student, d_teacher = feature_grad(grad_student, student), feature_grad(grad_teacher, teacher)
    d_student3 = as_positions(d_student) if grad_student else None
    d_teacher3 = as_positions(d_teacher) if grad_teacher else None
    # Cast once here: the kernels never convert a bias or a margin themselves.
    b1, b2 = b1.to(acc), b2.to(acc)
    if max(s_channels, hidden, t_channels) > FUSED_MAX_CHANNELS[acc]:
        d_weights = [w1.new_zeros(p.shape, dtype=acc) for p in (w1, b1, w2, b2)] if grad_weights else None
        loss = align_tiled_triton(student3, teacher3, w1, b1, w2, b2, margin, d_student3, d_teacher3, d_weights)
        return (loss, d_student, d_teacher, *(d_weights or [w1.new_empty((0,), dtype=acc) for _ in range(4)]))
    w1, w2 = w1.to(acc), w2.to(acc)
    pixels = batch * positions
    # Shared memory of a tile grows with the pixels it holds (see FUSED_MAX_CHANNELS).
    block_p = launch_size(gpu=64, interpreted=16) if acc == torch.float32 else 16
    programs = _program_count(student.device, triton.cdiv(pixels, block_p))
    new = w1.new_zeros
    loss_part = new((programs,))
    parts = [new((programs, *p.shape)) for p in (w1, b1, w2, b2)] if grad_weights else [loss_part] * 4
    if pixels > 0:
        # Buffers that are not asked for get a pointer the kernel never touches.
        d_student3 = d_student3 if grad_student else student3
        d_teacher3 = d_teacher3 if grad_teacher else teacher3
        launch(_align_kernel, (programs,),
               student3, teacher3, w1, b1, w2, b2, margin if margin is not None else b2, d_student3, d_teacher3,
               loss_part, *parts, positions, pixels, s_channels, hidden, t_channels,
               *student3.stride(), *teacher3.stride(), *d_student3.stride(), *d_teacher3.stride(),
               device=student.device, BLOCK_P=block_p, BLOCK_CS=_block(s_channels), BLOCK_H=_block(hidden),
               BLOCK_CT=_block(t_channels), HAS_MARGIN=margin is not None, GRAD_STUDENT=grad_student,
               GRAD_TEACHER=grad_teacher, GRAD_WEIGHTS=grad_weights, PRECISION=dot_precision(acc))
    weight_grads = [part.sum(0) for part in parts] if grad_weights else [w1.new_empty((0,)) for _ in range(4)]
    return (loss_part.sum(), d_student, d_teacher, *weight_grads)
