"""The fused OFD loss as a torch.library custom op: argument preparation, the backend kernels, autograd
and the fake kernel.

Forward runs one fused kernel that writes the loss (partial sums or per-element values) and the gradients
of the unit-weighted loss into separate buffers; backward only scales those buffers by ``grad_output``
(``_autograd.scale_saved_gradient``), so forward + backward reads the features once.
"""
from __future__ import annotations

import torch

from .. import reference
from .._backends import Backend, register_op, resolve
from .._dtypes import result_dtype
from .._validation import check_ofd_args
from ._autograd import backward_scale, fused_op, input_gradient, setup_scaled_backward
from ._common import autocast_loss, autocast_off, divide_by_count, reduction_count

OFD = register_op("ofd_loss", cpu=Backend(("ofdkern::ofd_fused",)), cuda=Backend(("ofdkern::ofd_fused",)),
                  triton=Backend())


def _fused_kernel(backend: str):
    if backend == "triton":
        from ..kernels.ofd_triton import ofd_fused_triton

        return ofd_fused_triton
    # "cpu" and "cuda" are the C++ op; the tensors' device picks its kernel.
    return torch.ops.ofdkern.ofd_fused.default


def compute_dtype(student: torch.Tensor, teacher: torch.Tensor, margin: torch.Tensor) -> torch.dtype:
    """The dtype the reference computes and returns in: ``torch.max(t, m)`` promotion, then at least float32
    (its float mask promotes half-precision losses)."""
    return result_dtype(student, teacher, margin, at_least_float32=True)


def _feature_dtype(student: torch.Tensor, teacher: torch.Tensor, out_dtype: torch.dtype) -> torch.dtype:
    """The one dtype the kernels read both features in: float64 when the reference computes in float64
    (a float64 margin promotes), else the features' common dtype (half precision stays half)."""
    return torch.float64 if out_dtype == torch.float64 else torch.promote_types(student.dtype, teacher.dtype)


def _dense_strides(student: torch.Tensor) -> tuple[int, ...]:
    """Strides of the layout the kernels walk: student's own when it is dense (NCHW, channels_last, any
    permutation), else the dense layout with its dim order (what ``empty_like`` preserves)."""
    return torch.empty_like(student, device="meta").stride()


