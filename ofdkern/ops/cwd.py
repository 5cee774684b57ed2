"""Channel-wise distillation (Shu et al., ICCV 2021, "Channel-wise Knowledge Distillation for Dense Prediction")
as a torch.library custom op.

Each channel's map is a softmax over its positions, so the loss is soft-label KD whose rows are the N * C maps:
the op runs the KD kernels (kd.py, csrc/kd_fused.h) on the (N * C, positions) view of NCHW maps, loss and
gradients in one call. A channels_last map's rows are not contiguous: on the CPU a kernel of its own
(csrc/cwd_fused.h) runs the KD row passes on a few channels at a time and returns gradients in the maps'
layout, with the bits of the NCHW path; the other backends copy the maps to NCHW first (one read and write of
each map, next to the kernel's read of both and write of the gradient).
"""
from __future__ import annotations

import math

import torch

from .. import reference
from .._backends import Backend, has_kernel, register_op, resolve
from .._dtypes import result_dtype
from .._layout import channels_innermost
from .._validation import check_cwd_args
from ._autograd import backward_scale, fused_op, input_gradient, setup_scaled_backward
from ._common import autocast_loss, autocast_off, divide_by_count
from . import kd

CWD = register_op("cwd_loss", cpu=Backend(kd.KD_KERNELS), cuda=Backend(kd.KD_KERNELS), triton=Backend())
_CPU_CHANNELS_LAST = has_kernel("cpu", "ofdkern::cwd_channels_last_fused")


def _reduction_count(shape: torch.Size, reduction: str) -> int:
    """What the summed terms are divided by: N * C ("mean", mmrazor's), N ("batchmean"), else 1."""
    return {"mean": shape[0] * shape[1], "batchmean": shape[0]}.get(reduction, 1)


def _channels_last_kernel(student: torch.Tensor, teacher: torch.Tensor, backend: str) -> bool:
    """Whether the maps go to the CPU kernel of channels_last maps rather than to the KD kernel on NCHW rows."""
    return (backend == "cpu" and _CPU_CHANNELS_LAST and student.dim() > 2 and not student.is_contiguous()
            and channels_innermost(student) and channels_innermost(teacher))


def _rows(maps: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) maps as contiguous (N * C, positions) rows: a view of NCHW maps."""
    return maps.reshape(maps.shape[0] * maps.shape[1], math.prod(maps.shape[2:])).contiguous()


@fused_op("ofdkern::cwd_loss_fused")
def cwd_loss_fused(student: torch.Tensor, teacher: torch.Tensor, temperature: float, reduction: str, backend: str,
                   grad_student: bool, grad_teacher: bool, in_place_backward: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, d sum(terms)/d student, d sum(terms)/d teacher); the gradients are contiguous (NCHW), or
    in the maps' channels_last layout where the CPU kernel of those runs, or empty when not asked for."""
    with autocast_off(student.device):
        dtype = result_dtype(student, teacher)
        student, teacher = student.to(dtype), teacher.to(dtype)
        if _channels_last_kernel(student, teacher, backend):
            row_loss, d_student, d_teacher = torch.ops.ofdkern.cwd_channels_last_fused(
                student, teacher, temperature, grad_student, grad_teacher)
        else:
            row_loss, d_student, d_teacher = kd.kd_kernel(backend)(_rows(student), _rows(teacher), temperature,
                                                                   grad_student, grad_teacher)
        if reduction == "none":
            loss = row_loss.view(student.shape[:2])
        else:
            loss = divide_by_count(row_loss.sum(), _reduction_count(student.shape, reduction))

        def as_maps(gradient, wanted):
            return gradient.view(student.shape) if wanted else gradient

        return loss.to(dtype), as_maps(d_student, grad_student), as_maps(d_teacher, grad_teacher)


@cwd_loss_fused.register_fake
def _(student, teacher, temperature, reduction, backend, grad_student, grad_teacher, in_place_backward):
    dtype = result_dtype(student, teacher)
    loss = student.new_empty(student.shape[:2] if reduction == "none" else (), dtype=dtype)
    layout = torch.preserve_format if _channels_last_kernel(student, teacher, backend) else torch.contiguous_format

    def maybe(wanted):
        if not wanted:
            return student.new_empty((0,), dtype=dtype)
        return torch.empty_like(student, dtype=dtype, memory_format=layout)

    return loss, maybe(grad_student), maybe(grad_teacher)


def _setup_context(ctx, inputs, output):
    student, teacher, _temperature, reduction, backend, *_wanted, in_place_backward = inputs
    count = None if reduction == "none" else _reduction_count(student.shape, reduction)
    setup_scaled_backward(ctx, output[1:], backend=backend, in_place_backward=in_place_backward, count=count,
                          dtypes=(student.dtype, teacher.dtype))
    ctx.spatial_dims = student.dim() - 2


def _backward(ctx, grad_loss, *_unused):
    grads = [None] * 8
    scale = backward_scale(ctx, grad_loss, CWD.name)
    if scale is None:
        return tuple(grads)
    if ctx.count is None:
        scale = scale.view(*scale.shape, *([1] * ctx.spatial_dims))  # "none": one upstream gradient per map
    for index, buffer in enumerate(ctx.saved_tensors):
        if ctx.needs_input_grad[index]:
            grads[index] = input_gradient(ctx, index, buffer, scale)
    return tuple(grads)


cwd_loss_fused.register_autograd(_backward, setup_context=_setup_context)


def cwd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, reduction: str = "mean",
             backend: str = "auto") -> torch.Tensor:
    """Channel-wise distillation for dense prediction (Shu et al., ICCV 2021): for each sample n and channel c,
    ``T^2 * KL(softmax(t[n, c] / T) || softmax(s[n, c] / T))`` with the softmax over the positions of that
    channel's map.

    A drop-in for mmrazor's ``ChannelWiseDivergence(tau=T)`` without its ``loss_weight`` (= ``reduction="mean"``).

    Args:
        student, teacher: (N, C, ...) feature or logit maps with 2 to 5 dims and one shape, any float dtype,
            NCHW or channels_last.
        temperature: the positive softmax temperature T.
        reduction: "mean" (the sum over maps / (N * C), mmrazor's), "batchmean" (/ N), "sum" or "none" (the
            (N, C) terms).
        backend: "auto", "triton", "cuda", "cpu" or "reference" (see ``ofdkern.backend_status()``).

    Returns:
        The loss in the promoted dtype, accumulated in float32 (float64 for float64 maps). Gradients flow to
        the student and, when it requires grad, to the teacher (detach it, as mmrazor does).
    """
    temperature = check_cwd_args(student, teacher, temperature, reduction)
    backend = resolve(CWD, backend, student.device)
    if backend == "reference":
        return reference.cwd_loss(student, teacher, temperature, reduction)
    needs_grad = torch.is_grad_enabled()
    loss, *_ = cwd_loss_fused(student, teacher, temperature, reduction, backend,
                              needs_grad and student.requires_grad, needs_grad and teacher.requires_grad,
                              in_place_backward=True)
    return autocast_loss(loss, student.device)
