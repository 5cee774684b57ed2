"""The fused OFD loss as a torch.library custom op: argument preparation, the backend kernels, autograd
and the fake kernel.

Forward runs one fused kernel that writes the loss (partial sums or per-element values) and the gradients
of the unit-weighted loss into separate buffers; backward only scales those buffers by ``grad_output``
(a device tensor: no host sync), so forward + backward reads the features once. When autograd frees the
graph after the backward (the usual ``loss.backward()``), the scaling is in place: the returned gradient is
the forward's buffer, not a second one.
"""
from __future__ import annotations

import torch

from .. import reference
from .._backends import backend_status, resolve_backend
from .._validation import check_ofd_args
from ._common import accumulation_dtype, divide_by_count, reduction_count


# Whether the extension can allocate CPU outputs on transparent huge pages.
HUGEPAGE_BUFFERS = "ofdkern::empty_like_hugepage" in backend_status()["cpu"].get("ops", ())
if HUGEPAGE_BUFFERS:
    torch.library.register_fake("ofdkern::empty_like_hugepage")(lambda like: torch.empty_like(like))
if "ofdkern::scale_" in backend_status()["cuda"].get("ops", ()):
    torch.library.register_fake("ofdkern::scale_")(lambda gradient, factor: None)


def _fused_kernel(backend: str):
    if backend == "triton":
        from ..kernels.ofd_triton import ofd_fused_triton

        return ofd_fused_triton
    # "cpu" and "cuda" are the C++ op; the tensors' device picks its kernel.
    return torch.ops.ofdkern.ofd_fused.default


def _scale_in_place(gradient: torch.Tensor, factor: torch.Tensor, backend: str) -> torch.Tensor:
    """``gradient *= factor`` for a 0-dim device ``factor``, by the backend's own kernel on GPUs (one rounding
    per element, at copy bandwidth; torch's mul_ rounds the factor to a half-precision gradient's dtype and
    runs at a third of that), by torch's mul_ on the CPU (already exact and vectorized there)."""
    if backend == "cpu":
        return gradient.mul_(factor)
    factor = factor.to(accumulation_dtype(gradient.dtype))
    if backend == "triton":
        from ..kernels.ofd_triton import scale_triton_

        scale_triton_(gradient, factor)
    else:
        torch.ops.ofdkern.scale_(gradient, factor)
    return gradient


def compute_dtype(student: torch.Tensor, teacher: torch.Tensor, margin: torch.Tensor) -> torch.dtype:
    """The dtype the reference computes and returns in: ``torch.max(t, m)`` promotion, then at least float32
    (its float mask promotes half-precision losses)."""
    promoted = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), margin.dtype)
    return torch.promote_types(promoted, torch.float32)


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


@torch.library.custom_op("ofdkern::ofd_loss_fused", mutates_args=())
def ofd_loss_fused(student: torch.Tensor, teacher: torch.Tensor, margin: torch.Tensor, reduction: str,
                   backend: str, grad_student: bool, grad_teacher: bool, grad_margin: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, d loss/d student, d loss/d teacher, per-element d loss/d margin) for a unit upstream
    gradient and no reduction scaling; gradients not asked for are empty. The gradient outputs belong to
    autograd: its backward scales them in place when the graph is not retained."""
    student_p, teacher_p, margin_p, out_dtype = _prepare(student, teacher, margin)
    elementwise = reduction == "none"
    loss, d_student, d_teacher, d_margin = _fused_kernel(backend)(
        student_p, teacher_p, margin_p, elementwise, grad_student, grad_teacher, grad_margin)
    if not elementwise:
        # Fixed-order sum of the kernel's partials, then the reduction's count (0/0 = nan like the reference).
        loss = divide_by_count(loss.sum(), reduction_count(student.shape, reduction))
    return loss.to(out_dtype), d_student, d_teacher, d_margin


@ofd_loss_fused.register_fake
def _(student, teacher, margin, reduction, backend, grad_student, grad_teacher, grad_margin):
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
    student, teacher, margin, reduction, backend, *_wanted = inputs
    ctx.save_for_backward(*output[1:])
    ctx.backend = backend
    ctx.reduction = reduction
    ctx.count = reduction_count(student.shape, reduction)
    ctx.dtypes = (student.dtype, teacher.dtype, margin.dtype)
    ctx.margin_shape = margin.shape
    ctx.set_materialize_grads(False)


def _graph_dies_with_this_backward() -> bool:
    """True when autograd frees the graph after this backward (no ``retain_graph``): the saved gradient
    buffers are then used for the last time and may be scaled in place. A retained graph (gradcheck, a second
    backward) needs them intact. So does tracing (a dispatch mode such as make_fx or fake tensors is active:
    the traced graph must stay functional), and a torch without the query."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    tracing = torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
    return keep_graph is not None and not tracing and not keep_graph()


def _scaled(buffer: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, in_place: bool,
            backend: str) -> torch.Tensor:
    """``buffer * scale`` in ``dtype``: in place on the saved buffer when allowed (no second feature-sized
    buffer to fault in and fill), else out of place; on CPU into a huge-page buffer when the extension has one
    (csrc/cpu_buffers.h: faulting in a fresh feature-sized tensor costs more than the multiply)."""
    same_dtype = torch.result_type(buffer, scale) == buffer.dtype == dtype
    if in_place and same_dtype:
        if scale.dim() == 0:
            return _scale_in_place(buffer, scale, backend)
        return buffer.mul_(scale)
    if buffer.device.type == "cpu" and HUGEPAGE_BUFFERS and not torch.compiler.is_compiling() and same_dtype:
        return torch.mul(buffer, scale, out=torch.ops.ofdkern.empty_like_hugepage(buffer))
    return (buffer * scale).to(dtype)


def _backward(ctx, grad_loss, *_unused):
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # The saved gradients are constants to autograd: second-order terms would silently be missing.
        raise RuntimeError("ofd_loss: the fused backends do not support double backward (create_graph=True); "
                           "use backend='reference'")
    d_student, d_teacher, d_margin = ctx.saved_tensors
    grads = [None] * 8
    if grad_loss is None:
        return tuple(grads)
    # Reductions: a 0-dim scale (stays on device). "none": the per-element upstream gradient.
    scale = grad_loss if ctx.reduction == "none" else divide_by_count(grad_loss, ctx.count)
    student_dtype, teacher_dtype, margin_dtype = ctx.dtypes
    in_place = _graph_dies_with_this_backward()
    if ctx.needs_input_grad[0]:
        grads[0] = _scaled(d_student, scale, student_dtype, in_place, ctx.backend)
    if ctx.needs_input_grad[1]:
        grads[1] = _scaled(d_teacher, scale, teacher_dtype, in_place, ctx.backend)
    if ctx.needs_input_grad[2]:
        channel_sum_dims = [d for d in range(d_margin.dim()) if d != 1]
        per_channel = (d_margin * scale).sum(dim=channel_sum_dims)
        grads[2] = per_channel.reshape(ctx.margin_shape).to(margin_dtype)
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
    backend = resolve_backend(backend, student.device, "ofdkern::ofd_fused")
    if backend == "reference":
        return reference.ofd_loss(student, teacher, margin, reduction)
    needs_grad = torch.is_grad_enabled()
    loss, *_ = ofd_loss_fused(student, teacher, margin, reduction, backend,
                              needs_grad and student.requires_grad,
                              needs_grad and teacher.requires_grad,
                              needs_grad and margin.requires_grad)
    return loss