def _empty_dense(student: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty_strided(student.shape, _dense_strides(student), dtype=dtype, device=student.device)


def _prepare(student, teacher, margin):
    """Features in one dtype and one dense layout (copied only when they are not), margin as (C,)."""
    out_dtype = compute_dtype(student, teacher, margin)
    feature_dtype = _feature_dtype(student, teacher, out_dtype)
    strides = _dense_strides(student)
    if student.dtype != feature_dtype or student.stride() != strides:
        student = _empty_dense(student, feature_dtype).copy_(student)
    if teacher.dtype != feature_dtype or teacher.stride() != strides:
        teacher = _empty_dense(student, feature_dtype).copy_(teacher)
    margin = margin.reshape(-1).to(out_dtype).contiguous()
    return student, teacher, margin, out_dtype


@fused_op("ofdkern::ofd_loss_fused")
def ofd_loss_fused(student: torch.Tensor, teacher: torch.Tensor, margin: torch.Tensor, reduction: str,
                   backend: str, grad_student: bool, grad_teacher: bool, grad_margin: bool,
                   in_place_backward: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, d loss/d student, d loss/d teacher, per-element d loss/d margin) for a unit upstream
    gradient and no reduction scaling; gradients not asked for are empty. ``in_place_backward``: the caller
    drops the gradient outputs, so the backward may scale them in place (ops/_autograd.py)."""
    with autocast_off(student.device):
        student_p, teacher_p, margin_p, out_dtype = _prepare(student, teacher, margin)
        elementwise = reduction == "none"
        loss, d_student, d_teacher, d_margin = _fused_kernel(backend)(
            student_p, teacher_p, margin_p, elementwise, grad_student, grad_teacher, grad_margin)
        if not elementwise:
            # Fixed-order sum of the kernel's partials, then the reduction's count (0/0 = nan like the reference).
            loss = divide_by_count(loss.sum(), reduction_count(student.shape, reduction))
        return loss.to(out_dtype), d_student, d_teacher, d_margin


@ofd_loss_fused.register_fake
def _(student, teacher, margin, reduction, backend, grad_student, grad_teacher, grad_margin, in_place_backward):
    out_dtype = compute_dtype(student, teacher, margin)
    feature_dtype = _feature_dtype(student, teacher, out_dtype)
    if reduction == "none":
        loss = _empty_dense(student, out_dtype)
    else:
        loss = student.new_empty((), dtype=out_dtype)

    def maybe(wanted, dtype):
        return _empty_dense(student, dtype) if wanted else student.new_empty((0,), dtype=dtype)

    return loss, maybe(grad_student, feature_dtype), maybe(grad_teacher, feature_dtype), maybe(grad_margin, out_dtype)


def _setup_context(ctx, inputs, output):
    student, teacher, margin, reduction, backend, *_wanted, in_place_backward = inputs
    count = None if reduction == "none" else reduction_count(student.shape, reduction)
    setup_scaled_backward(ctx, output[1:], backend=backend, in_place_backward=in_place_backward, count=count,
                          dtypes=(student.dtype, teacher.dtype, margin.dtype))
    ctx.margin_shape = margin.shape


def _backward(ctx, grad_loss, *_unused):
    grads = [None] * 9
    scale = backward_scale(ctx, grad_loss, OFD.name)
    if scale is None:
        return tuple(grads)
    d_student, d_teacher, d_margin = ctx.saved_tensors
    for index, buffer in ((0, d_student), (1, d_teacher)):
        if ctx.needs_input_grad[index]:
            grads[index] = input_gradient(ctx, index, buffer, scale)
    if ctx.needs_input_grad[2]:
        channel_sum_dims = [d for d in range(d_margin.dim()) if d != 1]
        per_channel = (d_margin * scale).sum(dim=channel_sum_dims)
        grads[2] = per_channel.reshape(ctx.margin_shape).to(ctx.dtypes[2])
    return tuple(grads)


ofd_loss_fused.register_autograd(_backward, setup_context=_setup_context)


def ofd_loss(student: torch.Tensor, teacher: torch.Tensor, margin: torch.Tensor, *, reduction: str = "sum",
             backend: str = "auto") -> torch.Tensor:
    """OFD distillation loss: margin ReLU on the teacher, partial L2 to the student (Heo et al., ICCV 2019).

    A drop-in for the reference ``distillation_loss(source, target, margin)`` (= ``reduction="sum"``).

    Args:
        student: student features after the connector, (N, C, ...) with 2 to 5 dims, any float dtype,
            NCHW or channels_last.
        teacher: teacher features (pre-ReLU), same shape as ``student``.
        margin: per-channel margins, shape (C,) or (1, C, 1, ...).
        reduction: "sum" (the reference), "mean" (over all elements), "batchmean" (sum / N) or "none".
        backend: "auto", "triton", "cuda", "cpu" or "reference" (see ``ofdkern.backend_status()``).

    Returns:
        The loss in the reference's dtype (float32 for half-precision features, float64 for float64 ones),
        accumulated in float32 (float64). Gradients flow to every input that requires them.
    """
    check_ofd_args(student, teacher, margin, reduction)
    backend = resolve(OFD, backend, student.device)
    if backend == "reference":
        return reference.ofd_loss(student, teacher, margin, reduction)
    needs_grad = torch.is_grad_enabled()
    loss, *_ = ofd_loss_fused(student, teacher, margin, reduction, backend,
                              needs_grad and student.requires_grad,
                              needs_grad and teacher.requires_grad,
                              needs_grad and margin.requires_grad, in_place_backward=True)
    return autocast_loss(loss, student.device)
