"""Soft-label KD (Hinton et al.; FRSKD's logit loss) as a torch.library custom op: one kernel per row computes
the loss with an online max/sum and writes the logit gradients in the same call, so backward only scales them.
Channel-wise distillation (cwd.py) runs the same kernels on the rows of its maps.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .. import reference
from .._backends import Backend, register_op, resolve
from .._dtypes import result_dtype
from .._validation import check_kd_args
from ._autograd import backward_scale, fused_op, input_gradient, setup_scaled_backward
from ._common import autocast_loss, autocast_off, divide_by_count, reduction_count

KD_KERNELS = ("ofdkern::kd_fused",)
KD = register_op("kd_loss", cpu=Backend(KD_KERNELS), cuda=Backend(KD_KERNELS), triton=Backend())


def kd_kernel(backend: str) -> Callable:
    """The backend's kd_fused (the contract of csrc/kd_fused.h)."""
    if backend == "triton":
        from ..kernels import kd_triton

        return kd_triton.kd_fused
    # "cpu" and "cuda" are the C++ op; the tensors' device picks the kernel.
    return torch.ops.ofdkern.kd_fused.default


@fused_op("ofdkern::kd_loss_fused")
def kd_loss_fused(student: torch.Tensor, teacher: torch.Tensor, temperature: float, reduction: str, backend: str,
                  grad_student: bool, grad_teacher: bool, in_place_backward: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, d sum(row losses)/d student, d sum(row losses)/d teacher); gradients not asked for are
    empty."""
    with autocast_off(student.device):
        dtype = result_dtype(student, teacher)
        row_loss, d_student, d_teacher = kd_kernel(backend)(
            student.to(dtype).contiguous(), teacher.to(dtype).contiguous(), temperature, grad_student, grad_teacher)
        loss = row_loss if reduction == "none" else divide_by_count(row_loss.sum(),
                                                                    reduction_count(student.shape, reduction))
        return loss.to(dtype), d_student, d_teacher


@kd_loss_fused.register_fake
def _(student, teacher, temperature, reduction, backend, grad_student, grad_teacher, in_place_backward):
    dtype = result_dtype(student, teacher)
    loss = student.new_empty((student.shape[0],) if reduction == "none" else (), dtype=dtype)

    def maybe(wanted):
        return student.new_empty(student.shape if wanted else (0,), dtype=dtype)

    return loss, maybe(grad_student), maybe(grad_teacher)


def _kd_setup_context(ctx, inputs, output):
    student, teacher, _temperature, reduction, backend, *_wanted, in_place_backward = inputs
    count = None if reduction == "none" else reduction_count(student.shape, reduction)
    setup_scaled_backward(ctx, output[1:], backend=backend, in_place_backward=in_place_backward, count=count,
                          dtypes=(student.dtype, teacher.dtype))


def _kd_backward(ctx, grad_loss, *_unused):
    grads = [None] * 8
    scale = backward_scale(ctx, grad_loss, KD.name)
    if scale is None:
        return tuple(grads)
    if ctx.count is None:
        scale = scale.unsqueeze(1)  # "none": one upstream gradient per row
    for index, buffer in enumerate(ctx.saved_tensors):
        if ctx.needs_input_grad[index]:
            grads[index] = input_gradient(ctx, index, buffer, scale)
    return tuple(grads)


kd_loss_fused.register_autograd(_kd_backward, setup_context=_kd_setup_context)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 4.0,
            reduction: str = "batchmean", backend: str = "auto") -> torch.Tensor:
    """Soft-label KD ``KL(softmax(t/T) || softmax(s/T)) * T**2`` of Hinton et al., as used by FRSKD.

    A drop-in for the reference ``F.kl_div(F.log_softmax(s/T, 1), F.softmax(t/T, 1), reduction="batchmean")
    * T * T``. Rows of any width (32k-256k classes) are processed with an online max/sum.

    Args:
        student_logits, teacher_logits: (N, K) logits of any float dtype.
        temperature: the positive softmax temperature T.
        reduction: "batchmean" (sum / N), "sum", "mean" (sum / (N K), F.kl_div's "mean") or "none" (one loss
            per row).
        backend: "auto", "triton", "cuda", "cpu" or "reference".

    Returns:
        The loss in the promoted logits dtype, accumulated in float32 (float64). Gradients flow to the student
        and, when it requires grad, to the teacher (FRSKD detaches it).
    """
    temperature = check_kd_args(student_logits, teacher_logits, temperature, reduction)
    backend = resolve(KD, backend, student_logits.device)
    if backend == "reference":
        return reference.kd_loss(student_logits, teacher_logits, temperature, reduction)
    needs_grad = torch.is_grad_enabled()
    loss, *_ = kd_loss_fused(student_logits, teacher_logits, temperature, reduction, backend,
                             needs_grad and student_logits.requires_grad, needs_grad and teacher_logits.requires_grad,
                             in_place_backward=True)
    return autocast_loss(loss, student_logits.device)
